//! Applies row operations and advances the checkpoint in one transaction per batch.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::QueryBuilder;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::batch::{Counts, Ordered, Plan};
use super::rows::{ops, DeviceUpdate, LogRow, RowOp};
use crate::store::catchup::{self, Checkpoint, StoredEvent, SAVE_CHECKPOINT};
use crate::store::recent::Recent;
use crate::store::{Conn, Db, Error};
use crate::with_conn;

/// The catch-up consumer of the three read models.
pub const CONSUMER: &str = "projections";
/// Events per transaction.
const BATCH: i64 = 2_000;
/// Rows per multi-row insert.
const INSERT_CHUNK: usize = 500;

/// Projector transactions of one consumer take turns (PostgreSQL, until the transaction ends).
const PG_TAKE_TURNS: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('bulkflow:projector:' || $1, 0))";
/// Where the consumer stands now.
const CHECKPOINT: &str = "SELECT tx_id, position FROM consumer_checkpoints WHERE consumer = $1";

/// The read models, by table name.
pub const PROJECTIONS: [&str; 3] = [
    "device_bulk_change",
    "m2m_device_change",
    "device_bulk_change_log",
];

/// Where a projector writes: a table per read model (or none, to skip it) and its consumer name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub consumer: String,
    pub bulk: Option<String>,
    pub devices: Option<String>,
    pub log: Option<String>,
    /// Devices ended a second, kept (and rebuilt) with `bulk`.
    pub throughput: Option<String>,
}

/// The table of devices ended a second, beside `device_bulk_change`.
pub const THROUGHPUT: &str = "device_bulk_change_throughput";

impl Target {
    /// The live read models.
    pub fn live() -> Self {
        Self {
            consumer: CONSUMER.into(),
            bulk: Some(PROJECTIONS[0].into()),
            devices: Some(PROJECTIONS[1].into()),
            log: Some(PROJECTIONS[2].into()),
            throughput: Some(THROUGHPUT.into()),
        }
    }

    /// The shadow tables a rebuild fills (all, or only `only`).
    pub fn rebuild(only: Option<&str>) -> Self {
        let pick = |name: &str| {
            only.is_none_or(|o| o == name)
                .then(|| format!("{name}_rebuild"))
        };
        Self {
            consumer: format!("{REBUILD_CONSUMER}:{}", only.unwrap_or("all")),
            bulk: pick(PROJECTIONS[0]),
            devices: pick(PROJECTIONS[1]),
            log: pick(PROJECTIONS[2]),
            throughput: pick(PROJECTIONS[0]).map(|_| format!("{THROUGHPUT}_rebuild")),
        }
    }
}

/// The consumer a rebuild advances (with `:all` or `:<projection>` appended).
pub const REBUILD_CONSUMER: &str = "projections_rebuild";

/// The statements of one target.
#[derive(Debug)]
struct Sql {
    insert_bulk: String,
    bulk_status: String,
    bulk_counts: String,
    device: String,
    insert_devices: String,
    log: String,
    /// PostgreSQL: merged device updates, log rows and a run of counts, from arrays.
    pg_devices: String,
    pg_logs: String,
    pg_counts: String,
    /// The `last_sequence` of bulk-change rows (`$1`: an array of ids).
    pg_bulk_guards: String,
    lite_bulk_guard: String,
    /// Adds devices ended in one second.
    ended: String,
}

impl Sql {
    fn new(t: &Target) -> Self {
        let bulk = t.bulk.as_deref().unwrap_or("-");
        let devices = t.devices.as_deref().unwrap_or("-");
        let log = t.log.as_deref().unwrap_or("-");
        let throughput = t.throughput.as_deref().unwrap_or("-");
        Self {
            pg_bulk_guards: format!(
                "SELECT id, last_sequence FROM {bulk} WHERE id = ANY($1::bigint[])"
            ),
            lite_bulk_guard: format!("SELECT id, last_sequence FROM {bulk} WHERE id = $1"),
            ended: format!("
INSERT INTO {throughput} (bulk_change_id, at_second, ended) VALUES ($1, $2, $3)
ON CONFLICT (bulk_change_id, at_second) DO UPDATE SET ended = {throughput}.ended + excluded.ended"),
            insert_bulk: format!("
INSERT INTO {bulk} (id, tenant_id, service_provider_id, change_request_type, integration,
    status, requested_by, workflow_name, workflow_version, workflow_hash, total, created_date, last_sequence)
VALUES ($1, $2, $3, $4, $5, 'NEW', $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (id) DO NOTHING"),
            bulk_status: format!("
UPDATE {bulk} SET status = $2, status_details = $3,
    started_date = COALESCE($4, started_date), processed_date = COALESCE($5, processed_date),
    processed_by = COALESCE($6, processed_by), last_sequence = $7
 WHERE id = $1 AND last_sequence <= $7"),
            bulk_counts: format!("
UPDATE {bulk} SET processed = processed + $2, failed = failed + $3,
    billing_warnings = billing_warnings + $4, cancelled = cancelled + $5, last_sequence = $6
 WHERE id = $1 AND last_sequence < $6"),
            device: format!("
UPDATE {devices} SET status = $2, status_details = $3, is_processed = $4, has_errors = $5,
    rev_service_id = COALESCE($6, rev_service_id),
    attempts = CASE WHEN $7 > 0 THEN $7 ELSE attempts END,
    processed_date = $8, processed_by = COALESCE($9, processed_by), last_sequence = $10
 WHERE id = $1 AND last_sequence < $10"),
            insert_devices: format!("INSERT INTO {devices} (id, bulk_change_id, tenant_id, \
                 service_provider_id, iccid, msisdn, change_request, status, last_sequence) "),
            log: format!("
INSERT INTO {log} (bulk_change_id, event_sequence, m2m_device_change_id,
    log_entry_description, request_text, response_text, error_text, has_errors, response_status,
    processed_by, processed_date)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (bulk_change_id, event_sequence) DO NOTHING"),
            pg_devices: format!("
UPDATE {devices} AS t SET status = v.status, status_details = v.details,
    is_processed = v.is_processed, has_errors = v.has_errors,
    rev_service_id = COALESCE(v.rev_service_id, t.rev_service_id),
    attempts = CASE WHEN v.attempts > 0 THEN v.attempts ELSE t.attempts END,
    processed_date = v.processed_date, processed_by = COALESCE(v.processed_by, t.processed_by),
    last_sequence = v.seq
  FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::boolean[], $5::boolean[], $6::bigint[],
              $7::integer[], $8::timestamptz[], $9::text[], $10::bigint[])
    AS v(id, status, details, is_processed, has_errors, rev_service_id, attempts,
         processed_date, processed_by, seq)
 WHERE t.id = v.id AND t.last_sequence < v.seq"),
            pg_logs: format!("
INSERT INTO {log} (bulk_change_id, event_sequence, m2m_device_change_id,
    log_entry_description, request_text, response_text, error_text, has_errors, response_status,
    processed_by, processed_date)
SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
    $6::text[], $7::text[], $8::boolean[], $9::text[], $10::text[], $11::timestamptz[])
ON CONFLICT (bulk_change_id, event_sequence) DO NOTHING"),
            // Each increment counts only if the row has not seen its event yet, as if applied
            // one by one under the `last_sequence` guard.
            pg_counts: format!("
UPDATE {bulk} AS b SET
    processed = b.processed + (SELECT COALESCE(SUM(v.p), 0) FROM UNNEST($2::bigint[], $3::bigint[])
        AS v(seq, p) WHERE v.seq > b.last_sequence),
    failed = b.failed + (SELECT COALESCE(SUM(v.f), 0) FROM UNNEST($2::bigint[], $4::bigint[])
        AS v(seq, f) WHERE v.seq > b.last_sequence),
    billing_warnings = b.billing_warnings + (SELECT COALESCE(SUM(v.w), 0)
        FROM UNNEST($2::bigint[], $5::bigint[]) AS v(seq, w) WHERE v.seq > b.last_sequence),
    cancelled = b.cancelled + (SELECT COALESCE(SUM(v.c), 0)
        FROM UNNEST($2::bigint[], $6::bigint[]) AS v(seq, c) WHERE v.seq > b.last_sequence),
    last_sequence = $7
 WHERE b.id = $1 AND b.last_sequence < $7"),
        }
    }
}

/// Whether `op` writes to a table the target keeps.
fn wanted(t: &Target, op: &RowOp) -> bool {
    match op {
        RowOp::InsertBulk(..) | RowOp::BulkStatus { .. } | RowOp::BulkCounts { .. } => {
            t.bulk.is_some()
        }
        RowOp::InsertDevices(..) | RowOp::Device { .. } => t.devices.is_some(),
        RowOp::Log(_) => t.log.is_some(),
        RowOp::Ended { .. } => t.throughput.is_some() && t.bulk.is_some(),
    }
}

/// One device's update, as one statement.
async fn update_device(conn: Conn<'_>, sql: &Sql, u: &DeviceUpdate) -> Result<(), sqlx::Error> {
    with_conn!(conn, c => {
        sqlx::query(&sql.device)
            .bind(u.id)
            .bind(u.status.as_str())
            .bind(&u.details)
            .bind(u.is_processed)
            .bind(u.has_errors)
            .bind(u.rev_service_id)
            .bind(u.attempts)
            .bind(u.processed_date)
            .bind(&u.processed_by)
            .bind(u.sequence)
            .execute(&mut *c)
            .await?;
    });
    Ok(())
}

/// One row operation, as one statement (a chunked insert for devices).
async fn apply_op(conn: Conn<'_>, sql: &Sql, op: &RowOp) -> Result<(), sqlx::Error> {
    with_conn!(conn, c => {
        match op {
            RowOp::InsertBulk(b, seq) => {
                sqlx::query(&sql.insert_bulk)
                    .bind(b.id)
                    .bind(b.tenant_id)
                    .bind(b.service_provider_id)
                    .bind(&b.change_request_type)
                    .bind(&b.integration)
                    .bind(&b.requested_by)
                    .bind(&b.workflow_name)
                    .bind(b.workflow_version)
                    .bind(&b.workflow_hash)
                    .bind(b.total)
                    .bind(b.created_date)
                    .bind(seq)
                    .execute(&mut *c)
                    .await?;
            }
            RowOp::InsertDevices(rows, seq) => {
                for chunk in rows.chunks(INSERT_CHUNK) {
                    let mut qb = QueryBuilder::new(&sql.insert_devices);
                    qb.push_values(chunk, |mut row, d| {
                        row.push_bind(d.id)
                            .push_bind(d.bulk_change_id)
                            .push_bind(d.tenant_id)
                            .push_bind(d.service_provider_id)
                            .push_bind(d.iccid.clone())
                            .push_bind(d.msisdn.clone())
                            .push_bind(d.change_request.clone())
                            .push_bind("NEW")
                            .push_bind(*seq);
                    });
                    qb.push(" ON CONFLICT (id) DO NOTHING");
                    qb.build().execute(&mut *c).await?;
                }
            }
            RowOp::BulkStatus {
                id,
                status,
                details,
                started_date,
                processed_date,
                processed_by,
                sequence,
            } => {
                sqlx::query(&sql.bulk_status)
                    .bind(id)
                    .bind(status.as_str())
                    .bind(details)
                    .bind(started_date)
                    .bind(processed_date)
                    .bind(processed_by)
                    .bind(sequence)
                    .execute(&mut *c)
                    .await?;
            }
            RowOp::BulkCounts {
                id,
                processed,
                failed,
                billing_warnings,
                cancelled,
                sequence,
            } => {
                sqlx::query(&sql.bulk_counts)
                    .bind(id)
                    .bind(processed)
                    .bind(failed)
                    .bind(billing_warnings)
                    .bind(cancelled)
                    .bind(sequence)
                    .execute(&mut *c)
                    .await?;
            }
            RowOp::Device(u) => update_device(Conn::from(&mut *c), sql, u).await?,
            // Counted a batch at a time ([`count_ended`]).
            RowOp::Ended { .. } => {}
            RowOp::Log(l) => {
                sqlx::query(&sql.log)
                    .bind(l.bulk_change_id)
                    .bind(l.event_sequence)
                    .bind(l.m2m_device_change_id)
                    .bind(&l.log_entry_description)
                    .bind(&l.request_text)
                    .bind(&l.response_text)
                    .bind(&l.error_text)
                    .bind(l.has_errors)
                    .bind(l.response_status)
                    .bind(&l.processed_by)
                    .bind(l.processed_date)
                    .execute(&mut *c)
                    .await?;
            }
        }
    });
    Ok(())
}

fn counts_op(c: &Counts, item: &(i64, i64, i64, i64, i64)) -> RowOp {
    let &(sequence, processed, failed, billing_warnings, cancelled) = item;
    RowOp::BulkCounts {
        id: c.id,
        processed,
        failed,
        billing_warnings,
        cancelled,
        sequence,
    }
}

/// SQLite runs in-process: one cheap statement per (merged) operation.
async fn apply_plan_lite(
    conn: &mut sqlx::SqliteConnection,
    sql: &Sql,
    plan: &Plan,
) -> Result<(), sqlx::Error> {
    for o in &plan.ordered {
        match o {
            Ordered::Op(op) => apply_op(Conn::from(&mut *conn), sql, op).await?,
            Ordered::Counts(c) => {
                for item in &c.items {
                    apply_op(Conn::from(&mut *conn), sql, &counts_op(c, item)).await?;
                }
            }
        }
    }
    for u in &plan.devices {
        update_device(Conn::from(&mut *conn), sql, u).await?;
    }
    for op in &plan.logs {
        apply_op(Conn::from(&mut *conn), sql, op).await?;
    }
    Ok(())
}

/// Devices ended a second, of the `ended` (bulk change, sequence, second) whose bulk-change row
/// has not seen their event yet: the guard of the counters beside them, read before the batch is
/// applied (a bulk change not inserted yet has seen nothing). The batch holds the projector's
/// turn (PostgreSQL) or the one write lock (SQLite), so the guards cannot move meanwhile.
async fn count_ended(
    conn: Conn<'_>,
    sql: &Sql,
    ended: &[(i64, i64, i64)],
) -> Result<std::collections::BTreeMap<(i64, i64), i64>, sqlx::Error> {
    let mut counts = std::collections::BTreeMap::new();
    if ended.is_empty() {
        return Ok(counts);
    }
    let mut ids: Vec<i64> = ended.iter().map(|e| e.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let guards: std::collections::HashMap<i64, i64> = match conn {
        Conn::Postgres(c) => sqlx::query_as::<_, (i64, i64)>(&sql.pg_bulk_guards)
            .bind(&ids)
            .fetch_all(&mut *c)
            .await?
            .into_iter()
            .collect(),
        Conn::Sqlite(c) => {
            let mut guards = std::collections::HashMap::new();
            for id in &ids {
                let row: Option<(i64, i64)> = sqlx::query_as(&sql.lite_bulk_guard)
                    .bind(id)
                    .fetch_optional(&mut *c)
                    .await?;
                guards.extend(row);
            }
            guards
        }
    };
    for &(id, sequence, second) in ended {
        if sequence > guards.get(&id).copied().unwrap_or(0) {
            *counts.entry((id, second)).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// One field of every item, as the array a PostgreSQL statement binds.
fn column<'a, T, U>(items: &'a [T], field: impl Fn(&'a T) -> U) -> Vec<U> {
    items.iter().map(field).collect()
}

/// PostgreSQL: one statement for all device updates, one for all log rows, one per run of counts
/// (each a round trip saved hundreds of times over).
async fn apply_plan_pg(
    conn: &mut sqlx::PgConnection,
    sql: &Sql,
    plan: &Plan,
) -> Result<(), sqlx::Error> {
    for o in &plan.ordered {
        match o {
            Ordered::Op(op) => apply_op(Conn::from(&mut *conn), sql, op).await?,
            Ordered::Counts(c) if c.items.len() == 1 => {
                apply_op(Conn::from(&mut *conn), sql, &counts_op(c, &c.items[0])).await?;
            }
            Ordered::Counts(c) => {
                let seqs = column(&c.items, |i| i.0);
                sqlx::query(&sql.pg_counts)
                    .bind(c.id)
                    .bind(&seqs)
                    .bind(column(&c.items, |i| i.1))
                    .bind(column(&c.items, |i| i.2))
                    .bind(column(&c.items, |i| i.3))
                    .bind(column(&c.items, |i| i.4))
                    .bind(seqs.last().copied().unwrap_or_default())
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    if !plan.devices.is_empty() {
        sqlx::query(&sql.pg_devices)
            .bind(column(&plan.devices, |u| u.id))
            .bind(column(&plan.devices, |u| u.status.as_str()))
            .bind(column(&plan.devices, |u| u.details.as_str()))
            .bind(column(&plan.devices, |u| u.is_processed))
            .bind(column(&plan.devices, |u| u.has_errors))
            .bind(column(&plan.devices, |u| u.rev_service_id))
            .bind(column(&plan.devices, |u| u.attempts))
            .bind(column(&plan.devices, |u| u.processed_date))
            .bind(column(&plan.devices, |u| u.processed_by.as_deref()))
            .bind(column(&plan.devices, |u| u.sequence))
            .execute(&mut *conn)
            .await?;
    }
    if !plan.logs.is_empty() {
        let rows: Vec<&LogRow> = plan
            .logs
            .iter()
            .filter_map(|op| match op {
                RowOp::Log(l) => Some(l),
                _ => None,
            })
            .collect();
        sqlx::query(&sql.pg_logs)
            .bind(column(&rows, |l| l.bulk_change_id))
            .bind(column(&rows, |l| l.event_sequence))
            .bind(column(&rows, |l| l.m2m_device_change_id))
            .bind(column(&rows, |l| l.log_entry_description.as_str()))
            .bind(column(&rows, |l| l.request_text.as_deref()))
            .bind(column(&rows, |l| l.response_text.as_deref()))
            .bind(column(&rows, |l| l.error_text.as_deref()))
            .bind(column(&rows, |l| l.has_errors))
            .bind(column(&rows, |l| l.response_status))
            .bind(column(&rows, |l| l.processed_by.as_deref()))
            .bind(column(&rows, |l| l.processed_date))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Keeps the read models up to date from the events table.
#[derive(Clone)]
pub struct Projector {
    db: Db,
    wake: Arc<Notify>,
    target: Arc<Target>,
    sql: Arc<Sql>,
    batch: i64,
    /// Events this process appended, taken instead of read back (the live projector).
    recent: Option<Arc<Recent>>,
}

impl Projector {
    /// The live read models.
    pub fn new(db: Db) -> Self {
        Self::to(db, Target::live())
    }

    /// A projector writing to `target`.
    pub fn to(db: Db, target: Target) -> Self {
        Self {
            db,
            wake: Arc::new(Notify::new()),
            sql: Arc::new(Sql::new(&target)),
            target: Arc::new(target),
            batch: BATCH,
            recent: None,
        }
    }

    /// Takes the events `recent` keeps (this process's appends) instead of reading them back.
    pub fn with_recent(mut self, recent: Arc<Recent>) -> Self {
        self.recent = Some(recent);
        self
    }

    /// At most `events` events per transaction (default 2,000).
    pub fn with_batch(mut self, events: i64) -> Self {
        self.batch = events.max(1);
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Call after committing events to cut the polling delay.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Processes one batch; returns how many events it applied.
    pub async fn step(&self) -> Result<usize, Error> {
        let from = catchup::load_checkpoint(&self.db, &self.target.consumer).await?;
        let events =
            catchup::read_after_with(&self.db, from, self.batch, self.recent.as_deref()).await?;
        self.apply(&events).await?;
        Ok(events.len())
    }

    /// Applies batch after batch until none is left, reading (and decoding) the next batch while
    /// the current one is written; `progress` gets each batch's size. For rebuilds, where the
    /// reading alone would otherwise leave the database idle half the time.
    pub async fn drain(&self, mut progress: impl FnMut(u64)) -> Result<u64, Error> {
        let from = catchup::load_checkpoint(&self.db, &self.target.consumer).await?;
        let mut next = catchup::read_after(&self.db, from, self.batch).await?;
        let mut total = 0u64;
        while let Some(last) = next.last().map(|e| e.checkpoint) {
            let batch = std::mem::take(&mut next);
            let (db, limit) = (self.db.clone(), self.batch);
            let fetch = tokio::spawn(async move { catchup::read_after(&db, last, limit).await });
            let applied = self.apply(&batch).await;
            let fetched = fetch.await;
            applied?;
            next = fetched.map_err(|e| Error::Sql(sqlx::Error::Io(std::io::Error::other(e))))??;
            total += batch.len() as u64;
            progress(batch.len() as u64);
        }
        Ok(total)
    }

    /// Writes one batch's row operations and moves the checkpoint past it, in one transaction.
    async fn apply(&self, events: &[StoredEvent]) -> Result<(), Error> {
        let Some(last) = events.last().map(|e| e.checkpoint) else {
            return Ok(());
        };
        let row_ops: Vec<RowOp> = events
            .iter()
            .flat_map(ops)
            .filter(|op| wanted(&self.target, op))
            .collect();
        let plan = Plan::new(row_ops);
        // SQLite takes its write lock up front: the batch reads (the throughput guards) before it
        // writes, and a read lock cannot always be upgraded (SQLITE_BUSY at once).
        let mut tx = self.db.begin_with("BEGIN", "BEGIN IMMEDIATE").await?;
        // Several workers run a projector over the same consumer. On PostgreSQL their batches
        // take turns (their row updates in different orders deadlocked), and a batch another
        // projector applied meanwhile is skipped (so the checkpoint never moves back). SQLite
        // runs one write transaction at a time anyway.
        if let Conn::Postgres(c) = tx.conn() {
            sqlx::query(PG_TAKE_TURNS)
                .bind(&self.target.consumer)
                .execute(&mut *c)
                .await?;
            let now: Option<(i64, i64)> = sqlx::query_as(CHECKPOINT)
                .bind(&self.target.consumer)
                .fetch_optional(&mut *c)
                .await?;
            let now = now.map_or_else(Checkpoint::default, |(tx, position)| Checkpoint {
                tx,
                position,
            });
            if now >= last {
                tx.rollback().await?;
                return Ok(());
            }
        }
        // Read before the batch moves the bulk changes' `last_sequence` on.
        let ended = count_ended(tx.conn(), &self.sql, &plan.ended).await?;
        // A real difference: PostgreSQL takes arrays (one statement per kind of row), SQLite
        // runs in-process (one cheap statement per row).
        match tx.conn() {
            Conn::Postgres(c) => apply_plan_pg(c, &self.sql, &plan).await?,
            Conn::Sqlite(c) => apply_plan_lite(c, &self.sql, &plan).await?,
        }
        with_conn!(tx.conn(), c => {
            for ((id, second), n) in &ended {
                sqlx::query(&self.sql.ended)
                    .bind(id)
                    .bind(second)
                    .bind(n)
                    .execute(&mut *c)
                    .await?;
            }
        });
        with_conn!(tx.conn(), c => {
            sqlx::query(SAVE_CHECKPOINT)
                .bind(&self.target.consumer)
                .bind(last.tx)
                .bind(last.position)
                .bind(Utc::now())
                .execute(c)
                .await?;
        });
        tx.commit().await?;
        Ok(())
    }

    /// Applies every event committed before the call. On PostgreSQL this may wait for other
    /// transactions (anywhere in the cluster) that began before those events to end.
    pub async fn catch_up(&self) -> Result<usize, Error> {
        catchup::until_caught_up(&self.db, &self.target.consumer, || self.step()).await
    }

    /// Runs until cancelled: on cancel, finishes the batch in hand and returns.
    /// On a database error it logs, waits and tries again (the checkpoint did not move).
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            match self.step().await {
                Ok(0) => {
                    crate::metrics::projections_caught_up();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Ok(_) => {
                    if cancel.is_cancelled() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "projection batch failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}
