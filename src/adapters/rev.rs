//! Rev.io client: Basic auth `user@clientcode:password` plus `Ocp-Apim-Subscription-Key`,
//! snake_case bodies. `POST /v1/Services` is not idempotent: callers record an intent first and
//! look the service up (`GET /v1/Services?search.number=…`) when an earlier outcome is unknown.

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
}

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

    /// `GET /v1/Services?search.number=…`: the id of an existing service for `number`.
    async fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> Result<(Option<i64>, ApiCall), Failure> {
        let (found, call) = self
            .search(
                "rev.find",
                "Rev look up service",
                "Services",
                "search.number",
                number,
            )
            .await?;
        let id = found
            .records
            .iter()
            .filter(|r| is_match(r, number, service))
            .find_map(|r| r.get("service_id").and_then(Value::as_i64));
        Ok((id, call))
    }

    async fn create_product(
        &self,
        service_id: i64,
        product_id: i64,
        service: &RevServiceRequest,
    ) -> Result<ApiCall, Failure> {
        self.add_product(service_id, product_id, service).await
    }

    async fn find_products(&self, service_id: i64) -> Result<(Vec<i64>, ApiCall), Failure> {
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

    /// `GET /v1/{resource}?{key}={value}`: the records found. A failure leaves the outcome of
    /// what was looked for unknown (it is looked up again).
    async fn search(
        &self,
        point: &str,
        what: &str,
        resource: &str,
        key: &str,
        value: &str,
    ) -> Result<(Found, ApiCall), Failure> {
        let base = self.url(resource);
        let url = format!("{base}?{key}={value}");
        let exchange = send(
            point,
            self.request(&Method::GET, &base).query(&[(key, value)]),
            &Method::GET,
            &url,
            None,
            None,
        )
        .await;
        let unknown = FailureClass::Retryable {
            retry_after_secs: None,
            outcome_unknown: true,
            throttled: false,
            not_sent: false,
        };
        if !exchange.is_success() {
            let mut failure = exchange.failure(what, true, vec![]);
            if let FailureClass::Retryable {
                outcome_unknown, ..
            } = &mut failure.class
            {
                *outcome_unknown = true;
            }
            return Err(failure);
        }
        match serde_json::from_str::<Found>(&exchange.body) {
            Ok(found) => Ok((found, exchange.call)),
            Err(e) => Err(Failure {
                class: unknown,
                reason: format!("{what}: unexpected body: {e}"),
                calls: vec![exchange.call],
            }),
        }
    }

    /// `GET /v1/ServiceProduct?search.service_id=…`: the product ids the service has.
    pub async fn products_of(&self, service_id: i64) -> Result<(Vec<i64>, ApiCall), Failure> {
        let (found, call) = self
            .search(
                "rev.product_find",
                "Rev look up products",
                "ServiceProduct",
                "search.service_id",
                &service_id.to_string(),
            )
            .await?;
        let id = |r: &Value, key: &str| match r.get(key) {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let products = found
            .records
            .iter()
            .filter(|r| id(r, "service_id") == Some(service_id))
            .filter_map(|r| id(r, "product_id"))
            .collect();
        Ok((products, call))
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::is_match;
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
}
