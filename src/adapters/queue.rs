//! The queue a worker takes bulk changes from: SQS in production ([`super::sqs::SqsQueue`]),
//! the database-backed local queue on the embedded default
//! ([`crate::store::local_queue::LocalQueue`]). One worker loop serves both.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    pub id: String,
    /// Handle for extend/delete (SQS receipt handle; the row id locally).
    pub receipt: String,
    pub body: String,
    /// String message attributes.
    pub attributes: BTreeMap<String, String>,
    /// How often it has been received, this time included.
    pub receive_count: u32,
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SQS {operation} failed: {message}")]
    Sqs {
        operation: &'static str,
        message: String,
    },
    #[error(transparent)]
    Db(#[from] crate::store::Error),
    #[error("the queue has no dead-letter queue: pass --dead-letter-queue-url or give it a redrive policy")]
    NoDeadLetterQueue,
    #[error("{0}")]
    Invalid(String),
}

/// SQS-like semantics: a received message is hidden for a visibility timeout and comes back
/// unless deleted.
pub trait Queue: Send + Sync + 'static {
    /// Up to `max` messages, waiting up to `wait` for the first (long polling).
    fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> impl Future<Output = Result<Vec<QueueMessage>, Error>> + Send;

    /// Hides the message for `visibility` from now (zero releases it at once).
    fn extend(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    fn delete(&self, receipt: &str) -> impl Future<Output = Result<(), Error>> + Send;

    /// Moves the message to the dead-letter queue with `reason` attached, and deletes it here.
    fn dead_letter(
        &self,
        message: &QueueMessage,
        reason: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    fn send(
        &self,
        body: &str,
        attributes: &BTreeMap<String, String>,
        delay: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// No message visible, in flight or delayed.
    fn is_empty(&self) -> impl Future<Output = Result<bool, Error>> + Send;
}

/// The body of a legacy message: the data is in the attributes.
pub const LEGACY_BODY: &str = "Not used";

/// The legacy message that asks a worker to run a bulk change already in the store.
pub fn legacy_message(bulk_change_id: i64) -> (String, BTreeMap<String, String>) {
    (
        LEGACY_BODY.to_string(),
        BTreeMap::from([
            ("BulkChangeId".to_string(), bulk_change_id.to_string()),
            ("RetryNumber".to_string(), "0".to_string()),
        ]),
    )
}
