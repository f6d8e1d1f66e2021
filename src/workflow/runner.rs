//! Drives one bulk change from its recorded events to completion.
//!
//! The next action for every device is a function of the recorded events and the workflow
//! policy recorded with them: the runner reads the state, dispatches what is due (bounded per
//! downstream), and records outcomes in batches. A crash loses only calls in flight; a restarted
//! runner redoes them where that is safe (POND calls are idempotent; a Rev creation with a
//! recorded intent and no outcome is looked up before any new POST).
//!
//! The runner acts under a [`Hold`] on the bulk change: every append carries the hold's epoch
//! and is refused once another worker took the bulk change over (the run then ends at once,
//! with [`RunOutcome::Superseded`]), and a Rev POST leaves only after the hold was confirmed and
//! within the send window of its intent.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::breaker::{Change, Circuit};
use super::limits::paced::Paced;
use super::limits::{Account, Limits};
use super::per_downstream::PerDownstream;
use super::steps::{self, Attempt};
use crate::adapters::pond::PondClient;
use crate::adapters::rev::RevClient;
use crate::adapters::{Failure, PondApi, RevApi};
use crate::config::Config;
use crate::domain::bulk_change::{
    BulkChange, BulkChangeCommand, DeviceState, Error as DomainError, FailureClass, StepOutcome,
    StepReport,
};
use crate::domain::RevServiceRequest;
use crate::domain::{
    ApiCall, BulkChangeId, BulkChangeStatus, DeviceChangeId, Downstream, Iccid, ServiceProviderId,
    Step,
};
use crate::projections::Projector;
use crate::store::event_store;
use crate::store::lease::Hold;
use crate::store::{fenced, EventStore, Writer};

/// Most outcomes recorded in one command.
const MAX_BATCH: usize = 1_000;
/// How long the runner waits for more outcomes before recording those it has.
const GATHER: Duration = Duration::from_millis(2);
/// How often a run looks for what other processes recorded (an operator's cancel or
/// retry-failed) when its own commits have not shown it.
const REFRESH: Duration = Duration::from_millis(500);
/// Tries of a command that lost an optimistic-concurrency race to another process's append.
const CONFLICT_TRIES: usize = 5;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Completed(BulkChangeStatus),
    Paused(String),
    /// Stopped on request; the bulk change continues on the next run.
    Stopped,
    /// Another worker holds the bulk change's lease.
    Busy,
    /// Another worker took the bulk change over while this run drove it (this worker was
    /// presumed dead); the run stopped at once.
    Superseded,
    NotFound,
}

/// Live counters for progress bars.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicUsize,
    pub finished: AtomicUsize,
}

/// Where a run's wall time went, logged when it ends: the runner is serial, so time in the store
/// is time no new carrier call starts.
#[derive(Debug, Default)]
struct Timings {
    commits: u64,
    reports: u64,
    /// Reading due devices and recording Rev intents before dispatch.
    prepare: Duration,
    /// Recording outcomes.
    record: Duration,
    waiting: Duration,
}

/// What the runner needs from the engine.
pub struct Runner<'a> {
    pub store: &'a EventStore,
    pub projector: &'a Projector,
    pub config: &'a Config,
    pub pond_http: &'a reqwest::Client,
    pub rev_http: &'a reqwest::Client,
    /// The limits of each downstream (timeout, breaker) and carrier account (rate, concurrency).
    pub limits: &'a Limits,
    /// This run's hold on the bulk change.
    pub hold: &'a Arc<Hold>,
}

/// Rev, behind the hold: a POST leaves only while the hold is confirmed current. A hold that
/// cannot be confirmed stops the run (`lost`): the bulk change is taken up again by whichever
/// worker then holds it.
#[derive(Clone)]
struct FencedRev<R> {
    inner: R,
    hold: Arc<Hold>,
    lost: CancellationToken,
}

impl<R> FencedRev<R> {
    /// A POST not sent because the hold is lost: stops the run (whoever holds the bulk change
    /// now takes it up). For a product, the service exists (`service_exists`): the next attempt
    /// must look it up; for a creation nothing was sent, so it is not counted.
    fn refuse(
        &self,
        lost: crate::store::lease::Lost,
        what: &str,
        service_exists: bool,
        calls: Vec<ApiCall>,
    ) -> Failure {
        tracing::warn!(error = %lost, "not sending a {what}: this worker no longer holds the bulk change; stopping the run");
        self.lost.cancel();
        Failure {
            class: FailureClass::Retryable {
                retry_after_secs: None,
                outcome_unknown: service_exists,
                throttled: false,
                not_sent: !service_exists,
            },
            reason: format!("{what} not sent: {lost}"),
            calls,
        }
    }
}

impl<R: RevApi> RevApi for FencedRev<R> {
    async fn create_service(
        &self,
        service: &RevServiceRequest,
        number: &str,
        iccid: &Iccid,
        send_by: Option<DateTime<Utc>>,
        earlier: Vec<ApiCall>,
    ) -> Result<(i64, Vec<ApiCall>), Failure> {
        if let Err(lost) = self.hold.confirm().await {
            // Nothing was sent: not counted, and no lookup needed.
            return Err(self.refuse(lost, "Rev creation", false, earlier));
        }
        crate::failpoints::hit("rev.hold_confirmed");
        self.inner
            .create_service(service, number, iccid, send_by, earlier)
            .await
    }

    async fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> Result<(Option<i64>, ApiCall), Failure> {
        self.inner.find_service(number, service).await
    }

    async fn create_product(
        &self,
        service_id: i64,
        product_id: i64,
        service: &RevServiceRequest,
    ) -> Result<ApiCall, Failure> {
        // Not idempotent either: only while the hold is confirmed current.
        if let Err(lost) = self.hold.confirm().await {
            // The service exists: the next holder looks it up and adds what it lacks.
            return Err(self.refuse(lost, "Rev product", true, vec![]));
        }
        self.inner
            .create_product(service_id, product_id, service)
            .await
    }

    async fn find_products(&self, service_id: i64) -> Result<(Vec<i64>, ApiCall), Failure> {
        self.inner.find_products(service_id).await
    }
}

/// What a step task whose future panicked reports: retryable, and for a Rev creation the POST
/// may have gone out.
fn panicked(step: Step, panic: Box<dyn std::any::Any + Send>) -> StepOutcome {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    lost(step, message)
}

/// The outcome of an attempt whose task ended without reporting one.
fn lost(step: Step, message: String) -> StepOutcome {
    StepOutcome::Failed {
        class: FailureClass::Retryable {
            retry_after_secs: None,
            outcome_unknown: step == Step::RevService,
            throttled: false,
            not_sent: false,
        },
        reason: format!("the {step} attempt failed inside bulkflow: {message}"),
        calls: vec![],
    }
}

/// Caps a carrier's wait hint (the hint as given stays in the recorded call).
fn cap_hint(outcome: &mut StepOutcome, max_secs: u64) -> Option<u64> {
    match outcome {
        StepOutcome::Failed {
            class:
                FailureClass::Retryable {
                    retry_after_secs: Some(s),
                    ..
                },
            ..
        } => {
            *s = (*s).min(max_secs);
            Some(*s)
        }
        _ => None,
    }
}

type Due = Reverse<(DateTime<Utc>, DeviceChangeId)>;

/// Whether a run still has work for `d`: any while it is open, and while its bulk change is
/// being cancelled, only the lookup of an unresolved Rev creation.
fn wanted(d: &DeviceState, cancelling: bool) -> bool {
    !d.is_final() && (!cancelling || d.rev_unresolved())
}

/// Whether any outcome is a systemic failure (the bulk change is about to pause).
fn systemic(reports: &[StepReport]) -> bool {
    reports.iter().any(|r| {
        matches!(
            r.outcome,
            StepOutcome::Failed {
                class: FailureClass::Systemic,
                ..
            }
        )
    })
}

impl Runner<'_> {
    fn writer(&self) -> Writer<'_> {
        Writer {
            worker: &self.config.worker_id,
            fence: Some(self.hold.fence()),
        }
    }

    async fn exec(
        &self,
        id: BulkChangeId,
        command: BulkChangeCommand,
    ) -> Result<(), event_store::Error> {
        self.exec_then(id, command, |_| ()).await
    }

    /// Runs a command and reads the state it left. A command that lost a race to another
    /// process's append (an operator's cancel or retry-failed) is decided again on the state
    /// that includes it.
    async fn exec_then<T>(
        &self,
        id: BulkChangeId,
        command: BulkChangeCommand,
        f: impl Fn(&BulkChange) -> T,
    ) -> Result<T, event_store::Error> {
        let mut tries = 1;
        let result = loop {
            match self
                .store
                .execute_then(id, command.clone(), self.writer(), &f)
                .await
            {
                Err(event_store::Error::AggregateConflict) if tries < CONFLICT_TRIES => {
                    tracing::info!(bulk_change_id = %id, "another process appended to this bulk change; deciding the command again");
                    tries += 1;
                }
                result => break result,
            }
        };
        self.projector.wake();
        result
    }

    /// When a device is next due: its scheduled time, and for a Rev creation that must look an
    /// earlier, unresolved one up, not before that one's POST must have ended.
    fn due(&self, d: &DeviceState) -> DateTime<Utc> {
        let due = d.due_at.unwrap_or(DateTime::<Utc>::MIN_UTC);
        match d.rev_unresolved_since {
            Some(since) if d.step == Step::RevService && d.rev_needs_lookup() => {
                let settle = self.config.safety.rev_settle(Duration::from_millis(
                    self.limits.config(Downstream::Rev).timeout_ms,
                ));
                due.max(since.checked_add_signed(settle).unwrap_or(since))
            }
            _ => due,
        }
    }

    /// Runs until the bulk change completes, pauses, or `cancel` fires; a run refused by a
    /// later holder's fence ends as [`RunOutcome::Superseded`].
    pub async fn run(
        &self,
        id: BulkChangeId,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) -> Result<RunOutcome, event_store::Error> {
        let result = async {
            let (provider, cancelling) = match self.runnable(id).await? {
                Ok(runnable) => runnable,
                Err(outcome) => return Ok(outcome),
            };
            if cancelling {
                if let Some(outcome) = self.end_cancelled(id).await? {
                    return Ok(outcome);
                }
            }
            // While cancelling, POND is never called (every call is halted before it is sent):
            // its settings are not needed, and missing ones do not pause the bulk change.
            let settings = match self.config.pond(provider) {
                Ok(settings) if !settings.write_enabled && !cancelling => {
                    let reason = format!("POND writes are disabled (WriteIsEnabled = false) for service provider {provider}");
                    return self.pause(id, reason).await;
                }
                Ok(settings) => settings,
                Err(e) if !cancelling => return self.pause(id, e.to_string()).await,
                Err(_) => crate::config::PondSettings {
                    base_url: String::new(),
                    distributor_id: String::new(),
                    api_key: String::new().into(),
                    write_enabled: false,
                },
            };
            let pond = Paced {
                account: self.limits.account(Downstream::Pond, &settings.distributor_id),
                inner: PondClient::new(self.pond_http.clone(), settings),
                bulk: id,
                halt: CancellationToken::new(),
            };
            let rev = self.config.rev(provider).ok().map(|settings| {
                let account = self.limits.account(Downstream::Rev, &settings.client_code);
                (RevClient::new(self.rev_http.clone(), settings), account)
            });
            self.drive(id, pond, rev, cancel, progress).await
        }
        .await;
        match result {
            Err(e) if fenced(&e).is_some() => {
                tracing::warn!(bulk_change_id = %id, error = %e, "another worker took this bulk change over; this run stopped");
                self.store.forget(id);
                Ok(RunOutcome::Superseded)
            }
            other => other,
        }
    }

    /// The bulk change's service provider when it is there to run, else how the run ends.
    async fn runnable(
        &self,
        id: BulkChangeId,
    ) -> Result<Result<(ServiceProviderId, bool), RunOutcome>, event_store::Error> {
        let (provider, status, reason) = self
            .store
            .inspect(id, |bc| {
                (
                    bc.header().map(|h| h.bulk.service_provider_id),
                    bc.status(),
                    bc.paused_reason().map(str::to_string),
                )
            })
            .await?;
        Ok(match provider {
            None => Err(RunOutcome::NotFound),
            Some(_) if status.is_final() => Err(RunOutcome::Completed(status)),
            Some(_) if status == BulkChangeStatus::Paused => {
                Err(RunOutcome::Paused(reason.unwrap_or_default()))
            }
            Some(provider) => Ok((provider, status == BulkChangeStatus::Cancelling)),
        })
    }

    /// Ends a cancelled bulk change when none of its devices has a Rev creation to look up
    /// (its open devices end `CANCELLED`); `None` when some has.
    async fn end_cancelled(
        &self,
        id: BulkChangeId,
    ) -> Result<Option<RunOutcome>, event_store::Error> {
        let unresolved = self
            .store
            .inspect(id, |bc| {
                bc.devices()
                    .iter()
                    .any(|d| !d.is_final() && d.rev_unresolved())
            })
            .await?;
        if unresolved {
            return Ok(None);
        }
        match self
            .exec_then(id, BulkChangeCommand::Complete { at: Utc::now() }, |bc| {
                (bc.status(), bc.cancelled_devices())
            })
            .await
        {
            Ok((status, cancelled)) => {
                self.store.forget(id);
                tracing::info!(bulk_change_id = %id, %status, cancelled, "bulk change cancelled");
                Ok(Some(RunOutcome::Completed(status)))
            }
            Err(event_store::Error::UserError(DomainError::RevUnresolved(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn pause(
        &self,
        id: BulkChangeId,
        reason: String,
    ) -> Result<RunOutcome, event_store::Error> {
        tracing::warn!(bulk_change_id = %id, %reason, "pausing bulk change");
        self.exec(
            id,
            BulkChangeCommand::Pause {
                reason: reason.clone(),
                at: Utc::now(),
            },
        )
        .await?;
        Ok(RunOutcome::Paused(reason))
    }

    /// Starts the bulk change and drives it with these clients (Rev behind the hold, each call
    /// in a slot of its account).
    async fn drive<P, R>(
        &self,
        id: BulkChangeId,
        pond: Paced<P>,
        rev: Option<(R, Arc<Account>)>,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) -> Result<RunOutcome, event_store::Error>
    where
        P: PondApi + Clone + 'static,
        R: RevApi + Clone + 'static,
    {
        let halt = pond.halt.clone();
        let rev = rev.map(|(inner, account)| Paced {
            inner: FencedRev {
                inner,
                hold: self.hold.clone(),
                lost: cancel.clone(),
            },
            account,
            bulk: id,
            halt: halt.clone(),
        });
        self.exec(
            id,
            BulkChangeCommand::Start {
                worker: self.config.worker_id.clone(),
                at: Utc::now(),
            },
        )
        .await?;
        Drive::load(self, id, pond, rev, cancel, progress)
            .await?
            .run()
            .await
    }

    /// The bulk change's status and the attempts of due devices, from the current state; while
    /// it is being cancelled, only the lookups of unresolved Rev creations.
    async fn attempts(
        &self,
        id: BulkChangeId,
        devices: &[DeviceChangeId],
    ) -> Result<(BulkChangeStatus, Vec<Attempt>), event_store::Error> {
        self.store
            .inspect(id, |bc| {
                let cancelling = bc.status() == BulkChangeStatus::Cancelling;
                let attempts = devices
                    .iter()
                    .filter_map(|d| bc.device(*d))
                    .filter(|d| wanted(d, cancelling))
                    .map(|d| Attempt {
                        bulk_change_id: id,
                        device: d.clone(),
                        rev_lookup: d.step == Step::RevService && d.rev_needs_lookup(),
                        send_by: None,
                        resolve_only: cancelling,
                    })
                    .collect();
                (bc.status(), attempts)
            })
            .await
    }

    /// Commits the Rev creation intents of `attempts` on their own.
    async fn begin_rev(
        &self,
        id: BulkChangeId,
        attempts: &[Attempt],
        at: DateTime<Utc>,
    ) -> Result<(), event_store::Error> {
        self.exec(
            id,
            BulkChangeCommand::BeginRevCreations {
                devices: attempts.iter().map(Attempt::intent).collect(),
                at,
            },
        )
        .await?;
        crate::failpoints::hit("rev.intent_committed");
        Ok(())
    }
}

/// Rev creations whose intents go into this round's commit: they are sent once it is in.
struct Intents {
    attempts: Vec<Attempt>,
    /// The intents' time (the send window counts from it).
    at: DateTime<Utc>,
}

/// One run of one bulk change: what is due, in flight and held per downstream, and the tasks
/// making the calls. Each round of [`Drive::run`] waits for outcomes, dispatches what is due,
/// then records the outcomes (so calls run while a commit is written).
struct Drive<'r, 'a, P, R> {
    runner: &'r Runner<'a>,
    id: BulkChangeId,
    cancel: &'r CancellationToken,
    progress: Option<&'r Progress>,
    pond: Paced<P>,
    rev: Option<Paced<FencedRev<R>>>,
    /// The account whose concurrency each downstream's calls take (without Rev settings, Rev
    /// steps fail without a call).
    accounts: PerDownstream<Option<Arc<Account>>>,
    /// Devices not final, by when they are next due, under the downstream of their step.
    queues: PerDownstream<BinaryHeap<Due>>,
    circuits: PerDownstream<Circuit>,
    in_flight: PerDownstream<usize>,
    tasks: JoinSet<()>,
    /// The attempt each running task carries, so that a task that ends without a report
    /// (aborted) still gets one.
    attempts_of: HashMap<tokio::task::Id, (DeviceChangeId, Step, u32)>,
    reports_tx: mpsc::UnboundedSender<StepReport>,
    reports_rx: mpsc::UnboundedReceiver<StepReport>,
    total: usize,
    open: usize,
    paused: Option<String>,
    /// When a stop was asked for with calls still in flight: they get `stop_grace_ms`.
    stop_asked: Option<tokio::time::Instant>,
    timings: Timings,
    /// The bulk change is being cancelled: no new carrier call (`halt` stops those waiting for
    /// a slot); only lookups of unresolved Rev creations are dispatched.
    cancelling: bool,
    halt: CancellationToken,
    /// The retry-failed rounds this run has taken up.
    round: u32,
    /// When this run last looked for other processes' appends.
    refreshed: tokio::time::Instant,
}

impl<'r, 'a, P, R> Drive<'r, 'a, P, R>
where
    P: PondApi + Clone + 'static,
    R: RevApi + Clone + 'static,
{
    /// Queues every device that is not final, and holds the downstreams an earlier run held.
    async fn load(
        runner: &'r Runner<'a>,
        id: BulkChangeId,
        pond: Paced<P>,
        rev: Option<Paced<FencedRev<R>>>,
        cancel: &'r CancellationToken,
        progress: Option<&'r Progress>,
    ) -> Result<Self, event_store::Error> {
        let (queues, total, open, held, cancelling, round) = runner
            .store
            .inspect(id, |bc| {
                let cancelling = bc.status() == BulkChangeStatus::Cancelling;
                let mut queues = PerDownstream::new(|_| BinaryHeap::new());
                for d in bc.devices().iter().filter(|d| wanted(d, cancelling)) {
                    queues[d.step.downstream()]
                        .push(Reverse((runner.due(d), d.request.device_change_id)));
                }
                let held: Vec<Downstream> = bc.held_downstreams().iter().map(|(d, _)| *d).collect();
                (
                    queues,
                    bc.devices().len(),
                    bc.open_devices(),
                    held,
                    cancelling,
                    bc.round(),
                )
            })
            .await?;
        let halt = pond.halt.clone();
        if cancelling {
            tracing::info!(bulk_change_id = %id, "bulk change is being cancelled; resolving what is unresolved");
            halt.cancel();
        }
        if let Some(p) = progress {
            p.total.store(total, Ordering::Relaxed);
            p.finished.store(total - open, Ordering::Relaxed);
        }
        tracing::info!(bulk_change_id = %id, total, open, "running bulk change");
        let mut circuits =
            PerDownstream::new(|d| Circuit::new(runner.limits.config(d).breaker.clone()));
        let accounts = PerDownstream::new(|d| match d {
            Downstream::Pond => Some(pond.account.clone()),
            Downstream::Rev => rev.as_ref().map(|r| r.account.clone()),
        });
        for d in held {
            tracing::warn!(bulk_change_id = %id, downstream = %d, "downstream held by an earlier run; probing it");
            circuits[d].start_held(tokio::time::Instant::now());
        }
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        Ok(Self {
            runner,
            id,
            cancel,
            progress,
            pond,
            rev,
            accounts,
            queues,
            circuits,
            in_flight: PerDownstream::default(),
            tasks: JoinSet::new(),
            attempts_of: HashMap::new(),
            reports_tx,
            reports_rx,
            total,
            open,
            paused: None,
            stop_asked: None,
            timings: Timings::default(),
            cancelling,
            halt,
            round,
            refreshed: tokio::time::Instant::now(),
        })
    }

    /// Looks for what other processes appended (an operator's cancel or retry-failed) and acts
    /// on it.
    async fn refresh(&mut self) -> Result<(), event_store::Error> {
        let (status, round, open) = self
            .runner
            .store
            .inspect(self.id, |bc| (bc.status(), bc.round(), bc.open_devices()))
            .await?;
        self.refreshed = tokio::time::Instant::now();
        self.open = open;
        self.noticed(status, round).await
    }

    /// Acts on the status and retry round a commit or a refresh showed.
    async fn noticed(
        &mut self,
        status: BulkChangeStatus,
        round: u32,
    ) -> Result<(), event_store::Error> {
        if status == BulkChangeStatus::Cancelling && !self.cancelling {
            self.enter_cancel().await?;
        }
        if round > self.round && !self.cancelling {
            self.reopen(round).await?;
        }
        Ok(())
    }

    /// Another process asked to cancel: nothing new is sent; queued devices leave the queues
    /// except those whose Rev creation must be looked up. Calls in flight finish and are
    /// recorded (their devices come back only if they need a lookup).
    async fn enter_cancel(&mut self) -> Result<(), event_store::Error> {
        tracing::info!(bulk_change_id = %self.id, "cancel requested; no new carrier call starts");
        self.cancelling = true;
        self.halt.cancel();
        let queued: Vec<DeviceChangeId> = self
            .queues
            .values()
            .flat_map(|q| q.iter().map(|Reverse((_, d))| *d))
            .collect();
        let runner = self.runner;
        let keep: Vec<(Step, DateTime<Utc>, DeviceChangeId)> = runner
            .store
            .inspect(self.id, |bc| {
                queued
                    .iter()
                    .filter_map(|id| bc.device(*id))
                    .filter(|d| wanted(d, true))
                    .map(|d| (d.step, runner.due(d), d.request.device_change_id))
                    .collect()
            })
            .await?;
        for (_, queue) in self.queues.iter_mut() {
            queue.clear();
        }
        for (step, due, device) in keep {
            self.queues[step.downstream()].push(Reverse((due, device)));
        }
        Ok(())
    }

    /// Another process gave failed devices a new round (retry-failed): queue them.
    async fn reopen(&mut self, round: u32) -> Result<(), event_store::Error> {
        let (since, runner) = (self.round, self.runner);
        let (reopened, open): (Vec<(Step, DateTime<Utc>, DeviceChangeId)>, usize) = runner
            .store
            .inspect(self.id, |bc| {
                let reopened = bc
                    .devices()
                    .iter()
                    .filter(|d| d.round > since && !d.is_final())
                    .map(|d| (d.step, runner.due(d), d.request.device_change_id))
                    .collect();
                (reopened, bc.open_devices())
            })
            .await?;
        tracing::info!(bulk_change_id = %self.id, round, devices = reopened.len(), "failed devices get a new round");
        for (step, due, device) in reopened {
            self.queues[step.downstream()].push(Reverse((due, device)));
        }
        self.round = round;
        self.open = open;
        Ok(())
    }

    /// Rounds until the bulk change completes, pauses or is stopped.
    async fn run(mut self) -> Result<RunOutcome, event_store::Error> {
        let stop_grace = Duration::from_millis(self.runner.config.safety.stop_grace_ms);
        loop {
            let stopping = self.cancel.is_cancelled() || self.paused.is_some();
            if stopping && self.stop_asked.is_none() {
                self.stop_asked = Some(tokio::time::Instant::now());
            }
            if self.refreshed.elapsed() >= REFRESH && !stopping {
                self.refresh().await?;
            }
            if self.in_flight.values().all(|n| *n == 0) {
                if stopping {
                    break;
                }
                let done = if self.cancelling {
                    self.queues.values().all(BinaryHeap::is_empty)
                } else {
                    self.open == 0
                };
                if done {
                    if let Some(outcome) = self.complete().await? {
                        return Ok(outcome);
                    }
                    continue;
                }
            }
            if self.stop_asked.is_some_and(|t| t.elapsed() >= stop_grace) {
                // Calls still in flight are abandoned (dropping `tasks` aborts them): POND calls
                // are redone by the next run, a Rev creation is looked up under its intent.
                tracing::warn!(bulk_change_id = %self.id, in_flight = self.in_flight.values().sum::<usize>(),
                    "calls did not finish within the stop grace; abandoning them");
                break;
            }
            let reports = self.collect(stopping).await;
            self.reap();
            let changes = self.observe(&reports);
            // Dispatch before recording, so the calls run while the outcomes are committed
            // (devices advanced by these outcomes go out on the next round). Not after a
            // systemic failure: the bulk change is about to pause.
            let stopping = stopping || systemic(&reports) || self.cancel.is_cancelled();
            let intents = if stopping {
                None
            } else {
                self.dispatch_due(!reports.is_empty()).await?
            };
            if reports.is_empty() {
                continue;
            }
            self.record_downstreams(changes).await?;
            self.record(reports, intents).await?;
        }
        self.runner.store.forget(self.id);
        Ok(match self.paused {
            Some(reason) => RunOutcome::Paused(reason),
            None => RunOutcome::Stopped,
        })
    }

    /// Every device is final (or, while cancelling, nothing is left to resolve): completes the
    /// bulk change. `None` when another process's append (a retry-failed) reopened devices:
    /// the run goes on.
    async fn complete(&mut self) -> Result<Option<RunOutcome>, event_store::Error> {
        let (runner, id) = (self.runner, self.id);
        let result = runner
            .exec_then(id, BulkChangeCommand::Complete { at: Utc::now() }, |bc| {
                bc.status()
            })
            .await;
        let status = match result {
            Ok(status) => status,
            Err(event_store::Error::UserError(
                DomainError::DevicesStillOpen { .. } | DomainError::RevUnresolved(_),
            )) => {
                // Reopened (or, racing a cancel, unresolved) since: look at the state again.
                self.refresh().await?;
                if self.cancelling {
                    self.requeue_unresolved().await?;
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let timings = &self.timings;
        runner.store.forget(id);
        tracing::info!(
            bulk_change_id = %id,
            %status,
            commits = timings.commits,
            reports = timings.reports,
            prepare_ms = timings.prepare.as_millis() as u64,
            record_ms = timings.record.as_millis() as u64,
            waiting_ms = timings.waiting.as_millis() as u64,
            "bulk change completed"
        );
        Ok(Some(RunOutcome::Completed(status)))
    }

    /// While cancelling with nothing in flight: queues every unresolved Rev creation's lookup.
    async fn requeue_unresolved(&mut self) -> Result<(), event_store::Error> {
        let runner = self.runner;
        let unresolved: Vec<(DateTime<Utc>, DeviceChangeId)> = runner
            .store
            .inspect(self.id, |bc| {
                bc.devices()
                    .iter()
                    .filter(|d| wanted(d, true))
                    .map(|d| (runner.due(d), d.request.device_change_id))
                    .collect()
            })
            .await?;
        let queue = &mut self.queues[Downstream::Rev];
        queue.clear();
        queue.extend(unresolved.into_iter().map(Reverse));
        Ok(())
    }

    /// How long to wait for outcomes: until the next device is due (and, for a held
    /// downstream, its next probe), between 1 ms and 1 s.
    fn wait(&self, stopping: bool) -> Duration {
        let (now_utc, now) = (Utc::now(), tokio::time::Instant::now());
        let next_due = self
            .queues
            .iter()
            .filter_map(|(d, queue)| {
                let Reverse((due, _)) = queue.peek()?;
                let until_due = (*due - now_utc).to_std().unwrap_or(Duration::ZERO);
                match self.circuits[d].not_before() {
                    None => Some(until_due),
                    Some(None) => None,
                    Some(Some(probe)) => Some(until_due.max(probe.saturating_duration_since(now))),
                }
            })
            .min();
        match next_due {
            Some(wait) if !stopping => wait.clamp(Duration::from_millis(1), Duration::from_secs(1)),
            _ => Duration::from_secs(1),
        }
    }

    /// Waits for the next outcome (or until something is due, or a stop), then takes every
    /// outcome arriving within `GATHER`: a commit costs about the same for 10 as for 100.
    async fn collect(&mut self, stopping: bool) -> Vec<StepReport> {
        let wait = self.wait(stopping);
        let in_flight: usize = self.in_flight.values().sum();
        let mut reports = Vec::new();
        let t = std::time::Instant::now();
        tokio::select! {
            Some(report) = self.reports_rx.recv() => {
                reports.push(report);
                let gather = tokio::time::Instant::now() + GATHER;
                while reports.len() < MAX_BATCH.min(in_flight) {
                    match self.reports_rx.try_recv() {
                        Ok(r) => reports.push(r),
                        Err(_) => match tokio::time::timeout_at(gather, self.reports_rx.recv()).await {
                            Ok(Some(r)) => reports.push(r),
                            _ => break,
                        },
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = self.cancel.cancelled(), if !stopping => {}
        }
        self.timings.waiting += t.elapsed();
        reports
    }

    /// Joins the tasks that ended (they keep their memory until joined); one that ended
    /// without a report gets one, retryable.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            match done {
                Ok((task, ())) => {
                    self.attempts_of.remove(&task);
                }
                Err(e) => {
                    if let Some((device_change_id, step, attempt)) =
                        self.attempts_of.remove(&e.id())
                    {
                        tracing::warn!(bulk_change_id = %self.id, device_id = %device_change_id, %step,
                            error = %e, "an attempt's task ended without a report; recording it as retryable");
                        let _ = self.reports_tx.send(StepReport {
                            device_change_id,
                            step,
                            attempt,
                            outcome: lost(step, format!("its task ended without a report: {e}")),
                        });
                    }
                }
            }
        }
    }

    /// Frees the outcomes' slots, and says what they mean for each downstream: an outage holds
    /// it, an answered probe resumes it.
    fn observe(&mut self, reports: &[StepReport]) -> Vec<(Downstream, Change)> {
        let now = tokio::time::Instant::now();
        let mut changes = Vec::new();
        for r in reports {
            let d = r.step.downstream();
            self.in_flight[d] -= 1;
            if let Some(change) = self.circuits[d].observe(r, now) {
                changes.push((d, change));
            }
        }
        changes
    }

    /// Starts the devices that are due, as far as each downstream has room. Rev creations need
    /// their intent committed before the POST: with outcomes to record this round
    /// (`recording`), the intents go into that same commit and are returned to be sent after
    /// it; otherwise they are committed here on their own.
    async fn dispatch_due(
        &mut self,
        recording: bool,
    ) -> Result<Option<Intents>, event_store::Error> {
        let (now, now_i) = (Utc::now(), tokio::time::Instant::now());
        let mut batch = Vec::new();
        for (d, queue) in self.queues.iter_mut() {
            let free = self
                .runner
                .limits
                .config(d)
                .max_concurrency
                .saturating_sub(self.in_flight[d]);
            let room = self.circuits[d].room(free, now_i);
            for _ in 0..room {
                match queue.peek() {
                    Some(Reverse((due, _))) if *due <= now => {
                        let Some(Reverse((_, device))) = queue.pop() else {
                            break;
                        };
                        batch.push(device);
                    }
                    _ => break,
                }
            }
        }
        if batch.is_empty() {
            return Ok(None);
        }
        let t = std::time::Instant::now();
        let (status, attempts) = self.runner.attempts(self.id, &batch).await?;
        if status == BulkChangeStatus::Cancelling && !self.cancelling {
            // The attempts are the lookups a cancel still needs (the rest left the queues).
            self.enter_cancel().await?;
        }
        // While a downstream is held, its one call is the probe.
        for a in &attempts {
            let circuit = &mut self.circuits[a.device.step.downstream()];
            if circuit.is_held() {
                circuit.started(a.device.request.device_change_id);
            }
        }
        let (mut needs_intent, mut ready): (Vec<Attempt>, Vec<Attempt>) =
            attempts.into_iter().partition(Attempt::needs_intent);
        let mut intents = None;
        if !needs_intent.is_empty() {
            let at = Utc::now();
            let send_window = self.runner.config.safety.rev_send_window();
            for a in &mut needs_intent {
                a.send_by = at.checked_add_signed(send_window);
            }
            if recording {
                self.in_flight[Downstream::Rev] += needs_intent.len();
                intents = Some(Intents {
                    attempts: needs_intent,
                    at,
                });
            } else {
                match self.runner.begin_rev(self.id, &needs_intent, at).await {
                    Ok(()) => ready.extend(needs_intent),
                    // Cancelled (or paused) by another process since the state was read: no
                    // intent, no POST.
                    Err(event_store::Error::UserError(DomainError::WrongStatus(_))) => {
                        for a in needs_intent {
                            let d = &a.device;
                            self.circuits[Downstream::Rev].not_started(d.request.device_change_id);
                            self.queues[Downstream::Rev]
                                .push(Reverse((self.runner.due(d), d.request.device_change_id)));
                        }
                        self.refresh().await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.timings.prepare += t.elapsed();
        for attempt in ready {
            self.spawn(attempt);
        }
        Ok(intents)
    }

    /// Starts one attempt's call in its own task (its slot counted in `in_flight`).
    fn spawn(&mut self, attempt: Attempt) {
        let step = attempt.device.step;
        self.in_flight[step.downstream()] += 1;
        let account = self.accounts[step.downstream()].clone();
        let max_hint = self.runner.config.safety.max_retry_after_secs;
        let (pond, rev, tx) = (self.pond.clone(), self.rev.clone(), self.reports_tx.clone());
        let report_of = (
            attempt.device.request.device_change_id,
            step,
            attempt.device.attempt,
        );
        let span = tracing::info_span!(
            "step",
            bulk_change_id = %self.id,
            device_id = %report_of.0,
            step = %step,
            attempt = report_of.2
        );
        let task = self.tasks.spawn(
            async move {
                // A panic in the attempt still reports (retryable): the runner never waits for
                // a report that cannot come.
                let outcome = std::panic::AssertUnwindSafe(async {
                    let _entered = match &account {
                        Some(account) => Some(account.enter().await),
                        None => None,
                    };
                    steps::run(&attempt, &pond, rev.as_ref()).await
                })
                .catch_unwind()
                .await;
                let mut outcome = outcome.unwrap_or_else(|panic| panicked(step, panic));
                // The device's next attempt waits for the hint (capped); the account's hold
                // was set by the call itself.
                cap_hint(&mut outcome, max_hint);
                tracing::debug!(
                    ok = !matches!(outcome, StepOutcome::Failed { .. }),
                    "attempt done"
                );
                let (device_change_id, step, attempt) = report_of;
                let _ = tx.send(StepReport {
                    device_change_id,
                    step,
                    attempt,
                    outcome,
                });
            }
            .instrument(span),
        );
        self.attempts_of.insert(task.id(), report_of);
    }

    /// Records a downstream's hold or resumption (before the outcomes, so that failures while
    /// held are not charged to devices).
    async fn record_downstreams(
        &self,
        changes: Vec<(Downstream, Change)>,
    ) -> Result<(), event_store::Error> {
        let (runner, id) = (self.runner, self.id);
        for (d, change) in changes {
            match change {
                Change::Hold(reason) if self.paused.is_none() => {
                    tracing::warn!(bulk_change_id = %id, downstream = %d, %reason,
                        "downstream fails as in an outage; holding it and probing");
                    let at = Utc::now();
                    let command = BulkChangeCommand::HoldDownstream {
                        downstream: d,
                        reason,
                        at,
                    };
                    runner.exec(id, command).await?;
                }
                Change::Hold(_) => {}
                Change::Resume => {
                    tracing::info!(bulk_change_id = %id, downstream = %d,
                        "held downstream answers again; resuming");
                    let command = BulkChangeCommand::ResumeDownstream {
                        downstream: d,
                        at: Utc::now(),
                    };
                    runner.exec(id, command).await?;
                }
            }
        }
        Ok(())
    }

    /// Commits the outcomes (with this round's Rev intents), sends the Rev creations whose
    /// intents are now in, and queues each device again at its next step.
    async fn record(
        &mut self,
        reports: Vec<StepReport>,
        intents: Option<Intents>,
    ) -> Result<(), event_store::Error> {
        let (runner, id) = (self.runner, self.id);
        let t = std::time::Instant::now();
        self.timings.commits += 1;
        self.timings.reports += reports.len() as u64;
        let ids: Vec<DeviceChangeId> = reports.iter().map(|r| r.device_change_id).collect();
        let failed: std::collections::HashSet<DeviceChangeId> = reports
            .iter()
            .filter(|r| matches!(r.outcome, StepOutcome::Failed { .. }))
            .map(|r| r.device_change_id)
            .collect();
        let command = match &intents {
            None => BulkChangeCommand::RecordResults {
                reports,
                at: Utc::now(),
            },
            Some(intents) => BulkChangeCommand::RecordResultsAndBeginRev {
                reports,
                rev: intents.attempts.iter().map(Attempt::intent).collect(),
                at: intents.at,
            },
        };
        crate::failpoints::hit("results.before_commit");
        let (updates, open, status, reason, round) = runner
            .exec_then(id, command, |bc| {
                let cancelling = bc.status() == BulkChangeStatus::Cancelling;
                let mut updates = Vec::new();
                for d in ids.iter().filter_map(|d| bc.device(*d)) {
                    if d.is_final() {
                        metrics::counter!(crate::metrics::DEVICES_ENDED, "status" => d.status.as_str())
                            .increment(1);
                    } else {
                        if failed.contains(&d.request.device_change_id) {
                            metrics::counter!(crate::metrics::RETRIES).increment(1);
                        }
                        if wanted(d, cancelling) {
                            updates.push((d.request.device_change_id, d.step, runner.due(d)));
                        }
                    }
                }
                (
                    updates,
                    bc.open_devices(),
                    bc.status(),
                    bc.paused_reason().map(str::to_string),
                    bc.round(),
                )
            })
            .await?;
        runner.projector.wake();
        crate::failpoints::hit("results.after_commit");
        self.timings.record += t.elapsed();
        if let Some(intents) = intents {
            self.send_intended(intents, status);
        }
        self.open = open;
        if let Some(p) = self.progress {
            p.finished.store(self.total - open, Ordering::Relaxed);
        }
        for (device, step, due) in updates {
            self.queues[step.downstream()].push(Reverse((due, device)));
        }
        self.noticed(status, round).await?;
        if status == BulkChangeStatus::Paused && self.paused.is_none() {
            tracing::warn!(bulk_change_id = %id, reason = ?reason, "bulk change paused");
            self.paused = Some(reason.unwrap_or_default());
        }
        Ok(())
    }

    /// The Rev creations whose intents were just committed: sent while the bulk change runs;
    /// otherwise queued again (the recorded intent makes the next run look the service up
    /// before any POST).
    fn send_intended(&mut self, intents: Intents, status: BulkChangeStatus) {
        crate::failpoints::hit("rev.intent_committed");
        self.in_flight[Downstream::Rev] -= intents.attempts.len();
        if status == BulkChangeStatus::Processing && !self.cancel.is_cancelled() {
            for attempt in intents.attempts {
                self.spawn(attempt);
            }
        } else {
            // Not sent. While cancelling, only a device whose earlier creation is unresolved
            // comes back (for its lookup).
            let cancelling = status == BulkChangeStatus::Cancelling || self.cancelling;
            for attempt in intents.attempts {
                let d = &attempt.device;
                self.circuits[Downstream::Rev].not_started(d.request.device_change_id);
                if wanted(d, cancelling) {
                    self.queues[Downstream::Rev]
                        .push(Reverse((self.runner.due(d), d.request.device_change_id)));
                }
            }
        }
    }
}
