//! What a queue message asks for. Two formats are accepted (see `docs/queue-messages.md`):
//!
//! - the legacy one the portal's producer sends today: body `Not used`, data in String
//!   attributes (`BulkChangeId` required, `RetryNumber`, `ServiceProviderId`, optional
//!   `M2MDeviceChangeId`, `RequestId`, `AdditionBulkChangeId`, `NewServiceActivations`,
//!   `NewServiceActivationIteration`, `IsFromAutomatedUpdateDeviceStatusLambda`,
//!   `IsRetryUpdateIdentifier`; at most 10), naming a bulk change already in the store;
//! - a JSON body carrying a whole bulk change request (the `bulkflow submit` format).

use crate::adapters::queue::{QueueMessage, LEGACY_BODY};
use std::sync::Arc;

use super::Source;
use crate::domain::scan::Checked;
use crate::domain::{BulkChangeId, ServiceProviderId};

/// What to do with a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// Run a bulk change that is already in the store.
    Run {
        bulk_change_id: BulkChangeId,
        service_provider_id: Option<ServiceProviderId>,
        retry_number: u32,
    },
    /// Create the bulk change (idempotently, keyed by its id) and run it.
    Submit(Box<Submission>),
}

/// A JSON request carried by a message, checked (its devices are read again as it is
/// appended: [`Engine::submit_checked`](super::Engine::submit_checked)).
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub checked: Checked,
    pub body: Arc<[u8]>,
}

impl Submission {
    pub fn bulk_change_id(&self) -> BulkChangeId {
        self.checked.head.bulk_change_id
    }
}

/// Why a message cannot be processed; it goes to the dead-letter queue with this text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("message has {0} attributes; at most {MAX_ATTRIBUTES} are allowed")]
    TooManyAttributes(usize),
    #[error("attribute {0} is missing")]
    MissingAttribute(&'static str),
    #[error("attribute {name}: {value:?} is not a whole number")]
    NotANumber { name: String, value: String },
    #[error("attribute BulkChangeId is 0")]
    ZeroBulkChangeId,
    #[error("attribute {name}: {source}")]
    BadId {
        name: &'static str,
        source: crate::domain::ids::Error,
    },
    #[error("attribute RetryNumber: {0} is negative or too large")]
    BadRetryNumber(i64),
    #[error("invalid bulk change request: {0}")]
    InvalidRequest(#[from] crate::domain::request::Error),
    #[error("body is neither the legacy {LEGACY_BODY:?} nor a JSON bulk change request (starts with {0:?})")]
    UnknownBody(String),
}

/// Most attributes a legacy message may carry (SQS's own limit).
pub const MAX_ATTRIBUTES: usize = 10;

const KNOWN: [&str; 10] = [
    "BulkChangeId",
    "RetryNumber",
    "ServiceProviderId",
    "M2MDeviceChangeId",
    "RequestId",
    "AdditionBulkChangeId",
    "NewServiceActivations",
    "NewServiceActivationIteration",
    "IsFromAutomatedUpdateDeviceStatusLambda",
    "IsRetryUpdateIdentifier",
];

fn number(message: &QueueMessage, name: &str) -> Result<Option<i64>, Error> {
    match message.attributes.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| Error::NotANumber {
                name: name.to_string(),
                value: v.chars().take(40).collect(),
            }),
    }
}

/// Reads a message.
pub fn parse(message: &QueueMessage) -> Result<Intake, Error> {
    let body = message.body.trim();
    if body == LEGACY_BODY {
        return legacy(message);
    }
    if body.starts_with('{') {
        let body: Arc<[u8]> = Arc::from(body.as_bytes());
        let checked = Source::Bytes(body.clone())
            .check()
            .map_err(|e| crate::domain::request::Error::Malformed(e.to_string()))??;
        return Ok(Intake::Submit(Box::new(Submission { checked, body })));
    }
    Err(Error::UnknownBody(body.chars().take(20).collect()))
}

fn legacy(message: &QueueMessage) -> Result<Intake, Error> {
    if message.attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::TooManyAttributes(message.attributes.len()));
    }
    if let Some(unknown) = message
        .attributes
        .keys()
        .find(|k| !KNOWN.contains(&k.as_str()))
    {
        tracing::warn!(attribute = %unknown, "ignoring an unknown message attribute");
    }
    let id = number(message, "BulkChangeId")?.ok_or(Error::MissingAttribute("BulkChangeId"))?;
    if id == 0 {
        return Err(Error::ZeroBulkChangeId);
    }
    let bulk_change_id = BulkChangeId::new(id).map_err(|source| Error::BadId {
        name: "BulkChangeId",
        source,
    })?;
    let service_provider_id = number(message, "ServiceProviderId")?
        .map(ServiceProviderId::new)
        .transpose()
        .map_err(|source| Error::BadId {
            name: "ServiceProviderId",
            source,
        })?;
    let retry_number = number(message, "RetryNumber")?.unwrap_or(0);
    let retry_number =
        u32::try_from(retry_number).map_err(|_| Error::BadRetryNumber(retry_number))?;
    for name in [
        "M2MDeviceChangeId",
        "AdditionBulkChangeId",
        "NewServiceActivationIteration",
    ] {
        number(message, name)?;
    }
    Ok(Intake::Run {
        bulk_change_id,
        service_provider_id,
        retry_number,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn message(body: &str, attributes: &[(&str, &str)]) -> QueueMessage {
        QueueMessage {
            id: "m1".into(),
            receipt: "r1".into(),
            body: body.into(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            receive_count: 1,
        }
    }

    #[test]
    fn reads_the_legacy_message() {
        let m = message(
            "Not used",
            &[
                ("BulkChangeId", "81234"),
                ("RetryNumber", "2"),
                ("ServiceProviderId", "12"),
                ("M2MDeviceChangeId", "7"),
            ],
        );
        assert_eq!(
            parse(&m).unwrap(),
            Intake::Run {
                bulk_change_id: BulkChangeId::new(81234).unwrap(),
                service_provider_id: Some(ServiceProviderId::new(12).unwrap()),
                retry_number: 2,
            }
        );
    }

    #[test]
    fn rejects_missing_zero_or_bad_bulk_change_ids() {
        assert_eq!(
            parse(&message("Not used", &[])),
            Err(Error::MissingAttribute("BulkChangeId"))
        );
        assert_eq!(
            parse(&message("Not used", &[("BulkChangeId", "0")])),
            Err(Error::ZeroBulkChangeId)
        );
        assert!(matches!(
            parse(&message("Not used", &[("BulkChangeId", "abc")])),
            Err(Error::NotANumber { name, value }) if name == "BulkChangeId" && value == "abc"
        ));
        assert!(matches!(
            parse(&message("Not used", &[("BulkChangeId", "-3")])),
            Err(Error::BadId {
                name: "BulkChangeId",
                ..
            })
        ));
    }

    #[test]
    fn rejects_more_than_ten_attributes() {
        let many: Vec<(String, String)> = (0..11)
            .map(|i| (format!("A{i}"), "1".to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            parse(&message("Not used", &refs)),
            Err(Error::TooManyAttributes(11))
        );
    }

    #[test]
    fn reads_a_json_request_and_names_what_is_wrong_with_a_bad_one() {
        let ok = r#"{"bulk_change_id": 5, "tenant_id": 1, "service_provider_id": 2,
            "devices": [{"device_change_id": 1, "iccid": "8901260882310000001", "target_status": "Active"}]}"#;
        assert!(
            matches!(parse(&message(ok, &[])).unwrap(), Intake::Submit(s) if s.checked.devices == 1 && s.bulk_change_id().get() == 5)
        );
        let empty =
            r#"{"bulk_change_id": 5, "tenant_id": 1, "service_provider_id": 2, "devices": []}"#;
        assert_eq!(
            parse(&message(empty, &[])),
            Err(Error::InvalidRequest(
                crate::domain::request::Error::NoDevices
            ))
        );
        assert!(matches!(
            parse(&message("{not json", &[])),
            Err(Error::InvalidRequest(
                crate::domain::request::Error::Malformed(_)
            ))
        ));
    }

    #[test]
    fn rejects_an_unknown_body() {
        assert_eq!(
            parse(&message("hello", &[])),
            Err(Error::UnknownBody("hello".into()))
        );
    }
}
