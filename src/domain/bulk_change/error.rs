use super::super::ids::DeviceChangeId;
use super::super::request;
use super::super::status::{BulkChangeStatus, Step};

/// Commands the aggregate rejects.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] request::Error),
    #[error("bulk change was already accepted with a different request")]
    ConflictingRequest,
    #[error("bulk change has not been accepted")]
    NotAccepted,
    #[error("bulk change is {0} and cannot take this command")]
    WrongStatus(BulkChangeStatus),
    #[error("device change {0} is not part of this bulk change")]
    UnknownDevice(DeviceChangeId),
    #[error("device change {0} is already finished")]
    DeviceFinished(DeviceChangeId),
    #[error("device change {device}: result for {got_step} attempt {got_attempt}, but the device is at {step} attempt {attempt}")]
    StaleResult {
        device: DeviceChangeId,
        step: Step,
        attempt: u32,
        got_step: Step,
        got_attempt: u32,
    },
    #[error("device change {0} appears twice in one batch")]
    DuplicateInBatch(DeviceChangeId),
    #[error(
        "device change {device}: a Rev creation intent for attempt {attempt} is already recorded"
    )]
    RevIntentExists {
        device: DeviceChangeId,
        attempt: u32,
    },
    #[error("{open} devices are still open")]
    DevicesStillOpen { open: usize },
    #[error("device change {0}: its Rev creation is unresolved; it must be looked up before the cancel can end")]
    RevUnresolved(DeviceChangeId),
    #[error("no device of this bulk change ended API_FAILED; nothing to retry")]
    NothingToRetry,
}
