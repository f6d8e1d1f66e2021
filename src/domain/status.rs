//! Status values. The string forms are those the platform's reports read (`NEW`, `PROCESSING`,
//! `PROCESSED`, `API_FAILED`, `ERROR`, …) and those of the POND API (`ENABLED`, `In-Service`, …).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `DeviceBulkChange.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BulkChangeStatus {
    /// Accepted, no device touched yet.
    #[default]
    New,
    Processing,
    /// Stopped by a systemic problem (bad credentials, writes disabled) until an operator resumes it.
    Paused,
    /// Completed with failures within the tolerated threshold.
    Processed,
    /// Completed with more failures than tolerated.
    Error,
    /// An operator asked to cancel it: no new carrier call starts; calls in flight finish and
    /// unresolved Rev creations are looked up before it ends `CANCELLED`.
    Cancelling,
    /// Ended by an operator's cancel: devices that had not finished ended `CANCELLED`.
    Cancelled,
}

impl BulkChangeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::Processing => "PROCESSING",
            Self::Paused => "PAUSED",
            Self::Processed => "PROCESSED",
            Self::Error => "ERROR",
            Self::Cancelling => "CANCELLING",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Processed | Self::Error | Self::Cancelled)
    }
}

impl fmt::Display for BulkChangeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `M2M_DeviceChange.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeviceStatus {
    #[default]
    New,
    /// Waiting for a scheduled retry.
    Pending,
    Processing,
    Processed,
    /// The carrier rejected the change (or retries ran out).
    ApiFailed,
    Error,
    /// Not finished when its bulk change was cancelled: no further call was made for it.
    Cancelled,
}

impl DeviceStatus {
    pub const ALL: [DeviceStatus; 7] = [
        Self::New,
        Self::Pending,
        Self::Processing,
        Self::Processed,
        Self::ApiFailed,
        Self::Error,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::Pending => "PENDING",
            Self::Processing => "PROCESSING",
            Self::Processed => "PROCESSED",
            Self::ApiFailed => "API_FAILED",
            Self::Error => "ERROR",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Processed | Self::ApiFailed | Self::Error | Self::Cancelled
        )
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The steps of the StatusUpdate × POND workflow, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    DeviceStatus,
    ServiceStatus,
    RevService,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::DeviceStatus, Step::ServiceStatus, Step::RevService];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceStatus => "device_status",
            Self::ServiceStatus => "service_status",
            Self::RevService => "rev_service",
        }
    }
}

impl Step {
    /// The system the step calls.
    pub fn downstream(self) -> Downstream {
        match self {
            Self::DeviceStatus | Self::ServiceStatus => Downstream::Pond,
            Self::RevService => Downstream::Rev,
        }
    }
}

/// The downstream systems a step may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Downstream {
    Pond,
    Rev,
}

impl Downstream {
    pub const ALL: [Downstream; 2] = [Downstream::Pond, Downstream::Rev];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pond => "pond",
            Self::Rev => "rev",
        }
    }

    /// The name people know it by.
    pub fn title(self) -> &'static str {
        match self {
            Self::Pond => "POND",
            Self::Rev => "Rev",
        }
    }
}

impl fmt::Display for Downstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetStatus {
    Active,
    Suspended,
    Terminated,
}

/// Why a target status was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown target status {0:?}; expected Active, Suspended or Terminated")]
pub struct UnknownTargetStatus(pub String);

impl FromStr for TargetStatus {
    type Err = UnknownTargetStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "active" | "activate" | "activated" => Ok(Self::Active),
            "suspended" | "suspend" => Ok(Self::Suspended),
            "terminated" | "terminate" => Ok(Self::Terminated),
            _ => Err(UnknownTargetStatus(s.chars().take(40).collect())),
        }
    }
}

impl TargetStatus {
    /// The value all three POND service flags take for this target.
    pub fn service_flag(self) -> ServiceFlag {
        match self {
            Self::Active => ServiceFlag::Enabled,
            Self::Suspended | Self::Terminated => ServiceFlag::Disabled,
        }
    }
}

impl fmt::Display for TargetStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A POND service flag (`simDataServiceStatus`, `simVoiceServiceStatus`, `simSmsServiceStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceFlag {
    Enabled,
    Disabled,
}

impl ServiceFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Disabled => "DISABLED",
        }
    }
}

/// What POND reported about a SIM (`GET …/sim/{ICCID}/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStatus {
    /// `statusOfSim`: `Pre-Service`, `In-Service` or `Terminated`.
    pub status_of_sim: String,
    /// Legacy `status`: `ACTIVE` or `SUSPENDED`.
    pub status: String,
    pub data: ServiceFlag,
    pub voice: ServiceFlag,
    pub sms: ServiceFlag,
}

impl SimStatus {
    pub fn is_terminated(&self) -> bool {
        self.status_of_sim.eq_ignore_ascii_case("Terminated")
    }

    /// Whether the SIM already is where `target` would put it.
    pub fn is_at(&self, target: TargetStatus) -> bool {
        let flags = |f: ServiceFlag| self.data == f && self.voice == f && self.sms == f;
        match target {
            TargetStatus::Terminated => self.is_terminated(),
            TargetStatus::Active => {
                !self.is_terminated()
                    && self.status.eq_ignore_ascii_case("ACTIVE")
                    && flags(ServiceFlag::Enabled)
            }
            TargetStatus::Suspended => {
                !self.is_terminated()
                    && self.status.eq_ignore_ascii_case("SUSPENDED")
                    && flags(ServiceFlag::Disabled)
            }
        }
    }
}
