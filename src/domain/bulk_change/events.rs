//! Events of the `BulkChange` aggregate: a frozen public format (see `docs/events.md`).
//! Every device event carries the ids an auditor needs without any other table.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::domain::api_call::ApiCall;
use crate::domain::ids::{
    BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId,
};
use crate::domain::policy::WorkflowRef;
use crate::domain::request::{DeviceRequest, Origin};
use crate::domain::status::{
    BulkChangeStatus, Downstream, ServiceFlag, SimStatus, Step, TargetStatus,
};

/// Version of every event type whose schema never changed.
pub const EVENT_VERSION: &str = "1.0";
/// `DeviceFailed` v2 added `error_code` (v1 events are upcast, see [`super::upcast`]).
pub const DEVICE_FAILED_VERSION: &str = "2.0";

/// The ids of the bulk change, repeated in each device event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkRef {
    pub bulk_change_id: BulkChangeId,
    pub tenant_id: TenantId,
    pub service_provider_id: ServiceProviderId,
}

/// The ids of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRef {
    pub device_change_id: DeviceChangeId,
    pub iccid: Iccid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Msisdn>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangeAccepted {
    pub bulk: BulkRef,
    pub change_request_type: String,
    pub integration: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Absent (submitted) in events written before it existed.
    #[serde(default, skip_serializing_if = "Origin::is_submitted")]
    pub origin: Origin,
    pub workflow: WorkflowRef,
    /// Devices follow in `DevicesAdded` events of the same commit.
    pub device_count: usize,
    pub request_fingerprint: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesAdded {
    pub bulk: BulkRef,
    pub devices: Vec<DeviceRequest>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangeStarted {
    pub bulk: BulkRef,
    pub worker: String,
    pub at: DateTime<Utc>,
}

/// Step 1 done: the SIM was read and, where needed, its status changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatusUpdated {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub attempt: u32,
    pub from: SimStatus,
    pub to: TargetStatus,
    /// The SIM already was at the target when read.
    pub already_at_target: bool,
    pub calls: Vec<ApiCall>,
    pub at: DateTime<Utc>,
}

/// Step 2 done: the three POND service flags were set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatusUpdated {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub attempt: u32,
    pub flag: ServiceFlag,
    pub call: ApiCall,
    pub at: DateTime<Utc>,
}

/// Intent recorded before `POST /v1/Services`: an attempt with this record and no outcome
/// may have created a service, so it is looked up before any new POST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevServiceCreationStarted {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub attempt: u32,
    pub number: String,
    pub at: DateTime<Utc>,
}

/// Step 3 done: the Rev service exists (created, or adopted after a lookup).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevServiceCreated {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub attempt: u32,
    pub rev_service_id: i64,
    pub number: String,
    /// True when an earlier attempt's service was found and adopted instead of creating one.
    pub adopted: bool,
    pub calls: Vec<ApiCall>,
    pub at: DateTime<Utc>,
}

/// Rev creation failed for good; the carrier change stands, the device finishes with a warning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevServiceFailed {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub attempt: u32,
    pub reason: String,
    pub calls: Vec<ApiCall>,
    pub at: DateTime<Utc>,
}

/// A retryable attempt failed; the next attempt is due at `due_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStepRetryScheduled {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub step: Step,
    pub failed_attempt: u32,
    pub next_attempt: u32,
    pub due_at: DateTime<Utc>,
    pub reason: String,
    /// The call may have taken effect (timeout, 5xx): look before repeating a non-idempotent one.
    pub outcome_unknown: bool,
    /// The server asked to slow down (429); such attempts do not use up the step's attempts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub throttled: bool,
    /// Nothing was sent (a Rev creation whose earlier intent was looked up and found nothing, or
    /// that could not be sent in its window); such attempts do not use up the step's attempts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_sent: bool,
    /// The step's downstream was held (an outage): the failure is the outage's, not the
    /// device's, and does not use up the step's attempts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    pub calls: Vec<ApiCall>,
    pub at: DateTime<Utc>,
}

/// The device failed at a carrier step (permanent error, or retries exhausted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceFailed {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    pub step: Step,
    pub attempt: u32,
    pub reason: String,
    /// v2: the carrier's error code (`SIM_NOT_FOUND`, `HTTP_503`, `NO_RESPONSE`, …), for grouping
    /// failures; `None` for business-rule failures (e.g. a terminated SIM).
    pub error_code: Option<String>,
    pub calls: Vec<ApiCall>,
    pub at: DateTime<Utc>,
}

/// The device finished successfully.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProcessed {
    pub bulk: BulkRef,
    pub device: DeviceRef,
    /// What was done, for `M2M_DeviceChange.StatusDetails`.
    pub summary: String,
    /// Set when the carrier change succeeded but the Rev service could not be created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_warning: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangePaused {
    pub bulk: BulkRef,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangeResumed {
    pub bulk: BulkRef,
    pub by: String,
    pub at: DateTime<Utc>,
}

/// A downstream kept failing as in an outage (5xx, timeouts, refused connections): the bulk
/// change holds its calls and probes it now and then. Failures while it is held do not use up
/// devices' attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownstreamHeld {
    pub bulk: BulkRef,
    pub downstream: Downstream,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A probe of a held downstream got an answer: its calls go out again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownstreamResumed {
    pub bulk: BulkRef,
    pub downstream: Downstream,
    pub at: DateTime<Utc>,
}

/// An operator asked to cancel the bulk change: no new carrier call starts from here on. Calls
/// in flight finish and are recorded; a Rev creation whose outcome is unresolved is looked up
/// (never sent again); then [`DevicesCancelled`] and [`BulkChangeCancelled`] end it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangeCancelRequested {
    pub bulk: BulkRef,
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A device that had not finished when its bulk change was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelledDevice {
    pub device: DeviceRef,
    /// The step it would have run next (the steps before it are done).
    pub step: Step,
}

/// What a device cancelled before `step` had (and had not) done, for its status details.
pub fn cancelled_details(step: Step) -> String {
    match step {
        Step::DeviceStatus => "cancelled before any change at the carrier".into(),
        Step::ServiceStatus => {
            "cancelled after its device status step; service flags not set".into()
        }
        Step::RevService => "cancelled after the carrier change; Rev service not created".into(),
    }
}

/// Devices ended `CANCELLED` (up to [`super::DEVICES_PER_EVENT`] an event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesCancelled {
    pub bulk: BulkRef,
    pub devices: Vec<CancelledDevice>,
    pub at: DateTime<Utc>,
}

/// The bulk change ended by an operator's cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangeCancelled {
    pub bulk: BulkRef,
    pub by: String,
    pub reason: String,
    pub total: usize,
    pub processed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub billing_warnings: usize,
    pub at: DateTime<Utc>,
}

/// A device that ended `API_FAILED` and gets a new round of attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetriedDevice {
    pub device: DeviceRef,
    /// The step that failed, run again.
    pub step: Step,
    /// The first attempt of the new round (attempt numbers keep rising, so every recorded
    /// attempt stays unique).
    pub next_attempt: u32,
}

/// An operator gave the devices that ended `API_FAILED` a new round of attempts under the
/// recorded policy (up to [`super::DEVICES_PER_EVENT`] an event; every event of one request
/// carries the same `round`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedDevicesRetried {
    pub bulk: BulkRef,
    pub by: String,
    /// 1 for the first retry-failed of this bulk change, 2 for the next, …
    pub round: u32,
    pub devices: Vec<RetriedDevice>,
    /// The bulk change's status afterwards (`PROCESSING`, or `PAUSED` if it was paused).
    pub status: BulkChangeStatus,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkChangeCompleted {
    pub bulk: BulkRef,
    pub status: BulkChangeStatus,
    pub total: usize,
    pub processed: usize,
    pub failed: usize,
    pub billing_warnings: usize,
    pub at: DateTime<Utc>,
}

/// Every fact of a bulk change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BulkChangeEvent {
    BulkChangeAccepted(BulkChangeAccepted),
    DevicesAdded(DevicesAdded),
    BulkChangeStarted(BulkChangeStarted),
    DeviceStatusUpdated(DeviceStatusUpdated),
    ServiceStatusUpdated(ServiceStatusUpdated),
    RevServiceCreationStarted(RevServiceCreationStarted),
    RevServiceCreated(RevServiceCreated),
    RevServiceFailed(RevServiceFailed),
    DeviceStepRetryScheduled(DeviceStepRetryScheduled),
    DeviceFailed(DeviceFailed),
    DeviceProcessed(DeviceProcessed),
    BulkChangePaused(BulkChangePaused),
    BulkChangeResumed(BulkChangeResumed),
    DownstreamHeld(DownstreamHeld),
    DownstreamResumed(DownstreamResumed),
    BulkChangeCompleted(BulkChangeCompleted),
    BulkChangeCancelRequested(BulkChangeCancelRequested),
    DevicesCancelled(DevicesCancelled),
    BulkChangeCancelled(BulkChangeCancelled),
    FailedDevicesRetried(FailedDevicesRetried),
}

impl BulkChangeEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::BulkChangeAccepted(_) => "BulkChangeAccepted",
            Self::DevicesAdded(_) => "DevicesAdded",
            Self::BulkChangeStarted(_) => "BulkChangeStarted",
            Self::DeviceStatusUpdated(_) => "DeviceStatusUpdated",
            Self::ServiceStatusUpdated(_) => "ServiceStatusUpdated",
            Self::RevServiceCreationStarted(_) => "RevServiceCreationStarted",
            Self::RevServiceCreated(_) => "RevServiceCreated",
            Self::RevServiceFailed(_) => "RevServiceFailed",
            Self::DeviceStepRetryScheduled(_) => "DeviceStepRetryScheduled",
            Self::DeviceFailed(_) => "DeviceFailed",
            Self::DeviceProcessed(_) => "DeviceProcessed",
            Self::BulkChangePaused(_) => "BulkChangePaused",
            Self::BulkChangeResumed(_) => "BulkChangeResumed",
            Self::DownstreamHeld(_) => "DownstreamHeld",
            Self::DownstreamResumed(_) => "DownstreamResumed",
            Self::BulkChangeCompleted(_) => "BulkChangeCompleted",
            Self::BulkChangeCancelRequested(_) => "BulkChangeCancelRequested",
            Self::DevicesCancelled(_) => "DevicesCancelled",
            Self::BulkChangeCancelled(_) => "BulkChangeCancelled",
            Self::FailedDevicesRetried(_) => "FailedDevicesRetried",
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::BulkChangeAccepted(e) => e.at,
            Self::DevicesAdded(e) => e.at,
            Self::BulkChangeStarted(e) => e.at,
            Self::DeviceStatusUpdated(e) => e.at,
            Self::ServiceStatusUpdated(e) => e.at,
            Self::RevServiceCreationStarted(e) => e.at,
            Self::RevServiceCreated(e) => e.at,
            Self::RevServiceFailed(e) => e.at,
            Self::DeviceStepRetryScheduled(e) => e.at,
            Self::DeviceFailed(e) => e.at,
            Self::DeviceProcessed(e) => e.at,
            Self::BulkChangePaused(e) => e.at,
            Self::BulkChangeResumed(e) => e.at,
            Self::DownstreamHeld(e) => e.at,
            Self::DownstreamResumed(e) => e.at,
            Self::BulkChangeCompleted(e) => e.at,
            Self::BulkChangeCancelRequested(e) => e.at,
            Self::DevicesCancelled(e) => e.at,
            Self::BulkChangeCancelled(e) => e.at,
            Self::FailedDevicesRetried(e) => e.at,
        }
    }

    /// The carrier calls this event records, in the order they were made.
    pub fn calls(&self) -> &[ApiCall] {
        match self {
            Self::DeviceStatusUpdated(e) => &e.calls,
            Self::ServiceStatusUpdated(e) => std::slice::from_ref(&e.call),
            Self::RevServiceCreated(e) => &e.calls,
            Self::RevServiceFailed(e) => &e.calls,
            Self::DeviceStepRetryScheduled(e) => &e.calls,
            Self::DeviceFailed(e) => &e.calls,
            _ => &[],
        }
    }
}

impl DomainEvent for BulkChangeEvent {
    fn event_type(&self) -> String {
        self.name().to_string()
    }

    fn event_version(&self) -> String {
        match self {
            Self::DeviceFailed(_) => DEVICE_FAILED_VERSION,
            _ => EVENT_VERSION,
        }
        .to_string()
    }
}
