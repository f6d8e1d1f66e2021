//! A fleet of worker processes sharing one Rev account: billable bulk changes side by side.

use std::process::Stdio;
use std::time::Duration;

use bulkflow::domain::BulkChangeId;
use bulkflow::sim::fixtures::billable_request;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};
use bulkflow::store::Db;

use crate::helpers::{pg_url, Backend, TestApp, Worker};
use crate::limits::wait_for_all;

/// Three worker processes, one billable bulk change each, share the Rev account's 8 calls a
/// second and 8 concurrent calls (the shipped limits). Every Rev creation goes out within the
/// send window of its intent (2 s here): a creation takes its concurrency slot before its
/// intent is recorded, so what waits between intent and POST is bounded by the account's
/// concurrency, not by the size of the fleet. (When each worker recorded its own 8 intents
/// first, 24 intents waited ~3 s for the fleet's 8 slots: every one came back not sent, again
/// and again, and the bulk changes made almost no progress.)
#[sqlx::test]
async fn three_workers_sharing_the_rev_account_send_every_creation_within_its_window(
    pool: sqlx::PgPool,
) {
    const DEVICES: u32 = 80;
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 7);
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let ids = [9_101, 9_102, 9_103];
    for id in ids {
        app.engine
            .submit(billable_request(id, DEVICES), true)
            .await
            .unwrap();
    }
    let url = pg_url(&app.db).await;
    let workers = (0..3)
        .map(|n| {
            Worker(
                crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
                    .args(["worker", "--exit-when-idle", "--concurrency", "1"])
                    .env("BULKFLOW_DATABASE_URL", &url)
                    .env("BULKFLOW_WORKER_ID", format!("fleet-{n}"))
                    .env("BULKFLOW_SAFETY_REV_SEND_WINDOW_MS", "2000")
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    wait_for_all(workers, Duration::from_secs(180)).await;
    app.engine.projector.catch_up().await.unwrap();
    for id in ids {
        let id = BulkChangeId::new(id).unwrap();
        let summary = app.summary(id).await;
        assert_eq!(
            (summary.status.as_str(), summary.processed, summary.failed),
            ("PROCESSED", i64::from(DEVICES), 0),
            "{summary:?}"
        );
        app.assert_no_device_processed_twice(id).await;
    }
    let Db::Postgres(pool) = &app.db else {
        unreachable!()
    };
    let not_sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'DeviceStepRetryScheduled'
           AND (payload -> 'DeviceStepRetryScheduled' ->> 'not_sent')::boolean",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(not_sent, 0, "Rev creations not sent within their window");
    let report = app.sim.report();
    assert_eq!(report.rev_services, 3 * u64::from(DEVICES), "{report:?}");
    assert_eq!(report.rev_creates, 3 * u64::from(DEVICES), "{report:?}");
    assert_eq!(report.rev_duplicate_numbers, 0, "{report:?}");
    assert_eq!(
        report.rate_limited + report.over_rate_limit,
        0,
        "{report:?}"
    );
}
