//! The bulk change request: what an operator submits (`bulkflow submit FILE`, or a JSON SQS
//! message). The format is documented in `docs/request-format.md`.

use std::collections::HashSet;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ids::{BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId};
use super::status::TargetStatus;

/// Most devices one request may carry.
pub const MAX_DEVICES: usize = 1_000_000;
/// Longest free-text field (`requested_by`, Rev `customer_id`).
pub const MAX_TEXT: usize = 200;

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("request is not valid JSON for a bulk change: {0}")]
    Malformed(String),
    #[error("devices: the request has no devices")]
    NoDevices,
    #[error("devices: {count} devices is more than the {max} allowed in one bulk change")]
    TooManyDevices { count: usize, max: usize },
    #[error("devices[{index}].device_change_id: {id} appears more than once")]
    DuplicateDeviceChangeId { index: usize, id: DeviceChangeId },
    #[error("devices[{index}].iccid: {iccid} appears more than once")]
    DuplicateIccid { index: usize, iccid: Iccid },
    #[error("devices[{index}].rev_service: a Rev service can only be created with target_status Active, not {target}")]
    RevServiceNeedsActive { index: usize, target: TargetStatus },
    #[error("{field}: longer than {max} characters")]
    TooLong { field: String, max: usize },
    #[error("{field}: must not be empty")]
    Empty { field: String },
    #[error("change_request_type: only StatusUpdate is supported, got {0:?}")]
    UnsupportedChangeType(String),
    #[error("integration: only Pond is supported, got {0:?}")]
    UnsupportedIntegration(String),
}

/// A bulk change as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkChangeRequest {
    pub bulk_change_id: BulkChangeId,
    pub tenant_id: TenantId,
    pub service_provider_id: ServiceProviderId,
    /// `StatusUpdate` (the only type supported so far).
    #[serde(default = "default_change_type")]
    pub change_request_type: String,
    /// `Pond` (the only integration supported so far).
    #[serde(default = "default_integration")]
    pub integration: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    pub devices: Vec<DeviceRequest>,
}

fn default_change_type() -> String {
    "StatusUpdate".into()
}

fn default_integration() -> String {
    "Pond".into()
}

/// One device of a bulk change (`M2M_DeviceChange` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRequest {
    pub device_change_id: DeviceChangeId,
    pub iccid: Iccid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Msisdn>,
    pub target_status: TargetStatus,
    /// Write even when the SIM already is at the target (`IsIgnoreCurrentStatus`).
    #[serde(default)]
    pub is_ignore_current_status: bool,
    /// Create this Rev.io service after the carrier change succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev_service: Option<RevServiceRequest>,
}

/// The Rev.io service to create (`POST /v1/Services`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevServiceRequest {
    pub customer_id: String,
    pub provider_id: i64,
    pub service_type_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_plan_group_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_date: Option<NaiveDate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_date: Option<NaiveDate>,
}

impl BulkChangeRequest {
    /// Parses and validates JSON: the one entry point for requests from files and queues.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let request: Self =
            serde_json::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
        request.validate()?;
        Ok(request)
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), Error> {
        if !self
            .change_request_type
            .eq_ignore_ascii_case("StatusUpdate")
        {
            return Err(Error::UnsupportedChangeType(short(
                &self.change_request_type,
            )));
        }
        if !self.integration.eq_ignore_ascii_case("Pond") {
            return Err(Error::UnsupportedIntegration(short(&self.integration)));
        }
        if let Some(by) = &self.requested_by {
            check_text("requested_by", by)?;
        }
        if self.devices.is_empty() {
            return Err(Error::NoDevices);
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(Error::TooManyDevices {
                count: self.devices.len(),
                max: MAX_DEVICES,
            });
        }
        let mut ids = HashSet::with_capacity(self.devices.len());
        let mut iccids = HashSet::with_capacity(self.devices.len());
        for (index, device) in self.devices.iter().enumerate() {
            if !ids.insert(device.device_change_id) {
                return Err(Error::DuplicateDeviceChangeId {
                    index,
                    id: device.device_change_id,
                });
            }
            if !iccids.insert(&device.iccid) {
                return Err(Error::DuplicateIccid {
                    index,
                    iccid: device.iccid.clone(),
                });
            }
            if let Some(rev) = &device.rev_service {
                if device.target_status != TargetStatus::Active {
                    return Err(Error::RevServiceNeedsActive {
                        index,
                        target: device.target_status,
                    });
                }
                check_text(
                    &format!("devices[{index}].rev_service.customer_id"),
                    &rev.customer_id,
                )?;
            }
        }
        Ok(())
    }

    /// SHA-256 over the canonical JSON: tells a repeated submission from a conflicting one.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(json))
    }
}

fn check_text(field: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::Empty {
            field: field.into(),
        });
    }
    if value.chars().count() > MAX_TEXT {
        return Err(Error::TooLong {
            field: field.into(),
            max: MAX_TEXT,
        });
    }
    Ok(())
}

fn short(value: &str) -> String {
    value.chars().take(40).collect()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(devices: &str) -> String {
        format!(
            r#"{{"bulk_change_id": 5, "tenant_id": 1, "service_provider_id": 2, "devices": [{devices}]}}"#
        )
    }

    const DEVICE: &str =
        r#"{"device_change_id": 1, "iccid": "8901260882310000001", "target_status": "Active"}"#;

    #[test]
    fn parses_a_minimal_request_with_defaults() {
        let request = BulkChangeRequest::from_json(json(DEVICE).as_bytes()).unwrap();
        assert_eq!(request.change_request_type, "StatusUpdate");
        assert_eq!(request.integration, "Pond");
        assert!(!request.devices[0].is_ignore_current_status);
    }

    #[test]
    fn rejects_empty_device_list() {
        assert_eq!(
            BulkChangeRequest::from_json(json("").as_bytes()),
            Err(Error::NoDevices)
        );
    }

    #[test]
    fn rejects_duplicate_device_ids() {
        let other = DEVICE.replace("0000001", "0000002");
        let err = BulkChangeRequest::from_json(json(&format!("{DEVICE},{other}")).as_bytes());
        assert!(matches!(
            err,
            Err(Error::DuplicateDeviceChangeId { index: 1, .. })
        ));
    }

    #[test]
    fn rejects_duplicate_iccids() {
        let other = DEVICE.replace("\"device_change_id\": 1", "\"device_change_id\": 2");
        let err = BulkChangeRequest::from_json(json(&format!("{DEVICE},{other}")).as_bytes());
        assert!(matches!(err, Err(Error::DuplicateIccid { index: 1, .. })));
    }

    #[test]
    fn malformed_input_names_the_problem() {
        let bad = DEVICE.replace("8901260882310000001", "12ab");
        let err = BulkChangeRequest::from_json(json(&bad).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("ICCID"), "{err}");
        let err = BulkChangeRequest::from_json(b"\xff\xfe").unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
        let unknown = DEVICE.replace("Active", "Sleeping");
        let err = BulkChangeRequest::from_json(json(&unknown).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("Sleeping"), "{err}");
    }

    #[test]
    fn rev_service_requires_active_target() {
        let dev = r#"{"device_change_id": 1, "iccid": "8901260882310000001", "target_status": "Suspended",
            "rev_service": {"customer_id": "C1", "provider_id": 1, "service_type_id": 2}}"#;
        let err = BulkChangeRequest::from_json(json(dev).as_bytes());
        assert!(matches!(
            err,
            Err(Error::RevServiceNeedsActive { index: 0, .. })
        ));
    }

    #[test]
    fn fingerprint_is_stable_and_content_sensitive() {
        let a = BulkChangeRequest::from_json(json(DEVICE).as_bytes()).unwrap();
        let mut b = a.clone();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.requested_by = Some("x".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}

#[cfg(test)]
mod example {
    #[test]
    fn the_documented_example_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/bulk-change.json");
        let request = super::BulkChangeRequest::from_json(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(request.devices.len(), 4);
    }
}
