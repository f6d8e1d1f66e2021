//! `bulkflow rebuild`: re-derives read models from the whole event history into the shadow
//! tables (`<name>_rebuild`), then swaps them with the live ones in one transaction. The live
//! read side is never empty or half-built; an interrupted rebuild resumes from its checkpoint;
//! workers may run meanwhile (their projector is held only for the swap).

use std::time::{Duration, Instant};

use super::projector::{Projector, Target, CONSUMER, PROJECTIONS, THROUGHPUT};
use crate::store::catchup::{self, Checkpoint};
use crate::store::{Conn, Db};
use crate::{with_conn, with_pool};

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub events: u64,
    pub elapsed: Duration,
    pub resumed: bool,
}

impl Stats {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Why a rebuild could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown projection {0:?}; expected one of device_bulk_change, m2m_device_change, device_bulk_change_log")]
    UnknownProjection(String),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(crate::store::Error::Sql(e))
    }
}

fn tables(target: &Target) -> Vec<(&'static str, String)> {
    PROJECTIONS
        .iter()
        .chain([&THROUGHPUT])
        .zip([
            &target.bulk,
            &target.devices,
            &target.log,
            &target.throughput,
        ])
        .filter_map(|(live, shadow)| shadow.as_ref().map(|s| (*live, s.clone())))
        .collect()
}

/// Events per rebuild transaction: larger than the live projector's, as nothing waits for them.
const REBUILD_BATCH: i64 = 10_000;

/// The statements that differ between the databases.
struct Sql {
    /// Empties a table: PostgreSQL's `TRUNCATE` does not visit every row; SQLite has none.
    empty: &'static str,
    /// Begins the swap: SQLite takes its one write lock up front (`BEGIN IMMEDIATE`);
    /// PostgreSQL locks the live tables next.
    begin_swap: &'static str,
}

const POSTGRES: Sql = Sql {
    empty: "TRUNCATE",
    begin_swap: "BEGIN",
};
const SQLITE: Sql = Sql {
    empty: "DELETE FROM",
    begin_swap: "BEGIN IMMEDIATE",
};

/// Empties a shadow table.
async fn empty(db: &Db, table: &str) -> Result<(), sqlx::Error> {
    let sql = format!("{} {table}", db.pick(&POSTGRES, &SQLITE).empty);
    with_pool!(db, pool => sqlx::query(&sql).execute(pool).await.map(|_| ()))
}

async fn has_checkpoint(db: &Db, consumer: &str) -> Result<bool, sqlx::Error> {
    const SQL: &str = "SELECT COUNT(*) FROM consumer_checkpoints WHERE consumer = $1";
    let n: i64 = with_pool!(db, pool => {
        sqlx::query_scalar(SQL).bind(consumer).fetch_one(pool).await?
    });
    Ok(n > 0)
}

/// Events in the store, and how many lie at or before `at` (for progress).
async fn counts(db: &Db, at: Checkpoint) -> Result<(u64, u64), sqlx::Error> {
    const SQL: &str = "SELECT COUNT(*), COUNT(CASE WHEN position <= $1 THEN 1 END) FROM events";
    let (all, done): (i64, i64) = with_pool!(db, pool => {
        sqlx::query_as(SQL).bind(at.position).fetch_one(pool).await?
    });
    Ok((all.max(0) as u64, done.max(0) as u64))
}

/// Rebuilds all read models, or only `only`, calling `progress(done, total)` as it goes.
pub async fn rebuild(
    db: &Db,
    only: Option<&str>,
    progress: impl Fn(u64, u64),
) -> Result<Stats, Error> {
    if let Some(name) = only {
        if !PROJECTIONS.contains(&name) {
            return Err(Error::UnknownProjection(name.chars().take(60).collect()));
        }
    }
    let target = Target::rebuild(only);
    let started = Instant::now();
    let resumed = has_checkpoint(db, &target.consumer).await?;
    if !resumed {
        for (_, shadow) in tables(&target) {
            empty(db, &shadow).await?;
        }
    }
    let projector = Projector::to(db.clone(), target.clone()).with_batch(REBUILD_BATCH);
    let mut applied = 0u64;
    loop {
        // Fill the shadow tables up to the present. Counted once per pass (a count reads the
        // whole table); in between, progress adds what each batch applied.
        let at = catchup::load_checkpoint(db, &target.consumer).await?;
        let (mut total, mut done) = counts(db, at).await?;
        progress(done, total);
        applied += projector
            .drain(|n| {
                done += n;
                total = total.max(done);
                progress(done, total);
            })
            .await?;
        projector.catch_up().await?;
        if swap(db, &target, only.is_none()).await? {
            break;
        }
        // The live projector moved past us while we were catching up: catch up again.
    }
    for (_, shadow) in tables(&target) {
        empty(db, &shadow).await?;
    }
    Ok(Stats {
        events: applied,
        elapsed: started.elapsed(),
        resumed,
    })
}

/// Swaps the shadow tables in, unless the live read models are ahead of them (then returns false).
async fn swap(db: &Db, target: &Target, all: bool) -> Result<bool, Error> {
    let names = tables(target);
    let mut tx = db
        .begin_with(POSTGRES.begin_swap, SQLITE.begin_swap)
        .await?;
    if let Conn::Postgres(c) = tx.conn() {
        let lock = format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            names.iter().map(|(l, _)| *l).collect::<Vec<_>>().join(", ")
        );
        sqlx::query(&lock).execute(c).await?;
    }
    const CP: &str = "SELECT tx_id, position FROM consumer_checkpoints WHERE consumer = $1";
    let read = |row: Option<(i64, i64)>| {
        row.map_or_else(Checkpoint::default, |(tx, position)| Checkpoint {
            tx,
            position,
        })
    };
    let swapped = with_conn!(tx.conn(), c => {
        let live = read(
            sqlx::query_as(CP)
                .bind(CONSUMER)
                .fetch_optional(&mut *c)
                .await?,
        );
        let ours = read(
            sqlx::query_as(CP)
                .bind(&target.consumer)
                .fetch_optional(&mut *c)
                .await?,
        );
        if live > ours {
            false
        } else {
            for (live_name, shadow) in &names {
                let old = format!("{live_name}_swap");
                for rename in [
                    format!("ALTER TABLE {live_name} RENAME TO {old}"),
                    format!("ALTER TABLE {shadow} RENAME TO {live_name}"),
                    format!("ALTER TABLE {old} RENAME TO {shadow}"),
                ] {
                    sqlx::query(&rename).execute(&mut *c).await?;
                }
            }
            if all {
                sqlx::query(catchup::SAVE_CHECKPOINT)
                    .bind(CONSUMER)
                    .bind(ours.tx)
                    .bind(ours.position)
                    .bind(chrono::Utc::now())
                    .execute(&mut *c)
                    .await?;
            }
            sqlx::query("DELETE FROM consumer_checkpoints WHERE consumer = $1")
                .bind(&target.consumer)
                .execute(&mut *c)
                .await?;
            true
        }
    });
    if swapped {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(swapped)
}
