//! The cost of one command must not grow with the bulk change (design §2 "Scale constraint").
//!
//! For bulk changes of 1,000 and 20,000 devices, on SQLite and PostgreSQL, this records the step
//! outcomes of every device in commands of 100 outcomes (as the runner does) and reports the time
//! per device outcome over the last 1,000 devices, when the stream is at its longest, plus the
//! one-off cost of replaying the whole stream after a restart.
//!
//! `cargo bench --bench scale` (PostgreSQL from BENCH_DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres; skipped when unreachable).

use std::time::{Duration, Instant};

use bulkflow::domain::bulk_change::{BulkChangeCommand, StepOutcome, StepReport};
use bulkflow::domain::{ApiCall, ServiceFlag, SimStatus, Step};
use bulkflow::sim::fixtures::demo_request;
use bulkflow::store::{Db, EventStore};
use bulkflow::workflow::definition::Workflow;
use chrono::Utc;

const BATCH: usize = 100;
const MEASURED: usize = 1_000;

fn call(method: &str) -> ApiCall {
    ApiCall {
        method: method.into(),
        url: "http://pond.example/ds/u/distributorPPUService/v1/D1/sim/8901000000000000001/status"
            .into(),
        request_body: None,
        status: Some(200),
        response_body: Some(r#"{"statusOfSim":"In-Service","status":"SUSPENDED"}"#.into()),
        error: None,
        retry_after_secs: None,
        request_id: Some("bulkflow-1-1-device_status-1".into()),
        started_at: Utc::now(),
        duration_ms: 12,
    }
}

fn outcome(step: Step) -> StepOutcome {
    match step {
        Step::DeviceStatus => StepOutcome::DeviceStatus {
            from: SimStatus {
                status_of_sim: "In-Service".into(),
                status: "SUSPENDED".into(),
                data: ServiceFlag::Disabled,
                voice: ServiceFlag::Disabled,
                sms: ServiceFlag::Disabled,
            },
            already_at_target: false,
            calls: vec![call("GET")],
        },
        _ => StepOutcome::ServiceStatus {
            flag: ServiceFlag::Enabled,
            call: call("POST"),
        },
    }
}

struct Figures {
    per_outcome_us: f64,
    accept_ms: f64,
    replay_ms: f64,
    events: usize,
}

async fn measure(db: &Db, devices: u32, workflow: &Workflow) -> Figures {
    let store = EventStore::new(db);
    let mut request = demo_request(1, devices);
    for d in &mut request.devices {
        // Every device goes through steps 1 and 2 (no purge, no Rev).
        d.target_status = bulkflow::domain::TargetStatus::Suspended;
        d.rev_service = None;
    }
    let id = request.bulk_change_id;
    let ids: Vec<_> = request.devices.iter().map(|d| d.device_change_id).collect();
    let t = Instant::now();
    store
        .execute(
            id,
            BulkChangeCommand::Accept {
                request: std::sync::Arc::new(request),
                workflow: workflow.reference(),
                at: Utc::now(),
            },
            "bench",
        )
        .await
        .unwrap();
    let accept_ms = t.elapsed().as_secs_f64() * 1e3;
    store
        .execute(
            id,
            BulkChangeCommand::Start {
                worker: "bench".into(),
                at: Utc::now(),
            },
            "bench",
        )
        .await
        .unwrap();
    let mut measured = Duration::ZERO;
    for step in [Step::DeviceStatus, Step::ServiceStatus] {
        for (i, chunk) in ids.chunks(BATCH).enumerate() {
            let reports = chunk
                .iter()
                .map(|d| StepReport {
                    device_change_id: *d,
                    step,
                    attempt: 1,
                    outcome: outcome(step),
                })
                .collect();
            let t = Instant::now();
            store
                .execute(
                    id,
                    BulkChangeCommand::RecordResults {
                        reports,
                        at: Utc::now(),
                    },
                    "bench",
                )
                .await
                .unwrap();
            if step == Step::ServiceStatus && (i + 1) * BATCH > ids.len() - MEASURED {
                measured += t.elapsed();
            }
        }
    }
    let fresh = EventStore::new(db);
    let t = Instant::now();
    let open = fresh.inspect(id, |b| b.open_devices()).await.unwrap();
    let replay_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(open, 0);
    let events = fresh.events(id).await.unwrap().len();
    Figures {
        per_outcome_us: measured.as_secs_f64() * 1e6 / MEASURED as f64,
        accept_ms,
        replay_ms,
        events,
    }
}

async fn sqlite_db(dir: &std::path::Path, n: u32) -> Db {
    let db = Db::connect(
        &format!("sqlite://{}", dir.join(format!("scale-{n}.db")).display()),
        4,
    )
    .await
    .unwrap();
    db.migrate().await.unwrap();
    db
}

async fn postgres_db(admin_url: &str, n: u32) -> Option<Db> {
    let admin = Db::connect(admin_url, 2).await.ok()?;
    let Db::Postgres(pool) = &admin else {
        return None;
    };
    let name = format!("bulkflow_bench_scale_{n}");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(pool)
        .await
        .ok()?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(pool)
        .await
        .ok()?;
    let url = match admin_url.rsplit_once('/') {
        Some((base, rest)) => {
            let query = rest
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{base}/{name}{query}")
        }
        None => return None,
    };
    let db = Db::connect(&url, 4).await.ok()?;
    db.migrate().await.ok()?;
    Some(db)
}

#[tokio::main]
async fn main() {
    let workflow =
        Workflow::load(std::path::Path::new("workflows/pond-status-update.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pg_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into());
    println!("scale benchmark: time per device outcome over the last {MEASURED} devices (commands of {BATCH} outcomes)");
    println!(
        "{:<9} {:>8} {:>8} {:>12} {:>11} {:>11}",
        "store", "devices", "events", "µs/outcome", "accept ms", "replay ms"
    );
    for store in ["sqlite", "postgres"] {
        let mut per = Vec::new();
        for n in [1_000u32, 20_000] {
            let db = if store == "sqlite" {
                Some(sqlite_db(dir.path(), n).await)
            } else {
                postgres_db(&pg_url, n).await
            };
            let Some(db) = db else {
                println!("{store:<9} skipped: {pg_url} not reachable");
                break;
            };
            let f = measure(&db, n, &workflow).await;
            println!(
                "{store:<9} {n:>8} {:>8} {:>12.1} {:>11.1} {:>11.1}",
                f.events, f.per_outcome_us, f.accept_ms, f.replay_ms
            );
            per.push(f.per_outcome_us);
            db.close().await;
        }
        if let [small, large] = per[..] {
            println!(
                "{store:<9} per-device time ratio 20,000 / 1,000 = {:.2}",
                large / small
            );
        }
    }
}
