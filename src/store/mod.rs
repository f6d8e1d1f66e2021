//! Persistence: the database (PostgreSQL or SQLite, chosen by URL), the event store, checkpointed
//! catch-up over the events table, and the database-backed local queue.

pub mod batched;
pub mod catchup;
mod db;
pub mod event_store;
pub mod lease;
pub mod local_queue;
pub mod recent;
pub mod sqlite;

use std::time::Duration;

pub use db::{Conn, Db, Tx};
pub use event_store::{fenced, EventStore, Writer};

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database URL must start with postgres:// or sqlite://, got {0:?}")]
    UnsupportedUrl(String),
    #[error("cannot connect to the database: {0}")]
    Connect(sqlx::Error),
    #[error(
        "the database at {0} keeps a session alive after its connection closed (a lock it held \
         stayed held): a connection pooler that hands sessions on is in between (PgBouncer in \
         pool_mode = transaction or statement, or in session mode with server_reset_query \
         emptied). bulkflow holds bulk changes and carrier-account shares with session locks that must end \
         with the connection (that is how a dead worker's work is taken over): connect to \
         PostgreSQL directly or through a pool in session mode"
    )]
    SessionsOutliveConnections(String),
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
