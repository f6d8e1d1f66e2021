//! Wiring: the engine (store, projector, clients, limits) built from configuration, and the
//! worker loop that takes bulk changes off a queue.

pub mod intake;
mod submit;
mod worker;

pub use submit::{ReadError, Source, Submitted};
pub use worker::WorkOptions;

use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::adapters::http;
use crate::adapters::queue::{legacy_message, Queue};
use crate::config::Config;
use crate::domain::bulk_change::BulkChangeCommand;
use crate::domain::{BulkChangeId, BulkChangeRequest};
use crate::platform::{Loaded, Platform};
use crate::projections::Projector;
use crate::store::event_store;
use crate::store::lease;
use crate::store::local_queue::LocalQueue;
use crate::store::{Db, EventStore};
use crate::workflow::definition::{Downstream, Workflow};
use crate::workflow::limits::Limits;
use crate::workflow::runner::Runner;
use crate::workflow::{PerDownstream, Progress, RunOutcome};

/// Why the engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Workflow(#[from] crate::workflow::definition::Error),
    #[error(transparent)]
    Db(#[from] crate::store::Error),
    /// The domain refused the command (an invalid or conflicting request, a wrong status).
    #[error("bulk change rejected: {0}")]
    Rejected(#[from] crate::domain::bulk_change::Error),
    /// The event store failed (a conflict that did not settle, the database, a fence).
    #[error("event store: {0}")]
    Store(event_store::Error),
    #[error(transparent)]
    Queue(#[from] crate::adapters::queue::Error),
    #[error(transparent)]
    Platform(#[from] crate::platform::Error),
    /// A request could not be read (the file, or a reader that changed under it).
    #[error("{0}")]
    Read(String),
}

impl From<event_store::Error> for Error {
    fn from(e: event_store::Error) -> Self {
        match e {
            event_store::Error::UserError(e) => Self::Rejected(e),
            other => Self::Store(other),
        }
    }
}

/// What [`Engine::import`] made of a platform bulk change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// Now in bulkflow's store, ready to run.
    Accepted,
    /// Not run; the reason is written back to the platform's rows.
    Refused(String),
    /// Already finished in the platform (`PROCESSED` / `ERROR`).
    Finished(String),
    /// Not in the platform (or no platform configured).
    NotFound,
}

/// Everything a worker needs, built once.
pub struct Engine {
    pub db: Db,
    pub store: EventStore,
    pub projector: Projector,
    pub config: Config,
    pub workflow: Workflow,
    /// The database-backed queue (used when no SQS queue is given).
    pub queue: LocalQueue,
    /// This engine's name in leases: the worker id plus a random suffix.
    pub owner: String,
    pond_http: reqwest::Client,
    rev_http: reqwest::Client,
    /// The platform webhook's client.
    notify_http: reqwest::Client,
    /// Carrier limits per account: shared with every worker on PostgreSQL.
    pub limits: Limits,
    /// The portal's database, when configured (`[platform]`): bulk changes known only there
    /// are read from it.
    pub platform: Option<Arc<dyn Platform>>,
    /// One runner per bulk change in this process; a second request for it waits its turn.
    running: std::sync::Mutex<HashMap<BulkChangeId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    /// Connects to the configured database, applies migrations and loads the workflow.
    pub async fn build(config: Config) -> Result<Self, Error> {
        // Refuse a bad workflow definition before touching the database.
        let workflow = Workflow::load_or_builtin(&config.workflow)?;
        let db = Db::connect(config.database_url.expose_secret(), config.max_connections).await?;
        db.migrate().await?;
        Self::assemble(config, db, workflow)
    }

    /// An engine on an open, migrated database.
    pub fn with_db(config: Config, db: Db) -> Result<Self, Error> {
        let workflow = Workflow::load_or_builtin(&config.workflow)?;
        Self::assemble(config, db, workflow)
    }

    fn assemble(config: Config, db: Db, workflow: Workflow) -> Result<Self, Error> {
        let pond = config
            .limits
            .pond
            .clone()
            .unwrap_or_else(|| workflow.limits(Downstream::Pond).clone());
        let rev = config
            .limits
            .rev
            .clone()
            .unwrap_or_else(|| workflow.limits(Downstream::Rev).clone());
        for (name, limits) in [("limits.pond", &pond), ("limits.rev", &rev)] {
            limits
                .validate(name)
                .map_err(|(key, problem)| crate::config::Error::Invalid { key, problem })?;
        }
        let platform = crate::platform::connect(&config.platform)?;
        let owner = format!(
            "{}/{}",
            config.worker_id,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let limits = Limits::new(
            &db,
            owner.clone(),
            PerDownstream::new(|d| match d {
                Downstream::Pond => pond.clone(),
                Downstream::Rev => rev.clone(),
            }),
            config.safety.max_retry_after_secs,
        );
        // The runner's appends reach this process's projector without a read back.
        let recent = Arc::new(crate::store::recent::Recent::new());
        Ok(Self {
            platform,
            store: EventStore::new(&db).with_recent(recent.clone()),
            projector: Projector::new(db.clone()).with_recent(recent),
            queue: LocalQueue::new(db.clone()),
            owner,
            pond_http: http::client(Duration::from_millis(pond.timeout_ms))?,
            rev_http: http::client(Duration::from_millis(rev.timeout_ms))?,
            notify_http: http::client(Duration::from_secs(10))?,
            limits,
            db,
            config,
            workflow,
            running: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn runner<'a>(&'a self, hold: &'a Arc<lease::Hold>) -> Runner<'a> {
        Runner {
            hold,
            store: &self.store,
            projector: &self.projector,
            config: &self.config,
            pond_http: &self.pond_http,
            rev_http: &self.rev_http,
            limits: &self.limits,
        }
    }

    /// Accepts a request (idempotent for the same request) and, if asked, queues it to run.
    pub async fn submit(
        &self,
        request: BulkChangeRequest,
        enqueue: bool,
    ) -> Result<BulkChangeId, Error> {
        let id = request.bulk_change_id;
        let request = Arc::new(request);
        let mut tries = 0;
        loop {
            let accept = BulkChangeCommand::Accept {
                request: request.clone(),
                workflow: self.workflow.reference(),
                at: Utc::now(),
            };
            match self.store.execute(id, accept, &self.config.worker_id).await {
                // Another worker accepted the same bulk change at the same moment: look again
                // (the same request is then a no-op, a different one a rejection).
                Err(event_store::Error::AggregateConflict) if tries < 3 => tries += 1,
                result => break result?,
            }
        }
        self.projector.wake();
        if enqueue {
            self.enqueue_local(id).await?;
        }
        Ok(id)
    }

    /// Takes a bulk change bulkflow does not know yet from the platform's tables: accepts it
    /// (idempotent on its id, as `submit`), or writes the refusal back to the platform.
    pub async fn import(&self, id: BulkChangeId) -> Result<Imported, Error> {
        let Some(platform) = &self.platform else {
            return Ok(Imported::NotFound);
        };
        let refusal = match platform.load(id).await? {
            Loaded::NotFound => return Ok(Imported::NotFound),
            Loaded::Finished(status) => return Ok(Imported::Finished(status)),
            Loaded::Refused(refusal) => refusal,
            Loaded::Request(request) => match self.submit(*request, false).await {
                Ok(_) => return Ok(Imported::Accepted),
                // The domain's own checks, past the mapping's: refused like a row that does
                // not map.
                Err(Error::Rejected(e)) => {
                    crate::platform::Refusal::bulk(format!("DeviceBulkChange {id}: {e}"))
                }
                Err(e) => return Err(e),
            },
        };
        tracing::warn!(bulk_change_id = %id, reason = %refusal, "platform bulk change refused; writing the refusal back");
        platform.refuse(id, &refusal).await?;
        Ok(Imported::Refused(refusal.to_string()))
    }

    /// The write-back of outcomes into the platform's tables, when a platform is configured.
    pub fn write_back(&self) -> Option<crate::platform::writeback::WriteBack> {
        self.platform
            .clone()
            .map(|p| crate::platform::writeback::WriteBack::new(self.db.clone(), p))
    }

    /// The status notifications to the platform's webhook, when one is configured.
    pub fn notifier(&self) -> Option<crate::platform::notify::Notifier> {
        let section = &self.config.platform;
        let (url, secret) = (
            section.webhook_url.clone()?,
            section.webhook_secret.clone()?,
        );
        Some(crate::platform::notify::Notifier::new(
            self.db.clone(),
            url,
            secret,
            self.notify_http.clone(),
        ))
    }

    /// Puts a legacy message for `id` on the local queue.
    pub async fn enqueue_local(&self, id: BulkChangeId) -> Result<(), Error> {
        let (body, attributes) = legacy_message(id.get());
        self.queue.send(&body, &attributes, Duration::ZERO).await?;
        Ok(())
    }

    /// Whether this process is driving (or about to drive) `id`.
    pub fn is_running(&self, id: BulkChangeId) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Drives one bulk change (see [`Runner::run`]).
    pub async fn run(
        &self,
        id: BulkChangeId,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) -> Result<RunOutcome, Error> {
        let turn = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.entry(id).or_default().clone()
        };
        let outcome = {
            let _guard = turn.lock().await;
            let running = metrics::gauge!(crate::metrics::RUNNING);
            running.increment(1.0);
            let outcome = self.run_leased(id, cancel, progress).await;
            running.decrement(1.0);
            outcome
        };
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.get(&id).is_some_and(|t| Arc::strong_count(t) <= 2) {
                running.remove(&id);
            }
        }
        outcome
    }

    /// Runs under the bulk change's lease, renewing it meanwhile; stops if the lease is lost.
    async fn run_leased(
        &self,
        id: BulkChangeId,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) -> Result<RunOutcome, Error> {
        let ttl = self.config.lease_ttl();
        let Some(hold) = lease::Hold::take(&self.db, id, &self.owner, ttl).await? else {
            tracing::info!(bulk_change_id = %id, "another worker drives this bulk change");
            return Ok(RunOutcome::Busy);
        };
        let hold = Arc::new(hold);
        tracing::info!(bulk_change_id = %id, epoch = hold.epoch(), "holding the bulk change");
        let run_cancel = cancel.child_token();
        let _keeper = AbortOnDrop({
            let hold = hold.clone();
            let run_cancel = run_cancel.clone();
            tokio::spawn(async move {
                let mut last_renewed = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match hold.renew().await {
                        Ok(()) => last_renewed = tokio::time::Instant::now(),
                        Err(lease::RenewError::Lost(e)) => {
                            tracing::warn!(bulk_change_id = %id, error = %e, "lost the hold on this bulk change; stopping");
                            run_cancel.cancel();
                            return;
                        }
                        Err(e) if last_renewed.elapsed() >= ttl => {
                            tracing::warn!(bulk_change_id = %id, error = %e, "lease could not be renewed in time; stopping");
                            run_cancel.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(bulk_change_id = %id, error = %e, "lease renewal failed; retrying")
                        }
                    }
                }
            })
        });
        let outcome = self.runner(&hold).run(id, &run_cancel, progress).await;
        drop(_keeper);
        hold.release().await;
        Ok(outcome?)
    }

    /// Resumes a paused bulk change (after its credentials or settings were fixed) and queues it.
    pub async fn resume(&self, id: BulkChangeId, by: &str) -> Result<(), Error> {
        self.resume_only(id, by).await?;
        self.enqueue_local(id).await
    }

    /// Records the resumption without queueing it (the caller queues it where its workers read).
    pub async fn resume_only(&self, id: BulkChangeId, by: &str) -> Result<(), Error> {
        self.store
            .execute(
                id,
                BulkChangeCommand::Resume {
                    by: by.into(),
                    at: Utc::now(),
                },
                &self.config.worker_id,
            )
            .await?;
        self.projector.wake();
        Ok(())
    }
}

impl Engine {
    /// Runs an operator's command, deciding it again if it lost a race to a runner's append.
    async fn operate(&self, id: BulkChangeId, command: BulkChangeCommand) -> Result<(), Error> {
        let mut tries = 0;
        loop {
            match self
                .store
                .execute(id, command.clone(), &self.config.worker_id)
                .await
            {
                // A runner committing every few milliseconds can win several races in a row
                // (each retry reloads the stream): back off a little more each time.
                Err(event_store::Error::AggregateConflict) if tries < OPERATE_TRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
                }
                result => break result?,
            }
        }
        self.projector.wake();
        Ok(())
    }

    /// Records an operator's cancel: no new carrier call starts; whoever drives the bulk change
    /// (or next takes it up) lets the calls in flight finish, looks unresolved Rev creations up
    /// and ends it `CANCELLED`. A second cancel is a no-op; a finished bulk change is refused.
    pub async fn cancel(&self, id: BulkChangeId, by: &str, reason: &str) -> Result<(), Error> {
        let command = BulkChangeCommand::Cancel {
            by: by.into(),
            reason: reason.into(),
            at: Utc::now(),
        };
        self.operate(id, command).await?;
        tracing::info!(bulk_change_id = %id, %by, %reason, "cancel requested");
        Ok(())
    }

    /// Gives every device that ended `API_FAILED` a new round of attempts; the bulk change runs
    /// again (the caller queues it where its workers read). Returns how many devices.
    pub async fn retry_failed(&self, id: BulkChangeId, by: &str) -> Result<usize, Error> {
        let failed = self.store.inspect(id, |bc| bc.failed_devices()).await?;
        let command = BulkChangeCommand::RetryFailed {
            by: by.into(),
            at: Utc::now(),
        };
        self.operate(id, command).await?;
        tracing::info!(bulk_change_id = %id, %by, devices = failed, "failed devices get a new round");
        Ok(failed)
    }
}

/// Tries of an operator's command against a running bulk change's appends (~1 s in all).
const OPERATE_TRIES: u32 = 20;

/// Aborts a background task when its owner goes away, however that happens.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
