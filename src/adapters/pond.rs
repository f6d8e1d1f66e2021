//! POND IoT (Telna `distributorPPUService` v1) client: static `x-api-key`, JSON camelCase,
//! `{base}/{DistributorId}/sim/{ICCID}/…`.

use reqwest::Method;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;

use super::http::{send, Failure};
use crate::config::PondSettings;
use crate::domain::bulk_change::FailureClass;
use crate::domain::{ApiCall, Iccid, ServiceFlag, SimStatus};

/// One service provider's POND account.
#[derive(Clone)]
pub struct PondClient {
    http: reqwest::Client,
    settings: PondSettings,
}

impl std::fmt::Debug for PondClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PondClient")
            .field("base_url", &self.settings.base_url)
            .field("distributor_id", &self.settings.distributor_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusBody {
    status_of_sim: String,
    #[serde(default)]
    status: String,
    sim_data_service_status: ServiceFlag,
    sim_voice_service_status: ServiceFlag,
    sim_sms_service_status: ServiceFlag,
}

impl PondClient {
    pub fn new(http: reqwest::Client, settings: PondSettings) -> Self {
        Self { http, settings }
    }

    pub fn write_enabled(&self) -> bool {
        self.settings.write_enabled
    }

    fn url(&self, iccid: &Iccid, tail: &str) -> String {
        format!(
            "{}/{}/sim/{}/{}",
            self.settings.base_url.trim_end_matches('/'),
            self.settings.distributor_id,
            iccid,
            tail
        )
    }

    fn request(&self, method: &Method, url: &str, request_id: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method.clone(), url)
            .header("x-api-key", self.settings.api_key.expose_secret())
            .header("RequestId", request_id)
            .header("Accept", "application/json")
    }
}

impl super::PondApi for PondClient {
    /// `GET …/sim/{ICCID}/status`.
    async fn get_status(
        &self,
        iccid: &Iccid,
        request_id: String,
    ) -> Result<(SimStatus, ApiCall), Failure> {
        let url = self.url(iccid, "status");
        let exchange = send(
            "pond.get_status",
            self.request(&Method::GET, &url, &request_id),
            &Method::GET,
            &url,
            None,
            Some(request_id),
        )
        .await;
        if exchange.status == Some(reqwest::StatusCode::NOT_FOUND) {
            let mut failure = exchange.failure("POND get SIM status", true, vec![]);
            failure.reason = format!("ICCID {iccid} is unknown to POND: {}", failure.reason);
            return Err(failure);
        }
        if !exchange.is_success() {
            return Err(exchange.failure("POND get SIM status", true, vec![]));
        }
        match serde_json::from_str::<StatusBody>(&exchange.body) {
            Ok(b) => Ok((
                SimStatus {
                    status_of_sim: b.status_of_sim,
                    status: b.status,
                    data: b.sim_data_service_status,
                    voice: b.sim_voice_service_status,
                    sms: b.sim_sms_service_status,
                },
                exchange.call,
            )),
            Err(e) => Err(Failure {
                class: FailureClass::Retryable {
                    retry_after_secs: None,
                    outcome_unknown: false,
                    throttled: false,
                    not_sent: false,
                },
                reason: format!("POND get SIM status: unexpected response body: {e}"),
                calls: vec![exchange.call],
            }),
        }
    }

    /// `POST …/sim/{ICCID}/status` with all three flags; 204 = success. Idempotent.
    async fn set_service_status(
        &self,
        iccid: &Iccid,
        flag: ServiceFlag,
        request_id: String,
    ) -> Result<ApiCall, Failure> {
        let url = self.url(iccid, "status");
        let body = json!({
            "simDataServiceStatus": flag.as_str(),
            "simVoiceServiceStatus": flag.as_str(),
            "simSmsServiceStatus": flag.as_str(),
        });
        let exchange = send(
            "pond.set_status",
            self.request(&Method::POST, &url, &request_id).json(&body),
            &Method::POST,
            &url,
            Some(&body),
            Some(request_id),
        )
        .await;
        if exchange.is_success() {
            Ok(exchange.call)
        } else {
            Err(exchange.failure("POND set service status", true, vec![]))
        }
    }

    /// `DELETE …/sim/{ICCID}/purge`: terminates the SIM.
    async fn purge(
        &self,
        iccid: &Iccid,
        request_id: String,
        earlier: Vec<ApiCall>,
    ) -> Result<Vec<ApiCall>, Failure> {
        let url = self.url(iccid, "purge");
        let exchange = send(
            "pond.purge",
            self.request(&Method::DELETE, &url, &request_id),
            &Method::DELETE,
            &url,
            None,
            Some(request_id),
        )
        .await;
        if exchange.is_success() {
            let mut calls = earlier;
            calls.push(exchange.call);
            Ok(calls)
        } else {
            Err(exchange.failure("POND purge SIM", true, earlier))
        }
    }
}
