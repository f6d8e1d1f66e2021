//! POND + Rev.io simulator: both APIs with state, their auth rules, fault injection and a
//! report that tests read. A test and demo tool; the real clients run unchanged against it.
//!
//! POND: `GET|POST /ds/u/distributorPPUService/v1/{DistributorId}/sim/{ICCID}/status`,
//! `DELETE …/sim/{ICCID}/purge`; `x-api-key` must match. Unknown ICCIDs are created on first
//! sight, in a realistic mix fixed per ICCID (about 7 in 10 In-Service ACTIVE with flags ENABLED,
//! the rest SUSPENDED with flags DISABLED), unless scripted as unknown.
//! Rev: `POST /v1/Services` (not idempotent: a repeated POST makes a second service),
//! `GET /v1/Services?search.number=`, `POST /v1/ServiceProduct` (not idempotent either; a
//! product added twice counts in `rev_duplicate_products`; refused for a disconnected service),
//! `GET /v1/ServiceProduct?search.service_id=`. Lookups are paged as Rev pages collections
//! (`search.page_size`, default 10, at most 500; `search.page`; `has_more`), and a number may
//! have a history of earlier services ([`Simulator::service_history`]). Basic auth and `Ocp-Apim-Subscription-Key` must match. A `customer_id` that is not an integer
//! is refused (400), as Rev documents it.
//! `GET /_sim/report`: call counts and `rev_duplicate_numbers`.

mod faults;
pub mod fixtures;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub use faults::{Fault, FaultProfile, Script};

/// Credentials the simulator accepts.
#[derive(Clone, Debug)]
pub struct SimAuth {
    pub distributor_id: String,
    pub api_key: String,
    pub rev_user: String,
    pub rev_password: String,
    pub rev_subscription_key: String,
}

impl Default for SimAuth {
    fn default() -> Self {
        Self {
            distributor_id: "DIST-SIM".into(),
            api_key: "sim-pond-key".into(),
            rev_user: "sim-user@SIMCLIENT".into(),
            rev_password: "sim-rev-password".into(),
            rev_subscription_key: "sim-subscription-key".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Sim {
    status_of_sim: String,
    status: String,
    flag: String,
}

#[derive(Debug, Clone, Serialize)]
struct RevService {
    service_id: i64,
    number: String,
    number2: Option<String>,
    customer_id: Value,
    service_type_id: Value,
    /// As Rev answers them: date-times (`2026-12-04T00:00:00`), or null.
    activated_date: Value,
    effective_date: Value,
    disconnected_date: Value,
    /// On file before the run (the number's history, [`Simulator::service_history`]): not
    /// counted among the services created, nor as a duplicate.
    prior: bool,
}

impl RevService {
    fn record(&self) -> Value {
        json!({
            "service_id": self.service_id,
            "number": self.number,
            "number2": self.number2,
            "customer_id": self.customer_id,
            "service_type_id": self.service_type_id,
            "activated_date": self.activated_date,
            "effective_date": self.effective_date,
            "disconnected_date": self.disconnected_date,
        })
    }
}

/// A date as Rev answers it: `2026-12-04` becomes `2026-12-04T00:00:00`.
fn rev_date(value: Option<&Value>) -> Value {
    match value.and_then(Value::as_str) {
        Some(d) if d.len() == 10 => Value::from(format!("{d}T00:00:00")),
        Some(d) => Value::from(d),
        None => Value::Null,
    }
}

/// Rev's default page size, and the most it gives a page.
const REV_PAGE_SIZE: usize = 10;
const REV_MAX_PAGE_SIZE: usize = 500;

/// One page of `records`, as Rev pages its collections: `search.page_size` (default 10, at
/// most 500) and `search.page` (from 1); `has_more` says whether more pages follow and
/// `record_count` counts this page's records (Rev gives no total).
fn rev_page(query: &HashMap<String, String>, records: Vec<Value>) -> Response {
    let number = |key: &str, default: usize| match query.get(key) {
        None => Some(default),
        Some(v) => v.trim().parse::<usize>().ok(),
    };
    let (Some(size), Some(page)) = (
        number("search.page_size", REV_PAGE_SIZE),
        number("search.page", 1),
    ) else {
        let e = json!({"ok": false, "message": "page and page_size must be integers"});
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    };
    if !(1..=REV_MAX_PAGE_SIZE).contains(&size) || page == 0 {
        let e =
            json!({"ok": false, "message": "page_size must be between 1 and 500, page at least 1"});
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    }
    let start = (page - 1).saturating_mul(size);
    let has_more = records.len() > start.saturating_add(size);
    let records: Vec<Value> = records.into_iter().skip(start).take(size).collect();
    Json(json!({"ok": true, "has_more": has_more, "record_count": records.len(), "records": records}))
        .into_response()
}

/// What the simulator saw; `GET /_sim/report`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub pond_calls: u64,
    pub pond_status_reads: u64,
    pub pond_status_writes: u64,
    pub pond_purges: u64,
    pub rev_creates: u64,
    pub rev_lookups: u64,
    pub rev_services: u64,
    pub rev_duplicate_numbers: u64,
    /// `POST /v1/ServiceProduct` that added a product.
    #[serde(default)]
    pub rev_product_creates: u64,
    /// Products added to a service that had them already (a repeated POST).
    #[serde(default)]
    pub rev_duplicate_products: u64,
    pub faults_injected: u64,
    /// 429s injected by the fault profile or scripts.
    pub rate_limited: u64,
    /// 429s because the client exceeded the configured rate limit.
    pub over_rate_limit: u64,
    pub auth_failures: u64,
    /// Calls refused with 503 during a scripted outage.
    #[serde(default)]
    pub outage_refusals: u64,
    /// Per account, as the carrier counts them: `pond:<distributor id>`, `rev:<client code>`.
    #[serde(default)]
    pub accounts: std::collections::BTreeMap<String, AccountReport>,
}

/// One account's traffic as the simulator saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AccountReport {
    /// Calls that reached the account (answered or refused).
    pub calls: u64,
    /// Refused with 429 for going over the account's rate limit.
    pub refused: u64,
    /// Most calls of the account in flight at once.
    pub peak_concurrency: u64,
    /// Calls a second between the account's first and last call.
    pub calls_per_second: f64,
    /// Calls answered (not refused) in each second from the account's first call on.
    #[serde(default)]
    pub accepted_per_second: Vec<u64>,
}

impl AccountReport {
    /// Calls answered a second over the seconds `from..to` (whole seconds since the first call;
    /// the last second, still running, is left out).
    pub fn accepted_rate(&self, from: usize, to: usize) -> f64 {
        let to = to.min(self.accepted_per_second.len().saturating_sub(1));
        if to <= from {
            return 0.0;
        }
        self.accepted_per_second[from..to].iter().sum::<u64>() as f64 / (to - from) as f64
    }
}

/// Live counters of one account.
#[derive(Default)]
struct Account {
    limit: Option<ApiLimit>,
    calls: u64,
    refused: u64,
    in_flight: u64,
    peak: u64,
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
    accepted_per_second: Vec<u64>,
}

#[derive(Default)]
struct Inner {
    sims: HashMap<String, Sim>,
    services: Vec<RevService>,
    /// (service id, product id) of every product added, in order.
    products: Vec<(i64, i64)>,
    /// POND status writes per ICCID.
    writes: HashMap<String, u64>,
    report: Report,
    scripts: HashMap<String, Vec<Script>>,
    faults: faults::Injector,
    /// Every SIM seen for the first time starts SUSPENDED (not the realistic mix).
    all_suspended: bool,
    /// Until when POND / Rev answer every call with 503 (an outage).
    pond_down_until: Option<std::time::Instant>,
    rev_down_until: Option<std::time::Instant>,
}

/// A rate limit the simulator enforces like a real API: over it, 429 with a wait hint.
type ApiLimit = Arc<governor::DefaultDirectRateLimiter>;

/// Shared simulator state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Mutex<Inner>>,
    /// Per-account counters, under their own lock (every call passes through them).
    accounts: Arc<Mutex<HashMap<String, Account>>>,
    auth: SimAuth,
    /// Calls a second each POND / Rev account allows (each account has its own limit).
    pond_limit: Option<u32>,
    rev_limit: Option<u32>,
    latency: Duration,
}

/// `per_second` calls a second with bursts of a tenth of that (at least 1).
fn api_limit(per_second: u32) -> ApiLimit {
    let rate = std::num::NonZeroU32::new(per_second.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let burst =
        std::num::NonZeroU32::new((per_second / 10).max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    Arc::new(governor::RateLimiter::direct(
        governor::Quota::per_second(rate).allow_burst(burst),
    ))
}

impl Simulator {
    pub fn new(auth: SimAuth, profile: FaultProfile, seed: u64) -> Self {
        let inner = Inner {
            faults: faults::Injector::new(profile, seed),
            ..Inner::default()
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            accounts: Arc::new(Mutex::new(HashMap::new())),
            auth,
            pond_limit: None,
            rev_limit: None,
            latency: Duration::ZERO,
        }
    }

    /// Every SIM the simulator sees for the first time starts SUSPENDED (flags DISABLED), so every
    /// activation takes every step: for benchmarks of the full path (three calls a device).
    pub fn with_suspended_sims(self) -> Self {
        self.lock().all_suspended = true;
        self
    }

    /// Enforces calls per second per account, as the carrier does: each POND distributor and
    /// each Rev client code gets `pond` / `rev` a second (beyond: 429 with `Retry-After: 1`).
    pub fn with_rate_limits(mut self, pond: Option<u32>, rev: Option<u32>) -> Self {
        self.pond_limit = pond;
        self.rev_limit = rev;
        self
    }

    /// Adds a fixed latency to every API call.
    /// From now on, for `duration`, POND (`rev` false) or Rev answers every call with 503, as a
    /// carrier in an outage does.
    pub fn outage(&self, rev: bool, duration: Duration) {
        let until = Some(std::time::Instant::now() + duration);
        let mut inner = self.lock();
        if rev {
            inner.rev_down_until = until;
        } else {
            inner.pond_down_until = until;
        }
    }

    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn auth(&self) -> &SimAuth {
        &self.auth
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a scripted behaviour for one ICCID (tried before random faults).
    pub fn script(&self, iccid: &str, script: Script) {
        self.lock()
            .scripts
            .entry(iccid.to_string())
            .or_default()
            .push(script);
    }

    /// Puts a SIM in a given state (`status` ACTIVE/SUSPENDED, flag ENABLED/DISABLED).
    pub fn set_sim(&self, iccid: &str, status_of_sim: &str, status: &str, flag: &str) {
        self.lock().sims.insert(
            iccid.into(),
            Sim {
                status_of_sim: status_of_sim.into(),
                status: status.into(),
                flag: flag.into(),
            },
        );
    }

    /// Puts a SIM where a change to `target` has to write (SUSPENDED for an activation, ACTIVE
    /// otherwise): for tests about the writes.
    pub fn away_from(&self, iccid: &str, target: crate::domain::TargetStatus) {
        match target {
            crate::domain::TargetStatus::Active => {
                self.set_sim(iccid, "In-Service", "SUSPENDED", "DISABLED")
            }
            _ => self.set_sim(iccid, "In-Service", "ACTIVE", "ENABLED"),
        }
    }

    pub fn report(&self) -> Report {
        let inner = self.lock();
        let mut report = inner.report.clone();
        let mut per_number: HashMap<&str, u64> = HashMap::new();
        for s in inner.services.iter().filter(|s| !s.prior) {
            *per_number.entry(&s.number).or_default() += 1;
        }
        report.rev_services = per_number.values().sum();
        report.accounts = self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(key, a)| {
                let span = match (a.first, a.last) {
                    (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
                    _ => 0.0,
                };
                let report = AccountReport {
                    calls: a.calls,
                    refused: a.refused,
                    peak_concurrency: a.peak,
                    calls_per_second: if span > 0.0 {
                        a.calls as f64 / span
                    } else {
                        0.0
                    },
                    accepted_per_second: a.accepted_per_second.clone(),
                };
                (key.clone(), report)
            })
            .collect();
        report.rev_duplicate_numbers = per_number.values().filter(|&&n| n > 1).count() as u64;
        report
    }

    /// Rev services created under `number` (not counting its history).
    pub fn services_for(&self, number: &str) -> usize {
        self.lock()
            .services
            .iter()
            .filter(|s| s.number == number && !s.prior)
            .count()
    }

    /// The ids of the Rev services created under `number` (not counting its history).
    pub fn service_ids_for(&self, number: &str) -> Vec<i64> {
        self.lock()
            .services
            .iter()
            .filter(|s| s.number == number && !s.prior)
            .map(|s| s.service_id)
            .collect()
    }

    /// Files `count` services under `number` for `customer_id` and `service_type_id` before the
    /// run, as a number's history in Rev: activated in 2023 and, when `disconnected`, disconnected
    /// in 2024 (a SIM that was billed before, then terminated). Returns their ids.
    pub fn service_history(
        &self,
        number: &str,
        customer_id: i64,
        service_type_id: i64,
        count: usize,
        disconnected: bool,
    ) -> Vec<i64> {
        let mut inner = self.lock();
        (0..count)
            .map(|_| {
                let id = 100_000 + inner.services.len() as i64 + 1;
                inner.services.push(RevService {
                    service_id: id,
                    number: number.to_string(),
                    number2: None,
                    customer_id: Value::from(customer_id),
                    service_type_id: Value::from(service_type_id),
                    activated_date: Value::from("2023-03-01T00:00:00"),
                    effective_date: Value::from("2023-03-01T00:00:00"),
                    disconnected_date: if disconnected {
                        Value::from("2024-06-30T00:00:00")
                    } else {
                        Value::Null
                    },
                    prior: true,
                });
                id
            })
            .collect()
    }

    /// POND status writes seen for one ICCID.
    pub fn writes_for(&self, iccid: &str) -> u64 {
        self.lock().writes.get(iccid).copied().unwrap_or(0)
    }

    /// The SIM's state as (`statusOfSim`, `status`, flag).
    pub fn sim(&self, iccid: &str) -> Option<(String, String, String)> {
        self.lock()
            .sims
            .get(iccid)
            .map(|s| (s.status_of_sim.clone(), s.status.clone(), s.flag.clone()))
    }

    pub fn router(&self) -> Router {
        let pond = "/ds/u/distributorPPUService/v1/{dist}/sim/{iccid}";
        Router::new()
            .route(
                &format!("{pond}/status"),
                get(pond_get_status).post(pond_set_status),
            )
            .route(&format!("{pond}/purge"), delete(pond_purge))
            .route("/v1/Services", get(rev_find).post(rev_create))
            .route(
                "/v1/ServiceProduct",
                get(rev_product_find).post(rev_product_create),
            )
            .route("/_sim/report", get(report))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                account_gate,
            ))
            .with_state(self.clone())
    }

    /// Serves on `listener` until the returned handle is aborted.
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        })
    }

    /// Binds `addr` (port 0 = any free port) and serves; returns the bound address.
    pub async fn start(
        &self,
        addr: &str,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((local, self.serve(listener)))
    }

    /// Decides what happens to a call before its normal handling: a scripted or random fault.
    /// `Err` answers at once; `Ok(Some(ms))` means do the work, then hang `ms` and answer 504.
    async fn before(
        &self,
        iccid: Option<&str>,
        op: &str,
        attempt: Option<u32>,
    ) -> Result<Option<u64>, Response> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let fault = {
            let mut inner = self.lock();
            let down_until = if op.starts_with("rev") {
                inner.rev_down_until
            } else {
                inner.pond_down_until
            };
            if down_until.is_some_and(|t| std::time::Instant::now() < t) {
                inner.report.outage_refusals += 1;
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"status": 503, "message": "service unavailable (outage)"})),
                )
                    .into_response());
            }
            let scripted = iccid.and_then(|i| {
                let scripts = inner.scripts.get_mut(i)?;
                let pos = scripts.iter().position(|s| s.applies(op, attempt))?;
                let fault = scripts[pos].fault.clone();
                if scripts[pos].consume() {
                    scripts.remove(pos);
                }
                Some(fault)
            });
            let fault = scripted.or_else(|| inner.faults.draw(op));
            if fault.is_some() {
                inner.report.faults_injected += 1;
            }
            if matches!(fault, Some(Fault::RateLimited { .. })) {
                inner.report.rate_limited += 1;
            }
            fault
        };
        let Some(fault) = fault else {
            return Ok(None);
        };
        match fault {
            Fault::Status { status, body } => Err((
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response()),
            Fault::RateLimited { retry_after_secs } => Err((
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", retry_after_secs.to_string())],
                format!("Rate limit is exceeded. Try again in {retry_after_secs} seconds."),
            )
                .into_response()),
            Fault::Slow { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(None)
            }
            Fault::Hang { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Err(StatusCode::GATEWAY_TIMEOUT.into_response())
            }
            Fault::AfterEffectHang { ms } => Ok(Some(ms)),
        }
    }

    fn pond_auth(&self, headers: &HeaderMap, dist: &str) -> Option<Response> {
        let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let err = if key != Some(self.auth.api_key.as_str()) {
            Some((StatusCode::UNAUTHORIZED, "API key missing or invalid"))
        } else if dist != self.auth.distributor_id {
            Some((
                StatusCode::FORBIDDEN,
                "distributor not allowed for this API key",
            ))
        } else {
            None
        };
        err.map(|(status, message)| {
            self.lock().report.auth_failures += 1;
            (status, Json(pond_error(status, message))).into_response()
        })
    }

    fn rev_auth(&self, headers: &HeaderMap) -> Option<Response> {
        use base64_engine::decode_basic;
        let basic = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(decode_basic);
        let expected = format!("{}:{}", self.auth.rev_user, self.auth.rev_password);
        let key = headers
            .get("Ocp-Apim-Subscription-Key")
            .and_then(|v| v.to_str().ok());
        if basic.as_deref() == Some(expected.as_str())
            && key == Some(self.auth.rev_subscription_key.as_str())
        {
            None
        } else {
            self.lock().report.auth_failures += 1;
            Some(
                (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"ok": false, "message": "unauthorized"})),
                )
                    .into_response(),
            )
        }
    }
}

/// What every POND call goes through first: counted, authenticated, then any fault applied.
async fn pond_enter(
    sim: &Simulator,
    headers: &HeaderMap,
    dist: &str,
    iccid: &str,
    op: &str,
) -> Result<Option<u64>, Response> {
    sim.lock().report.pond_calls += 1;
    if let Some(r) = sim.pond_auth(headers, dist) {
        return Err(r);
    }
    sim.before(Some(iccid), op, attempt_of(headers)).await
}

/// The attempt number at the end of a `RequestId` such as `bulkflow-1-2-service_status-3`.
fn attempt_of(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("RequestId")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('-').next())
        .and_then(|n| n.parse().ok())
}

fn pond_error(status: StatusCode, message: &str) -> Value {
    json!({
        "status": status.as_u16(),
        "code": status.canonical_reason().unwrap_or("ERROR").to_uppercase().replace(' ', "_"),
        "message": message,
        "link": "",
        "developerMessage": message,
        "referenceId": uuid::Uuid::new_v4().to_string(),
    })
}

fn sim_json(iccid: &str, sim: &Sim) -> Value {
    json!({
        "iccid": iccid,
        "statusOfSim": sim.status_of_sim,
        "status": sim.status,
        "simDataServiceStatus": sim.flag,
        "simVoiceServiceStatus": sim.flag,
        "simSmsServiceStatus": sim.flag,
    })
}

/// A SIM the simulator sees for the first time, in a realistic mix: about 7 in 10 already in
/// service (ACTIVE, flags ENABLED), the rest SUSPENDED (flags DISABLED); fixed per ICCID, so a
/// run is repeatable.
fn new_sim(iccid: &str, all_suspended: bool) -> Sim {
    let h = iccid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let (status, flag) = if h % 10 < 7 && !all_suspended {
        ("ACTIVE", "ENABLED")
    } else {
        ("SUSPENDED", "DISABLED")
    };
    Sim {
        status_of_sim: "In-Service".into(),
        status: status.into(),
        flag: flag.into(),
    }
}

async fn pond_get_status(
    State(sim): State<Simulator>,
    Path((dist, iccid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let hang = match pond_enter(&sim, &headers, &dist, &iccid, "get_status").await {
        Err(r) => return r,
        Ok(hang) => hang,
    };
    let response = {
        let mut inner = sim.lock();
        inner.report.pond_status_reads += 1;
        let all_suspended = inner.all_suspended;
        let state = inner
            .sims
            .entry(iccid.clone())
            .or_insert_with(|| new_sim(&iccid, all_suspended))
            .clone();
        Json(sim_json(&iccid, &state)).into_response()
    };
    after(hang, response).await
}

/// Answers, or (an after-effect hang) waits and answers 504 although the work was done.
async fn after(hang: Option<u64>, response: Response) -> Response {
    match hang {
        Some(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        None => response,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SetStatus {
    sim_data_service_status: String,
    sim_voice_service_status: String,
    sim_sms_service_status: String,
}

async fn pond_set_status(
    State(sim): State<Simulator>,
    Path((dist, iccid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Option<Json<SetStatus>>,
) -> Response {
    let hang = match pond_enter(&sim, &headers, &dist, &iccid, "set_status").await {
        Err(r) => return r,
        Ok(hang) => hang,
    };
    let Some(Json(body)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(pond_error(StatusCode::BAD_REQUEST, "invalid body")),
        )
            .into_response();
    };
    let flags = [
        &body.sim_data_service_status,
        &body.sim_voice_service_status,
        &body.sim_sms_service_status,
    ];
    let flag = flags[0].clone();
    if flags.iter().any(|f| **f != flag) || !(flag == "ENABLED" || flag == "DISABLED") {
        let e = pond_error(
            StatusCode::BAD_REQUEST,
            "flags must all be ENABLED or all DISABLED",
        );
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    }
    let response = {
        let mut inner = sim.lock();
        inner.report.pond_status_writes += 1;
        let all_suspended = inner.all_suspended;
        *inner.writes.entry(iccid.clone()).or_default() += 1;
        let state = inner
            .sims
            .entry(iccid.clone())
            .or_insert_with(|| new_sim(&iccid, all_suspended));
        if state.status_of_sim == "Terminated" {
            let e = pond_error(StatusCode::CONFLICT, "SIM is terminated");
            return (StatusCode::CONFLICT, Json(e)).into_response();
        }
        state.status_of_sim = "In-Service".into();
        state.status = if flag == "ENABLED" {
            "ACTIVE"
        } else {
            "SUSPENDED"
        }
        .into();
        state.flag = flag;
        StatusCode::NO_CONTENT.into_response()
    };
    after(hang, response).await
}

async fn pond_purge(
    State(sim): State<Simulator>,
    Path((dist, iccid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let hang = match pond_enter(&sim, &headers, &dist, &iccid, "purge").await {
        Err(r) => return r,
        Ok(hang) => hang,
    };
    let response = {
        let mut inner = sim.lock();
        inner.report.pond_purges += 1;
        let all_suspended = inner.all_suspended;
        *inner.writes.entry(iccid.clone()).or_default() += 1;
        let state = inner
            .sims
            .entry(iccid.clone())
            .or_insert_with(|| new_sim(&iccid, all_suspended));
        state.status_of_sim = "Terminated".into();
        state.flag = "DISABLED".into();
        StatusCode::NO_CONTENT.into_response()
    };
    after(hang, response).await
}

/// `POST /v1/Services`. Like a real server, it finishes a request it started even when the client
/// goes away mid-request (gives up, or is killed): the service is created all the same.
async fn rev_create(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    tokio::spawn(rev_create_detached(sim, headers, body))
        .await
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn rev_create_detached(
    sim: Simulator,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    if let Some(r) = sim.rev_auth(&headers) {
        return r;
    }
    let Some(Json(body)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"ok": false, "message": "invalid body"})),
        )
            .into_response();
    };
    let number = body
        .get("number")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let iccid = body
        .get("number2")
        .and_then(Value::as_str)
        .map(str::to_string);
    let missing = ["customer_id", "provider_id", "service_type_id", "number"]
        .into_iter()
        .find(|k| body.get(*k).is_none_or(Value::is_null));
    if let Some(k) = missing {
        let e = json!({"ok": false, "message": format!("{k} is required")});
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    }
    // As Rev documents it: customer_id is an integer.
    if !body.get("customer_id").is_some_and(Value::is_i64) {
        let e = json!({"ok": false, "message": "customer_id must be an integer"});
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    }
    let key = iccid.clone().unwrap_or_else(|| number.clone());
    let hang = match sim.before(Some(&key), "rev_create", None).await {
        Err(r) => return r,
        Ok(hang) => hang,
    };
    let id = {
        let mut inner = sim.lock();
        inner.report.rev_creates += 1;
        let id = 100_000 + inner.services.len() as i64 + 1;
        inner.services.push(RevService {
            service_id: id,
            number,
            number2: iccid,
            customer_id: body.get("customer_id").cloned().unwrap_or(Value::Null),
            service_type_id: body.get("service_type_id").cloned().unwrap_or(Value::Null),
            activated_date: rev_date(body.get("activated_date")),
            effective_date: rev_date(body.get("effective_date")),
            disconnected_date: Value::Null,
            prior: false,
        });
        id
    };
    after(
        hang,
        (StatusCode::CREATED, Json(json!({"ok": true, "id": id}))).into_response(),
    )
    .await
}

async fn rev_find(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = sim.rev_auth(&headers) {
        return r;
    }
    let number = query.get("search.number").cloned().unwrap_or_default();
    let mut inner = sim.lock();
    inner.report.rev_lookups += 1;
    let records: Vec<Value> = inner
        .services
        .iter()
        .filter(|s| s.number == number)
        .map(RevService::record)
        .collect();
    rev_page(&query, records)
}

/// `POST /v1/ServiceProduct`: adds a product to an existing service (not idempotent). Fault
/// scripts name it `rev_product`, keyed by the service's ICCID.
async fn rev_product_create(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    tokio::spawn(async move {
        if let Some(r) = sim.rev_auth(&headers) {
            return r;
        }
        let bad = |message: &str| {
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"ok": false, "message": message})),
            )
                .into_response()
        };
        let Some(Json(body)) = body else {
            return bad("invalid body");
        };
        let (Some(service_id), Some(product_id)) = (
            body.get("service_id").and_then(Value::as_i64),
            body.get("product_id").and_then(Value::as_i64),
        ) else {
            return bad("service_id and product_id are required integers");
        };
        let key = {
            let inner = sim.lock();
            match inner.services.iter().find(|s| s.service_id == service_id) {
                Some(s) if !s.disconnected_date.is_null() => {
                    return bad("the service is disconnected")
                }
                Some(s) => s.number2.clone().unwrap_or_else(|| s.number.clone()),
                None => return bad("service not found"),
            }
        };
        let hang = match sim.before(Some(&key), "rev_product", None).await {
            Err(r) => return r,
            Ok(hang) => hang,
        };
        let id = {
            let mut inner = sim.lock();
            inner.report.rev_product_creates += 1;
            if inner.products.contains(&(service_id, product_id)) {
                inner.report.rev_duplicate_products += 1;
            }
            inner.products.push((service_id, product_id));
            500_000 + inner.products.len() as i64
        };
        after(
            hang,
            (StatusCode::CREATED, Json(json!({"ok": true, "id": id}))).into_response(),
        )
        .await
    })
    .await
    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `GET /v1/ServiceProduct?search.service_id=`.
async fn rev_product_find(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = sim.rev_auth(&headers) {
        return r;
    }
    let service_id: i64 = query
        .get("search.service_id")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let inner = sim.lock();
    let records: Vec<Value> = inner
        .products
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| *s == service_id)
        .map(|(i, (s, p))| json!({"service_product_id": 500_001 + i as i64, "service_id": s, "product_id": p}))
        .collect();
    rev_page(&query, records)
}

/// The products each service of `number` has, in the order they were added.
impl Simulator {
    pub fn products_for(&self, number: &str) -> Vec<i64> {
        let inner = self.lock();
        let services: Vec<i64> = inner
            .services
            .iter()
            .filter(|s| s.number == number)
            .map(|s| s.service_id)
            .collect();
        inner
            .products
            .iter()
            .filter(|(s, _)| services.contains(s))
            .map(|(_, p)| *p)
            .collect()
    }
}

/// The account a call is made for, as the carrier sees it: the POND distributor id in the path,
/// the Rev client code in the Basic user (`user@CLIENTCODE`).
fn account_of(path: &str, headers: &HeaderMap) -> Option<String> {
    if let Some(rest) = path.strip_prefix("/ds/u/distributorPPUService/v1/") {
        return rest.split('/').next().map(|d| format!("pond:{d}"));
    }
    if path.starts_with("/v1/") {
        let user = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(base64_engine::decode_basic)?;
        let name = user.split(':').next()?;
        let code = name.rsplit_once('@').map_or("", |(_, c)| c);
        return Some(format!("rev:{code}"));
    }
    None
}

/// Counts every API call under its account, refuses it with 429 over the account's rate limit,
/// and tracks how many of the account's calls are in flight.
async fn account_gate(
    State(sim): State<Simulator>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = account_of(request.uri().path(), request.headers()) else {
        return next.run(request).await;
    };
    let limit = if key.starts_with("rev:") {
        sim.rev_limit
    } else {
        sim.pond_limit
    };
    {
        let mut accounts = sim.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let account = accounts.entry(key.clone()).or_default();
        account.calls += 1;
        account.first.get_or_insert(now);
        account.last = Some(now);
        if let Some(per_second) = limit {
            account.limit.get_or_insert_with(|| api_limit(per_second));
        }
        if account.limit.as_ref().is_some_and(|l| l.check().is_err()) {
            account.refused += 1;
            drop(accounts);
            sim.lock().report.over_rate_limit += 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "1")],
                "Rate limit is exceeded. Try again in 1 seconds.",
            )
                .into_response();
        }
        account.in_flight += 1;
        account.peak = account.peak.max(account.in_flight);
        let second = account
            .first
            .map_or(0, |f| now.duration_since(f).as_secs() as usize);
        if account.accepted_per_second.len() <= second {
            account.accepted_per_second.resize(second + 1, 0);
        }
        account.accepted_per_second[second] += 1;
    }
    /// Leaves the account's in-flight count when the call ends, however it ends.
    struct InFlight(Simulator, String);
    impl Drop for InFlight {
        fn drop(&mut self) {
            let mut accounts = self.0.accounts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = accounts.get_mut(&self.1) {
                a.in_flight = a.in_flight.saturating_sub(1);
            }
        }
    }
    let _in_flight = InFlight(sim.clone(), key);
    next.run(request).await
}

async fn report(State(sim): State<Simulator>) -> Json<Report> {
    Json(sim.report())
}

mod base64_engine {
    /// Decodes the `user:password` of a Basic auth header (standard base64).
    pub fn decode_basic(encoded: &str) -> Option<String> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits: u32 = 0;
        let mut count = 0;
        let mut out = Vec::new();
        for c in encoded.trim().bytes().filter(|&c| c != b'=') {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            bits = (bits << 6) | v;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        String::from_utf8(out).ok()
    }

    #[cfg(test)]
    #[test]
    fn decodes_basic_credentials() {
        assert_eq!(decode_basic("dTpw").as_deref(), Some("u:p"));
        assert_eq!(
            decode_basic("YWxhZGRpbjpvcGVuc2VzYW1l").as_deref(),
            Some("aladdin:opensesame")
        );
    }
}
