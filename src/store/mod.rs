//! Persistence: the database (PostgreSQL or SQLite, chosen by URL), the event store, checkpointed
//! catch-up over the events table, and the database-backed local queue.

pub mod batched;
pub mod catchup;
pub mod event_store;
pub mod lease;
pub mod local_queue;
pub mod sqlite;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use event_store::{fenced, EventStore, Writer};

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database URL must start with postgres:// or sqlite://, got {0:?}")]
    UnsupportedUrl(String),
    #[error("cannot connect to the database: {0}")]
    Connect(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error(
        "the read models could not catch up within 60 s: a long transaction is holding them back"
    )]
    Lagging,
    #[error("stored event {aggregate_id}#{sequence} cannot be read: {message}")]
    Corrupt {
        aggregate_id: String,
        sequence: i64,
        message: String,
    },
}

/// A PostgreSQL connection idle for longer than this is pinged before it is handed out (one
/// used more recently would have failed and been dropped already if its server had gone away).
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

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

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

/// A database URL with any password removed (in the user info or as a `password` /
/// `sslpassword` query parameter), for messages.
pub fn redact_url(url: &str) -> String {
    const HIDDEN: &str = "***";
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Not a URL: say only what it starts with, up to a ':', '@' or '?' (a password could
        // follow any of them).
        let head = url.split([':', '@', '?']).next().unwrap_or("");
        return format!("{}…", head.chars().take(60).collect::<String>());
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(HIDDEN));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = ["password", "sslpassword"]
                    .iter()
                    .any(|s| k.eq_ignore_ascii_case(s));
                let v = if secret {
                    HIDDEN.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_url_hides_the_password() {
        use super::redact_url;
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        let query = redact_url("postgres://u@h/db?sslmode=disable&password=s3cret&sslpassword=k3y");
        assert!(
            !query.contains("s3cret") && !query.contains("k3y"),
            "{query}"
        );
        assert!(
            query.contains("sslmode=disable") && query.contains("password=***"),
            "{query}"
        );
        let odd = redact_url("not a url u:pw@host?password=x");
        assert!(!odd.contains("pw") && !odd.contains("password"), "{odd}");
    }
}
