//! Re-derives one bulk change's read-model rows from its events alone, in memory, and compares
//! them with the live rows field by field (for `bulkflow replay --verify`, the crash tests and
//! the property tests). The fold follows the same row operations ([`super::rows::ops`]) with the
//! projector's semantics: inserts that keep an existing row, updates guarded by sequence.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Row;

use super::rows::{ops, RowOp};
use crate::domain::BulkChangeId;
use crate::store::catchup::{Checkpoint, StoredEvent};
use crate::store::{Db, Error, EventStore};
use crate::with_pool;

/// The `device_bulk_change` row.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct BulkState {
    pub tenant_id: i64,
    pub service_provider_id: i64,
    pub change_request_type: String,
    pub integration: String,
    pub status: String,
    pub status_details: Option<String>,
    pub requested_by: Option<String>,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub workflow_hash: String,
    pub total: i64,
    pub processed: i64,
    pub failed: i64,
    pub billing_warnings: i64,
    pub cancelled: i64,
    pub created_date: Option<DateTime<Utc>>,
    pub started_date: Option<DateTime<Utc>>,
    pub processed_date: Option<DateTime<Utc>>,
    pub processed_by: Option<String>,
    pub last_sequence: i64,
}

/// An `m2m_device_change` row.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct DeviceState {
    pub bulk_change_id: i64,
    pub iccid: String,
    pub msisdn: Option<String>,
    pub change_request: String,
    pub status: String,
    pub status_details: Option<String>,
    pub is_processed: bool,
    pub has_errors: bool,
    pub rev_service_id: Option<i64>,
    pub attempts: i32,
    pub processed_date: Option<DateTime<Utc>>,
    pub processed_by: Option<String>,
    pub last_sequence: i64,
}

/// A `device_bulk_change_log` row.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct LogState {
    pub m2m_device_change_id: Option<i64>,
    pub log_entry_description: String,
    pub request_text: Option<String>,
    pub response_text: Option<String>,
    pub error_text: Option<String>,
    pub has_errors: bool,
    pub response_status: String,
    pub processed_by: Option<String>,
    pub processed_date: Option<DateTime<Utc>>,
}

/// All read-model rows of one bulk change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    pub bulk: Option<BulkState>,
    pub devices: BTreeMap<i64, DeviceState>,
    pub logs: BTreeMap<i64, LogState>,
}

/// Databases keep microseconds.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Folds the row operations of `events` (in stream order) into rows.
pub fn fold(events: &[StoredEvent]) -> Rows {
    let mut rows = Rows::default();
    for event in events {
        for op in ops(event) {
            apply(&mut rows, op);
        }
    }
    rows
}

fn apply(rows: &mut Rows, op: RowOp) {
    match op {
        RowOp::InsertBulk(b, seq) => {
            rows.bulk.get_or_insert(BulkState {
                tenant_id: b.tenant_id,
                service_provider_id: b.service_provider_id,
                change_request_type: b.change_request_type,
                integration: b.integration,
                status: "NEW".into(),
                requested_by: b.requested_by,
                workflow_name: b.workflow_name,
                workflow_version: b.workflow_version,
                workflow_hash: b.workflow_hash,
                total: b.total,
                created_date: Some(micros(b.created_date)),
                last_sequence: seq,
                ..BulkState::default()
            });
        }
        RowOp::InsertDevices(devices, seq) => {
            for d in devices {
                rows.devices.entry(d.id).or_insert(DeviceState {
                    bulk_change_id: d.bulk_change_id,
                    iccid: d.iccid,
                    msisdn: d.msisdn,
                    change_request: d.change_request,
                    status: "NEW".into(),
                    last_sequence: seq,
                    ..DeviceState::default()
                });
            }
        }
        RowOp::BulkStatus {
            status,
            details,
            started_date,
            processed_date,
            processed_by,
            sequence,
            ..
        } => {
            // `<=`: a status is last-write-wins, so an event may set it after its own counts.
            if let Some(b) = rows.bulk.as_mut().filter(|b| b.last_sequence <= sequence) {
                b.status = status.as_str().into();
                b.status_details = details;
                b.started_date = started_date.map(micros).or(b.started_date);
                b.processed_date = processed_date.map(micros).or(b.processed_date);
                b.processed_by = processed_by.or(b.processed_by.take());
                b.last_sequence = sequence;
            }
        }
        // Throughput is not among the rows compared (a count a second, from the same events).
        RowOp::Ended { .. } => {}
        RowOp::BulkCounts {
            processed,
            failed,
            billing_warnings,
            cancelled,
            sequence,
            ..
        } => {
            if let Some(b) = rows.bulk.as_mut().filter(|b| b.last_sequence < sequence) {
                b.processed += processed;
                b.failed += failed;
                b.billing_warnings += billing_warnings;
                b.cancelled += cancelled;
                b.last_sequence = sequence;
            }
        }
        RowOp::Device(u) => {
            if let Some(d) = rows
                .devices
                .get_mut(&u.id)
                .filter(|d| d.last_sequence < u.sequence)
            {
                d.status = u.status.as_str().into();
                d.status_details = Some(u.details);
                d.is_processed = u.is_processed;
                d.has_errors = u.has_errors;
                d.rev_service_id = u.rev_service_id.or(d.rev_service_id);
                if u.attempts > 0 {
                    d.attempts = u.attempts;
                }
                d.processed_date = u.processed_date.map(micros);
                d.processed_by = u.processed_by.or(d.processed_by.take());
                d.last_sequence = u.sequence;
            }
        }
        RowOp::Log(l) => {
            rows.logs.entry(l.event_sequence).or_insert(LogState {
                m2m_device_change_id: l.m2m_device_change_id,
                log_entry_description: l.log_entry_description,
                request_text: l.request_text,
                response_text: l.response_text,
                error_text: l.error_text,
                has_errors: l.has_errors,
                response_status: l.response_status.into(),
                processed_by: l.processed_by,
                processed_date: Some(micros(l.processed_date)),
            });
        }
    }
}

/// The rows a bulk change's events say the read models must hold.
pub async fn expected(
    store: &EventStore,
    id: BulkChangeId,
) -> Result<Rows, crate::store::event_store::Error> {
    let events: Vec<StoredEvent> = store
        .events(id)
        .await?
        .into_iter()
        .map(|e| StoredEvent {
            checkpoint: Checkpoint::default(),
            aggregate_id: e.aggregate_id,
            sequence: e.sequence as i64,
            event: e.payload,
            metadata: e.metadata,
        })
        .collect();
    Ok(fold(&events))
}

const BULK: &str = "SELECT tenant_id, service_provider_id, change_request_type, integration, status,
    status_details, requested_by, workflow_name, workflow_version, workflow_hash, total, processed,
    failed, billing_warnings, created_date, started_date, processed_date, processed_by, last_sequence,
    cancelled
    FROM device_bulk_change WHERE id = $1";
const DEVICES: &str =
    "SELECT id, bulk_change_id, iccid, msisdn, change_request, status, status_details,
    is_processed, has_errors, rev_service_id, attempts, processed_date, processed_by, last_sequence
    FROM m2m_device_change WHERE bulk_change_id = $1";
const LOGS: &str =
    "SELECT event_sequence, m2m_device_change_id, log_entry_description, request_text,
    response_text, error_text, has_errors, response_status, processed_by, processed_date
    FROM device_bulk_change_log WHERE bulk_change_id = $1";

/// The live rows of one bulk change.
pub async fn live(db: &Db, id: BulkChangeId) -> Result<Rows, Error> {
    let id = id.get();
    Ok(with_pool!(db, pool => {
        let bulk = sqlx::query(BULK)
            .bind(id)
            .fetch_optional(pool)
            .await?
            .map(|r| BulkState {
                tenant_id: r.get(0),
                service_provider_id: r.get(1),
                change_request_type: r.get(2),
                integration: r.get(3),
                status: r.get(4),
                status_details: r.get(5),
                requested_by: r.get(6),
                workflow_name: r.get(7),
                workflow_version: r.get(8),
                workflow_hash: r.get(9),
                total: r.get(10),
                processed: r.get(11),
                failed: r.get(12),
                billing_warnings: r.get(13),
                created_date: r.get::<Option<DateTime<Utc>>, _>(14).map(micros),
                started_date: r.get::<Option<DateTime<Utc>>, _>(15).map(micros),
                processed_date: r.get::<Option<DateTime<Utc>>, _>(16).map(micros),
                processed_by: r.get(17),
                last_sequence: r.get(18),
                cancelled: r.get(19),
            });
        let devices = sqlx::query(DEVICES)
            .bind(id)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                (
                    r.get::<i64, _>(0),
                    DeviceState {
                        bulk_change_id: r.get(1),
                        iccid: r.get(2),
                        msisdn: r.get(3),
                        change_request: r.get(4),
                        status: r.get(5),
                        status_details: r.get(6),
                        is_processed: r.get(7),
                        has_errors: r.get(8),
                        rev_service_id: r.get(9),
                        attempts: r.get(10),
                        processed_date: r.get::<Option<DateTime<Utc>>, _>(11).map(micros),
                        processed_by: r.get(12),
                        last_sequence: r.get(13),
                    },
                )
            })
            .collect();
        let logs = sqlx::query(LOGS)
            .bind(id)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                (
                    r.get::<i64, _>(0),
                    LogState {
                        m2m_device_change_id: r.get(1),
                        log_entry_description: r.get(2),
                        request_text: r.get(3),
                        response_text: r.get(4),
                        error_text: r.get(5),
                        has_errors: r.get(6),
                        response_status: r.get(7),
                        processed_by: r.get(8),
                        processed_date: r.get::<Option<DateTime<Utc>>, _>(9).map(micros),
                    },
                )
            })
            .collect();
        Rows {
            bulk,
            devices,
            logs,
        }
    }))
}

/// Differences between expected and live rows, one line each, naming the row and field.
pub fn diff(expected: &Rows, live: &Rows) -> Vec<String> {
    let mut out = Vec::new();
    match (&expected.bulk, &live.bulk) {
        (Some(e), Some(l)) if e != l => {
            out.push(format!("device_bulk_change: expected {e:?}, found {l:?}"))
        }
        (Some(_), None) => out.push("device_bulk_change: row missing".into()),
        (None, Some(_)) => out.push("device_bulk_change: unexpected row".into()),
        _ => {}
    }
    compare(
        &mut out,
        "m2m_device_change id",
        &expected.devices,
        &live.devices,
    );
    compare(
        &mut out,
        "device_bulk_change_log event_sequence",
        &expected.logs,
        &live.logs,
    );
    out
}

/// `field: expected X, found Y` for every field that differs.
fn fields<T: serde::Serialize>(expected: &T, live: &T) -> String {
    let (e, l) = (serde_json::to_value(expected), serde_json::to_value(live));
    let (Ok(serde_json::Value::Object(e)), Ok(serde_json::Value::Object(l))) = (e, l) else {
        return "rows differ".into();
    };
    e.iter()
        .filter(|(k, v)| l.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: expected {v}, found {}",
                l.get(k).cloned().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn compare<T: PartialEq + serde::Serialize>(
    out: &mut Vec<String>,
    what: &str,
    expected: &BTreeMap<i64, T>,
    live: &BTreeMap<i64, T>,
) {
    for (key, e) in expected {
        match live.get(key) {
            None => out.push(format!("{what} {key}: row missing")),
            Some(l) if l != e => out.push(format!("{what} {key}: {}", fields(e, l))),
            _ => {}
        }
    }
    for key in live.keys().filter(|k| !expected.contains_key(k)) {
        out.push(format!("{what} {key}: unexpected row"));
    }
}
