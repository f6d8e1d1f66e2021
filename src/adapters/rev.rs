//! Rev.io client: Basic auth `user@clientcode:password` plus `Ocp-Apim-Subscription-Key`,
//! snake_case bodies. `POST /v1/Services` is not idempotent: callers record an intent first and
//! look the service up (`GET /v1/Services?search.number=…`) when an earlier outcome is unknown.
//!
//! Rev pages every collection (10 records a page unless asked for up to 500, `has_more` when
//! more follow): a lookup reads every page before it says a service is absent, since a number
//! that was billed before has its history on file and the service looked for may be on a later
//! page. Of that history, a disconnected service is never taken for the one a lost POST
//! created (reactivating a SIM would otherwise bill nothing).

use reqwest::Method;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{send, Failure};
use crate::config::RevSettings;
use crate::domain::bulk_change::FailureClass;
use crate::domain::{ApiCall, Iccid, RevServiceRequest};

#[derive(Clone)]
pub struct RevClient {
    http: reqwest::Client,
    settings: RevSettings,
}

impl std::fmt::Debug for RevClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevClient")
            .field("base_url", &self.settings.base_url)
            .field("username", &self.settings.username)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Created {
    id: i64,
}

#[derive(Deserialize)]
struct Found {
    #[serde(default)]
    records: Vec<Value>,
    #[serde(default)]
    has_more: bool,
}

/// Records asked for a page of a lookup: Rev's most (its default is 10).
const PAGE_SIZE: usize = 500;
/// Pages a lookup reads at most (10,000 records) before it gives up, its outcome unknown.
const MAX_PAGES: usize = 20;

impl RevClient {
    pub fn new(http: reqwest::Client, settings: RevSettings) -> Self {
        Self { http, settings }
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/v1/{}",
            self.settings.base_url.trim_end_matches('/'),
            tail
        )
    }

    fn request(&self, method: &Method, url: &str) -> reqwest::RequestBuilder {
        let user = format!("{}@{}", self.settings.username, self.settings.client_code);
        self.http
            .request(method.clone(), url)
            .basic_auth(user, Some(self.settings.password.expose_secret()))
            .header(
                "Ocp-Apim-Subscription-Key",
                self.settings.subscription_key.expose_secret(),
            )
            .header("Accept", "application/json")
    }
}

impl super::RevApi for RevClient {
    /// `POST /v1/Services` → `201 {"ok": true, "id": N}`.
    async fn create_service(
        &self,
        service: &RevServiceRequest,
        number: &str,
        iccid: &Iccid,
        send_by: Option<chrono::DateTime<chrono::Utc>>,
        earlier: Vec<ApiCall>,
    ) -> Result<(i64, Vec<ApiCall>), Failure> {
        if send_by.is_some_and(|by| chrono::Utc::now() > by) {
            return Err(Failure::not_sent(
                "Rev creation not sent within its window after the intent; a new intent follows",
                earlier,
            ));
        }
        let url = self.url("Services");
        // Rev documents customer_id as an integer (and the original sent int(RevCustomerId));
        // requests are validated numeric, a historical non-numeric one goes as it was given.
        let customer_id = service
            .customer_id
            .trim()
            .parse::<i64>()
            .map_or_else(|_| Value::from(service.customer_id.clone()), Value::from);
        let mut body = json!({
            "customer_id": customer_id,
            "provider_id": service.provider_id,
            "service_type_id": service.service_type_id,
            "number": number,
            "number2": iccid.as_str(),
        });
        let extra = [
            (
                "usage_plan_group_id",
                service.usage_plan_group_id.map(Value::from),
            ),
            ("package_id", service.package_id.map(Value::from)),
            (
                "effective_date",
                service.effective_date.map(|d| Value::from(d.to_string())),
            ),
            (
                "activated_date",
                service.activated_date.map(|d| Value::from(d.to_string())),
            ),
        ];
        for (key, value) in extra {
            if let Some(value) = value {
                body[key] = value;
            }
        }
        let exchange = self.post("rev.create", &url, &body).await;
        if !exchange.is_success() {
            return Err(exchange.failure("Rev create service", false, earlier));
        }
        let parsed = serde_json::from_str::<Created>(&exchange.body);
        let mut calls = earlier;
        calls.push(exchange.call);
        match parsed {
            Ok(created) => Ok((created.id, calls)),
            Err(e) => Err(Failure {
                class: FailureClass::Retryable {
                    retry_after_secs: None,
                    outcome_unknown: true,
                    throttled: false,
                    not_sent: false,
                },
                reason: format!("Rev create service: success without a service id: {e}"),
                calls,
            }),
        }
    }

    /// `GET /v1/Services?search.number=…`, every page: the id of the service for `number` that
    /// a POST of `service` would have made (see `choose`).
    async fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> Result<(Option<i64>, Vec<ApiCall>), Failure> {
        let (records, calls) = self
            .search(
                "rev.find",
                "Rev look up service",
                "Services",
                "search.number",
                number,
            )
            .await?;
        Ok((choose(&records, number, service), calls))
    }

    async fn create_product(
        &self,
        service_id: i64,
        product_id: i64,
        service: &RevServiceRequest,
    ) -> Result<ApiCall, Failure> {
        self.add_product(service_id, product_id, service).await
    }

    async fn find_products(&self, service_id: i64) -> Result<(Vec<i64>, Vec<ApiCall>), Failure> {
        self.products_of(service_id).await
    }
}

impl RevClient {
    /// `POST /v1/ServiceProduct`.
    pub async fn add_product(
        &self,
        service_id: i64,
        product_id: i64,
        service: &RevServiceRequest,
    ) -> Result<ApiCall, Failure> {
        let url = self.url("ServiceProduct");
        let mut body = json!({
            "service_id": service_id,
            "product_id": product_id,
            "quantity": 1,
        });
        if let Ok(customer) = service.customer_id.trim().parse::<i64>() {
            body["customer_id"] = Value::from(customer);
        }
        if let Some(d) = service.activated_date {
            body["activated_date"] = Value::from(d.to_string());
        }
        let exchange = self.post("rev.product", &url, &body).await;
        if !exchange.is_success() {
            return Err(exchange.failure("Rev add product", false, vec![]));
        }
        Ok(exchange.call)
    }

    /// `POST {url}` with a JSON body, recorded.
    async fn post(&self, point: &str, url: &str, body: &Value) -> super::http::Exchange {
        send(
            point,
            self.request(&Method::POST, url).json(body),
            &Method::POST,
            url,
            Some(body),
            None,
        )
        .await
    }

    /// `GET /v1/{resource}?{key}={value}`, page after page: every record found, and a call per
    /// page. A failure leaves the outcome of what was looked for unknown (it is looked up
    /// again), as does a collection that does not end: more than `MAX_PAGES` pages, or a page
    /// that repeats the one before (a server that ignores the page asked for).
    async fn search(
        &self,
        point: &str,
        what: &str,
        resource: &str,
        key: &str,
        value: &str,
    ) -> Result<(Vec<Value>, Vec<ApiCall>), Failure> {
        let base = self.url(resource);
        let unknown = |reason: String, calls: Vec<ApiCall>| Failure {
            class: FailureClass::Retryable {
                retry_after_secs: None,
                outcome_unknown: true,
                throttled: false,
                not_sent: false,
            },
            reason,
            calls,
        };
        let mut records = Vec::new();
        let mut calls = Vec::new();
        let mut last_page: Vec<Value> = Vec::new();
        for page in 1..=MAX_PAGES {
            let query = [
                (key, value.to_string()),
                ("search.page_size", PAGE_SIZE.to_string()),
                ("search.page", page.to_string()),
            ];
            let url =
                format!("{base}?{key}={value}&search.page_size={PAGE_SIZE}&search.page={page}");
            let exchange = send(
                point,
                self.request(&Method::GET, &base).query(&query),
                &Method::GET,
                &url,
                None,
                None,
            )
            .await;
            if !exchange.is_success() {
                let mut failure = exchange.failure(what, true, calls);
                if let FailureClass::Retryable {
                    outcome_unknown, ..
                } = &mut failure.class
                {
                    *outcome_unknown = true;
                }
                return Err(failure);
            }
            let found = serde_json::from_str::<Found>(&exchange.body);
            calls.push(exchange.call);
            let found = match found {
                Ok(found) => found,
                Err(e) => return Err(unknown(format!("{what}: unexpected body: {e}"), calls)),
            };
            if !found.has_more {
                records.extend(found.records);
                return Ok((records, calls));
            }
            if found.records.is_empty() || found.records == last_page {
                return Err(unknown(
                    format!("{what}: page {page} of {key}={value} says more follow but brings no new record; not concluded"),
                    calls,
                ));
            }
            records.extend(found.records.iter().cloned());
            last_page = found.records;
        }
        Err(unknown(
            format!("{what}: more than {MAX_PAGES} pages of {PAGE_SIZE} records for {key}={value}; not concluded"),
            calls,
        ))
    }

    /// `GET /v1/ServiceProduct?search.service_id=…`: the product ids the service has.
    pub async fn products_of(&self, service_id: i64) -> Result<(Vec<i64>, Vec<ApiCall>), Failure> {
        let (records, calls) = self
            .search(
                "rev.product_find",
                "Rev look up products",
                "ServiceProduct",
                "search.service_id",
                &service_id.to_string(),
            )
            .await?;
        let products = records
            .iter()
            .filter(|r| id(r, "service_id") == Some(service_id))
            .filter_map(|r| id(r, "product_id"))
            .collect();
        Ok((products, calls))
    }
}

/// Whether a service Rev returned is the one `service` would create for `number`: the same
/// number, customer and service type. Rev may send ids as numbers or as strings.
fn is_match(record: &Value, number: &str, service: &RevServiceRequest) -> bool {
    let text = |key: &str| match record.get(key) {
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    text("number").as_deref() == Some(number)
        && text("customer_id").as_deref() == Some(service.customer_id.trim())
        && text("service_type_id") == Some(service.service_type_id.to_string())
}

/// An id Rev sent as a number or as a string.
fn id(record: &Value, key: &str) -> Option<i64> {
    match record.get(key) {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Whether Rev says the service was disconnected (or is to be): a `disconnected_date` that is a
/// real date (an empty one, or .NET's `0001-01-01` for "none", is not), or status `DISCONNECTED`.
/// A service a POST has just created is neither.
fn disconnected(record: &Value) -> bool {
    let dated = record
        .get("disconnected_date")
        .and_then(Value::as_str)
        .and_then(|d| d.trim().get(..4))
        .and_then(|year| year.parse::<u32>().ok())
        .is_some_and(|year| year > 1900);
    let status = record
        .get("status")
        .and_then(Value::as_str)
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("DISCONNECTED"));
    dated || status
}

/// Of the services Rev has for `number`, the one a POST of `service` would have made: the same
/// number, customer and service type, not disconnected (a number's history, e.g. the service of
/// a SIM billed before and then terminated, is not ours). If several remain, the one whose
/// activation and effective dates agree with those sent, then the newest (highest id). Dates
/// only rank, never exclude: a date Rev writes differently must not make bulkflow create a
/// second service for the one it made.
fn choose(records: &[Value], number: &str, service: &RevServiceRequest) -> Option<i64> {
    let agrees = |record: &Value| {
        let mut agree = 0;
        let mut disagree = 0;
        for (key, sent) in [
            ("activated_date", service.activated_date),
            ("effective_date", service.effective_date),
        ] {
            let (Some(sent), Some(on_file)) = (sent, record.get(key).and_then(Value::as_str))
            else {
                continue;
            };
            if on_file.trim().get(..10) == Some(sent.to_string().as_str()) {
                agree += 1;
            } else {
                disagree += 1;
            }
        }
        (disagree == 0, agree)
    };
    records
        .iter()
        .filter(|r| is_match(r, number, service) && !disconnected(r))
        .filter_map(|r| id(r, "service_id").map(|i| (agrees(r), i)))
        .max()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{choose, is_match};
    use crate::domain::RevServiceRequest;

    fn service() -> RevServiceRequest {
        RevServiceRequest {
            customer_id: "C-1".into(),
            provider_id: 1,
            service_type_id: 12,
            usage_plan_group_id: None,
            package_id: None,
            effective_date: None,
            activated_date: None,
            product_ids: vec![],
        }
    }

    #[test]
    fn only_a_service_of_the_same_customer_type_and_number_is_adopted() {
        let ours = json!({"service_id": 5, "number": "15550001", "customer_id": "C-1", "service_type_id": 12});
        assert!(is_match(&ours, "15550001", &service()));
        let as_text = json!({"service_id": 5, "number": "15550001", "customer_id": "C-1", "service_type_id": "12"});
        assert!(is_match(&as_text, "15550001", &service()));
        for other in [
            json!({"service_id": 6, "number": "15550001", "customer_id": "C-2", "service_type_id": 12}),
            json!({"service_id": 7, "number": "15550001", "customer_id": "C-1", "service_type_id": 13}),
            json!({"service_id": 8, "number": "15550002", "customer_id": "C-1", "service_type_id": 12}),
            json!({"service_id": 9, "number": "15550001"}),
        ] {
            assert!(!is_match(&other, "15550001", &service()), "{other}");
        }
    }

    /// A number's history: a disconnected service is never taken for the one a lost POST made
    /// (whatever form of "no date" Rev uses for the live ones), and of several live ones the
    /// one whose dates agree with those sent wins, then the newest.
    #[test]
    fn a_disconnected_service_is_never_taken_for_ours() {
        let record = |id: i64, disconnected: serde_json::Value, activated: &str| {
            json!({"service_id": id, "number": "15550001", "customer_id": 2002, "service_type_id": 12,
                   "activated_date": activated, "disconnected_date": disconnected})
        };
        let mut ours = service();
        ours.customer_id = "2002".into();
        let old = record(7, json!("2024-06-30T00:00:00"), "2023-03-01T00:00:00");
        assert_eq!(choose(std::slice::from_ref(&old), "15550001", &ours), None);
        let by_status = json!({"service_id": 8, "number": "15550001", "customer_id": 2002,
                               "service_type_id": 12, "status": "Disconnected"});
        assert_eq!(choose(&[by_status], "15550001", &ours), None);
        for none in [json!(null), json!(""), json!("0001-01-01T00:00:00")] {
            let live = record(9, none.clone(), "2026-12-04T00:00:00");
            assert_eq!(
                choose(&[old.clone(), live], "15550001", &ours),
                Some(9),
                "disconnected_date {none}"
            );
        }
        // Two live ones: with no dates sent, the newest; with an activation date sent, the one
        // that has it, even when older; a date written differently still finds ours.
        let a = record(10, json!(null), "2026-12-04T00:00:00");
        let b = record(11, json!(null), "2025-01-01T00:00:00");
        assert_eq!(choose(&[a.clone(), b.clone()], "15550001", &ours), Some(11));
        ours.activated_date = Some(chrono::NaiveDate::from_ymd_opt(2026, 12, 4).unwrap());
        assert_eq!(choose(&[a, b.clone()], "15550001", &ours), Some(10));
        assert_eq!(choose(&[b], "15550001", &ours), Some(11));
    }

    /// A server that ignores the page asked for (the same page again, "more follow") leaves the
    /// lookup's outcome unknown, with both calls recorded: not "absent", which would create a
    /// second service.
    #[tokio::test]
    async fn a_collection_that_does_not_end_leaves_the_lookup_unknown() {
        use crate::adapters::RevApi;
        use crate::domain::bulk_change::FailureClass;
        let page = json!({"ok": true, "has_more": true, "record_count": 1, "records": [
            {"service_id": 3, "number": "15550001", "customer_id": 9, "service_type_id": 12}]});
        let app = axum::Router::new().route(
            "/v1/Services",
            axum::routing::get(move || {
                let page = page.clone();
                async move { axum::Json(page) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = super::RevClient::new(
            reqwest::Client::new(),
            crate::config::RevSettings {
                base_url: format!("http://{addr}"),
                username: "u".into(),
                client_code: "c".into(),
                password: "p".to_string().into(),
                subscription_key: "k".to_string().into(),
            },
        );
        let failure = client
            .find_service("15550001", &service())
            .await
            .unwrap_err();
        assert!(
            matches!(
                failure.class,
                FailureClass::Retryable {
                    outcome_unknown: true,
                    ..
                }
            ),
            "{failure:?}"
        );
        assert!(
            failure.reason.contains("brings no new record"),
            "{}",
            failure.reason
        );
        assert_eq!(failure.calls.len(), 2);
        assert!(failure.calls[1].url.ends_with("search.page=2"));
    }
}
