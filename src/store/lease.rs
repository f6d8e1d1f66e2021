//! Leases: one worker drives a bulk change at a time; a dead worker's lease expires and another
//! takes over.
//!
//! A lease alone is not exclusive: a holder that is only *presumed* dead (its lock session cut by
//! a proxy, a failover or a network blip, or its process stalled past the lease's expiry) keeps
//! running until it next checks. So every acquisition takes the next **epoch** of the bulk
//! change ([`Hold::fence`]); the runner's appends carry it and are refused in the same
//! transaction once a later epoch exists ([`Fenced`]), and before any non-idempotent call the
//! runner confirms it still holds the bulk change ([`Hold::confirm`]).
//!
//! On PostgreSQL the holder also keeps a session-level advisory lock on its own connection for as
//! long as it drives the bulk change. PostgreSQL drops that lock the moment the holder's session
//! ends (its process dies, or the session is cut), so another worker sees at once that the holder
//! is gone and takes over without waiting for the lease to expire. SQLite has no such signal:
//! there the lease expires after its TTL.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::{Db, Error};
use crate::domain::BulkChangeId;
use crate::with_pool;

/// Takes the lease if it is free, expired, or already ours, with the next epoch.
const ACQUIRE: &str = "
INSERT INTO bulk_change_leases (bulk_change_id, owner, expires_at, epoch) VALUES ($1, $2, $3, 1)
ON CONFLICT (bulk_change_id) DO UPDATE
   SET owner = excluded.owner, expires_at = excluded.expires_at, epoch = bulk_change_leases.epoch + 1
 WHERE bulk_change_leases.expires_at < $4 OR bulk_change_leases.owner = excluded.owner
RETURNING epoch";
/// Takes the lease whatever its state, with the next epoch: only after the advisory lock proved
/// its holder's session gone. Also says whether that was a takeover: another owner's lease
/// that had not run out nor been released (its worker died or was cut off).
const TAKE_OVER: &str = "
WITH before AS (SELECT owner, expires_at FROM bulk_change_leases WHERE bulk_change_id = $1)
INSERT INTO bulk_change_leases (bulk_change_id, owner, expires_at, epoch) VALUES ($1, $2, $3, 1)
ON CONFLICT (bulk_change_id) DO UPDATE
   SET owner = excluded.owner, expires_at = excluded.expires_at, epoch = bulk_change_leases.epoch + 1
RETURNING epoch,
   COALESCE((SELECT owner <> $2 AND expires_at > now() FROM before), false) AS took_over";
const RENEW: &str = "UPDATE bulk_change_leases SET expires_at = $3
 WHERE bulk_change_id = $1 AND owner = $2 AND epoch = $4";
/// Expires the lease but keeps the row, so the next acquisition's epoch is higher.
const RELEASE: &str = "UPDATE bulk_change_leases SET expires_at = $3
 WHERE bulk_change_id = $1 AND owner = $2 AND epoch = $4";
/// Whether the lease is still this holder's (and, on SQLite, unexpired).
const HELD: &str = "SELECT COUNT(*) FROM bulk_change_leases
 WHERE bulk_change_id = $1 AND owner = $2 AND epoch = $3 AND expires_at > $4";

/// The advisory lock of a bulk change, in bulkflow's own key space. The same statement sets the
/// session's TCP keepalives, so that PostgreSQL also notices a holder whose host vanished
/// without closing the socket (10 s idle, then 3 probes 5 s apart). They are set here rather than
/// sent as startup `options`, which poolers such as PgBouncer refuse ("unsupported startup
/// parameter: options") unless told to ignore them; here they cost no extra round trip. It also
/// sets the session to READ COMMITTED, which the lease statements assume (see
/// `Db::connect`): this session does not come from the pool.
const TRY_LOCK: &str = "SELECT set_config('tcp_keepalives_idle', '10', false),
        set_config('tcp_keepalives_interval', '5', false),
        set_config('tcp_keepalives_count', '3', false),
        set_config('default_transaction_isolation', 'read committed', false),
        pg_try_advisory_lock(hashtextextended('bulkflow:bulk_change:' || $1::text, 0))";

/// A confirmation this recent stands for the next call (so a burst of Rev POSTs costs one
/// round trip, not one each).
const CONFIRM_FRESH: Duration = Duration::from_millis(100);

fn until(ttl: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default()
}

/// What an append is checked against: the epoch its runner holds the bulk change under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub bulk_change_id: BulkChangeId,
    pub epoch: i64,
}

/// An append refused because a later holder took the bulk change over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bulk change {}: lease epoch {} is stale (another worker took it over); nothing was written", .0.bulk_change_id, .0.epoch)]
pub struct Fenced(pub Fence);

/// Why a holder can no longer act for its bulk change.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("the lease of bulk change {0} belongs to a later holder or has expired")]
    Superseded(BulkChangeId),
    #[error("the session holding bulk change {id}'s lock is gone: {source}")]
    Session {
        id: BulkChangeId,
        source: sqlx::Error,
    },
    #[error("cannot confirm the lease of bulk change {id}: {source}")]
    Unconfirmed {
        id: BulkChangeId,
        source: sqlx::Error,
    },
}

/// This process's hold on one bulk change: the lease at an epoch, and on PostgreSQL the session
/// holding the bulk change's advisory lock (gone when the process or the session dies).
pub struct Hold {
    db: Db,
    fence: Fence,
    owner: String,
    ttl: Duration,
    session: tokio::sync::Mutex<Option<PgConnection>>,
    confirmed: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("fence", &self.fence)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Hold {
    /// Takes the bulk change: `Ok(None)` when a live holder has it. On PostgreSQL the advisory
    /// lock decides (a holder whose session is gone is dead to us, and its lease is taken over);
    /// on SQLite the lease must be free, expired or already ours.
    pub async fn take(
        db: &Db,
        id: BulkChangeId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Self>, Error> {
        let (epoch, session) = match db {
            Db::Postgres(pool) => {
                let mut conn = pool
                    .connect_options()
                    .as_ref()
                    .clone()
                    .application_name(&format!("bulkflow-hold {id} {owner}"))
                    .connect()
                    .await?;
                let (_, _, _, _, locked): (String, String, String, String, bool) =
                    sqlx::query_as(TRY_LOCK)
                        .bind(id.get())
                        .fetch_one(&mut conn)
                        .await?;
                if !locked {
                    let _ = conn.close().await;
                    return Ok(None);
                }
                let (epoch, took_over): (i64, bool) = sqlx::query_as(TAKE_OVER)
                    .bind(id.get())
                    .bind(owner)
                    .bind(until(ttl))
                    .fetch_one(&mut conn)
                    .await?;
                if took_over {
                    tracing::info!(bulk_change_id = %id, epoch, "took the bulk change over from a worker that held it without releasing it");
                    metrics::counter!(crate::metrics::LEASE_TAKEOVERS).increment(1);
                }
                (epoch, Some(conn))
            }
            Db::Sqlite(pool) => {
                let epoch: Option<i64> = sqlx::query_scalar(ACQUIRE)
                    .bind(id.get())
                    .bind(owner)
                    .bind(until(ttl))
                    .bind(Utc::now())
                    .fetch_optional(pool)
                    .await?;
                match epoch {
                    Some(epoch) => (epoch, None),
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Self {
            db: db.clone(),
            fence: Fence {
                bulk_change_id: id,
                epoch,
            },
            owner: owner.to_string(),
            ttl,
            session: tokio::sync::Mutex::new(session),
            confirmed: Mutex::new(Some(Instant::now())),
        }))
    }

    pub fn fence(&self) -> Fence {
        self.fence
    }

    pub fn epoch(&self) -> i64 {
        self.fence.epoch
    }

    fn id(&self) -> BulkChangeId {
        self.fence.bulk_change_id
    }

    /// Proves, with a round trip at most 100 ms old (`CONFIRM_FRESH`), that this hold is still the
    /// bulk change's current one: on PostgreSQL through the session that holds the advisory lock
    /// (a cut session fails here), on SQLite by the lease row being ours and unexpired.
    pub async fn confirm(&self) -> Result<(), Lost> {
        if self.fresh() {
            return Ok(());
        }
        let mut session = self.session.lock().await;
        // Another task may have confirmed while this one waited for the session.
        if self.fresh() {
            return Ok(());
        }
        let id = self.id();
        let held: i64 = match (&self.db, session.as_mut()) {
            (Db::Postgres(_), Some(conn)) => sqlx::query_scalar(HELD)
                .bind(id.get())
                .bind(&self.owner)
                .bind(self.fence.epoch)
                .bind(Utc::now())
                .fetch_one(&mut *conn)
                .await
                .map_err(|source| Lost::Session { id, source })?,
            (Db::Postgres(_), None) => return Err(Lost::Superseded(id)),
            (Db::Sqlite(pool), _) => sqlx::query_scalar(HELD)
                .bind(id.get())
                .bind(&self.owner)
                .bind(self.fence.epoch)
                .bind(Utc::now())
                .fetch_one(pool)
                .await
                .map_err(|source| Lost::Unconfirmed { id, source })?,
        };
        if held != 1 {
            return Err(Lost::Superseded(id));
        }
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Ok(())
    }

    fn fresh(&self) -> bool {
        self.confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < CONFIRM_FRESH)
    }

    /// Runs `sql` (`RENEW` or `RELEASE`: same parameters) on this hold's lease row.
    async fn update(
        &self,
        sql: &'static str,
        expires_at: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        let id = self.id().get();
        Ok(with_pool!(&self.db, pool => {
            sqlx::query(sql)
                .bind(id)
                .bind(&self.owner)
                .bind(expires_at)
                .bind(self.fence.epoch)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Extends the lease and checks the lock session; an error when this hold is lost.
    pub async fn renew(&self) -> Result<(), RenewError> {
        let rows = self
            .update(RENEW, until(self.ttl))
            .await
            .map_err(RenewError::Database)?;
        if rows != 1 {
            return Err(RenewError::Lost(Lost::Superseded(self.id())));
        }
        // Forget the last confirmation so this one goes to the database (on PostgreSQL, through
        // the lock session: a cut session is noticed here even when no Rev call asks).
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.confirm().await.map_err(RenewError::Lost)
    }

    /// Lets go: expires the lease (keeping its epoch) and closes the lock session.
    pub async fn release(&self) {
        if let Err(e) = self.update(RELEASE, DateTime::<Utc>::UNIX_EPOCH).await {
            tracing::warn!(bulk_change_id = %self.id(), error = %e, "could not release the lease; it expires by itself");
        }
        if let Some(conn) = self.session.lock().await.take() {
            let _ = conn.close().await;
        }
    }
}

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The hold is gone for good: stop.
    #[error(transparent)]
    Lost(Lost),
    /// The database could not be reached: try again until the lease would expire.
    #[error("lease renewal failed: {0}")]
    Database(sqlx::Error),
}

/// Bulk changes a worker started (or an operator cancelled) and nobody drives now: `PROCESSING`
/// or `CANCELLING` in the read model with no
/// live holder (PostgreSQL: nobody holds its advisory lock, see [`Hold`]; SQLite: no lease
/// that has not expired). After a crash they wait here until a worker adopts them.
pub async fn unattended(db: &Db) -> Result<Vec<BulkChangeId>, Error> {
    const PG: &str = "
SELECT b.id FROM device_bulk_change b
 WHERE b.status IN ('PROCESSING', 'CANCELLING')
   AND NOT EXISTS (
       SELECT 1 FROM pg_locks l, (SELECT hashtextextended('bulkflow:bulk_change:' || b.id::text, 0) AS k) h
        WHERE l.locktype = 'advisory' AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::text::bigint = (h.k >> 32) & 4294967295
          AND l.objid::text::bigint = h.k & 4294967295)
 ORDER BY b.id";
    const SQLITE: &str = "
SELECT b.id FROM device_bulk_change b
 WHERE b.status IN ('PROCESSING', 'CANCELLING')
   AND NOT EXISTS (SELECT 1 FROM bulk_change_leases l
                    WHERE l.bulk_change_id = b.id AND l.expires_at >= $1)
 ORDER BY b.id";
    // The databases differ here: PostgreSQL asks its lock table who is alive, SQLite the leases.
    let ids: Vec<i64> = match db {
        Db::Postgres(p) => sqlx::query_scalar(PG).fetch_all(p).await?,
        Db::Sqlite(p) => {
            sqlx::query_scalar(SQLITE)
                .bind(Utc::now())
                .fetch_all(p)
                .await?
        }
    };
    Ok(ids
        .into_iter()
        .filter_map(|i| BulkChangeId::new(i).ok())
        .collect())
}
