//! A worker's `/metrics`, `/healthz` and `/readyz` (`worker --metrics-listen`), scraped while it
//! runs a bulk change against the simulator.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::{Fault, FaultProfile, Script};

use crate::helpers::{Backend, TestApp};

/// The sum of the samples of `name` whose labels contain every one of `labels`.
pub(crate) fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_metrics_count_what_its_run_did_and_it_reports_healthy_and_ready() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let request = demo_request(340, 30);
    let id = request.bulk_change_id;
    // One 429 (asking to wait 1 s) on the account.
    app.sim.script(
        request.devices[3].iccid.as_str(),
        Script::times(
            "get_status",
            Fault::RateLimited {
                retry_after_secs: 1,
            },
            1,
        ),
    );
    app.engine.submit(request, true).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut worker = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
        .args(["worker", "--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("BULKFLOW_DATABASE_URL", app.database_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://127.0.0.1:{port}{path}")).send();
    let started = Instant::now();
    // Done when the read model says so (the worker's projector keeps it current).
    loop {
        let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
            .await
            .unwrap();
        if summary.is_some_and(|s| s.status == "PROCESSED") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = get("/healthz").await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(ready.text().await.unwrap().contains("ready"));
    let text = get("/metrics").await.unwrap().text().await.unwrap();
    let report = app.sim.report();
    assert_eq!(
        sum(
            &text,
            "bulkflow_devices_ended_total",
            &["status=\"PROCESSED\""]
        ),
        30.0,
        "{text}"
    );
    assert_eq!(
        sum(&text, "bulkflow_carrier_calls_total", &["api=\"pond\""]),
        report.pond_calls as f64,
        "every POND call the simulator saw"
    );
    assert_eq!(
        sum(
            &text,
            "bulkflow_carrier_calls_total",
            &["api=\"pond\"", "operation=\"get_status\"", "status=\"429\""]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &text,
            "bulkflow_throttled_total",
            &["account=\"pond:DIST-SIM\""]
        ),
        1.0
    );
    assert!(sum(&text, "bulkflow_retries_total", &[]) >= 1.0);
    assert!(
        sum(
            &text,
            "bulkflow_carrier_call_seconds_count",
            &["api=\"pond\""]
        ) >= 30.0
    );
    assert_eq!(sum(&text, "bulkflow_bulk_changes_running", &[]), 0.0);
    assert!(text.contains("bulkflow_projection_lag_events"), "{text}");
    assert!(text.contains("bulkflow_projection_lag_seconds"), "{text}");
    // The one queued message was received and deleted once its bulk change was done.
    assert_eq!(
        sum(&text, "bulkflow_queue_messages_received_total", &[]),
        1.0
    );
    assert_eq!(
        sum(&text, "bulkflow_queue_messages_deleted_total", &[]),
        1.0
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Taking a bulk change over from a worker whose session was cut (its lease not run out, not
/// released) counts as a takeover; taking a released one does not.
#[sqlx::test]
async fn a_takeover_from_a_cut_off_worker_is_counted(pool: sqlx::PgPool) {
    use bulkflow::store::lease::Hold;
    let db = bulkflow::store::Db::Postgres(pool.clone());
    db.migrate().await.unwrap();
    let takeovers = || {
        sum(
            &bulkflow::metrics::handle().render(),
            "bulkflow_lease_takeovers_total",
            &[],
        )
    };
    let id = bulkflow::domain::BulkChangeId::new(9_350).unwrap();
    let ttl = Duration::from_secs(30);
    let first = Hold::take(&db, id, "first", ttl).await.unwrap().unwrap();
    let before = takeovers();
    // The first worker's lock session is cut (as by a proxy or a failover); it never released.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE 'bulkflow-hold %'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let second = Hold::take(&db, id, "second", ttl).await.unwrap().unwrap();
    assert_eq!(takeovers(), before + 1.0);
    // A released one taken again is no takeover.
    second.release().await;
    let _third = Hold::take(&db, id, "third", ttl).await.unwrap().unwrap();
    assert_eq!(takeovers(), before + 1.0);
    drop(first);
}
