//! A PostgreSQL event repository that appends a command's events in one multi-row `INSERT`
//! (postgres-es sends one statement per event). Same table layout; reads are delegated to
//! postgres-es.

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

/// Rows per statement (7 parameters each, well under PostgreSQL's 65,535).
const ROWS_PER_INSERT: usize = 1_000;

pub struct BatchedPgRepository {
    pool: PgPool,
    inner: PostgresEventRepository,
}

impl BatchedPgRepository {
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: PostgresEventRepository::new(pool.clone()),
            pool,
        }
    }
}

fn error(e: sqlx::Error) -> PersistenceError {
    match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            PersistenceError::ConnectionError(Box::new(e))
        }
        _ => PersistenceError::UnknownError(Box::new(e)),
    }
}

impl PersistedEventRepository for BatchedPgRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.inner.get_events::<A>(aggregate_id).await
    }

    /// The events after `last_sequence`. postgres-es writes the sequence into the SQL text, so
    /// every call is a new statement to parse and plan; this one is prepared once.
    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        const SQL: &str = "SELECT aggregate_id, sequence, event_type, event_version, payload, metadata
            FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence";
        let rows: Vec<(String, i64, String, String, Value, Value)> = sqlx::query_as(SQL)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(last_sequence as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(error)?;
        Ok(rows
            .into_iter()
            .map(
                |(id, sequence, event_type, event_version, payload, metadata)| {
                    SerializedEvent::new(
                        id,
                        sequence as usize,
                        A::TYPE.to_string(),
                        event_type,
                        event_version,
                        payload,
                        metadata,
                    )
                },
            )
            .collect())
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.inner.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            return self.inner.persist::<A>(events, snapshot_update).await;
        }
        let mut tx = self.pool.begin().await.map_err(error)?;
        for chunk in events.chunks(ROWS_PER_INSERT) {
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ",
            );
            qb.push_values(chunk, |mut row, e| {
                row.push_bind(A::TYPE)
                    .push_bind(&e.aggregate_id)
                    .push_bind(e.sequence as i64)
                    .push_bind(&e.event_type)
                    .push_bind(&e.event_version)
                    .push_bind(&e.payload)
                    .push_bind(&e.metadata);
            });
            qb.build().execute(&mut *tx).await.map_err(error)?;
        }
        tx.commit().await.map_err(error)?;
        Ok(())
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_all_events::<A>().await
    }
}
