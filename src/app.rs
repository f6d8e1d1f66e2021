//! Wiring: the engine (store, projector, clients, limits) built from configuration, and the
//! worker loop that takes bulk changes off the queue.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::adapters::http;
use crate::config::Config;
use crate::domain::bulk_change::BulkChangeCommand;
use crate::domain::{BulkChangeId, BulkChangeRequest};
use crate::projections::Projector;
use crate::store::local_queue::LocalQueue;
use crate::store::{Db, EventStore, StoreError};
use crate::workflow::definition::{Downstream, Workflow};
use crate::workflow::limiter::Limiter;
use crate::workflow::runner::Runner;
use crate::workflow::{Progress, RunOutcome};

/// Why the engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Workflow(#[from] crate::workflow::definition::Error),
    #[error(transparent)]
    Db(#[from] crate::store::Error),
    #[error("bulk change rejected: {0}")]
    Rejected(String),
    #[error("event store: {0}")]
    Store(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UserError(e) => Self::Rejected(e.to_string()),
            other => Self::Store(other.to_string()),
        }
    }
}

/// The body of a queue message naming a bulk change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunMessage {
    pub bulk_change_id: BulkChangeId,
}

/// How long a received message stays hidden before another worker may take it.
pub const VISIBILITY: Duration = Duration::from_secs(60);

/// Everything a worker needs, built once.
pub struct Engine {
    pub db: Db,
    pub store: EventStore,
    pub projector: Projector,
    pub config: Config,
    pub workflow: Workflow,
    pub queue: LocalQueue,
    pond_http: reqwest::Client,
    rev_http: reqwest::Client,
    pond_limits: Arc<Limiter>,
    rev_limits: Arc<Limiter>,
}

impl Engine {
    /// Connects to the configured database, applies migrations and loads the workflow.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let db = Db::connect(&config.database_url, config.max_connections).await?;
        db.migrate().await?;
        Self::with_db(config, db)
    }

    pub fn with_db(config: Config, db: Db) -> Result<Self, Error> {
        let workflow = Workflow::load_or_builtin(&config.workflow)?;
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
        Ok(Self {
            store: EventStore::new(&db),
            projector: Projector::new(db.clone()),
            queue: LocalQueue::new(db.clone()),
            pond_http: http::client(Duration::from_millis(pond.timeout_ms)),
            rev_http: http::client(Duration::from_millis(rev.timeout_ms)),
            pond_limits: Arc::new(Limiter::new(&pond)),
            rev_limits: Arc::new(Limiter::new(&rev)),
            db,
            config,
            workflow,
        })
    }

    fn runner(&self) -> Runner<'_> {
        Runner {
            store: &self.store,
            projector: &self.projector,
            config: &self.config,
            pond_http: &self.pond_http,
            rev_http: &self.rev_http,
            pond_limits: &self.pond_limits,
            rev_limits: &self.rev_limits,
        }
    }

    /// Accepts a request (idempotent for the same request) and, if asked, queues it to run.
    pub async fn submit(
        &self,
        request: BulkChangeRequest,
        enqueue: bool,
    ) -> Result<BulkChangeId, Error> {
        let id = request.bulk_change_id;
        self.store
            .execute(
                id,
                BulkChangeCommand::Accept {
                    request: Box::new(request),
                    workflow: self.workflow.reference(),
                    at: Utc::now(),
                },
                &self.config.worker_id,
            )
            .await?;
        self.projector.wake();
        if enqueue {
            let body = serde_json::to_string(&RunMessage { bulk_change_id: id })
                .map_err(|e| Error::Store(e.to_string()))?;
            self.queue.send(&body, Utc::now()).await?;
        }
        Ok(id)
    }

    /// Drives one bulk change (see [`Runner::run`]).
    pub async fn run(
        &self,
        id: BulkChangeId,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) -> Result<RunOutcome, Error> {
        Ok(self.runner().run(id, cancel, progress).await?)
    }

    /// Resumes a paused bulk change (after its credentials or settings were fixed) and queues it.
    pub async fn resume(&self, id: BulkChangeId, by: &str) -> Result<(), Error> {
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
        let body = serde_json::to_string(&RunMessage { bulk_change_id: id })
            .map_err(|e| Error::Store(e.to_string()))?;
        self.queue.send(&body, Utc::now()).await?;
        Ok(())
    }

    /// Takes messages off the local queue and runs their bulk changes until `cancel` fires, or,
    /// with `exit_when_idle`, until the queue is empty. A message is deleted only once its bulk
    /// change reached an outcome that is committed (completed, paused, or unknown id).
    pub async fn work(
        &self,
        cancel: &CancellationToken,
        exit_when_idle: bool,
        progress: Option<&Progress>,
    ) -> Result<(), Error> {
        while !cancel.is_cancelled() {
            let now = Utc::now();
            let visibility = chrono::Duration::from_std(VISIBILITY).unwrap_or_default();
            let received = match self.queue.receive(now, now + visibility).await {
                Ok(received) => received,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the queue; retrying in 5 s");
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    continue;
                }
            };
            let Some(message) = received else {
                if exit_when_idle && self.queue.is_empty().await? {
                    return Ok(());
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            };
            let Ok(run) = serde_json::from_str::<RunMessage>(&message.body) else {
                tracing::error!(message_id = message.id, body = %message.body.chars().take(200).collect::<String>(),
                    "queue message is not a bulk change reference; removing it");
                self.queue.delete(message.id).await?;
                continue;
            };
            let keep_alive = {
                let queue = self.queue.clone();
                let id = message.id;
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(VISIBILITY / 3).await;
                        let until =
                            Utc::now() + chrono::Duration::from_std(VISIBILITY).unwrap_or_default();
                        if let Err(e) = queue.extend(id, until).await {
                            tracing::warn!(error = %e, "could not extend message visibility");
                        }
                    }
                })
            };
            let span = tracing::info_span!("message", message_id = message.id, bulk_change_id = %run.bulk_change_id);
            let result = tracing::Instrument::instrument(
                self.run(run.bulk_change_id, cancel, progress),
                span,
            )
            .await;
            keep_alive.abort();
            match result {
                Ok(RunOutcome::Stopped) => {
                    // Release it for the next worker at once.
                    if let Err(e) = self.queue.extend(message.id, Utc::now()).await {
                        tracing::warn!(error = %e, "could not release the message; it reappears after its visibility timeout");
                    }
                }
                Ok(outcome) => {
                    tracing::info!(bulk_change_id = %run.bulk_change_id, ?outcome, "message done");
                    if let Err(e) = self.queue.delete(message.id).await {
                        // Redelivery is harmless: the bulk change's outcome is already committed.
                        tracing::warn!(error = %e, "could not delete the message; it will be redelivered");
                    }
                }
                Err(e) => {
                    tracing::error!(bulk_change_id = %run.bulk_change_id, error = %e,
                        "bulk change could not make progress; the message reappears after its visibility timeout");
                }
            }
        }
        Ok(())
    }
}
