//! Queries over the read models, for `bulkflow status` and the demo summary.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{BulkChangeId, DeviceStatus};
use crate::store::{Db, Error};
use crate::with_pool;

/// The `device_bulk_change` row with device counts by status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BulkSummary {
    pub bulk_change_id: i64,
    pub status: String,
    pub status_details: Option<String>,
    pub total: i64,
    pub processed: i64,
    pub failed: i64,
    pub billing_warnings: i64,
    /// Devices that ended `CANCELLED`.
    pub cancelled: i64,
    pub workflow: String,
    pub workflow_hash: String,
    pub created_date: DateTime<Utc>,
    pub processed_date: Option<DateTime<Utc>>,
    /// Devices by status. Above [`COUNT_BY_STATUS_UP_TO`] devices, those not ended yet are
    /// counted together under `OPEN` (the ended ones come from the counters, so no scan).
    pub devices_by_status: BTreeMap<String, i64>,
    pub tenant_id: i64,
    /// When a worker first started it.
    pub started_date: Option<DateTime<Utc>>,
    /// The worker holding its lease now (driving it), if any.
    pub driving_worker: Option<String>,
}

impl BulkSummary {
    /// Devices that reached an end (processed, failed or cancelled).
    pub fn finished(&self) -> i64 {
        self.processed + self.failed + self.cancelled
    }

    /// Devices worked to an end (processed or failed; not cancelled ones) a second since it
    /// started (until it ended, or now).
    pub fn rate(&self, now: DateTime<Utc>) -> Option<f64> {
        let start = self.started_date?;
        let end = self.processed_date.unwrap_or(now);
        let secs = (end - start).num_milliseconds() as f64 / 1_000.0;
        let worked = self.processed + self.failed;
        (secs > 0.0 && worked > 0).then(|| worked as f64 / secs)
    }

    /// Seconds left at the current rate, while devices are left.
    pub fn eta_secs(&self, now: DateTime<Utc>) -> Option<f64> {
        let left = self.total - self.finished();
        if left <= 0 || self.processed_date.is_some() {
            return None;
        }
        self.rate(now).map(|r| left as f64 / r)
    }
}

/// One line of `bulkflow list`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BulkLine {
    pub bulk_change_id: i64,
    pub tenant_id: i64,
    pub status: String,
    pub total: i64,
    pub processed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub created_date: DateTime<Utc>,
    pub processed_date: Option<DateTime<Utc>>,
}

/// Which bulk changes `bulkflow list` shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// A status as the read model writes it (`PROCESSING`, `PROCESSED`, …), any case.
    pub status: Option<String>,
    pub tenant_id: Option<i64>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Only those with an id below this (the next page after a listed id).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// Bulk changes, newest first (by id), filtered.
pub async fn list_bulk_changes(db: &Db, filter: &ListFilter) -> Result<Vec<BulkLine>, Error> {
    const SQL: &str =
        "SELECT id, tenant_id, status, total, processed, failed, created_date, processed_date,
        cancelled FROM device_bulk_change
        WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR tenant_id = $2)
          AND ($3 IS NULL OR created_date >= $3) AND ($4 IS NULL OR id < $4)
        ORDER BY id DESC LIMIT $5";
    type Line = (
        i64,
        i64,
        String,
        i64,
        i64,
        i64,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        i64,
    );
    let status = filter.status.as_ref().map(|s| s.to_ascii_uppercase());
    let rows: Vec<Line> = with_pool!(db, pool => sqlx::query_as(SQL)
        .bind(status.clone())
        .bind(filter.tenant_id)
        .bind(filter.since)
        .bind(filter.before_id)
        .bind(filter.limit)
        .fetch_all(pool)
        .await?);
    Ok(rows
        .into_iter()
        .map(|r| BulkLine {
            bulk_change_id: r.0,
            tenant_id: r.1,
            status: r.2,
            total: r.3,
            processed: r.4,
            failed: r.5,
            created_date: r.6,
            processed_date: r.7,
            cancelled: r.8,
        })
        .collect())
}

type Row = (
    i64,
    String,
    Option<String>,
    i64,
    i64,
    i64,
    i64,
    String,
    i32,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    i64,
);

const BULK: &str = "SELECT id, status, status_details, total, processed, failed, billing_warnings,
    workflow_name, workflow_version, workflow_hash, created_date, processed_date, cancelled
    FROM device_bulk_change WHERE id = $1";

/// Up to this many devices, a summary counts them by status (a scan of them); above, devices
/// not ended yet are counted together (`OPEN`) from the counters, so a summary stays cheap.
pub const COUNT_BY_STATUS_UP_TO: i64 = 20_000;
const MORE: &str = "SELECT tenant_id, started_date FROM device_bulk_change WHERE id = $1";
const LEASE: &str = "SELECT owner, expires_at FROM bulk_change_leases WHERE bulk_change_id = $1";
const COUNTS: &str =
    "SELECT status, COUNT(*) FROM m2m_device_change WHERE bulk_change_id = $1 GROUP BY status";

pub async fn bulk_summary(db: &Db, id: BulkChangeId) -> Result<Option<BulkSummary>, Error> {
    type More = Option<(i64, Option<DateTime<Utc>>)>;
    type Lease = Option<(String, DateTime<Utc>)>;
    let (row, more, lease): (Option<Row>, More, Lease) = with_pool!(db, pool => (
        sqlx::query_as(BULK)
            .bind(id.get())
            .fetch_optional(pool)
            .await?,
        sqlx::query_as(MORE).bind(id.get()).fetch_optional(pool).await?,
        sqlx::query_as(LEASE).bind(id.get()).fetch_optional(pool).await?,
    ));
    let counts: Vec<(String, i64)> = match &row {
        Some(r) if r.3 <= COUNT_BY_STATUS_UP_TO => {
            with_pool!(db, pool => sqlx::query_as(COUNTS).bind(id.get()).fetch_all(pool).await?)
        }
        Some(r) => {
            let (processed, failed, cancelled) = (r.4, r.5, r.12);
            [
                ("PROCESSED", processed),
                ("API_FAILED", failed),
                ("CANCELLED", cancelled),
                ("OPEN", r.3 - processed - failed - cancelled),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.to_string(), n))
            .collect()
        }
        None => vec![],
    };
    let (tenant_id, started_date) = more.unwrap_or_default();
    let now = Utc::now();
    Ok(row.map(|r| BulkSummary {
        bulk_change_id: r.0,
        status: r.1,
        status_details: r.2,
        total: r.3,
        processed: r.4,
        failed: r.5,
        billing_warnings: r.6,
        workflow: format!("{} v{}", r.7, r.8),
        workflow_hash: r.9,
        created_date: r.10,
        processed_date: r.11,
        cancelled: r.12,
        devices_by_status: counts.into_iter().collect(),
        tenant_id,
        started_date,
        driving_worker: lease
            .filter(|(_, expires)| *expires > now && r.11.is_none())
            .map(|(owner, _)| owner),
    }))
}

/// The largest bulk change id in the read model (0 when empty).
pub async fn max_bulk_change_id(db: &Db) -> Result<i64, Error> {
    const SQL: &str = "SELECT COALESCE(MAX(id), 0) FROM device_bulk_change";
    Ok(with_pool!(db, pool => sqlx::query_scalar(SQL).fetch_one(pool).await?))
}

/// One device row of a bulk change, for the API.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceLine {
    pub device_change_id: i64,
    pub iccid: String,
    pub msisdn: Option<String>,
    pub status: String,
    pub status_details: Option<String>,
    pub rev_service_id: Option<i64>,
    pub attempts: i32,
    pub processed_date: Option<DateTime<Utc>>,
}

/// A bulk change's devices by id, after `after` (the next page), optionally in one status.
pub async fn devices(
    db: &Db,
    id: BulkChangeId,
    status: Option<&str>,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<DeviceLine>, Error> {
    // Each walks `(bulk_change_id, status, id)` from `after` (ids are positive); in any status,
    // one walk per status, merged (a manual skip scan: no index of its own, as every status
    // change of a device updates every index of its row). A condition like
    // `($2 IS NULL OR status = $2)` kept PostgreSQL from using the index (73 ms for a page near
    // the end of 100,000 devices). The walks of the statuses of devices not ended yet run only
    // while the bulk change's counters (same statement, same snapshot) say some device is
    // open: after a run, each of those walks would step over a dead index entry per device
    // until vacuum removes them (109 ms for the first page at 1,000,000 devices).
    const ONE: &str =
        "SELECT id, iccid, msisdn, status, status_details, rev_service_id, attempts, processed_date
        FROM m2m_device_change
        WHERE bulk_change_id = $1 AND status = $2 AND id > $3
        ORDER BY id LIMIT $4";
    const OPEN: &str = "
                        AND (SELECT total - processed - failed - cancelled
                               FROM device_bulk_change WHERE id = $1) > 0";
    static ANY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let any = ANY.get_or_init(|| {
        let walks: Vec<String> = DeviceStatus::ALL
            .iter()
            .map(|s| {
                let open = if s.is_final() { "" } else { OPEN };
                format!(
                    "SELECT * FROM (SELECT id, iccid, msisdn, status, status_details,
                            rev_service_id, attempts, processed_date FROM m2m_device_change
                      WHERE bulk_change_id = $1 AND status = '{}' AND id > $3{open}
                      ORDER BY id LIMIT $4) AS w{}",
                    s.as_str(),
                    s.as_str().to_ascii_lowercase()
                )
            })
            .collect();
        format!(
            "SELECT * FROM ({}) AS walks WHERE $2 IS NULL ORDER BY id LIMIT $4",
            walks.join(" UNION ALL ")
        )
    });
    type Line = (
        i64,
        String,
        Option<String>,
        String,
        Option<String>,
        Option<i64>,
        i32,
        Option<DateTime<Utc>>,
    );
    let status = status.map(str::to_ascii_uppercase);
    let sql = if status.is_some() { ONE } else { any.as_str() };
    let rows: Vec<Line> = with_pool!(db, pool => sqlx::query_as(sql)
        .bind(id.get())
        .bind(status.clone())
        .bind(after.unwrap_or(0))
        .bind(limit)
        .fetch_all(pool)
        .await?);
    Ok(rows
        .into_iter()
        .map(|r| DeviceLine {
            device_change_id: r.0,
            iccid: r.1,
            msisdn: r.2,
            status: r.3,
            status_details: r.4,
            rev_service_id: r.5,
            attempts: r.6,
            processed_date: r.7,
        })
        .collect())
}

/// Devices that ended, per time bucket, for a throughput chart.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Throughput {
    pub bucket_seconds: i64,
    /// (bucket start, devices that ended in it), oldest first; empty buckets left out.
    pub points: Vec<(DateTime<Utc>, i64)>,
}

/// At most this many buckets in a throughput chart.
const BUCKETS: i64 = 120;

/// How many devices of `id` were worked to an end (processed or failed; a device failed, retried
/// and then processed ends twice) per bucket between its start and its end (or now).
pub async fn throughput(db: &Db, summary: &BulkSummary) -> Result<Throughput, Error> {
    // One row a second of the run (kept by the projector), not one a device.
    const SQL: &str = "SELECT (at_second / $2) * $2, CAST(SUM(ended) AS BIGINT)
        FROM device_bulk_change_throughput WHERE bulk_change_id = $1
        GROUP BY 1 ORDER BY 1";
    let start = summary.started_date.unwrap_or(summary.created_date);
    let end = summary.processed_date.unwrap_or_else(Utc::now);
    let span = (end - start).num_seconds().max(1);
    let bucket_seconds = (span + BUCKETS - 1) / BUCKETS;
    let rows: Vec<(i64, i64)> = with_pool!(db, pool => sqlx::query_as(SQL)
        .bind(summary.bulk_change_id)
        .bind(bucket_seconds)
        .fetch_all(pool)
        .await?);
    Ok(Throughput {
        bucket_seconds,
        points: rows
            .into_iter()
            .filter_map(|(t, n)| Some((DateTime::<Utc>::from_timestamp(t, 0)?, n)))
            .collect(),
    })
}

/// Devices that failed (or finished with a billing warning) for the same reason.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailureGroup {
    /// `API_FAILED`, or `PROCESSED` for a billing warning.
    pub status: String,
    /// The reason with the device's own numbers (ICCIDs, ids) left out.
    pub reason: String,
    pub devices: i64,
    /// One device of the group, to open its timeline.
    pub example_device_change_id: i64,
}

/// `id`'s failures grouped by reason, the biggest group first.
pub async fn failures(db: &Db, id: BulkChangeId) -> Result<Vec<FailureGroup>, Error> {
    // A failed device has errors too: both come from the few rows with `has_errors` (a partial
    // index), not from every processed one.
    const SQL: &str = "SELECT status, status_details, COUNT(*), MIN(id) FROM m2m_device_change
        WHERE bulk_change_id = $1 AND has_errors AND status IN ('API_FAILED', 'PROCESSED')
        GROUP BY status, status_details";
    let rows: Vec<(String, Option<String>, i64, i64)> = with_pool!(db, pool => sqlx::query_as(SQL)
        .bind(id.get())
        .fetch_all(pool)
        .await?);
    let mut groups: Vec<FailureGroup> = Vec::new();
    for (status, details, devices, example) in rows {
        let reason = general(details.as_deref().unwrap_or("(no details)"));
        match groups
            .iter_mut()
            .find(|g| g.status == status && g.reason == reason)
        {
            Some(g) => {
                g.devices += devices;
                g.example_device_change_id = g.example_device_change_id.min(example);
            }
            None => groups.push(FailureGroup {
                status,
                reason,
                devices,
                example_device_change_id: example,
            }),
        }
    }
    groups.sort_by(|a, b| b.devices.cmp(&a.devices).then(a.reason.cmp(&b.reason)));
    Ok(groups)
}

/// A reason without the numbers that differ between devices (runs of 6 or more digits: ICCIDs,
/// MSISDNs, ids) and without the retry schedule's times.
fn general(details: &str) -> String {
    let mut out = String::with_capacity(details.len());
    let mut digits = String::new();
    for c in details.chars().chain(std::iter::once('\0')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if digits.len() >= 6 {
            out.push('…');
        } else {
            out.push_str(&digits);
        }
        digits.clear();
        if c != '\0' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reason_loses_the_numbers_of_its_device_only() {
        assert_eq!(
            super::general(
                "device_status failed: SIM 8901260882310000001 is Terminated (HTTP 404)"
            ),
            "device_status failed: SIM … is Terminated (HTTP 404)"
        );
    }
}
