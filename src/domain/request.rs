//! The bulk change request: what an operator submits (`bulkflow submit FILE`, or a JSON SQS
//! message). The format is documented in `docs/request-format.md`.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ids::{BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId};
use super::scan::{stream, Checker, Hashing, Pass};
use super::status::TargetStatus;

/// Most devices one request may carry.
pub const MAX_DEVICES: usize = 1_000_000;
/// Longest free-text field (`requested_by`, Rev `customer_id`).
pub const MAX_TEXT: usize = 200;

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("request is not a valid bulk change: {0}")]
    Malformed(String),
    #[error("devices: the request has no devices")]
    NoDevices,
    #[error("devices: {count} devices is more than the {max} allowed in one bulk change")]
    TooManyDevices { count: usize, max: usize },
    #[error("devices[{index}].device_change_id: {id} appears more than once")]
    DuplicateDeviceChangeId { index: usize, id: DeviceChangeId },
    #[error("devices[{index}].iccid: {iccid} appears more than once")]
    DuplicateIccid { index: usize, iccid: Iccid },
    #[error("devices[{index}].msisdn: MSISDN {msisdn} appears twice in the request (a Rev service is filed under it, so it must be unique)")]
    DuplicateMsisdn { index: usize, msisdn: Msisdn },
    #[error("devices[{index}].rev_service: a Rev service can only be created with target_status Active, not {target}")]
    RevServiceNeedsActive { index: usize, target: TargetStatus },
    #[error("devices[{index}].rev_service.customer_id: {value:?} is not a whole number (Rev takes customer_id as an integer)")]
    CustomerIdNotNumeric { index: usize, value: String },
    #[error("devices[{index}].rev_service.product_ids: a service gets a package_id or products, not both")]
    ProductsWithPackage { index: usize },
    #[error(
        "devices[{index}].rev_service.product_ids: {id} is not a positive id, or appears twice"
    )]
    BadProductId { index: usize, id: i64 },
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
    /// Where the request came from (a platform bulk change has its results written back).
    #[serde(default, skip_serializing_if = "Origin::is_submitted")]
    pub origin: Origin,
    pub devices: Vec<DeviceRequest>,
}

/// Where a bulk change request came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `bulkflow submit` or a JSON message: the request is all there is.
    #[default]
    Submitted,
    /// Loaded from the platform's tables by its id: outcomes are written back there.
    Platform {
        /// Rows the portal had already finished (its own validation errors), left alone.
        skipped: u64,
    },
}

impl Origin {
    pub fn is_submitted(&self) -> bool {
        *self == Self::Submitted
    }
}

pub(super) fn default_change_type() -> String {
    "StatusUpdate".into()
}

pub(super) fn default_integration() -> String {
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
    /// The device's status in the platform's inventory after the change (`PostUpdateStatusId`):
    /// recorded with the request; bulkflow does not write the platform's inventory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_update_status_id: Option<i64>,
    /// Create this Rev.io service after the carrier change succeeds. Shared: the devices of a
    /// bulk change mostly create the same service, and its state keeps one copy of it for all
    /// of them (a million devices' copies were a quarter of a worker's memory). Same JSON as
    /// the service itself.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "shared")]
    pub rev_service: Option<Arc<RevServiceRequest>>,
}

/// `Option<Arc<RevServiceRequest>>` as the plain service in JSON.
mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RevServiceRequest;

    pub fn serialize<S: Serializer>(
        value: &Option<Arc<RevServiceRequest>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.as_deref().serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Arc<RevServiceRequest>>, D::Error> {
        Ok(Option::<RevServiceRequest>::deserialize(deserializer)?.map(Arc::new))
    }
}

/// The Rev.io service to create (`POST /v1/Services`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// Rev products to add to the service after it is created (`POST /v1/ServiceProduct`
    /// each), when there is no `package_id` (as the original: `RevProductIdList`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub product_ids: Vec<i64>,
}

impl BulkChangeRequest {
    /// Parses and validates JSON: the one entry point for requests held in memory (a big one
    /// is read as a stream instead: [`scan`](super::scan)).
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::Malformed(format!("not UTF-8 text (byte {})", e.valid_up_to())))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let mut devices = Vec::new();
        let mut keep = |_: usize, device: DeviceRequest| {
            devices.push(device);
            true
        };
        let Pass::Read(streamed) = stream(&mut de, &mut keep)? else {
            return Err(Error::Malformed(
                "the request could not be read to its end".into(),
            ));
        };
        let request = Self {
            devices,
            ..streamed.head
        };
        request.validate()?;
        Ok(request)
    }

    /// Checks what the types alone cannot; names the first problem (in the order of the
    /// fields, then of the devices).
    pub fn validate(&self) -> Result<(), Error> {
        let mut checker = Checker::new();
        for (index, device) in self.devices.iter().enumerate() {
            checker.device(index, device);
        }
        checker.finish(self)
    }

    /// SHA-256 over the canonical JSON: tells a repeated submission from a conflicting one.
    pub fn fingerprint(&self) -> String {
        // Hashed as it is written: a 1,000,000-device request is not copied into memory first.
        let mut hash = Sha256::new();
        let _ = serde_json::to_writer(Hashing(&mut hash), self);
        hex(&hash.finalize())
    }
}

/// The request's own fields (not its devices), in the order they are checked.
pub(super) fn check_head(request: &BulkChangeRequest) -> Result<(), Error> {
    if !request
        .change_request_type
        .eq_ignore_ascii_case("StatusUpdate")
    {
        return Err(Error::UnsupportedChangeType(short(
            &request.change_request_type,
        )));
    }
    if !request.integration.eq_ignore_ascii_case("Pond") {
        return Err(Error::UnsupportedIntegration(short(&request.integration)));
    }
    if let Some(by) = &request.requested_by {
        check_text("requested_by", by)?;
    }
    Ok(())
}

/// One device's own checks (duplicates across devices are the [`Checker`]'s).
pub(super) fn check_device(index: usize, device: &DeviceRequest) -> Result<(), Error> {
    let Some(rev) = &device.rev_service else {
        return Ok(());
    };
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
    if !rev.product_ids.is_empty() && rev.package_id.is_some() {
        return Err(Error::ProductsWithPackage { index });
    }
    let mut products = HashSet::new();
    if let Some(&id) = rev
        .product_ids
        .iter()
        .find(|&&p| p <= 0 || !products.insert(p))
    {
        return Err(Error::BadProductId { index, id });
    }
    let id = rev.customer_id.trim();
    if id.len() > 18 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::CustomerIdNotNumeric {
            index,
            value: short(id),
        });
    }
    Ok(())
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
    fn rejects_duplicate_msisdns() {
        let with = |id: &str, iccid: &str| {
            format!(
                r#"{{"device_change_id": {id}, "iccid": "{iccid}", "msisdn": "+15550001", "target_status": "Active"}}"#
            )
        };
        let two = format!(
            "{},{}",
            with("1", "8901260882310000001"),
            with("2", "8901260882310000002")
        );
        let err = BulkChangeRequest::from_json(json(&two).as_bytes());
        assert!(
            matches!(&err, Err(Error::DuplicateMsisdn { index: 1, msisdn }) if msisdn.as_str() == "15550001"),
            "{err:?}"
        );
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
            "rev_service": {"customer_id": "1", "provider_id": 1, "service_type_id": 2}}"#;
        let err = BulkChangeRequest::from_json(json(dev).as_bytes());
        assert!(matches!(
            err,
            Err(Error::RevServiceNeedsActive { index: 0, .. })
        ));
    }

    #[test]
    fn rev_customer_and_products_are_checked() {
        let with = |rev: &str| {
            let dev = format!(
                r#"{{"device_change_id": 1, "iccid": "8901260882310000001", "target_status": "Active", "rev_service": {rev}}}"#
            );
            BulkChangeRequest::from_json(json(&dev).as_bytes())
        };
        let ok = with(
            r#"{"customer_id": "4411", "provider_id": 1, "service_type_id": 2, "product_ids": [7, 8]}"#,
        )
        .unwrap();
        assert_eq!(
            ok.devices[0].rev_service.as_ref().unwrap().product_ids,
            vec![7, 8]
        );
        assert!(matches!(
            with(r#"{"customer_id": "C-44", "provider_id": 1, "service_type_id": 2}"#),
            Err(Error::CustomerIdNotNumeric { index: 0, value }) if value == "C-44"
        ));
        assert!(matches!(
            with(
                r#"{"customer_id": "1", "provider_id": 1, "service_type_id": 2, "package_id": 3, "product_ids": [7]}"#
            ),
            Err(Error::ProductsWithPackage { index: 0 })
        ));
        assert!(matches!(
            with(
                r#"{"customer_id": "1", "provider_id": 1, "service_type_id": 2, "product_ids": [7, 7]}"#
            ),
            Err(Error::BadProductId { index: 0, id: 7 })
        ));
        assert!(matches!(
            with(
                r#"{"customer_id": "1", "provider_id": 1, "service_type_id": 2, "product_ids": [0]}"#
            ),
            Err(Error::BadProductId { index: 0, id: 0 })
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

#[cfg(test)]
mod hostile {
    //! Hostile input: whatever the bytes, parsing returns a value or an error naming the problem,
    //! and never panics.

    use proptest::prelude::*;

    use super::*;

    fn device(n: usize) -> String {
        format!(
            r#"{{"device_change_id":{},"iccid":"89{:017}","target_status":"Active"}}"#,
            n + 1,
            n
        )
    }

    fn request_with(devices: usize) -> Vec<u8> {
        let mut s = String::with_capacity(devices * 80 + 100);
        s.push_str(r#"{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"devices":["#);
        for n in 0..devices {
            if n > 0 {
                s.push(',');
            }
            s.push_str(&device(n));
        }
        s.push_str("]}");
        s.into_bytes()
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, &str); 6] = [
            (
                r#"{"bulk_change_id":"x","tenant_id":1,"service_provider_id":2,"devices":[]}"#,
                "bulk_change_id",
            ),
            (
                r#"{"bulk_change_id":1,"service_provider_id":2,"devices":[]}"#,
                "tenant_id",
            ),
            (
                r#"{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"devices":[{"device_change_id":1,"iccid":"8901260882310000001","target_status":7}]}"#,
                "devices[0].target_status",
            ),
            (
                r#"{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"devices":[{"device_change_id":1,"iccid":"8901260882310000001","msisdn":"12","target_status":"Active"}]}"#,
                "devices[0].msisdn",
            ),
            (
                r#"{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"devices":[],"colour":"red"}"#,
                "colour",
            ),
            (
                r#"{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"devices":[]} trailing"#,
                "trailing",
            ),
        ];
        for (json, field) in cases {
            let err = BulkChangeRequest::from_json(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err:?} should name {field:?}");
        }
    }

    #[test]
    fn very_long_strings_are_rejected_without_echoing_them() {
        let long = "9".repeat(100_000);
        let json = format!(
            r#"{{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"devices":[{{"device_change_id":1,"iccid":"{long}","target_status":"Active"}}]}}"#
        );
        let err = BulkChangeRequest::from_json(json.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("devices[0].iccid") && err.len() < 300,
            "{}",
            &err[..err.len().min(300)]
        );
        let json = format!(
            r#"{{"bulk_change_id":1,"tenant_id":1,"service_provider_id":2,"requested_by":"{long}","devices":[{}]}}"#,
            device(0)
        );
        let err = BulkChangeRequest::from_json(json.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("requested_by") && err.len() < 300);
    }

    #[test]
    fn a_million_devices_is_accepted_and_one_more_is_not() {
        let at_limit = BulkChangeRequest::from_json(&request_with(MAX_DEVICES)).unwrap();
        assert_eq!(at_limit.devices.len(), MAX_DEVICES);
        drop(at_limit);
        let err = BulkChangeRequest::from_json(&request_with(MAX_DEVICES + 1)).unwrap_err();
        assert_eq!(
            err,
            Error::TooManyDevices {
                count: MAX_DEVICES + 1,
                max: MAX_DEVICES
            }
        );
    }

    fn valid_devices() -> impl Strategy<Value = Vec<DeviceRequest>> {
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    TargetStatus::Active,
                    TargetStatus::Suspended,
                    TargetStatus::Terminated,
                ]),
                any::<bool>(),
                // A random prefix and the index: numbers vary but never repeat (a
                // repeated MSISDN is a validation error, not a valid request).
                prop::option::of("[0-9]{3,12}"),
            ),
            1..40,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (target, ignore, msisdn))| DeviceRequest {
                    device_change_id: DeviceChangeId::new(i as i64 + 1).unwrap(),
                    iccid: Iccid::parse(&format!("89{:017}", i)).unwrap(),
                    msisdn: msisdn.map(|m| Msisdn::parse(&format!("{m}{i:03}")).unwrap()),
                    target_status: target,
                    is_ignore_current_status: ignore,
                    post_update_status_id: None,
                    rev_service: None,
                })
                .collect()
        })
    }

    fn request(devices: Vec<DeviceRequest>) -> BulkChangeRequest {
        BulkChangeRequest {
            bulk_change_id: BulkChangeId::new(9).unwrap(),
            tenant_id: TenantId::new(1).unwrap(),
            service_provider_id: ServiceProviderId::new(2).unwrap(),
            change_request_type: "StatusUpdate".into(),
            integration: "Pond".into(),
            requested_by: None,
            origin: Origin::Submitted,
            devices,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = BulkChangeRequest::from_json(&bytes);
        }

        /// Arbitrary JSON-ish text never panics and errors are bounded in size.
        #[test]
        fn arbitrary_json_never_panics(text in r#"\{("[a-z_]{1,20}":("[^"]{0,30}"|-?[0-9]{1,25}|\[\]|null|true),?){0,8}\}"#) {
            if let Err(e) = BulkChangeRequest::from_json(text.as_bytes()) {
                prop_assert!(e.to_string().len() < 1_000);
            }
        }

        /// A valid request survives a JSON round trip unchanged.
        #[test]
        fn valid_requests_round_trip(devices in valid_devices()) {
            let original = request(devices);
            let json = serde_json::to_vec(&original).unwrap();
            prop_assert_eq!(BulkChangeRequest::from_json(&json).unwrap(), original);
        }

        /// Duplicating any device's id or ICCID is always caught, naming the later index.
        #[test]
        fn duplicates_are_always_caught(devices in valid_devices(), pick in any::<prop::sample::Index>(), iccid in any::<bool>()) {
            let mut devices = devices;
            let source = pick.index(devices.len());
            let mut copy = devices[source].clone();
            if iccid {
                copy.device_change_id = DeviceChangeId::new(10_000).unwrap();
            } else {
                copy.iccid = Iccid::parse("8999999999999999999").unwrap();
            }
            devices.push(copy);
            let index = devices.len() - 1;
            let err = request(devices).validate().unwrap_err();
            let caught = matches!(err, Error::DuplicateIccid { index: i, .. } | Error::DuplicateDeviceChangeId { index: i, .. } if i == index);
            prop_assert!(caught, "{:?}", err);
        }
    }
}
