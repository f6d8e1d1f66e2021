//! The record of one call to an external API, as events keep it for the auditor.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One HTTP exchange. Secrets never enter it: headers are not kept, URLs carry no credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiCall {
    pub method: String,
    /// Full URL without credentials.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<Value>,
    /// HTTP status, absent when no response arrived (timeout, connection error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    /// Transport error when no response arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wait the server asked for (`Retry-After`, Rev's "Try again in N seconds").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// `RequestId` header sent to POND (correlation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
}

impl ApiCall {
    /// One line for logs and the `DeviceBulkChangeLog.RequestText`.
    pub fn request_text(&self) -> String {
        match &self.request_body {
            Some(body) => format!("{} {} {}", self.method, self.url, body),
            None => format!("{} {}", self.method, self.url),
        }
    }

    /// One line for `DeviceBulkChangeLog.ResponseText`.
    pub fn response_text(&self) -> String {
        match (self.status, &self.response_body, &self.error) {
            (Some(status), Some(body), _) if !body.is_empty() => format!("{status} {body}"),
            (Some(status), _, _) => status.to_string(),
            (None, _, Some(error)) => error.clone(),
            (None, _, None) => String::new(),
        }
    }
}

/// The error code an auditor groups failures by: the carrier's `code` from the last failed
/// response body (POND's `{status, code, message, …}`), else `HTTP_<status>`, else
/// `NO_RESPONSE` when the last call got no answer; `None` when the last call succeeded.
pub fn error_code(calls: &[ApiCall]) -> Option<String> {
    let last = calls.last()?;
    match last.status {
        Some(status) if (200..300).contains(&status) => None,
        Some(status) => {
            let code = last
                .response_body
                .as_deref()
                .and_then(|b| serde_json::from_str::<Value>(b).ok())
                .and_then(|v| v.get("code").and_then(Value::as_str).map(str::to_string))
                .filter(|c| !c.is_empty());
            Some(code.unwrap_or_else(|| format!("HTTP_{status}")))
        }
        None => Some("NO_RESPONSE".into()),
    }
}
