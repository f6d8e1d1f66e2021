//! An operator's cancel and retry-failed, from another process than the one driving the bulk
//! change (as from `bulkflow cancel` or the API while a worker runs it).

use std::time::Duration;

use bulkflow::domain::bulk_change::BulkChangeEvent;
use bulkflow::domain::{BulkChangeStatus, DeviceStatus};
use bulkflow::sim::fixtures::{billable_request, demo_request};
use bulkflow::sim::{Fault, FaultProfile, Script, SimAuth, Simulator};
use bulkflow::workflow::RunOutcome;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp};

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts of `id`'s device statuses in the aggregate.
async fn statuses(app: &TestApp, id: bulkflow::domain::BulkChangeId) -> [usize; 4] {
    app.engine
        .store
        .inspect(id, |bc| {
            let n = |s: DeviceStatus| bc.devices().iter().filter(|d| d.status == s).count();
            [
                n(DeviceStatus::Processed),
                n(DeviceStatus::ApiFailed),
                n(DeviceStatus::Cancelled),
                bc.open_devices(),
            ]
        })
        .await
        .unwrap()
}

/// A cancel recorded by another engine while one drives 2,000 devices: the driver notices it,
/// starts no new carrier call (at most the calls already past their slot go out), records the
/// calls in flight, and ends the bulk change CANCELLED with every device accounted for; every
/// Rev service the carrier created is recorded, none twice.
#[sqlx::test]
async fn a_cancel_from_another_process_stops_a_running_bulk_change(pool: sqlx::PgPool) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_latency(Duration::from_millis(20));
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let request = billable_request(140, 2_000);
    let id = app.engine.submit(request, false).await.unwrap();
    let driver = app.engine.clone();
    let run = tokio::spawn(async move { driver.run(id, &CancellationToken::new(), None).await });
    let before = loop {
        let [processed, ..] = statuses(&app, id).await;
        if processed >= 150 {
            break processed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let operator = app.another_engine();
    operator
        .cancel(id, "ops@example.com", "wrong SIM list")
        .await
        .unwrap();
    let at_cancel = app.sim.report();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a_second_later = app.sim.report();
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Cancelled));
    let end = app.sim.report();
    // No carrier call started after the driver noticed; only calls already past their slot
    // (at most the POND and Rev concurrency) reached the carrier after the cancel.
    let pond = app.engine.limits.config(bulkflow::domain::Downstream::Pond);
    let rev = app.engine.limits.config(bulkflow::domain::Downstream::Rev);
    assert_eq!(
        end.pond_calls, a_second_later.pond_calls,
        "POND calls after the cancel was noticed"
    );
    assert_eq!(
        end.rev_creates, a_second_later.rev_creates,
        "Rev creations after the cancel was noticed"
    );
    let late = (a_second_later.pond_calls - at_cancel.pond_calls)
        + (a_second_later.rev_creates - at_cancel.rev_creates);
    assert!(
        late <= (pond.max_concurrency + rev.max_concurrency) as u64,
        "{late} calls reached the carrier after the cancel"
    );
    println!(
        "cancel after {before} devices: {late} calls reached the carrier after it was recorded (limits {} + {})",
        pond.max_concurrency, rev.max_concurrency
    );
    // Every device accounted for; the calls in flight were recorded.
    let [processed, failed, cancelled, open] = statuses(&app, id).await;
    assert_eq!(open, 0);
    assert_eq!(processed + failed + cancelled, 2_000);
    assert!(
        processed >= before && cancelled > 1_000,
        "{processed} processed, {cancelled} cancelled"
    );
    let events = app.events(id).await;
    let created = events
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::RevServiceCreated(_)))
        .count() as u64;
    assert_eq!(
        created, end.rev_services,
        "every Rev service the carrier has is recorded"
    );
    assert_eq!(end.rev_duplicate_numbers, 0);
    let Some(BulkChangeEvent::BulkChangeCancelled(last)) = events.last() else {
        panic!(
            "the last event is not BulkChangeCancelled: {:?}",
            events.last()
        )
    };
    assert_eq!(
        (last.processed, last.failed, last.cancelled, last.total),
        (processed, failed, cancelled, 2_000)
    );
    assert_eq!(last.by, "ops@example.com");
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.status, "CANCELLED");
    assert_eq!(summary.devices_by_status["CANCELLED"], cancelled as i64);
    assert_eq!(
        summary.cancelled, cancelled as i64,
        "the counter agrees with the rows"
    );
    assert_eq!(summary.processed, processed as i64);
    // The audit trail shows who cancelled and why.
    let timeline = bulkflow::audit::Timeline::from_events(&events);
    assert!(timeline
        .milestones
        .iter()
        .any(|m| m.what == "cancel requested" && m.detail.contains("wrong SIM list")));
    assert_eq!(timeline.status, "CANCELLED");
    // A finished bulk change cannot be cancelled again.
    let again = operator.cancel(id, "ops", "again").await;
    assert!(matches!(
        again,
        Err(bulkflow::app::Error::Rejected(
            bulkflow::domain::bulk_change::Error::WrongStatus(BulkChangeStatus::Cancelled)
        ))
    ));
}

/// Rev creations whose responses were lost (the service was created, the POST timed out) when
/// the cancel came: they are looked up, never sent again, and the devices whose service exists
/// end PROCESSED with it (not CANCELLED: they are billed).
#[sqlx::test]
async fn a_cancel_looks_unresolved_rev_creations_up_and_never_repeats_them(pool: sqlx::PgPool) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3).with_suspended_sims();
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let request = billable_request(141, 6);
    for d in &request.devices {
        app.sim.script(
            d.iccid.as_str(),
            Script::times("rev_create", Fault::AfterEffectHang { ms: 1_500 }, 1),
        );
    }
    let id = app.engine.submit(request, false).await.unwrap();
    let driver = app.engine.clone();
    let run = tokio::spawn(async move { driver.run(id, &CancellationToken::new(), None).await });
    let sim = app.sim.clone();
    wait_until("every Rev POST is in flight", || {
        sim.report().rev_creates == 6
    })
    .await;
    app.another_engine()
        .cancel(id, "ops", "stop")
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Cancelled));
    let report = app.sim.report();
    assert_eq!(
        report.rev_creates, 6,
        "no POST after the cancel: {report:?}"
    );
    assert!(
        report.rev_lookups >= 6,
        "each unresolved creation was looked up"
    );
    assert_eq!(report.rev_duplicate_numbers, 0);
    let [processed, _, cancelled, _] = statuses(&app, id).await;
    assert_eq!(
        (processed, cancelled),
        (6, 0),
        "their services exist: billed, not cancelled"
    );
    let adopted = app
        .events(id)
        .await
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::RevServiceCreated(r) if r.adopted))
        .count();
    assert_eq!(adopted, 6);
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
}

/// A bulk change nobody drives (queued, not started) is cancelled and ended by the process
/// that cancels it, without a single carrier call; retry-failed is then refused.
async fn cancel_of_a_queued_bulk_change(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(142, 30);
    let id = app.engine.submit(request, true).await.unwrap();
    app.engine.cancel(id, "ops", "not needed").await.unwrap();
    // A second cancel changes nothing.
    app.engine.cancel(id, "ops", "twice").await.unwrap();
    let outcome = app
        .engine
        .run(id, &CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Cancelled));
    assert_eq!(app.sim.report().pond_calls, 0);
    assert_eq!(statuses(&app, id).await, [0, 0, 30, 0]);
    let requested = app
        .events(id)
        .await
        .iter()
        .filter(|e| matches!(e, BulkChangeEvent::BulkChangeCancelRequested(_)))
        .count();
    assert_eq!(requested, 1);
    app.assert_projections_match_events(id).await;
    let row = app
        .device_row(request_device(&demo_request(142, 30), 0))
        .await;
    assert_eq!(row.status, "CANCELLED");
    assert!(row.is_processed);
    assert_eq!(
        row.details.as_deref(),
        Some("cancelled before any change at the carrier")
    );
    let retry = app.engine.retry_failed(id, "ops").await;
    assert!(matches!(
        retry,
        Err(bulkflow::app::Error::Rejected(
            bulkflow::domain::bulk_change::Error::WrongStatus(BulkChangeStatus::Cancelled)
        ))
    ));
}

fn request_device(request: &bulkflow::domain::BulkChangeRequest, i: usize) -> i64 {
    request.devices[i].device_change_id.get()
}

#[sqlx::test]
async fn a_queued_bulk_change_is_cancelled_without_a_call_on_postgres(pool: sqlx::PgPool) {
    cancel_of_a_queued_bulk_change(Backend::Postgres(pool)).await;
}

#[tokio::test]
async fn a_queued_bulk_change_is_cancelled_without_a_call_on_sqlite() {
    cancel_of_a_queued_bulk_change(Backend::Sqlite).await;
}

/// A billable request of `devices` devices on PostgreSQL against a simulator answering in
/// `latency_ms`, whose first five SIMs are unknown (404) on their first status read only.
async fn five_unknown_at_first(
    pool: sqlx::PgPool,
    latency_ms: u64,
    id: i64,
    devices: u32,
) -> (TestApp, bulkflow::domain::BulkChangeRequest) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_latency(Duration::from_millis(latency_ms));
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let request = billable_request(id, devices);
    let unknown = Fault::Status {
        status: 404,
        body: r#"{"message":"SIM not found"}"#.into(),
    };
    for d in &request.devices[..5] {
        app.sim.script(
            d.iccid.as_str(),
            Script::times("get_status", unknown.clone(), 1),
        );
    }
    (app, request)
}

/// Retry-failed asked by another process while the bulk change still runs: the driver takes
/// the reopened devices up in the same run (their first attempt failed with a 404 once), and
/// the bulk change ends PROCESSED with none failed; the new round's attempts count afresh.
#[sqlx::test]
async fn retry_failed_while_running_gives_the_failed_devices_a_new_round(pool: sqlx::PgPool) {
    let (app, request) = five_unknown_at_first(pool, 20, 143, 600).await;
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    let driver = app.engine.clone();
    let run = tokio::spawn(async move { driver.run(id, &CancellationToken::new(), None).await });
    loop {
        let [_, failed, _, open] = statuses(&app, id).await;
        assert!(open > 0, "finished before the failures could be retried");
        if failed == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reopened = app.another_engine().retry_failed(id, "ops").await.unwrap();
    assert_eq!(reopened, 5);
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    assert_eq!(statuses(&app, id).await, [600, 0, 0, 0]);
    let events = app.events(id).await;
    let second_round: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            BulkChangeEvent::DeviceStatusUpdated(u)
                if request.devices[..5]
                    .iter()
                    .any(|d| d.device_change_id == u.device.device_change_id) =>
            {
                Some(u.attempt)
            }
            _ => None,
        })
        .collect();
    assert_eq!(second_round, vec![2; 5], "attempt numbers keep rising");
    app.engine.projector.catch_up().await.unwrap();
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((summary.status.as_str(), summary.failed), ("PROCESSED", 0));
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
}

/// Retry-failed on a finished bulk change: it runs again (as a worker would take it up) and
/// its ERROR becomes PROCESSED; with nothing failed, a second retry-failed is refused.
#[sqlx::test]
async fn retry_failed_runs_a_finished_bulk_change_again(pool: sqlx::PgPool) {
    let app = TestApp::start(Backend::Postgres(pool), FaultProfile::None).await;
    let request = demo_request(144, 10);
    let unknown = Fault::Status {
        status: 404,
        body: r#"{"message":"SIM not found"}"#.into(),
    };
    for d in &request.devices[..4] {
        app.sim.script(
            d.iccid.as_str(),
            Script::times("get_status", unknown.clone(), 1),
        );
    }
    assert_eq!(
        app.run(request.clone()).await,
        RunOutcome::Completed(BulkChangeStatus::Error)
    );
    let id = request.bulk_change_id;
    assert_eq!(app.engine.retry_failed(id, "ops").await.unwrap(), 4);
    app.engine.projector.catch_up().await.unwrap();
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((summary.status.as_str(), summary.failed), ("PROCESSING", 0));
    let outcome = app
        .another_engine()
        .run(id, &CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    app.assert_projections_match_events(id).await;
    let timeline = bulkflow::audit::Timeline::from_events(&app.events(id).await);
    let retried = timeline
        .devices
        .iter()
        .find(|d| d.device_change_id == request.devices[0].device_change_id.get())
        .unwrap();
    let outcomes: Vec<&str> = retried.entries.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes[..2], ["failed", "retry-failed"]);
    assert_eq!(retried.status, "PROCESSED");
    let again = app.engine.retry_failed(id, "ops").await;
    assert!(matches!(
        again,
        Err(bulkflow::app::Error::Rejected(
            bulkflow::domain::bulk_change::Error::NothingToRetry
        ))
    ));
}

/// Worker processes and the command line: `bulkflow retry-failed` on a bulk change a worker
/// finished with failures runs it again in a worker; `bulkflow cancel --no-wait` on one another
/// worker process drives makes that worker end it CANCELLED.
#[sqlx::test]
async fn the_command_line_cancels_and_retries_bulk_changes_that_worker_processes_drive(
    pool: sqlx::PgPool,
) {
    use crate::limits::{pond_only, wait_for_all, worker, workflow_with_pond};
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_latency(Duration::from_millis(10));
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    // 200 POND calls a second: the 3,000 devices of `big` would take half a minute.
    let workflow = workflow_with_pond(dir.path(), 200.0, 16);
    let big = pond_only(145, 3_000);
    let small = pond_only(146, 20);
    let unknown = Fault::Status {
        status: 404,
        body: r#"{"message":"SIM not found"}"#.into(),
    };
    for d in &small.devices[..5] {
        app.sim.script(
            d.iccid.as_str(),
            Script::times("get_status", unknown.clone(), 1),
        );
    }
    let (big_id, small_id) = (big.bulk_change_id, small.bulk_change_id);
    app.engine.submit(big, true).await.unwrap();
    app.engine.submit(small, true).await.unwrap();
    let url = crate::helpers::pg_url(&app.db).await;
    let workers = vec![
        worker(&app, &url, &workflow, 1),
        worker(&app, &url, &workflow, 2),
    ];
    let cli = |args: &[&str]| {
        let out = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
            .args(args)
            .env("BULKFLOW_DATABASE_URL", &url)
            .env("BULKFLOW_WORKFLOW", &workflow)
            .env("BULKFLOW_WORKER_ID", "operator-cli")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bulkflow {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let status = |id| {
        let engine = app.engine.clone();
        async move {
            engine
                .store
                .inspect(id, |bc| {
                    (bc.status(), bc.processed_devices(), bc.failed_devices())
                })
                .await
                .unwrap()
        }
    };
    loop {
        let (s, _, failed) = status(small_id).await;
        if s.is_final() {
            assert_eq!(failed, 5);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let said = cli(&["retry-failed", &small_id.to_string(), "--by", "ops"]);
    assert!(said.contains("5 failed devices get a new round"), "{said}");
    loop {
        let (_, processed, _) = status(big_id).await;
        if processed >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let said = cli(&[
        "cancel",
        &big_id.to_string(),
        "--no-wait",
        "--reason",
        "halt",
    ]);
    assert!(said.contains("cancel recorded"), "{said}");
    wait_for_all(workers, Duration::from_secs(120)).await;
    let (s, processed, failed) = status(big_id).await;
    assert_eq!(s, BulkChangeStatus::Cancelled);
    assert!(processed < 3_000 && failed == 0, "{processed} processed");
    assert_eq!(status(small_id).await, (BulkChangeStatus::Processed, 20, 0));
    // The cancel was written by the command line, its end by the worker process driving it.
    let events = app.engine.store.events(big_id).await.unwrap();
    let writer = |name: &str| {
        events
            .iter()
            .find(|e| e.payload.name() == name)
            .and_then(|e| e.metadata.get("worker").cloned())
            .unwrap_or_default()
    };
    assert_eq!(writer("BulkChangeCancelRequested"), "operator-cli");
    assert!(
        writer("BulkChangeCancelled").starts_with("worker-"),
        "{}",
        writer("BulkChangeCancelled")
    );
    app.assert_no_device_processed_twice(big_id).await;
    app.assert_no_device_processed_twice(small_id).await;
}

/// A summary of a bulk change over 20,000 devices reads its counters, not its devices: the
/// devices not ended are counted together as OPEN, the cancelled ones by their counter.
#[sqlx::test]
async fn a_big_bulk_changes_summary_comes_from_its_counters(pool: sqlx::PgPool) {
    let app = TestApp::start(Backend::Postgres(pool), FaultProfile::None).await;
    let id = app.submit(demo_request(147, 25_000)).await;
    app.engine.projector.catch_up().await.unwrap();
    let summary = |app: &TestApp| {
        let db = app.db.clone();
        async move {
            bulkflow::projections::read::bulk_summary(&db, id)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let before = summary(&app).await;
    assert_eq!(
        before.devices_by_status,
        [("OPEN".to_string(), 25_000)].into_iter().collect()
    );
    app.engine.cancel(id, "ops", "too big").await.unwrap();
    let outcome = app
        .engine
        .run(id, &CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Cancelled));
    app.engine.projector.catch_up().await.unwrap();
    let after = summary(&app).await;
    assert_eq!((after.cancelled, after.finished()), (25_000, 25_000));
    assert_eq!(
        after.devices_by_status,
        [("CANCELLED".to_string(), 25_000)].into_iter().collect()
    );
    assert_eq!(app.sim.report().pond_calls, 0);
}

/// Retry-failed from another process while a task of the driving process keeps reading the
/// bulk change (as a worker's message handler or an operator command in that process does):
/// a read never takes the state away from the runner, so the runner loads the stream once and
/// never reloads it, and the reopened devices are taken up once each. (A read that took the
/// state out of memory made the runner reload the whole stream on every miss, and a reload
/// that had the new round in before the failures' commit queued those devices twice.)
#[sqlx::test]
async fn retry_failed_beside_a_reader_in_the_driving_process(pool: sqlx::PgPool) {
    let (app, request) = five_unknown_at_first(pool, 5, 145, 1_000).await;
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    // The accept left it in memory: the runner and the reads find it there.
    assert_eq!(statuses(&app, id).await[3], 1_000);
    assert_eq!(app.engine.store.cold_loads(), 0);
    let dropped = || {
        crate::metrics::sum(
            &bulkflow::metrics::handle().render(),
            "bulkflow_duplicate_dispatches_prevented_total",
            &[],
        )
    };
    let dropped_before = dropped();
    let driver = app.engine.clone();
    let run = tokio::spawn(async move { driver.run(id, &CancellationToken::new(), None).await });
    let other = app.another_engine();
    let mut retry = None;
    let mut reads = 0;
    while !run.is_finished() {
        let [_, failed, _, open] = statuses(&app, id).await;
        reads += 1;
        if failed == 5 && retry.is_none() {
            assert!(open > 0, "finished before the failures could be retried");
            let o = other.clone();
            retry = Some(tokio::spawn(async move { o.retry_failed(id, "ops").await }));
        }
        tokio::task::yield_now().await;
    }
    let outcome = run.await.unwrap().unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    let reopened = retry
        .expect("the failures were seen")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reopened, 5);
    // None, but perhaps one by a read that found the state dropped as the run ended.
    let loads = app.engine.store.cold_loads();
    assert!(loads <= 1, "{loads} whole-stream loads over {reads} reads");
    // No device was queued twice (the runner's guard against a second dispatch never had to
    // drop one).
    assert_eq!(dropped(), dropped_before);
    assert_eq!(statuses(&app, id).await, [1_000, 0, 0, 0]);
    app.assert_no_device_processed_twice(id).await;
    app.engine.projector.catch_up().await.unwrap();
    app.assert_projections_match_events(id).await;
}
