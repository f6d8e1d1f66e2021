//! Queries over the read models, for `bulkflow status` and the demo summary.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::BulkChangeId;
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
    pub workflow: String,
    pub workflow_hash: String,
    pub created_date: DateTime<Utc>,
    pub processed_date: Option<DateTime<Utc>>,
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
        self.processed + self.failed + self.cancelled()
    }

    /// Devices that ended `CANCELLED`.
    pub fn cancelled(&self) -> i64 {
        self.devices_by_status
            .get("CANCELLED")
            .copied()
            .unwrap_or(0)
    }

    /// Finished devices a second since it started (until it ended, or now).
    pub fn rate(&self, now: DateTime<Utc>) -> Option<f64> {
        let start = self.started_date?;
        let end = self.processed_date.unwrap_or(now);
        let secs = (end - start).num_milliseconds() as f64 / 1_000.0;
        (secs > 0.0 && self.finished() > 0).then(|| self.finished() as f64 / secs)
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
        "SELECT id, tenant_id, status, total, processed, failed, created_date, processed_date
        FROM device_bulk_change
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
);

const BULK: &str = "SELECT id, status, status_details, total, processed, failed, billing_warnings,
    workflow_name, workflow_version, workflow_hash, created_date, processed_date
    FROM device_bulk_change WHERE id = $1";
const MORE: &str = "SELECT tenant_id, started_date FROM device_bulk_change WHERE id = $1";
const LEASE: &str = "SELECT owner, expires_at FROM bulk_change_leases WHERE bulk_change_id = $1";
const COUNTS: &str =
    "SELECT status, COUNT(*) FROM m2m_device_change WHERE bulk_change_id = $1 GROUP BY status";

pub async fn bulk_summary(db: &Db, id: BulkChangeId) -> Result<Option<BulkSummary>, Error> {
    type More = Option<(i64, Option<DateTime<Utc>>)>;
    type Lease = Option<(String, DateTime<Utc>)>;
    let (row, counts, more, lease): (Option<Row>, Vec<(String, i64)>, More, Lease) = with_pool!(db, pool => (
        sqlx::query_as(BULK)
            .bind(id.get())
            .fetch_optional(pool)
            .await?,
        sqlx::query_as(COUNTS).bind(id.get()).fetch_all(pool).await?,
        sqlx::query_as(MORE).bind(id.get()).fetch_optional(pool).await?,
        sqlx::query_as(LEASE).bind(id.get()).fetch_optional(pool).await?,
    ));
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
    const SQL: &str =
        "SELECT id, iccid, msisdn, status, status_details, rev_service_id, attempts, processed_date
        FROM m2m_device_change
        WHERE bulk_change_id = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR id > $3)
        ORDER BY id LIMIT $4";
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
    let rows: Vec<Line> = with_pool!(db, pool => sqlx::query_as(SQL)
        .bind(id.get())
        .bind(status.clone())
        .bind(after)
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
