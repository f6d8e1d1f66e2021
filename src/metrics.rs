//! Prometheus metrics (the `metrics` facade, rendered by `metrics-exporter-prometheus`) and the
//! health endpoints of long-running processes: `worker --metrics-listen ADDR` serves
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (the database answers, its
//! migrations are current, the projections are not far behind). Every name starts with
//! `bulkflow_`; `docs/operations.md` lists them and what to alert on.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::store::Db;

/// Carrier calls made, by `api` (pond, rev), `operation` and HTTP `status` (`none` when no
/// answer came).
pub const CARRIER_CALLS: &str = "bulkflow_carrier_calls_total";
/// Seconds a carrier call took, by `api` and `operation`.
pub const CARRIER_CALL_SECONDS: &str = "bulkflow_carrier_call_seconds";
/// Devices that reached an end, by `status` (PROCESSED, API_FAILED, …).
pub const DEVICES_ENDED: &str = "bulkflow_devices_ended_total";
/// Retries scheduled.
pub const RETRIES: &str = "bulkflow_retries_total";
/// 429s, by carrier `account`.
pub const THROTTLED: &str = "bulkflow_throttled_total";
/// Seconds a carrier asked an account to wait (the holds), by `account`.
pub const HELD_SECONDS: &str = "bulkflow_limit_held_seconds_total";
/// The learned rate of an account, calls a second, by `account`.
pub const ACCOUNT_RATE: &str = "bulkflow_account_rate";
/// Bulk changes this process is driving now.
pub const RUNNING: &str = "bulkflow_bulk_changes_running";
/// Events the projections have not applied yet (at the last scrape).
pub const PROJECTION_LAG: &str = "bulkflow_projection_lag_events";
/// Seconds since this process's projector was last caught up (0 while it is).
pub const PROJECTION_LAG_SECONDS: &str = "bulkflow_projection_lag_seconds";
/// Bulk changes taken over from a worker that held them without releasing them (PostgreSQL).
pub const LEASE_TAKEOVERS: &str = "bulkflow_lease_takeovers_total";
/// Queue entries a runner dropped for a device whose attempt was already under way (a second
/// dispatch of one device prevented). Should stay 0: any rise is a bug to report.
pub const DUPLICATE_DISPATCHES: &str = "bulkflow_duplicate_dispatches_prevented_total";

/// Operator API requests (`bulkflow serve`), by `method`, `route` and `status`.
pub const API_REQUESTS: &str = "bulkflow_api_requests_total";
/// Seconds an operator API request took, by `method` and `route`.
pub const API_REQUEST_SECONDS: &str = "bulkflow_api_request_seconds";

/// When this process's projector last found nothing left to apply (ms since the epoch).
static CAUGHT_UP_AT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The projector found nothing left to apply.
pub fn projections_caught_up() {
    CAUGHT_UP_AT.store(
        chrono::Utc::now().timestamp_millis(),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Queue messages received, deleted (done with), and moved to the dead-letter queue.
pub const QUEUE_RECEIVED: &str = "bulkflow_queue_messages_received_total";
pub const QUEUE_DELETED: &str = "bulkflow_queue_messages_deleted_total";
pub const QUEUE_DEAD_LETTERED: &str = "bulkflow_queue_messages_dead_lettered_total";

/// Readiness fails when the projections are further behind than this.
pub const READY_MAX_LAG_EVENTS: i64 = 100_000;

/// The process's recorder, installed on first use (one per process).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(CARRIER_CALL_SECONDS.into()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(API_REQUEST_SECONDS.into()),
                &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // A recorder installed already (another engine in this process) keeps counting.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// One carrier call: `point` is `pond.get_status`, `rev.create`, …
pub fn carrier_call(point: &str, status: Option<u16>, took: Duration) {
    let (api, operation) = point.split_once('.').unwrap_or((point, ""));
    let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
    metrics::counter!(CARRIER_CALLS, "api" => api.to_string(), "operation" => operation.to_string(), "status" => status)
        .increment(1);
    metrics::histogram!(CARRIER_CALL_SECONDS, "api" => api.to_string(), "operation" => operation.to_string())
        .record(took.as_secs_f64());
}

#[derive(Clone)]
struct Health {
    db: Db,
}

/// `/metrics`, `/healthz`, `/readyz` for a process on `db`.
pub fn router(db: Db) -> Router {
    handle();
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Health { db })
}

async fn render(State(health): State<Health>) -> impl IntoResponse {
    if let Ok(lag) = lag(&health.db).await {
        metrics::gauge!(PROJECTION_LAG).set(lag as f64);
        let seconds = if lag == 0 {
            projections_caught_up();
            0.0
        } else {
            let at = CAUGHT_UP_AT.load(std::sync::atomic::Ordering::Relaxed);
            (chrono::Utc::now().timestamp_millis() - at).max(0) as f64 / 1_000.0
        };
        metrics::gauge!(PROJECTION_LAG_SECONDS).set(seconds);
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        handle().render(),
    )
}

/// Events committed that the projections have not applied.
async fn lag(db: &Db) -> Result<i64, crate::store::Error> {
    let last = crate::store::catchup::last_position(db).await?;
    let at =
        crate::store::catchup::load_checkpoint(db, crate::projections::projector::CONSUMER).await?;
    Ok((last - at.position).max(0))
}

async fn ready(State(health): State<Health>) -> (StatusCode, String) {
    let db = &health.db;
    match db.pending_migrations().await {
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n")),
        Ok(n) if n > 0 => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{n} migration(s) not applied\n"),
            )
        }
        Ok(_) => {}
    }
    match lag(db).await {
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n")),
        Ok(lag) if lag > READY_MAX_LAG_EVENTS => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("projections {lag} events behind (more than {READY_MAX_LAG_EVENTS})\n"),
        ),
        Ok(lag) => (
            StatusCode::OK,
            format!("ready; projections {lag} events behind\n"),
        ),
    }
}

/// Serves [`router`] on `addr` until `cancel`.
pub async fn serve(
    addr: std::net::SocketAddr,
    db: Db,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(db))
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(local)
}
