//! The platform: the portal's own database, where a bulk change is written by the portal before
//! its message is sent, and where the portal's screens read the results (as the original
//! `AltaworxDeviceBulkChange` Lambda read and wrote them). See `docs/platform.md`.
//!
//! [`Platform`] is what bulkflow needs of it; [`postgres::PgPlatform`] implements it for a
//! platform on PostgreSQL (tables and columns under their exact names, in a configured schema).

pub mod mapping;
pub mod notify;
pub mod postgres;
pub mod writeback;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::config::PlatformSection;
use crate::domain::{BulkChangeId, BulkChangeRequest};

/// Why the platform could not be read or written (a database that is down, a missing table):
/// the work is tried again later, nothing is lost.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("platform database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("platform database URL: {0}")]
    Url(String),
}

/// Why a platform bulk change is not run: the reason names the table, row and field. `rows` are
/// the device rows at fault (empty when the bulk change itself is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub rows: Vec<(i64, String)>,
}

impl Refusal {
    /// A refusal of the bulk change as a whole.
    pub fn bulk(reason: String) -> Self {
        Self {
            reason,
            rows: Vec::new(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)?;
        if self.rows.len() > 1 {
            write!(f, " (and {} more rows)", self.rows.len() - 1)?;
        }
        Ok(())
    }
}

/// What the platform holds for a bulk change id.
#[derive(Debug)]
pub enum Loaded {
    /// A request to run, from the active, unprocessed rows.
    Request(Box<BulkChangeRequest>),
    /// The portal's bulk change cannot be run.
    Refused(Refusal),
    /// Already `PROCESSED` or `ERROR` there: nothing to do.
    Finished(String),
    /// No such `DeviceBulkChange` row.
    NotFound,
}

/// What bulkflow needs of the platform's database.
pub trait Platform: Send + Sync {
    /// Reads a bulk change and its active, unprocessed device rows (in pages, not at once).
    fn load(&self, id: BulkChangeId) -> BoxFuture<'_, Result<Loaded, Error>>;

    /// Writes a refusal back as the original would: the rows at fault and the others not yet
    /// processed `ERROR` with the reason, a log row, and the bulk change `ERROR`.
    fn refuse<'a>(
        &'a self,
        id: BulkChangeId,
        refusal: &'a Refusal,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Writes one batch of outcomes in one transaction; idempotent (a batch may come twice).
    fn write<'a>(&'a self, batch: &'a writeback::WriteBatch) -> BoxFuture<'a, Result<(), Error>>;
}

/// The configured platform, if any (connections are opened when first used, so a platform
/// database that is down does not stop a worker from starting).
pub fn connect(section: &PlatformSection) -> Result<Option<Arc<dyn Platform>>, Error> {
    match &section.database_url {
        None => Ok(None),
        Some(url) => Ok(Some(Arc::new(postgres::PgPlatform::connect_lazy(
            url, section,
        )?))),
    }
}
