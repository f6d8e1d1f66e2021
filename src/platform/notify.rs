//! Status notifications, as the original's `NotifyStatusUpdateDone`: after devices of the
//! platform's bulk changes end, a configured webhook receives them in batches of at most 100,
//! as JSON, signed with HMAC-SHA256.
//!
//! An outbox driven by the catch-up: a checkpointed consumer of the events (`platform-notify`)
//! whose checkpoint moves only after every batch of a read was accepted (2xx). A failed delivery
//! is retried with backoff (1 s … 30 s) from the same checkpoint, so each finished device is
//! delivered **at least once**; a batch may come again after a failure or a crash, with the same
//! `X-Bulkflow-Delivery` id, so the receiver can tell. It runs beside the runs and never blocks
//! or fails one.
//!
//! The request: `POST {webhook_url}`, `Content-Type: application/json`,
//! `X-Bulkflow-Delivery: <hex id of the batch>`, `X-Bulkflow-Timestamp: <unix seconds>`,
//! `X-Bulkflow-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`, and the body
//! `{"bulk_change_id": N, "changes": [{"m2m_device_change_id", "event_sequence", "iccid",
//! "status", "status_details", "has_errors", "processed_date"}…]}`.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::writeback::{self, Error, Origins};
use crate::domain::bulk_change::BulkChangeEvent;
use crate::projections::rows::{ops, RowOp};
use crate::store::catchup::StoredEvent;
use crate::store::Db;

/// The consumer name of the notifications in `consumer_checkpoints`.
pub const CONSUMER: &str = "platform-notify";
/// Most device changes in one notification (as the original).
pub const MAX_CHANGES: usize = 100;
/// Events read per step.
const BATCH: i64 = 1_000;

/// One finished device change, as notified.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub m2m_device_change_id: i64,
    /// The sequence of the event that ended the device: with the id, it identifies the change
    /// (a change delivered again carries the same pair).
    pub event_sequence: i64,
    pub iccid: String,
    pub status: &'static str,
    pub status_details: String,
    pub has_errors: bool,
    pub processed_date: DateTime<Utc>,
}

/// One notification's body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    pub bulk_change_id: i64,
    pub changes: Vec<Change>,
}

/// The notifications `events` lead to, for the bulk changes `ours` says came from the platform:
/// per bulk change, in order, at most [`MAX_CHANGES`] each.
pub fn notifications(events: &[StoredEvent], ours: impl Fn(&str) -> bool) -> Vec<Notification> {
    let mut out: Vec<Notification> = Vec::new();
    for stored in events.iter().filter(|e| ours(&e.aggregate_id)) {
        let iccids: std::collections::HashMap<i64, String> = match &stored.event {
            BulkChangeEvent::DeviceProcessed(e) => [&e.device].into_iter().map(iccid_of).collect(),
            BulkChangeEvent::DeviceFailed(e) => [&e.device].into_iter().map(iccid_of).collect(),
            BulkChangeEvent::DevicesCancelled(e) => {
                e.devices.iter().map(|c| iccid_of(&c.device)).collect()
            }
            _ => continue,
        };
        let bulk_change_id: i64 = stored.aggregate_id.parse().unwrap_or_default();
        for op in ops(stored) {
            let RowOp::Device(u) = op else { continue };
            if !u.is_processed {
                continue;
            }
            let change = Change {
                m2m_device_change_id: u.id,
                event_sequence: stored.sequence,
                iccid: iccids.get(&u.id).cloned().unwrap_or_default(),
                status: u.status.as_str(),
                status_details: u.details,
                has_errors: u.has_errors,
                processed_date: u.processed_date.unwrap_or_else(|| stored.event.at()),
            };
            match out.last_mut() {
                Some(n) if n.bulk_change_id == bulk_change_id && n.changes.len() < MAX_CHANGES => {
                    n.changes.push(change)
                }
                _ => out.push(Notification {
                    bulk_change_id,
                    changes: vec![change],
                }),
            }
        }
    }
    out
}

fn iccid_of(d: &crate::domain::bulk_change::DeviceRef) -> (i64, String) {
    (d.device_change_id.get(), d.iccid.to_string())
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The `X-Bulkflow-Signature` value of `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    format!(
        "sha256={}",
        crate::domain::request::hex(&hmac_sha256(secret, &message))
    )
}

/// The notifying consumer.
pub struct Notifier {
    db: Db,
    url: String,
    secret: SecretString,
    http: reqwest::Client,
    origins: Origins,
}

impl Notifier {
    /// `http`: a client from [`crate::adapters::http::client`].
    pub fn new(db: Db, url: String, secret: SecretString, http: reqwest::Client) -> Self {
        Self {
            origins: Origins::new(db.clone()),
            db,
            url,
            secret,
            http,
        }
    }

    async fn deliver(&self, n: &Notification) -> Result<(), Error> {
        let body = serde_json::to_vec(n).map_err(|e| Error::Delivery(e.to_string()))?;
        let delivery = crate::domain::request::hex(&Sha256::digest(&body)[..16]);
        let timestamp = Utc::now().timestamp();
        let signed = signature(self.secret.expose_secret().as_bytes(), timestamp, &body);
        let response = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("X-Bulkflow-Delivery", &delivery)
            .header("X-Bulkflow-Timestamp", timestamp.to_string())
            .header("X-Bulkflow-Signature", signed)
            .body(body)
            .send()
            .await
            .map_err(|e| Error::Delivery(format!("webhook: {}", e.without_url())))?;
        if !response.status().is_success() {
            return Err(Error::Delivery(format!(
                "webhook answered {}",
                response.status()
            )));
        }
        Ok(())
    }

    /// Delivers the notifications of one read of events, then moves the checkpoint past it.
    pub async fn step(&self) -> Result<usize, Error> {
        let Some((events, last)) = self.origins.next(CONSUMER, BATCH).await? else {
            return Ok(0);
        };
        for n in notifications(&events, |id| self.origins.is_platform(id)) {
            self.deliver(&n).await?;
        }
        writeback::save(&self.db, CONSUMER, last).await?;
        Ok(events.len())
    }

    /// Delivers everything committed before the call.
    pub async fn catch_up(&self) -> Result<usize, Error> {
        crate::store::catchup::until_caught_up(&self.db, CONSUMER, || self.step()).await
    }

    /// Runs until cancelled, retrying failed deliveries with backoff.
    pub async fn run(&self, cancel: CancellationToken) {
        writeback::run(cancel, "platform notifications", || self.step()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: key "Jefe".
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            crate::domain::request::hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            crate::domain::request::hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature(b"s3cret", 1_700_000_000, b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
        assert_ne!(a, signature(b"s3cret", 1_700_000_001, b"{}"));
        assert_ne!(a, signature(b"s3cret", 1_700_000_000, b"{ }"));
        assert_ne!(a, signature(b"other", 1_700_000_000, b"{}"));
    }
}
