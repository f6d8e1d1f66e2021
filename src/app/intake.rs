//! What a queue message asks for. Two formats are accepted (see `docs/queue-messages.md`):
//!
//! - the legacy one the portal's producer sends today: body `Not used`, data in String
//!   attributes (`BulkChangeId` required, `RetryNumber`, `ServiceProviderId`, optional
//!   `M2MDeviceChangeId`, `RequestId`, `AdditionBulkChangeId`, `NewServiceActivations`,
//!   `NewServiceActivationIteration`, `IsFromAutomatedUpdateDeviceStatusLambda`,
//!   `IsRetryUpdateIdentifier`; at most 10), naming a bulk change already in the store;
//! - a JSON body carrying a whole bulk change request (the `bulkflow submit` format).

use crate::adapters::queue::{QueueMessage, LEGACY_BODY};
use crate::domain::{BulkChangeId, BulkChangeRequest, ServiceProviderId};

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
    Submit(Box<BulkChangeRequest>),
}

/// Why a message cannot be processed; it goes to the dead-letter queue with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

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

fn reject(text: impl Into<String>) -> Rejection {
    Rejection(text.into())
}

fn number(message: &QueueMessage, name: &str) -> Result<Option<i64>, Rejection> {
    match message.attributes.get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
            reject(format!(
                "attribute {name}: {:?} is not a whole number",
                v.chars().take(40).collect::<String>()
            ))
        }),
    }
}

/// Reads a message.
pub fn parse(message: &QueueMessage) -> Result<Intake, Rejection> {
    let body = message.body.trim();
    if body == LEGACY_BODY {
        return legacy(message);
    }
    if body.starts_with('{') {
        let request = BulkChangeRequest::from_json(body.as_bytes())
            .map_err(|e| reject(format!("invalid bulk change request: {e}")))?;
        return Ok(Intake::Submit(Box::new(request)));
    }
    Err(reject(format!(
        "body is neither the legacy {LEGACY_BODY:?} nor a JSON bulk change request (starts with {:?})",
        body.chars().take(20).collect::<String>()
    )))
}

fn legacy(message: &QueueMessage) -> Result<Intake, Rejection> {
    if message.attributes.len() > MAX_ATTRIBUTES {
        return Err(reject(format!(
            "message has {} attributes; at most {MAX_ATTRIBUTES} are allowed",
            message.attributes.len()
        )));
    }
    if let Some(unknown) = message
        .attributes
        .keys()
        .find(|k| !KNOWN.contains(&k.as_str()))
    {
        tracing::warn!(attribute = %unknown, "ignoring an unknown message attribute");
    }
    let id = number(message, "BulkChangeId")?
        .ok_or_else(|| reject("attribute BulkChangeId is missing"))?;
    if id == 0 {
        return Err(reject("attribute BulkChangeId is 0"));
    }
    let bulk_change_id =
        BulkChangeId::new(id).map_err(|e| reject(format!("attribute BulkChangeId: {e}")))?;
    let service_provider_id = number(message, "ServiceProviderId")?
        .map(ServiceProviderId::new)
        .transpose()
        .map_err(|e| reject(format!("attribute ServiceProviderId: {e}")))?;
    let retry_number = number(message, "RetryNumber")?.unwrap_or(0);
    let retry_number = u32::try_from(retry_number).map_err(|_| {
        reject(format!(
            "attribute RetryNumber: {retry_number} is negative or too large"
        ))
    })?;
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
            parse(&message("Not used", &[])).unwrap_err().0,
            "attribute BulkChangeId is missing"
        );
        assert_eq!(
            parse(&message("Not used", &[("BulkChangeId", "0")]))
                .unwrap_err()
                .0,
            "attribute BulkChangeId is 0"
        );
        assert!(parse(&message("Not used", &[("BulkChangeId", "abc")]))
            .unwrap_err()
            .0
            .contains("not a whole number"));
        assert!(parse(&message("Not used", &[("BulkChangeId", "-3")])).is_err());
    }

    #[test]
    fn rejects_more_than_ten_attributes() {
        let many: Vec<(String, String)> = (0..11)
            .map(|i| (format!("A{i}"), "1".to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(parse(&message("Not used", &refs))
            .unwrap_err()
            .0
            .contains("11 attributes"));
    }

    #[test]
    fn reads_a_json_request_and_names_what_is_wrong_with_a_bad_one() {
        let ok = r#"{"bulk_change_id": 5, "tenant_id": 1, "service_provider_id": 2,
            "devices": [{"device_change_id": 1, "iccid": "8901260882310000001", "target_status": "Active"}]}"#;
        assert!(
            matches!(parse(&message(ok, &[])).unwrap(), Intake::Submit(r) if r.devices.len() == 1)
        );
        let empty =
            r#"{"bulk_change_id": 5, "tenant_id": 1, "service_provider_id": 2, "devices": []}"#;
        assert!(parse(&message(empty, &[]))
            .unwrap_err()
            .0
            .contains("no devices"));
        assert!(parse(&message("{not json", &[]))
            .unwrap_err()
            .0
            .contains("invalid bulk change request"));
    }

    #[test]
    fn rejects_an_unknown_body() {
        assert!(parse(&message("hello", &[]))
            .unwrap_err()
            .0
            .contains("neither"));
    }
}
