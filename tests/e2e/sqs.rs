//! The worker on a real SQS-protocol server (moto, started by scripts/test.sh on loopback):
//! legacy and JSON messages, duplicates, dead letters, SIGTERM, SIGKILL and several workers.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkflow::adapters::queue::{legacy_message, Queue};
use bulkflow::adapters::sqs::SqsQueue;
use bulkflow::app::WorkOptions;
use bulkflow::domain::BulkChangeRequest;
use bulkflow::projections::read::bulk_summary;
use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};
use bulkflow::store::Db;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp};

fn endpoint() -> String {
    std::env::var("BULKFLOW_TEST_SQS_ENDPOINT")
        .expect("BULKFLOW_TEST_SQS_ENDPOINT is not set: run the tests with ./scripts/test.sh, which starts moto")
}

async fn client() -> aws_sdk_sqs::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_sqs::Client::new(&config)
}

/// A fresh queue with a dead-letter queue (redrive after 5 receives).
async fn queues() -> (Arc<SqsQueue>, Arc<SqsQueue>) {
    let client = client().await;
    let name = format!("bulkflow-{}", uuid::Uuid::new_v4().simple());
    let dlq_name = format!("{name}-dlq");
    let (url, dlq) = SqsQueue::create(
        &client,
        &name,
        Duration::from_secs(30),
        Some((&dlq_name, 5)),
    )
    .await
    .unwrap();
    let dlq = dlq.unwrap();
    let queue = SqsQueue::open(client.clone(), &url, None).await.unwrap();
    assert_eq!(
        queue.dead_letter_url(),
        Some(dlq.as_str()),
        "found through the redrive policy"
    );
    let dead = SqsQueue::open(client, &dlq, None).await.unwrap();
    (Arc::new(queue), Arc::new(dead))
}

fn options() -> WorkOptions {
    WorkOptions {
        exit_when_idle: true,
        concurrency: 4,
        visibility: Duration::from_secs(10),
        wait: Duration::from_secs(1),
        ..WorkOptions::default()
    }
}

async fn work(app: &TestApp, queue: &Arc<SqsQueue>) {
    tokio::time::timeout(
        Duration::from_secs(90),
        app.engine
            .work(queue, &CancellationToken::new(), options(), None),
    )
    .await
    .expect("the worker went idle")
    .unwrap();
    app.engine.projector.catch_up().await.unwrap();
}

async fn send_json(queue: &SqsQueue, request: &BulkChangeRequest) {
    let body = serde_json::to_string(request).unwrap();
    queue
        .send(&body, &BTreeMap::new(), Duration::ZERO)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_message_runs_a_submitted_bulk_change() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let (queue, dead) = queues().await;
    let request = demo_request(401, 20);
    app.engine.submit(request.clone(), false).await.unwrap();
    let mut attributes = legacy_message(401).1;
    attributes.insert("ServiceProviderId".into(), "12".into());
    attributes.insert("M2MDeviceChangeId".into(), "0".into());
    queue
        .send("Not used", &attributes, Duration::ZERO)
        .await
        .unwrap();
    work(&app, &queue).await;
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.processed),
        ("PROCESSED", 20)
    );
    assert!(queue.is_empty().await.unwrap(), "message deleted");
    assert!(dead.is_empty().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_message_creates_and_runs_the_bulk_change() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let (queue, _dead) = queues().await;
    let request = demo_request(402, 15);
    send_json(&queue, &request).await;
    work(&app, &queue).await;
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.processed),
        ("PROCESSED", 15)
    );
    assert!(queue.is_empty().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_three_times_processes_every_device_once() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let (queue, _dead) = queues().await;
    let request = demo_request(403, 30);
    for _ in 0..3 {
        send_json(&queue, &request).await;
    }
    work(&app, &queue).await;
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.processed, 30);
    app.assert_no_device_processed_twice(request.bulk_change_id)
        .await;
    let report = app.sim.report();
    assert_eq!(report.pond_status_reads, 30, "each SIM read once");
    assert_eq!(report.rev_duplicate_numbers, 0);
    for d in &request.devices {
        assert!(app.sim.writes_for(d.iccid.as_str()) <= 1);
    }
    assert!(queue.is_empty().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_go_to_the_dead_letter_queue_with_their_reason() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let (queue, dead) = queues().await;
    let valid = serde_json::to_value(demo_request(404, 3)).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = valid.clone();
        f(&mut v);
        v.to_string()
    };
    let none = BTreeMap::new();
    let id = |v: &str| BTreeMap::from([("BulkChangeId".to_string(), v.to_string())]);
    let eleven: BTreeMap<String, String> = (0..11)
        .map(|i| (format!("Extra{i}"), "1".to_string()))
        .collect();
    let cases: Vec<(String, BTreeMap<String, String>, &str)> = vec![
        (
            "{{{ not json".into(),
            none.clone(),
            "invalid bulk change request",
        ),
        ("hello".into(), none.clone(), "neither"),
        ("Not used".into(), none.clone(), "BulkChangeId is missing"),
        ("Not used".into(), id("0"), "BulkChangeId is 0"),
        ("Not used".into(), id("999999"), "not known to bulkflow"),
        ("Not used".into(), eleven, "at most 10"),
        (
            with(&|v| v["devices"] = serde_json::json!([])),
            none.clone(),
            "no devices",
        ),
        (
            with(&|v| {
                v["devices"][1]["device_change_id"] = v["devices"][0]["device_change_id"].clone()
            }),
            none.clone(),
            "appears more than once",
        ),
        (
            with(&|v| v["devices"][0]["iccid"] = "12AB".into()),
            none.clone(),
            "ICCID",
        ),
        (
            with(&|v| v["devices"][0]["target_status"] = "Sleeping".into()),
            none.clone(),
            "Sleeping",
        ),
        (
            with(&|v| v["requested_by"] = "x".repeat(10_000).into()),
            none.clone(),
            "longer than 200",
        ),
    ];
    for (body, attributes, _) in &cases {
        queue.send(body, attributes, Duration::ZERO).await.unwrap();
    }
    let good = demo_request(405, 5);
    send_json(&queue, &good).await;
    work(&app, &queue).await;

    let summary = bulk_summary(&app.db, good.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.processed, 5, "the good message alongside completed");
    assert!(queue.is_empty().await.unwrap());
    let mut letters = Vec::new();
    while letters.len() < cases.len() {
        let got = dead
            .receive(10, Duration::from_secs(1), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            !got.is_empty(),
            "only {} of {} dead letters arrived",
            letters.len(),
            cases.len()
        );
        letters.extend(got);
    }
    for (body, attributes, expected) in &cases {
        let same = |m: &&bulkflow::adapters::queue::QueueMessage| {
            let original: BTreeMap<String, String> = m
                .attributes
                .get("OriginalAttributes")
                .map(|a| serde_json::from_str(a).unwrap())
                .unwrap_or_default();
            &m.body == body && &original == attributes
        };
        let letter = letters.iter().find(same).unwrap_or_else(|| {
            panic!(
                "no dead letter for {:?}",
                body.chars().take(60).collect::<String>()
            )
        });
        let reason = letter
            .attributes
            .get("DeadLetterReason")
            .expect("reason attached");
        assert!(
            reason.contains(expected),
            "{reason:?} should mention {expected:?}"
        );
    }
}

// ---- worker processes ----

use crate::helpers::{pg_url as database_url, Worker};

fn spawn_worker(
    db_url: &str,
    sim: &Simulator,
    sim_url: &str,
    queue: &str,
    extra: &[&str],
) -> Worker {
    spawn_worker_with(db_url, sim, sim_url, queue, extra, &[])
}

/// As [`spawn_worker`], with more environment.
fn spawn_worker_with(
    db_url: &str,
    sim: &Simulator,
    sim_url: &str,
    queue: &str,
    extra: &[&str],
    env: &[(&str, String)],
) -> Worker {
    let child = crate::helpers::bulkflow_command(sim_url, sim.auth())
        .args([
            "worker",
            "--queue-url",
            queue,
            "--visibility-timeout",
            "4",
            "--wait-time-seconds",
            "1",
        ])
        .args(extra)
        .env("BULKFLOW_DATABASE_URL", db_url)
        .env("BULKFLOW_LEASE_TTL_SECS", "3")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("AWS_ENDPOINT_URL_SQS", endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Worker(child)
}

/// Devices of `id` that reached a final status, read from the events table.
async fn finished(db: &Db, id: i64) -> i64 {
    const SQL: &str = "SELECT COUNT(*) FROM events WHERE aggregate_id = $1
        AND event_type IN ('DeviceProcessed', 'DeviceFailed')";
    let Db::Postgres(pool) = db else {
        unreachable!()
    };
    sqlx::query_scalar(SQL)
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_for_exit(worker: &mut Worker, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "worker did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A simulator slow enough that a bulk change takes a few seconds.
async fn slow_sim() -> (Simulator, String, tokio::task::JoinHandle<()>) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_latency(Duration::from_millis(15));
    let (addr, handle) = sim.start("127.0.0.1:0").await.unwrap();
    (sim, format!("http://{addr}"), handle)
}

async fn kill_mid_run(signal: &str, pool: sqlx::PgPool) {
    let app = TestApp::start(Backend::Postgres(pool), FaultProfile::None).await;
    let db_url = database_url(&app.db).await;
    let (sim, sim_url, _server) = slow_sim().await;
    let (queue, _dead) = queues().await;
    let request = demo_request(410, 300);
    send_json(&queue, &request).await;

    let mut first = spawn_worker(&db_url, &sim, &sim_url, queue.url(), &[]);
    let started = Instant::now();
    while finished(&app.db, 410).await < 40 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        assert!(first.0.try_wait().unwrap().is_none(), "worker ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args([signal, &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for_exit(&mut first, Duration::from_secs(30)).await;
    if signal == "-TERM" {
        assert!(exit.success(), "a SIGTERM'd worker exits cleanly: {exit:?}");
    }
    let done_before = finished(&app.db, 410).await;
    assert!(done_before < 300, "killed mid-run ({done_before} finished)");
    assert!(!queue.is_empty().await.unwrap(), "the message was not lost");

    let mut second = spawn_worker(&db_url, &sim, &sim_url, queue.url(), &["--exit-when-idle"]);
    let exit = wait_for_exit(&mut second, Duration::from_secs(120)).await;
    assert!(exit.success());
    assert_eq!(finished(&app.db, 410).await, 300);
    app.engine.projector.catch_up().await.unwrap();
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.processed),
        ("PROCESSED", 300)
    );
    app.assert_no_device_processed_twice(request.bulk_change_id)
        .await;
    let report = sim.report();
    assert_eq!(report.rev_duplicate_numbers, 0, "{report:?}");
    for d in &request.devices {
        assert!(
            sim.writes_for(d.iccid.as_str()) <= 2,
            "at most the in-flight write redone"
        );
    }
    assert!(queue.is_empty().await.unwrap());
}

#[sqlx::test(migrations = false)]
async fn a_worker_stopped_with_sigterm_loses_nothing_and_another_completes(pool: sqlx::PgPool) {
    kill_mid_run("-TERM", pool).await;
}

#[sqlx::test(migrations = false)]
async fn a_worker_killed_with_sigkill_is_taken_over_without_duplicates(pool: sqlx::PgPool) {
    kill_mid_run("-KILL", pool).await;
}

#[sqlx::test(migrations = false)]
async fn three_workers_complete_ten_bulk_changes_without_processing_a_device_twice(
    pool: sqlx::PgPool,
) {
    let app = TestApp::start(Backend::Postgres(pool), FaultProfile::None).await;
    let db_url = database_url(&app.db).await;
    let (sim, sim_url, _server) = slow_sim().await;
    let (queue, _dead) = queues().await;
    let requests: Vec<_> = (420..430).map(|id| demo_request(id, 30)).collect();
    for r in &requests {
        send_json(&queue, r).await;
        // At-least-once: some bulk changes are announced twice.
        if r.bulk_change_id.get() % 3 == 0 {
            send_json(&queue, r).await;
        }
    }
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| {
            spawn_worker(
                &db_url,
                &sim,
                &sim_url,
                queue.url(),
                &["--exit-when-idle", "--concurrency", "2"],
            )
        })
        .collect();
    for w in &mut workers {
        let exit = wait_for_exit(w, Duration::from_secs(180)).await;
        assert!(exit.success());
    }
    app.engine.projector.catch_up().await.unwrap();
    for r in &requests {
        let summary = bulk_summary(&app.db, r.bulk_change_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (summary.status.as_str(), summary.processed),
            ("PROCESSED", 30),
            "{}",
            r.bulk_change_id
        );
        app.assert_no_device_processed_twice(r.bulk_change_id).await;
        for d in &r.devices {
            assert!(
                sim.writes_for(d.iccid.as_str()) <= 1,
                "device written twice"
            );
        }
    }
    assert_eq!(sim.report().rev_duplicate_numbers, 0);
    assert_eq!(sim.report().pond_status_reads, 300, "every SIM read once");
    assert!(queue.is_empty().await.unwrap());
}

/// A message for a bulk change another worker drives, received again and again while that
/// worker runs: it must never reach the dead-letter queue without a reason. On PostgreSQL (the
/// driver proven alive by its lock) it is deleted at once; on SQLite it is replaced by a fresh,
/// delayed copy each time (its receive count starts again) until the bulk change is done.
async fn message_for_a_driven_bulk_change(backend: Backend) {
    let on_postgres = matches!(backend, Backend::Postgres(_));
    // Leases and visibility of 1 s: a message hidden again per receive would be dead-lettered
    // (after 5 receives) within seconds, long before the run below ends.
    let app = TestApp::start_with(backend, FaultProfile::None, |c| {
        c.lease_ttl_secs = 1;
        if let Some(pond) = &mut c.limits.pond {
            pond.rate_per_second = 60.0;
            pond.burst = 5;
        }
    })
    .await;
    let (queue, dead) = queues().await;
    let request = demo_request(420, 300);
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    let driver = {
        let engine = app.engine.clone();
        tokio::spawn(async move { engine.run(id, &CancellationToken::new(), None).await })
    };
    // The driver holds it (and has started it) before the message arrives.
    let started = Instant::now();
    while app.sim.report().pond_calls < 10 {
        assert!(started.elapsed() < Duration::from_secs(30), "not started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (body, attributes) = legacy_message(420);
    queue
        .send(&body, &attributes, Duration::ZERO)
        .await
        .unwrap();
    let other = app.another_engine();
    let options = WorkOptions {
        visibility: Duration::from_secs(1),
        ..options()
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        other.work(&queue, &CancellationToken::new(), options, None),
    )
    .await
    .expect("the other worker went idle")
    .unwrap();
    if on_postgres {
        assert!(
            !driver.is_finished(),
            "the message was deleted while the driver ran"
        );
    }
    let outcome = driver.await.unwrap().unwrap();
    assert_eq!(
        outcome,
        bulkflow::workflow::RunOutcome::Completed(bulkflow::domain::BulkChangeStatus::Processed)
    );
    assert!(queue.is_empty().await.unwrap(), "no message left");
    assert!(
        dead.is_empty().await.unwrap(),
        "nothing dead-lettered without a reason"
    );
}
crate::on_both_stores!(
    a_message_for_a_bulk_change_driven_elsewhere_is_never_dead_lettered,
    message_for_a_driven_bulk_change
);

/// Counts the messages a worker sends (the hand-overs).
struct Counting<Q> {
    inner: Arc<Q>,
    sends: std::sync::atomic::AtomicUsize,
}

impl<Q: Queue> Queue for Counting<Q> {
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<bulkflow::adapters::queue::QueueMessage>, bulkflow::adapters::queue::Error>
    {
        self.inner.receive(max, wait, visibility).await
    }

    async fn extend(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), bulkflow::adapters::queue::Error> {
        self.inner.extend(receipt, visibility).await
    }

    async fn delete(&self, receipt: &str) -> Result<(), bulkflow::adapters::queue::Error> {
        self.inner.delete(receipt).await
    }

    async fn dead_letter(
        &self,
        message: &bulkflow::adapters::queue::QueueMessage,
        reason: &str,
    ) -> Result<(), bulkflow::adapters::queue::Error> {
        self.inner.dead_letter(message, reason).await
    }

    async fn send(
        &self,
        body: &str,
        attributes: &BTreeMap<String, String>,
        delay: Duration,
    ) -> Result<(), bulkflow::adapters::queue::Error> {
        self.sends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.send(body, attributes, delay).await
    }

    async fn is_empty(&self) -> Result<bool, bulkflow::adapters::queue::Error> {
        self.inner.is_empty().await
    }
}

/// A run longer than the visibility limit (12 hours on SQS; 4 s here) hands its message over
/// before it: a fresh copy is sent and the old one deleted; the run finishes and exactly its
/// outcome deletes the last copy, with nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_the_visibility_limit_hands_its_message_over() {
    let app = TestApp::start_with(Backend::Sqlite, FaultProfile::None, |c| {
        if let Some(pond) = &mut c.limits.pond {
            pond.rate_per_second = 60.0;
            pond.burst = 5;
        }
    })
    .await;
    let (queue, dead) = queues().await;
    let request = demo_request(430, 300);
    app.engine.submit(request.clone(), false).await.unwrap();
    let (body, attributes) = legacy_message(430);
    queue
        .send(&body, &attributes, Duration::ZERO)
        .await
        .unwrap();
    let counting = Arc::new(Counting {
        inner: queue.clone(),
        sends: Default::default(),
    });
    let options = WorkOptions {
        visibility: Duration::from_secs(1),
        hand_over_after: Duration::from_secs(4),
        ..options()
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        app.engine
            .work(&counting, &CancellationToken::new(), options, None),
    )
    .await
    .expect("the worker went idle")
    .unwrap();
    app.engine.projector.catch_up().await.unwrap();
    let summary = bulk_summary(&app.db, request.bulk_change_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.processed),
        ("PROCESSED", 300)
    );
    assert!(
        counting.sends.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the message was handed over"
    );
    assert!(queue.is_empty().await.unwrap(), "no message left");
    assert!(dead.is_empty().await.unwrap(), "nothing dead-lettered");
}

/// The portal's way in, end to end over SQS: the test plays the portal (500 rows in its tables,
/// Rev services among them, a few rows it marked invalid itself, then exactly its message). A
/// worker process reads the bulk change from the platform's tables and is killed mid-run; a
/// restarted one finishes it and writes the outcomes back: each device's final status, one log
/// row per recorded call, the bulk change PROCESSED. The message delivered again changes nothing.
#[sqlx::test(migrations = false)]
async fn the_portals_bulk_change_runs_from_its_tables_over_sqs_and_is_written_back(
    pool: sqlx::PgPool,
) {
    use crate::platform::{
        create_portal_tables, insert_portal_bulk_change, portal_message, portal_rows, Receiver,
    };
    let app = TestApp::start(Backend::Postgres(pool.clone()), FaultProfile::None).await;
    let section = create_portal_tables(&pool).await;
    let db_url = database_url(&app.db).await;
    let (sim, sim_url, _server) = slow_sim().await;
    let (queue, dead) = queues().await;
    let bulk = 7201;
    let rows = portal_rows(bulk, 500, 50);
    insert_portal_bulk_change(&pool, bulk, &rows).await;
    let (body, attributes) = portal_message(bulk);
    queue
        .send(&body, &attributes, Duration::ZERO)
        .await
        .unwrap();
    // The platform's status webhook; its first answer is a 500.
    let receiver = Receiver::start(1).await;
    let platform = [
        ("BULKFLOW_PLATFORM_WEBHOOK_URL", receiver.url.clone()),
        ("BULKFLOW_PLATFORM_WEBHOOK_SECRET", receiver.secret.clone()),
        ("BULKFLOW_PLATFORM_DATABASE_URL", db_url.clone()),
        ("BULKFLOW_PLATFORM_SCHEMA", section.schema.clone()),
        ("BULKFLOW_PLATFORM_PROCESSED_BY", "bulkflow-e2e".to_string()),
    ];
    let spawn =
        |extra: &[&str]| spawn_worker_with(&db_url, &sim, &sim_url, queue.url(), extra, &platform);

    let mut first = spawn(&[]);
    let started = Instant::now();
    while finished(&app.db, bulk).await < 60 {
        assert!(started.elapsed() < Duration::from_secs(90), "no progress");
        assert!(first.0.try_wait().unwrap().is_none(), "worker ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args(["-KILL", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_exit(&mut first, Duration::from_secs(30)).await;
    assert!(finished(&app.db, bulk).await < 490, "killed mid-run");

    let mut second = spawn(&["--exit-when-idle"]);
    assert!(wait_for_exit(&mut second, Duration::from_secs(180))
        .await
        .success());
    assert_eq!(finished(&app.db, bulk).await, 490, "every valid row, once");
    app.assert_no_device_processed_twice(bulkflow::domain::BulkChangeId::new(bulk).unwrap())
        .await;
    assert_eq!(sim.report().rev_duplicate_numbers, 0);

    let schema = &section.schema;
    let calls: usize = app
        .events(bulkflow::domain::BulkChangeId::new(bulk).unwrap())
        .await
        .iter()
        .map(|e| e.calls().len())
        .sum();
    let count = |what: &'static str| {
        let sql = format!("SELECT COUNT(*) FROM {schema}.{what}");
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(bulk)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let logs = count(r#""DeviceBulkChangeLog" WHERE "BulkChangeId" = $1"#);
    assert_eq!(logs.await, calls as i64, "one log row per recorded call");
    let ended = count(
        r#""M2M_DeviceChange" WHERE "BulkChangeId" = $1 AND "IsProcessed" AND "ProcessedBy" = 'bulkflow-e2e'
           AND "Status" IN ('PROCESSED', 'API_FAILED')"#,
    );
    assert_eq!(ended.await, 490);
    let invalid = count(
        r#""M2M_DeviceChange" WHERE "BulkChangeId" = $1 AND "Status" = 'ERROR' AND "StatusDetails" = 'Invalid ICCID'"#,
    );
    assert_eq!(invalid.await, 10, "the portal's invalid rows untouched");
    let done = count(
        r#""DeviceBulkChange" WHERE "Id" = $1 AND "Status" = 'PROCESSED' AND "ProcessedDate" IS NOT NULL"#,
    );
    assert_eq!(done.await, 1);
    // The webhook got every finished device, signed, in notifications of at most 100. A batch
    // the killed worker delivered but had not checkpointed may come again (at least once).
    let (seen, largest) = receiver.received(bulk);
    assert_eq!(seen.len(), 490, "every finished device notified");
    // Told apart by (device, event sequence), each device's end arrived once: a repeat is the
    // same change again.
    assert!(receiver.distinct(bulk).values().all(|s| s.len() == 1));
    let repeated: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        repeated <= 100,
        "{repeated} repeats: at most the batch in flight at the kill"
    );
    assert!(largest <= 100);
    assert_eq!(receiver.counts().1, 0, "every signature checked out");

    // The portal's message delivered again, to a third worker: nothing changes.
    queue
        .send(&body, &attributes, Duration::ZERO)
        .await
        .unwrap();
    let mut third = spawn(&["--exit-when-idle"]);
    assert!(wait_for_exit(&mut third, Duration::from_secs(60))
        .await
        .success());
    assert_eq!(finished(&app.db, bulk).await, 490);
    let logs = count(r#""DeviceBulkChangeLog" WHERE "BulkChangeId" = $1"#);
    assert_eq!(logs.await, calls as i64);
    assert!(queue.is_empty().await.unwrap());
    assert!(dead.is_empty().await.unwrap(), "nothing dead-lettered");
    let (again, _) = receiver.received(bulk);
    assert_eq!(again, seen, "no device notified again");
}

/// A FIFO queue (the platform's may be one) is refused when a command opens it, naming why,
/// instead of failing later: FIFO queues refuse the per-message delays of bulkflow's retry and
/// hand-over messages, and a send without a message group. Neither `worker` nor `submit`
/// sends or receives anything on it.
#[tokio::test]
async fn a_fifo_queue_is_refused_at_start_naming_why() {
    let client = client().await;
    let name = format!("bulkflow-{}.fifo", uuid::Uuid::new_v4().simple());
    let url = client
        .create_queue()
        .queue_name(&name)
        .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let refused = SqsQueue::open(client.clone(), &url, None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("is a FIFO queue"), "{refused}");

    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        serde_json::to_string(&demo_request(991, 3)).unwrap(),
    )
    .unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("fifo.db").display());
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 1);
    let run = |args: &[&str]| {
        let out = crate::helpers::bulkflow_command("http://127.0.0.1:9", sim.auth())
            .args(args)
            .env("BULKFLOW_DATABASE_URL", &db_url)
            .env("AWS_ENDPOINT_URL_SQS", endpoint())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let request = request.display().to_string();
    for args in [
        vec!["worker", "--queue-url", &url, "--exit-when-idle"],
        vec!["submit", "--queue-url", &url, &request],
    ] {
        let (status, stderr) = run(&args);
        assert!(!status.success(), "{args:?} accepted a FIFO queue");
        assert!(
            stderr.contains("is a FIFO queue") && stderr.contains("standard queue"),
            "{args:?}: {stderr}"
        );
    }
    let attrs = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let count = |key| {
        attrs
            .attributes()
            .and_then(|a| a.get(&key))
            .cloned()
            .unwrap_or_default()
    };
    use aws_sdk_sqs::types::QueueAttributeName as A;
    assert_eq!(
        count(A::ApproximateNumberOfMessages),
        "0",
        "nothing was sent"
    );
    assert_eq!(count(A::ApproximateNumberOfMessagesNotVisible), "0");
}
