use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::api_call::ApiCall;
use crate::domain::ids::DeviceChangeId;
use crate::domain::policy::WorkflowRef;
use crate::domain::request::BulkChangeRequest;
use crate::domain::status::{Downstream, ServiceFlag, SimStatus, Step};

/// What can be asked of a bulk change. Time always arrives in the command.
#[derive(Debug, Clone, PartialEq)]
pub enum BulkChangeCommand {
    /// Take a validated request under a workflow version. Repeating the same request is a no-op.
    Accept {
        /// Shared, so that deciding it again after a lost race copies nothing.
        request: std::sync::Arc<BulkChangeRequest>,
        workflow: WorkflowRef,
        at: DateTime<Utc>,
    },
    /// A worker begins driving the bulk change. No-op when already processing.
    Start {
        worker: String,
        at: DateTime<Utc>,
    },
    /// Record the intent to `POST /v1/Services` for these devices at these attempts.
    BeginRevCreations {
        devices: Vec<(DeviceChangeId, u32)>,
        at: DateTime<Utc>,
    },
    /// Record the outcomes of step attempts (many devices at once).
    RecordResults {
        reports: Vec<StepReport>,
        at: DateTime<Utc>,
    },
    /// `RecordResults` and `BeginRevCreations` in one commit: the outcomes, then the Rev
    /// creation intents of other devices about to be dispatched (their POSTs go out only after
    /// this commit). No intents are recorded if the outcomes pause the bulk change.
    RecordResultsAndBeginRev {
        reports: Vec<StepReport>,
        rev: Vec<(DeviceChangeId, u32)>,
        at: DateTime<Utc>,
    },
    /// Stop dispatching until an operator resumes (systemic problem).
    Pause {
        reason: String,
        at: DateTime<Utc>,
    },
    Resume {
        by: String,
        at: DateTime<Utc>,
    },
    /// Hold a downstream that fails as in an outage (no-op when it is held already).
    HoldDownstream {
        downstream: Downstream,
        reason: String,
        at: DateTime<Utc>,
    },
    /// A probe of a held downstream got an answer (no-op when it is not held).
    ResumeDownstream {
        downstream: Downstream,
        at: DateTime<Utc>,
    },
    /// Close the bulk change once every device is final; while it is `CANCELLING`, once no
    /// call is in flight and no Rev creation is unresolved (its open devices end `CANCELLED`).
    Complete {
        at: DateTime<Utc>,
    },
    /// An operator stops the bulk change: no new carrier call starts (no-op when cancelling).
    Cancel {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// An operator gives every device that ended `API_FAILED` a new round of attempts.
    RetryFailed {
        by: String,
        at: DateTime<Utc>,
    },
}

/// The outcome of one attempt of one step for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub device_change_id: DeviceChangeId,
    pub step: Step,
    pub attempt: u32,
    pub outcome: StepOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepOutcome {
    DeviceStatus {
        from: SimStatus,
        already_at_target: bool,
        calls: Vec<ApiCall>,
    },
    ServiceStatus {
        flag: ServiceFlag,
        call: ApiCall,
    },
    RevService {
        rev_service_id: i64,
        number: String,
        adopted: bool,
        calls: Vec<ApiCall>,
    },
    Failed {
        class: FailureClass,
        reason: String,
        calls: Vec<ApiCall>,
    },
}

/// How a failed attempt is treated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FailureClass {
    /// 5xx, timeout, connection error, 429: try again later.
    Retryable {
        retry_after_secs: Option<u64>,
        /// The request may have taken effect.
        outcome_unknown: bool,
        /// The server asked to slow down (429): flow control, not a failure of the device, so it
        /// does not use up the step's attempts (up to [`super::MAX_THROTTLES`]).
        #[serde(default)]
        throttled: bool,
        /// Nothing was sent: the attempt only looked an earlier, unresolved Rev creation up (and
        /// found nothing), or was not sent in time. Due again at once, not counted.
        #[serde(default)]
        not_sent: bool,
    },
    /// 4xx and business rules (unknown ICCID, terminated SIM): no retry.
    Permanent,
    /// The whole bulk change cannot proceed (401/403, writes disabled): pause, do not charge the device.
    Systemic,
}
