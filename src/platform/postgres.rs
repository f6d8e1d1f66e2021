//! The platform on PostgreSQL: the portal's tables under their exact (quoted, mixed-case) names
//! in the configured schema. Their DDL, as bulkflow expects it, is in
//! `tests/fixtures/platform/postgres.sql` and `docs/platform.md`; bulkflow never creates them.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::mapping::{self, Builder, BulkRow, DeviceRow};
use super::writeback::WriteBatch;
use super::{Error, Loaded, Platform, Refusal};
use crate::config::PlatformSection;
use crate::domain::BulkChangeId;

/// Device rows read per query (the original read pages of 100).
const PAGE: i64 = 1_000;

/// A platform database on PostgreSQL.
pub struct PgPlatform {
    pool: PgPool,
    processed_by: String,
    sql: Sql,
}

/// The statements, with the schema written in.
struct Sql {
    bulk: String,
    skipped: String,
    page: String,
    refuse_row: String,
    refuse_rest: String,
    log: String,
    finish_bulk: String,
    end_devices: String,
    call_logs: String,
}

/// Serialises write-back transactions of all workers on the platform database, so that the
/// "insert a log row unless it is there" of two of them cannot both insert.
const WRITE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('bulkflow:platform-write-back', 0))";

impl Sql {
    fn new(schema: &str) -> Self {
        let bulk = format!("\"{schema}\".\"DeviceBulkChange\"");
        let devices = format!("\"{schema}\".\"M2M_DeviceChange\"");
        let log = format!("\"{schema}\".\"DeviceBulkChangeLog\"");
        let active = "\"IsActive\" AND NOT \"IsDeleted\"";
        Self {
            bulk: format!(
                "SELECT \"Id\", \"TenantId\"::bigint, \"Status\", \"ChangeRequestType\",
                        \"ServiceProviderId\"::bigint, \"Integration\", \"PortalTypeId\"::bigint,
                        \"CreatedBy\", \"IsActive\", \"IsDeleted\"
                   FROM {bulk} WHERE \"Id\" = $1"
            ),
            skipped: format!(
                "SELECT COUNT(*) FROM {devices}
                  WHERE \"BulkChangeId\" = $1 AND {active} AND \"IsProcessed\""
            ),
            page: format!(
                "SELECT \"Id\", \"ICCID\", \"MSISDN\", \"DeviceIdentifier\", \"ChangeRequest\"
                   FROM {devices}
                  WHERE \"BulkChangeId\" = $1 AND {active} AND NOT \"IsProcessed\" AND \"Id\" > $2
                  ORDER BY \"Id\" LIMIT $3"
            ),
            refuse_row: format!(
                "UPDATE {devices} SET \"Status\" = 'ERROR', \"StatusDetails\" = $3,
                        \"IsProcessed\" = true, \"HasErrors\" = true, \"ProcessedBy\" = $4,
                        \"ProcessedDate\" = $5
                  WHERE \"BulkChangeId\" = $1 AND \"Id\" = $2 AND NOT \"IsProcessed\""
            ),
            refuse_rest: format!(
                "UPDATE {devices} SET \"Status\" = 'ERROR', \"StatusDetails\" = $2,
                        \"IsProcessed\" = true, \"HasErrors\" = true, \"ProcessedBy\" = $3,
                        \"ProcessedDate\" = $4
                  WHERE \"BulkChangeId\" = $1 AND {active} AND NOT \"IsProcessed\""
            ),
            log: format!(
                "INSERT INTO {log} (\"BulkChangeId\", \"M2MDeviceChangeId\", \"LogEntryDescription\",
                        \"RequestText\", \"ResponseText\", \"ErrorText\", \"HasErrors\",
                        \"ResponseStatus\", \"ProcessedBy\", \"ProcessedDate\")
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            end_devices: format!(
                "UPDATE {devices} AS t SET \"Status\" = v.status, \"StatusDetails\" = v.details,
                        \"IsProcessed\" = true, \"HasErrors\" = v.has_errors,
                        \"ProcessedBy\" = $7, \"ProcessedDate\" = v.at
                   FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::boolean[],
                               $6::timestamp[]) AS v(bulk, id, status, details, has_errors, at)
                  WHERE t.\"Id\" = v.id AND t.\"BulkChangeId\" = v.bulk"
            ),
            call_logs: format!(
                "INSERT INTO {log} (\"BulkChangeId\", \"M2MDeviceChangeId\", \"LogEntryDescription\",
                        \"RequestText\", \"ResponseText\", \"ErrorText\", \"HasErrors\",
                        \"ResponseStatus\", \"ProcessedBy\", \"ProcessedDate\")
                 SELECT v.bulk, v.device, v.description, v.request, v.response, v.error, v.has_errors,
                        v.status, $10, v.at
                   FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::boolean[], $8::text[], $9::timestamp[])
                     AS v(bulk, device, description, request, response, error, has_errors, status, at)
                  WHERE NOT EXISTS (
                        SELECT 1 FROM {log} l
                         WHERE l.\"BulkChangeId\" = v.bulk
                           AND l.\"M2MDeviceChangeId\" IS NOT DISTINCT FROM v.device
                           AND l.\"ProcessedDate\" = v.at
                           AND l.\"LogEntryDescription\" = v.description)"
            ),
            finish_bulk: format!(
                "UPDATE {bulk} SET \"Status\" = $2, \"ProcessedBy\" = $3, \"ProcessedDate\" = $4,
                        \"ModifiedBy\" = $3, \"ModifiedDate\" = $4
                  WHERE \"Id\" = $1"
            ),
        }
    }
}

impl PgPlatform {
    /// A pool that connects when first used.
    pub fn connect_lazy(url: &SecretString, section: &PlatformSection) -> Result<Self, Error> {
        section.validate().map_err(|e| Error::Url(e.to_string()))?;
        let options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(|_| Error::Url(crate::store::redact_url(url.expose_secret())))?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Ok(Self::new(pool, section))
    }

    /// On an open pool.
    pub fn new(pool: PgPool, section: &PlatformSection) -> Self {
        Self {
            pool,
            processed_by: section.processed_by.clone(),
            sql: Sql::new(&section.schema),
        }
    }

    async fn load_bulk(&self, id: BulkChangeId) -> Result<Loaded, Error> {
        let Some(r) = sqlx::query(&self.sql.bulk)
            .bind(id.get())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(Loaded::NotFound);
        };
        let row = BulkRow {
            id: r.try_get(0)?,
            tenant_id: r.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
            status: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
            change_request_type: r.try_get(3)?,
            service_provider_id: r.try_get::<Option<i64>, _>(4)?.unwrap_or(0),
            integration: r.try_get(5)?,
            portal_type_id: r.try_get(6)?,
            created_by: r.try_get(7)?,
            is_active: r.try_get::<Option<bool>, _>(8)?.unwrap_or(true),
            is_deleted: r.try_get::<Option<bool>, _>(9)?.unwrap_or(false),
        };
        if mapping::is_finished(&row.status) {
            return Ok(Loaded::Finished(row.status));
        }
        let skipped: i64 = sqlx::query_scalar(&self.sql.skipped)
            .bind(id.get())
            .fetch_one(&self.pool)
            .await?;
        let mut builder = match Builder::new(&row, skipped.max(0) as u64) {
            Ok(builder) => builder,
            Err(refusal) => return Ok(Loaded::Refused(refusal)),
        };
        // Keyset pages: a proxy or a statement timeout never sees one huge result, and memory
        // holds one page of rows besides the devices mapped so far.
        let mut after = 0i64;
        loop {
            let rows = sqlx::query(&self.sql.page)
                .bind(id.get())
                .bind(after)
                .bind(PAGE)
                .fetch_all(&self.pool)
                .await?;
            let n = rows.len() as i64;
            for r in rows {
                let row = DeviceRow {
                    id: r.try_get(0)?,
                    iccid: r.try_get(1)?,
                    msisdn: r.try_get(2)?,
                    device_identifier: r.try_get(3)?,
                    change_request: r.try_get(4)?,
                };
                after = row.id;
                builder.add(row);
            }
            if n < PAGE {
                break;
            }
        }
        Ok(match builder.finish() {
            Ok(request) => Loaded::Request(Box::new(request)),
            Err(refusal) => Loaded::Refused(refusal),
        })
    }

    async fn write_refusal(&self, id: BulkChangeId, refusal: &Refusal) -> Result<(), Error> {
        let now = Utc::now().naive_utc();
        let mut tx = self.pool.begin().await?;
        for (row, reason) in &refusal.rows {
            sqlx::query(&self.sql.refuse_row)
                .bind(id.get())
                .bind(row)
                .bind(reason)
                .bind(&self.processed_by)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            self.log_refusal(&mut tx, id, Some(*row), reason, now)
                .await?;
        }
        if refusal.rows.is_empty() {
            self.log_refusal(&mut tx, id, None, &refusal.reason, now)
                .await?;
        }
        let rest = format!("not run: the bulk change was refused ({})", refusal.reason);
        sqlx::query(&self.sql.refuse_rest)
            .bind(id.get())
            .bind(rest)
            .bind(&self.processed_by)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql.finish_bulk)
            .bind(id.get())
            .bind("ERROR")
            .bind(&self.processed_by)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn log_refusal(
        &self,
        tx: &mut sqlx::PgConnection,
        id: BulkChangeId,
        row: Option<i64>,
        reason: &str,
        now: chrono::NaiveDateTime,
    ) -> Result<(), Error> {
        sqlx::query(&self.sql.log)
            .bind(id.get())
            .bind(row)
            .bind("bulkflow: bulk change refused")
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(reason)
            .bind(true)
            .bind("ERROR")
            .bind(&self.processed_by)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

impl PgPlatform {
    async fn write_batch(&self, batch: &WriteBatch) -> Result<(), Error> {
        fn column<'a, T, U>(items: &'a [T], field: impl Fn(&'a T) -> U) -> Vec<U> {
            items.iter().map(field).collect()
        }
        let naive = |t: &DateTime<Utc>| t.naive_utc();
        let mut tx = self.pool.begin().await?;
        sqlx::query(WRITE_LOCK).execute(&mut *tx).await?;
        if !batch.logs.is_empty() {
            let l = &batch.logs;
            sqlx::query(&self.sql.call_logs)
                .bind(column(l, |c| c.bulk_change_id))
                .bind(column(l, |c| c.m2m_device_change_id))
                .bind(column(l, |c| c.description.as_str()))
                .bind(column(l, |c| c.request_text.as_str()))
                .bind(column(l, |c| c.response_text.as_deref()))
                .bind(column(l, |c| c.error_text.as_deref()))
                .bind(column(l, |c| c.has_errors))
                .bind(column(l, |c| c.response_status))
                .bind(column(l, |c| naive(&c.processed_date)))
                .bind(&self.processed_by)
                .execute(&mut *tx)
                .await?;
        }
        if !batch.devices.is_empty() {
            let d = &batch.devices;
            sqlx::query(&self.sql.end_devices)
                .bind(column(d, |e| e.bulk_change_id))
                .bind(column(d, |e| e.id))
                .bind(column(d, |e| e.status))
                .bind(column(d, |e| e.details.as_str()))
                .bind(column(d, |e| e.has_errors))
                .bind(column(d, |e| naive(&e.processed_date)))
                .bind(&self.processed_by)
                .execute(&mut *tx)
                .await?;
        }
        for b in &batch.bulks {
            sqlx::query(&self.sql.finish_bulk)
                .bind(b.id)
                .bind(b.status)
                .bind(&self.processed_by)
                .bind(naive(&b.processed_date))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Platform for PgPlatform {
    fn load(&self, id: BulkChangeId) -> BoxFuture<'_, Result<Loaded, Error>> {
        Box::pin(self.load_bulk(id))
    }

    fn refuse<'a>(
        &'a self,
        id: BulkChangeId,
        refusal: &'a Refusal,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.write_refusal(id, refusal))
    }

    fn write<'a>(&'a self, batch: &'a WriteBatch) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.write_batch(batch))
    }
}
