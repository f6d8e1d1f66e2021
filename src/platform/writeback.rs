//! Write-back: the outcomes of the platform's bulk changes, into the platform's own tables, as
//! the original Lambda wrote them. A checkpointed consumer of the events (like the projector):
//!
//! - `M2M_DeviceChange.Status / StatusDetails / IsProcessed / HasErrors / ProcessedBy /
//!   ProcessedDate` when a device ends;
//! - one `DeviceBulkChangeLog` row per recorded carrier call;
//! - `DeviceBulkChange.Status / ProcessedBy / ProcessedDate` when the bulk change ends.
//!
//! Only bulk changes that came from the platform ([`Origin::Platform`]) are written. Each batch
//! goes to the platform in one transaction, then the checkpoint moves (in bulkflow's database).
//! A crash between the two repeats the batch, so every write is idempotent: updates set final
//! values, and a log row is inserted only if the row with its bulk change, device, call time and
//! description is not there yet. A platform database that is down holds the consumer back; the
//! checkpoint does not move and nothing is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::Platform;
use crate::domain::bulk_change::BulkChangeEvent;
use crate::domain::{ApiCall, Origin};
use crate::projections::rows::{ops, RowOp};
use crate::store::catchup::{self, Checkpoint, StoredEvent, SAVE_CHECKPOINT};
use crate::store::Db;
use crate::with_pool;

/// The consumer name of the write-back in `consumer_checkpoints`.
pub const CONSUMER: &str = "platform";
/// Events per platform transaction.
const BATCH: i64 = 2_000;

/// Why a write-back batch did not go through (tried again; the checkpoint did not move).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Platform(#[from] super::Error),
    /// A notification was not accepted by the webhook.
    #[error("{0}")]
    Delivery(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// A device that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEnd {
    pub bulk_change_id: i64,
    pub id: i64,
    pub status: &'static str,
    pub details: String,
    pub has_errors: bool,
    pub processed_date: DateTime<Utc>,
}

/// One carrier call, as a `DeviceBulkChangeLog` row.
#[derive(Debug, Clone, PartialEq)]
pub struct CallLog {
    pub bulk_change_id: i64,
    pub m2m_device_change_id: Option<i64>,
    pub description: String,
    /// `"{METHOD} {url}\n{json}"`, as the original wrote it.
    pub request_text: String,
    pub response_text: Option<String>,
    pub error_text: Option<String>,
    pub has_errors: bool,
    /// `PROCESSED` or `ERROR`.
    pub response_status: &'static str,
    /// When the call was made: with the bulk change, device and description, it identifies the
    /// row (so a repeated batch inserts nothing).
    pub processed_date: DateTime<Utc>,
}

/// A bulk change that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkEnd {
    pub id: i64,
    pub status: &'static str,
    pub processed_date: DateTime<Utc>,
}

/// What one batch of events writes to the platform.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteBatch {
    pub devices: Vec<DeviceEnd>,
    pub logs: Vec<CallLog>,
    pub bulks: Vec<BulkEnd>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.logs.is_empty() && self.bulks.is_empty()
    }
}

fn call_log(
    bulk_change_id: i64,
    device: Option<i64>,
    description: &str,
    reason: Option<&str>,
    call: &ApiCall,
) -> CallLog {
    let failed = call.status.is_none_or(|s| !(200..300).contains(&s));
    let request_text = match &call.request_body {
        Some(body) => format!("{} {}\n{}", call.method, call.url, body),
        None => format!("{} {}", call.method, call.url),
    };
    let error_text = failed.then(|| {
        call.error
            .clone()
            .or_else(|| reason.map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {}", call.status.unwrap_or_default()))
    });
    CallLog {
        bulk_change_id,
        m2m_device_change_id: device,
        description: description.to_string(),
        request_text,
        response_text: Some(call.response_text()).filter(|t| !t.is_empty()),
        error_text,
        has_errors: failed,
        response_status: if failed { "ERROR" } else { "PROCESSED" },
        processed_date: call.started_at,
    }
}

/// What `events` write to the platform, for the bulk changes `ours` says came from it.
pub fn plan(events: &[StoredEvent], ours: impl Fn(&str) -> bool) -> WriteBatch {
    let mut batch = WriteBatch::default();
    let mut ended: HashMap<i64, usize> = HashMap::new();
    for stored in events.iter().filter(|e| ours(&e.aggregate_id)) {
        for op in ops(stored) {
            match op {
                RowOp::Log(l) => {
                    for call in stored.event.calls() {
                        batch.logs.push(call_log(
                            l.bulk_change_id,
                            l.m2m_device_change_id,
                            &l.log_entry_description,
                            l.error_text.as_deref(),
                            call,
                        ));
                    }
                }
                RowOp::Device(u) if u.is_processed => {
                    let end = DeviceEnd {
                        bulk_change_id: stored.aggregate_id.parse().unwrap_or_default(),
                        id: u.id,
                        status: u.status.as_str(),
                        details: u.details,
                        has_errors: u.has_errors,
                        processed_date: u.processed_date.unwrap_or_else(|| stored.event.at()),
                    };
                    // A later end of the same device replaces an earlier one in the batch.
                    match ended.get(&u.id) {
                        Some(&i) => batch.devices[i] = end,
                        None => {
                            ended.insert(u.id, batch.devices.len());
                            batch.devices.push(end);
                        }
                    }
                }
                RowOp::BulkStatus {
                    id,
                    status,
                    processed_date: Some(at),
                    ..
                } if status.is_final() => batch.bulks.push(BulkEnd {
                    id,
                    status: status.as_str(),
                    processed_date: at,
                }),
                _ => {}
            }
        }
    }
    batch
}

/// The write-back consumer.
pub struct WriteBack {
    db: Db,
    platform: Arc<dyn Platform>,
    origins: Origins,
}

impl WriteBack {
    pub fn new(db: Db, platform: Arc<dyn Platform>) -> Self {
        Self {
            origins: Origins::new(db.clone()),
            db,
            platform,
        }
    }

    /// Writes one batch of events to the platform and moves the checkpoint past it; returns how
    /// many events it covered.
    pub async fn step(&self) -> Result<usize, Error> {
        let Some((events, last)) = self.origins.next(CONSUMER, BATCH).await? else {
            return Ok(0);
        };
        let batch = plan(&events, |id| self.origins.is_platform(id));
        if !batch.is_empty() {
            self.platform.write(&batch).await?;
        }
        save(&self.db, CONSUMER, last).await?;
        Ok(events.len())
    }

    /// Writes everything committed before the call.
    pub async fn catch_up(&self) -> Result<usize, Error> {
        catchup::until_caught_up(&self.db, CONSUMER, || self.step()).await
    }

    /// Runs until cancelled. A failed batch (the platform down) is tried again, waiting longer
    /// each time up to 30 s; the checkpoint does not move meanwhile.
    pub async fn run(&self, cancel: CancellationToken) {
        run(cancel, "platform write-back", || self.step()).await
    }
}

/// Which bulk changes came from the platform, by aggregate id: learnt from their acceptance in a
/// batch, else read once from their stream's first event.
pub(super) struct Origins {
    db: Db,
    known: Mutex<HashMap<String, bool>>,
}

/// The statements that differ between bulkflow's two databases.
struct Sql {
    /// The first event of a stream (its `BulkChangeAccepted`), as text.
    first_event: &'static str,
}

const POSTGRES: Sql = Sql {
    first_event: "SELECT payload::text FROM events
        WHERE aggregate_type = 'BulkChange' AND aggregate_id = $1 AND sequence = 1",
};
const SQLITE: Sql = Sql {
    first_event: "SELECT payload FROM events
        WHERE aggregate_type = 'BulkChange' AND aggregate_id = $1 AND sequence = 1",
};

impl Origins {
    pub(super) fn new(db: Db) -> Self {
        Self {
            db,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Option<bool> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    fn remember(&self, id: &str, ours: bool) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), ours);
    }

    /// Whether `id` came from the platform (false when not learnt).
    pub(super) fn is_platform(&self, id: &str) -> bool {
        self.get(id).unwrap_or(false)
    }

    /// The next events after `consumer`'s checkpoint (at most `limit`) and the checkpoint of the
    /// last, with the origins of their bulk changes learnt; `None` when there are none.
    pub(super) async fn next(
        &self,
        consumer: &str,
        limit: i64,
    ) -> Result<Option<(Vec<StoredEvent>, Checkpoint)>, Error> {
        let from = catchup::load_checkpoint(&self.db, consumer).await?;
        let events = catchup::read_after(&self.db, from, limit).await?;
        let Some(last) = events.last().map(|e| e.checkpoint) else {
            return Ok(None);
        };
        self.learn(&events).await?;
        Ok(Some((events, last)))
    }

    /// Learns the origin of every bulk change in `events`.
    pub(super) async fn learn(&self, events: &[StoredEvent]) -> Result<(), Error> {
        for e in events {
            if let BulkChangeEvent::BulkChangeAccepted(a) = &e.event {
                self.remember(&e.aggregate_id, matches!(a.origin, Origin::Platform { .. }));
            }
        }
        let sql = self.db.pick(&POSTGRES, &SQLITE).first_event;
        for e in events {
            if self.get(&e.aggregate_id).is_some() {
                continue;
            }
            let payload: Option<String> = with_pool!(&self.db, pool => {
                sqlx::query_scalar(sql).bind(&e.aggregate_id).fetch_optional(pool).await?
            });
            let origin = payload
                .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
                .and_then(|v| v.get("BulkChangeAccepted")?.get("origin").cloned())
                .and_then(|o| serde_json::from_value::<Origin>(o).ok())
                .unwrap_or_default();
            self.remember(&e.aggregate_id, matches!(origin, Origin::Platform { .. }));
        }
        Ok(())
    }
}

/// Moves `consumer`'s checkpoint to `at`.
pub(super) async fn save(db: &Db, consumer: &str, at: Checkpoint) -> Result<(), Error> {
    with_pool!(db, pool => {
        sqlx::query(SAVE_CHECKPOINT)
            .bind(consumer)
            .bind(at.tx)
            .bind(at.position)
            .bind(Utc::now())
            .execute(pool)
            .await?;
    });
    Ok(())
}

/// Steps a consumer until cancelled: at once while there is work, every 250 ms when idle, and
/// after a failure 1 s, 2 s, 4 s, … up to 30 s (its checkpoint does not move meanwhile).
pub(super) async fn run<F, Fut>(cancel: CancellationToken, name: &str, step: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<usize, Error>>,
{
    let mut failures = 0u32;
    loop {
        let wait = match step().await {
            Ok(0) => {
                failures = 0;
                Duration::from_millis(250)
            }
            Ok(_) => {
                failures = 0;
                Duration::ZERO
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait =
                    Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30));
                tracing::warn!(consumer = name, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "failed; it will be tried again");
                wait
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
