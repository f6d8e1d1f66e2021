//! The SQLite event repository: sqlite-es for reads, and an append of its own that writes a
//! command's events in one statement, checked against the lease epoch when the writer is fenced.

use cqrs_es::persist::PersistenceError;
use cqrs_es::{Aggregate, DomainEvent, EventEnvelope};
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use sqlx::{SqliteExecutor, SqlitePool};

use super::event_store::{fence_result, persistence_error};
use super::lease::Fence;

/// One statement, so the epoch check and the rows are atomic without an explicit transaction
/// (whose read-then-write upgrade SQLite may refuse under contention). The events arrive as one
/// JSON array of `[sequence, type, version, payload text, metadata text]`, in order.
const APPEND: &str = "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT $1, $2, json_extract(e.value, '$[0]'), json_extract(e.value, '$[1]'),
       json_extract(e.value, '$[2]'), json_extract(e.value, '$[3]'), json_extract(e.value, '$[4]')
  FROM json_each($3) AS e
 WHERE $4 IS NULL
    OR EXISTS (SELECT 1 FROM bulk_change_leases WHERE bulk_change_id = $4 AND epoch = $5)
 ORDER BY e.key";

pub struct SqliteRepository {
    pool: SqlitePool,
    /// Reads streams.
    pub(super) inner: SqliteEventRepository,
}

impl SqliteRepository {
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn new(pool: SqlitePool) -> Self {
        Self {
            inner: SqliteEventRepository::new(pool.clone()),
            pool,
        }
    }

    /// Appends the events of one command; with a `fence`, only while its epoch is current.
    pub async fn append<A: Aggregate>(
        &self,
        events: &[EventEnvelope<A>],
        fence: Option<Fence>,
    ) -> Result<(), PersistenceError> {
        append(&self.pool, events, fence).await
    }
}

/// [`SqliteRepository::append`] on any connection (a pool, or a transaction that appends a
/// big request in parts).
pub async fn append<'e, A: Aggregate, E: SqliteExecutor<'e>>(
    executor: E,
    events: &[EventEnvelope<A>],
    fence: Option<Fence>,
) -> Result<(), PersistenceError> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    let rows = events
        .iter()
        .map(|e| {
            Ok(serde_json::json!([
                e.sequence as i64,
                e.payload.event_type(),
                e.payload.event_version(),
                serde_json::to_string(&e.payload)?,
                serde_json::to_string(&e.metadata)?,
            ]))
        })
        .collect::<Result<Vec<Value>, serde_json::Error>>()
        .map_err(|e| PersistenceError::UnknownError(Box::new(e)))?;
    let rows = Value::Array(rows).to_string();
    let inserted = sqlx::query(APPEND)
        .bind(A::TYPE)
        .bind(&first.aggregate_id)
        .bind(rows)
        .bind(fence.map(|f| f.bulk_change_id.get()))
        .bind(fence.map(|f| f.epoch))
        .execute(executor)
        .await
        .map_err(persistence_error)?
        .rows_affected();
    fence_result(fence, events.len(), inserted)
}
