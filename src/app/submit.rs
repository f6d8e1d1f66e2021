//! Accepting a request read as a stream, so that memory does not grow with its size: a first
//! pass checks it (and takes its fingerprint), keeping no device; a second appends it in
//! `DevicesAdded` events of 1,000 devices inside one transaction, so an invalid request writes
//! nothing and an interrupted one leaves nothing behind. The second pass hashes the request
//! again: a file changed between the passes is refused, not half-trusted.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;

use super::{Engine, Error};
use crate::domain::bulk_change::{self, BulkChange, DEVICES_PER_EVENT};
use crate::domain::request;
use crate::domain::scan::{self, Checked, Fingerprinter, Pass, Sink};
use crate::domain::{BulkChangeId, BulkChangeRequest, DeviceRequest};
use crate::store::event_store;

/// Bytes read from a request file at a time.
const READ_BUFFER: usize = 256 * 1024;
/// Chunks of devices read ahead of the appends.
const READ_AHEAD: usize = 2;

/// Where a request's JSON is read from; each pass reads it afresh.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Bytes(Arc<[u8]>),
}

/// Why a request could not be read (its content is then not in question).
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    path: String,
    source: std::io::Error,
}

/// Runs `$body` with `$de` a `serde_json::Deserializer` over the source.
macro_rules! with_de {
    ($source:expr, $de:ident => $body:expr) => {
        match $source {
            Source::File(path) => {
                let file = std::fs::File::open(path).map_err(|source| ReadError {
                    path: path.display().to_string(),
                    source,
                })?;
                let mut $de = serde_json::Deserializer::from_reader(BufReader::with_capacity(
                    READ_BUFFER,
                    file,
                ));
                Ok::<_, ReadError>($body)
            }
            Source::Bytes(bytes) => {
                let mut $de = serde_json::Deserializer::from_slice(&bytes[..]);
                Ok::<_, ReadError>($body)
            }
        }
    };
}

impl Source {
    /// The first pass: checks the request and takes its fingerprint, keeping no device.
    pub fn check(&self) -> Result<Result<Checked, request::Error>, ReadError> {
        with_de!(self, de => {
            match scan::check(&mut de) {
                Ok(Checked { fingerprint: None, head, devices }) => {
                    // A field followed the devices: one more pass for the fingerprint.
                    with_de!(self, de => scan::fingerprint(&mut de, &head))?.map(|f| Checked {
                        head,
                        devices,
                        fingerprint: Some(f),
                    })
                }
                other => other,
            }
        })
    }

    /// The second pass: the devices in chunks of up to `chunk`, in order, to `each` (which
    /// returns `false` to stop); the request's fingerprint when it was read to its end.
    fn chunks(
        &self,
        head: &BulkChangeRequest,
        chunk: usize,
        each: &mut dyn FnMut(Vec<DeviceRequest>) -> bool,
    ) -> Result<Result<Option<String>, request::Error>, ReadError> {
        struct Chunks<'a> {
            chunk: usize,
            pending: Vec<DeviceRequest>,
            hashing: Fingerprinter,
            each: &'a mut dyn FnMut(Vec<DeviceRequest>) -> bool,
        }
        impl Sink for Chunks<'_> {
            fn device(&mut self, _: usize, device: DeviceRequest) -> bool {
                self.hashing.device(&device);
                self.pending.push(device);
                if self.pending.len() < self.chunk {
                    return true;
                }
                let full = std::mem::replace(&mut self.pending, Vec::with_capacity(self.chunk));
                (self.each)(full)
            }
        }
        with_de!(self, de => {
            let mut sink = Chunks {
                chunk,
                pending: Vec::with_capacity(chunk),
                hashing: Fingerprinter::new(head),
                each,
            };
            match scan::stream(&mut de, &mut sink) {
                Ok(Pass::Read(_)) => {
                    let last = std::mem::take(&mut sink.pending);
                    if last.is_empty() || (sink.each)(last) {
                        Ok(Some(sink.hashing.finish()))
                    } else {
                        Ok(None)
                    }
                }
                Ok(Pass::Stopped) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

/// What [`Engine::submit_source`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: BulkChangeId,
    pub devices: usize,
    /// `false`: the same request had been accepted before (nothing was written).
    pub new: bool,
}

impl Engine {
    /// Accepts a request read from `source` as a stream (idempotent for the same request, a
    /// conflict for another under the same id) and, if asked, queues it to run.
    pub async fn submit_source(&self, source: Source, enqueue: bool) -> Result<Submitted, Error> {
        let source = Arc::new(source);
        let checked = {
            let source = source.clone();
            blocking(move || source.check()).await?
        }
        .map_err(invalid)?;
        self.submit_checked(source, checked, enqueue).await
    }

    /// [`Engine::submit_source`] for a request whose first pass ([`Source::check`]) is done.
    pub async fn submit_checked(
        &self,
        source: Arc<Source>,
        checked: Checked,
        enqueue: bool,
    ) -> Result<Submitted, Error> {
        let id = checked.head.bulk_change_id;
        let fingerprint = checked.fingerprint.clone().unwrap_or_default();
        let mut tries = 0;
        let new = loop {
            match self.store.accepted_fingerprint(id).await? {
                Some(f) if f == fingerprint => break false,
                Some(_) => return Err(Error::Rejected(bulk_change::Error::ConflictingRequest)),
                None => {}
            }
            match self.append_streamed(&source, &checked, &fingerprint).await {
                Ok(()) => break true,
                // Another writer accepted this id meanwhile: compare with what it accepted.
                Err(Error::Store(event_store::Error::AggregateConflict)) if tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        };
        if new {
            tracing::info!(bulk_change_id = %id, devices = checked.devices, "bulk change accepted");
            self.projector.wake();
        }
        if enqueue {
            self.enqueue_local(id).await?;
        }
        Ok(Submitted {
            id,
            devices: checked.devices,
            new,
        })
    }

    /// The second pass: reads the devices on a blocking thread, a chunk ahead of the appends,
    /// all in one transaction.
    async fn append_streamed(
        &self,
        source: &Arc<Source>,
        checked: &Checked,
        fingerprint: &str,
    ) -> Result<(), Error> {
        let head = Arc::new(checked.head.clone());
        let at = Utc::now();
        let mut accepting = self
            .store
            .begin_accept(head.bulk_change_id, &self.config.worker_id)
            .await?;
        accepting
            .append(vec![BulkChange::accepted(
                &head,
                checked.devices,
                fingerprint.to_string(),
                self.workflow.reference(),
                at,
            )])
            .await?;
        let (send, mut receive) = tokio::sync::mpsc::channel(READ_AHEAD);
        let reader = {
            let (source, head) = (source.clone(), head.clone());
            tokio::task::spawn_blocking(move || {
                source.chunks(&head, DEVICES_PER_EVENT, &mut |chunk| {
                    send.blocking_send(chunk).is_ok()
                })
            })
        };
        while let Some(chunk) = receive.recv().await {
            // On an error the transaction is rolled back (dropped) and the reader stops at its
            // next chunk.
            accepting
                .append(vec![BulkChange::devices_added(&head, chunk, at)])
                .await?;
            crate::failpoints::hit("accept.chunk_appended");
        }
        let again = reader
            .await
            .map_err(|e| Error::Read(format!("the request reader failed: {e}")))?
            .map_err(|e| Error::Read(e.to_string()))?
            .map_err(invalid)?;
        if again.as_deref() != Some(fingerprint) {
            return Err(Error::Read(
                "the request changed while it was being read (its second reading differs from the first); nothing was accepted".into(),
            ));
        }
        accepting.commit().await?;
        Ok(())
    }
}

fn invalid(e: request::Error) -> Error {
    Error::Rejected(bulk_change::Error::InvalidRequest(e))
}

/// Runs a pass on a blocking thread (parsing a big request takes seconds).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReadError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Read(format!("the request reader failed: {e}")))?
        .map_err(|e| Error::Read(e.to_string()))
}
