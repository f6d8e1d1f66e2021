//! End-to-end scenarios: engine + simulator over real HTTP on loopback, on both stores.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bulkflow::domain::bulk_change::BulkChangeEvent;
use bulkflow::domain::{BulkChangeId, BulkChangeRequest, BulkChangeStatus};
use bulkflow::projections::read::bulk_summary;
use bulkflow::sim::fixtures::{billable_request, demo_request};
use bulkflow::sim::{Fault, FaultProfile, Script, SimAuth, Simulator};
use bulkflow::workflow::{Progress, RunOutcome};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp};
use crate::on_both_stores;

fn iccid(request: &BulkChangeRequest, i: usize) -> String {
    request.devices[i].iccid.to_string()
}

fn device_id(request: &BulkChangeRequest, i: usize) -> i64 {
    request.devices[i].device_change_id.get()
}

/// Puts the SIMs of devices `indexes` where their change has to write.
fn needing_writes(app: &TestApp, request: &BulkChangeRequest, indexes: &[usize]) {
    for &i in indexes {
        let d = &request.devices[i];
        app.sim.away_from(d.iccid.as_str(), d.target_status);
    }
}

fn rev_devices(request: &BulkChangeRequest) -> Vec<usize> {
    (0..request.devices.len())
        .filter(|&i| request.devices[i].rev_service.is_some())
        .collect()
}

async fn clean_run(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(101, 40);
    let id = request.bulk_change_id;
    // Device 7 (an activation with a Rev service) needs every step.
    needing_writes(&app, &request, &[7]);
    // Device 6 (target Active) is already active: nothing may be written for it.
    app.sim
        .set_sim(&iccid(&request, 6), "In-Service", "ACTIVE", "ENABLED");

    let outcome = app.run(request.clone()).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));

    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(summary.status, "PROCESSED");
    assert_eq!(
        (summary.total, summary.processed, summary.failed),
        (40, 40, 0)
    );
    assert_eq!(summary.devices_by_status.get("PROCESSED"), Some(&40));
    assert_eq!(summary.devices_by_status.len(), 1);
    assert!(summary.processed_date.is_some());

    // An activation with a Rev service: three steps, three log rows, the Rev id on the row.
    let row = app.device_row(device_id(&request, 7)).await;
    assert_eq!(row.status, "PROCESSED");
    assert!(row.is_processed && !row.has_errors);
    assert_eq!(row.iccid, iccid(&request, 7));
    assert_eq!(row.processed_by.as_deref(), Some("test-worker"));
    let rev_id = row.rev_service_id.expect("Rev service id recorded");
    assert!(row
        .details
        .as_deref()
        .unwrap()
        .contains(&format!("Rev service {rev_id}")));
    let logs = app.log_rows(device_id(&request, 7)).await;
    assert_eq!(logs.len(), 3, "{logs:#?}");
    assert!(logs
        .iter()
        .all(|l| l.response_status == "PROCESSED" && !l.has_errors && l.error.is_none()));
    assert!(logs[0].request.as_deref().unwrap().starts_with("GET "));
    assert!(logs[1]
        .request
        .as_deref()
        .unwrap()
        .contains(r#""simDataServiceStatus":"ENABLED""#));
    assert_eq!(logs[1].response.as_deref(), Some("204"));
    assert!(logs[2].response.as_deref().unwrap().starts_with("201"));
    assert_eq!(app.sim.services_for(row.msisdn.as_deref().unwrap()), 1);

    // A suspension and a termination reached the carrier.
    assert_eq!(
        app.sim.sim(&iccid(&request, 1)),
        Some(("In-Service".into(), "SUSPENDED".into(), "DISABLED".into()))
    );
    assert_eq!(app.sim.sim(&iccid(&request, 0)).unwrap().0, "Terminated");
    assert!(app
        .device_row(device_id(&request, 0))
        .await
        .details
        .unwrap()
        .contains("Terminated"));

    // Already at target: recorded, nothing written.
    assert_eq!(app.sim.writes_for(&iccid(&request, 6)), 0);
    assert!(app
        .device_row(device_id(&request, 6))
        .await
        .details
        .unwrap()
        .contains("nothing written"));

    let report = app.sim.report();
    assert_eq!(report.rev_creates, rev_devices(&request).len() as u64);
    assert_eq!(report.rev_duplicate_numbers, 0);
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
}
on_both_stores!(clean_run_processes_every_device, clean_run);

async fn flaky(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::Flaky).await;
    let request = demo_request(102, 150);
    let id = request.bulk_change_id;
    let outcome = app.run(request.clone()).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(
        summary.devices_by_status.get("PROCESSED"),
        Some(&150),
        "{summary:?}"
    );
    let report = app.sim.report();
    assert!(
        report.faults_injected > 0,
        "the profile injected faults: {report:?}"
    );
    assert_eq!(report.rev_duplicate_numbers, 0);
    assert_eq!(report.rev_services, rev_devices(&request).len() as u64);
    for i in 0..request.devices.len() {
        assert!(
            app.sim.writes_for(&iccid(&request, i)) <= 5,
            "POND writes bounded by attempts"
        );
    }
    let retries = app
        .events(id)
        .await
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::DeviceStepRetryScheduled(_)))
        .count();
    assert!(retries > 0, "faults led to recorded retries");
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
}
on_both_stores!(flaky_profile_still_processes_every_device, flaky);

async fn permanent_failures(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(103, 10);
    needing_writes(&app, &request, &[7, 8]);
    let pond_error = r#"{"status":400,"code":"INVALID_STATE","message":"SIM cannot be suspended in its current plan","link":"","developerMessage":"plan P-1 forbids suspension","referenceId":"ref-42"}"#;
    app.sim.script(
        &iccid(&request, 3),
        Script::always(
            "get_status",
            Fault::Status {
                status: 404,
                body: r#"{"status":404,"message":"SIM not found"}"#.into(),
            },
        ),
    );
    app.sim.script(
        &iccid(&request, 8),
        Script::always(
            "set_status",
            Fault::Status {
                status: 400,
                body: pond_error.into(),
            },
        ),
    );
    let outcome = app.run(request.clone()).await;
    // 2 of 10 failed: beyond the tolerated 5 %.
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Error));
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.status, "ERROR");
    assert_eq!((summary.processed, summary.failed), (8, 2));
    assert_eq!(summary.devices_by_status.get("API_FAILED"), Some(&2));

    let unknown = app.device_row(device_id(&request, 3)).await;
    assert_eq!(unknown.status, "API_FAILED");
    assert!(unknown.is_processed && unknown.has_errors);
    assert!(unknown.details.unwrap().contains("unknown to POND"));

    let rejected = app.device_row(device_id(&request, 8)).await;
    assert_eq!(rejected.status, "API_FAILED");
    assert_eq!(rejected.attempts, 1, "a 4xx is not retried");
    let logs = app.log_rows(device_id(&request, 8)).await;
    let last = logs.last().unwrap();
    assert_eq!(last.response_status, "ERROR");
    assert!(last.has_errors);
    assert!(last
        .error
        .as_deref()
        .unwrap()
        .contains("SIM cannot be suspended"));
    assert!(
        last.response.as_deref().unwrap().contains(pond_error),
        "raw POND error kept: {last:?}"
    );
}
on_both_stores!(
    permanent_pond_failures_end_api_failed_with_the_pond_error,
    permanent_failures
);

async fn rev_failure(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(104, 10);
    assert!(request.devices[7].rev_service.is_some());
    app.sim.script(
        &iccid(&request, 7),
        Script::always(
            "rev_create",
            Fault::Status {
                status: 400,
                body: r#"{"ok":false,"message":"customer DEMO-CUSTOMER not found"}"#.into(),
            },
        ),
    );
    let outcome = app.run(request.clone()).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let row = app.device_row(device_id(&request, 7)).await;
    assert_eq!(row.status, "PROCESSED", "the carrier change stands");
    assert!(row.has_errors);
    assert_eq!(row.rev_service_id, None);
    assert!(row
        .details
        .unwrap()
        .contains("WARNING: Rev service not created"));
    assert_eq!(
        app.sim.sim(&iccid(&request, 7)),
        Some(("In-Service".into(), "ACTIVE".into(), "ENABLED".into()))
    );
    let logs = app.log_rows(device_id(&request, 7)).await;
    let rev = logs
        .iter()
        .find(|l| l.description == "Rev service creation failed")
        .unwrap();
    assert_eq!(rev.response_status, "ERROR");
    assert!(rev.error.as_deref().unwrap().contains("not found"));
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.processed, summary.failed, summary.billing_warnings),
        (10, 0, 1)
    );
}
on_both_stores!(
    rev_failure_is_recorded_without_undoing_the_carrier_change,
    rev_failure
);

async fn rate_limited(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(105, 8);
    needing_writes(&app, &request, &[7]);
    app.sim.script(
        &iccid(&request, 7),
        Script::times(
            "set_status",
            Fault::RateLimited {
                retry_after_secs: 1,
            },
            2,
        ),
    );
    let outcome = app.run(request.clone()).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let events = app.events(request.bulk_change_id).await;
    let retries: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            BulkChangeEvent::DeviceStepRetryScheduled(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(retries.len(), 2);
    for r in &retries {
        assert!(
            r.due_at - r.at >= chrono::Duration::seconds(1),
            "Retry-After honoured"
        );
        assert_eq!(r.calls[0].status, Some(429));
    }
    assert!(events
        .iter()
        .any(|e| matches!(e, BulkChangeEvent::ServiceStatusUpdated(s) if s.attempt == 3)));
    let row = app.device_row(device_id(&request, 7)).await;
    assert_eq!(row.status, "PROCESSED");
    let logs = app.log_rows(device_id(&request, 7)).await;
    assert_eq!(
        logs.iter()
            .filter(|l| l.response.as_deref().unwrap_or("").starts_with("429"))
            .count(),
        2
    );
}
on_both_stores!(rate_limited_calls_wait_as_asked_and_succeed, rate_limited);

async fn wrong_api_key(backend: Backend) {
    let app = TestApp::start_with(backend, FaultProfile::None, |c| {
        c.pond.default.api_key = Some(SecretString::from("not-the-key".to_string()));
    })
    .await;
    let request = demo_request(106, 20);
    let id = request.bulk_change_id;
    let outcome = app.run(request.clone()).await;
    let RunOutcome::Paused(reason) = outcome else {
        panic!("expected a pause, got {outcome:?}");
    };
    assert!(reason.contains("401"), "{reason}");
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(summary.status, "PAUSED");
    assert!(summary.status_details.unwrap().contains("401"));
    assert_eq!(summary.failed, 0, "no device marked failed one by one");
    assert!(!summary.devices_by_status.contains_key("API_FAILED"));
    assert!(app.sim.report().pond_status_writes == 0);

    // With the key fixed, an operator resumes and the bulk change completes.
    let mut fixed = app.config.clone();
    fixed.pond.default.api_key = Some(SecretString::from(app.sim.auth().api_key.clone()));
    let engine = Arc::new(bulkflow::app::Engine::with_db(fixed, app.db.clone()).unwrap());
    engine.resume(id, "ops").await.unwrap();
    let outcome = engine
        .run(id, &CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    engine.projector.catch_up().await.unwrap();
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.processed),
        ("PROCESSED", 20)
    );
}
on_both_stores!(
    wrong_api_key_pauses_the_bulk_change_with_the_reason,
    wrong_api_key
);

async fn writes_disabled(backend: Backend) {
    let app = TestApp::start_with(backend, FaultProfile::None, |c| {
        c.pond.default.write_enabled = Some(false);
    })
    .await;
    let request = demo_request(107, 5);
    let outcome = app.run(request.clone()).await;
    let RunOutcome::Paused(reason) = outcome else {
        panic!("expected a pause, got {outcome:?}");
    };
    assert!(reason.contains("WriteIsEnabled"), "{reason}");
    assert_eq!(app.sim.report().pond_calls, 0);
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.status, "PAUSED");
    assert_eq!(summary.devices_by_status.get("NEW"), Some(&5));
}
on_both_stores!(
    disabled_writes_stop_the_bulk_change_before_any_call,
    writes_disabled
);

/// An app whose POND limit lets a 300-device run last long enough to be killed midway, with
/// leases of `lease_ttl_secs`.
async fn slowed_app(backend: Backend, lease_ttl_secs: u64) -> TestApp {
    TestApp::start_with(backend, FaultProfile::None, |c| {
        c.lease_ttl_secs = lease_ttl_secs;
        if let Some(pond) = &mut c.limits.pond {
            pond.rate_per_second = 400.0;
            pond.burst = 10;
        }
    })
    .await
}

/// Starts running `id` on the app's engine and returns once `finished` devices are done, with
/// the run still going (abort the handle to kill it mid-run, calls in flight and all).
async fn run_until(
    app: &TestApp,
    id: BulkChangeId,
    finished: usize,
) -> tokio::task::JoinHandle<()> {
    let progress = Arc::new(Progress::default());
    let run = {
        let engine = app.engine.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let _ = engine
                .run(id, &CancellationToken::new(), Some(&progress))
                .await;
        })
    };
    while progress.finished.load(Ordering::Relaxed) < finished {
        assert!(!run.is_finished(), "finished before it could be stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run
}

async fn restart(backend: Backend) {
    let app = slowed_app(backend, 1).await;
    let request = demo_request(108, 300);
    let id: BulkChangeId = app.engine.submit(request.clone(), false).await.unwrap();
    let first = run_until(&app, id, 100).await;
    first.abort(); // the worker is gone mid-run, calls in flight and all
    let _ = first.await;

    let second = app.another_engine();
    // The dead worker's lease holds the bulk change until it expires.
    let started = std::time::Instant::now();
    let outcome = loop {
        match second
            .run(id, &CancellationToken::new(), None)
            .await
            .unwrap()
        {
            RunOutcome::Busy => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            outcome => break outcome,
        }
    };
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    second.projector.catch_up().await.unwrap();
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(summary.devices_by_status.get("PROCESSED"), Some(&300));
    assert_eq!(app.sim.report().rev_duplicate_numbers, 0);
    for i in 0..request.devices.len() {
        assert!(
            app.sim.writes_for(&iccid(&request, i)) <= 2,
            "at most the in-flight write is redone"
        );
    }
    app.assert_no_device_processed_twice(id).await;
}
on_both_stores!(
    a_new_worker_completes_a_bulk_change_after_a_restart,
    restart
);

/// A worker killed mid-run leaves its bulk change PROCESSING with a lease that has not expired.
/// A restarted worker with an empty queue picks it up at start: on PostgreSQL at once (the dead
/// holder's advisory lock went with its connection), on SQLite once the lease expires.
async fn adopt(backend: Backend) {
    let on_postgres = matches!(backend, Backend::Postgres(_));
    let app = slowed_app(backend, if on_postgres { 3_600 } else { 1 }).await;
    let request = demo_request(109, 300);
    let id: BulkChangeId = app.engine.submit(request.clone(), false).await.unwrap();
    let first = run_until(&app, id, 50).await;
    // While its holder lives, nobody else drives it.
    assert_eq!(
        app.another_engine()
            .run(id, &CancellationToken::new(), None)
            .await
            .unwrap(),
        RunOutcome::Busy
    );
    first.abort();
    let _ = first.await;
    app.engine.projector.catch_up().await.unwrap();
    assert_eq!(
        bulk_summary(&app.db, id).await.unwrap().unwrap().status,
        "PROCESSING"
    );

    if !on_postgres {
        // No liveness signal on SQLite: the dead holder's lease has to run out first.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    let second = app.another_engine();
    let queue = Arc::new(second.queue.clone());
    let options = bulkflow::app::WorkOptions {
        exit_when_idle: true,
        ..Default::default()
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        second.work(&queue, &CancellationToken::new(), options, None),
    )
    .await
    .expect("the restarted worker finished the abandoned bulk change")
    .unwrap();
    second.projector.catch_up().await.unwrap();
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(
        (
            summary.status.as_str(),
            summary.devices_by_status.get("PROCESSED")
        ),
        ("PROCESSED", Some(&300))
    );
    app.assert_no_device_processed_twice(id).await;
    assert_eq!(app.sim.report().rev_duplicate_numbers, 0);
}
on_both_stores!(
    a_restarted_worker_adopts_a_bulk_change_its_dead_holder_left,
    adopt
);

async fn queued(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let requests: Vec<_> = (110..113).map(|id| demo_request(id, 25)).collect();
    for r in &requests {
        app.engine.submit(r.clone(), true).await.unwrap();
    }
    // The same request again: still one bulk change (its second message finds it completed).
    app.engine.submit(requests[0].clone(), true).await.unwrap();
    let options = bulkflow::app::WorkOptions {
        exit_when_idle: true,
        concurrency: 3,
        ..Default::default()
    };
    let queue = Arc::new(app.engine.queue.clone());
    tokio::time::timeout(
        Duration::from_secs(60),
        app.engine
            .work(&queue, &CancellationToken::new(), options, None),
    )
    .await
    .expect("the worker went idle")
    .unwrap();
    assert_eq!(
        app.engine.queue.depth().await.unwrap(),
        0,
        "every message deleted"
    );
    app.engine.projector.catch_up().await.unwrap();
    for r in &requests {
        let summary = bulk_summary(&app.db, r.bulk_change_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (summary.status.as_str(), summary.processed),
            ("PROCESSED", 25)
        );
        app.assert_no_device_processed_twice(r.bulk_change_id).await;
    }
    assert_eq!(app.sim.report().pond_status_reads, 75);
}
on_both_stores!(a_worker_runs_queued_bulk_changes_side_by_side, queued);

/// The engine keeps below the configured rate, so a carrier enforcing a slightly higher limit
/// never has to refuse it; configured too high, it still completes by honouring the 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_rate_limit_is_respected() {
    let within = TestApp::start_with(Backend::Sqlite, FaultProfile::None, |c| {
        let pond = c.limits.pond.as_mut().unwrap();
        pond.rate_per_second = 150.0;
        pond.burst = 5;
    })
    .await;
    let sim = within.sim.clone().with_rate_limits(Some(200), None);
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let mut config = within.config.clone();
    bulkflow::sim::fixtures::configure_for_simulator(
        &mut config,
        &format!("http://{addr}"),
        sim.auth(),
    );
    config.limits.pond = within.config.limits.pond.clone();
    let engine = bulkflow::app::Engine::with_db(config.clone(), within.db.clone()).unwrap();
    let request = demo_request(120, 120);
    let id = engine.submit(request, false).await.unwrap();
    let started = std::time::Instant::now();
    let outcome = engine
        .run(id, &CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let report = sim.report();
    assert_eq!(report.over_rate_limit, 0, "{report:?}");
    let calls = report.pond_calls as f64;
    // At least the status read of every device (most SIMs start in service: no write).
    assert!(calls >= 120.0);
    // 120 devices, ~2 POND calls each at ≤ 150/s (+ a burst of 5) cannot finish much sooner.
    assert!(started.elapsed().as_secs_f64() >= (calls - 5.0) / 150.0 * 0.9);

    // Configured far above what the carrier allows: 429s, and still every device processed.
    let mut too_fast = config;
    too_fast.limits.pond.as_mut().unwrap().rate_per_second = 5_000.0;
    too_fast.limits.pond.as_mut().unwrap().burst = 200;
    let sim2 = within.sim.clone().with_rate_limits(Some(100), None);
    let (addr2, _server2) = sim2.start("127.0.0.1:0").await.unwrap();
    bulkflow::sim::fixtures::configure_for_simulator(
        &mut too_fast,
        &format!("http://{addr2}"),
        sim2.auth(),
    );
    too_fast.limits.pond.as_mut().unwrap().rate_per_second = 5_000.0;
    let engine = bulkflow::app::Engine::with_db(too_fast, within.db.clone()).unwrap();
    let id = engine.submit(demo_request(121, 60), false).await.unwrap();
    let outcome = engine
        .run(id, &CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    assert!(sim2.report().over_rate_limit > 0);
}

/// A Rev creation whose response was lost (the service was created, the client timed out) is
/// looked up and adopted on the next attempt: one service, never two.
async fn lost_rev_response(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(130, 20);
    let rev: Vec<usize> = rev_devices(&request);
    for &i in &rev {
        app.sim.script(
            &iccid(&request, i),
            Script::times("rev_create", Fault::AfterEffectHang { ms: 1_500 }, 1),
        );
    }
    let outcome = app.run(request.clone()).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let report = app.sim.report();
    assert_eq!(
        report.rev_creates,
        rev.len() as u64,
        "one POST each: {report:?}"
    );
    assert_eq!(report.rev_duplicate_numbers, 0);
    assert!(report.rev_lookups >= rev.len() as u64);
    let events = app.events(request.bulk_change_id).await;
    let adopted = events
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::RevServiceCreated(r) if r.adopted))
        .count();
    assert_eq!(adopted, rev.len());
    let unknown = events
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::DeviceStepRetryScheduled(r) if r.outcome_unknown))
        .count();
    assert_eq!(
        unknown,
        rev.len(),
        "the timeouts were recorded as unknown outcomes"
    );
    for &i in &rev {
        let row = app.device_row(device_id(&request, i)).await;
        assert!(row.rev_service_id.is_some());
        assert!(row.details.unwrap().contains("Rev service"));
    }
}
on_both_stores!(
    a_lost_rev_response_is_adopted_not_repeated,
    lost_rev_response
);

/// Numbers with a history in Rev, as in production (the simulator starts empty): every SIM was
/// billed before and terminated (its old service, same customer and type, disconnected), and
/// half the numbers also carry 1,100 services of another customer (a recycled MSISDN), more
/// than two of Rev's pages of 500. Every Rev creation's outcome is lost: half were never made
/// (504 before the work), half were made (504 after it). The lookups read every page; none
/// takes the disconnected service for the lost one (which would leave the reactivated SIM
/// unbilled); each number ends with exactly one new service, recorded in the read model.
async fn rev_history(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = billable_request(131, 8);
    let mut old = HashMap::new();
    for (i, d) in request.devices.iter().enumerate() {
        let number = d.msisdn.as_ref().unwrap().to_string();
        old.insert(
            number.clone(),
            app.sim.service_history(&number, 2002, 3, 1, true),
        );
        if i >= 4 {
            app.sim.service_history(&number, 9009, 3, 1_100, false);
        }
        let fault = if i % 2 == 0 {
            Fault::Hang { ms: 1_500 }
        } else {
            Fault::AfterEffectHang { ms: 1_500 }
        };
        app.sim
            .script(d.iccid.as_str(), Script::times("rev_create", fault, 1));
    }
    let outcome = app.run(request.clone()).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    assert_eq!(app.sim.report().rev_duplicate_numbers, 0);
    let events = app.events(request.bulk_change_id).await;
    for (i, d) in request.devices.iter().enumerate() {
        let number = d.msisdn.as_ref().unwrap().to_string();
        let new = app.sim.service_ids_for(&number);
        assert_eq!(new.len(), 1, "one new service for {number}: {new:?}");
        assert!(!old[&number].contains(&new[0]));
        let created: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                BulkChangeEvent::RevServiceCreated(r)
                    if r.device.device_change_id == d.device_change_id =>
                {
                    Some(r)
                }
                _ => None,
            })
            .collect();
        assert_eq!(created.len(), 1, "device {i}");
        assert_eq!(
            created[0].rev_service_id, new[0],
            "device {i} recorded the service it made, not its number's old one"
        );
        // The service made by the lost POST was adopted; the one never made was made anew.
        assert_eq!(created[0].adopted, i % 2 == 1, "device {i}");
        if i >= 4 && created[0].adopted {
            let pages: Vec<&str> = created[0]
                .calls
                .iter()
                .filter(|c| c.method == "GET")
                .map(|c| c.url.as_str())
                .collect();
            assert_eq!(pages.len(), 3, "{pages:?}");
            assert!(pages[2].ends_with("search.page=3"), "{pages:?}");
        }
        let row = app.device_row(d.device_change_id.get()).await;
        assert_eq!(row.rev_service_id, Some(new[0]), "device {i}");
    }
}
on_both_stores!(
    a_numbers_rev_history_is_paged_through_and_never_taken_for_the_lost_service,
    rev_history
);

/// The simulator limits and counts each account on its own, as a carrier does: one POND
/// distributor going over its limit does not cost another distributor anything, and the report
/// shows each account's calls, refusals and peak concurrency.
#[tokio::test]
async fn the_simulator_limits_and_reports_each_account() {
    let auth = SimAuth::default();
    let sim = Simulator::new(auth.clone(), FaultProfile::None, 1)
        .with_rate_limits(Some(20), None)
        .with_latency(Duration::from_millis(50));
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let http = reqwest::Client::new();
    let get = |dist: &str| {
        http.get(format!(
            "http://{addr}/ds/u/distributorPPUService/v1/{dist}/sim/8901000000000000001/status"
        ))
        .header("x-api-key", &auth.api_key)
        .send()
    };
    // Ten at once on our distributor: over its burst (2), some are refused.
    let answers = futures::future::join_all((0..10).map(|_| get(&auth.distributor_id))).await;
    let refused = answers
        .iter()
        .filter(|r| r.as_ref().unwrap().status() == 429)
        .count();
    assert!(refused > 0, "over the account's limit");
    // Another distributor's first call is not refused for the first one's traffic.
    assert_ne!(get("OTHER-DIST").await.unwrap().status(), 429);
    let report = sim.report();
    let ours = &report.accounts[&format!("pond:{}", auth.distributor_id)];
    assert_eq!((ours.calls, ours.refused), (10, refused as u64));
    assert!(ours.peak_concurrency >= 2, "{ours:?}");
    let other = &report.accounts["pond:OTHER-DIST"];
    assert_eq!((other.calls, other.refused), (1, 0));
}
