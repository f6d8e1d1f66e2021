//! Workflow definitions (`workflows/*.toml`): steps, retry policies, per-downstream limits and
//! the tolerated-failure threshold, loaded and validated at start.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::request::hex;
use crate::domain::{Policy, RetryPolicy, WorkflowRef};

/// Why a definition was rejected. Messages name the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read workflow definition {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("workflow definition {path}: {message}")]
    Parse { path: String, message: String },
    #[error("workflow definition {path}: {field}: {problem}")]
    Invalid {
        path: String,
        field: String,
        problem: String,
    },
}

/// Where the shipped definition lives, relative to the working directory.
pub const DEFAULT_PATH: &str = "workflows/pond-status-update.toml";
/// The shipped definition, built into the binary.
const BUILTIN: &str = include_str!("../../workflows/pond-status-update.toml");

pub use crate::domain::Downstream;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub downstream: Downstream,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Steps {
    pub device_status: StepDef,
    pub service_status: StepDef,
    pub rev_service: StepDef,
}

/// Rate and concurrency limits of one downstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub rate_per_second: f64,
    pub burst: u32,
    pub max_concurrency: usize,
    pub timeout_ms: u64,
    /// When an outage holds the downstream, and how it is probed.
    #[serde(default)]
    pub breaker: Breaker,
    /// The account's calls a day (a UTC calendar day on the limits' clock), shared by every
    /// worker: once they are used, the account's next calls wait for the next day instead of
    /// running into the carrier's quota (Rev: 150,000). None: no daily budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls_per_day: Option<u64>,
}

/// The circuit breaker of one downstream: after `failures` failures in a row that look like an
/// outage (5xx, timeouts, refused connections; not 429s, not a device's own 4xx), the bulk
/// change holds the downstream (recorded) and sends one probe call after `probe_ms`, doubling up
/// to `max_probe_ms` while probes fail; the first probe that gets an answer resumes it. Failures
/// while it is held do not use up devices' attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Breaker {
    pub failures: u32,
    pub probe_ms: u64,
    pub max_probe_ms: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            failures: 10,
            probe_ms: 5_000,
            max_probe_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Downstreams {
    pub pond: Limits,
    pub rev: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    pub version: u32,
    pub change_request_type: String,
    pub integration: String,
    pub tolerated_failure_percent: f64,
    pub steps: Steps,
    pub downstreams: Downstreams,
}

/// A validated definition with the hash of its source.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub definition: Definition,
    pub hash: String,
}

impl Workflow {
    /// Loads `path`; when that is the default path and no such file exists (the binary runs
    /// outside the repository), uses the definition built into the binary.
    pub fn load_or_builtin(path: &Path) -> Result<Self, Error> {
        if path == Path::new(DEFAULT_PATH) && !path.exists() {
            return Self::parse(&format!("built-in {DEFAULT_PATH}"), BUILTIN.as_bytes());
        }
        Self::load(path)
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &bytes)
    }

    /// Parses and validates definition text; `origin` names it in errors.
    pub fn parse(origin: &str, bytes: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Parse {
            path: origin.into(),
            message: format!("not UTF-8: {e}"),
        })?;
        let definition: Definition = toml::from_str(text).map_err(|e| Error::Parse {
            path: origin.into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        definition
            .validate()
            .map_err(|(field, problem)| Error::Invalid {
                path: origin.into(),
                field,
                problem,
            })?;
        Ok(Self {
            definition,
            hash: hex(&Sha256::digest(bytes)),
        })
    }

    /// What a bulk change records when it is accepted.
    pub fn reference(&self) -> WorkflowRef {
        let d = &self.definition;
        WorkflowRef {
            name: d.name.clone(),
            version: d.version,
            hash: self.hash.clone(),
            policy: Policy {
                device_status: d.steps.device_status.retry.clone(),
                service_status: d.steps.service_status.retry.clone(),
                rev_service: d.steps.rev_service.retry.clone(),
                tolerated_failure_percent: d.tolerated_failure_percent,
            },
        }
    }

    pub fn limits(&self, downstream: Downstream) -> &Limits {
        match downstream {
            Downstream::Pond => &self.definition.downstreams.pond,
            Downstream::Rev => &self.definition.downstreams.rev,
        }
    }
}

type Invalid = (String, String);

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
    (field.into(), problem.into())
}

impl Definition {
    fn validate(&self) -> Result<(), Invalid> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.version == 0 {
            return Err(invalid("version", "must be at least 1"));
        }
        if !self
            .change_request_type
            .eq_ignore_ascii_case("StatusUpdate")
        {
            return Err(invalid(
                "change_request_type",
                format!(
                    "{:?} is not supported (StatusUpdate)",
                    self.change_request_type
                ),
            ));
        }
        if !self.integration.eq_ignore_ascii_case("Pond") {
            return Err(invalid(
                "integration",
                format!("{:?} is not supported (Pond)", self.integration),
            ));
        }
        if !(0.0..=100.0).contains(&self.tolerated_failure_percent) {
            return Err(invalid(
                "tolerated_failure_percent",
                "must be between 0 and 100",
            ));
        }
        for (name, step, expected) in [
            ("device_status", &self.steps.device_status, Downstream::Pond),
            (
                "service_status",
                &self.steps.service_status,
                Downstream::Pond,
            ),
            ("rev_service", &self.steps.rev_service, Downstream::Rev),
        ] {
            if step.downstream != expected {
                return Err(invalid(
                    format!("steps.{name}.downstream"),
                    format!("this step calls {expected:?}"),
                ));
            }
            validate_retry(&format!("steps.{name}.retry"), &step.retry)?;
        }
        for (name, limits) in [
            ("pond", &self.downstreams.pond),
            ("rev", &self.downstreams.rev),
        ] {
            limits.validate(&format!("downstreams.{name}"))?;
        }
        Ok(())
    }
}

impl Limits {
    pub(crate) fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if !(self.rate_per_second > 0.0 && self.rate_per_second.is_finite()) {
            return Err(invalid(
                format!("{prefix}.rate_per_second"),
                "must be a positive number",
            ));
        }
        if self.burst == 0 {
            return Err(invalid(format!("{prefix}.burst"), "must be at least 1"));
        }
        if self.max_concurrency == 0 {
            return Err(invalid(
                format!("{prefix}.max_concurrency"),
                "must be at least 1",
            ));
        }
        if self.timeout_ms == 0 {
            return Err(invalid(
                format!("{prefix}.timeout_ms"),
                "must be at least 1",
            ));
        }
        if self.max_calls_per_day == Some(0) {
            return Err(invalid(
                format!("{prefix}.max_calls_per_day"),
                "must be at least 1 (leave it out for no daily budget)",
            ));
        }
        if self.breaker.failures == 0 {
            return Err(invalid(
                format!("{prefix}.breaker.failures"),
                "must be at least 1",
            ));
        }
        if self.breaker.probe_ms == 0 || self.breaker.max_probe_ms < self.breaker.probe_ms {
            return Err(invalid(
                format!("{prefix}.breaker"),
                "probe_ms must be at least 1 and max_probe_ms at least probe_ms",
            ));
        }
        Ok(())
    }
}

fn validate_retry(prefix: &str, retry: &RetryPolicy) -> Result<(), Invalid> {
    if retry.max_attempts == 0 || retry.max_attempts > 100 {
        return Err(invalid(
            format!("{prefix}.max_attempts"),
            "must be between 1 and 100",
        ));
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        return Err(invalid(
            format!("{prefix}.multiplier"),
            "must be at least 1.0",
        ));
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        return Err(invalid(
            format!("{prefix}.jitter"),
            "must be between 0 and 1",
        ));
    }
    if retry.max_delay_ms < retry.initial_delay_ms {
        return Err(invalid(
            format!("{prefix}.max_delay_ms"),
            "must not be less than initial_delay_ms",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/pond-status-update.toml"),
        )
        .unwrap()
    }

    #[test]
    fn the_shipped_definition_is_valid() {
        let wf = Workflow::parse("shipped", shipped().as_bytes()).unwrap();
        assert_eq!(wf.definition.name, "pond-status-update");
        assert_eq!(wf.hash.len(), 64);
        assert_eq!(wf.reference().policy.rev_service.max_attempts, 4);
    }

    #[test]
    fn an_invalid_value_is_rejected_naming_the_field() {
        let text = shipped().replace("max_attempts = 4", "max_attempts = 0");
        let err = Workflow::parse("wf.toml", text.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { field, .. } if field == "steps.rev_service.retry.max_attempts"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_unknown_key_is_rejected_naming_it() {
        let text = shipped().replace("tolerated_failure_percent = 5.0", "");
        let err = Workflow::parse("wf.toml", text.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, Error::Parse { message, .. } if message.contains("tolerated_failure_percent")),
            "{err}"
        );
        let text = shipped().replace("burst = 8", "burst = 8\nburts = 9");
        let err = Workflow::parse("wf.toml", text.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, Error::Parse { message, .. } if message.contains("burts")),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_downstream_is_rejected() {
        let text = shipped().replacen("downstream = \"rev\"", "downstream = \"pond\"", 1);
        let err = Workflow::parse("wf.toml", text.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { field, .. } if field == "steps.rev_service.downstream"),
            "{err}"
        );
    }

    #[test]
    fn the_builtin_copy_is_the_shipped_file() {
        let wf = Workflow::parse("shipped", shipped().as_bytes()).unwrap();
        let builtin = Workflow::parse("builtin", BUILTIN.as_bytes()).unwrap();
        assert_eq!(wf.hash, builtin.hash);
    }

    #[test]
    fn hash_changes_with_the_file() {
        let a = Workflow::parse("a", shipped().as_bytes()).unwrap();
        let b = Workflow::parse("b", shipped().replace("5.0", "6.0").as_bytes()).unwrap();
        assert_ne!(a.hash, b.hash);
    }
}
