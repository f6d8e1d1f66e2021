//! Typed, layered configuration: defaults, then a TOML file, then `BULKFLOW_*` environment
//! variables. Secrets are wrapped (`secrecy`) so they cannot reach logs or `Debug` output.
//! The annotated example is `bulkflow.example.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::domain::ServiceProviderId;
use crate::workflow::definition::Limits;

/// Why configuration was rejected; messages name the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    /// The HTTP clients cannot verify HTTPS (no trusted CA certificate could be loaded).
    #[error("TLS: {0}")]
    Tls(String),
    /// A `BULKFLOW_*` variable bulkflow does not know: `apply_env` warns and ignores it.
    #[error("{0}: unknown bulkflow setting")]
    UnknownSetting(String),
    #[error("no {system} credentials for service provider {provider}: set [{system}.providers.\"{provider}\"] or [{system}.default] in the config file, or BULKFLOW_{upper}_* variables")]
    MissingCredentials {
        system: &'static str,
        upper: &'static str,
        provider: ServiceProviderId,
    },
}

/// POND credentials of one service provider (`ServiceProviderSetting` row of the original).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PondCredentials {
    /// e.g. `https://host/ds/u/distributorPPUService/v1`
    pub base_url: Option<String>,
    pub distributor_id: Option<String>,
    pub api_key: Option<SecretString>,
    /// `WriteIsEnabled`: false stops bulk changes before any write.
    pub write_enabled: Option<bool>,
}

/// Rev.io credentials of one service provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevCredentials {
    pub base_url: Option<String>,
    pub username: Option<String>,
    pub client_code: Option<String>,
    pub password: Option<SecretString>,
    pub subscription_key: Option<SecretString>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PondSection {
    #[serde(default)]
    pub default: PondCredentials,
    #[serde(default)]
    pub providers: BTreeMap<String, PondCredentials>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevSection {
    #[serde(default)]
    pub default: RevCredentials,
    #[serde(default)]
    pub providers: BTreeMap<String, RevCredentials>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub pond: Option<Limits>,
    pub rev: Option<Limits>,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// May carry a password: wrapped like the other secrets (`expose_secret` to connect).
    #[serde(default = "default_database_url")]
    pub database_url: SecretString,
    #[serde(default = "default_workflow")]
    pub workflow: PathBuf,
    /// Name recorded in `ProcessedBy` and `BulkChangeStarted.worker`.
    #[serde(default = "default_worker_id")]
    pub worker_id: String,
    /// Largest database pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long a worker's hold on a bulk change lasts without renewal; a killed worker's bulk
    /// changes are taken over after this (and the message's visibility timeout).
    #[serde(default = "default_lease_ttl_secs")]
    pub lease_ttl_secs: u64,
    #[serde(default)]
    pub pond: PondSection,
    #[serde(default)]
    pub rev: RevSection,
    /// Overrides the workflow definition's downstream limits for this deployment.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Bounds that keep a bulk change safe against misbehaving carriers and presumed-dead
    /// workers.
    #[serde(default)]
    pub safety: SafetySection,
    /// The portal's own database: bulk changes are read from and results written back to it.
    #[serde(default)]
    pub platform: PlatformSection,
    /// The operator API of `bulkflow serve`.
    #[serde(default)]
    pub api: ApiSection,
    /// `BULKFLOW_*` variables that were not understood (warned about and ignored).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// `[api]`: the operator API (`bulkflow serve`). Every request needs `Authorization: Bearer
/// <token>`; without a token configured, `serve` refuses to start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    pub token: Option<SecretString>,
}

/// `[platform]`: the portal's database (its `DeviceBulkChange`, `M2M_DeviceChange` and
/// `DeviceBulkChangeLog` tables). Without a URL, bulkflow runs only bulk changes submitted to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformSection {
    /// `postgres://…` (may carry a password: wrapped like the other secrets).
    pub database_url: Option<SecretString>,
    /// The schema holding the platform's tables.
    pub schema: String,
    /// Written as `ProcessedBy` on the platform's rows.
    pub processed_by: String,
    /// Where finished device changes are notified (`NotifyStatusUpdateDone`), signed with
    /// `webhook_secret`; none when unset.
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<SecretString>,
}

impl Default for PlatformSection {
    fn default() -> Self {
        Self {
            database_url: None,
            schema: "public".into(),
            processed_by: "bulkflow".into(),
            webhook_url: None,
            webhook_secret: None,
        }
    }
}

impl PlatformSection {
    /// Checks the schema name (it is written into SQL as an identifier) and that a webhook has
    /// an http(s) URL and a secret to sign with.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(url) = &self.webhook_url {
            let invalid = |problem: String| Error::Invalid {
                key: "platform.webhook_url".into(),
                problem,
            };
            match url::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => {
                    return Err(invalid(format!(
                        "{} is not an http(s) URL",
                        crate::store::redact_url(url)
                    )))
                }
            }
            if self.webhook_secret.is_none() {
                return Err(Error::Invalid {
                    key: "platform.webhook_secret".into(),
                    problem: "required with webhook_url (notifications are signed)".into(),
                });
            }
        }
        let ok = self
            .schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && self.schema.len() <= 63
            && self
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Error::Invalid {
                key: "platform.schema".into(),
                problem: format!(
                    "{:?} is not a plain identifier (letters, digits, _; at most 63)",
                    self.schema.chars().take(70).collect::<String>()
                ),
            });
        }
        Ok(())
    }
}

/// `[safety]`: see `bulkflow.example.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SafetySection {
    /// Longest wait a carrier's `Retry-After` / "Try again in N seconds" is obeyed for (the
    /// hint as given is still recorded).
    pub max_retry_after_secs: u64,
    /// A Rev POST leaves within this long of its recorded intent, or not at all.
    pub rev_send_window_ms: u64,
    /// Added to the send window and Rev's timeout before an unresolved intent is looked up (Rev
    /// may still be working on a POST its client gave up on; clocks of workers may differ).
    pub rev_lookup_margin_ms: u64,
    /// On shutdown, how long calls in flight may finish before they are abandoned (their
    /// outcome is then redone safely by the next run).
    pub stop_grace_ms: u64,
}

impl SafetySection {
    /// `rev_send_window_ms` as a time span.
    pub fn rev_send_window(&self) -> chrono::Duration {
        millis(self.rev_send_window_ms)
    }

    /// How long after an unresolved Rev intent its POST must have ended, for a Rev client
    /// timing out after `rev_timeout`: send window + timeout + margin.
    pub fn rev_settle(&self, rev_timeout: std::time::Duration) -> chrono::Duration {
        let timeout = u64::try_from(rev_timeout.as_millis()).unwrap_or(u64::MAX);
        millis(
            self.rev_send_window_ms
                .saturating_add(self.rev_lookup_margin_ms)
                .saturating_add(timeout),
        )
    }
}

/// Milliseconds as a time span, saturating far beyond any sensible setting.
fn millis(ms: u64) -> chrono::Duration {
    chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX / 2).min(i64::MAX / 2))
}

impl Default for SafetySection {
    fn default() -> Self {
        Self {
            max_retry_after_secs: 300,
            rev_send_window_ms: 10_000,
            rev_lookup_margin_ms: 10_000,
            stop_grace_ms: 5_000,
        }
    }
}

fn default_database_url() -> SecretString {
    SecretString::from("sqlite://bulkflow.db")
}

fn default_workflow() -> PathBuf {
    crate::workflow::definition::DEFAULT_PATH.into()
}

fn default_worker_id() -> String {
    format!("bulkflow-{}", std::process::id())
}

fn default_max_connections() -> u32 {
    8
}

fn default_lease_ttl_secs() -> u64 {
    30
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: default_database_url(),
            workflow: default_workflow(),
            worker_id: default_worker_id(),
            max_connections: default_max_connections(),
            lease_ttl_secs: default_lease_ttl_secs(),
            safety: SafetySection::default(),
            platform: PlatformSection::default(),
            api: ApiSection::default(),
            ignored_env: Vec::new(),
            pond: PondSection::default(),
            rev: RevSection::default(),
            limits: LimitsSection::default(),
        }
    }
}

/// Resolved POND settings for one service provider.
#[derive(Debug, Clone)]
pub struct PondSettings {
    pub base_url: String,
    pub distributor_id: String,
    pub api_key: SecretString,
    pub write_enabled: bool,
}

/// Resolved Rev settings for one service provider.
#[derive(Debug, Clone)]
pub struct RevSettings {
    pub base_url: String,
    pub username: String,
    pub client_code: String,
    pub password: SecretString,
    pub subscription_key: SecretString,
}

impl Config {
    /// Reads `path` (when given or when `bulkflow.toml` exists) and applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let path = path.map(Path::to_path_buf).or_else(|| {
            let default = PathBuf::from("bulkflow.toml");
            default.exists().then_some(default)
        });
        let mut config = match path {
            Some(path) => Self::from_file(&path)?,
            None => Self::default(),
        };
        config.apply_env(std::env::vars())?;
        config.platform.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.display().to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Applies `BULKFLOW_*` variables: `BULKFLOW_DATABASE_URL`, `BULKFLOW_WORKFLOW`,
    /// `BULKFLOW_WORKER_ID`, `BULKFLOW_POND_<FIELD>` / `BULKFLOW_REV_<FIELD>` (all providers) and
    /// `BULKFLOW_POND_<ID>_<FIELD>` / `BULKFLOW_REV_<ID>_<FIELD>` (service provider `<ID>`).
    pub fn apply_env(&mut self, vars: impl Iterator<Item = (String, String)>) -> Result<(), Error> {
        for (key, value) in vars {
            let Some(rest) = key.strip_prefix("BULKFLOW_") else {
                continue;
            };
            match rest {
                "DATABASE_URL" => self.database_url = value.into(),
                "WORKFLOW" => self.workflow = value.into(),
                "WORKER_ID" => self.worker_id = value,
                "MAX_CONNECTIONS" => {
                    self.max_connections = value.parse().map_err(|_| Error::Invalid {
                        key: key.clone(),
                        problem: format!("{value:?} is not a whole number"),
                    })?
                }
                "LEASE_TTL_SECS" => {
                    self.lease_ttl_secs =
                        value
                            .parse()
                            .ok()
                            .filter(|&s| s > 0)
                            .ok_or_else(|| Error::Invalid {
                                key: key.clone(),
                                problem: format!(
                                    "{value:?} is not a positive whole number of seconds"
                                ),
                            })?
                }
                "SAFETY_MAX_RETRY_AFTER_SECS" => {
                    self.safety.max_retry_after_secs = whole(&key, &value)?
                }
                "SAFETY_REV_SEND_WINDOW_MS" => {
                    self.safety.rev_send_window_ms = whole(&key, &value)?
                }
                "SAFETY_REV_LOOKUP_MARGIN_MS" => {
                    self.safety.rev_lookup_margin_ms = whole(&key, &value)?
                }
                "SAFETY_STOP_GRACE_MS" => self.safety.stop_grace_ms = whole(&key, &value)?,
                "PLATFORM_DATABASE_URL" => self.platform.database_url = Some(value.into()),
                "PLATFORM_SCHEMA" => self.platform.schema = value,
                "PLATFORM_PROCESSED_BY" => self.platform.processed_by = value,
                "PLATFORM_WEBHOOK_URL" => self.platform.webhook_url = Some(value),
                "PLATFORM_WEBHOOK_SECRET" => self.platform.webhook_secret = Some(value.into()),
                "API_TOKEN" => self.api.token = Some(value.into()),
                // Read by the command line itself, or by the test scripts.
                "LOG"
                | "LOG_FORMAT"
                | "METRICS_LISTEN"
                | "CONFIG"
                | "QUEUE_URL"
                | "DEAD_LETTER_QUEUE_URL"
                | "VENV"
                | "FAILPOINT" => {}
                _ if rest.starts_with("TEST_") => {}
                _ => {
                    if let Some(field) = rest.strip_prefix("POND_") {
                        let (target, field) = split_provider(field);
                        let creds = match target {
                            Some(id) => self.pond.providers.entry(id).or_default(),
                            None => &mut self.pond.default,
                        };
                        let result = set_pond(creds, field, value, &key);
                        self.unless_unknown(result)?;
                    } else if let Some(field) = rest.strip_prefix("REV_") {
                        let (target, field) = split_provider(field);
                        let creds = match target {
                            Some(id) => self.rev.providers.entry(id).or_default(),
                            None => &mut self.rev.default,
                        };
                        let result = set_rev(creds, field, value, &key);
                        self.unless_unknown(result)?;
                    } else {
                        self.unless_unknown(Err(Error::UnknownSetting(key)))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// An unknown `BULKFLOW_*` variable is not fatal (deploy systems set their own): it is logged
    /// as a warning naming it and kept in `ignored_env`.
    fn unless_unknown(&mut self, result: Result<(), Error>) -> Result<(), Error> {
        match result {
            Err(Error::UnknownSetting(key)) => {
                tracing::warn!(variable = %key, "unknown BULKFLOW_ variable ignored");
                self.ignored_env.push(key);
                Ok(())
            }
            other => other,
        }
    }

    pub fn lease_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_ttl_secs.max(1))
    }

    /// POND settings for a service provider: its own entry, filled in from `[pond.default]`.
    pub fn pond(&self, provider: ServiceProviderId) -> Result<PondSettings, Error> {
        let own = self.pond.providers.get(&provider.to_string());
        let d = &self.pond.default;
        let pick = |f: fn(&PondCredentials) -> Option<String>| own.and_then(f).or_else(|| f(d));
        let missing = || Error::MissingCredentials {
            system: "pond",
            upper: "POND",
            provider,
        };
        Ok(PondSettings {
            base_url: pick(|c| c.base_url.clone()).ok_or_else(missing)?,
            distributor_id: pick(|c| c.distributor_id.clone()).ok_or_else(missing)?,
            api_key: own
                .and_then(|c| c.api_key.clone())
                .or_else(|| d.api_key.clone())
                .ok_or_else(missing)?,
            write_enabled: own
                .and_then(|c| c.write_enabled)
                .or(d.write_enabled)
                .unwrap_or(true),
        })
    }

    /// Rev settings for a service provider.
    pub fn rev(&self, provider: ServiceProviderId) -> Result<RevSettings, Error> {
        let own = self.rev.providers.get(&provider.to_string());
        let d = &self.rev.default;
        let pick = |f: fn(&RevCredentials) -> Option<String>| own.and_then(f).or_else(|| f(d));
        let secret =
            |f: fn(&RevCredentials) -> Option<SecretString>| own.and_then(f).or_else(|| f(d));
        let missing = || Error::MissingCredentials {
            system: "rev",
            upper: "REV",
            provider,
        };
        Ok(RevSettings {
            base_url: pick(|c| c.base_url.clone()).ok_or_else(missing)?,
            username: pick(|c| c.username.clone()).ok_or_else(missing)?,
            client_code: pick(|c| c.client_code.clone()).ok_or_else(missing)?,
            password: secret(|c| c.password.clone()).ok_or_else(missing)?,
            subscription_key: secret(|c| c.subscription_key.clone()).ok_or_else(missing)?,
        })
    }
}

/// `12_API_KEY` → (Some("12"), "API_KEY"); `API_KEY` → (None, "API_KEY").
fn split_provider(field: &str) -> (Option<String>, &str) {
    match field.split_once('_') {
        Some((id, rest)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
            (Some(id.to_string()), rest)
        }
        _ => (None, field),
    }
}

fn set_pond(c: &mut PondCredentials, field: &str, value: String, key: &str) -> Result<(), Error> {
    match field {
        "BASE_URL" => c.base_url = Some(value),
        "DISTRIBUTOR_ID" => c.distributor_id = Some(value),
        "API_KEY" => c.api_key = Some(SecretString::from(value)),
        "WRITE_ENABLED" => {
            c.write_enabled = Some(parse_bool(&value).ok_or_else(|| Error::Invalid {
                key: key.into(),
                problem: format!("{value:?} is not true or false"),
            })?)
        }
        _ => return Err(unknown(key)),
    }
    Ok(())
}

fn set_rev(c: &mut RevCredentials, field: &str, value: String, key: &str) -> Result<(), Error> {
    match field {
        "BASE_URL" => c.base_url = Some(value),
        "USERNAME" => c.username = Some(value),
        "CLIENT_CODE" => c.client_code = Some(value),
        "PASSWORD" => c.password = Some(SecretString::from(value)),
        "SUBSCRIPTION_KEY" => c.subscription_key = Some(SecretString::from(value)),
        _ => return Err(unknown(key)),
    }
    Ok(())
}

fn whole(key: &str, value: &str) -> Result<u64, Error> {
    value.trim().parse().map_err(|_| Error::Invalid {
        key: key.to_string(),
        problem: format!("{value:?} is not a whole number"),
    })
}

fn unknown(key: &str) -> Error {
    Error::UnknownSetting(key.into())
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn env_overrides_defaults_and_provider_entries_override_default_credentials() {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("BULKFLOW_DATABASE_URL", "postgres://x"),
            ("BULKFLOW_POND_BASE_URL", "http://pond"),
            ("BULKFLOW_POND_DISTRIBUTOR_ID", "D1"),
            ("BULKFLOW_POND_API_KEY", "k-default"),
            ("BULKFLOW_POND_12_API_KEY", "k-twelve"),
            ("BULKFLOW_POND_12_WRITE_ENABLED", "false"),
        ]))
        .unwrap();
        assert_eq!(c.database_url.expose_secret(), "postgres://x");
        let p12 = c.pond(ServiceProviderId::new(12).unwrap()).unwrap();
        assert_eq!(p12.api_key.expose_secret(), "k-twelve");
        assert!(!p12.write_enabled);
        assert_eq!(p12.distributor_id, "D1");
        let p3 = c.pond(ServiceProviderId::new(3).unwrap()).unwrap();
        assert_eq!(p3.api_key.expose_secret(), "k-default");
        assert!(p3.write_enabled);
    }

    #[test]
    fn a_bad_variable_is_named() {
        let mut c = Config::default();
        let err = c
            .apply_env(env(&[("BULKFLOW_POND_WRITE_ENABLED", "maybe")]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { key, .. } if key == "BULKFLOW_POND_WRITE_ENABLED"),
            "{err}"
        );
        // Unknown: ignored with a warning, kept for whoever wants to report it.
        c.apply_env(env(&[
            ("BULKFLOW_DATABSE_URL", "x"),
            ("BULKFLOW_POND_APIKEY", "y"),
        ]))
        .unwrap();
        assert_eq!(
            c.ignored_env,
            vec!["BULKFLOW_DATABSE_URL", "BULKFLOW_POND_APIKEY"]
        );
    }

    #[test]
    fn missing_credentials_name_the_provider() {
        let err = Config::default()
            .rev(ServiceProviderId::new(9).unwrap())
            .unwrap_err();
        assert!(
            matches!(&err, Error::MissingCredentials { system: "rev", provider, .. } if provider.get() == 9),
            "{err}"
        );
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("BULKFLOW_POND_API_KEY", "super-secret-key"),
            ("BULKFLOW_REV_PASSWORD", "hunter2-password"),
        ]))
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("super-secret-key") && !debug.contains("hunter2-password"));
    }

    #[test]
    fn the_platform_is_configured_from_the_environment_and_its_schema_checked() {
        let mut c = Config::default();
        assert!(c.platform.database_url.is_none());
        c.apply_env(env(&[
            (
                "BULKFLOW_PLATFORM_DATABASE_URL",
                "postgres://portal:platform-pw@db/portal",
            ),
            ("BULKFLOW_PLATFORM_SCHEMA", "portal_data"),
            ("BULKFLOW_PLATFORM_PROCESSED_BY", "bulkflow-eu"),
        ]))
        .unwrap();
        assert_eq!(
            (c.platform.schema.as_str(), c.platform.processed_by.as_str()),
            ("portal_data", "bulkflow-eu")
        );
        assert!(c.platform.validate().is_ok());
        assert!(!format!("{c:?}").contains("platform-pw"));
        for bad in ["", "1abc", "a\"; DROP TABLE x; --", "pub lic"] {
            c.platform.schema = bad.into();
            assert!(
                matches!(c.platform.validate(), Err(Error::Invalid { key, .. }) if key == "platform.schema"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bulkflow.example.toml");
        let c = Config::from_file(&path).unwrap();
        assert!(c.pond(ServiceProviderId::new(12).unwrap()).is_ok());
        assert!(c.rev(ServiceProviderId::new(12).unwrap()).is_ok());
    }
}
