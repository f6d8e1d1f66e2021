//! The operator API of `bulkflow serve` (axum), over the read models and the event store,
//! under `/api/v1`. Every request needs the operator token (`Authorization: Bearer`, from
//! `[api] token` / `BULKFLOW_API_TOKEN`); errors are JSON with a stable `code`.
//!
//! Reads: the list of bulk changes, one bulk change with progress, its devices, and one device's
//! timeline (what `replay` shows). Writes: a new bulk change (`202` with its `Location`, queued
//! for the workers) and the resumption of a paused one. The same process serves `/metrics`,
//! `/healthz` and `/readyz` without the token.

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use crate::adapters::queue::Queue;
use crate::adapters::sqs::SqsQueue;
use crate::app::{Engine, Source};
use crate::audit::Timeline;
use crate::domain::bulk_change::Error as Refused;
use crate::domain::BulkChangeId;
use crate::projections::read;
use crate::store::Db;

/// An API error: an HTTP status, a stable code and a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request failed inside bulkflow; see its log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// The routes under `/api/v1`, as the OpenAPI document names them.
pub const ROUTES: [&str; 10] = [
    "/bulk-changes",
    "/bulk-changes/{id}",
    "/bulk-changes/{id}/devices",
    "/bulk-changes/{id}/throughput",
    "/bulk-changes/{id}/failures",
    "/bulk-changes/{id}/devices/{device}/timeline",
    "/bulk-changes/{id}/resume",
    "/bulk-changes/{id}/cancel",
    "/bulk-changes/{id}/retry-failed",
    "/openapi.json",
];

/// The OpenAPI document of this API, checked in as `docs/api/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/api/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], OPENAPI)
}

#[derive(Clone)]
struct Api {
    db: Db,
    engine: std::sync::Arc<Engine>,
    /// Where new and resumed bulk changes are queued for the workers (the local queue without).
    queue: Option<std::sync::Arc<SqsQueue>>,
    token: std::sync::Arc<SecretString>,
}

/// The API router (token required) merged with the health and metrics routes (no token).
pub fn router(
    engine: std::sync::Arc<Engine>,
    queue: Option<std::sync::Arc<SqsQueue>>,
    token: SecretString,
) -> Router {
    let db = engine.db.clone();
    let api = Api {
        db: db.clone(),
        engine,
        queue,
        token: std::sync::Arc::new(token),
    };
    let [bulk_changes, bulk_change, devices_of, throughput_of, failures_of, timeline_of, resume_of, cancel_of, retry_of, document] =
        ROUTES;
    let v1 = Router::new()
        .route(bulk_changes, get(list).post(create))
        .route(resume_of, post(resume))
        .route(cancel_of, post(cancel))
        .route(retry_of, post(retry_failed))
        .route(bulk_change, get(one))
        .route(devices_of, get(devices))
        .route(throughput_of, get(throughput))
        .route(failures_of, get(failures))
        .route(timeline_of, get(timeline))
        .route(document, get(openapi))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(api.clone(), authorize))
        .layer(axum::middleware::from_fn(count))
        .with_state(api);
    Router::new()
        .nest("/api/v1", v1)
        .merge(dashboard())
        .merge(crate::metrics::router(db))
}

/// The dashboard: static files embedded in the binary (no token needed to load them; the page
/// asks for the operator token and sends it with every API request).
fn dashboard() -> Router {
    fn file(content_type: &'static str, body: &'static str) -> axum::routing::MethodRouter {
        get(move || async move {
            (
                [
                    ("content-type", content_type),
                    ("cache-control", "no-cache"),
                    ("x-content-type-options", "nosniff"),
                ],
                body,
            )
        })
    }
    Router::new()
        .route(
            "/",
            file(
                "text/html; charset=utf-8",
                include_str!("dashboard/index.html"),
            ),
        )
        .route(
            "/dashboard/app.js",
            file(
                "text/javascript; charset=utf-8",
                include_str!("dashboard/app.js"),
            ),
        )
        .route(
            "/dashboard/style.css",
            file(
                "text/css; charset=utf-8",
                include_str!("dashboard/style.css"),
            ),
        )
}

/// Counts every API request by method, route (as the router names it) and status, and times it.
async fn count(request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(crate::metrics::API_REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::metrics::API_REQUEST_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Constant-time comparison of the presented token with the configured one.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if same(t.as_bytes(), api.token.expose_secret().as_bytes()) => {
            next.run(request).await
        }
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong token").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing Authorization: Bearer <token>",
        )
        .into_response(),
    }
}

fn bulk_id(raw: &str) -> Result<BulkChangeId, ApiError> {
    raw.parse::<BulkChangeId>().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("bulk change id {raw:?}: {e}"),
        )
    })
}

fn bad_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(50) {
        n @ 1..=1_000 => Ok(n),
        n => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit {n}: must be 1 to 1000"),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    tenant: Option<i64>,
    since: Option<DateTime<Utc>>,
    before: Option<i64>,
    limit: Option<i64>,
}

/// A query string that does not parse, named in a JSON error.
fn bad_query(rejection: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        rejection.body_text(),
    )
}

async fn list(
    State(api): State<Api>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let filter = read::ListFilter {
        status: q.status,
        tenant_id: q.tenant,
        since: q.since,
        before_id: q.before,
        limit: bad_limit(q.limit)?,
    };
    let lines = read::list_bulk_changes(&api.db, &filter)
        .await
        .map_err(ApiError::internal)?;
    let next = (lines.len() as i64 == filter.limit)
        .then(|| lines.last().map(|l| l.bulk_change_id))
        .flatten();
    Ok(Json(json!({ "items": lines, "next_before": next })))
}

async fn one(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = bulk_id(&id)?;
    let summary = read::bulk_summary(&api.db, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("bulk change {id} is not known")))?;
    let now = Utc::now();
    let mut value = serde_json::to_value(&summary).map_err(ApiError::internal)?;
    value["progress"] = json!(if summary.total > 0 {
        summary.finished() as f64 / summary.total as f64
    } else {
        1.0
    });
    value["devices_per_second"] = json!(summary.rate(now));
    value["eta_seconds"] = json!(summary.eta_secs(now));
    Ok(Json(value))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesQuery {
    status: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

async fn devices(
    State(api): State<Api>,
    Path(id): Path<String>,
    query: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let id = bulk_id(&id)?;
    let limit = bad_limit(q.limit)?;
    if read::bulk_summary(&api.db, id)
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "bulk change {id} is not known"
        )));
    }
    let items = read::devices(&api.db, id, q.status.as_deref(), q.after, limit)
        .await
        .map_err(ApiError::internal)?;
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|d| d.device_change_id))
        .flatten();
    Ok(Json(json!({ "items": items, "next_after": next })))
}

/// The summary of a known bulk change, or 404.
async fn known(api: &Api, raw: &str) -> Result<(BulkChangeId, read::BulkSummary), ApiError> {
    let id = bulk_id(raw)?;
    let summary = read::bulk_summary(&api.db, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("bulk change {id} is not known")))?;
    Ok((id, summary))
}

/// `GET /bulk-changes/{id}/throughput`: devices ended per time bucket (at most 120 buckets).
async fn throughput(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (_, summary) = known(&api, &id).await?;
    let t = read::throughput(&api.db, &summary)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(serde_json::to_value(t).map_err(ApiError::internal)?))
}

/// `GET /bulk-changes/{id}/failures`: failed devices (and billing warnings) grouped by reason.
async fn failures(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (id, _) = known(&api, &id).await?;
    let groups = read::failures(&api.db, id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        serde_json::to_value(groups).map_err(ApiError::internal)?,
    ))
}

async fn timeline(
    State(api): State<Api>,
    Path((id, device)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = bulk_id(&id)?;
    let events: Vec<_> = api
        .engine
        .store
        .events(id)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|e| e.payload)
        .collect();
    if events.is_empty() {
        return Err(ApiError::not_found(format!(
            "bulk change {id} is not known"
        )));
    }
    let mut timeline = Timeline::from_events(&events);
    if !timeline.only_device(&device) {
        return Err(ApiError::not_found(format!(
            "bulk change {id} has no device {device}"
        )));
    }
    let device = timeline.devices.remove(0);
    Ok(Json(
        serde_json::to_value(device).map_err(ApiError::internal)?,
    ))
}

/// How a refused command reads to an API client.
fn refused(id: BulkChangeId, error: crate::app::Error) -> ApiError {
    match error {
        crate::app::Error::Rejected(Refused::NotAccepted) => {
            ApiError::not_found(format!("bulk change {id} is not known"))
        }
        crate::app::Error::Rejected(Refused::InvalidRequest(e)) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid request: {e}"),
        ),
        crate::app::Error::Rejected(e) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        other => ApiError::internal(other),
    }
}

/// Queues `id` where the workers read: the SQS queue given to `serve`, or the local queue.
async fn queue_for_workers(api: &Api, id: BulkChangeId) -> Result<(), ApiError> {
    match &api.queue {
        Some(queue) => {
            let (body, attributes) = crate::adapters::queue::legacy_message(id.get());
            queue
                .send(&body, &attributes, std::time::Duration::ZERO)
                .await
                .map_err(ApiError::internal)
        }
        None => api
            .engine
            .enqueue_local(id)
            .await
            .map_err(ApiError::internal),
    }
}

/// `POST /bulk-changes`: a request (docs/request-format.md), accepted like `bulkflow submit`
/// (the same request again is accepted again; another under the same id is a conflict).
async fn create(
    State(api): State<Api>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(r.status(), "payload_too_large", r.body_text())
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
        }
    })?;
    // Checked as a stream, then appended in parts: the devices are never all decoded at once.
    let source = std::sync::Arc::new(Source::Bytes(std::sync::Arc::from(&body[..])));
    drop(body);
    let checked = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || source.check())
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?
    }
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid request: {e}"),
        )
    })?;
    let id = checked.head.bulk_change_id;
    let devices = checked.devices;
    api.engine
        .submit_checked(source, checked, false)
        .await
        .map_err(|e| refused(id, e))?;
    queue_for_workers(&api, id).await?;
    caught_up(&api).await;
    let location = format!("/api/v1/bulk-changes/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(axum::http::header::LOCATION, location)],
        Json(json!({ "bulk_change_id": id.get(), "devices": devices, "status": "accepted" })),
    )
        .into_response())
}

/// `POST /bulk-changes/{id}/resume`: a paused bulk change runs again.
async fn resume(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = bulk_id(&id)?;
    api.engine
        .resume_only(id, "api")
        .await
        .map_err(|e| refused(id, e))?;
    queue_for_workers(&api, id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "bulk_change_id": id.get(), "status": "resumed" })),
    )
        .into_response())
}

/// Brings the read models up to date after a write, so the next read shows it.
async fn caught_up(api: &Api) {
    if let Err(e) = api.engine.projector.catch_up().await {
        tracing::warn!(error = %e, "the read models did not catch up after a write");
    }
}

/// The optional body of `POST …/cancel`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
    by: Option<String>,
}

/// `POST /bulk-changes/{id}/cancel`: no new carrier call starts; the worker driving it (or the
/// next to take it up) lets calls in flight finish and ends it `CANCELLED`.
async fn cancel(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = bulk_id(&id)?;
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("body: expected {{\"reason\": …, \"by\": …}}: {e}"),
            )
        })?
    };
    let by = body.by.unwrap_or_else(|| "api".into());
    let reason = body
        .reason
        .unwrap_or_else(|| "cancelled by an operator".into());
    api.engine
        .cancel(id, &by, &reason)
        .await
        .map_err(|e| refused(id, e))?;
    // Whoever takes it up ends it (a worker driving it ends it itself).
    queue_for_workers(&api, id).await?;
    caught_up(&api).await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "bulk_change_id": id.get(), "status": "CANCELLING" })),
    )
        .into_response())
}

/// `POST /bulk-changes/{id}/retry-failed`: the devices that ended `API_FAILED` get a new round.
async fn retry_failed(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = bulk_id(&id)?;
    let devices = api
        .engine
        .retry_failed(id, "api")
        .await
        .map_err(|e| refused(id, e))?;
    queue_for_workers(&api, id).await?;
    caught_up(&api).await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "bulk_change_id": id.get(), "devices": devices, "status": "retrying" })),
    )
        .into_response())
}

/// Serves the API on `addr` until `cancel`; returns the bound address. Request bodies over
/// `max_body` bytes are refused (413).
pub async fn serve(
    addr: std::net::SocketAddr,
    engine: std::sync::Arc<Engine>,
    queue: Option<std::sync::Arc<SqsQueue>>,
    token: SecretString,
    max_body: usize,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(engine, queue, token).layer(axum::extract::DefaultBodyLimit::max(max_body));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_openapi_document_describes_every_route_and_only_those() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut routes = super::ROUTES.to_vec();
        documented.sort();
        routes.sort();
        assert_eq!(documented, routes);
    }
}
