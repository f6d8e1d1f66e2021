//! A bulk change request read as a stream: its devices are handed over one by one as they are
//! parsed, so a 1,000,000-device request (about 200 MB of JSON) is never in memory as a whole.
//!
//! Three pieces, used by every way a request arrives (`bulkflow submit`, a JSON message, the
//! API, and [`BulkChangeRequest::from_json`] itself):
//! - [`stream`]: the parser, token by token from any `serde_json` reader;
//! - [`Checker`]: the validation, device by device, with the duplicate checks done on sorted
//!   packed keys (16 bytes a key) instead of hash sets of strings; it names the same first error
//!   as a check of the whole request would;
//! - [`Fingerprinter`]: the request's fingerprint, hashed device by device, equal to
//!   [`BulkChangeRequest::fingerprint`] of the same request.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::ids::{BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId};
use super::request::{
    check_device, check_head, default_change_type, default_integration, hex, BulkChangeRequest,
    DeviceRequest, Error, Origin, MAX_DEVICES,
};

/// What a pass over a request read, besides its devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    /// The request with no devices.
    pub head: BulkChangeRequest,
    /// How many devices it has.
    pub devices: usize,
    /// A field other than `devices` came after the devices (the fingerprint, which hashes
    /// those fields first, could not be taken while streaming).
    pub head_after_devices: bool,
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Pass {
    /// The whole request was read.
    Read(Streamed),
    /// The device callback asked to stop.
    Stopped,
}

/// What a pass does with what it reads.
pub trait Sink {
    /// The devices begin; `head` holds the fields read before them (`None` if a required one
    /// is still missing).
    fn begin(&mut self, head: Option<&BulkChangeRequest>) {
        let _ = head;
    }
    /// The device at `index` (from 0, in order); `false` stops the pass.
    fn device(&mut self, index: usize, device: DeviceRequest) -> bool;
}

impl<F: FnMut(usize, DeviceRequest) -> bool> Sink for F {
    fn device(&mut self, index: usize, device: DeviceRequest) -> bool {
        self(index, device)
    }
}

/// Parses one request from `de`, handing each device to `sink` as soon as it is read. Errors
/// are those of [`BulkChangeRequest::from_json`]: malformed JSON, a wrong type or an unknown
/// field, named by its path (`devices[3].iccid`). No validation beyond the types: see
/// [`Checker`].
pub fn stream<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    sink: &mut dyn Sink,
) -> Result<Pass, Error> {
    let mut stopped = false;
    let mut track = serde_path_to_error::Track::new();
    let result = Top {
        sink,
        stopped: &mut stopped,
    }
    .deserialize(serde_path_to_error::Deserializer::new(&mut *de, &mut track));
    let streamed = match result {
        Ok(streamed) => streamed,
        Err(_) if stopped => return Ok(Pass::Stopped),
        Err(e) => {
            let path = track.path().to_string();
            return Err(if path.is_empty() || path == "." {
                Error::Malformed(e.to_string())
            } else {
                Error::Malformed(format!("{path}: {e}"))
            });
        }
    };
    de.end().map_err(|e| Error::Malformed(e.to_string()))?;
    Ok(Pass::Read(streamed))
}

/// The request's fields, as `#[serde(deny_unknown_fields)]` on [`BulkChangeRequest`] names them.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    BulkChangeId,
    TenantId,
    ServiceProviderId,
    ChangeRequestType,
    Integration,
    RequestedBy,
    Origin,
    Devices,
}

struct Top<'a> {
    sink: &'a mut dyn Sink,
    stopped: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = Streamed;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Streamed, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Streamed;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a bulk change request (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Streamed, A::Error> {
        let mut head = HeadFields::default();
        let mut devices: Option<usize> = None;
        let mut head_after_devices = false;
        // Reads one head field once, noting whether the devices came before it.
        macro_rules! once {
            ($slot:ident, $name:literal) => {{
                if head.$slot.is_some() {
                    return Err(de::Error::duplicate_field($name));
                }
                head.$slot = Some(map.next_value()?);
                head_after_devices |= devices.is_some();
            }};
        }
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::BulkChangeId => once!(bulk_change_id, "bulk_change_id"),
                Field::TenantId => once!(tenant_id, "tenant_id"),
                Field::ServiceProviderId => once!(service_provider_id, "service_provider_id"),
                Field::ChangeRequestType => once!(change_request_type, "change_request_type"),
                Field::Integration => once!(integration, "integration"),
                Field::RequestedBy => once!(requested_by, "requested_by"),
                Field::Origin => once!(origin, "origin"),
                Field::Devices => {
                    if devices.is_some() {
                        return Err(de::Error::duplicate_field("devices"));
                    }
                    self.sink.begin(head.request().ok().as_ref());
                    devices = Some(map.next_value_seed(Devices {
                        sink: &mut *self.sink,
                        stopped: &mut *self.stopped,
                    })?);
                }
            }
        }
        let head = head.request().map_err(de::Error::missing_field)?;
        let devices = devices.ok_or_else(|| de::Error::missing_field("devices"))?;
        Ok(Streamed {
            head,
            devices,
            head_after_devices,
        })
    }
}

/// The request's fields other than its devices, as far as they were read.
#[derive(Default)]
struct HeadFields {
    bulk_change_id: Option<BulkChangeId>,
    tenant_id: Option<TenantId>,
    service_provider_id: Option<ServiceProviderId>,
    change_request_type: Option<String>,
    integration: Option<String>,
    requested_by: Option<Option<String>>,
    origin: Option<Origin>,
}

impl HeadFields {
    /// The request (with no devices) these fields make, with the defaults of those absent; or
    /// the first required field missing.
    fn request(&self) -> Result<BulkChangeRequest, &'static str> {
        Ok(BulkChangeRequest {
            bulk_change_id: self.bulk_change_id.ok_or("bulk_change_id")?,
            tenant_id: self.tenant_id.ok_or("tenant_id")?,
            service_provider_id: self.service_provider_id.ok_or("service_provider_id")?,
            change_request_type: self
                .change_request_type
                .clone()
                .unwrap_or_else(default_change_type),
            integration: self.integration.clone().unwrap_or_else(default_integration),
            requested_by: self.requested_by.clone().flatten(),
            origin: self.origin.unwrap_or_default(),
            devices: Vec::new(),
        })
    }
}

struct Devices<'a> {
    sink: &'a mut dyn Sink,
    stopped: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for Devices<'_> {
    type Value = usize;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Devices<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of devices")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0;
        while let Some(device) = seq.next_element::<DeviceRequest>()? {
            if !self.sink.device(count, device) {
                *self.stopped = true;
                return Err(de::Error::custom("stopped"));
            }
            count += 1;
        }
        Ok(count)
    }
}

/// Bits of a packed key that hold the device's index (2^20 > [`MAX_DEVICES`]).
const INDEX_BITS: u32 = 20;
/// Bits of a packed ICCID or MSISDN that hold its digits as a number (10^22 < 2^74).
const NUMBER_BITS: u32 = 74;

/// Validates a request device by device, as [`BulkChangeRequest::validate`] does for a whole
/// one, and names the same first error. Memory: 48 bytes a device (three packed keys).
#[derive(Debug, Default)]
pub struct Checker {
    /// `value << 20 | index` of each id, ICCID and MSISDN, sorted at the end: a duplicate is two
    /// neighbours with the same value.
    ids: Vec<u128>,
    iccids: Vec<u128>,
    msisdns: Vec<u128>,
    /// The first device that failed its own checks.
    first: Option<(usize, Error)>,
    count: usize,
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The device at `index` (devices come in order, from 0).
    pub fn device(&mut self, index: usize, device: &DeviceRequest) {
        self.count = index + 1;
        // Past a device that failed, or past the maximum, no later device can be the first
        // error (duplicates are named at their later index).
        if self.first.is_some() || index >= MAX_DEVICES {
            return;
        }
        let index_bits = index as u128;
        self.ids
            .push((device.device_change_id.get() as u128) << INDEX_BITS | index_bits);
        self.iccids
            .push(digits(device.iccid.as_str()) << INDEX_BITS | index_bits);
        if let Some(msisdn) = &device.msisdn {
            self.msisdns
                .push(digits(msisdn.as_str()) << INDEX_BITS | index_bits);
        }
        if let Err(e) = check_device(index, device) {
            self.first = Some((index, e));
        }
    }

    /// The verdict, once every device was seen, on the request `head` (its fields other than
    /// the devices).
    pub fn finish(self, head: &BulkChangeRequest) -> Result<(), Error> {
        check_head(head)?;
        if self.count == 0 {
            return Err(Error::NoDevices);
        }
        if self.count > MAX_DEVICES {
            return Err(Error::TooManyDevices {
                count: self.count,
                max: MAX_DEVICES,
            });
        }
        // The earliest repeat of each kind; at one index an id comes before an ICCID before an
        // MSISDN, and all of them before the device's own checks.
        let repeats = [
            first_repeat(self.ids),
            first_repeat(self.iccids),
            first_repeat(self.msisdns),
        ];
        let earliest = repeats
            .iter()
            .enumerate()
            .filter_map(|(kind, r)| r.map(|(index, value)| (index, kind, value)))
            .min_by_key(|&(index, kind, _)| (index, kind));
        match (earliest, self.first) {
            (Some((index, kind, value)), first)
                if first.as_ref().is_none_or(|(at, _)| index <= *at) =>
            {
                Err(repeat_error(kind, index, value))
            }
            (_, Some((_, e))) => Err(e),
            (_, None) => Ok(()),
        }
    }
}

/// Digits as one number, with their count above it (leading zeros count): equal keys are
/// equal texts. ICCIDs and MSISDNs are 22 digits at most, checked on parse.
fn digits(text: &str) -> u128 {
    let number = text
        .bytes()
        .fold(0u128, |n, b| n * 10 + u128::from(b.wrapping_sub(b'0')));
    (text.len() as u128) << NUMBER_BITS | number
}

fn undigits(key: u128) -> String {
    let len = (key >> NUMBER_BITS) as usize;
    let number = key & ((1u128 << NUMBER_BITS) - 1);
    format!("{number:0len$}")
}

/// The smallest index at which a value appears for the second time, with that value.
fn first_repeat(mut keys: Vec<u128>) -> Option<(usize, u128)> {
    keys.sort_unstable();
    keys.windows(2)
        .filter(|w| w[0] >> INDEX_BITS == w[1] >> INDEX_BITS)
        .map(|w| {
            (
                (w[1] & ((1 << INDEX_BITS) - 1)) as usize,
                w[1] >> INDEX_BITS,
            )
        })
        .min()
}

fn repeat_error(kind: usize, index: usize, value: u128) -> Error {
    // The values came from parsed ids, so they parse again; were one not to, the request is
    // still refused, with the index.
    let malformed = || Error::Malformed(format!("devices[{index}]: a value appears twice"));
    match kind {
        0 => DeviceChangeId::new(value as i64)
            .map(|id| Error::DuplicateDeviceChangeId { index, id })
            .unwrap_or_else(|_| malformed()),
        1 => Iccid::parse(&undigits(value))
            .map(|iccid| Error::DuplicateIccid { index, iccid })
            .unwrap_or_else(|_| malformed()),
        _ => Msisdn::parse(&undigits(value))
            .map(|msisdn| Error::DuplicateMsisdn { index, msisdn })
            .unwrap_or_else(|_| malformed()),
    }
}

/// The fingerprint of a request hashed device by device: the same bytes as
/// [`BulkChangeRequest::fingerprint`] serializes, in the same order.
pub struct Fingerprinter {
    hash: Sha256,
    devices: usize,
}

impl Fingerprinter {
    /// Starts with the request's fields other than its devices (`head.devices` is ignored).
    pub fn new(head: &BulkChangeRequest) -> Self {
        let empty = BulkChangeRequest {
            devices: Vec::new(),
            ..head.clone()
        };
        let mut text = serde_json::to_vec(&empty).unwrap_or_default();
        // `…,"devices":[]}`: the devices go between the brackets.
        let cut = text.len().saturating_sub(2);
        text.truncate(cut);
        let mut hash = Sha256::new();
        hash.update(&text);
        Self { hash, devices: 0 }
    }

    pub fn device(&mut self, device: &DeviceRequest) {
        if self.devices > 0 {
            self.hash.update(b",");
        }
        let _ = serde_json::to_writer(Hashing(&mut self.hash), device);
        self.devices += 1;
    }

    pub fn finish(mut self) -> String {
        self.hash.update(b"]}");
        hex(&self.hash.finalize())
    }
}

/// A writer that hashes what it is given.
pub(super) struct Hashing<'a>(pub &'a mut Sha256);

impl std::io::Write for Hashing<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a pass that checks a request found.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The request with no devices.
    pub head: BulkChangeRequest,
    pub devices: usize,
    /// `None` when a field came after the devices: [`fingerprint`] takes it in a second pass.
    pub fingerprint: Option<String>,
}

/// One full pass that checks a request and takes its fingerprint, keeping no device: what a
/// caller needs before appending it.
pub fn check<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
) -> Result<Checked, Error> {
    struct Checking {
        checker: Checker,
        hashing: Option<Fingerprinter>,
    }
    impl Sink for Checking {
        fn begin(&mut self, head: Option<&BulkChangeRequest>) {
            self.hashing = head.map(Fingerprinter::new);
        }
        fn device(&mut self, index: usize, device: DeviceRequest) -> bool {
            self.checker.device(index, &device);
            if let Some(h) = self.hashing.as_mut() {
                h.device(&device);
            }
            true
        }
    }
    let mut checking = Checking {
        checker: Checker::new(),
        hashing: None,
    };
    let Pass::Read(streamed) = stream(de, &mut checking)? else {
        return Err(Error::Malformed(
            "the request could not be read to its end".into(),
        ));
    };
    checking.checker.finish(&streamed.head)?;
    let fingerprint = match (streamed.head_after_devices, checking.hashing) {
        (false, Some(h)) => Some(h.finish()),
        _ => None,
    };
    Ok(Checked {
        head: streamed.head,
        devices: streamed.devices,
        fingerprint,
    })
}

/// A pass that only takes the fingerprint of a request already checked.
pub fn fingerprint<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    head: &BulkChangeRequest,
) -> Result<String, Error> {
    let mut hashing = Fingerprinter::new(head);
    let mut sink = |_: usize, device: DeviceRequest| {
        hashing.device(&device);
        true
    };
    stream(de, &mut sink)?;
    Ok(hashing.finish())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::ids::{BulkChangeId, ServiceProviderId, TenantId};
    use crate::domain::status::TargetStatus;

    fn device(n: usize) -> DeviceRequest {
        DeviceRequest {
            device_change_id: DeviceChangeId::new(n as i64 + 1).unwrap(),
            iccid: Iccid::parse(&format!("89{n:017}")).unwrap(),
            msisdn: Some(Msisdn::parse(&format!("1555{n:07}")).unwrap()),
            target_status: TargetStatus::Active,
            is_ignore_current_status: false,
            post_update_status_id: None,
            rev_service: None,
        }
    }

    fn request(devices: usize) -> BulkChangeRequest {
        BulkChangeRequest {
            bulk_change_id: BulkChangeId::new(7).unwrap(),
            tenant_id: TenantId::new(1).unwrap(),
            service_provider_id: ServiceProviderId::new(2).unwrap(),
            change_request_type: "StatusUpdate".into(),
            integration: "Pond".into(),
            requested_by: Some("ops".into()),
            origin: Origin::Submitted,
            devices: (0..devices).map(device).collect(),
        }
    }

    fn checked(json: &str) -> Result<Checked, Error> {
        check(&mut serde_json::Deserializer::from_str(json))
    }

    #[test]
    fn a_pass_hands_over_every_device_in_order_and_the_head() {
        let original = request(2_500);
        let json = serde_json::to_string(&original).unwrap();
        let mut seen = Vec::new();
        let mut keep = |i: usize, d: DeviceRequest| {
            seen.push((i, d));
            true
        };
        let pass = stream(&mut serde_json::Deserializer::from_str(&json), &mut keep).unwrap();
        let Pass::Read(streamed) = pass else {
            panic!("stopped")
        };
        assert_eq!(streamed.devices, 2_500);
        assert!(!streamed.head_after_devices);
        assert_eq!(streamed.head.requested_by.as_deref(), Some("ops"));
        assert!(seen.iter().enumerate().all(|(i, (j, _))| i == *j));
        let devices: Vec<_> = seen.into_iter().map(|(_, d)| d).collect();
        assert_eq!(devices, original.devices);
    }

    #[test]
    fn a_sink_can_stop_a_pass() {
        let json = serde_json::to_string(&request(10)).unwrap();
        let mut count = 0;
        let mut three = |_: usize, _: DeviceRequest| {
            count += 1;
            count < 3
        };
        let pass = stream(&mut serde_json::Deserializer::from_str(&json), &mut three).unwrap();
        assert_eq!(pass, Pass::Stopped);
        assert_eq!(count, 3);
    }

    #[test]
    fn the_streamed_fingerprint_is_the_whole_requests() {
        let original = request(1_234);
        let json = serde_json::to_string(&original).unwrap();
        let c = checked(&json).unwrap();
        assert_eq!(c.devices, 1_234);
        assert_eq!(c.fingerprint, Some(original.fingerprint()));
    }

    #[test]
    fn a_field_after_the_devices_needs_a_second_pass_for_the_fingerprint() {
        let original = request(3);
        let devices = serde_json::to_string(&original.devices).unwrap();
        let json = format!(
            r#"{{"devices": {devices}, "bulk_change_id": 7, "tenant_id": 1, "service_provider_id": 2, "requested_by": "ops"}}"#
        );
        let c = checked(&json).unwrap();
        assert_eq!(c.fingerprint, None);
        let second = fingerprint(&mut serde_json::Deserializer::from_str(&json), &c.head).unwrap();
        assert_eq!(second, original.fingerprint());
        // Keys in another order, same request: same fingerprint.
        let reordered = format!(
            r#"{{"requested_by": "ops", "service_provider_id": 2, "tenant_id": 1, "bulk_change_id": 7, "devices": {devices}}}"#
        );
        assert_eq!(
            checked(&reordered).unwrap().fingerprint,
            Some(original.fingerprint())
        );
    }

    #[test]
    fn a_duplicate_is_named_at_its_later_index_with_its_value() {
        let mut r = request(50);
        r.devices[40].iccid = r.devices[12].iccid.clone();
        r.devices[30].msisdn = r.devices[3].msisdn.clone();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            checked(&json),
            Err(Error::DuplicateMsisdn {
                index: 30,
                msisdn: r.devices[3].msisdn.clone().unwrap()
            })
        );
        // Leading zeros are part of the value.
        let mut r = request(3);
        r.devices[1].iccid = Iccid::parse("0089000000000000000").unwrap();
        r.devices[2].iccid = Iccid::parse("089000000000000000").unwrap();
        assert_eq!(r.validate(), Ok(()));
        r.devices[2].iccid = r.devices[1].iccid.clone();
        assert_eq!(
            r.validate(),
            Err(Error::DuplicateIccid {
                index: 2,
                iccid: Iccid::parse("0089000000000000000").unwrap()
            })
        );
    }

    #[test]
    fn the_first_problem_wins_whatever_its_kind() {
        let mut r = request(20);
        // A device's own problem at 5, a duplicate id at 9: the device at 5 is named.
        r.devices[5].target_status = TargetStatus::Suspended;
        r.devices[5].rev_service = Some(std::sync::Arc::new(crate::domain::RevServiceRequest {
            customer_id: "1".into(),
            provider_id: 1,
            service_type_id: 1,
            usage_plan_group_id: None,
            package_id: None,
            effective_date: None,
            activated_date: None,
            product_ids: vec![],
        }));
        r.devices[9].device_change_id = r.devices[0].device_change_id;
        assert!(matches!(
            r.validate(),
            Err(Error::RevServiceNeedsActive { index: 5, .. })
        ));
        // At the same index a duplicate comes first.
        r.devices[5].iccid = r.devices[1].iccid.clone();
        assert!(matches!(
            r.validate(),
            Err(Error::DuplicateIccid { index: 5, .. })
        ));
        // Malformed JSON anywhere comes before every check.
        let json = serde_json::to_string(&r).unwrap();
        let broken = json.replacen("\"Active\"", "\"Sleeping\"", 1);
        assert!(matches!(checked(&broken), Err(Error::Malformed(m)) if m.contains("Sleeping")));
    }

    /// The check as it was written before it streamed (hash sets, device by device), as the
    /// reference.
    fn naive(r: &BulkChangeRequest) -> Result<(), Error> {
        check_head(r)?;
        let (mut ids, mut iccids, mut msisdns) = (
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        );
        for (index, d) in r.devices.iter().enumerate() {
            if !ids.insert(d.device_change_id) {
                return Err(Error::DuplicateDeviceChangeId {
                    index,
                    id: d.device_change_id,
                });
            }
            if !iccids.insert(d.iccid.clone()) {
                return Err(Error::DuplicateIccid {
                    index,
                    iccid: d.iccid.clone(),
                });
            }
            if let Some(m) = &d.msisdn {
                if !msisdns.insert(m.clone()) {
                    return Err(Error::DuplicateMsisdn {
                        index,
                        msisdn: m.clone(),
                    });
                }
            }
            check_device(index, d)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The streamed check and fingerprint agree with the whole request's.
        #[test]
        fn streaming_agrees_with_the_whole_request(
            n in 1usize..60,
            changes in prop::collection::vec(
                (0usize..5, any::<prop::sample::Index>(), any::<prop::sample::Index>()),
                0..4,
            ),
        ) {
            let mut r = request(n);
            for (kind, from, to) in changes {
                let (from, to) = (from.index(n), to.index(n));
                match kind {
                    0 if from != to => r.devices[to].device_change_id = r.devices[from].device_change_id,
                    1 if from != to => r.devices[to].iccid = r.devices[from].iccid.clone(),
                    2 if from != to => r.devices[to].msisdn = r.devices[from].msisdn.clone(),
                    3 => {
                        r.devices[to].target_status = TargetStatus::Terminated;
                        r.devices[to].rev_service = Some(std::sync::Arc::new(crate::domain::RevServiceRequest {
                            customer_id: "1".into(),
                            provider_id: 1,
                            service_type_id: 1,
                            usage_plan_group_id: None,
                            package_id: None,
                            effective_date: None,
                            activated_date: None,
                            product_ids: vec![],
                        }));
                    }
                    _ => {}
                }
            }
            let json = serde_json::to_string(&r).unwrap();
            let whole = naive(&r);
            prop_assert_eq!(r.validate(), whole.clone());
            let streamed = checked(&json);
            match (whole, streamed) {
                (Ok(()), Ok(c)) => prop_assert_eq!(c.fingerprint, Some(r.fingerprint())),
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
            }
        }
    }
}
