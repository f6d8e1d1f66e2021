//! A durable queue in the database, for the embedded default and for running without SQS.
//! Semantics follow SQS: a received message is invisible for a visibility timeout and reappears
//! unless deleted; it is deleted only after its outcome is committed. Dead letters go to the
//! `local_dead_letters` table with their reason.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Db, Error};
use crate::adapters::queue::{Error as QueueError, Queue, QueueMessage};
use crate::{with_conn, with_pool};

#[derive(Clone, Debug)]
pub struct LocalQueue {
    db: Db,
}

/// A dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub body: String,
    pub attributes: BTreeMap<String, String>,
    pub reason: String,
}

const SEND: &str =
    "INSERT INTO local_queue (body, attributes, visible_at, receive_count, created_at)
    VALUES ($1, $2, $3, 0, $4)";

/// The statements that differ between the databases.
struct Sql {
    /// Takes the oldest visible message. PostgreSQL skips rows other receivers hold; SQLite
    /// runs one writer at a time and has no `SKIP LOCKED`.
    receive: &'static str,
}

const POSTGRES: Sql = Sql {
    receive: "
UPDATE local_queue SET visible_at = $1, receive_count = receive_count + 1
 WHERE id = (SELECT id FROM local_queue WHERE visible_at <= $2 ORDER BY id LIMIT 1
             FOR UPDATE SKIP LOCKED)
RETURNING id, body, attributes, receive_count",
};
const SQLITE: Sql = Sql {
    receive: "
UPDATE local_queue SET visible_at = $1, receive_count = receive_count + 1
 WHERE id = (SELECT id FROM local_queue WHERE visible_at <= $2 ORDER BY id LIMIT 1)
RETURNING id, body, attributes, receive_count",
};
const EXTEND: &str = "UPDATE local_queue SET visible_at = $1 WHERE id = $2";
const DELETE: &str = "DELETE FROM local_queue WHERE id = $1";
const COUNT: &str = "SELECT COUNT(*) FROM local_queue";
const DEAD: &str =
    "INSERT INTO local_dead_letters (body, attributes, reason, receive_count, failed_at)
    VALUES ($1, $2, $3, $4, $5)";
const DEAD_LIST: &str = "SELECT body, attributes, reason FROM local_dead_letters ORDER BY id";

type Row = (i64, String, String, i32);

fn to_message((id, body, attributes, receive_count): Row) -> QueueMessage {
    QueueMessage {
        id: id.to_string(),
        receipt: id.to_string(),
        body,
        attributes: serde_json::from_str(&attributes).unwrap_or_default(),
        receive_count: receive_count.max(0) as u32,
    }
}

fn receipt_id(receipt: &str) -> Result<i64, QueueError> {
    receipt
        .parse()
        .map_err(|_| QueueError::Invalid(format!("not a local queue receipt: {receipt:?}")))
}

fn after(d: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(d).unwrap_or_default()
}

impl LocalQueue {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Takes the oldest visible message (as of `now`) and hides it until `invisible_until`.
    pub async fn receive_one(
        &self,
        now: DateTime<Utc>,
        invisible_until: DateTime<Utc>,
    ) -> Result<Option<QueueMessage>, Error> {
        let sql = self.db.pick(&POSTGRES, &SQLITE).receive;
        let row: Option<Row> = with_pool!(&self.db, pool => {
            sqlx::query_as(sql)
                .bind(invisible_until)
                .bind(now)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(to_message))
    }

    /// Sets when a message becomes visible again.
    pub async fn set_visible_at(&self, id: i64, at: DateTime<Utc>) -> Result<(), Error> {
        with_pool!(&self.db, pool => {
            sqlx::query(EXTEND).bind(at).bind(id).execute(pool).await?;
        });
        Ok(())
    }

    /// Messages waiting or in flight.
    pub async fn depth(&self) -> Result<i64, Error> {
        Ok(with_pool!(&self.db, pool => sqlx::query_scalar(COUNT).fetch_one(pool).await?))
    }

    /// Everything dead-lettered so far, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, Error> {
        let rows: Vec<(String, String, String)> =
            with_pool!(&self.db, pool => sqlx::query_as(DEAD_LIST).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(|(body, attributes, reason)| DeadLetter {
                body,
                attributes: serde_json::from_str(&attributes).unwrap_or_default(),
                reason,
            })
            .collect())
    }
}

impl Queue for LocalQueue {
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<QueueMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut out = Vec::new();
            while out.len() < max as usize {
                match self.receive_one(Utc::now(), after(visibility)).await? {
                    Some(m) => out.push(m),
                    None => break,
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), QueueError> {
        Ok(self
            .set_visible_at(receipt_id(receipt)?, after(visibility))
            .await?)
    }

    async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        let id = receipt_id(receipt)?;
        with_pool!(&self.db, pool => sqlx::query(DELETE).bind(id).execute(pool).await.map(|_| ()))
            .map_err(Error::from)?;
        Ok(())
    }

    async fn dead_letter(&self, message: &QueueMessage, reason: &str) -> Result<(), QueueError> {
        let id = receipt_id(&message.receipt)?;
        let attributes = serde_json::to_string(&message.attributes).unwrap_or_default();
        let mut tx = self.db.begin().await.map_err(Error::from)?;
        with_conn!(tx.conn(), c => {
            sqlx::query(DEAD)
                .bind(&message.body)
                .bind(&attributes)
                .bind(reason)
                .bind(message.receive_count as i32)
                .bind(Utc::now())
                .execute(&mut *c)
                .await
                .map_err(Error::from)?;
            sqlx::query(DELETE)
                .bind(id)
                .execute(&mut *c)
                .await
                .map_err(Error::from)?;
        });
        tx.commit().await.map_err(Error::from)?;
        Ok(())
    }

    async fn send(
        &self,
        body: &str,
        attributes: &BTreeMap<String, String>,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let attributes = serde_json::to_string(attributes).unwrap_or_default();
        let now = Utc::now();
        let visible = after(delay);
        with_pool!(&self.db, pool => {
            sqlx::query(SEND)
                .bind(body)
                .bind(&attributes)
                .bind(visible)
                .bind(now)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(Error::from)?;
        Ok(())
    }

    async fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.depth().await? == 0)
    }
}
