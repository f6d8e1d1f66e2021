//! Wiring: the engine (store, projector, clients, limits) built from configuration, and the
//! worker loop that takes bulk changes off the queue.

use std::collections::HashMap;
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
use crate::store::local_queue::{LocalQueue, Message};
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
    /// One runner per bulk change in this process; a second request for it waits its turn.
    running: std::sync::Mutex<HashMap<BulkChangeId, Arc<tokio::sync::Mutex<()>>>>,
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
            running: std::sync::Mutex::new(HashMap::new()),
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
        let turn = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.entry(id).or_default().clone()
        };
        let outcome = {
            let _guard = turn.lock().await;
            self.runner().run(id, cancel, progress).await
        };
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.get(&id).is_some_and(|t| Arc::strong_count(t) <= 2) {
                running.remove(&id);
            }
        }
        Ok(outcome?)
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

    /// Takes messages off the local queue and runs up to `concurrency` bulk changes at once until
    /// `cancel` fires, or, with `exit_when_idle`, until the queue is empty. On cancel it stops
    /// receiving and lets the bulk changes in hand stop cleanly. A message is deleted only once its
    /// bulk change reached an outcome that is committed (completed, paused, or unknown id).
    pub async fn work(
        self: &Arc<Self>,
        cancel: &CancellationToken,
        options: WorkOptions,
        progress: Option<Arc<Progress>>,
    ) -> Result<(), Error> {
        let mut running = tokio::task::JoinSet::new();
        let concurrency = options.concurrency.max(1);
        while !cancel.is_cancelled() {
            while let Some(done) = running.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a bulk change task failed");
                }
            }
            if running.len() >= concurrency {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = running.join_next() => {}
                }
                continue;
            }
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
                if options.exit_when_idle && running.is_empty() && self.queue.is_empty().await? {
                    return Ok(());
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                }
                continue;
            };
            let engine = self.clone();
            let cancel = cancel.clone();
            let progress = progress.clone();
            running
                .spawn(async move { engine.handle(message, &cancel, progress.as_deref()).await });
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    /// Runs the bulk change a message names, keeping the message hidden meanwhile.
    async fn handle(
        &self,
        message: Message,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) {
        let Ok(run) = serde_json::from_str::<RunMessage>(&message.body) else {
            tracing::error!(message_id = message.id, body = %message.body.chars().take(200).collect::<String>(),
                "queue message is not a bulk change reference; removing it");
            if let Err(e) = self.queue.delete(message.id).await {
                tracing::warn!(error = %e, "could not delete the message");
            }
            return;
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
        let result =
            tracing::Instrument::instrument(self.run(run.bulk_change_id, cancel, progress), span)
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
}

/// How a worker takes work.
#[derive(Debug, Clone, Copy)]
pub struct WorkOptions {
    pub exit_when_idle: bool,
    /// Bulk changes run at once (the per-downstream limits are shared between them).
    pub concurrency: usize,
}
