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
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
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
use super::limits::{Account, Entered, Limits};
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
use crate::store::event_store::Appended;
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
    /// Turns of the run's loop (each wake-up: an outcome, a commit, a device due, a timer).
    pub turns: AtomicUsize,
}

/// Where a run's time went, logged when it ends. `record` overlaps the rest: calls go on while
/// a commit is in flight.
#[derive(Debug, Default)]
struct Timings {
    commits: u64,
    reports: u64,
    /// Reading the state of the devices due, before dispatch.
    prepare: Duration,
    /// From deciding each commit to taking it in (its append in flight).
    record: Duration,
    /// In `wait_next` (for outcomes, the commit, a device falling due).
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
    ) -> Result<(Option<i64>, Vec<ApiCall>), Failure> {
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

    async fn find_products(&self, service_id: i64) -> Result<(Vec<i64>, Vec<ApiCall>), Failure> {
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

    /// The bulk change's status and the attempts of due devices, from the state in memory (a
    /// commit in flight does not touch these devices: each went out of its queue when it was
    /// dispatched and comes back only once its outcome is in); while it is being cancelled,
    /// only the lookups of unresolved Rev creations.
    async fn attempts(
        &self,
        id: BulkChangeId,
        devices: &[DeviceChangeId],
    ) -> Result<(BulkChangeStatus, Vec<Attempt>), event_store::Error> {
        self.store
            .read(id, |bc| {
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

    /// Decides `command` on the state in memory and returns its append, to run while the
    /// runner goes on (the state in memory changes only once it is in: [`Drive::committed`]).
    async fn decide<'r>(
        &'r self,
        id: BulkChangeId,
        command: BulkChangeCommand,
    ) -> Result<Append<'r>, event_store::Error> {
        let decided = self.store.decide(id, command, self.writer()).await?;
        let store = self.store;
        Ok(Box::pin(async move {
            crate::failpoints::hit("results.appending");
            let appended = store.append_decided(decided).await?;
            crate::failpoints::hit("results.appended");
            Ok(appended)
        }))
    }
}

/// A decided command's events being appended.
type Append<'r> = Pin<Box<dyn Future<Output = Result<Appended, event_store::Error>> + Send + 'r>>;

/// A Rev creation whose intent is (to be) recorded, with the concurrency slot of its account it
/// holds from before the intent until its POST ended (none without Rev settings).
type Intended = (Attempt, Option<Entered>);

/// The one commit in flight: its append, and what the runner does once it is in.
struct InFlight<'r> {
    append: Append<'r>,
    /// The command again, to be decided anew when another process appended first.
    command: BulkChangeCommand,
    tries: usize,
    /// The devices whose outcomes it records, and those of them that failed.
    ids: Vec<DeviceChangeId>,
    failed: HashSet<DeviceChangeId>,
    /// Rev creations whose intents it records, each with its concurrency slot: sent once it is
    /// in.
    intents: Vec<Intended>,
    /// An outcome in it is a systemic failure: nothing new is dispatched until it is in (the
    /// bulk change is about to pause).
    systemic: bool,
    started: std::time::Instant,
}

/// One run of one bulk change: what is due, in flight and held per downstream, the tasks
/// making the calls, and the one commit in flight. [`Drive::run`] is a pipeline: while one
/// commit is written, outcomes keep arriving and due devices keep going out; the outcomes
/// gathered meanwhile go into the next commit as soon as that one is in.
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
    /// Devices dispatched whose outcome is not in yet (in flight, waiting for their intent's
    /// commit, or gathered for a commit): a device is never dispatched twice at once.
    busy: HashSet<DeviceChangeId>,
    reports_tx: mpsc::UnboundedSender<StepReport>,
    reports_rx: mpsc::UnboundedReceiver<StepReport>,
    /// Outcomes not yet in a commit.
    pending: Vec<StepReport>,
    /// Rev creations waiting for the next commit to record their intents, each holding its
    /// concurrency slot (counted in flight).
    intents: Vec<Intended>,
    /// Rev creations waiting for a concurrency slot of their account before their intents are
    /// recorded (counted in flight): each comes back on `entered_rx`, with its slot or, once
    /// `entry_stop` fired, without one.
    entered_tx: mpsc::UnboundedSender<(Attempt, Option<Entered>)>,
    entered_rx: mpsc::UnboundedReceiver<(Attempt, Option<Entered>)>,
    entering: JoinSet<()>,
    entry_stop: CancellationToken,
    commit: Option<InFlight<'r>>,
    /// After a commit went in with calls still in flight: the next one starts no sooner, so
    /// that it gathers their outcomes too (a commit costs about the same for 10 as for 100).
    commit_after: Option<tokio::time::Instant>,
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
        let (entered_tx, entered_rx) = mpsc::unbounded_channel();
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
            busy: HashSet::new(),
            reports_tx,
            reports_rx,
            pending: Vec::new(),
            intents: Vec::new(),
            entered_tx,
            entered_rx,
            entering: JoinSet::new(),
            entry_stop: CancellationToken::new(),
            commit: None,
            commit_after: None,
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
        self.entry_stop.cancel();
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

    /// Another process gave failed devices a new round (retry-failed): queue them. Those
    /// already queued or under way are left as they are: the state this runner reads may
    /// have taken the new round in before the commit that failed them was taken in (a
    /// catch-up after a lost race), and that commit then queued them already.
    async fn reopen(&mut self, round: u32) -> Result<(), event_store::Error> {
        let (since, runner) = (self.round, self.runner);
        let (mut reopened, open): (HashMap<DeviceChangeId, (Step, DateTime<Utc>)>, usize) = runner
            .store
            .inspect(self.id, |bc| {
                let reopened = bc
                    .devices()
                    .iter()
                    .filter(|d| d.round > since && !d.is_final())
                    .map(|d| (d.request.device_change_id, (d.step, runner.due(d))))
                    .collect();
                (reopened, bc.open_devices())
            })
            .await?;
        reopened.retain(|device, _| !self.busy.contains(device));
        if !reopened.is_empty() {
            for queue in self.queues.values() {
                for Reverse((_, device)) in queue.iter() {
                    reopened.remove(device);
                }
            }
        }
        tracing::info!(bulk_change_id = %self.id, round, devices = reopened.len(), "failed devices get a new round");
        for (device, (step, due)) in reopened {
            self.queues[step.downstream()].push(Reverse((due, device)));
        }
        self.round = round;
        self.open = open;
        Ok(())
    }

    /// Runs until the bulk change completes, pauses or is stopped. Each turn waits for an
    /// outcome, the commit in flight, a device falling due or a stop; dispatches what is due
    /// (not while a systemic failure is about to pause the bulk change); and, with no commit
    /// in flight, starts the next one with every outcome gathered since.
    async fn run(mut self) -> Result<RunOutcome, event_store::Error> {
        let stop_grace = Duration::from_millis(self.runner.config.safety.stop_grace_ms);
        loop {
            if let Some(p) = self.progress {
                p.turns.fetch_add(1, Ordering::Relaxed);
            }
            let stopping = self.cancel.is_cancelled() || self.paused.is_some();
            if stopping && self.stop_asked.is_none() {
                self.stop_asked = Some(tokio::time::Instant::now());
                // Rev creations still waiting for a slot are not dispatched.
                self.entry_stop.cancel();
            }
            if self.refreshed.elapsed() >= REFRESH && !stopping {
                self.settle().await?;
                self.refresh().await?;
            }
            let idle = self.in_flight.values().all(|n| *n == 0)
                && self.commit.is_none()
                && self.pending.is_empty();
            if idle {
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
            let seen = self.pending.len();
            if let Some(result) = self.wait_next(stopping).await {
                self.committed(result).await?;
                if self.in_flight.values().any(|n| *n > 0) {
                    self.commit_after = Some(tokio::time::Instant::now() + GATHER);
                }
            }
            self.reap();
            let changes = self.observe(seen);
            if !changes.is_empty() {
                // Before the outcomes that showed them, so that failures while held are not
                // charged to devices.
                self.settle().await?;
                self.record_downstreams(changes).await?;
            }
            let stopping = stopping
                || self.paused.is_some()
                || self.cancel.is_cancelled()
                || systemic(&self.pending)
                || self.commit.as_ref().is_some_and(|c| c.systemic);
            // Back-pressure: with a full commit's worth of outcomes waiting, nothing new goes
            // out until a commit took them (what waits stays bounded however slow the commits).
            if !stopping && self.pending.len() < MAX_BATCH {
                self.dispatch_due().await?;
            }
            let gathered = stopping
                || self.pending.len() >= MAX_BATCH
                || self.in_flight.values().all(|n| *n == 0)
                || self
                    .commit_after
                    .is_none_or(|t| tokio::time::Instant::now() >= t);
            if self.commit.is_none() && gathered {
                self.commit_after = None;
                self.start_commit().await?;
            }
        }
        // What was gathered is recorded before the run ends (nothing new is dispatched).
        self.settle().await?;
        while !self.pending.is_empty() || !self.intents.is_empty() {
            self.start_commit().await?;
            self.settle().await?;
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
    /// downstream, its next probe), between 1 ms and 1 s. A downstream with every slot taken
    /// (its calls waiting for the account's rate or daily budget, say), or every downstream
    /// while the outcomes waiting for a commit are at their bound, has nothing to dispatch
    /// until an outcome or the commit comes in, which ends the wait anyway: its queue's head
    /// does not count, or the run would poll it every millisecond.
    fn wait(&self, stopping: bool) -> Duration {
        let (now_utc, now) = (Utc::now(), tokio::time::Instant::now());
        let backed_up = self.pending.len() >= MAX_BATCH;
        let next_due = self
            .queues
            .iter()
            .filter(|(d, _)| {
                !backed_up && self.in_flight[*d] < self.runner.limits.config(*d).max_concurrency
            })
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
        let next_commit = match (&self.commit, self.commit_after) {
            (None, Some(t)) if !self.pending.is_empty() || !self.intents.is_empty() => {
                Some(t.saturating_duration_since(now))
            }
            _ => None,
        };
        match (next_due, next_commit) {
            (Some(due), Some(commit)) if !stopping => due
                .min(commit)
                .clamp(Duration::from_millis(1), Duration::from_secs(1)),
            (Some(wait), None) if !stopping => {
                wait.clamp(Duration::from_millis(1), Duration::from_secs(1))
            }
            (_, Some(commit)) => commit.clamp(Duration::from_millis(1), Duration::from_secs(1)),
            _ => Duration::from_secs(1),
        }
    }

    /// Waits for the next outcome, the commit in flight, something falling due, or a stop.
    /// Outcomes go to `pending`, with every one already there; with no commit in flight, also
    /// those arriving within `GATHER` (a commit costs about the same for 10 as for 100; with
    /// one in flight, its own time gathers them). Returns the commit's result when it ended.
    async fn wait_next(&mut self, stopping: bool) -> Option<Result<Appended, event_store::Error>> {
        let wait = self.wait(stopping);
        let in_flight: usize = self.in_flight.values().sum();
        let t = std::time::Instant::now();
        let committing = self.commit.is_some();
        let (commit, reports_rx, entered_rx, pending, cancel) = (
            &mut self.commit,
            &mut self.reports_rx,
            &mut self.entered_rx,
            &mut self.pending,
            self.cancel,
        );
        let mut entered = Vec::new();
        let fresh_from = pending.len();
        let mut ended = None;
        let appended = async {
            match commit {
                Some(c) => c.append.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = appended => ended = Some(result),
            Some(report) = reports_rx.recv() => {
                pending.push(report);
                let gather = tokio::time::Instant::now() + GATHER;
                while pending.len() - fresh_from < MAX_BATCH.min(in_flight) {
                    match reports_rx.try_recv() {
                        Ok(r) => pending.push(r),
                        Err(_) if committing => break,
                        Err(_) => match tokio::time::timeout_at(gather, reports_rx.recv()).await {
                            Ok(Some(r)) => pending.push(r),
                            _ => break,
                        },
                    }
                }
            }
            Some(e) = entered_rx.recv() => {
                entered.push(e);
                while let Ok(e) = entered_rx.try_recv() {
                    entered.push(e);
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled(), if !stopping => {}
        }
        self.timings.waiting += t.elapsed();
        for (attempt, slot) in entered {
            self.entered(attempt, slot);
        }
        ended
    }

    /// Joins the tasks that ended (they keep their memory until joined); one that ended
    /// without a report gets one, retryable.
    fn reap(&mut self) {
        while self.entering.try_join_next().is_some() {}
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

    /// Frees the slots of the outcomes gathered from `pending[from..]`, and says what they mean
    /// for each downstream: an outage holds it, an answered probe resumes it.
    fn observe(&mut self, from: usize) -> Vec<(Downstream, Change)> {
        let now = tokio::time::Instant::now();
        let mut changes = Vec::new();
        for r in &self.pending[from..] {
            let d = r.step.downstream();
            self.in_flight[d] -= 1;
            if let Some(change) = self.circuits[d].observe(r, now) {
                changes.push((d, change));
            }
        }
        changes
    }

    /// Starts the devices that are due, as far as each downstream has room. A Rev creation
    /// needs its intent committed before the POST: it waits (counted in flight) for the next
    /// commit, and is sent once that is in.
    async fn dispatch_due(&mut self) -> Result<(), event_store::Error> {
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
            let mut taken = 0;
            while taken < room {
                match queue.peek() {
                    Some(Reverse((due, _))) if *due <= now => {
                        let Some(Reverse((_, device))) = queue.pop() else {
                            break;
                        };
                        if self.busy.contains(&device) || batch.contains(&device) {
                            // Queued twice: its attempt under way queues its next step when
                            // its outcome is in.
                            tracing::warn!(bulk_change_id = %self.id, device_id = %device,
                                "a device queued while its attempt is under way; not dispatched twice");
                            metrics::counter!(crate::metrics::DUPLICATE_DISPATCHES).increment(1);
                            continue;
                        }
                        batch.push(device);
                        taken += 1;
                    }
                    _ => break,
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
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
        self.busy
            .extend(attempts.iter().map(|a| a.device.request.device_change_id));
        let (needs_intent, ready): (Vec<Attempt>, Vec<Attempt>) =
            attempts.into_iter().partition(Attempt::needs_intent);
        self.in_flight[Downstream::Rev] += needs_intent.len();
        for attempt in needs_intent {
            self.enter_then_intend(attempt);
        }
        self.timings.prepare += t.elapsed();
        for attempt in ready {
            self.spawn(attempt, None);
        }
        Ok(())
    }

    /// A Rev creation takes its account's concurrency slot before its intent is recorded, so
    /// that what waits between an intent and its POST is bounded by the account's concurrency
    /// (fleet-wide on PostgreSQL), not by how many workers share it: with every worker's own
    /// in-flight bound's worth of intents waiting for the fleet's few slots, the intents
    /// outlived their send window and no POST went out (each came back `not_sent`, again and
    /// again, until the device gave up).
    fn enter_then_intend(&mut self, attempt: Attempt) {
        let Some(account) = self.accounts[Downstream::Rev].clone() else {
            self.intents.push((attempt, None));
            return;
        };
        let (tx, stop) = (self.entered_tx.clone(), self.entry_stop.clone());
        self.entering.spawn(async move {
            let entered = tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                entered = account.enter() => Some(entered),
            };
            let _ = tx.send((attempt, entered));
        });
    }

    /// A Rev creation back from waiting for its concurrency slot: with it, it waits for the
    /// next commit to record its intent; without it (the run stops), it is not dispatched.
    fn entered(&mut self, attempt: Attempt, entered: Option<Entered>) {
        if entered.is_some() {
            self.intents.push((attempt, entered));
            return;
        }
        self.in_flight[Downstream::Rev] -= 1;
        self.not_sent(&attempt.device, self.cancelling);
    }

    /// A Rev creation that is not sent: its device is free again, and queued again when it is
    /// still wanted.
    fn not_sent(&mut self, d: &DeviceState, cancelling: bool) {
        self.busy.remove(&d.request.device_change_id);
        self.circuits[Downstream::Rev].not_started(d.request.device_change_id);
        if wanted(d, cancelling) {
            self.queues[Downstream::Rev]
                .push(Reverse((self.runner.due(d), d.request.device_change_id)));
        }
    }

    /// Starts one attempt's call in its own task (its slot counted in `in_flight`), in the
    /// account's concurrency slot it holds already or waits for.
    fn spawn(&mut self, attempt: Attempt, entered: Option<Entered>) {
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
                    let _entered = match (entered, &account) {
                        (Some(entered), _) => Some(entered),
                        (None, Some(account)) => Some(account.enter().await),
                        (None, None) => None,
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
        &mut self,
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

    /// Starts the next commit, when none is in flight: the outcomes gathered (up to
    /// `MAX_BATCH`) with the intents of the Rev creations waiting for one. It is decided on the
    /// state in memory now and appended while the run goes on.
    async fn start_commit(&mut self) -> Result<(), event_store::Error> {
        if self.commit.is_some() || (self.pending.is_empty() && self.intents.is_empty()) {
            return Ok(());
        }
        let reports: Vec<StepReport> = self
            .pending
            .drain(..self.pending.len().min(MAX_BATCH))
            .collect();
        let mut intents = std::mem::take(&mut self.intents);
        self.timings.commits += 1;
        self.timings.reports += reports.len() as u64;
        let ids: Vec<DeviceChangeId> = reports.iter().map(|r| r.device_change_id).collect();
        let failed: HashSet<DeviceChangeId> = reports
            .iter()
            .filter(|r| matches!(r.outcome, StepOutcome::Failed { .. }))
            .map(|r| r.device_change_id)
            .collect();
        let systemic = systemic(&reports);
        let at = Utc::now();
        let command = if intents.is_empty() {
            BulkChangeCommand::RecordResults { reports, at }
        } else {
            // The send window counts from the intents' recorded time.
            let send_by = at.checked_add_signed(self.runner.config.safety.rev_send_window());
            for (a, _) in &mut intents {
                a.send_by = send_by;
            }
            BulkChangeCommand::RecordResultsAndBeginRev {
                reports,
                rev: intents.iter().map(|(a, _)| a.intent()).collect(),
                at,
            }
        };
        crate::failpoints::hit("results.before_commit");
        let append = self.runner.decide(self.id, command.clone()).await?;
        self.commit = Some(InFlight {
            append,
            command,
            tries: 1,
            ids,
            failed,
            intents,
            systemic,
            started: std::time::Instant::now(),
        });
        Ok(())
    }

    /// Waits for the commit in flight, if any, and takes its result in.
    async fn settle(&mut self) -> Result<(), event_store::Error> {
        while let Some(commit) = self.commit.as_mut() {
            let result = commit.append.as_mut().await;
            self.committed(result).await?;
        }
        Ok(())
    }

    /// The commit in flight ended. When it is in: its events go into the state in memory, the
    /// Rev creations whose intents it recorded are sent, and each of its devices is queued
    /// again at its next step. One that lost a race to another process's append (an
    /// operator's cancel or retry-failed) is decided again on the state that includes it.
    async fn committed(
        &mut self,
        result: Result<Appended, event_store::Error>,
    ) -> Result<(), event_store::Error> {
        let (runner, id) = (self.runner, self.id);
        let Some(mut commit) = self.commit.take() else {
            return Ok(());
        };
        let appended = match result {
            Ok(appended) => appended,
            Err(event_store::Error::AggregateConflict) if commit.tries < CONFLICT_TRIES => {
                tracing::info!(bulk_change_id = %id, "another process appended to this bulk change; deciding the command again");
                commit.tries += 1;
                // The state in memory is still the one the lost append was decided on: take
                // the winner's events in first.
                runner.store.inspect(id, |_| ()).await?;
                commit.append = runner.decide(id, commit.command.clone()).await?;
                self.commit = Some(commit);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        runner.store.applied(appended);
        for device in &commit.ids {
            self.busy.remove(device);
        }
        runner.projector.wake();
        crate::failpoints::hit("results.after_commit");
        self.timings.record += commit.started.elapsed();
        let (ids, failed) = (&commit.ids, &commit.failed);
        let (updates, open, status, reason, round) = runner
            .store
            .read(id, |bc| {
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
        if !commit.intents.is_empty() {
            self.send_intended(commit.intents, status);
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
    fn send_intended(&mut self, intents: Vec<Intended>, status: BulkChangeStatus) {
        crate::failpoints::hit("rev.intent_committed");
        self.in_flight[Downstream::Rev] -= intents.len();
        if status == BulkChangeStatus::Processing && !self.cancel.is_cancelled() {
            for (attempt, entered) in intents {
                self.spawn(attempt, entered);
            }
        } else {
            // Not sent (their slots go back). While cancelling, only a device whose earlier
            // creation is unresolved comes back (for its lookup).
            let cancelling = status == BulkChangeStatus::Cancelling || self.cancelling;
            for (attempt, _) in intents {
                self.not_sent(&attempt.device, cancelling);
            }
        }
    }
}
