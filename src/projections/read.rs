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
const COUNTS: &str =
    "SELECT status, COUNT(*) FROM m2m_device_change WHERE bulk_change_id = $1 GROUP BY status";

pub async fn bulk_summary(db: &Db, id: BulkChangeId) -> Result<Option<BulkSummary>, Error> {
    let (row, counts): (Option<Row>, Vec<(String, i64)>) = with_pool!(db, pool => (
        sqlx::query_as(BULK)
            .bind(id.get())
            .fetch_optional(pool)
            .await?,
        sqlx::query_as(COUNTS).bind(id.get()).fetch_all(pool).await?,
    ));
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
    }))
}

/// The largest bulk change id in the read model (0 when empty).
pub async fn max_bulk_change_id(db: &Db) -> Result<i64, Error> {
    const SQL: &str = "SELECT COALESCE(MAX(id), 0) FROM device_bulk_change";
    Ok(with_pool!(db, pool => sqlx::query_scalar(SQL).fetch_one(pool).await?))
}
