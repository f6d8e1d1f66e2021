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
use super::limiter::Limiter;
use super::steps::{self, Attempt};
use crate::adapters::pond::PondClient;
use crate::adapters::rev::RevClient;
use crate::adapters::{Failure, RevApi};
use crate::config::Config;
use crate::domain::bulk_change::{
    BulkChange, BulkChangeCommand, DeviceState, FailureClass, StepOutcome, StepReport,
};
use crate::domain::RevServiceRequest;
use crate::domain::{
    ApiCall, BulkChangeId, BulkChangeStatus, DeviceChangeId, Downstream, Iccid, Step,
};
use crate::projections::Projector;
use crate::store::event_store;
use crate::store::lease::Hold;
use crate::store::{fenced, EventStore, Writer};

/// Most outcomes recorded in one command.
const MAX_BATCH: usize = 1_000;
/// How long the runner waits for more outcomes before recording those it has.
const GATHER: Duration = Duration::from_millis(2);

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
    pub pond_limits: &'a Arc<Limiter>,
    pub rev_limits: &'a Arc<Limiter>,
    /// This run's hold on the bulk change.
    pub hold: &'a Arc<Hold>,
}

/// Rev, behind the hold: a POST leaves only while the hold is confirmed current. A hold that
/// cannot be confirmed stops the run (`lost`): the bulk change is taken up again by whichever
/// worker then holds it.
#[derive(Clone)]
struct FencedRev {
    inner: RevClient,
    hold: Arc<Hold>,
    lost: CancellationToken,
}

impl RevApi for FencedRev {
    async fn create_service(
        &self,
        service: &RevServiceRequest,
        number: &str,
        iccid: &Iccid,
        earlier: Vec<ApiCall>,
    ) -> Result<(i64, Vec<ApiCall>), Failure> {
        if let Err(lost) = self.hold.confirm().await {
            tracing::warn!(error = %lost, "not sending a Rev creation: this worker no longer holds the bulk change; stopping the run");
            self.lost.cancel();
            return Err(Failure {
                class: FailureClass::Retryable {
                    retry_after_secs: None,
                    outcome_unknown: false,
                    throttled: false,
                    not_sent: true,
                },
                reason: format!("Rev creation not sent: {lost}"),
                calls: earlier,
            });
        }
        crate::failpoints::hit("rev.hold_confirmed");
        self.inner
            .create_service(service, number, iccid, earlier)
            .await
    }

    async fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> Result<(Option<i64>, ApiCall), Failure> {
        self.inner.find_service(number, service).await
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

fn downstream(step: Step) -> usize {
    index(step.downstream())
}

fn index(downstream: Downstream) -> usize {
    usize::from(downstream == Downstream::Rev)
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
        let result = self.store.execute_as(id, command, self.writer()).await;
        self.projector.wake();
        result
    }

    /// When a device is next due: its scheduled time, and for a Rev creation that must look an
    /// earlier, unresolved one up, not before that one's POST must have ended.
    fn due(&self, d: &DeviceState) -> DateTime<Utc> {
        let due = d.due_at.unwrap_or(DateTime::<Utc>::MIN_UTC);
        match d.rev_unresolved_since {
            Some(since) if d.step == Step::RevService && d.rev_needs_lookup() => {
                let settle = self.config.safety.rev_settle(self.rev_limits.timeout());
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
        match self.drive(id, cancel, progress).await {
            Err(e) if fenced(&e).is_some() => {
                tracing::warn!(bulk_change_id = %id, error = %e, "another worker took this bulk change over; this run stopped");
                self.store.forget(id);
                Ok(RunOutcome::Superseded)
            }
            other => other,
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

    async fn drive(
        &self,
        id: BulkChangeId,
        cancel: &CancellationToken,
        progress: Option<&Progress>,
    ) -> Result<RunOutcome, event_store::Error> {
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
        let Some(provider) = provider else {
            return Ok(RunOutcome::NotFound);
        };
        if status.is_final() {
            return Ok(RunOutcome::Completed(status));
        }
        if status == BulkChangeStatus::Paused {
            return Ok(RunOutcome::Paused(reason.unwrap_or_default()));
        }
        let pond = match self.config.pond(provider) {
            Ok(settings) => PondClient::new(self.pond_http.clone(), settings),
            Err(e) => return self.pause(id, e.to_string()).await,
        };
        if !pond.write_enabled() {
            return self
                .pause(
                    id,
                    format!("POND writes are disabled (WriteIsEnabled = false) for service provider {provider}"),
                )
                .await;
        }
        let rev = self.config.rev(provider).ok().map(|settings| FencedRev {
            inner: RevClient::new(self.rev_http.clone(), settings),
            hold: self.hold.clone(),
            lost: cancel.clone(),
        });
        let max_hint = self.config.safety.max_retry_after_secs;
        let send_window = self.config.safety.rev_send_window();
        let stop_grace = Duration::from_millis(self.config.safety.stop_grace_ms);
        self.exec(
            id,
            BulkChangeCommand::Start {
                worker: self.config.worker_id.clone(),
                at: Utc::now(),
            },
        )
        .await?;

        let (mut queues, total, open, held) = self
            .store
            .inspect(id, |bc| {
                let mut queues: [BinaryHeap<Due>; 2] = [BinaryHeap::new(), BinaryHeap::new()];
                for d in bc.devices().iter().filter(|d| !d.is_final()) {
                    queues[downstream(d.step)]
                        .push(Reverse((self.due(d), d.request.device_change_id)));
                }
                let held: Vec<Downstream> = bc.held_downstreams().iter().map(|(d, _)| *d).collect();
                (queues, bc.devices().len(), bc.open_devices(), held)
            })
            .await?;
        if let Some(p) = progress {
            p.total.store(total, Ordering::Relaxed);
            p.finished.store(total - open, Ordering::Relaxed);
        }
        tracing::info!(bulk_change_id = %id, total, open, "running bulk change");

        let limiters = [self.pond_limits.clone(), self.rev_limits.clone()];
        let mut circuits = [
            Circuit::new(self.pond_limits.breaker().clone()),
            Circuit::new(self.rev_limits.breaker().clone()),
        ];
        for d in held {
            tracing::warn!(bulk_change_id = %id, downstream = %d, "downstream held by an earlier run; probing it");
            circuits[index(d)].start_held(tokio::time::Instant::now());
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<StepReport>();
        let mut tasks = JoinSet::new();
        // The attempt each running task carries, so that a task that ends without a report
        // (aborted) still gets one.
        let mut attempts_of: HashMap<tokio::task::Id, (DeviceChangeId, Step, u32)> = HashMap::new();
        let mut in_flight = [0usize; 2];
        let mut paused: Option<String> = None;
        let mut open = open;
        let mut timings = Timings::default();
        // When a stop was asked for with calls still in flight: they get `stop_grace`.
        let mut stop_asked: Option<tokio::time::Instant> = None;
        // Starts one attempt's call in its own task (its slot counted in `in_flight`).
        macro_rules! dispatch {
            ($attempt:expr) => {{
                let attempt: Attempt = $attempt;
                let q = downstream(attempt.device.step);
                in_flight[q] += 1;
                let limiter = limiters[q].clone();
                let pond = pond.clone();
                let rev = rev.clone();
                let tx = tx.clone();
                let span = tracing::info_span!(
                    "step",
                    bulk_change_id = %id,
                    device_id = %attempt.device.request.device_change_id,
                    step = %attempt.device.step,
                    attempt = attempt.device.attempt
                );
                let of = (
                    attempt.device.request.device_change_id,
                    attempt.device.step,
                    attempt.device.attempt,
                );
                let task = tasks.spawn(
                    async move {
                        let step = attempt.device.step;
                        // A panic in the attempt still reports (retryable): the runner never
                        // waits for a report that cannot come.
                        let outcome = std::panic::AssertUnwindSafe(async {
                            let _permit = limiter.acquire().await;
                            steps::run(&attempt, &pond, rev.as_ref()).await
                        })
                        .catch_unwind()
                        .await;
                        let mut outcome = outcome.unwrap_or_else(|panic| panicked(step, panic));
                        if let Some(s) = cap_hint(&mut outcome, max_hint) {
                            limiter.back_off(s);
                        }
                        tracing::debug!(
                            ok = !matches!(outcome, StepOutcome::Failed { .. }),
                            "attempt done"
                        );
                        let _ = tx.send(StepReport {
                            device_change_id: attempt.device.request.device_change_id,
                            step: attempt.device.step,
                            attempt: attempt.device.attempt,
                            outcome,
                        });
                    }
                    .instrument(span),
                );
                attempts_of.insert(task.id(), of);
            }};
        }
        loop {
            // Rev attempts waiting for their intents to be committed with this round's outcomes,
            // and the intents' time (their send window counts from it).
            let mut held: Vec<Attempt> = Vec::new();
            let mut held_at = Utc::now();
            let stopping = cancel.is_cancelled() || paused.is_some();
            if stopping && stop_asked.is_none() {
                stop_asked = Some(tokio::time::Instant::now());
            }
            if in_flight == [0, 0] {
                if stopping {
                    break;
                }
                if open == 0 {
                    self.exec(id, BulkChangeCommand::Complete { at: Utc::now() })
                        .await?;
                    let status = self.store.inspect(id, BulkChange::status).await?;
                    self.store.forget(id);
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
                    return Ok(RunOutcome::Completed(status));
                }
            }
            if stop_asked.is_some_and(|t| t.elapsed() >= stop_grace) {
                // Calls still in flight are abandoned (dropping `tasks` aborts them): POND calls
                // are redone by the next run, a Rev creation is looked up under its intent.
                tracing::warn!(bulk_change_id = %id, in_flight = in_flight[0] + in_flight[1],
                    "calls did not finish within the stop grace; abandoning them");
                break;
            }
            // Until the next device is due (and, for a held downstream, its next probe).
            let (now_utc, now) = (Utc::now(), tokio::time::Instant::now());
            let next_due = queues
                .iter()
                .zip(&circuits)
                .filter_map(|(q, circuit)| {
                    let Reverse((due, _)) = q.peek()?;
                    let until_due = (*due - now_utc).to_std().unwrap_or(Duration::ZERO);
                    match circuit.not_before() {
                        None => Some(until_due),
                        Some(None) => None,
                        Some(Some(probe)) => {
                            Some(until_due.max(probe.saturating_duration_since(now)))
                        }
                    }
                })
                .min();
            let wait = match next_due {
                Some(wait) if !stopping => {
                    wait.clamp(Duration::from_millis(1), Duration::from_secs(1))
                }
                _ => Duration::from_secs(1),
            };
            let mut reports = Vec::new();
            let t = std::time::Instant::now();
            tokio::select! {
                Some(report) = rx.recv() => {
                    reports.push(report);
                    // Outcomes arriving within a moment go into the same commit: a commit costs
                    // about the same for 10 outcomes as for 100.
                    let in_flight_now = in_flight[0] + in_flight[1];
                    let gather = tokio::time::Instant::now() + GATHER;
                    while reports.len() < MAX_BATCH.min(in_flight_now) {
                        match rx.try_recv() {
                            Ok(r) => reports.push(r),
                            Err(_) => match tokio::time::timeout_at(gather, rx.recv()).await {
                                Ok(Some(r)) => reports.push(r),
                                _ => break,
                            },
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled(), if !stopping => {}
            }
            timings.waiting += t.elapsed();
            // Finished tasks keep their memory until joined: reap them as they end.
            while let Some(done) = tasks.try_join_next_with_id() {
                match done {
                    Ok((task, ())) => {
                        attempts_of.remove(&task);
                    }
                    Err(e) => {
                        if let Some((device_change_id, step, attempt)) = attempts_of.remove(&e.id())
                        {
                            tracing::warn!(bulk_change_id = %id, device_id = %device_change_id, %step,
                                error = %e, "an attempt's task ended without a report; recording it as retryable");
                            let _ = tx.send(StepReport {
                                device_change_id,
                                step,
                                attempt,
                                outcome: lost(
                                    step,
                                    format!("its task ended without a report: {e}"),
                                ),
                            });
                        }
                    }
                }
            }
            // What the outcomes say about each downstream: an outage holds it, an answered
            // probe resumes it (recorded before the outcomes, so that failures while held are
            // not charged to devices).
            let mut changes = Vec::new();
            let now = tokio::time::Instant::now();
            for r in &reports {
                let q = downstream(r.step);
                in_flight[q] -= 1;
                if let Some(change) = circuits[q].observe(r, now) {
                    changes.push((r.step.downstream(), change));
                }
            }
            // Dispatch before recording, so the calls run while the outcomes are committed
            // (devices advanced by these outcomes go out on the next round). Not after a
            // systemic failure: the bulk change is about to pause.
            let systemic = reports.iter().any(|r| {
                matches!(
                    r.outcome,
                    StepOutcome::Failed {
                        class: FailureClass::Systemic,
                        ..
                    }
                )
            });
            let stopping = stopping || systemic || cancel.is_cancelled();
            if !stopping {
                let now = Utc::now();
                let mut batch = Vec::new();
                let now_i = tokio::time::Instant::now();
                for (q, queue) in queues.iter_mut().enumerate() {
                    let room = circuits[q].room(
                        limiters[q].max_concurrency().saturating_sub(in_flight[q]),
                        now_i,
                    );
                    let mut taken = 0;
                    while taken < room {
                        match queue.peek() {
                            Some(Reverse((due, _))) if *due <= now => {
                                let Some(Reverse((_, device))) = queue.pop() else {
                                    break;
                                };
                                batch.push(device);
                                taken += 1;
                            }
                            _ => break,
                        }
                    }
                }
                if !batch.is_empty() {
                    let t = std::time::Instant::now();
                    let attempts = self.attempts(id, &batch).await?;
                    // While a downstream is held, its one call is the probe.
                    for a in &attempts {
                        let q = downstream(a.device.step);
                        if circuits[q].is_held() {
                            circuits[q].started(a.device.request.device_change_id);
                        }
                    }
                    // Rev creations need their intent committed before the POST: with outcomes to
                    // record this round, the intents go into that same commit and these attempts
                    // wait for it; otherwise they are committed here on their own.
                    let (mut needs_intent, mut ready): (Vec<Attempt>, Vec<Attempt>) =
                        attempts.into_iter().partition(Attempt::needs_intent);
                    if !needs_intent.is_empty() {
                        let intent_at = Utc::now();
                        for a in &mut needs_intent {
                            a.send_by = intent_at.checked_add_signed(send_window);
                        }
                        if reports.is_empty() {
                            self.begin_rev(id, &needs_intent, intent_at).await?;
                            ready.extend(needs_intent);
                        } else {
                            in_flight[1] += needs_intent.len();
                            held_at = intent_at;
                            held = needs_intent;
                        }
                    }
                    timings.prepare += t.elapsed();
                    for attempt in ready {
                        dispatch!(attempt);
                    }
                }
            }
            if reports.is_empty() {
                continue;
            }
            for (d, change) in changes {
                match change {
                    Change::Hold(reason) if paused.is_none() => {
                        tracing::warn!(bulk_change_id = %id, downstream = %d, %reason,
                            "downstream fails as in an outage; holding it and probing");
                        self.exec(
                            id,
                            BulkChangeCommand::HoldDownstream {
                                downstream: d,
                                reason,
                                at: Utc::now(),
                            },
                        )
                        .await?;
                    }
                    Change::Hold(_) => {}
                    Change::Resume => {
                        tracing::info!(bulk_change_id = %id, downstream = %d,
                            "held downstream answers again; resuming");
                        self.exec(
                            id,
                            BulkChangeCommand::ResumeDownstream {
                                downstream: d,
                                at: Utc::now(),
                            },
                        )
                        .await?;
                    }
                }
            }
            let t = std::time::Instant::now();
            timings.commits += 1;
            timings.reports += reports.len() as u64;
            let ids: Vec<DeviceChangeId> = reports.iter().map(|r| r.device_change_id).collect();
            crate::failpoints::hit("results.before_commit");
            let (updates, state_open, status, reason) = self
                .store
                .execute_then(
                    id,
                    if held.is_empty() {
                        BulkChangeCommand::RecordResults {
                            reports,
                            at: Utc::now(),
                        }
                    } else {
                        BulkChangeCommand::RecordResultsAndBeginRev {
                            reports,
                            rev: held.iter().map(Attempt::intent).collect(),
                            at: held_at,
                        }
                    },
                    self.writer(),
                    |bc| {
                        let updates: Vec<_> = ids
                            .iter()
                            .filter_map(|d| bc.device(*d))
                            .filter(|d| !d.is_final())
                            .map(|d| (d.request.device_change_id, d.step, self.due(d)))
                            .collect();
                        (
                            updates,
                            bc.open_devices(),
                            bc.status(),
                            bc.paused_reason().map(str::to_string),
                        )
                    },
                )
                .await?;
            self.projector.wake();
            crate::failpoints::hit("results.after_commit");
            timings.record += t.elapsed();
            if !held.is_empty() {
                crate::failpoints::hit("rev.intent_committed");
                in_flight[1] -= held.len();
                if status == BulkChangeStatus::Processing && !cancel.is_cancelled() {
                    for attempt in held.drain(..) {
                        dispatch!(attempt);
                    }
                } else {
                    // Not sent: the bulk change pauses or stops; the recorded intent makes the
                    // next run look the service up before any POST.
                    for attempt in held.drain(..) {
                        let d = &attempt.device;
                        circuits[1].not_started(d.request.device_change_id);
                        queues[1].push(Reverse((self.due(d), d.request.device_change_id)));
                    }
                }
            }
            open = state_open;
            if let Some(p) = progress {
                p.finished.store(total - open, Ordering::Relaxed);
            }
            for (device, step, due) in updates {
                queues[downstream(step)].push(Reverse((due, device)));
            }
            if status == BulkChangeStatus::Paused && paused.is_none() {
                tracing::warn!(bulk_change_id = %id, reason = ?reason, "bulk change paused");
                paused = Some(reason.unwrap_or_default());
            }
        }
        self.store.forget(id);
        Ok(match paused {
            Some(reason) => RunOutcome::Paused(reason),
            None => RunOutcome::Stopped,
        })
    }

    /// The attempts of due devices, from the current state.
    async fn attempts(
        &self,
        id: BulkChangeId,
        devices: &[DeviceChangeId],
    ) -> Result<Vec<Attempt>, event_store::Error> {
        self.store
            .inspect(id, |bc| {
                devices
                    .iter()
                    .filter_map(|d| bc.device(*d))
                    .filter(|d| !d.is_final())
                    .map(|d| Attempt {
                        bulk_change_id: id,
                        device: d.clone(),
                        rev_lookup: d.step == Step::RevService && d.rev_needs_lookup(),
                        send_by: None,
                    })
                    .collect()
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
