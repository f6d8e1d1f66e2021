//! The PostgreSQL event repository: postgres-es reads a stream; a command's events are appended
//! in one prepared `INSERT` from arrays (postgres-es sends one statement per event), checked
//! against the lease epoch when the writer is fenced. Same table layout as postgres-es.

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent, EventEnvelope};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

use super::event_store::{fence_result, persistence_error};
use super::lease::Fence;

pub struct BatchedPgRepository {
    pool: PgPool,
    /// Reads whole streams.
    pub(super) inner: PostgresEventRepository,
}

impl BatchedPgRepository {
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: PostgresEventRepository::new(pool.clone()),
            pool,
        }
    }
}

impl BatchedPgRepository {
    /// Appends events serialized straight to JSON text, without building a
    /// `serde_json::Value` for each first (as `SerializedEvent` does).
    /// With a `fence`, the rows go in only while its epoch is current (checked in the same
    /// statement, holding the lease row so that a takeover waits for this commit).
    pub async fn append<A: Aggregate>(
        &self,
        events: &[EventEnvelope<A>],
        fence: Option<Fence>,
    ) -> Result<(), PersistenceError> {
        append(&self.pool, events, fence).await
    }
}

/// [`BatchedPgRepository::append`] on any connection (a pool, or a transaction that appends a
/// big request in parts).
pub async fn append<'e, A: Aggregate, E: PgExecutor<'e>>(
    executor: E,
    events: &[EventEnvelope<A>],
    fence: Option<Fence>,
) -> Result<(), PersistenceError> {
    let text =
        |r: serde_json::Result<String>| r.map_err(|e| PersistenceError::UnknownError(Box::new(e)));
    let types: Vec<String> = events.iter().map(|e| e.payload.event_type()).collect();
    let versions: Vec<String> = events.iter().map(|e| e.payload.event_version()).collect();
    let payloads = events
        .iter()
        .map(|e| text(serde_json::to_string(&e.payload)))
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = events
        .iter()
        .map(|e| text(serde_json::to_string(&e.metadata)))
        .collect::<Result<Vec<_>, _>>()?;
    insert(
        executor,
        A::TYPE,
        events.iter().map(|e| e.aggregate_id.as_str()).collect(),
        events.iter().map(|e| e.sequence as i64).collect(),
        types.iter().map(String::as_str).collect(),
        versions.iter().map(String::as_str).collect(),
        payloads,
        metadata,
        fence,
    )
    .await
}

/// One prepared statement for any number of events: columns go in as arrays, the JSON as
/// text (`json` input only validates; binding `serde_json::Value` would go through `jsonb`
/// and back).
#[allow(clippy::too_many_arguments)]
async fn insert<'e, E: PgExecutor<'e>>(
    executor: E,
    aggregate_type: &str,
    ids: Vec<&str>,
    sequences: Vec<i64>,
    types: Vec<&str>,
    versions: Vec<&str>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    fence: Option<Fence>,
) -> Result<(), PersistenceError> {
    const SQL: &str = "INSERT INTO events
            (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
            SELECT $1, i, s, t, v, p::json, m::json
              FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
                AS u(i, s, t, v, p, m)";
    // The lease row is read FOR SHARE: a takeover's UPDATE of it waits for this transaction,
    // and one that committed first makes the row (and so every event) drop out.
    const FENCED: &str = "WITH fence AS (
                SELECT 1 FROM bulk_change_leases WHERE bulk_change_id = $8 AND epoch = $9 FOR SHARE)
            INSERT INTO events
            (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
            SELECT $1, i, s, t, v, p::json, m::json
              FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
                AS u(i, s, t, v, p, m)
             WHERE EXISTS (SELECT 1 FROM fence)";
    let count = sequences.len();
    let query = match fence {
        Some(_) => sqlx::query(FENCED),
        None => sqlx::query(SQL),
    };
    let query = query
        .bind(aggregate_type)
        .bind(ids)
        .bind(sequences)
        .bind(types)
        .bind(versions)
        .bind(payloads)
        .bind(metadata);
    let query = match fence {
        Some(f) => query.bind(f.bulk_change_id.get()).bind(f.epoch),
        None => query,
    };
    let inserted = query
        .execute(executor)
        .await
        .map_err(persistence_error)?
        .rows_affected();
    fence_result(fence, count, inserted)
}

impl BatchedPgRepository {
    /// The events after `last_sequence`. postgres-es writes the sequence into the SQL text, so
    /// every call is a new statement to parse and plan; this one is prepared once.
    pub async fn events_after<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        const SQL: &str = "SELECT aggregate_id, sequence, event_type, event_version, payload, metadata
            FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence";
        let rows: Vec<(String, i64, String, String, Value, Value)> = sqlx::query_as(SQL)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(last_sequence as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(persistence_error)?;
        Ok(rows
            .into_iter()
            .map(
                |(id, sequence, event_type, event_version, payload, metadata)| {
                    SerializedEvent::new(
                        id,
                        sequence as usize,
                        A::TYPE.to_string(),
                        event_type,
                        event_version,
                        payload,
                        metadata,
                    )
                },
            )
            .collect())
    }
}
