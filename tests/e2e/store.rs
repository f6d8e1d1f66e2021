//! The event store, catch-up, queue and projections against real databases.

use bulkflow::domain::bulk_change::BulkChangeCommand;
use bulkflow::projections::read::bulk_summary;
use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::FaultProfile;
use bulkflow::store::catchup::{read_after, Checkpoint};
use bulkflow::store::local_queue::LocalQueue;
use bulkflow::store::{event_store, Db, EventStore};
use bulkflow::with_pool;
use chrono::{Duration, Utc};

use crate::helpers::{test_workflow, Backend, TestApp};
use crate::on_both_stores;

fn paused_payload(id: i64) -> String {
    format!(
        r#"{{"BulkChangePaused":{{"bulk":{{"bulk_change_id":{id},"tenant_id":1,"service_provider_id":2}},"reason":"test","at":"2026-01-01T00:00:00Z"}}}}"#
    )
}

const INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    VALUES ('BulkChange', $1, 1, 'BulkChangePaused', '1.0', $2::json, '{}'::json)";

/// A transaction that took a lower position but commits later must not be skipped.
#[sqlx::test(migrations = false)]
async fn catch_up_never_skips_a_transaction_that_commits_late(pool: sqlx::PgPool) {
    let db = Db::Postgres(pool.clone());
    db.migrate().await.unwrap();
    let mut slow = pool.begin().await.unwrap();
    sqlx::query(INSERT)
        .bind("1")
        .bind(paused_payload(1))
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query(INSERT)
        .bind("2")
        .bind(paused_payload(2))
        .execute(&pool)
        .await
        .unwrap();

    let seen = read_after(&db, Checkpoint::default(), 100).await.unwrap();
    assert!(
        seen.is_empty(),
        "nothing past the open transaction is handed out: {seen:?}"
    );

    slow.commit().await.unwrap();
    // Transactions of other tests (xids are cluster-wide) may hold readers back for a moment.
    let mut seen = vec![];
    for _ in 0..2_000 {
        seen = read_after(&db, Checkpoint::default(), 100).await.unwrap();
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let ids: Vec<&str> = seen.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert_eq!(ids, vec!["1", "2"]);
    let after = read_after(&db, seen[1].checkpoint, 100).await.unwrap();
    assert!(after.is_empty());
}

async fn stale_writer(backend: Backend) {
    use bulkflow::store::event_store::Writer;

    let app = TestApp::start(backend, FaultProfile::None).await;
    let id = app.submit(demo_request(201, 3)).await;
    let start = |worker: &str| BulkChangeCommand::Start {
        worker: worker.into(),
        at: Utc::now(),
    };
    // This writer decides on the state it loaded …
    let stale = EventStore::new(&app.db);
    let decided = stale
        .decide(
            id,
            start("b"),
            Writer {
                worker: "b",
                fence: None,
            },
        )
        .await
        .unwrap();
    // … while another writer appends first.
    app.engine.store.execute(id, start("a"), "a").await.unwrap();
    let err = stale.append_decided(decided).await.err().unwrap();
    assert!(
        matches!(err, event_store::Error::AggregateConflict),
        "{err:?}"
    );
    // Refused, not applied on top: caught up, it sees the winner's start, and only that one …
    let status = stale
        .inspect(id, |bc| bc.status().as_str().to_string())
        .await
        .unwrap();
    assert_eq!(status, "PROCESSING");
    let starts: Vec<String> = stale
        .events(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.payload.name() == "BulkChangeStarted")
        .map(|e| e.metadata["worker"].clone())
        .collect();
    assert_eq!(starts, ["a"]);
    // … and the lost race cost no second load of the whole stream.
    assert_eq!(stale.cold_loads(), 1);
}
on_both_stores!(a_stale_writer_is_refused_and_catches_up, stale_writer);

/// A read that waits on the database while it catches the state in memory up leaves that state
/// where it is: a runner reading it meanwhile still finds it (it used to be taken out during the
/// query, and the runner, finding nothing, loaded the whole stream again).
#[sqlx::test]
async fn a_catch_up_in_progress_leaves_the_state_in_memory(pool: sqlx::PgPool) {
    let app = TestApp::start(Backend::Postgres(pool.clone()), FaultProfile::None).await;
    let id = app.submit(demo_request(203, 3)).await;
    let store = &app.engine.store;
    // As a process that did not accept it finds it: loaded from the database.
    store.forget(id);
    store.inspect(id, |_| ()).await.unwrap();
    assert_eq!(store.cold_loads(), 1);
    // Every query on the events table waits until this transaction ends.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let reading = store.inspect(id, |bc| bc.open_devices());
    tokio::pin!(reading);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut reading)
            .await
            .is_err(),
        "the read waits on the lock"
    );
    assert_eq!(store.peek(id, |bc| bc.open_devices()), Some(3));
    assert_eq!(store.read(id, |bc| bc.open_devices()).await.unwrap(), 3);
    lock.rollback().await.unwrap();
    assert_eq!(reading.await.unwrap(), 3);
    assert_eq!(store.cold_loads(), 1);
}

/// Each bulk change's state in memory has a lock of its own: while a long read of one is under
/// way (a runner's scan of a million devices), the other bulk changes of the same worker are
/// read and written at full speed, and the same state can be read beside it. (One lock over
/// every state used to make a worker running several bulk changes take turns on it, with the
/// runtime's threads blocked while they waited.)
async fn readers_of_other_states(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let a = app.submit(demo_request(204, 3)).await;
    let b = app.submit(demo_request(205, 3)).await;
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let engine = app.engine.clone();
    // A long read of A, on a thread of its own: it holds A's state until it is released (or
    // gives up after 20 s, which fails the test).
    let long_read = std::thread::spawn(move || {
        engine.store.peek(a, |bc| {
            entered_tx.send(bc.open_devices()).unwrap();
            release_rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .is_ok()
        })
    });
    assert_eq!(
        entered
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap(),
        3
    );
    let store = &app.engine.store;
    // Meanwhile: B is read without a query, read with one, and written to; A is read too.
    assert_eq!(store.peek(b, |bc| bc.open_devices()), Some(3));
    assert_eq!(store.inspect(b, |bc| bc.open_devices()).await.unwrap(), 3);
    store
        .execute(
            b,
            BulkChangeCommand::Pause {
                reason: "test".into(),
                at: Utc::now(),
            },
            "test",
        )
        .await
        .unwrap();
    assert_eq!(
        store.peek(b, |bc| bc.status().as_str().to_string()),
        Some("PAUSED".to_string())
    );
    assert_eq!(store.peek(a, |bc| bc.open_devices()), Some(3));
    // (Gone when the long read gave up: the assertion below says so.)
    let _ = release.send(());
    assert_eq!(
        long_read.join().unwrap(),
        Some(true),
        "the long read of A was still under way when the rest was done"
    );
    assert_eq!(store.cold_loads(), 0, "and neither state was loaded again");
}
on_both_stores!(
    a_long_read_of_one_bulk_change_holds_up_no_other,
    readers_of_other_states
);

async fn replayed_projection(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(202, 12);
    let id = request.bulk_change_id;
    app.run(request).await;
    let before = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(before.processed, 12);
    let chart = throughput_points(&app.db, id).await;
    assert_eq!(chart.iter().map(|p| p.1).sum::<i64>(), 12, "{chart:?}");
    // Lose the checkpoint: every event is delivered again.
    with_pool!(&app.db, pool => {
        sqlx::query("DELETE FROM consumer_checkpoints")
            .execute(pool)
            .await
            .unwrap();
    });
    let replayed = app.engine.projector.catch_up().await.unwrap();
    assert!(replayed > 12);
    let after = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(before, after, "duplicate delivery changes nothing");
    assert_eq!(
        throughput_points(&app.db, id).await,
        chart,
        "nor the throughput"
    );
}
on_both_stores!(projections_ignore_duplicate_delivery, replayed_projection);

async fn queue(backend: Backend) {
    use bulkflow::adapters::queue::Queue;
    let app = TestApp::start(backend, FaultProfile::None).await;
    let q = LocalQueue::new(app.db.clone());
    let attrs = std::collections::BTreeMap::from([("BulkChangeId".to_string(), "7".to_string())]);
    q.send("a", &attrs, std::time::Duration::ZERO)
        .await
        .unwrap();
    let now = Utc::now();
    let m = q
        .receive_one(now, now + Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.body.as_str(), m.receive_count), ("a", 1));
    assert_eq!(m.attributes, attrs);
    assert!(
        q.receive_one(now, now + Duration::seconds(30))
            .await
            .unwrap()
            .is_none(),
        "hidden while held"
    );
    let later = now + Duration::seconds(31);
    let again = q
        .receive_one(later, later + Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.id.as_str(), again.receive_count),
        (m.id.as_str(), 2),
        "reappears after its visibility timeout"
    );
    q.dead_letter(&again, "no good").await.unwrap();
    assert!(q.is_empty().await.unwrap());
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(
        (dead[0].body.as_str(), dead[0].reason.as_str()),
        ("a", "no good")
    );
    assert_eq!(dead[0].attributes, attrs);
}
on_both_stores!(local_queue_hides_and_redelivers_like_sqs, queue);

#[tokio::test]
async fn sqlite_file_is_created_and_migrated_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("new.db").display());
    let db = Db::connect(&url, 2).await.unwrap();
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    assert!(dir.path().join("new.db").exists());
    let _ = test_workflow(dir.path());
}

#[tokio::test]
async fn an_unsupported_database_url_is_named() {
    let err = Db::connect("mysql://u:secret@h/db", 1).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("mysql://u:***@h/db") && !text.contains("secret"),
        "{text}"
    );
}

async fn cache_refresh(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let id = app.submit(demo_request(203, 2)).await;
    // Another process caches the bulk change while it is new …
    let other = EventStore::new(&app.db);
    assert_eq!(
        other.inspect(id, |b| b.status()).await.unwrap().as_str(),
        "NEW"
    );
    // … this one moves it on …
    app.engine
        .store
        .execute(
            id,
            BulkChangeCommand::Start {
                worker: "a".into(),
                at: Utc::now(),
            },
            "a",
        )
        .await
        .unwrap();
    // … and the other sees the change without a conflict: a no-op command on a stale state would
    // otherwise go unnoticed.
    assert_eq!(
        other.inspect(id, |b| b.status()).await.unwrap().as_str(),
        "PROCESSING"
    );
}
on_both_stores!(a_cached_state_catches_up_with_other_writers, cache_refresh);

async fn corrupted_row(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(204, 6);
    let id = request.bulk_change_id;
    app.run(request.clone()).await;
    app.assert_projections_match_events(id).await;
    let victim = request.devices[3].device_change_id.get();
    const SQL: &str = "UPDATE m2m_device_change SET status = 'ERROR' WHERE id = $1";
    let changed = with_pool!(&app.db, pool => {
        sqlx::query(SQL)
            .bind(victim)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected()
    });
    assert_eq!(changed, 1);
    let expected = bulkflow::projections::verify::expected(&app.engine.store, id)
        .await
        .unwrap();
    let live = bulkflow::projections::verify::live(&app.db, id)
        .await
        .unwrap();
    let diff = bulkflow::projections::verify::diff(&expected, &live);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert!(
        diff[0].starts_with(&format!("m2m_device_change id {victim}:")),
        "{diff:?}"
    );
}
on_both_stores!(verify_names_a_corrupted_row, corrupted_row);

/// The throughput chart's points: (second, devices ended) with the bucket of one second.
async fn throughput_points(db: &Db, id: bulkflow::domain::BulkChangeId) -> Vec<(i64, i64)> {
    let summary = bulk_summary(db, id).await.unwrap().unwrap();
    let points = bulkflow::projections::read::throughput(db, &summary)
        .await
        .unwrap();
    points
        .points
        .into_iter()
        .map(|(at, n)| (at.timestamp(), n))
        .collect()
}

async fn rebuild_all(backend: Backend) {
    use bulkflow::projections::rebuild::rebuild;
    let app = TestApp::start(backend, FaultProfile::Flaky).await;
    let first = demo_request(210, 40);
    app.run(first.clone()).await;
    let before = bulkflow::projections::verify::live(&app.db, first.bulk_change_id)
        .await
        .unwrap();
    let chart_before = throughput_points(&app.db, first.bulk_change_id).await;
    assert_eq!(
        chart_before.iter().map(|p| p.1).sum::<i64>(),
        40,
        "every device ended once: {chart_before:?}"
    );

    // A rebuild interrupted after its first batch resumes from its checkpoint.
    let partial = bulkflow::projections::Projector::to(
        app.db.clone(),
        bulkflow::projections::projector::Target::rebuild(None),
    );
    assert!(partial.step().await.unwrap() > 0);
    // Meanwhile work goes on: another bulk change runs while the rebuild completes.
    let second = demo_request(211, 30);
    let run = app.run(second.clone());
    let rebuilt = rebuild(&app.db, None, |_, _| {});
    let (_, stats) = tokio::join!(run, rebuilt);
    let stats = stats.unwrap();
    assert!(stats.resumed, "picked up the interrupted rebuild");
    app.engine.projector.catch_up().await.unwrap();
    let after = bulkflow::projections::verify::live(&app.db, first.bulk_change_id)
        .await
        .unwrap();
    assert_eq!(before, after, "a rebuild reproduces the live rows exactly");
    assert_eq!(
        throughput_points(&app.db, first.bulk_change_id).await,
        chart_before,
        "and the throughput a second"
    );
    app.assert_projections_match_events(first.bulk_change_id)
        .await;
    app.assert_projections_match_events(second.bulk_change_id)
        .await;

    // One projection alone, after corrupting it.
    const SQL: &str = "UPDATE m2m_device_change SET status = 'ERROR'";
    let changed = with_pool!(&app.db, pool => {
        sqlx::query(SQL).execute(pool).await.unwrap().rows_affected()
    });
    assert!(changed > 0);
    rebuild(&app.db, Some("m2m_device_change"), |_, _| {})
        .await
        .unwrap();
    app.assert_projections_match_events(first.bulk_change_id)
        .await;
    assert!(matches!(
        rebuild(&app.db, Some("nope"), |_, _| {}).await,
        Err(bulkflow::projections::rebuild::Error::UnknownProjection(_))
    ));
}
on_both_stores!(rebuild_swaps_in_identical_read_models, rebuild_all);

/// A stored version-1 history (real serialized events from before `DeviceFailed` v2) loads,
/// replays, projects and rebuilds correctly through the upcaster.
async fn v1_history(backend: Backend) {
    use bulkflow::domain::bulk_change::BulkChangeEvent;
    let app = TestApp::start(backend, FaultProfile::None).await;
    let fixture = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-history.jsonl"),
    )
    .unwrap();
    for line in fixture.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let args = (
            row["aggregate_type"].as_str().unwrap().to_string(),
            row["aggregate_id"].as_str().unwrap().to_string(),
            row["sequence"].as_i64().unwrap(),
            row["event_type"].as_str().unwrap().to_string(),
            row["event_version"].as_str().unwrap().to_string(),
            row["payload"].to_string(),
            row["metadata"].to_string(),
        );
        // PostgreSQL's columns are `json`; SQLite's are text.
        let sql = app.db.pick(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6::json, $7::json)",
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        );
        with_pool!(&app.db, pool => {
            sqlx::query(sql)
                .bind(args.0).bind(args.1).bind(args.2).bind(args.3).bind(args.4).bind(args.5).bind(args.6)
                .execute(pool).await.unwrap();
        });
    }
    let id = bulkflow::domain::BulkChangeId::new(90001).unwrap();
    let events = app.events(id).await;
    assert_eq!(events.len(), 22);
    let codes: Vec<Option<String>> = events
        .iter()
        .filter_map(|e| match e {
            BulkChangeEvent::DeviceFailed(f) => Some(f.error_code.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            Some("SIM_NOT_FOUND".to_string()),
            Some("SIM_PLAN_LOCKED".to_string())
        ]
    );
    let (status, failed, warnings) = app
        .engine
        .store
        .inspect(id, |b| {
            (b.status(), b.failed_devices(), b.billing_warnings())
        })
        .await
        .unwrap();
    assert_eq!((status.as_str(), failed, warnings), ("ERROR", 2, 1));

    app.engine.projector.catch_up().await.unwrap();
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.processed, summary.failed),
        ("ERROR", 4, 2)
    );
    app.assert_projections_match_events(id).await;
    let live = bulkflow::projections::verify::live(&app.db, id)
        .await
        .unwrap();
    bulkflow::projections::rebuild::rebuild(&app.db, None, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        bulkflow::projections::verify::live(&app.db, id)
            .await
            .unwrap(),
        live
    );

    let timeline = bulkflow::audit::Timeline::from_events(&events);
    assert_eq!(timeline.status, "ERROR");
    assert_eq!(timeline.devices.len(), 6);
}
on_both_stores!(a_stored_version_1_history_replays_and_rebuilds, v1_history);

/// Projectors of several workers race over the same events: each applies batches others have
/// partly applied already. The merged per-batch writes (one update per device, one counter
/// update per run of increments) still leave every row as if each event were applied once.
async fn racing_projectors(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::Flaky).await;
    let request = demo_request(140, 400);
    let id = app.engine.submit(request, false).await.unwrap();
    app.engine
        .run(id, &tokio_util::sync::CancellationToken::new(), None)
        .await
        .unwrap();
    // Different batch sizes, so the racers' batches overlap only in part.
    let racers: Vec<_> = [97, 250, 2_000]
        .into_iter()
        .map(|n| bulkflow::projections::Projector::new(app.db.clone()).with_batch(n))
        .collect();
    loop {
        let applied = futures::future::join_all(racers.iter().map(|p| p.step())).await;
        let applied: Vec<usize> = applied.into_iter().map(Result::unwrap).collect();
        if applied.iter().all(|&n| n == 0) {
            break;
        }
    }
    let summary = bulk_summary(&app.db, id).await.unwrap().unwrap();
    assert_eq!(summary.processed + summary.failed, 400, "{summary:?}");
    let chart = throughput_points(&app.db, id).await;
    assert_eq!(
        chart.iter().map(|p| p.1).sum::<i64>(),
        400,
        "each device ended once in the throughput too: {chart:?}"
    );
    app.assert_projections_match_events(id).await;
}
on_both_stores!(racing_projectors_count_every_event_once, racing_projectors);

/// The pool hands out hot connections without a ping; one that sat idle is checked first. So
/// after every connection was killed (as by a server restart), the next run still goes through.
#[sqlx::test(migrations = false)]
async fn killed_connections_are_replaced_before_use(pool: sqlx::PgPool) {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable");
    let db = Db::connect(&url, 4).await.unwrap();
    let app = TestApp::start(Backend::Postgres(pool.clone()), FaultProfile::None).await;
    let engine = std::sync::Arc::new(
        bulkflow::app::Engine::with_db(app.config.clone(), db.clone()).unwrap(),
    );
    let run = |id: i64| {
        let engine = engine.clone();
        async move {
            let id = engine.submit(demo_request(id, 20), false).await.unwrap();
            engine
                .run(id, &tokio_util::sync::CancellationToken::new(), None)
                .await
                .unwrap()
        }
    };
    assert!(matches!(
        run(150).await,
        bulkflow::workflow::RunOutcome::Completed(_)
    ));
    let Db::Postgres(ours) = &db else {
        unreachable!()
    };
    let before = ours.size();
    assert!(before > 0);
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        killed >= i64::from(before),
        "{killed} killed, pool had {before}"
    );
    // Idle connections are pinged (and dead ones replaced) once idle past the threshold.
    tokio::time::sleep(bulkflow::store::PING_AFTER_IDLE + std::time::Duration::from_millis(200))
        .await;
    assert!(matches!(
        run(151).await,
        bulkflow::workflow::RunOutcome::Completed(_)
    ));
}

/// A catch-up batch stops once its events hold the byte budget (a `DevicesAdded` carries 1,000
/// devices: 2,000 of them in one batch would be half a gigabyte), always reading at least one,
/// and reading them one by one still hands every event over once, in order.
async fn byte_bounded_batches(backend: Backend) {
    use bulkflow::store::catchup::read_within;
    let app = TestApp::start(backend, FaultProfile::None).await;
    app.submit(demo_request(202, 3_500)).await;
    let db = &app.engine.db;
    // Transactions of other tests (xids are cluster-wide) may hold readers back for a moment.
    let mut all = vec![];
    for _ in 0..2_000 {
        all = read_within(db, Checkpoint::default(), 100, i64::MAX)
            .await
            .unwrap();
        if all.len() == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(all.len(), 5, "accepted and four DevicesAdded");
    let one = read_within(db, Checkpoint::default(), 100, 1)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    let mut at = Checkpoint::default();
    let mut seen = vec![];
    loop {
        let batch = read_within(db, at, 100, 1).await.unwrap();
        let Some(last) = batch.last() else { break };
        assert_eq!(batch.len(), 1);
        at = last.checkpoint;
        seen.extend(batch.into_iter().map(|e| e.sequence));
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    // The default budget holds these five (a few hundred KB).
    assert_eq!(
        read_after(db, Checkpoint::default(), 100)
            .await
            .unwrap()
            .len(),
        5
    );
}

on_both_stores!(catch_up_batches_are_bounded_in_bytes, byte_bounded_batches);

/// Pages of a bulk change's devices, in any status (one index walk per status, merged) or in
/// one, hand every device over once, in id order.
async fn device_pages(backend: Backend) {
    use bulkflow::projections::read::devices;
    let app = TestApp::start(backend, FaultProfile::Flaky).await;
    let request = demo_request(212, 60);
    let id = request.bulk_change_id;
    let mut expected: Vec<i64> = request
        .devices
        .iter()
        .map(|d| d.device_change_id.get())
        .collect();
    expected.sort_unstable();
    let walk = |status: Option<&'static str>| {
        let db = app.db.clone();
        async move {
            let (mut seen, mut after) = (vec![], None);
            loop {
                let page = devices(&db, id, status, after, 7).await.unwrap();
                let Some(last) = page.last() else { break };
                after = Some(last.device_change_id);
                seen.extend(page.iter().map(|d| (d.device_change_id, d.status.clone())));
            }
            seen
        }
    };
    // Before the run every device is open (the walks of open statuses run) …
    app.engine.submit(request.clone(), false).await.unwrap();
    app.engine.projector.catch_up().await.unwrap();
    let open = walk(None).await;
    assert_eq!(open.iter().map(|d| d.0).collect::<Vec<_>>(), expected);
    assert!(open.iter().all(|d| d.1 == "NEW"), "{open:?}");
    // … and after it none is (they are left out).
    app.run(request.clone()).await;
    let all = walk(None).await;
    assert_eq!(all.iter().map(|d| d.0).collect::<Vec<_>>(), expected);
    let statuses: std::collections::BTreeSet<&str> = all.iter().map(|d| d.1.as_str()).collect();
    for status in statuses {
        let status: &'static str = Box::leak(status.to_string().into_boxed_str());
        let some = walk(Some(status)).await;
        let want: Vec<i64> = all.iter().filter(|d| d.1 == status).map(|d| d.0).collect();
        assert_eq!(
            some.iter().map(|d| d.0).collect::<Vec<_>>(),
            want,
            "{status}"
        );
    }
}

on_both_stores!(device_pages_walk_every_device_once, device_pages);

/// The projector's read of what follows its checkpoint is the same whether an event's payload
/// comes from this process's memory (`Recent`, what the runner appended) or from the table,
/// for any mix of the two: the table decides which events and in what order.
async fn recent_events(backend: Backend) {
    use bulkflow::store::catchup::read_after_with;
    use bulkflow::store::recent::Recent;
    let app = TestApp::start(backend, FaultProfile::None).await;
    let request = demo_request(9_601, 12);
    let id = request.bulk_change_id;
    app.run(request).await;
    let store = EventStore::new(&app.db);
    let envelopes = store.events(id).await.unwrap();
    assert!(envelopes.len() > 20, "{} events", envelopes.len());
    let from_table = read_after(&app.db, Checkpoint::default(), 10_000)
        .await
        .unwrap();
    // Every other event kept in memory, the rest read from the table.
    let recent = Recent::new();
    let kept: Vec<_> = envelopes.iter().step_by(2).cloned().collect();
    for e in &kept {
        recent.put(std::slice::from_ref(e));
    }
    let mixed = read_after_with(&app.db, Checkpoint::default(), 10_000, Some(&recent))
        .await
        .unwrap();
    assert!(recent.is_empty(), "{} kept events not taken", recent.len());
    let key = |e: &bulkflow::store::catchup::StoredEvent| {
        (
            e.checkpoint,
            e.aggregate_id.clone(),
            e.sequence,
            e.event.clone(),
            e.metadata.clone(),
        )
    };
    assert_eq!(
        mixed.iter().map(key).collect::<Vec<_>>(),
        from_table.iter().map(key).collect::<Vec<_>>()
    );
    // From a checkpoint halfway, with all of them kept: the same again.
    let half = from_table[from_table.len() / 2].checkpoint;
    recent.put(&envelopes);
    let rest = read_after_with(&app.db, half, 10_000, Some(&recent))
        .await
        .unwrap();
    let expected: Vec<_> = from_table
        .iter()
        .filter(|e| e.checkpoint > half)
        .map(key)
        .collect();
    assert_eq!(rest.iter().map(key).collect::<Vec<_>>(), expected);
}
on_both_stores!(events_kept_in_memory_read_as_from_the_table, recent_events);
