//! Production faults the simulator does not make easy: a worker that is only *presumed* dead
//! (its lock session cut while it keeps running), a takeover mid-run, and absurd carrier hints.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkflow::domain::bulk_change::{BulkChangeEvent, BulkChangePaused, BulkRef};
use bulkflow::domain::{BulkChangeId, BulkChangeStatus};
use bulkflow::sim::fixtures::{billable_request, demo_request};
use bulkflow::sim::{Fault, FaultProfile, Script, SimAuth, Simulator};
use bulkflow::store::batched::BatchedPgRepository;
use bulkflow::store::lease::{Fence, Fenced};
use bulkflow::store::Db;
use bulkflow::with_pool;
use bulkflow::workflow::{Progress, RunOutcome};
use cqrs_es::persist::PersistenceError;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp};
use crate::on_both_stores;

/// Runs `id` on the app's engine in the background and returns once `finished` devices are done,
/// with the run still going.
async fn run_until(
    app: &TestApp,
    id: BulkChangeId,
    finished: usize,
) -> tokio::task::JoinHandle<Result<RunOutcome, bulkflow::app::Error>> {
    let progress = Arc::new(Progress::default());
    let run = {
        let engine = app.engine.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            engine
                .run(id, &CancellationToken::new(), Some(&progress))
                .await
        })
    };
    while progress.finished.load(Ordering::Relaxed) < finished {
        assert!(
            !run.is_finished(),
            "finished before {finished} devices were done"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run
}

async fn max_sequence(db: &Db, id: BulkChangeId) -> i64 {
    const SQL: &str = "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE aggregate_id = $1";
    with_pool!(db, pool => {
        sqlx::query_scalar::<_, i64>(SQL)
            .bind(id.to_string())
            .fetch_one(pool)
            .await
            .unwrap()
    })
}

/// What another worker's takeover does to the lease row: a new owner at the next epoch.
async fn take_over_behind_its_back(db: &Db, id: BulkChangeId) {
    const SQL: &str = "UPDATE bulk_change_leases SET owner = 'intruder', epoch = epoch + 1
        WHERE bulk_change_id = $1";
    let rows = with_pool!(db, pool => {
        sqlx::query(SQL)
            .bind(id.get())
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
    });
    assert_eq!(rows.unwrap(), 1);
}

/// A runner whose lease was taken over while it ran (its epoch now stale) writes nothing more:
/// its next append is refused in the same transaction, and it stops at once.
async fn stale_epoch(backend: Backend) {
    let app = TestApp::start_with(backend, FaultProfile::None, |c| {
        if let Some(pond) = &mut c.limits.pond {
            pond.rate_per_second = 400.0;
            pond.burst = 10;
        }
    })
    .await;
    let request = demo_request(140, 300);
    let id = app.engine.submit(request, false).await.unwrap();
    let run = run_until(&app, id, 50).await;
    take_over_behind_its_back(&app.db, id).await;
    let at_takeover = max_sequence(&app.db, id).await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the superseded runner stopped at once")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, RunOutcome::Superseded);
    assert_eq!(
        max_sequence(&app.db, id).await,
        at_takeover,
        "nothing was appended after the takeover"
    );
    let open = app
        .engine
        .store
        .inspect(id, |b| b.open_devices())
        .await
        .unwrap();
    assert!(open > 0, "the run was stopped midway");
}
on_both_stores!(
    a_runner_whose_lease_was_taken_over_writes_nothing_more,
    stale_epoch
);

const DEVICES: i64 = 200;

/// The zombie: the driving worker's lock session is terminated while it keeps running,
/// with Rev POSTs in flight at a slow Rev; a second worker adopts the bulk change. No number gets
/// two services, every POST that reached Rev has an intent of its own in the trail, every device
/// ends, the read models re-derive from the events, and the first worker's appends are refused.
#[sqlx::test(migrations = false)]
async fn a_zombie_whose_lock_session_was_cut_creates_no_second_rev_service(pool: sqlx::PgPool) {
    // Rev takes 1.5 s to create a service (well within the client's 5 s timeout): POSTs are still
    // in flight at Rev when the adopter arrives, and a lookup made then would miss them.
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 11)
        .with_latency(Duration::from_millis(20));
    let app = TestApp::start_with_sim(Backend::Postgres(pool.clone()), sim, |c| {
        if let Some(rev) = &mut c.limits.rev {
            rev.timeout_ms = 5_000;
        }
    })
    .await;
    let request = billable_request(150, DEVICES as u32);
    for d in &request.devices {
        app.sim.script(
            d.iccid.as_str(),
            Script::times("rev_create", Fault::Slow { ms: 1_500 }, 1),
        );
    }
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    let zombie = {
        let engine = app.engine.clone();
        tokio::spawn(async move { engine.run(id, &CancellationToken::new(), None).await })
    };
    // The session is cut when the last POSTs are in flight at the slow Rev (32 at a time), so
    // that the adopter's first Rev work is looking those up.
    let started = Instant::now();
    while app.sim.report().rev_creates < DEVICES as u64 - 40 {
        assert!(started.elapsed() < Duration::from_secs(60), "no Rev POSTs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE 'bulkflow-hold %'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cut, vec![true], "the holder's lock session was terminated");

    // A second worker adopts it at once (the advisory lock went with the session).
    let adopter = app.another_engine();
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match adopter.run(id, &CancellationToken::new(), None).await {
                Ok(RunOutcome::Busy) => tokio::time::sleep(Duration::from_millis(50)).await,
                other => break other,
            }
        }
    })
    .await
    .expect("the adopter finished")
    .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let zombie = tokio::time::timeout(Duration::from_secs(30), zombie)
        .await
        .expect("the zombie stopped")
        .unwrap()
        .unwrap();
    assert!(
        matches!(zombie, RunOutcome::Superseded | RunOutcome::Stopped),
        "the zombie stopped without finishing: {zombie:?}"
    );

    // Its epoch (the first) is fenced out for good: an append at the next sequence under it is
    // refused (no command is left that the finished bulk change would take).
    let next = max_sequence(&app.db, id).await as usize + 1;
    let late = cqrs_es::EventEnvelope::<bulkflow::domain::bulk_change::BulkChange> {
        aggregate_id: id.to_string(),
        sequence: next,
        payload: BulkChangeEvent::BulkChangePaused(BulkChangePaused {
            bulk: BulkRef {
                bulk_change_id: id,
                tenant_id: request.tenant_id,
                service_provider_id: request.service_provider_id,
            },
            reason: "late zombie".into(),
            at: chrono::Utc::now(),
        }),
        metadata: HashMap::new(),
    };
    let fence = Fence {
        bulk_change_id: id,
        epoch: 1,
    };
    let refused = BatchedPgRepository::new(pool.clone())
        .append(&[late], Some(fence))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, PersistenceError::UnknownError(e) if e.downcast_ref::<Fenced>() == Some(&Fenced(fence))),
        "{refused:?}"
    );

    let report = app.sim.report();
    assert_eq!(report.rev_duplicate_numbers, 0, "{report:?}");
    for d in &request.devices {
        let number = d.msisdn.as_ref().unwrap().to_string();
        assert_eq!(app.sim.services_for(&number), 1, "one service for {number}");
    }
    // Every POST that reached Rev is attributable: no device saw more POSTs than intents.
    let events = app.events(id).await;
    let mut intents: HashMap<i64, u64> = HashMap::new();
    let mut epochs = std::collections::BTreeSet::new();
    for e in &events {
        if let BulkChangeEvent::RevServiceCreationStarted(s) = e {
            *intents.entry(s.device.device_change_id.get()).or_default() += 1;
        }
    }
    for envelope in app.engine.store.events(id).await.unwrap() {
        if let Some(epoch) = envelope.metadata.get("epoch") {
            epochs.insert(epoch.clone());
        }
    }
    assert!(epochs.len() >= 2, "both holders wrote: {epochs:?}");
    assert!(
        report.rev_creates <= intents.values().sum::<u64>(),
        "{} POSTs for {} intents",
        report.rev_creates,
        intents.values().sum::<u64>()
    );
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.devices_by_status.get("PROCESSED"), Some(&DEVICES));
}

/// A carrier's absurd wait hint (`Retry-After: 9999999999999`) is recorded as given and obeyed
/// only up to the configured cap; a 5xx with a 50 MB body is read only in part. Nothing panics
/// and the bulk change completes.
async fn absurd_hints(backend: Backend) {
    let app = TestApp::start_with(backend, FaultProfile::None, |c| {
        c.safety.max_retry_after_secs = 1;
    })
    .await;
    let request = demo_request(160, 20);
    let huge = request.devices[3].iccid.to_string();
    let long = request.devices[4].iccid.to_string();
    app.sim.script(
        &huge,
        Script::times(
            "get_status",
            Fault::RateLimited {
                retry_after_secs: 9_999_999_999_999,
            },
            1,
        ),
    );
    app.sim.script(
        &long,
        Script::times(
            "get_status",
            Fault::Status {
                status: 503,
                body: "x".repeat(50 << 20),
            },
            1,
        ),
    );
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), app.run(request.clone()))
        .await
        .expect("the bulk change did not wait for the hint");
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    assert!(started.elapsed() < Duration::from_secs(30));
    let id = request.bulk_change_id;
    let retries: Vec<_> = app
        .events(id)
        .await
        .into_iter()
        .filter_map(|e| match e {
            BulkChangeEvent::DeviceStepRetryScheduled(r) => Some(r),
            _ => None,
        })
        .collect();
    let throttled = retries
        .iter()
        .find(|r| r.device.iccid.as_str() == huge)
        .expect("the 429 was recorded");
    assert_eq!(
        throttled.calls[0].retry_after_secs,
        Some(9_999_999_999_999),
        "the hint is recorded as given"
    );
    assert!(
        throttled.due_at - throttled.at <= chrono::Duration::seconds(1),
        "the wait is capped: {:?}",
        throttled.due_at - throttled.at
    );
    let overlong = retries
        .iter()
        .find(|r| r.device.iccid.as_str() == long)
        .expect("the 503 was recorded");
    let kept = overlong.calls[0].response_body.as_deref().unwrap_or("");
    assert!(kept.len() <= 4_000, "a bounded excerpt is kept");
    app.assert_projections_match_events(id).await;
}
on_both_stores!(
    an_absurd_wait_hint_is_capped_and_recorded_as_given,
    absurd_hints
);

/// A worker whose calls are all held by a carrier's (capped) wait hint still stops within seconds
/// of SIGTERM, abandoning the calls that wait; what it recorded stays consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_within_seconds_of_sigterm_whatever_its_calls_wait_for() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let request = demo_request(170, 200);
    let first = request.devices[0].iccid.to_string();
    app.sim.script(
        &first,
        Script::times(
            "get_status",
            Fault::RateLimited {
                retry_after_secs: 9_999_999_999_999,
            },
            1,
        ),
    );
    app.engine.submit(request.clone(), true).await.unwrap();
    // The shipped POND rate (100/s) keeps most calls queued in the limiter when the hint arrives.
    let mut worker = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
        .args(["worker", "--exit-when-idle"])
        .env("BULKFLOW_DATABASE_URL", app.database_url())
        .env("BULKFLOW_SAFETY_STOP_GRACE_MS", "1000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while app.sim.report().rate_limited < 1 {
        assert!(started.elapsed() < Duration::from_secs(30), "no 429 seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls_before = app.sim.report().pond_calls;
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || loop {
        if let Some(status) = worker.try_wait().unwrap() {
            return status;
        }
        if signalled.elapsed() > Duration::from_secs(20) {
            let _ = worker.kill();
            panic!("the worker ignored SIGTERM for 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "{status:?} (signal {:?})",
        status.signal()
    );
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
    assert_eq!(
        app.sim.report().pond_calls,
        calls_before,
        "the hint held every call"
    );
    // The 429 was recorded with the hint as given and a capped wait (300 s by default).
    let id = request.bulk_change_id;
    let retry = app
        .events(id)
        .await
        .into_iter()
        .find_map(|e| match e {
            BulkChangeEvent::DeviceStepRetryScheduled(r) if r.device.iccid.as_str() == first => {
                Some(r)
            }
            _ => None,
        })
        .expect("the 429 was recorded");
    assert_eq!(retry.calls[0].retry_after_secs, Some(9_999_999_999_999));
    assert!(retry.due_at - retry.at <= chrono::Duration::seconds(300));
    let (status, open) = app
        .engine
        .store
        .inspect(id, |b| (b.status(), b.open_devices()))
        .await
        .unwrap();
    assert_eq!(status, BulkChangeStatus::Processing);
    assert!(open > 0, "stopped before the end");
}

/// PostgreSQL restarted (the cluster's own restart) in the middle of a run: every connection of
/// the worker dies at once. The worker keeps going: the run that failed is taken up again by the
/// orphan scan and its message, and the bulk change finishes with nothing lost and no duplicate.
///
/// It restarts the whole cluster, so it cannot share it with other tests: `./scripts/test.sh`
/// runs it on its own after the suite (`--ignored`).
#[sqlx::test(migrations = false)]
#[ignore = "restarts the PostgreSQL cluster; run alone (scripts/test.sh does)"]
async fn a_postgres_restart_mid_run_loses_and_repeats_nothing(pool: sqlx::PgPool) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 13)
        .with_latency(Duration::from_millis(10));
    let app = TestApp::start_with_sim(Backend::Postgres(pool.clone()), sim, |c| {
        if let Some(pond) = &mut c.limits.pond {
            pond.rate_per_second = 300.0;
            pond.burst = 10;
        }
    })
    .await;
    let request = billable_request(180, 600);
    // Every device takes all three steps, so the run lasts well past the restart.
    for d in &request.devices {
        app.sim.away_from(d.iccid.as_str(), d.target_status);
    }
    let id = app.engine.submit(request.clone(), true).await.unwrap();
    let progress = Arc::new(Progress::default());
    let worker = {
        let engine = app.engine.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let queue = Arc::new(engine.queue.clone());
            let options = bulkflow::app::WorkOptions {
                exit_when_idle: true,
                ..Default::default()
            };
            engine
                .work(&queue, &CancellationToken::new(), options, Some(progress))
                .await
        })
    };
    let started = Instant::now();
    while progress.finished.load(Ordering::Relaxed) < 150 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .min()
        .expect("a cluster version");
    let restarted = tokio::task::spawn_blocking(move || {
        std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "restart"])
            .status()
    })
    .await
    .unwrap()
    .expect("pg_ctlcluster runs");
    assert!(restarted.success(), "the cluster restarted: {restarted:?}");
    let finished_at_restart = progress.finished.load(Ordering::Relaxed);
    assert!(
        finished_at_restart < request.devices.len(),
        "restarted mid-run"
    );

    tokio::time::timeout(Duration::from_secs(120), worker)
        .await
        .expect("the worker finished the bulk change after the restart")
        .unwrap()
        .unwrap();
    let report = app.sim.report();
    assert_eq!(report.rev_duplicate_numbers, 0, "{report:?}");
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.status, "PROCESSED");
    assert_eq!(summary.devices_by_status.get("PROCESSED"), Some(&600));
}

/// POND answers 503 to everything for 4 s in the middle of a 600-device change: four times the
/// test workflow's whole retry budget per step (as five minutes are against the shipped one). The
/// bulk change holds POND (visible in its status), probes it, resumes by itself when it answers,
/// and no device is failed by the outage.
async fn outage(backend: Backend) {
    let app = TestApp::start_with(backend, FaultProfile::None, |c| {
        if let Some(pond) = &mut c.limits.pond {
            // Fast enough that retries are spaced by the retry policy, not by the rate limit.
            pond.rate_per_second = 1_000.0;
            pond.burst = 20;
            pond.breaker = bulkflow::workflow::definition::Breaker {
                failures: 10,
                probe_ms: 200,
                max_probe_ms: 1_000,
            };
        }
    })
    .await;
    let request = demo_request(190, 600);
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    let run = run_until(&app, id, 100).await;
    let outage = Duration::from_secs(4);
    app.sim.outage(false, outage);
    let began = Instant::now();
    // While it lasts, the bulk change shows POND held.
    let mut seen_held = None;
    while began.elapsed() < outage {
        app.engine.projector.catch_up().await.unwrap();
        let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
            .await
            .unwrap()
            .unwrap();
        if let Some(details) = summary.status_details.filter(|d| d.contains("POND held")) {
            assert_eq!(summary.status, "PROCESSING");
            seen_held = Some(details);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen_held = seen_held.expect("the status showed POND held during the outage");
    assert!(seen_held.contains("503"), "{seen_held}");
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("it resumed by itself and finished")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    app.engine.projector.catch_up().await.unwrap();
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        summary.devices_by_status.get("API_FAILED"),
        None,
        "{summary:?}"
    );
    assert_eq!(summary.failed, 0);
    let events = app.events(id).await;
    let held = events
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::DownstreamHeld(h) if h.downstream == bulkflow::domain::Downstream::Pond))
        .count();
    let resumed = events
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::DownstreamResumed(_)))
        .count();
    assert_eq!((held, resumed), (1, 1), "held once, resumed once");
    let refused = app.sim.report().outage_refusals;
    assert!(refused > 0);
    // While held only probes went out: the refusals are the calls in flight when it tripped,
    // the ones that tripped it and a probe now and then, not 4 s of full-rate calls.
    assert!(refused < 150, "{refused} calls refused during the outage");
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
}
on_both_stores!(
    a_carrier_outage_holds_the_bulk_change_and_fails_no_device,
    outage
);

/// A step task that panics (here: right after a POND response arrived, and right after a Rev POST
/// was answered) becomes a recorded retryable outcome; the worker neither waits for a report that
/// cannot come nor dies, the bulk change completes, and the panicked Rev creation is looked up and
/// adopted rather than repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_is_recorded_as_retryable_and_the_run_goes_on() {
    for (n, point) in [
        "panic:pond.get_status.response_received@5",
        "panic:rev.create.response_received@2",
    ]
    .into_iter()
    .enumerate()
    {
        let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
        let request = demo_request(200 + n as i64, 40);
        let id = request.bulk_change_id;
        app.engine.submit(request.clone(), true).await.unwrap();
        let mut worker = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
            .args(["worker", "--exit-when-idle"])
            .env("BULKFLOW_DATABASE_URL", app.database_url())
            .env("BULKFLOW_FAILPOINT", point)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let status = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            loop {
                if let Some(status) = worker.try_wait().unwrap() {
                    return status;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    let _ = worker.kill();
                    panic!("the worker hung after a panicking step");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap();
        assert!(status.success(), "{point}: {status:?}");
        app.engine.projector.catch_up().await.unwrap();
        let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (summary.status.as_str(), summary.processed),
            ("PROCESSED", 40),
            "{point}"
        );
        let recorded = app.events(id).await.into_iter().any(|e| {
            matches!(e, BulkChangeEvent::DeviceStepRetryScheduled(r)
                if r.reason.contains("failed inside bulkflow") && r.reason.contains("panicking"))
        });
        assert!(
            recorded,
            "{point}: the panic was recorded as a retryable outcome"
        );
        assert_eq!(app.sim.report().rev_duplicate_numbers, 0, "{point}");
        app.assert_no_device_processed_twice(id).await;
        app.assert_projections_match_events(id).await;
    }
}
