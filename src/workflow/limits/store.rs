//! Where an account's pace and shares live: in PostgreSQL (`rate_limits`, `rate_limit_shares`),
//! shared by every worker on the database, with the database's clock as the one clock; or in
//! this process's memory (the embedded SQLite mode, one worker).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use sqlx::{PgConnection, PgPool};

use super::pace::Pace;
use super::share::{self, Other};

/// What a worker configured for an account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Configured {
    pub rate: f64,
    pub burst: u32,
    pub max_concurrency: usize,
    /// The daily budget (calls a UTC day), if any.
    pub per_day: Option<u64>,
}

/// One account's row, as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AccountView {
    pub key: String,
    pub configured_rate: f64,
    pub rate: f64,
    /// The rate that drew the last 429.
    pub ceiling: Option<f64>,
    pub throttled: i64,
    /// Times the rate was lowered.
    pub lowered: i64,
    /// Seconds until the carrier's wait ends (0 when not held).
    pub held_for_secs: f64,
    pub max_concurrency: i64,
    /// The daily budget, and the calls it has left today.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_calls_per_day: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls_left_today: Option<i64>,
    /// Workers holding a live share, and the slots they hold.
    pub workers: i64,
    pub slots_held: i64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, thiserror::Error)]
#[error("the shared rate limit of {key} could not be read or written: {source}")]
pub struct Error {
    key: String,
    #[source]
    source: sqlx::Error,
}

impl Error {
    /// The engine closed its database pool (it is shutting down).
    pub fn pool_closed(&self) -> bool {
        matches!(self.source, sqlx::Error::PoolClosed)
    }
}

/// A result in the store's clock: `value` and the store's `now` when it was computed.
pub struct AtNow<T> {
    pub value: T,
    pub now: f64,
}

pub enum Store {
    Postgres {
        pool: PgPool,
        /// The connection holding this worker's liveness lock (see `LIVE`), on which its
        /// shares are written; opened on first use, and again after it failed.
        live: tokio::sync::Mutex<Option<PgConnection>>,
    },
    Memory {
        /// When the store was made, on the monotonic clock and in Unix seconds: the store's
        /// clock is Unix seconds, as PostgreSQL's is (the daily budget's days are UTC days).
        epoch: Instant,
        unix: f64,
        paces: Mutex<HashMap<String, Pace>>,
    },
}

const NOW: &str = "extract(epoch from clock_timestamp())::float8";

/// A share counts while it has not run out and, if its worker took the liveness lock when
/// writing it (`live_locked`), while that lock is held: a worker's process dying closes its
/// connection and frees its share at once instead of after its time to live. (`s` is the share.)
const LIVE: &str = "(NOT s.live_locked OR EXISTS (
    SELECT 1 FROM pg_locks l, (SELECT hashtextextended('bulkflow:limits:' || s.owner, 0) AS k) h
     WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid::text::bigint = (h.k >> 32) & 4294967295
       AND l.objid::text::bigint = h.k & 4294967295))";

/// A connection of its own holding `owner`'s liveness lock for as long as it stays open.
async fn live_connection(pool: &PgPool, owner: &str) -> Result<PgConnection, sqlx::Error> {
    let mut conn = pool.acquire().await?.detach();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('bulkflow:limits:' || $1, 0))")
        .bind(owner)
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

impl Store {
    pub fn memory() -> Self {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self::Memory {
            epoch: Instant::now(),
            unix,
            paces: Mutex::new(HashMap::new()),
        }
    }

    pub fn postgres(pool: PgPool) -> Self {
        Self::Postgres {
            pool,
            live: tokio::sync::Mutex::new(None),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    /// Changes the account's pace under its lock (`FOR UPDATE` on PostgreSQL), creating it on
    /// first use; the worker's configuration is written with it (the last one wins).
    pub async fn pace<T>(
        &self,
        key: &str,
        configured: Configured,
        change: impl FnOnce(&mut Pace, f64) -> T,
    ) -> Result<AtNow<T>, Error> {
        match self {
            Self::Memory { epoch, unix, paces } => {
                let now = unix + epoch.elapsed().as_secs_f64();
                let mut paces = paces.lock().unwrap_or_else(|p| p.into_inner());
                let pace = paces
                    .entry(key.to_string())
                    .or_insert_with(|| Pace::new(configured.rate, now));
                pace.configure(configured.rate);
                pace.budget(configured.per_day);
                Ok(AtNow {
                    value: change(pace, now),
                    now,
                })
            }
            Self::Postgres { pool, .. } => {
                let fail = |source| Error {
                    key: key.to_string(),
                    source,
                };
                let mut tx = pool.begin().await.map_err(fail)?;
                let row: Option<PaceRow> = sqlx::query_as(&format!(
                    "SELECT configured_rate, rate, ceiling, next_at, held_until, climbed_at, \
                     generation, throttled, per_day, day, day_used, {NOW} AS now \
                     FROM rate_limits WHERE key = $1 FOR UPDATE"
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
                let row = match row {
                    Some(row) => row,
                    None => {
                        // First use of the account anywhere: create it (another worker may do
                        // the same at the same moment; either row is the same).
                        sqlx::query(&format!(
                            "INSERT INTO rate_limits (key, configured_rate, rate, next_at, held_until, \
                             climbed_at, max_concurrency) VALUES ($1, $2, $2, {NOW}, 0, {NOW}, $3) \
                             ON CONFLICT (key) DO NOTHING"
                        ))
                        .bind(key)
                        .bind(configured.rate)
                        .bind(configured.max_concurrency as i32)
                        .execute(&mut *tx)
                        .await
                        .map_err(fail)?;
                        sqlx::query_as(&format!(
                            "SELECT configured_rate, rate, ceiling, next_at, held_until, climbed_at, \
                             generation, throttled, per_day, day, day_used, {NOW} AS now \
                             FROM rate_limits WHERE key = $1 FOR UPDATE"
                        ))
                        .bind(key)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(fail)?
                    }
                };
                let now = row.now;
                let mut pace = row.into_pace();
                pace.configure(configured.rate);
                pace.budget(configured.per_day);
                let value = change(&mut pace, now);
                sqlx::query(
                    "UPDATE rate_limits SET configured_rate = $2, rate = $3, ceiling = $4, next_at = $5, \
                     held_until = $6, climbed_at = $7, generation = $8, throttled = $9, \
                     max_concurrency = $10, per_day = $11, day = $12, day_used = $13, \
                     updated_at = now() WHERE key = $1",
                )
                .bind(key)
                .bind(pace.configured)
                .bind(pace.rate)
                .bind(pace.ceiling)
                .bind(pace.next_at)
                .bind(pace.held_until)
                .bind(pace.climbed_at)
                .bind(pace.generation)
                .bind(pace.throttled)
                .bind(configured.max_concurrency as i32)
                .bind(pace.per_day)
                .bind(pace.day)
                .bind(pace.day_used)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
                tx.commit().await.map_err(fail)?;
                Ok(AtNow { value, now })
            }
        }
    }

    /// Renews `owner`'s share of the account's concurrency: it wants `wanted` slots; `settle`
    /// is given the slots it may use until `ttl` seconds from now, makes the worker use no more,
    /// and says how many it holds (more while busy ones have not ended), which is recorded
    /// before the account's lock is let go. A share not renewed within `ttl` (its worker died)
    /// no longer counts. Returns the slots granted.
    pub async fn share(
        &self,
        key: &str,
        owner: &str,
        configured: Configured,
        wanted: usize,
        ttl: f64,
        settle: impl FnOnce(usize) -> usize,
    ) -> Result<usize, Error> {
        let Self::Postgres { pool, live } = self else {
            settle(configured.max_concurrency);
            return Ok(configured.max_concurrency);
        };
        let fail = |source| Error {
            key: key.to_string(),
            source,
        };
        // Shares are written on the connection holding the liveness lock, so a written share
        // is one whose worker holds the lock; a failed connection is opened again next time.
        let mut live = live.lock().await;
        let conn = match &mut *live {
            Some(conn) => conn,
            None => live.insert(live_connection(pool, owner).await.map_err(fail)?),
        };
        let result = Self::share_on(conn, key, owner, configured, wanted, ttl, settle).await;
        if result.is_err() {
            *live = None;
        }
        result.map_err(fail)
    }

    async fn share_on(
        conn: &mut PgConnection,
        key: &str,
        owner: &str,
        configured: Configured,
        wanted: usize,
        ttl: f64,
        settle: impl FnOnce(usize) -> usize,
    ) -> Result<usize, sqlx::Error> {
        use sqlx::Connection;
        let mut tx = conn.begin().await?;
        // The account's row is its lock: created on first use, and this worker's concurrency
        // written (the last one configured wins).
        let (max, now): (i32, f64) = sqlx::query_as(&format!(
            "INSERT INTO rate_limits (key, configured_rate, rate, next_at, held_until, climbed_at, \
             max_concurrency) VALUES ($1, $2, $2, {NOW}, 0, {NOW}, $3) \
             ON CONFLICT (key) DO UPDATE SET max_concurrency = excluded.max_concurrency \
             RETURNING max_concurrency, {NOW}"
        ))
        .bind(key)
        .bind(configured.rate)
        .bind(configured.max_concurrency as i32)
        .fetch_one(&mut *tx)
        .await?;
        let others: Vec<(String, i32, i32)> = sqlx::query_as(&format!(
            "SELECT owner, wanted, slots FROM rate_limit_shares s \
             WHERE key = $1 AND owner <> $2 AND expires_at > $3 AND {LIVE} \
             ORDER BY owner COLLATE \"C\""
        ))
        .bind(key)
        .bind(owner)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let place = others.iter().filter(|(o, _, _)| o.as_str() < owner).count();
        let others: Vec<Other> = others
            .into_iter()
            .map(|(_, wanted, slots)| Other {
                wanted: wanted.max(0) as usize,
                slots: slots.max(0) as usize,
            })
            .collect();
        let granted = share::grant(max.max(0) as usize, wanted, &others, place);
        // Slots still busy stay counted until their calls end; none is added past the grant
        // from here on, so the others never count on fewer than this worker uses.
        let held = settle(granted);
        sqlx::query(
            "INSERT INTO rate_limit_shares (key, owner, wanted, slots, expires_at, live_locked) \
             VALUES ($1, $2, $3, $4, $5, true) ON CONFLICT (key, owner) DO UPDATE \
             SET wanted = excluded.wanted, slots = excluded.slots, expires_at = excluded.expires_at, \
                 live_locked = true",
        )
        .bind(key)
        .bind(owner)
        .bind(wanted as i32)
        .bind(held as i32)
        .bind(now + ttl)
        .execute(&mut *tx)
        .await
        ?;
        // Shares of workers gone for an hour are only history.
        sqlx::query("DELETE FROM rate_limit_shares WHERE key = $1 AND expires_at < $2")
            .bind(key)
            .bind(now - 3_600.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(granted)
    }
}

impl Store {
    /// Gives back every share `owner` holds (a worker leaving).
    pub async fn release(&self, owner: &str) -> Result<(), Error> {
        let Self::Postgres { pool, .. } = self else {
            return Ok(());
        };
        sqlx::query("DELETE FROM rate_limit_shares WHERE owner = $1")
            .bind(owner)
            .execute(pool)
            .await
            .map_err(|source| Error {
                key: "*".into(),
                source,
            })?;
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct PaceRow {
    configured_rate: f64,
    rate: f64,
    ceiling: Option<f64>,
    next_at: f64,
    held_until: f64,
    climbed_at: f64,
    generation: i64,
    throttled: i64,
    per_day: Option<i64>,
    day: i64,
    day_used: i64,
    now: f64,
}

impl PaceRow {
    fn into_pace(self) -> Pace {
        Pace {
            configured: self.configured_rate,
            rate: self.rate,
            ceiling: self.ceiling,
            next_at: self.next_at,
            held_until: self.held_until,
            climbed_at: self.climbed_at,
            generation: self.generation,
            throttled: self.throttled,
            per_day: self.per_day,
            day: self.day,
            day_used: self.day_used,
        }
    }
}

/// Every account on the database with its learned rate and live shares (PostgreSQL; the
/// embedded mode keeps its limits in the worker's memory and returns none).
pub async fn accounts(db: &crate::store::Db) -> Result<Vec<AccountView>, sqlx::Error> {
    let crate::store::Db::Postgres(pool) = db else {
        return Ok(Vec::new());
    };
    sqlx::query_as::<_, AccountRow>(&format!(
        "WITH now AS (SELECT {NOW} AS t) \
         SELECT r.key, r.configured_rate, r.rate, r.ceiling, r.throttled, r.generation, \
                greatest(r.held_until - now.t, 0) AS held_for_secs, r.max_concurrency::int8, \
                r.per_day, CASE WHEN r.per_day IS NULL THEN NULL \
                     WHEN r.day = floor(now.t / 86400)::int8 THEN greatest(r.per_day - r.day_used, 0) \
                     WHEN r.day > floor(now.t / 86400)::int8 THEN 0 \
                     ELSE r.per_day END AS calls_left_today, \
                count(s.owner) AS workers, coalesce(sum(s.slots), 0)::int8 AS slots_held, r.updated_at \
         FROM rate_limits r CROSS JOIN now \
         LEFT JOIN rate_limit_shares s ON s.key = r.key AND s.expires_at > now.t AND {LIVE} \
         GROUP BY r.key, now.t ORDER BY r.key"
    ))
    .fetch_all(pool)
    .await
    .map(|rows| rows.into_iter().map(AccountRow::into_view).collect())
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    key: String,
    configured_rate: f64,
    rate: f64,
    ceiling: Option<f64>,
    throttled: i64,
    generation: i64,
    held_for_secs: f64,
    max_concurrency: i64,
    per_day: Option<i64>,
    calls_left_today: Option<i64>,
    workers: i64,
    slots_held: i64,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl AccountRow {
    fn into_view(self) -> AccountView {
        AccountView {
            key: self.key,
            configured_rate: self.configured_rate,
            rate: self.rate,
            ceiling: self.ceiling,
            throttled: self.throttled,
            lowered: self.generation,
            held_for_secs: self.held_for_secs,
            max_concurrency: self.max_concurrency,
            max_calls_per_day: self.per_day,
            calls_left_today: self.calls_left_today,
            workers: self.workers,
            slots_held: self.slots_held,
            updated_at: self.updated_at,
        }
    }
}
