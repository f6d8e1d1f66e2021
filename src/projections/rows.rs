//! Event → row operations for `device_bulk_change`, `m2m_device_change` and
//! `device_bulk_change_log`. Pure, so rebuild and verify use the very same code.

use chrono::{DateTime, Utc};

use crate::domain::api_call::ApiCall;
use crate::domain::bulk_change::*;
use crate::domain::status::{BulkChangeStatus, DeviceStatus};
use crate::store::catchup::StoredEvent;

/// One `device_bulk_change` row as inserted on acceptance.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRow {
    pub id: i64,
    pub tenant_id: i64,
    pub service_provider_id: i64,
    pub change_request_type: String,
    pub integration: String,
    pub requested_by: Option<String>,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub workflow_hash: String,
    pub total: i64,
    pub created_date: DateTime<Utc>,
}

/// One `m2m_device_change` row as inserted on acceptance.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub id: i64,
    pub bulk_change_id: i64,
    pub tenant_id: i64,
    pub service_provider_id: i64,
    pub iccid: String,
    pub msisdn: Option<String>,
    pub change_request: String,
}

/// One `device_bulk_change_log` row.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub bulk_change_id: i64,
    pub event_sequence: i64,
    pub m2m_device_change_id: Option<i64>,
    pub log_entry_description: String,
    pub request_text: Option<String>,
    pub response_text: Option<String>,
    pub error_text: Option<String>,
    pub has_errors: bool,
    pub response_status: &'static str,
    pub processed_by: Option<String>,
    pub processed_date: DateTime<Utc>,
}

/// A change to the read side.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOp {
    InsertBulk(BulkRow, i64),
    InsertDevices(Vec<DeviceRow>, i64),
    BulkStatus {
        id: i64,
        status: BulkChangeStatus,
        details: Option<String>,
        started_date: Option<DateTime<Utc>>,
        processed_date: Option<DateTime<Utc>>,
        processed_by: Option<String>,
        sequence: i64,
    },
    BulkCounts {
        id: i64,
        processed: i64,
        failed: i64,
        billing_warnings: i64,
        cancelled: i64,
        sequence: i64,
    },
    Device(DeviceUpdate),
    Log(LogRow),
    /// A device worked to an end (processed or failed) at `at`: one more in that second of the
    /// bulk change's throughput, unless its row has seen `sequence` already.
    Ended {
        id: i64,
        at: DateTime<Utc>,
        sequence: i64,
    },
}

/// One `m2m_device_change` update, applied only if the row has not seen `sequence` yet.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpdate {
    pub id: i64,
    pub status: DeviceStatus,
    pub details: String,
    pub is_processed: bool,
    pub has_errors: bool,
    /// Kept from before when `None`.
    pub rev_service_id: Option<i64>,
    /// Kept from before when 0.
    pub attempts: i32,
    pub processed_date: Option<DateTime<Utc>>,
    /// Kept from before when `None`.
    pub processed_by: Option<String>,
    pub sequence: i64,
}

impl DeviceUpdate {
    /// Folds the later update `next` into this one, as applying both in order would.
    pub fn then(&mut self, next: DeviceUpdate) {
        let rev_service_id = next.rev_service_id.or(self.rev_service_id);
        let attempts = if next.attempts > 0 {
            next.attempts
        } else {
            self.attempts
        };
        let processed_by = next.processed_by.or_else(|| self.processed_by.take());
        *self = DeviceUpdate {
            rev_service_id,
            attempts,
            processed_by,
            ..next
        };
    }
}

fn texts(calls: &[ApiCall]) -> (Option<String>, Option<String>) {
    if calls.is_empty() {
        return (None, None);
    }
    let request = calls
        .iter()
        .map(ApiCall::request_text)
        .collect::<Vec<_>>()
        .join("\n");
    let response = calls
        .iter()
        .map(ApiCall::response_text)
        .collect::<Vec<_>>()
        .join("\n");
    (Some(request), Some(response))
}

/// The row operations one stored event leads to.
pub fn ops(stored: &StoredEvent) -> Vec<RowOp> {
    let seq = stored.sequence;
    let by = stored.metadata.get("worker").cloned();
    let log = |bulk: &BulkRef,
               device: Option<&DeviceRef>,
               description: String,
               calls: &[ApiCall],
               error: Option<String>,
               at: DateTime<Utc>| {
        let (request_text, response_text) = texts(calls);
        RowOp::Log(LogRow {
            bulk_change_id: bulk.bulk_change_id.get(),
            event_sequence: seq,
            m2m_device_change_id: device.map(|d| d.device_change_id.get()),
            log_entry_description: description,
            request_text,
            response_text,
            has_errors: error.is_some(),
            response_status: if error.is_some() {
                "ERROR"
            } else {
                "PROCESSED"
            },
            error_text: error,
            processed_by: by.clone(),
            processed_date: at,
        })
    };
    // A PROCESSING bulk change's status details and a log row saying the same.
    let processing_note =
        |bulk: &BulkRef, details: String, error: Option<String>, at: DateTime<Utc>| {
            vec![
                RowOp::BulkStatus {
                    id: bulk.bulk_change_id.get(),
                    status: BulkChangeStatus::Processing,
                    details: Some(details.clone()),
                    started_date: None,
                    processed_date: None,
                    processed_by: by.clone(),
                    sequence: seq,
                },
                log(bulk, None, details, &[], error, at),
            ]
        };
    let device = |d: &DeviceRef,
                  status: DeviceStatus,
                  details: String,
                  attempts: u32,
                  rev_service_id: Option<i64>,
                  has_errors: bool,
                  at: DateTime<Utc>| {
        RowOp::Device(DeviceUpdate {
            id: d.device_change_id.get(),
            status,
            details,
            is_processed: status.is_final(),
            has_errors,
            rev_service_id,
            attempts: attempts as i32,
            processed_date: status.is_final().then_some(at),
            processed_by: by.clone(),
            sequence: seq,
        })
    };
    match &stored.event {
        BulkChangeEvent::BulkChangeAccepted(e) => vec![RowOp::InsertBulk(
            BulkRow {
                id: e.bulk.bulk_change_id.get(),
                tenant_id: e.bulk.tenant_id.get(),
                service_provider_id: e.bulk.service_provider_id.get(),
                change_request_type: e.change_request_type.clone(),
                integration: e.integration.clone(),
                requested_by: e.requested_by.clone(),
                workflow_name: e.workflow.name.clone(),
                workflow_version: e.workflow.version as i32,
                workflow_hash: e.workflow.hash.clone(),
                total: e.device_count as i64,
                created_date: e.at,
            },
            seq,
        )],
        BulkChangeEvent::DevicesAdded(e) => vec![RowOp::InsertDevices(
            e.devices
                .iter()
                .map(|d| DeviceRow {
                    id: d.device_change_id.get(),
                    bulk_change_id: e.bulk.bulk_change_id.get(),
                    tenant_id: e.bulk.tenant_id.get(),
                    service_provider_id: e.bulk.service_provider_id.get(),
                    iccid: d.iccid.to_string(),
                    msisdn: d.msisdn.as_ref().map(ToString::to_string),
                    change_request: serde_json::to_string(d).unwrap_or_default(),
                })
                .collect(),
            seq,
        )],
        BulkChangeEvent::BulkChangeStarted(e) => vec![RowOp::BulkStatus {
            id: e.bulk.bulk_change_id.get(),
            status: BulkChangeStatus::Processing,
            details: None,
            started_date: Some(e.at),
            processed_date: None,
            processed_by: Some(e.worker.clone()),
            sequence: seq,
        }],
        BulkChangeEvent::DeviceStatusUpdated(e) => {
            let what = if e.already_at_target {
                format!("device status: already {}", e.to)
            } else {
                format!(
                    "device status: {} / {} -> {}",
                    e.from.status_of_sim, e.from.status, e.to
                )
            };
            vec![
                device(
                    &e.device,
                    DeviceStatus::Processing,
                    what.clone(),
                    e.attempt,
                    None,
                    false,
                    e.at,
                ),
                log(
                    &e.bulk,
                    Some(&e.device),
                    format!("POND {what}"),
                    &e.calls,
                    None,
                    e.at,
                ),
            ]
        }
        BulkChangeEvent::ServiceStatusUpdated(e) => {
            let what = format!("service status: {}", e.flag.as_str());
            vec![
                device(
                    &e.device,
                    DeviceStatus::Processing,
                    what.clone(),
                    e.attempt,
                    None,
                    false,
                    e.at,
                ),
                log(
                    &e.bulk,
                    Some(&e.device),
                    format!("POND {what}"),
                    std::slice::from_ref(&e.call),
                    None,
                    e.at,
                ),
            ]
        }
        BulkChangeEvent::RevServiceCreationStarted(_) => vec![],
        BulkChangeEvent::RevServiceCreated(e) => {
            let what = if e.adopted {
                format!(
                    "Rev service {} adopted (created by an earlier attempt)",
                    e.rev_service_id
                )
            } else {
                format!("Rev service {} created", e.rev_service_id)
            };
            vec![
                device(
                    &e.device,
                    DeviceStatus::Processing,
                    what.clone(),
                    e.attempt,
                    Some(e.rev_service_id),
                    false,
                    e.at,
                ),
                log(&e.bulk, Some(&e.device), what, &e.calls, None, e.at),
            ]
        }
        BulkChangeEvent::RevServiceFailed(e) => vec![log(
            &e.bulk,
            Some(&e.device),
            "Rev service creation failed".into(),
            &e.calls,
            Some(e.reason.clone()),
            e.at,
        )],
        BulkChangeEvent::DeviceStepRetryScheduled(e) => {
            let what = format!(
                "{} attempt {} failed; attempt {} due {}",
                e.step,
                e.failed_attempt,
                e.next_attempt,
                e.due_at.to_rfc3339()
            );
            vec![
                device(
                    &e.device,
                    DeviceStatus::Pending,
                    format!("{what}: {}", e.reason),
                    e.failed_attempt,
                    None,
                    false,
                    e.at,
                ),
                log(
                    &e.bulk,
                    Some(&e.device),
                    what,
                    &e.calls,
                    Some(e.reason.clone()),
                    e.at,
                ),
            ]
        }
        BulkChangeEvent::DeviceFailed(e) => vec![
            device(
                &e.device,
                DeviceStatus::ApiFailed,
                format!("{} failed: {}", e.step, e.reason),
                e.attempt,
                None,
                true,
                e.at,
            ),
            log(
                &e.bulk,
                Some(&e.device),
                format!("{} failed", e.step),
                &e.calls,
                Some(e.reason.clone()),
                e.at,
            ),
            RowOp::BulkCounts {
                id: e.bulk.bulk_change_id.get(),
                processed: 0,
                failed: 1,
                billing_warnings: 0,
                cancelled: 0,
                sequence: seq,
            },
            RowOp::Ended {
                id: e.bulk.bulk_change_id.get(),
                at: e.at,
                sequence: seq,
            },
        ],
        BulkChangeEvent::DeviceProcessed(e) => {
            let details = match &e.billing_warning {
                Some(w) => format!("{}; WARNING: {w}", e.summary),
                None => e.summary.clone(),
            };
            vec![
                RowOp::Device(DeviceUpdate {
                    id: e.device.device_change_id.get(),
                    status: DeviceStatus::Processed,
                    details,
                    is_processed: true,
                    has_errors: e.billing_warning.is_some(),
                    rev_service_id: None,
                    attempts: 0,
                    processed_date: Some(e.at),
                    processed_by: by.clone(),
                    sequence: seq,
                }),
                RowOp::BulkCounts {
                    id: e.bulk.bulk_change_id.get(),
                    processed: 1,
                    failed: 0,
                    billing_warnings: i64::from(e.billing_warning.is_some()),
                    cancelled: 0,
                    sequence: seq,
                },
                RowOp::Ended {
                    id: e.bulk.bulk_change_id.get(),
                    at: e.at,
                    sequence: seq,
                },
            ]
        }
        BulkChangeEvent::BulkChangePaused(e) => vec![
            RowOp::BulkStatus {
                id: e.bulk.bulk_change_id.get(),
                status: BulkChangeStatus::Paused,
                details: Some(e.reason.clone()),
                started_date: None,
                processed_date: None,
                processed_by: by.clone(),
                sequence: seq,
            },
            log(
                &e.bulk,
                None,
                "bulk change paused".into(),
                &[],
                Some(e.reason.clone()),
                e.at,
            ),
        ],
        BulkChangeEvent::BulkChangeResumed(e) => vec![RowOp::BulkStatus {
            id: e.bulk.bulk_change_id.get(),
            status: BulkChangeStatus::Processing,
            details: Some(format!("resumed by {}", e.by)),
            started_date: None,
            processed_date: None,
            processed_by: by.clone(),
            sequence: seq,
        }],
        BulkChangeEvent::DownstreamHeld(e) => processing_note(
            &e.bulk,
            format!(
                "{} held (outage: {}); probing until it answers",
                e.downstream.title(),
                e.reason
            ),
            Some(e.reason.clone()),
            e.at,
        ),
        BulkChangeEvent::DownstreamResumed(e) => processing_note(
            &e.bulk,
            format!("{} answers again; resumed", e.downstream.title()),
            None,
            e.at,
        ),
        BulkChangeEvent::BulkChangeCancelRequested(e) => {
            let details = format!("cancel requested by {}: {}", e.by, e.reason);
            vec![
                RowOp::BulkStatus {
                    id: e.bulk.bulk_change_id.get(),
                    status: BulkChangeStatus::Cancelling,
                    details: Some(details.clone()),
                    started_date: None,
                    processed_date: None,
                    processed_by: by.clone(),
                    sequence: seq,
                },
                log(&e.bulk, None, details, &[], None, e.at),
            ]
        }
        BulkChangeEvent::DevicesCancelled(e) => {
            let mut ops: Vec<RowOp> = e
                .devices
                .iter()
                .map(|c| {
                    device(
                        &c.device,
                        DeviceStatus::Cancelled,
                        cancelled_details(c.step),
                        0,
                        None,
                        false,
                        e.at,
                    )
                })
                .collect();
            ops.push(log(
                &e.bulk,
                None,
                format!("{} devices cancelled", e.devices.len()),
                &[],
                None,
                e.at,
            ));
            ops.push(RowOp::BulkCounts {
                id: e.bulk.bulk_change_id.get(),
                processed: 0,
                failed: 0,
                billing_warnings: 0,
                cancelled: e.devices.len() as i64,
                sequence: seq,
            });
            ops
        }
        BulkChangeEvent::BulkChangeCancelled(e) => vec![RowOp::BulkStatus {
            id: e.bulk.bulk_change_id.get(),
            status: BulkChangeStatus::Cancelled,
            details: Some(format!(
                "cancelled by {}: {}; {} devices: {} processed ({} with billing warnings), {} failed, {} cancelled",
                e.by, e.reason, e.total, e.processed, e.billing_warnings, e.failed, e.cancelled
            )),
            started_date: None,
            processed_date: Some(e.at),
            processed_by: by.clone(),
            sequence: seq,
        }],
        BulkChangeEvent::FailedDevicesRetried(e) => {
            let details = format!(
                "retry-failed round {} asked by {}: {} failed devices get a new round",
                e.round,
                e.by,
                e.devices.len()
            );
            // The counts first: their guard is strict, a status's is not (last-write-wins).
            let mut ops = vec![
                RowOp::BulkCounts {
                    id: e.bulk.bulk_change_id.get(),
                    processed: 0,
                    failed: -(e.devices.len() as i64),
                    billing_warnings: 0,
                    cancelled: 0,
                    sequence: seq,
                },
                RowOp::BulkStatus {
                    id: e.bulk.bulk_change_id.get(),
                    status: e.status,
                    details: Some(details.clone()),
                    started_date: None,
                    processed_date: None,
                    processed_by: by.clone(),
                    sequence: seq,
                },
            ];
            ops.extend(e.devices.iter().map(|r| {
                device(
                    &r.device,
                    DeviceStatus::Pending,
                    format!(
                        "retry-failed round {} asked by {}: {} attempt {} next",
                        e.round, e.by, r.step, r.next_attempt
                    ),
                    0,
                    None,
                    false,
                    e.at,
                )
            }));
            ops.push(log(&e.bulk, None, details, &[], None, e.at));
            ops
        }
        BulkChangeEvent::BulkChangeCompleted(e) => vec![RowOp::BulkStatus {
            id: e.bulk.bulk_change_id.get(),
            status: e.status,
            details: Some(format!(
                "{} devices: {} processed ({} with billing warnings), {} failed",
                e.total, e.processed, e.billing_warnings, e.failed
            )),
            started_date: None,
            processed_date: Some(e.at),
            processed_by: by.clone(),
            sequence: seq,
        }],
    }
}
