//! One carrier limit for the whole fleet: worker processes on one PostgreSQL share each
//! account's rate and concurrency, learn a lower rate from 429s, and share it fairly between
//! bulk changes.

use std::process::Stdio;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkflow::domain::{BulkChangeId, BulkChangeRequest, Downstream, TargetStatus};
use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::{AccountReport, FaultProfile, SimAuth, Simulator};
use bulkflow::store::Db;
use bulkflow::workflow::definition::Limits as Configured;
use bulkflow::workflow::limits::Limits;
use bulkflow::workflow::PerDownstream;

use crate::helpers::{Backend, TestApp};

/// `n` devices to activate, POND only: with every SIM suspended, two POND calls each.
pub fn pond_only(id: i64, n: u32) -> BulkChangeRequest {
    let mut request = demo_request(id, n);
    for d in &mut request.devices {
        d.target_status = TargetStatus::Active;
        d.rev_service = None;
    }
    request
}

/// A workflow file like the tests' with POND at `rate` calls a second and `concurrency`.
pub fn workflow_with_pond(
    dir: &std::path::Path,
    rate: f64,
    concurrency: usize,
) -> std::path::PathBuf {
    let path = crate::helpers::test_workflow(dir);
    let mut definition: bulkflow::workflow::definition::Definition =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    definition.downstreams.pond.rate_per_second = rate;
    definition.downstreams.pond.burst = (rate / 10.0).max(1.0) as u32;
    definition.downstreams.pond.max_concurrency = concurrency;
    std::fs::write(&path, toml::to_string(&definition).unwrap()).unwrap();
    path
}

use crate::helpers::{pg_url as database_url, Worker};

/// A worker process taking one bulk change at a time off the database's queue.
pub fn worker(app: &TestApp, db_url: &str, workflow: &std::path::Path, n: usize) -> Worker {
    let child = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
        .args(["worker", "--exit-when-idle", "--concurrency", "1"])
        .env("BULKFLOW_DATABASE_URL", db_url)
        .env("BULKFLOW_WORKFLOW", workflow)
        .env("BULKFLOW_WORKER_ID", format!("worker-{n}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Worker(child)
}

pub async fn wait_for_all(workers: Vec<Worker>, within: Duration) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        for mut w in workers {
            loop {
                if let Some(status) = w.0.try_wait().unwrap() {
                    assert!(status.success(), "worker failed: {status:?}");
                    break;
                }
                assert!(
                    started.elapsed() < within,
                    "workers did not finish in {within:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await
    .unwrap();
}

/// A run of [`three_workers`].
struct Fleet {
    /// Calls a second the simulator allows the POND account.
    real: u32,
    /// Calls a second and concurrency each worker is configured with.
    configured: f64,
    concurrency: usize,
    /// Devices of each of the three bulk changes.
    devices: u32,
    latency: Duration,
}

/// Three worker processes, one bulk change each, against a simulator enforcing `real` calls a
/// second on the POND account: the account's report.
async fn three_workers(pool: sqlx::PgPool, fleet: Fleet) -> (TestApp, AccountReport) {
    let Fleet {
        real,
        configured,
        concurrency,
        devices,
        latency,
    } = fleet;
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_latency(latency)
        .with_rate_limits(Some(real), None);
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let workflow = workflow_with_pond(dir.path(), configured, concurrency);
    for id in [9_401, 9_402, 9_403] {
        app.engine
            .submit(pond_only(id, devices), true)
            .await
            .unwrap();
    }
    let db_url = database_url(&app.db).await;
    let workers = (0..3)
        .map(|n| worker(&app, &db_url, &workflow, n))
        .collect();
    wait_for_all(workers, Duration::from_secs(240)).await;
    app.engine.projector.catch_up().await.unwrap();
    for id in [9_401, 9_402, 9_403] {
        let summary =
            bulkflow::projections::read::bulk_summary(&app.db, BulkChangeId::new(id).unwrap())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(
            (summary.status.as_str(), summary.processed),
            ("PROCESSED", i64::from(devices))
        );
    }
    let account =
        app.sim.report().accounts[&format!("pond:{}", app.sim.auth().distributor_id)].clone();
    (app, account)
}

/// Calls answered a second from the first to the last call.
fn achieved(a: &AccountReport) -> f64 {
    (a.calls - a.refused) as f64 / ((a.calls as f64) / a.calls_per_second)
}

#[sqlx::test]
async fn three_workers_configured_at_the_carriers_limit_use_it_without_429s(pool: sqlx::PgPool) {
    let (_app, pond) = three_workers(
        pool,
        Fleet {
            real: 150,
            configured: 150.0,
            concurrency: 16,
            devices: 300,
            latency: Duration::from_millis(20),
        },
    )
    .await;
    let ratio = achieved(&pond) / 150.0;
    eprintln!(
        "(a) R = limit: {:.0} calls/s answered = {:.1} % of R, {} of {} refused, peak concurrency {}",
        achieved(&pond),
        ratio * 100.0,
        pond.refused,
        pond.calls,
        pond.peak_concurrency
    );
    assert_eq!(pond.calls - pond.refused, 3 * 300 * 2, "two calls a device");
    // The fleet shares the limit instead of each worker taking all of it (that bug gave 48 % of
    // R with 41 % refused). How close to R it gets is a figure of the bench (`cargo bench
    // --bench e2e`, fleet (a): >= 90 % is its goal); three debug-build workers beside the rest
    // of the suite on a two-core machine reach 85-93 % here, alone 93 %.
    assert!(ratio >= 0.75, "achieved {:.1} % of R", ratio * 100.0);
    assert!(
        pond.refused as f64 <= 0.01 * pond.calls as f64,
        "{} of {} refused",
        pond.refused,
        pond.calls
    );
    assert!(pond.peak_concurrency <= 16, "{pond:?}");
}

#[sqlx::test]
async fn three_workers_never_have_more_calls_in_flight_than_the_account_allows(pool: sqlx::PgPool) {
    // A slow carrier: at 100 ms a call, 8 slots allow 80 calls a second, far under the rate.
    let (_app, pond) = three_workers(
        pool,
        Fleet {
            real: 1_000,
            configured: 1_000.0,
            concurrency: 8,
            devices: 100,
            latency: Duration::from_millis(100),
        },
    )
    .await;
    let ratio = achieved(&pond) / 80.0;
    eprintln!(
        "concurrency 8 at 100 ms a call: {:.1} calls/s = {:.1} % of 80, peak concurrency {}, per second {:?}",
        achieved(&pond),
        ratio * 100.0,
        pond.peak_concurrency,
        pond.accepted_per_second
    );
    assert!(
        (6..=8).contains(&pond.peak_concurrency),
        "{}",
        pond.peak_concurrency
    );
    // Most slots are used (not lost to a dead share or a leak that held half of them): each
    // call waits for its rate slot while holding its concurrency slot (a few ms), more on a
    // loaded machine (85-92 % on an idle one; 73 % with a build running beside it; 58 % seen on
    // a machine 3-4 times slower, beside the rest of the suite). The efficiency itself is a
    // figure of the bench, not of this test.
    assert!(ratio >= 0.45, "{:.1} %", ratio * 100.0);
}

#[sqlx::test]
async fn configured_twice_the_carriers_limit_the_fleet_settles_just_under_it(pool: sqlx::PgPool) {
    let (app, pond) = three_workers(
        pool,
        Fleet {
            real: 100,
            configured: 200.0,
            concurrency: 16,
            devices: 500,
            latency: Duration::from_millis(5),
        },
    )
    .await;
    let seconds = pond.accepted_per_second.len();
    let settled = pond.accepted_rate(seconds / 2, seconds);
    let refused = pond.refused as f64 / pond.calls as f64;
    eprintln!(
        "(b) R = 2 x limit: {settled:.1} calls/s answered over the second half = {:.1} % of the real limit; {} of {} refused ({:.2} %) over {seconds} s",
        settled,
        pond.refused,
        pond.calls,
        refused * 100.0
    );
    // The simulator lets a burst of a tenth of its rate through once: over the half a
    // little above 100 % is its burst, not ours.
    assert!(
        (80.0..=101.0).contains(&settled),
        "{settled:.1} calls/s: {:?}",
        pond.accepted_per_second
    );
    assert!(refused < 0.05, "{refused}");
    // The learned rate is visible to an operator.
    let out = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
        .args(["status", "9401"])
        .env("BULKFLOW_DATABASE_URL", database_url(&app.db).await)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("pond:{}", app.sim.auth().distributor_id)))
        .unwrap_or_else(|| panic!("no limits in status: {text}"));
    assert!(
        line.contains("of 200.0/s configured") && line.contains("429s"),
        "{line}"
    );
}

#[sqlx::test]
async fn a_small_bulk_change_behind_a_huge_one_on_the_same_account_finishes_within_seconds(
    pool: sqlx::PgPool,
) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_rate_limits(Some(100), None);
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let workflow = workflow_with_pond(dir.path(), 100.0, 32);
    app.engine
        .submit(pond_only(9_410, 100_000), true)
        .await
        .unwrap();
    let db_url = database_url(&app.db).await;
    let _workers: Vec<Worker> = (0..3)
        .map(|n| worker(&app, &db_url, &workflow, n))
        .collect();
    let started = Instant::now();
    while app.sim.report().pond_calls == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the big one never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let small = BulkChangeId::new(9_411).unwrap();
    app.engine.submit(pond_only(9_411, 20), true).await.unwrap();
    let submitted = Instant::now();
    loop {
        app.engine.projector.catch_up().await.unwrap();
        let summary = bulkflow::projections::read::bulk_summary(&app.db, small)
            .await
            .unwrap();
        if summary.is_some_and(|s| s.status == "PROCESSED") {
            break;
        }
        assert!(
            submitted.elapsed() < Duration::from_secs(30),
            "the 20-device bulk change waited behind the big one"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "(c) 20 devices behind 100,000: PROCESSED {:.1} s after submission",
        submitted.elapsed().as_secs_f64()
    );
    // Few refusals: the three workers share the account's rate. Not the bench's <= 1 %: beside
    // the rest of the suite on a slow two-core machine the workers stall for seconds (calls per
    // second seen: 79, 99, 29, 51, 87, 29, 0, 0, 0, 0, 14, 0, 63, 62) and calls paced for one
    // second go out in the next; 19 of 532 were refused (3.6 %) in such a run.
    let pond = &app.sim.report().accounts[&format!("pond:{}", app.sim.auth().distributor_id)];
    assert!(pond.refused as f64 <= 0.05 * pond.calls as f64, "{pond:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_changes_on_one_worker_take_turns_for_the_accounts_slots() {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_rate_limits(Some(100), None);
    let app = TestApp::start_with_sim(Backend::Sqlite, sim, |config| {
        let mut pond = shipped_pond();
        pond.rate_per_second = 100.0;
        pond.burst = 10;
        config.limits.pond = Some(pond);
    })
    .await;
    let engine = app.engine.clone();
    let big = pond_only(9_420, 20_000);
    engine.submit(big.clone(), false).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let runner = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move { engine.run(big.bulk_change_id, &stop, None).await })
    };
    let started = Instant::now();
    while app.sim.report().pond_calls == 0 {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let small = pond_only(9_421, 20);
    engine.submit(small.clone(), false).await.unwrap();
    let submitted = Instant::now();
    let outcome = engine
        .run(
            small.bulk_change_id,
            &tokio_util::sync::CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    let took = submitted.elapsed();
    stop.cancel();
    let _ = runner.await;
    eprintln!("20 devices beside 20,000 on one worker: {took:?}");
    assert!(matches!(
        outcome,
        bulkflow::workflow::RunOutcome::Completed(_)
    ));
    // 40 calls at half of 100 calls a second, with room for commits.
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// The shipped workflow's POND limits.
fn shipped_pond() -> Configured {
    bulkflow::workflow::definition::Workflow::load_or_builtin(std::path::Path::new(
        bulkflow::workflow::definition::DEFAULT_PATH,
    ))
    .unwrap()
    .definition
    .downstreams
    .pond
}

fn limits(rate: f64, concurrency: usize) -> PerDownstream<Configured> {
    let mut pond = shipped_pond();
    pond.rate_per_second = rate;
    pond.max_concurrency = concurrency;
    PerDownstream::new(|_| pond.clone())
}

/// A caller that, until aborted, takes a slot of `account`, holds it 30 ms (a call), and again;
/// `inside` counts the callers holding one.
fn caller(
    account: Arc<bulkflow::workflow::limits::Account>,
    inside: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        /// Counts a caller inside until it leaves, however it leaves (an abort too).
        struct Inside(Arc<AtomicUsize>);
        impl Drop for Inside {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        loop {
            let entered = account.enter().await;
            inside.fetch_add(1, SeqCst);
            let counted = Inside(inside.clone());
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(counted);
            drop(entered);
        }
    })
}

#[sqlx::test]
async fn workers_split_an_accounts_concurrency_and_a_dead_ones_share_comes_back(
    pool: sqlx::PgPool,
) {
    let db = Db::Postgres(pool);
    db.migrate().await.unwrap();
    let first = Limits::new(&db, "first".into(), limits(1_000.0, 16), 60);
    let second = Limits::new(&db, "second".into(), limits(1_000.0, 16), 60);
    let (in_first, in_second) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // The most slots both held at once, sampled while the test runs.
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (a, b, most) = (in_first.clone(), in_second.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                most.fetch_max(a.load(SeqCst) + b.load(SeqCst), SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let a = first.account(Downstream::Pond, "DIST");
    let first_callers: Vec<_> = (0..20)
        .map(|_| caller(a.clone(), in_first.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(in_first.load(SeqCst), 16, "the only worker uses every slot");
    let b = second.account(Downstream::Pond, "DIST");
    let _second_callers: Vec<_> = (0..20)
        .map(|_| caller(b.clone(), in_second.clone()))
        .collect();
    // Both want more than half: within a renewal or two each uses its half, never more in all.
    let started = Instant::now();
    while in_second.load(SeqCst) < 8 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the newcomer got no share"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("the newcomer's fair half after {:?}", started.elapsed());
    let (mut first_most, mut second_most) = (0, 0);
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(1_500) {
        first_most = first_most.max(in_first.load(SeqCst));
        second_most = second_most.max(in_second.load(SeqCst));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!((first_most, second_most), (8, 8), "a fair half each");
    // The first worker dies: its renewals stop with it, its share runs out.
    for c in first_callers {
        c.abort();
        let _ = c.await;
    }
    drop(a);
    drop(first);
    let died = Instant::now();
    while in_second.load(SeqCst) < 16 {
        assert!(
            died.elapsed() < Duration::from_secs(6),
            "the dead worker's share never came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("a dead worker's share came back in {:?}", died.elapsed());
    sampler.abort();
    assert!(
        most.load(SeqCst) <= 16,
        "{} slots at once",
        most.load(SeqCst)
    );
}

/// Seconds the live share rows of `key` have left (PostgreSQL's clock), by owner.
async fn share_rows(db: &Db, key: &str) -> Vec<(String, i32, f64)> {
    let Db::Postgres(pool) = db else {
        unreachable!()
    };
    sqlx::query_as(
        "SELECT owner, slots, expires_at - extract(epoch from clock_timestamp())::float8 \
         FROM rate_limit_shares WHERE key = $1 ORDER BY owner",
    )
    .bind(key)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A worker process killed with SIGKILL while it holds every slot of the account: its share's
/// lease still has seconds to run, yet the share stops counting at once (its liveness lock went
/// with its connection), so a worker resuming its bulk change is not kept waiting for it.
#[sqlx::test]
async fn a_killed_workers_share_is_free_at_once_not_when_its_lease_runs_out(pool: sqlx::PgPool) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3)
        .with_suspended_sims()
        .with_latency(Duration::from_millis(200));
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let workflow = workflow_with_pond(dir.path(), 1_000.0, 8);
    app.engine
        .submit(pond_only(9_501, 400), true)
        .await
        .unwrap();
    let key = format!("pond:{}", app.sim.auth().distributor_id);
    let db_url = database_url(&app.db).await;
    let mut doomed = worker(&app, &db_url, &workflow, 1);
    // The worker holds the whole account (8 slots at 200 ms a call).
    let started = Instant::now();
    loop {
        let accounts = bulkflow::workflow::limits::store::accounts(&app.db)
            .await
            .unwrap();
        if accounts
            .iter()
            .any(|a| a.key == key && a.workers == 1 && a.slots_held == 8)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker never held the account: {accounts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.0.kill().unwrap(); // SIGKILL: no release, no goodbye
    doomed.0.wait().unwrap();
    // Another worker wants every slot: it gets them while the dead share's lease is still on.
    let second = Limits::new(&app.db, "second".into(), limits(1_000.0, 8), 60);
    let account = second.account(Downstream::Pond, &app.sim.auth().distributor_id);
    let mut entered = Vec::new();
    for _ in 0..8 {
        entered.push(
            tokio::time::timeout(Duration::from_secs(10), account.enter())
                .await
                .expect("a slot of the account"),
        );
    }
    let rows = share_rows(&app.db, &key).await;
    let dead = rows
        .iter()
        .find(|(owner, _, _)| owner.starts_with("worker-1/"))
        .unwrap_or_else(|| panic!("the dead worker's share is gone: {rows:?}"));
    eprintln!(
        "all 8 slots taken while the dead worker's share (8 slots) had {:.2} s left",
        dead.2
    );
    assert_eq!(dead.1, 8, "{rows:?}");
    assert!(
        dead.2 > 0.0,
        "the slots came back only when the dead share ran out: {rows:?}"
    );
    let view = bulkflow::workflow::limits::store::accounts(&app.db)
        .await
        .unwrap();
    let view = view.iter().find(|a| a.key == key).unwrap();
    assert_eq!(
        (view.workers, view.slots_held),
        (1, 8),
        "the operator's view counts the live worker only: {view:?}"
    );
    drop(entered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_holds_only_its_own_account() {
    use bulkflow::sim::{Fault, Script};
    // Service provider 12 on one POND distributor, 13 on another (its own simulator).
    let other_auth = SimAuth {
        distributor_id: "DIST-OTHER".into(),
        ..SimAuth::default()
    };
    let other = Simulator::new(other_auth.clone(), FaultProfile::None, 4);
    let (other_addr, other_server) = other.start("127.0.0.1:0").await.unwrap();
    let app = TestApp::start_with(Backend::Sqlite, FaultProfile::None, |config| {
        let mut creds = config.pond.default.clone();
        creds.base_url = Some(format!("http://{other_addr}/ds/u/distributorPPUService/v1"));
        creds.distributor_id = Some(other_auth.distributor_id.clone());
        config.pond.providers.insert("13".into(), creds);
        config.safety.max_retry_after_secs = 30;
        config.safety.stop_grace_ms = 300;
    })
    .await;
    let held = pond_only(9_430, 20);
    let mut free = pond_only(9_431, 20);
    free.service_provider_id = bulkflow::domain::ServiceProviderId::new(13).unwrap();
    // The first call on provider 12's account is refused, asking to wait 30 s.
    app.sim.script(
        held.devices[0].iccid.as_str(),
        Script::times(
            "get_status",
            Fault::RateLimited {
                retry_after_secs: 30,
            },
            1,
        ),
    );
    for d in held.devices.iter().chain(&free.devices) {
        app.sim.away_from(d.iccid.as_str(), TargetStatus::Active);
        other.away_from(d.iccid.as_str(), TargetStatus::Active);
    }
    let engine = app.engine.clone();
    engine.submit(held.clone(), false).await.unwrap();
    engine.submit(free.clone(), false).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let held_run = {
        let (engine, stop, id) = (engine.clone(), stop.clone(), held.bulk_change_id);
        tokio::spawn(async move { engine.run(id, &stop, None).await })
    };
    let started = Instant::now();
    while app.sim.report().rate_limited == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "no 429");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let calls_at_429 = app.sim.report().pond_calls;
    let outcome = engine
        .run(
            free.bulk_change_id,
            &tokio_util::sync::CancellationToken::new(),
            None,
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(matches!(
        outcome,
        bulkflow::workflow::RunOutcome::Completed(_)
    ));
    assert!(
        took < Duration::from_secs(10),
        "the other account waited: {took:?}"
    );
    // Provider 12's account is still held: none of its calls went out since the 429 (those
    // already in flight aside).
    let since = app.sim.report().pond_calls - calls_at_429;
    assert!(since <= 20, "{since} calls during the hold");
    assert!(!held_run.is_finished(), "held for the hint, not finished");
    stop.cancel();
    let _ = held_run.await;
    other_server.abort();
}

/// Waits (at most 20 s) until the simulator has answered `calls` Rev creations and lookups.
async fn rev_calls_reach(sim: &Simulator, calls: u64) {
    let started = Instant::now();
    loop {
        let r = sim.report();
        if r.rev_creates + r.rev_lookups >= calls {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rev's daily quota as a budget: with 5 calls a day, 5 Rev services are created and the other
/// devices wait for the next day (no 429, no device failed, `status` shows the budget used up);
/// on PostgreSQL the day is then turned under the running bulk change (the budget's day is the
/// database's) until it completes by itself, never over a day's budget, no service twice.
async fn a_used_up_daily_budget(backend: Backend, next_day: bool) {
    use bulkflow::sim::fixtures::billable_request;
    let app = TestApp::start_with(backend, FaultProfile::None, |config| {
        let rev = config.limits.rev.as_mut().unwrap();
        rev.max_calls_per_day = Some(5);
        rev.max_concurrency = 3;
        config.safety.stop_grace_ms = 300;
    })
    .await;
    let request = billable_request(9_500, 12);
    let id = app.submit(request).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let progress = Arc::new(bulkflow::workflow::Progress::default());
    let run = {
        let (engine, stop, progress) = (app.engine.clone(), stop.clone(), progress.clone());
        tokio::spawn(async move { engine.run(id, &stop, Some(&progress)).await })
    };
    rev_calls_reach(&app.sim, 5).await;
    // POND is done for every device well within this; Rev waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // While every Rev slot waits for the budget, the runner sleeps until something happens (an
    // outcome, its periodic look at the state) instead of polling its queue.
    let turns_before = progress.turns.load(SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let turns = progress.turns.load(SeqCst) - turns_before;
    assert!(turns <= 40, "{turns} turns of the runner in 2 s of waiting");
    let report = app.sim.report();
    assert_eq!(report.rev_creates + report.rev_lookups, 5, "{report:?}");
    assert_eq!(report.rate_limited + report.over_rate_limit, 0);
    let summary = app.summary(id).await;
    assert_eq!(
        (summary.processed, summary.failed),
        (5, 0),
        "the others wait, none fails: {summary:?}"
    );
    assert!(!run.is_finished());
    let Db::Postgres(pool) = &app.db else {
        stop.cancel();
        let _ = run.await.unwrap();
        return;
    };
    let rev = bulkflow::workflow::limits::store::accounts(&app.db)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.key.starts_with("rev:"))
        .unwrap();
    assert_eq!(
        (rev.max_calls_per_day, rev.calls_left_today),
        (Some(5), Some(0)),
        "{rev:?}"
    );
    if !next_day {
        return;
    }
    // The day turns (the counted day becomes yesterday) until the bulk change is done: 12
    // services at 5 a day take three days. Creations that waited past their send window are not
    // sent and give their slot back, so every day's budget goes to services.
    for day in 2..=3 {
        sqlx::query("UPDATE rate_limits SET day = day - 1 WHERE key LIKE 'rev:%'")
            .execute(pool)
            .await
            .unwrap();
        rev_calls_reach(&app.sim, (5 * day).min(12)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = app.sim.report();
        assert!(
            r.rev_creates + r.rev_lookups <= 5 * day,
            "day {day}: over the budget: {r:?}"
        );
    }
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the bulk change completes")
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, bulkflow::workflow::RunOutcome::Completed(_)),
        "{outcome:?}"
    );
    let report = app.sim.report();
    assert_eq!(
        (report.rev_services, report.rev_lookups),
        (12, 0),
        "{report:?}"
    );
    assert_eq!(report.rev_duplicate_numbers, 0);
    let summary = app.summary(id).await;
    assert_eq!((summary.processed, summary.failed), (12, 0), "{summary:?}");
    app.assert_no_device_processed_twice(id).await;
}

#[sqlx::test]
async fn a_used_up_daily_budget_waits_for_the_next_day_on_postgres(pool: sqlx::PgPool) {
    a_used_up_daily_budget(Backend::Postgres(pool), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_daily_budget_waits_on_sqlite() {
    a_used_up_daily_budget(Backend::Sqlite, false).await;
}
