//! Leases: one worker drives a bulk change at a time; a dead worker's lease expires and another
//! takes over. Optimistic concurrency on the event stream backs this up: a worker that lost its
//! lease cannot append on top of the new holder's events.
//!
//! On PostgreSQL the holder also keeps a session-level advisory lock on its own connection for as
//! long as it drives the bulk change ([`Presence`]). PostgreSQL drops that lock the moment the
//! holder's process dies (its socket closes), so a restarted or other worker sees at once that
//! the lease's holder is gone and takes over without waiting for the lease to expire. SQLite has
//! no such signal: there the lease expires after its TTL.

use std::time::Duration;

use chrono::Utc;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::{Db, Error};
use crate::domain::BulkChangeId;

const ACQUIRE: &str = "
INSERT INTO bulk_change_leases (bulk_change_id, owner, expires_at) VALUES ($1, $2, $3)
ON CONFLICT (bulk_change_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
 WHERE bulk_change_leases.expires_at < $4 OR bulk_change_leases.owner = excluded.owner";
/// Takes the lease whatever its state: only after [`Presence::claim`] proved its holder gone.
const TAKE_OVER: &str = "
INSERT INTO bulk_change_leases (bulk_change_id, owner, expires_at) VALUES ($1, $2, $3)
ON CONFLICT (bulk_change_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at";
const RENEW: &str =
    "UPDATE bulk_change_leases SET expires_at = $3 WHERE bulk_change_id = $1 AND owner = $2";
const RELEASE: &str = "DELETE FROM bulk_change_leases WHERE bulk_change_id = $1 AND owner = $2";

fn until(ttl: Duration) -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default()
}

/// Proof that this process, alive, drives a bulk change: on PostgreSQL a connection holding the
/// bulk change's advisory lock (gone when the process dies); on SQLite nothing.
pub struct Presence(Option<PgConnection>);

/// The advisory lock of a bulk change, in bulkflow's own key space.
const TRY_LOCK: &str =
    "SELECT pg_try_advisory_lock(hashtextextended('bulkflow:bulk_change:' || $1::text, 0))";
/// So that PostgreSQL also notices a holder whose host vanished without closing the socket.
/// Sent with the connection's startup packet, so they cost no round trip.
const KEEPALIVES: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

impl Presence {
    /// `Ok(None)` when a live process holds the bulk change.
    pub async fn claim(db: &Db, id: BulkChangeId) -> Result<Option<Self>, Error> {
        let Db::Postgres(pool) = db else {
            return Ok(Some(Self(None)));
        };
        let mut conn = pool
            .connect_options()
            .as_ref()
            .clone()
            .options(KEEPALIVES)
            .connect()
            .await?;
        let locked: bool = sqlx::query_scalar(TRY_LOCK)
            .bind(id.get())
            .fetch_one(&mut conn)
            .await?;
        if locked {
            Ok(Some(Self(Some(conn))))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Whether holding this proves any other holder of the lease dead (PostgreSQL only).
    pub fn is_exclusive(&self) -> bool {
        self.0.is_some()
    }

    /// Lets go (closing the session releases the advisory lock).
    pub async fn release(self) {
        if let Some(conn) = self.0 {
            let _ = conn.close().await;
        }
    }
}

/// Takes the lease if it is free, expired, or already ours; or, with an exclusive `presence`,
/// whatever its state (its holder is dead).
pub async fn acquire(
    db: &Db,
    id: BulkChangeId,
    owner: &str,
    ttl: Duration,
    presence: &Presence,
) -> Result<bool, Error> {
    let now = Utc::now();
    if presence.is_exclusive() {
        if let Db::Postgres(p) = db {
            sqlx::query(TAKE_OVER)
                .bind(id.get())
                .bind(owner)
                .bind(until(ttl))
                .execute(p)
                .await?;
            return Ok(true);
        }
    }
    let rows = match db {
        Db::Postgres(p) => sqlx::query(ACQUIRE)
            .bind(id.get())
            .bind(owner)
            .bind(until(ttl))
            .bind(now)
            .execute(p)
            .await?
            .rows_affected(),
        Db::Sqlite(p) => sqlx::query(ACQUIRE)
            .bind(id.get())
            .bind(owner)
            .bind(until(ttl))
            .bind(now)
            .execute(p)
            .await?
            .rows_affected(),
    };
    Ok(rows == 1)
}

/// Extends our lease; false when it is no longer ours.
pub async fn renew(db: &Db, id: BulkChangeId, owner: &str, ttl: Duration) -> Result<bool, Error> {
    let rows = match db {
        Db::Postgres(p) => sqlx::query(RENEW)
            .bind(id.get())
            .bind(owner)
            .bind(until(ttl))
            .execute(p)
            .await?
            .rows_affected(),
        Db::Sqlite(p) => sqlx::query(RENEW)
            .bind(id.get())
            .bind(owner)
            .bind(until(ttl))
            .execute(p)
            .await?
            .rows_affected(),
    };
    Ok(rows == 1)
}

pub async fn release(db: &Db, id: BulkChangeId, owner: &str) -> Result<(), Error> {
    match db {
        Db::Postgres(p) => {
            sqlx::query(RELEASE)
                .bind(id.get())
                .bind(owner)
                .execute(p)
                .await?;
        }
        Db::Sqlite(p) => {
            sqlx::query(RELEASE)
                .bind(id.get())
                .bind(owner)
                .execute(p)
                .await?;
        }
    }
    Ok(())
}
