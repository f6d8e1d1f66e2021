//! The audit timeline of one bulk change, from its events alone (`bulkflow replay`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::bulk_change::BulkChangeEvent as E;
use crate::domain::ApiCall;

/// One thing that happened to a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub at: DateTime<Utc>,
    pub step: String,
    pub attempt: u32,
    /// `ok`, `retry`, `failed`, `intent`, `processed`.
    pub outcome: String,
    pub detail: String,
    pub calls: Vec<ApiCall>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceTimeline {
    pub device_change_id: i64,
    pub iccid: String,
    pub msisdn: Option<String>,
    pub target: String,
    pub rev_service: bool,
    /// `NEW`, `PROCESSED`, `API_FAILED`, …
    pub status: String,
    pub entries: Vec<Entry>,
}

/// Bulk-change level facts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Milestone {
    pub at: DateTime<Utc>,
    pub what: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Timeline {
    pub bulk_change_id: i64,
    pub tenant_id: i64,
    pub service_provider_id: i64,
    pub workflow: String,
    pub workflow_hash: String,
    pub status: String,
    pub milestones: Vec<Milestone>,
    pub devices: Vec<DeviceTimeline>,
}

impl Timeline {
    /// Builds the timeline from the events, in order.
    pub fn from_events(events: &[E]) -> Self {
        let mut t = Timeline {
            status: "NEW".into(),
            ..Default::default()
        };
        let mut index: BTreeMap<i64, usize> = BTreeMap::new();
        for event in events {
            let mut entry = |id: i64, entry: Entry, status: Option<&str>| {
                if let Some(&i) = index.get(&id) {
                    t.devices[i].entries.push(entry);
                    if let Some(s) = status {
                        t.devices[i].status = s.into();
                    }
                }
            };
            match event {
                E::BulkChangeAccepted(e) => {
                    t.bulk_change_id = e.bulk.bulk_change_id.get();
                    t.tenant_id = e.bulk.tenant_id.get();
                    t.service_provider_id = e.bulk.service_provider_id.get();
                    t.workflow = format!("{} v{}", e.workflow.name, e.workflow.version);
                    t.workflow_hash = e.workflow.hash.clone();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "accepted".into(),
                        detail: format!(
                            "{} × {}, {} devices, workflow {} ({}), requested by {}",
                            e.change_request_type,
                            e.integration,
                            e.device_count,
                            t.workflow,
                            &e.workflow.hash[..12.min(e.workflow.hash.len())],
                            e.requested_by.as_deref().unwrap_or("-")
                        ),
                    });
                }
                E::DevicesAdded(e) => {
                    for d in &e.devices {
                        index.insert(d.device_change_id.get(), t.devices.len());
                        t.devices.push(DeviceTimeline {
                            device_change_id: d.device_change_id.get(),
                            iccid: d.iccid.to_string(),
                            msisdn: d.msisdn.as_ref().map(ToString::to_string),
                            target: d.target_status.to_string(),
                            rev_service: d.rev_service.is_some(),
                            status: "NEW".into(),
                            entries: vec![],
                        });
                    }
                }
                E::BulkChangeStarted(e) => {
                    t.status = "PROCESSING".into();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "started".into(),
                        detail: format!("by {}", e.worker),
                    });
                }
                E::BulkChangePaused(e) => {
                    t.status = "PAUSED".into();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "paused".into(),
                        detail: e.reason.clone(),
                    });
                }
                E::DownstreamHeld(e) => {
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: format!("{} held", e.downstream.title()),
                        detail: e.reason.clone(),
                    });
                }
                E::DownstreamResumed(e) => {
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: format!("{} resumed", e.downstream.title()),
                        detail: "a probe got an answer".into(),
                    });
                }
                E::BulkChangeResumed(e) => {
                    t.status = "PROCESSING".into();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "resumed".into(),
                        detail: format!("by {}", e.by),
                    });
                }
                E::BulkChangeCompleted(e) => {
                    t.status = e.status.to_string();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "completed".into(),
                        detail: format!(
                            "{}: {} devices, {} processed ({} with billing warnings), {} failed",
                            e.status, e.total, e.processed, e.billing_warnings, e.failed
                        ),
                    });
                }
                E::BulkChangeCancelRequested(e) => {
                    t.status = "CANCELLING".into();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "cancel requested".into(),
                        detail: format!("by {}: {}", e.by, e.reason),
                    });
                }
                E::BulkChangeCancelled(e) => {
                    t.status = "CANCELLED".into();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: "cancelled".into(),
                        detail: format!(
                            "by {}: {} devices, {} processed ({} with billing warnings), {} failed, {} cancelled",
                            e.by, e.total, e.processed, e.billing_warnings, e.failed, e.cancelled
                        ),
                    });
                }
                E::FailedDevicesRetried(e) => {
                    t.status = e.status.to_string();
                    t.milestones.push(Milestone {
                        at: e.at,
                        what: format!("retry-failed round {}", e.round),
                        detail: format!(
                            "by {}: {} failed devices get a new round of attempts",
                            e.by,
                            e.devices.len()
                        ),
                    });
                    for r in &e.devices {
                        entry(
                            r.device.device_change_id.get(),
                            Entry {
                                at: e.at,
                                step: r.step.to_string(),
                                attempt: r.next_attempt,
                                outcome: "retry-failed".into(),
                                detail: format!(
                                    "round {} asked by {}: attempt {} next",
                                    e.round, e.by, r.next_attempt
                                ),
                                calls: vec![],
                            },
                            Some("PENDING"),
                        );
                    }
                }
                E::DevicesCancelled(e) => {
                    for c in &e.devices {
                        entry(
                            c.device.device_change_id.get(),
                            Entry {
                                at: e.at,
                                step: "done".into(),
                                attempt: 0,
                                outcome: "cancelled".into(),
                                detail: crate::domain::bulk_change::cancelled_details(c.step),
                                calls: vec![],
                            },
                            Some("CANCELLED"),
                        );
                    }
                }
                E::DeviceStatusUpdated(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: "device_status".into(),
                        attempt: e.attempt,
                        outcome: "ok".into(),
                        detail: if e.already_at_target {
                            format!(
                                "already {} ({} / {})",
                                e.to, e.from.status_of_sim, e.from.status
                            )
                        } else {
                            format!("{} / {} -> {}", e.from.status_of_sim, e.from.status, e.to)
                        },
                        calls: e.calls.clone(),
                    },
                    Some("PROCESSING"),
                ),
                E::ServiceStatusUpdated(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: "service_status".into(),
                        attempt: e.attempt,
                        outcome: "ok".into(),
                        detail: format!("flags {}", e.flag.as_str()),
                        calls: vec![e.call.clone()],
                    },
                    Some("PROCESSING"),
                ),
                E::RevServiceCreationStarted(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: "rev_service".into(),
                        attempt: e.attempt,
                        outcome: "intent".into(),
                        detail: format!("about to create a Rev service for {}", e.number),
                        calls: vec![],
                    },
                    None,
                ),
                E::RevServiceCreated(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: "rev_service".into(),
                        attempt: e.attempt,
                        outcome: "ok".into(),
                        detail: format!(
                            "Rev service {} for {}{}",
                            e.rev_service_id,
                            e.number,
                            if e.adopted {
                                " (adopted: created by an earlier attempt)"
                            } else {
                                ""
                            }
                        ),
                        calls: e.calls.clone(),
                    },
                    None,
                ),
                E::RevServiceFailed(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: "rev_service".into(),
                        attempt: e.attempt,
                        outcome: "failed".into(),
                        detail: e.reason.clone(),
                        calls: e.calls.clone(),
                    },
                    None,
                ),
                E::DeviceStepRetryScheduled(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: e.step.to_string(),
                        attempt: e.failed_attempt,
                        outcome: "retry".into(),
                        detail: format!(
                            "{}; attempt {} due {}{}",
                            e.reason,
                            e.next_attempt,
                            e.due_at.format("%H:%M:%S%.3f"),
                            if e.outcome_unknown {
                                " (outcome unknown)"
                            } else {
                                ""
                            }
                        ),
                        calls: e.calls.clone(),
                    },
                    Some("PENDING"),
                ),
                E::DeviceFailed(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: e.step.to_string(),
                        attempt: e.attempt,
                        outcome: "failed".into(),
                        detail: match &e.error_code {
                            Some(code) => format!("[{code}] {}", e.reason),
                            None => e.reason.clone(),
                        },
                        calls: e.calls.clone(),
                    },
                    Some("API_FAILED"),
                ),
                E::DeviceProcessed(e) => entry(
                    e.device.device_change_id.get(),
                    Entry {
                        at: e.at,
                        step: "done".into(),
                        attempt: 0,
                        outcome: "processed".into(),
                        detail: match &e.billing_warning {
                            Some(w) => format!("{}; WARNING: {w}", e.summary),
                            None => e.summary.clone(),
                        },
                        calls: vec![],
                    },
                    Some("PROCESSED"),
                ),
            }
        }
        t
    }

    /// Keeps only the device with this ICCID (or device change id).
    pub fn only_device(&mut self, key: &str) -> bool {
        self.devices
            .retain(|d| d.iccid == key || d.device_change_id.to_string() == key);
        !self.devices.is_empty()
    }

    /// Human-readable rendering: milestones, then a table per device.
    pub fn render(&self, with_calls: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "bulk change {}  tenant {}  service provider {}  {}",
            self.bulk_change_id, self.tenant_id, self.service_provider_id, self.status
        );
        for m in &self.milestones {
            let _ = writeln!(
                out,
                "  {}  {:<10} {}",
                m.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                m.what,
                m.detail
            );
        }
        for d in &self.devices {
            let _ = writeln!(
                out,
                "\ndevice {}  ICCID {}  MSISDN {}  target {}{}  -> {}",
                d.device_change_id,
                d.iccid,
                d.msisdn.as_deref().unwrap_or("-"),
                d.target,
                if d.rev_service { " + Rev service" } else { "" },
                d.status
            );
            let _ = writeln!(
                out,
                "  {:<12}  {:<14} {:>3}  {:<9} detail",
                "time", "step", "try", "outcome"
            );
            for e in &d.entries {
                let attempt = if e.attempt == 0 {
                    "-".to_string()
                } else {
                    e.attempt.to_string()
                };
                let _ = writeln!(
                    out,
                    "  {:<12}  {:<14} {:>3}  {:<9} {}",
                    e.at.format("%H:%M:%S%.3f"),
                    e.step,
                    attempt,
                    e.outcome,
                    e.detail
                );
                if with_calls {
                    for c in &e.calls {
                        let _ = writeln!(
                            out,
                            "{:>32} {} -> {} ({} ms)",
                            "",
                            c.request_text(),
                            c.response_text(),
                            c.duration_ms
                        );
                    }
                }
            }
        }
        out
    }
}
