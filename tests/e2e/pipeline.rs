//! The runner's pipeline: one commit in flight while calls go on.

use bulkflow::domain::BulkChangeStatus;
use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::FaultProfile;
use bulkflow::workflow::RunOutcome;

use crate::helpers::{Backend, TestApp};

/// A database whose every append takes 300 ms (a slow disk, or a database behind a far-away
/// proxy). A runner that waited for each commit before dispatching again could put into one
/// commit at most the outcomes of the calls in flight when it began (POND's and Rev's
/// concurrency: 4 each here). With one commit in flight while calls go on, every call that
/// ends while a commit is written goes into the next one: the commits carry many times more.
#[sqlx::test(migrations = false)]
async fn calls_go_on_while_a_commit_is_in_flight(pool: sqlx::PgPool) {
    const CONCURRENCY: usize = 4;
    let app = TestApp::start_with(
        Backend::Postgres(pool.clone()),
        FaultProfile::None,
        |config| {
            for limits in [&mut config.limits.pond, &mut config.limits.rev] {
                limits.as_mut().unwrap().max_concurrency = CONCURRENCY;
            }
        },
    )
    .await;
    // Test set-up only: the slow database is a trigger on the events table.
    sqlx::query(
        "CREATE FUNCTION slow_append() RETURNS trigger LANGUAGE plpgsql
         AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER slow_append AFTER INSERT ON events
         FOR EACH STATEMENT EXECUTE FUNCTION slow_append()",
    )
    .execute(&pool)
    .await
    .unwrap();
    let request = demo_request(700, 120);
    let id = request.bulk_change_id;
    let outcome = app.run(request).await;
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Processed));
    app.assert_no_device_processed_twice(id).await;
    app.assert_projections_match_events(id).await;
    // Each append is one statement in its own transaction: its rows share an xmin.
    let (commits, outcomes): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT xmin::text), count(*) FROM events
          WHERE event_type IN ('DeviceStatusUpdated', 'ServiceStatusUpdated',
                'RevServiceCreated', 'RevServiceFailed', 'DeviceStepRetryScheduled', 'DeviceFailed')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let serial_bound = 2 * CONCURRENCY;
    eprintln!("{outcomes} step outcomes in {commits} commits");
    assert!(
        outcomes > 2 * serial_bound as i64 * commits,
        "{outcomes} step outcomes in {commits} commits: a serial runner would put at most \
         {serial_bound} in one; the pipeline should carry more than twice that on average"
    );
}
