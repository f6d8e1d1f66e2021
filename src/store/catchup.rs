//! Checkpointed catch-up over the events table: how projections (and anything else that must
//! not miss an event) consume the store. `Query::dispatch` is never relied upon.
//!
//! Order and gaps. SQLite runs one write transaction at a time, so `position` follows commit
//! order. PostgreSQL assigns `position` at insert, so a transaction holding a lower position may
//! commit after a higher one. Readers therefore take only events whose writing transaction id
//! (`tx_id`, a 64-bit xid8) is below the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`), in `(tx_id, position)` order. Every transaction
//! with a smaller id has ended, and new ones get larger ids, so nothing can later appear before
//! the checkpoint.

use std::collections::HashMap;

use cqrs_es::persist::SerializedEvent;
use cqrs_es::EventEnvelope;
use sqlx::Row;

use super::recent::Recent;
use super::{Db, Error};
use crate::domain::BulkChange;
use crate::domain::BulkChangeEvent;
use crate::with_pool;

/// A consumer's position in the global order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Checkpoint {
    pub tx: i64,
    pub position: i64,
}

/// An event with its place in the global order.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub checkpoint: Checkpoint,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event: BulkChangeEvent,
    pub metadata: HashMap<String, String>,
}

/// The statements that differ between the databases: PostgreSQL orders by writing transaction
/// (see the module documentation), SQLite by position alone (`$1`, the transaction, is unused).
struct Sql {
    /// Up to `$3` events after `($1, $2)`.
    read: &'static str,
    /// The same without their payloads and metadata (taken from [`Recent`] where kept).
    read_keys: &'static str,
    /// Payloads and metadata of the events at positions `$1`.
    payloads: &'static str,
    /// Whether an event at or below position `$3` lies after `($1, $2)`.
    pending: &'static str,
}

/// No `aggregate_type` condition (every stream in `events` is a `BulkChange`): with one, the
/// planner, misled by fresh statistics, combined two bitmap scans and sorted the whole table on
/// disk for every batch (175 ms a batch at 100,000 events) instead of walking `events_catch_up`
/// in order (3.5 ms).
///
/// A batch also stops once the events before it hold [`READ_BYTES`] (a running sum over the
/// page): a `DevicesAdded` carries 1,000 devices, and 2,000 of them would be 500 MB of text.
/// PostgreSQL sums the stored size (`pg_column_size`, compressed: no value is decompressed to
/// be measured), SQLite the text's length.
/// A page of events after the checkpoint, with extra columns (the payload and metadata, or
/// none when they are taken from [`Recent`]) added to the ids and their place.
macro_rules! pg_page {
    ($outer:literal, $inner:literal) => {
        concat!(
            "
SELECT position, tx, aggregate_id, sequence, event_type, event_version",
            $outer,
            "
  FROM (SELECT position, tx_id, tx_id::text::bigint AS tx, aggregate_id, sequence, event_type,
               event_version",
            $inner,
            ",
               SUM(pg_column_size(payload)) OVER (ORDER BY tx_id, position)
                 - pg_column_size(payload) AS before
          FROM events
         WHERE (tx_id, position) > ($1::text::xid8, $2)
           AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY tx_id, position
         LIMIT $3) page
 WHERE before < $4
 ORDER BY tx_id, position"
        )
    };
}

macro_rules! lite_page {
    ($outer:literal, $inner:literal) => {
        concat!(
            "
SELECT position, tx, aggregate_id, sequence, event_type, event_version",
            $outer,
            "
  FROM (SELECT position, 0 AS tx, aggregate_id, sequence, event_type, event_version",
            $inner,
            ",
               SUM(length(payload)) OVER (ORDER BY position) - length(payload) AS before
          FROM events
         WHERE aggregate_type = 'BulkChange' AND position > $2 AND $1 >= 0
         ORDER BY position
         LIMIT $3)
 WHERE before < $4
 ORDER BY position"
        )
    };
}

const POSTGRES: Sql = Sql {
    read: pg_page!(
        ", payload, metadata",
        ", payload::text AS payload, metadata::text AS metadata"
    ),
    read_keys: pg_page!("", ""),
    payloads: "SELECT position, payload::text AS payload, metadata::text AS metadata
  FROM events WHERE position = ANY($1)",
    pending: "SELECT EXISTS (SELECT 1 FROM events WHERE position <= $3
        AND (tx_id, position) > ($1::text::xid8, $2))",
};

const SQLITE: Sql = Sql {
    read: lite_page!(", payload, metadata", ", payload, metadata"),
    read_keys: lite_page!("", ""),
    // (a JSON array of positions)
    payloads: "SELECT position, payload, metadata FROM events
  WHERE position IN (SELECT value FROM json_each($1))",
    pending:
        "SELECT EXISTS (SELECT 1 FROM events WHERE position <= $3 AND position > $2 AND $1 >= 0)",
};

/// Stored bytes of payload a batch starts no event beyond (PostgreSQL compresses a
/// `DevicesAdded` of 1,000 devices several times over: 1 MB of them is a few MB of text; ~1,200
/// ordinary events of ~870 bytes); the first event is always read.
pub const READ_BYTES: i64 = 1 << 20;

/// Up to `limit` events after `after`, in global order (fewer once they hold [`READ_BYTES`]).
pub async fn read_after(db: &Db, after: Checkpoint, limit: i64) -> Result<Vec<StoredEvent>, Error> {
    read_within(db, after, limit, READ_BYTES).await
}

/// Up to `limit` events after `after`, starting none once those before it hold `bytes` of
/// payload (stored size); the first is always read.
pub async fn read_within(
    db: &Db,
    after: Checkpoint,
    limit: i64,
    bytes: i64,
) -> Result<Vec<StoredEvent>, Error> {
    let sql = db.pick(&POSTGRES, &SQLITE).read;
    with_pool!(db, pool => {
        let rows = sqlx::query(sql)
            .bind(after.tx)
            .bind(after.position)
            .bind(limit)
            .bind(bytes)
            .fetch_all(pool)
            .await?;
        rows.iter()
            .map(|row| {
                decode(
                    Checkpoint {
                        tx: row.try_get("tx")?,
                        position: row.try_get("position")?,
                    },
                    row.try_get("aggregate_id")?,
                    row.try_get("sequence")?,
                    row.try_get("event_type")?,
                    row.try_get("event_version")?,
                    row.try_get("payload")?,
                    row.try_get("metadata")?,
                )
            })
            .collect()
    })
}

/// As [`read_after`], taking the events `recent` keeps from it instead of reading and decoding
/// their JSON (the table still decides which events come next, and in what order).
pub async fn read_after_with(
    db: &Db,
    after: Checkpoint,
    limit: i64,
    recent: Option<&Recent>,
) -> Result<Vec<StoredEvent>, Error> {
    let Some(recent) = recent.filter(|r| !r.is_empty()) else {
        return read_after(db, after, limit).await;
    };
    let sql = db.pick(&POSTGRES, &SQLITE);
    type Key = (i64, i64, String, i64, String, String);
    let keys: Vec<Key> = with_pool!(db, pool => {
        sqlx::query_as(sql.read_keys)
            .bind(after.tx)
            .bind(after.position)
            .bind(limit)
            .bind(READ_BYTES)
            .fetch_all(pool)
            .await?
    });
    let mut events = Vec::with_capacity(keys.len());
    let mut missing = Vec::new();
    for (position, tx, aggregate_id, sequence, event_type, event_version) in keys {
        let checkpoint = Checkpoint { tx, position };
        match recent.take(&aggregate_id, sequence) {
            Some((event, metadata)) => events.push(Ok(StoredEvent {
                checkpoint,
                aggregate_id,
                sequence,
                event,
                metadata,
            })),
            None => {
                missing.push(position);
                events.push(Err((
                    checkpoint,
                    aggregate_id,
                    sequence,
                    event_type,
                    event_version,
                )));
            }
        }
    }
    let mut payloads: HashMap<i64, (String, String)> = HashMap::new();
    if !missing.is_empty() {
        let rows: Vec<(i64, String, String)> = match db {
            Db::Postgres(pool) => {
                sqlx::query_as(sql.payloads)
                    .bind(&missing)
                    .fetch_all(pool)
                    .await?
            }
            Db::Sqlite(pool) => {
                sqlx::query_as(sql.payloads)
                    .bind(serde_json::to_string(&missing).unwrap_or_default())
                    .fetch_all(pool)
                    .await?
            }
        };
        payloads.extend(rows.into_iter().map(|(p, payload, m)| (p, (payload, m))));
    }
    events
        .into_iter()
        .map(|e| match e {
            Ok(event) => Ok(event),
            Err((checkpoint, aggregate_id, sequence, event_type, event_version)) => {
                let Some((payload, metadata)) = payloads.remove(&checkpoint.position) else {
                    return Err(Error::Corrupt {
                        aggregate_id,
                        sequence,
                        message: format!("event at position {} vanished", checkpoint.position),
                    });
                };
                decode(
                    checkpoint,
                    aggregate_id,
                    sequence,
                    event_type,
                    event_version,
                    payload,
                    metadata,
                )
            }
        })
        .collect()
}

/// Turns a stored row into an event, through the same path (and upcasters) as the event store.
pub fn decode(
    checkpoint: Checkpoint,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
) -> Result<StoredEvent, Error> {
    let corrupt = |message: String| Error::Corrupt {
        aggregate_id: aggregate_id.clone(),
        sequence,
        message,
    };
    if !crate::domain::bulk_change::upcast::needed(&event_type, &event_version) {
        // Current version: straight from the text, no `serde_json::Value` in between.
        let event = serde_json::from_str(&payload).map_err(|e| corrupt(e.to_string()))?;
        let metadata = serde_json::from_str(&metadata).map_err(|e| corrupt(e.to_string()))?;
        return Ok(StoredEvent {
            checkpoint,
            aggregate_id,
            sequence,
            event,
            metadata,
        });
    }
    let payload = serde_json::from_str(&payload).map_err(|e| corrupt(e.to_string()))?;
    let metadata = serde_json::from_str(&metadata).map_err(|e| corrupt(e.to_string()))?;
    let serialized = SerializedEvent::new(
        aggregate_id.clone(),
        sequence as usize,
        "BulkChange".into(),
        event_type,
        event_version,
        payload,
        metadata,
    );
    let envelope = EventEnvelope::<BulkChange>::try_from(
        crate::domain::bulk_change::upcast::upcast(serialized),
    )
    .map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredEvent {
        checkpoint,
        aggregate_id,
        sequence,
        event: envelope.payload,
        metadata: envelope.metadata,
    })
}

/// Where `consumer` stands (the start when it has never run).
pub async fn load_checkpoint(db: &Db, consumer: &str) -> Result<Checkpoint, Error> {
    const SQL: &str = "SELECT tx_id, position FROM consumer_checkpoints WHERE consumer = $1";
    let row: Option<(i64, i64)> = with_pool!(db, pool => {
        sqlx::query_as(SQL).bind(consumer).fetch_optional(pool).await?
    });
    Ok(
        row.map_or_else(Checkpoint::default, |(tx, position)| Checkpoint {
            tx,
            position,
        }),
    )
}

/// The highest position committed and visible now (0 when there are no events).
pub async fn last_position(db: &Db) -> Result<i64, Error> {
    const SQL: &str = "SELECT COALESCE(MAX(position), 0) FROM events";
    Ok(with_pool!(db, pool => sqlx::query_scalar(SQL).fetch_one(pool).await?))
}

/// Whether some event at or below `position` lies beyond the checkpoint `at`.
pub async fn pending_up_to(db: &Db, at: Checkpoint, position: i64) -> Result<bool, Error> {
    let sql = db.pick(&POSTGRES, &SQLITE).pending;
    Ok(with_pool!(db, pool => {
        sqlx::query_scalar(sql)
            .bind(at.tx)
            .bind(at.position)
            .bind(position)
            .fetch_one(pool)
            .await?
    }))
}

/// Runs `step` (one batch of `consumer`, returning how many events it covered) until every
/// event committed before the call is behind `consumer`'s checkpoint. Gives up with
/// [`Error::Lagging`] after 60 s (a long transaction somewhere holds the read horizon back).
pub async fn until_caught_up<E, F, Fut>(db: &Db, consumer: &str, step: F) -> Result<usize, E>
where
    E: From<Error>,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<usize, E>>,
{
    let target = last_position(db).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut total = 0;
    loop {
        let n = step().await?;
        total += n;
        if n > 0 {
            continue;
        }
        let at = load_checkpoint(db, consumer).await?;
        if !pending_up_to(db, at, target).await? {
            return Ok(total);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Lagging.into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Upsert of a checkpoint; run it in the same transaction as the consumer's writes.
pub const SAVE_CHECKPOINT: &str = "
INSERT INTO consumer_checkpoints (consumer, tx_id, position, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer) DO UPDATE SET tx_id = excluded.tx_id, position = excluded.position,
                                     updated_at = excluded.updated_at";
