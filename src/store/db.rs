//! The database handle: one of two pools, and one way to run a statement on whichever it is.
//!
//! Most of bulkflow's SQL is the same on PostgreSQL and SQLite; only the pool's type differs.
//! [`with_pool!`](crate::with_pool) and [`with_conn!`](crate::with_conn) compile one body once
//! per database, so a query is written once. Where the SQL differs, a module keeps both
//! dialects in one table and picks with [`Db::pick`]; an explicit `match` on the variant is
//! left only where the databases behave differently (advisory locks, `SKIP LOCKED`, arrays,
//! `TRUNCATE`). See `docs/adr/0003-two-databases.md`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{PgConnection, Postgres, Sqlite, SqliteConnection, Transaction};

use super::{redact_url, Error, PING_AFTER_IDLE};

/// Runs `$body` with `$pool` bound to the pool `$db` (a `&Db`) holds: `&PgPool` or
/// `&SqlitePool`. The body is compiled once for each, so it may use whatever both support.
///
/// ```ignore
/// let n: i64 = with_pool!(db, pool => sqlx::query_scalar(SQL).fetch_one(pool).await)?;
/// ```
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Postgres($pool) => $body,
            $crate::store::Db::Sqlite($pool) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to the connection a [`Conn`] holds: `&mut PgConnection` or
/// `&mut SqliteConnection` (use it as `&mut *$conn` to run several statements).
#[macro_export]
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::store::Conn::Postgres($c) => $body,
            $crate::store::Conn::Sqlite($c) => $body,
        }
    };
}

/// How long a closed connection's session may take to end (its backend to exit) before the
/// probe below says it outlived its connection.
const SESSION_END_WAIT: Duration = Duration::from_secs(3);

/// bulkflow's hold on a bulk change and a worker's share of a carrier account are session
/// advisory locks that PostgreSQL must drop the moment the connection holding them closes: that
/// is how a dead worker's bulk change is taken over at once. A pooler in transaction or statement
/// mode (PgBouncer `pool_mode = transaction`) breaks that: the session lives on in the pool after
/// the client went away (the lock with it, so a killed worker's bulk change is never taken over),
/// and another client may be handed the same session (and with it the lock). Proves the property
/// itself: takes a lock of its own on one connection, closes it, and waits for the lock to be
/// gone, in simple-protocol statements (a transaction pooler also fails sqlx's prepared ones, with
/// errors that do not say why).
async fn sessions_end_with_their_connections(pool: &PgPool, url: &str) -> Result<(), Error> {
    use sqlx::{Connection, Row};
    let key = format!("bulkflow:session-probe:{}", uuid::Uuid::new_v4());
    let mut conn = pool.acquire().await.map_err(Error::Connect)?.detach();
    sqlx::raw_sql(&format!(
        "SELECT pg_advisory_lock(hashtextextended('{key}', 0))"
    ))
    .execute(&mut conn)
    .await
    .map_err(Error::Connect)?;
    conn.close().await.map_err(Error::Connect)?;
    let held = format!(
        "SELECT count(*) FROM pg_locks l, (SELECT hashtextextended('{key}', 0) AS k) h
          WHERE l.locktype = 'advisory' AND l.objsubid = 1
            AND l.classid::text::bigint = (h.k >> 32) & 4294967295
            AND l.objid::text::bigint = h.k & 4294967295"
    );
    let deadline = std::time::Instant::now() + SESSION_END_WAIT;
    loop {
        let row = sqlx::raw_sql(&held)
            .fetch_one(pool)
            .await
            .map_err(Error::Connect)?;
        if row.try_get::<i64, _>(0).map_err(Error::Connect)? == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::SessionsOutliveConnections(redact_url(url)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The isolation every bulkflow session runs at, whatever the database's or role's default.
const SET_READ_COMMITTED: &str = "SET default_transaction_isolation = 'read committed'";

/// A connection pool to one of the two supported databases.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    /// Connects by URL: `postgres://…` / `postgresql://…` or `sqlite://PATH` (created if missing).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // sqlx sends `extra_float_digits` at startup by default, which PgBouncer refuses
            // unless configured to ignore it ("unsupported startup parameter"); PostgreSQL 12 and
            // later already send floats exactly, and sqlx reads them in binary.
            let options = PgConnectOptions::from_str(url)
                .map_err(Error::Connect)?
                .extra_float_digits(None);
            // sqlx pings every connection before handing it out, which doubled the round trips
            // of the runner's statements. Ping only connections that sat idle for a while: those
            // are the ones a database restart or a dropped link may have killed (a connection
            // used since then would have failed and been dropped already).
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(2))
                .acquire_timeout(Duration::from_secs(30))
                .test_before_acquire(false)
                // Every statement of bulkflow assumes READ COMMITTED (the lease, fence and
                // limit statements rely on seeing rows committed by other workers, and none of
                // them retries a serialization failure). A database or role whose DBA set
                // `default_transaction_isolation` to `serializable` or `repeatable read` made
                // concurrent workers fail with serialization errors; the session sets it back.
                // It is set as a statement rather than a startup option, which PgBouncer refuses.
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::Executor::execute(&mut *conn, SET_READ_COMMITTED).await?;
                        Ok(())
                    })
                })
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for > PING_AFTER_IDLE {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .connect_with(options)
                .await
                .map_err(Error::Connect)?;
            sessions_end_with_their_connections(&pool, url).await?;
            Ok(Self::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(Error::Connect)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.clamp(1, 4))
                .acquire_timeout(Duration::from_secs(30))
                .test_before_acquire(false)
                .connect_with(options)
                .await
                .map_err(Error::Connect)?;
            Ok(Self::Sqlite(pool))
        } else {
            Err(Error::UnsupportedUrl(redact_url(url)))
        }
    }

    /// Applies the migrations of `migrations/postgres` or `migrations/sqlite`.
    pub async fn migrate(&self) -> Result<(), Error> {
        match self {
            Self::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
            Self::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    /// Migrations shipped with this binary that the database has not applied (0 when current).
    pub async fn pending_migrations(&self) -> Result<usize, Error> {
        const SQL: &str = "SELECT version FROM _sqlx_migrations WHERE success";
        let (migrator, applied): (sqlx::migrate::Migrator, Vec<i64>) = match self {
            Self::Postgres(pool) => (
                sqlx::migrate!("./migrations/postgres"),
                sqlx::query_scalar(SQL).fetch_all(pool).await?,
            ),
            Self::Sqlite(pool) => (
                sqlx::migrate!("./migrations/sqlite"),
                sqlx::query_scalar(SQL).fetch_all(pool).await?,
            ),
        };
        Ok(migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
            .count())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }

    /// This database's statement of the two (for SQL that differs between them).
    pub fn pick<'a, T: ?Sized>(&self, postgres: &'a T, sqlite: &'a T) -> &'a T {
        match self {
            Self::Postgres(_) => postgres,
            Self::Sqlite(_) => sqlite,
        }
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
        })
    }

    /// Begins a transaction with this database's statement of the two (`BEGIN IMMEDIATE` takes
    /// SQLite's write lock up front).
    pub async fn begin_with(
        &self,
        postgres: &'static str,
        sqlite: &'static str,
    ) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Postgres(pool) => Tx::Postgres(pool.begin_with(postgres).await?),
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin_with(sqlite).await?),
        })
    }
}

/// A connection of either database, borrowed (from a [`Tx`] or a pool's connection).
pub enum Conn<'c> {
    Postgres(&'c mut PgConnection),
    Sqlite(&'c mut SqliteConnection),
}

impl Conn<'_> {
    /// This connection's database's statement of the two.
    pub fn pick<'a, T: ?Sized>(&self, postgres: &'a T, sqlite: &'a T) -> &'a T {
        match self {
            Self::Postgres(_) => postgres,
            Self::Sqlite(_) => sqlite,
        }
    }
}

impl<'c> From<&'c mut PgConnection> for Conn<'c> {
    fn from(c: &'c mut PgConnection) -> Self {
        Self::Postgres(c)
    }
}

impl<'c> From<&'c mut SqliteConnection> for Conn<'c> {
    fn from(c: &'c mut SqliteConnection) -> Self {
        Self::Sqlite(c)
    }
}

/// A transaction on either database.
pub enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    /// The transaction's connection, to run statements on with [`with_conn!`](crate::with_conn).
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Postgres(tx) => Conn::Postgres(&mut *tx),
            Self::Sqlite(tx) => Conn::Sqlite(&mut *tx),
        }
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => tx.commit().await,
            Self::Sqlite(tx) => tx.commit().await,
        }
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => tx.rollback().await,
            Self::Sqlite(tx) => tx.rollback().await,
        }
    }
}
