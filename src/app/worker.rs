//! The worker loop: takes messages off a queue (SQS or local), runs their bulk changes, and
//! deletes a message only after its bulk change reached a committed outcome.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::intake::{self, Intake};
use super::{Engine, Error, Imported, Source};
use crate::adapters::queue::{Error as QueueError, Queue, QueueMessage};
use crate::domain::BulkChangeId;
use crate::workflow::{Progress, RunOutcome};

/// How a worker takes work.
#[derive(Debug, Clone, Copy)]
pub struct WorkOptions {
    /// Return once the queue is empty and nothing runs.
    pub exit_when_idle: bool,
    /// Bulk changes run at once (the per-downstream limits are shared between them).
    pub concurrency: usize,
    /// How long a received message stays hidden; extended every third of it while its bulk
    /// change runs.
    pub visibility: Duration,
    /// Long-polling wait of one receive (SQS allows up to 20 s).
    pub wait: Duration,
    /// A run still going this long after its message was received hands the message over (a
    /// fresh copy, then the old one deleted): SQS keeps a received message hidden for at most
    /// 12 hours.
    pub hand_over_after: Duration,
}

impl Default for WorkOptions {
    fn default() -> Self {
        Self {
            exit_when_idle: false,
            concurrency: 4,
            visibility: Duration::from_secs(30),
            wait: Duration::from_secs(20),
            hand_over_after: HAND_OVER_AFTER,
        }
    }
}

/// How often a worker looks for bulk changes nobody drives.
const ORPHAN_SCAN: Duration = Duration::from_secs(5);

/// Longest a message is hidden after a failure (SQS's delay limit).
const MAX_BACKOFF: Duration = Duration::from_secs(900);

/// SQS keeps a received message hidden for at most 12 hours; by default a run still going this
/// long after the receipt hands its message over before that.
pub const HAND_OVER_AFTER: Duration = Duration::from_secs(11 * 3600 + 30 * 60);

/// Hidden for 15 s, 30 s, 60 s, … after failed receipts, at most 900 s.
fn backoff(receive_count: u32) -> Duration {
    let exp = receive_count.saturating_sub(1).min(10);
    Duration::from_secs(15u64 << exp).min(MAX_BACKOFF)
}

impl Engine {
    /// Takes messages off `queue` and runs up to `concurrency` bulk changes at once until
    /// `cancel` fires (then stops receiving and lets the bulk changes in hand stop cleanly,
    /// releasing their messages), or, with `exit_when_idle`, until the queue is empty.
    pub async fn work<Q: Queue>(
        self: &Arc<Self>,
        queue: &Arc<Q>,
        cancel: &CancellationToken,
        options: WorkOptions,
        progress: Option<Arc<Progress>>,
    ) -> Result<(), Error> {
        let mut running = JoinSet::new();
        let concurrency = options.concurrency.max(1);
        let wait = if options.exit_when_idle {
            options.wait.min(Duration::from_secs(1))
        } else {
            options.wait
        };
        // Bulk changes left PROCESSING by a dead worker: looked for at start and every few seconds
        // (one query), so a restart resumes them at once instead of after their message's
        // visibility timeout.
        let mut next_scan = tokio::time::Instant::now();
        while !cancel.is_cancelled() {
            if tokio::time::Instant::now() >= next_scan {
                next_scan = tokio::time::Instant::now() + ORPHAN_SCAN;
                let free = concurrency.saturating_sub(running.len());
                self.adopt_orphans(&mut running, free, cancel, progress.clone())
                    .await;
            }
            while let Some(done) = running.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a bulk change task failed");
                }
            }
            if options.exit_when_idle && running.is_empty() && queue.is_empty().await? {
                break;
            }
            let free = concurrency.saturating_sub(running.len());
            if free == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = running.join_next() => {}
                }
                continue;
            }
            let received = tokio::select! {
                _ = cancel.cancelled() => break,
                r = queue.receive(free.min(10) as u32, wait, options.visibility) => r,
            };
            let messages = match received {
                Ok(messages) => {
                    metrics::counter!(crate::metrics::QUEUE_RECEIVED)
                        .increment(messages.len() as u64);
                    messages
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot receive from the queue; retrying in 5 s");
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                if options.exit_when_idle && running.is_empty() && queue.is_empty().await? {
                    break;
                }
                if !running.is_empty() && wait < Duration::from_millis(200) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
            for message in messages {
                let span = tracing::info_span!("message", sqs.message_id = %message.id, receive_count = message.receive_count);
                let engine = self.clone();
                let queue = queue.clone();
                let cancel = cancel.clone();
                let progress = progress.clone();
                running.spawn(tracing::Instrument::instrument(
                    async move {
                        engine
                            .handle(&*queue, message, &cancel, options, progress.as_deref())
                            .await
                    },
                    span,
                ));
            }
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    /// Starts up to `free` bulk changes that are `PROCESSING` but driven by no live worker (if
    /// another worker adopts one first, the run here returns `Busy` at once). Their messages,
    /// when they reappear, find them finished or in hand.
    async fn adopt_orphans(
        self: &Arc<Self>,
        running: &mut JoinSet<()>,
        free: usize,
        cancel: &CancellationToken,
        progress: Option<Arc<Progress>>,
    ) {
        let ids = match crate::store::lease::unattended(&self.db).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for unfinished bulk changes");
                return;
            }
        };
        for id in ids
            .into_iter()
            .filter(|id| !self.is_running(*id))
            .take(free)
        {
            let engine = self.clone();
            let cancel = cancel.clone();
            let progress = progress.clone();
            running.spawn(async move {
                match engine.run(id, &cancel, progress.as_deref()).await {
                    Ok(RunOutcome::Busy) => {}
                    Ok(outcome) => {
                        tracing::info!(bulk_change_id = %id, ?outcome, "resumed an unfinished bulk change")
                    }
                    Err(e) => {
                        tracing::warn!(bulk_change_id = %id, error = %e, "resuming an unfinished bulk change failed; its message retries it")
                    }
                }
            });
        }
    }

    /// One message, from parsing to its deletion (or release, or dead letter).
    async fn handle<Q: Queue>(
        &self,
        queue: &Q,
        message: QueueMessage,
        cancel: &CancellationToken,
        options: WorkOptions,
        progress: Option<&Progress>,
    ) {
        let visibility = options.visibility;
        let id = match intake::parse(&message) {
            Err(rejection) => return self.reject(queue, &message, &rejection.to_string()).await,
            Ok(Intake::Submit(submission)) => {
                let id = submission.bulk_change_id();
                let intake::Submission { checked, body } = *submission;
                match self
                    .submit_checked(Arc::new(Source::Bytes(body)), checked, false)
                    .await
                {
                    Ok(submitted) => submitted.id,
                    Err(Error::Rejected(why)) => {
                        return self
                            .reject(queue, &message, &format!("bulk change {id}: {why}"))
                            .await
                    }
                    Err(e) => return self.retry_later(queue, &message, &e.to_string()).await,
                }
            }
            Ok(Intake::Run { bulk_change_id, .. }) => {
                match self
                    .store
                    .inspect(bulk_change_id, |b| b.header().is_some())
                    .await
                {
                    Ok(true) => bulk_change_id,
                    Ok(false) => match self.import(bulk_change_id).await {
                        Ok(Imported::Accepted) => bulk_change_id,
                        Ok(Imported::Refused(why)) => {
                            let why = format!("bulk change {bulk_change_id} refused (written back to the platform): {why}");
                            return self.reject(queue, &message, &why).await;
                        }
                        Ok(Imported::Finished(status)) => {
                            tracing::info!(bulk_change_id = %bulk_change_id, %status, "the platform's bulk change is already finished; deleting the message");
                            if let Err(e) = deleted(queue.delete(&message.receipt).await) {
                                tracing::warn!(error = %e, "could not delete the message");
                            }
                            return;
                        }
                        Ok(Imported::NotFound) => {
                            let why = match self.platform {
                                Some(_) => format!("bulk change {bulk_change_id} is neither in bulkflow nor in the platform's DeviceBulkChange"),
                                None => format!("bulk change {bulk_change_id} is not known to bulkflow; submit it first (or configure [platform])"),
                            };
                            return self.reject(queue, &message, &why).await;
                        }
                        Err(e) => return self.retry_later(queue, &message, &e.to_string()).await,
                    },
                    Err(e) => return self.retry_later(queue, &message, &e.to_string()).await,
                }
            }
        };
        let received = tokio::time::Instant::now();
        // Whether the message was handed over (a fresh copy sent, this one deleted).
        let handed_over = std::sync::atomic::AtomicBool::new(false);
        let keep_hidden = async {
            loop {
                tokio::time::sleep(visibility / 3).await;
                if received.elapsed() + visibility >= options.hand_over_after {
                    // The copy may show up at once: whoever receives it finds the bulk change
                    // driven here (and waits its turn, or leaves it to us).
                    match Self::hand_over(queue, &message, id, visibility.min(MAX_BACKOFF)).await {
                        Ok(()) => {
                            handed_over.store(true, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!(bulk_change_id = %id, "message handed over before SQS's 12-hour visibility limit");
                            std::future::pending::<()>().await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not hand the message over; retrying")
                        }
                    }
                }
                if let Err(e) = queue.extend(&message.receipt, visibility).await {
                    tracing::warn!(error = %e, "could not extend the message's visibility");
                }
            }
        };
        let result = tokio::select! {
            r = tracing::Instrument::instrument(self.run(id, cancel, progress), tracing::info_span!("bulk_change", bulk_change_id = %id)) => r,
            _ = keep_hidden => unreachable!("the keep-alive loop never ends"),
        };
        if handed_over.load(std::sync::atomic::Ordering::Relaxed) {
            // The fresh copy carries the bulk change on; this message is gone.
            return;
        }
        match result {
            Ok(RunOutcome::Stopped) => {
                tracing::info!(bulk_change_id = %id, "stopped; releasing the message");
                if let Err(e) = queue.extend(&message.receipt, Duration::ZERO).await {
                    tracing::warn!(error = %e, "could not release the message; it reappears after its visibility timeout");
                }
            }
            Ok(RunOutcome::Busy | RunOutcome::Superseded) => {
                // Another worker drives it. Hiding this message again and again would move it
                // to the dead-letter queue with no reason. On PostgreSQL that worker is proven
                // alive (it holds the advisory lock), and if it dies the orphan scan of any
                // worker resumes the bulk change at once: once it is PROCESSING this message is
                // not needed. Elsewhere the holder may be dead with its lease not yet expired:
                // a fresh copy, due when the lease could have run out, replaces this one (so its
                // receive count starts again).
                let processing = self
                    .store
                    .inspect(id, |b| {
                        use crate::domain::BulkChangeStatus::{Cancelling, Processing};
                        matches!(b.status(), Processing | Cancelling)
                    })
                    .await
                    .unwrap_or(false);
                let later = self.config.lease_ttl().max(visibility).min(MAX_BACKOFF);
                if processing && matches!(self.db, crate::store::Db::Postgres(_)) {
                    tracing::info!(bulk_change_id = %id, "driven by another worker; deleting this message");
                    if let Err(e) = deleted(queue.delete(&message.receipt).await) {
                        tracing::warn!(error = %e, "could not delete the message");
                    }
                } else if let Err(e) = Self::hand_over(queue, &message, id, later).await {
                    tracing::warn!(error = %e, "could not replace the message; hiding it");
                    if let Err(e) = queue.extend(&message.receipt, later).await {
                        tracing::warn!(error = %e, "could not hide the message");
                    }
                }
            }
            Ok(outcome) => {
                tracing::info!(bulk_change_id = %id, ?outcome, "message done");
                if let Err(e) = deleted(queue.delete(&message.receipt).await) {
                    // Redelivery is harmless: the bulk change's outcome is committed.
                    tracing::warn!(error = %e, "could not delete the message; it will be redelivered");
                }
            }
            Err(e) => self.retry_later(queue, &message, &e.to_string()).await,
        }
    }

    /// Sends a fresh message for `id`, visible after `delay`, and deletes `message`.
    async fn hand_over<Q: Queue>(
        queue: &Q,
        message: &QueueMessage,
        id: BulkChangeId,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let (body, attributes) = crate::adapters::queue::legacy_message(id.get());
        queue.send(&body, &attributes, delay).await?;
        deleted(queue.delete(&message.receipt).await)
    }

    /// Dead-letters a message that can never be processed, with the reason.
    async fn reject<Q: Queue>(&self, queue: &Q, message: &QueueMessage, reason: &str) {
        tracing::error!(sqs.message_id = %message.id, %reason, "message rejected; moving it to the dead-letter queue");
        match queue.dead_letter(message, reason).await {
            Ok(()) => metrics::counter!(crate::metrics::QUEUE_DEAD_LETTERED).increment(1),
            Err(QueueError::NoDeadLetterQueue) => {
                tracing::error!(sqs.message_id = %message.id,
                    "no dead-letter queue: the message stays hidden 900 s and moves by the redrive policy, if any");
                let _ = queue.extend(&message.receipt, MAX_BACKOFF).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not dead-letter the message; it will be redelivered")
            }
        }
    }

    /// Leaves a message that could not be processed now to reappear later.
    async fn retry_later<Q: Queue>(&self, queue: &Q, message: &QueueMessage, why: &str) {
        let delay = backoff(message.receive_count);
        tracing::error!(sqs.message_id = %message.id, reason = %why, delay_s = delay.as_secs(),
            "bulk change could not make progress; the message reappears later");
        if let Err(e) = queue.extend(&message.receipt, delay).await {
            tracing::warn!(error = %e, "could not delay the message; it reappears after its visibility timeout");
        }
    }
}

/// A message deletion, counted when it took place.
fn deleted(result: Result<(), QueueError>) -> Result<(), QueueError> {
    if result.is_ok() {
        metrics::counter!(crate::metrics::QUEUE_DELETED).increment(1);
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_grows_and_respects_the_sqs_limit() {
        assert_eq!(super::backoff(1).as_secs(), 15);
        assert_eq!(super::backoff(3).as_secs(), 60);
        assert_eq!(super::backoff(40).as_secs(), 900);
    }
}
