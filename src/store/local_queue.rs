//! A durable queue in the database, for the embedded default and for running without SQS.
//! Semantics follow SQS: a received message is invisible for a visibility timeout and reappears
//! unless deleted; it is deleted only after its outcome is committed.

use chrono::{DateTime, Utc};

use super::{Db, Error};

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: i64,
    pub body: String,
    pub receive_count: i32,
}

#[derive(Clone, Debug)]
pub struct LocalQueue {
    db: Db,
}

const SEND: &str =
    "INSERT INTO local_queue (body, visible_at, receive_count, created_at) VALUES ($1, $2, 0, $3)";
const RECEIVE_PG: &str = "
UPDATE local_queue SET visible_at = $1, receive_count = receive_count + 1
 WHERE id = (SELECT id FROM local_queue WHERE visible_at <= $2 ORDER BY id LIMIT 1
             FOR UPDATE SKIP LOCKED)
RETURNING id, body, receive_count";
const RECEIVE_LITE: &str = "
UPDATE local_queue SET visible_at = $1, receive_count = receive_count + 1
 WHERE id = (SELECT id FROM local_queue WHERE visible_at <= $2 ORDER BY id LIMIT 1)
RETURNING id, body, receive_count";
const EXTEND: &str = "UPDATE local_queue SET visible_at = $1 WHERE id = $2";
const DELETE: &str = "DELETE FROM local_queue WHERE id = $1";
const COUNT: &str = "SELECT COUNT(*) FROM local_queue";

impl LocalQueue {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn send(&self, body: &str, now: DateTime<Utc>) -> Result<(), Error> {
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(SEND)
                    .bind(body)
                    .bind(now)
                    .bind(now)
                    .execute(p)
                    .await?;
            }
            Db::Sqlite(p) => {
                sqlx::query(SEND)
                    .bind(body)
                    .bind(now)
                    .bind(now)
                    .execute(p)
                    .await?;
            }
        }
        Ok(())
    }

    /// Takes the oldest visible message and hides it until `invisible_until`.
    pub async fn receive(
        &self,
        now: DateTime<Utc>,
        invisible_until: DateTime<Utc>,
    ) -> Result<Option<Message>, Error> {
        let row: Option<(i64, String, i32)> = match &self.db {
            Db::Postgres(p) => {
                sqlx::query_as(RECEIVE_PG)
                    .bind(invisible_until)
                    .bind(now)
                    .fetch_optional(p)
                    .await?
            }
            Db::Sqlite(p) => {
                sqlx::query_as(RECEIVE_LITE)
                    .bind(invisible_until)
                    .bind(now)
                    .fetch_optional(p)
                    .await?
            }
        };
        Ok(row.map(|(id, body, receive_count)| Message {
            id,
            body,
            receive_count,
        }))
    }

    /// Keeps a message hidden while its work goes on.
    pub async fn extend(&self, id: i64, invisible_until: DateTime<Utc>) -> Result<(), Error> {
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(EXTEND)
                    .bind(invisible_until)
                    .bind(id)
                    .execute(p)
                    .await?;
            }
            Db::Sqlite(p) => {
                sqlx::query(EXTEND)
                    .bind(invisible_until)
                    .bind(id)
                    .execute(p)
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn delete(&self, id: i64) -> Result<(), Error> {
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(DELETE).bind(id).execute(p).await?;
            }
            Db::Sqlite(p) => {
                sqlx::query(DELETE).bind(id).execute(p).await?;
            }
        }
        Ok(())
    }

    /// Messages waiting or in flight.
    pub async fn len(&self) -> Result<i64, Error> {
        Ok(match &self.db {
            Db::Postgres(p) => sqlx::query_scalar(COUNT).fetch_one(p).await?,
            Db::Sqlite(p) => sqlx::query_scalar(COUNT).fetch_one(p).await?,
        })
    }

    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }
}
