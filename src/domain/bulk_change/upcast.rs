//! Upcasters: older stored versions of events, turned into the current ones when loaded (by the
//! event store and by catch-up). Stored events are never rewritten.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::Value;

use super::events::DEVICE_FAILED_VERSION;
use crate::domain::api_call::{error_code, ApiCall};

/// `DeviceFailed` 1.0 → 2.0: derives `error_code` from the recorded calls.
pub struct DeviceFailedV2;

impl EventUpcaster for DeviceFailedV2 {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "DeviceFailed" && event_version == "1.0"
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        if let Some(body) = event
            .payload
            .get_mut("DeviceFailed")
            .and_then(Value::as_object_mut)
        {
            let calls: Vec<ApiCall> = body
                .get("calls")
                .cloned()
                .and_then(|c| serde_json::from_value(c).ok())
                .unwrap_or_default();
            body.insert(
                "error_code".into(),
                error_code(&calls).map_or(Value::Null, Value::String),
            );
        }
        event.event_version = DEVICE_FAILED_VERSION.into();
        event
    }
}

const UPCASTERS: [&dyn EventUpcaster; 1] = [&DeviceFailedV2];

/// Whether a stored event of this type and version needs upcasting (if not, it can be
/// deserialized straight from its text).
pub fn needed(event_type: &str, event_version: &str) -> bool {
    UPCASTERS
        .iter()
        .any(|u| u.can_upcast(event_type, event_version))
}

/// Applies every upcaster that matches, in order.
pub fn upcast(event: SerializedEvent) -> SerializedEvent {
    UPCASTERS.iter().fold(event, |event, u| {
        if u.can_upcast(&event.event_type, &event.event_version) {
            u.upcast(event)
        } else {
            event
        }
    })
}
