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
            let options = PgConnectOptions::from_str(url).map_err(Error::Connect)?;
            // sqlx pings every connection before handing it out, which doubled the round trips
            // of the runner's statements. Ping only connections that sat idle for a while: those
            // are the ones a database restart or a dropped link may have killed (a connection
            // used since then would have failed and been dropped already).
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(2))
                .acquire_timeout(Duration::from_secs(30))
                .test_before_acquire(false)
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
