//! Leases: one worker drives a bulk change at a time; a dead worker's lease expires and another
//! takes over. Optimistic concurrency on the event stream backs this up: a worker that lost its
//! lease cannot append on top of the new holder's events.

use std::time::Duration;

use chrono::Utc;

use super::{Db, Error};
use crate::domain::BulkChangeId;

const ACQUIRE: &str = "
INSERT INTO bulk_change_leases (bulk_change_id, owner, expires_at) VALUES ($1, $2, $3)
ON CONFLICT (bulk_change_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
 WHERE bulk_change_leases.expires_at < $4 OR bulk_change_leases.owner = excluded.owner";
const RENEW: &str =
    "UPDATE bulk_change_leases SET expires_at = $3 WHERE bulk_change_id = $1 AND owner = $2";
const RELEASE: &str = "DELETE FROM bulk_change_leases WHERE bulk_change_id = $1 AND owner = $2";

fn until(ttl: Duration) -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default()
}

/// Takes the lease if it is free, expired, or already ours.
pub async fn acquire(db: &Db, id: BulkChangeId, owner: &str, ttl: Duration) -> Result<bool, Error> {
    let now = Utc::now();
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
