//! State and behaviour of the `BulkChange` aggregate.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::commands::{BulkChangeCommand, FailureClass, StepOutcome, StepReport};
use super::error::Error;
use super::events::*;
use crate::domain::ids::DeviceChangeId;
use crate::domain::policy::WorkflowRef;
use crate::domain::request::{BulkChangeRequest, DeviceRequest, Origin, RevServiceRequest};
use crate::domain::status::{BulkChangeStatus, DeviceStatus, Downstream, Step, TargetStatus};

fn bulk_of(request: &BulkChangeRequest) -> BulkRef {
    BulkRef {
        bulk_change_id: request.bulk_change_id,
        tenant_id: request.tenant_id,
        service_provider_id: request.service_provider_id,
    }
}

/// Devices per `DevicesAdded` event, so no single event grows with the bulk change.
pub const DEVICES_PER_EVENT: usize = 1_000;
/// 429s one step of one device may receive before they count as failed attempts.
pub const MAX_THROTTLES: u32 = 100;

/// What the bulk change was accepted with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub bulk: BulkRef,
    pub change_request_type: String,
    pub integration: String,
    pub requested_by: Option<String>,
    /// Where the request came from (a platform bulk change is written back there).
    pub origin: Origin,
    pub workflow: WorkflowRef,
    pub device_count: usize,
    pub fingerprint: String,
    pub accepted_at: DateTime<Utc>,
}

/// Where one device stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub request: DeviceRequest,
    pub status: DeviceStatus,
    /// The step to run next (meaningless once `status` is final).
    pub step: Step,
    pub attempt: u32,
    /// Not before this time (a scheduled retry); `None` = now.
    pub due_at: Option<DateTime<Utc>>,
    /// A Rev creation intent for this attempt was recorded without an outcome.
    pub rev_intent: Option<u32>,
    /// The previous Rev attempt may have created a service.
    pub rev_outcome_unknown: bool,
    /// When the latest Rev creation intent whose outcome is unresolved was recorded: a lookup
    /// for it must wait until its POST must have ended.
    #[serde(default)]
    pub rev_unresolved_since: Option<DateTime<Utc>>,
    /// Attempts of the current step refused with 429 or not sent (not counted against its
    /// attempts).
    #[serde(default)]
    pub throttles: u32,
    /// Attempts of the current step that failed while its downstream was held (an outage: not
    /// counted, and not capped).
    #[serde(default)]
    pub outage_attempts: u32,
    /// The retry-failed round that reopened it (0: none).
    #[serde(default)]
    pub round: u32,
    /// Attempts of the current step made before its current round (a retry-failed round starts
    /// counting afresh while attempt numbers keep rising).
    #[serde(default)]
    pub round_base: u32,
}

impl DeviceState {
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    /// Before `POST /v1/Services` at the current attempt, an earlier one must be looked up.
    pub fn rev_needs_lookup(&self) -> bool {
        self.rev_outcome_unknown || self.rev_intent == Some(self.attempt)
    }

    /// A Rev creation of this device may have taken effect without its outcome recorded.
    pub fn rev_unresolved(&self) -> bool {
        self.step == Step::RevService && (self.rev_outcome_unknown || self.rev_intent.is_some())
    }

    fn device_ref(&self) -> DeviceRef {
        DeviceRef {
            device_change_id: self.request.device_change_id,
            iccid: self.request.iccid.clone(),
            msisdn: self.request.msisdn.clone(),
        }
    }

    /// The number Rev files the service under: the MSISDN, or the ICCID when there is none.
    pub fn rev_number(&self) -> String {
        self.request
            .msisdn
            .as_ref()
            .map_or_else(|| self.request.iccid.to_string(), |m| m.to_string())
    }
}

/// Where each device sits in the list of devices. Requests usually list their devices by
/// ascending id (often consecutive ones): the list is then its own index (a guess at the
/// position, else a binary search; no memory of its own). The first id out of order builds a
/// map, 16 bytes a device and its table (36 MB at 1,000,000 devices).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct DeviceIndex {
    map: Option<HashMap<DeviceChangeId, u32>>,
}

impl DeviceIndex {
    fn find(&self, devices: &[DeviceState], id: DeviceChangeId) -> Option<usize> {
        if let Some(map) = &self.map {
            return map.get(&id).map(|&i| i as usize);
        }
        let first = devices.first()?.request.device_change_id.get();
        let guess = usize::try_from(id.get().checked_sub(first)?).ok()?;
        if devices
            .get(guess)
            .is_some_and(|d| d.request.device_change_id == id)
        {
            return Some(guess);
        }
        devices
            .binary_search_by_key(&id, |d| d.request.device_change_id)
            .ok()
    }

    /// Notes `id`, about to be pushed at the end of `devices`.
    fn add(&mut self, devices: &[DeviceState], id: DeviceChangeId) {
        if self.map.is_none()
            && devices
                .last()
                .is_some_and(|d| d.request.device_change_id >= id)
        {
            self.map = Some(
                devices
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d.request.device_change_id, i as u32))
                    .collect(),
            );
        }
        if let Some(map) = &mut self.map {
            map.insert(id, devices.len() as u32);
        }
    }
}

/// One bulk change and all its devices, kept compact.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BulkChange {
    header: Option<Header>,
    status: BulkChangeStatus,
    devices: Vec<DeviceState>,
    index: DeviceIndex,
    open: usize,
    processed: usize,
    failed: usize,
    billing_warnings: usize,
    paused_reason: Option<String>,
    /// Downstreams held for an outage, with the reason.
    #[serde(default)]
    held: Vec<(Downstream, String)>,
    /// Who asked to cancel, and why.
    #[serde(default)]
    cancel: Option<(String, String)>,
    #[serde(default)]
    cancelled: usize,
    /// Retry-failed rounds so far.
    #[serde(default)]
    round: u32,
    /// The distinct Rev services its devices create, each held once and shared by them (up
    /// to [`SHARED_REV_SERVICES`]; past that they are not worth sharing).
    #[serde(skip)]
    rev_services: HashSet<Arc<RevServiceRequest>>,
}

/// Distinct Rev services a bulk change's state shares among its devices, at most.
const SHARED_REV_SERVICES: usize = 10_000;

impl BulkChange {
    /// The copy of `rev` its devices already share, or `rev` from now on.
    fn shared(&mut self, rev: Arc<RevServiceRequest>) -> Arc<RevServiceRequest> {
        if let Some(held) = self.rev_services.get(&rev) {
            return held.clone();
        }
        if self.rev_services.len() < SHARED_REV_SERVICES {
            self.rev_services.insert(rev.clone());
        }
        rev
    }

    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    pub fn status(&self) -> BulkChangeStatus {
        self.status
    }

    pub fn devices(&self) -> &[DeviceState] {
        &self.devices
    }

    pub fn device(&self, id: DeviceChangeId) -> Option<&DeviceState> {
        self.index.find(&self.devices, id).map(|i| &self.devices[i])
    }

    pub fn open_devices(&self) -> usize {
        self.open
    }

    pub fn processed_devices(&self) -> usize {
        self.processed
    }

    pub fn failed_devices(&self) -> usize {
        self.failed
    }

    pub fn billing_warnings(&self) -> usize {
        self.billing_warnings
    }

    pub fn cancelled_devices(&self) -> usize {
        self.cancelled
    }

    /// Who asked to cancel, and why (once asked).
    pub fn cancel_request(&self) -> Option<(&str, &str)> {
        self.cancel
            .as_ref()
            .map(|(by, why)| (by.as_str(), why.as_str()))
    }

    /// Retry-failed rounds so far (devices reopened by round `n` carry `round == n`).
    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn paused_reason(&self) -> Option<&str> {
        self.paused_reason.as_deref()
    }

    /// Downstreams held for an outage, with the reason.
    pub fn held_downstreams(&self) -> &[(Downstream, String)] {
        &self.held
    }

    pub fn is_held(&self, downstream: Downstream) -> bool {
        self.held.iter().any(|(d, _)| *d == downstream)
    }

    fn bulk_ref(&self) -> Result<BulkRef, Error> {
        self.header
            .as_ref()
            .map(|h| h.bulk.clone())
            .ok_or(Error::NotAccepted)
    }

    fn accept(
        &self,
        request: &BulkChangeRequest,
        workflow: WorkflowRef,
        at: DateTime<Utc>,
    ) -> Result<Vec<BulkChangeEvent>, Error> {
        let fingerprint = request.fingerprint();
        if let Some(header) = &self.header {
            return if header.fingerprint == fingerprint {
                Ok(vec![])
            } else {
                Err(Error::ConflictingRequest)
            };
        }
        request.validate()?;
        let mut events = vec![Self::accepted(
            request,
            request.devices.len(),
            fingerprint,
            workflow,
            at,
        )];
        for chunk in request.devices.chunks(DEVICES_PER_EVENT) {
            events.push(Self::devices_added(request, chunk.to_vec(), at));
        }
        Ok(events)
    }

    /// The first event of a bulk change accepted with `head` (a request, whose devices are not
    /// read here: a big one is read as a stream, see [`scan`](crate::domain::scan)), checked
    /// and fingerprinted by the caller.
    pub fn accepted(
        head: &BulkChangeRequest,
        device_count: usize,
        request_fingerprint: String,
        workflow: WorkflowRef,
        at: DateTime<Utc>,
    ) -> BulkChangeEvent {
        BulkChangeEvent::BulkChangeAccepted(BulkChangeAccepted {
            bulk: bulk_of(head),
            change_request_type: head.change_request_type.clone(),
            integration: head.integration.clone(),
            requested_by: head.requested_by.clone(),
            origin: head.origin,
            workflow,
            device_count,
            request_fingerprint,
            at,
        })
    }

    /// One of the events that follow [`BulkChange::accepted`] in the same commit, with at most
    /// [`DEVICES_PER_EVENT`] devices, in the request's order.
    pub fn devices_added(
        head: &BulkChangeRequest,
        devices: Vec<DeviceRequest>,
        at: DateTime<Utc>,
    ) -> BulkChangeEvent {
        BulkChangeEvent::DevicesAdded(DevicesAdded {
            bulk: bulk_of(head),
            devices,
            at,
        })
    }

    fn require_status(&self, allowed: &[BulkChangeStatus]) -> Result<(), Error> {
        if self.header.is_none() {
            return Err(Error::NotAccepted);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(Error::WrongStatus(self.status))
        }
    }

    fn open_device(&self, id: DeviceChangeId) -> Result<&DeviceState, Error> {
        let device = self.device(id).ok_or(Error::UnknownDevice(id))?;
        if device.is_final() {
            return Err(Error::DeviceFinished(id));
        }
        Ok(device)
    }

    fn begin_rev(
        &self,
        devices: &[(DeviceChangeId, u32)],
        at: DateTime<Utc>,
    ) -> Result<Vec<BulkChangeEvent>, Error> {
        self.require_status(&[BulkChangeStatus::Processing])?;
        let bulk = self.bulk_ref()?;
        let mut seen = HashSet::new();
        let mut events = Vec::with_capacity(devices.len());
        for &(id, attempt) in devices {
            if !seen.insert(id) {
                return Err(Error::DuplicateInBatch(id));
            }
            let device = self.open_device(id)?;
            check_current(device, Step::RevService, attempt)?;
            if device.rev_intent == Some(attempt) {
                return Err(Error::RevIntentExists {
                    device: id,
                    attempt,
                });
            }
            events.push(BulkChangeEvent::RevServiceCreationStarted(
                RevServiceCreationStarted {
                    bulk: bulk.clone(),
                    device: device.device_ref(),
                    attempt,
                    number: device.rev_number(),
                    at,
                },
            ));
        }
        Ok(events)
    }

    fn record(
        &self,
        reports: Vec<StepReport>,
        at: DateTime<Utc>,
    ) -> Result<Vec<BulkChangeEvent>, Error> {
        self.require_status(&[
            BulkChangeStatus::Processing,
            BulkChangeStatus::Paused,
            BulkChangeStatus::Cancelling,
        ])?;
        let header = self.header.as_ref().ok_or(Error::NotAccepted)?;
        // Validate the whole batch before producing anything: all or nothing.
        let mut seen = HashSet::new();
        for report in &reports {
            if !seen.insert(report.device_change_id) {
                return Err(Error::DuplicateInBatch(report.device_change_id));
            }
            let device = self.open_device(report.device_change_id)?;
            check_current(device, report.step, report.attempt)?;
        }
        let mut paused = self.status == BulkChangeStatus::Paused;
        let cancelling = self.status == BulkChangeStatus::Cancelling;
        let mut events = Vec::with_capacity(reports.len() * 2);
        for mut report in reports {
            let device = self
                .device(report.device_change_id)
                .ok_or(Error::UnknownDevice(report.device_change_id))?;
            if cancelling {
                // A cancelled bulk change does not pause: a systemic failure of a call that was
                // in flight (or of a lookup) is an ordinary retryable one; the device then ends
                // CANCELLED, or its lookup is tried again within its attempts.
                if let StepOutcome::Failed { class, .. } = &mut report.outcome {
                    if *class == FailureClass::Systemic {
                        *class = FailureClass::Retryable {
                            retry_after_secs: None,
                            outcome_unknown: device.rev_unresolved(),
                            throttled: false,
                            not_sent: false,
                        };
                    }
                }
            }
            let held = self.is_held(report.step.downstream());
            outcome_events(header, device, report, at, held, &mut paused, &mut events);
        }
        Ok(events)
    }

    fn complete(&self, at: DateTime<Utc>) -> Result<Vec<BulkChangeEvent>, Error> {
        self.require_status(&[BulkChangeStatus::Processing, BulkChangeStatus::Cancelling])?;
        let header = self.header.as_ref().ok_or(Error::NotAccepted)?;
        if self.status == BulkChangeStatus::Cancelling {
            return self.end_cancelled(header, at);
        }
        if self.open > 0 {
            return Err(Error::DevicesStillOpen { open: self.open });
        }
        let total = self.devices.len();
        let failed_percent = if total == 0 {
            0.0
        } else {
            self.failed as f64 * 100.0 / total as f64
        };
        let status = if failed_percent > header.workflow.policy.tolerated_failure_percent {
            BulkChangeStatus::Error
        } else {
            BulkChangeStatus::Processed
        };
        Ok(vec![BulkChangeEvent::BulkChangeCompleted(
            BulkChangeCompleted {
                bulk: header.bulk.clone(),
                status,
                total,
                processed: self.processed,
                failed: self.failed,
                billing_warnings: self.billing_warnings,
                at,
            },
        )])
    }

    /// Ends a cancelled bulk change: its open devices end `CANCELLED` (none may have a Rev
    /// creation whose outcome is unresolved: it is looked up first).
    fn end_cancelled(
        &self,
        header: &Header,
        at: DateTime<Utc>,
    ) -> Result<Vec<BulkChangeEvent>, Error> {
        let open: Vec<&DeviceState> = self.devices.iter().filter(|d| !d.is_final()).collect();
        if let Some(d) = open.iter().find(|d| d.rev_unresolved()) {
            return Err(Error::RevUnresolved(d.request.device_change_id));
        }
        let (by, reason) = self.cancel.clone().unwrap_or_default();
        let mut events: Vec<BulkChangeEvent> = open
            .chunks(DEVICES_PER_EVENT)
            .map(|chunk| {
                BulkChangeEvent::DevicesCancelled(DevicesCancelled {
                    bulk: header.bulk.clone(),
                    devices: chunk
                        .iter()
                        .map(|d| CancelledDevice {
                            device: d.device_ref(),
                            step: d.step,
                        })
                        .collect(),
                    at,
                })
            })
            .collect();
        events.push(BulkChangeEvent::BulkChangeCancelled(BulkChangeCancelled {
            bulk: header.bulk.clone(),
            by,
            reason,
            total: self.devices.len(),
            processed: self.processed,
            failed: self.failed,
            cancelled: self.cancelled + open.len(),
            billing_warnings: self.billing_warnings,
            at,
        }));
        Ok(events)
    }

    fn cancel(
        &self,
        by: String,
        reason: String,
        at: DateTime<Utc>,
    ) -> Result<Vec<BulkChangeEvent>, Error> {
        self.require_status(&[
            BulkChangeStatus::New,
            BulkChangeStatus::Processing,
            BulkChangeStatus::Paused,
            BulkChangeStatus::Cancelling,
        ])?;
        if self.status == BulkChangeStatus::Cancelling {
            return Ok(vec![]);
        }
        Ok(vec![BulkChangeEvent::BulkChangeCancelRequested(
            BulkChangeCancelRequested {
                bulk: self.bulk_ref()?,
                by,
                reason,
                at,
            },
        )])
    }

    fn retry_failed(&self, by: String, at: DateTime<Utc>) -> Result<Vec<BulkChangeEvent>, Error> {
        self.require_status(&[
            BulkChangeStatus::Processing,
            BulkChangeStatus::Paused,
            BulkChangeStatus::Processed,
            BulkChangeStatus::Error,
        ])?;
        let bulk = self.bulk_ref()?;
        let failed: Vec<&DeviceState> = self
            .devices
            .iter()
            .filter(|d| d.status == DeviceStatus::ApiFailed)
            .collect();
        if failed.is_empty() {
            return Err(Error::NothingToRetry);
        }
        let round = self.round + 1;
        let status = if self.status == BulkChangeStatus::Paused {
            BulkChangeStatus::Paused
        } else {
            BulkChangeStatus::Processing
        };
        Ok(failed
            .chunks(DEVICES_PER_EVENT)
            .map(|chunk| {
                BulkChangeEvent::FailedDevicesRetried(FailedDevicesRetried {
                    bulk: bulk.clone(),
                    by: by.clone(),
                    round,
                    devices: chunk
                        .iter()
                        .map(|d| RetriedDevice {
                            device: d.device_ref(),
                            step: d.step,
                            next_attempt: d.attempt + 1,
                        })
                        .collect(),
                    status,
                    at,
                })
            })
            .collect())
    }

    pub(crate) fn decide(&self, command: BulkChangeCommand) -> Result<Vec<BulkChangeEvent>, Error> {
        match command {
            BulkChangeCommand::Accept {
                request,
                workflow,
                at,
            } => self.accept(&request, workflow, at),
            BulkChangeCommand::Start { worker, at } => {
                self.require_status(&[
                    BulkChangeStatus::New,
                    BulkChangeStatus::Processing,
                    BulkChangeStatus::Cancelling,
                ])?;
                if self.status != BulkChangeStatus::New {
                    return Ok(vec![]);
                }
                Ok(vec![BulkChangeEvent::BulkChangeStarted(
                    BulkChangeStarted {
                        bulk: self.bulk_ref()?,
                        worker,
                        at,
                    },
                )])
            }
            BulkChangeCommand::BeginRevCreations { devices, at } => self.begin_rev(&devices, at),
            BulkChangeCommand::RecordResults { reports, at } => self.record(reports, at),
            BulkChangeCommand::RecordResultsAndBeginRev { reports, rev, at } => {
                let mut events = self.record(reports, at)?;
                let pausing = events
                    .iter()
                    .any(|e| matches!(e, BulkChangeEvent::BulkChangePaused(_)));
                // No intents once the bulk change is being cancelled (or paused): the runner
                // sends a creation only while the state after this commit is PROCESSING.
                if !rev.is_empty() && !pausing && self.status == BulkChangeStatus::Processing {
                    // The intents' devices are not among the reports (they were waiting, not in
                    // flight), so the state before the outcomes decides them as well as after.
                    events.extend(self.begin_rev(&rev, at)?);
                }
                Ok(events)
            }
            BulkChangeCommand::Pause { reason, at } => {
                self.require_status(&[
                    BulkChangeStatus::New,
                    BulkChangeStatus::Processing,
                    BulkChangeStatus::Paused,
                ])?;
                if self.status == BulkChangeStatus::Paused {
                    return Ok(vec![]);
                }
                Ok(vec![BulkChangeEvent::BulkChangePaused(BulkChangePaused {
                    bulk: self.bulk_ref()?,
                    reason,
                    at,
                })])
            }
            BulkChangeCommand::Resume { by, at } => {
                self.require_status(&[BulkChangeStatus::Paused])?;
                Ok(vec![BulkChangeEvent::BulkChangeResumed(
                    BulkChangeResumed {
                        bulk: self.bulk_ref()?,
                        by,
                        at,
                    },
                )])
            }
            BulkChangeCommand::HoldDownstream {
                downstream,
                reason,
                at,
            } => {
                self.require_status(&[BulkChangeStatus::Processing, BulkChangeStatus::Cancelling])?;
                if self.is_held(downstream) {
                    return Ok(vec![]);
                }
                Ok(vec![BulkChangeEvent::DownstreamHeld(DownstreamHeld {
                    bulk: self.bulk_ref()?,
                    downstream,
                    reason,
                    at,
                })])
            }
            BulkChangeCommand::ResumeDownstream { downstream, at } => {
                self.require_status(&[
                    BulkChangeStatus::Processing,
                    BulkChangeStatus::Paused,
                    BulkChangeStatus::Cancelling,
                ])?;
                if !self.is_held(downstream) {
                    return Ok(vec![]);
                }
                Ok(vec![BulkChangeEvent::DownstreamResumed(
                    DownstreamResumed {
                        bulk: self.bulk_ref()?,
                        downstream,
                        at,
                    },
                )])
            }
            BulkChangeCommand::Complete { at } => self.complete(at),
            BulkChangeCommand::Cancel { by, reason, at } => self.cancel(by, reason, at),
            BulkChangeCommand::RetryFailed { by, at } => self.retry_failed(by, at),
        }
    }

    fn device_mut(&mut self, id: DeviceChangeId) -> Option<&mut DeviceState> {
        let i = self.index.find(&self.devices, id)?;
        Some(&mut self.devices[i])
    }
}

fn check_current(device: &DeviceState, step: Step, attempt: u32) -> Result<(), Error> {
    if device.step == step && device.attempt == attempt {
        Ok(())
    } else {
        Err(Error::StaleResult {
            device: device.request.device_change_id,
            step: device.step,
            attempt: device.attempt,
            got_step: step,
            got_attempt: attempt,
        })
    }
}

/// The events one step report leads to.
fn outcome_events(
    header: &Header,
    device: &DeviceState,
    report: StepReport,
    at: DateTime<Utc>,
    held: bool,
    paused: &mut bool,
    events: &mut Vec<BulkChangeEvent>,
) {
    let bulk = header.bulk.clone();
    let device_ref = device.device_ref();
    let attempt = report.attempt;
    let target = device.request.target_status;
    let processed = |summary: String, billing_warning: Option<String>| {
        BulkChangeEvent::DeviceProcessed(DeviceProcessed {
            bulk: header.bulk.clone(),
            device: device.device_ref(),
            summary,
            billing_warning,
            at,
        })
    };
    match report.outcome {
        StepOutcome::DeviceStatus {
            from,
            already_at_target,
            calls,
        } => {
            let from_text = format!("{} / {}", from.status_of_sim, from.status);
            events.push(BulkChangeEvent::DeviceStatusUpdated(DeviceStatusUpdated {
                bulk,
                device: device_ref,
                attempt,
                from,
                to: target,
                already_at_target,
                calls,
                at,
            }));
            if already_at_target && !device.request.is_ignore_current_status {
                // Nothing to write at the carrier; a Rev service asked for is still created
                // (the original created it after every successful carrier step).
                if device.request.rev_service.is_none() {
                    events.push(processed(
                        format!("already {target} ({from_text}); nothing written"),
                        None,
                    ));
                }
            } else if target == TargetStatus::Terminated {
                events.push(processed(format!("{from_text} -> Terminated"), None));
            }
        }
        StepOutcome::ServiceStatus { flag, call } => {
            events.push(BulkChangeEvent::ServiceStatusUpdated(
                ServiceStatusUpdated {
                    bulk,
                    device: device_ref,
                    attempt,
                    flag,
                    call,
                    at,
                },
            ));
            if device.request.rev_service.is_none() {
                events.push(processed(
                    format!("{target}: service flags {}", flag.as_str()),
                    None,
                ));
            }
        }
        StepOutcome::RevService {
            rev_service_id,
            number,
            adopted,
            calls,
        } => {
            events.push(BulkChangeEvent::RevServiceCreated(RevServiceCreated {
                bulk,
                device: device_ref,
                attempt,
                rev_service_id,
                number,
                adopted,
                calls,
                at,
            }));
            events.push(processed(
                format!("{target}: service flags ENABLED; Rev service {rev_service_id}"),
                None,
            ));
        }
        StepOutcome::Failed {
            class,
            reason,
            calls,
        } => {
            let policy = header.workflow.policy.retry(report.step);
            let step = report.step;
            // Failures that count against the step's attempts (429s do not, up to a cap, and
            // neither do failures while the downstream is held for an outage); a retry-failed
            // round counts from its own first attempt.
            let in_round = attempt.saturating_sub(device.round_base).max(1);
            let counted = in_round - (device.throttles + device.outage_attempts).min(in_round - 1);
            // A failure as in an outage (not a 429, not "not sent") while the downstream is held.
            let outage = held
                && matches!(
                    class,
                    FailureClass::Retryable {
                        throttled: false,
                        not_sent: false,
                        ..
                    }
                );
            let (retry, outcome_unknown, throttled) = match class {
                FailureClass::Systemic => {
                    if !*paused {
                        *paused = true;
                        events.push(BulkChangeEvent::BulkChangePaused(BulkChangePaused {
                            bulk,
                            reason,
                            at,
                        }));
                    }
                    return;
                }
                FailureClass::Retryable { not_sent: true, .. }
                    if device.throttles < MAX_THROTTLES =>
                {
                    (Some(None), false, true)
                }
                FailureClass::Retryable {
                    outcome_unknown, ..
                } if outage => (Some(None), outcome_unknown, false),
                FailureClass::Retryable {
                    retry_after_secs,
                    outcome_unknown,
                    throttled: true,
                    ..
                } if device.throttles < MAX_THROTTLES => {
                    (Some(retry_after_secs), outcome_unknown, true)
                }
                FailureClass::Retryable {
                    retry_after_secs,
                    outcome_unknown,
                    ..
                } if counted < policy.max_attempts => {
                    (Some(retry_after_secs), outcome_unknown, false)
                }
                FailureClass::Retryable { .. } | FailureClass::Permanent => (None, false, false),
            };
            let not_sent = matches!(class, FailureClass::Retryable { not_sent: true, .. });
            // An earlier Rev attempt whose outcome is still unresolved stays unresolved.
            let outcome_unknown = outcome_unknown
                || (step == Step::RevService
                    && device.rev_outcome_unknown
                    && (throttled || outage)
                    && !not_sent);
            if let Some(retry_after_secs) = retry {
                let delay = if not_sent || outage {
                    chrono::Duration::zero()
                } else {
                    policy.delay(
                        bulk.bulk_change_id,
                        device.request.device_change_id,
                        step,
                        attempt,
                        retry_after_secs,
                    )
                };
                let due_at = at.checked_add_signed(delay).unwrap_or(at);
                events.push(BulkChangeEvent::DeviceStepRetryScheduled(
                    DeviceStepRetryScheduled {
                        bulk,
                        device: device_ref,
                        step,
                        failed_attempt: attempt,
                        next_attempt: attempt + 1,
                        due_at,
                        reason,
                        outcome_unknown,
                        throttled: throttled && !not_sent,
                        not_sent,
                        held: outage,
                        calls,
                        at,
                    },
                ));
                return;
            }
            let reason = if matches!(class, FailureClass::Retryable { .. }) {
                format!(
                    "gave up after {attempt} attempts ({} rate limited): {reason}",
                    device.throttles
                )
            } else {
                reason
            };
            if step == Step::RevService {
                events.push(BulkChangeEvent::RevServiceFailed(RevServiceFailed {
                    bulk,
                    device: device_ref,
                    attempt,
                    reason: reason.clone(),
                    calls,
                    at,
                }));
                events.push(processed(
                    format!("{target}: service flags ENABLED; Rev service not created"),
                    Some(format!("Rev service not created: {reason}")),
                ));
            } else {
                events.push(BulkChangeEvent::DeviceFailed(DeviceFailed {
                    bulk,
                    device: device_ref,
                    step,
                    attempt,
                    reason,
                    error_code: crate::domain::api_call::error_code(&calls),
                    calls,
                    at,
                }));
            }
        }
    }
}

impl Aggregate for BulkChange {
    const TYPE: &'static str = "BulkChange";
    type Command = BulkChangeCommand;
    type Event = BulkChangeEvent;
    type Error = Error;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _service: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            BulkChangeEvent::BulkChangeAccepted(e) => {
                self.devices.reserve(e.device_count);
                self.header = Some(Header {
                    bulk: e.bulk,
                    change_request_type: e.change_request_type,
                    integration: e.integration,
                    requested_by: e.requested_by,
                    origin: e.origin,
                    workflow: e.workflow,
                    device_count: e.device_count,
                    fingerprint: e.request_fingerprint,
                    accepted_at: e.at,
                });
                self.status = BulkChangeStatus::New;
            }
            BulkChangeEvent::DevicesAdded(e) => {
                for mut request in e.devices {
                    if let Some(rev) = request.rev_service.take() {
                        request.rev_service = Some(self.shared(rev));
                    }
                    self.index.add(&self.devices, request.device_change_id);
                    self.devices.push(DeviceState {
                        request,
                        status: DeviceStatus::New,
                        step: Step::DeviceStatus,
                        attempt: 1,
                        due_at: None,
                        rev_intent: None,
                        rev_outcome_unknown: false,
                        rev_unresolved_since: None,
                        throttles: 0,
                        outage_attempts: 0,
                        round: 0,
                        round_base: 0,
                    });
                    self.open += 1;
                }
            }
            BulkChangeEvent::BulkChangeStarted(_) | BulkChangeEvent::BulkChangeResumed(_) => {
                self.status = BulkChangeStatus::Processing;
                self.paused_reason = None;
            }
            BulkChangeEvent::DeviceStatusUpdated(e) => {
                // Already at the target: no flags to set; on to the Rev service (or, without
                // one, `DeviceProcessed` follows in the same commit).
                let skip_flags = e.already_at_target
                    && self
                        .device(e.device.device_change_id)
                        .is_some_and(|d| !d.request.is_ignore_current_status);
                let next = if skip_flags {
                    Step::RevService
                } else {
                    Step::ServiceStatus
                };
                self.advance(e.device.device_change_id, next);
            }
            BulkChangeEvent::ServiceStatusUpdated(e) => {
                self.advance(e.device.device_change_id, Step::RevService);
            }
            BulkChangeEvent::RevServiceCreationStarted(e) => {
                if let Some(d) = self.device_mut(e.device.device_change_id) {
                    d.rev_intent = Some(e.attempt);
                    d.rev_unresolved_since = Some(e.at);
                    d.status = DeviceStatus::Processing;
                }
            }
            BulkChangeEvent::RevServiceCreated(e) => {
                if let Some(d) = self.device_mut(e.device.device_change_id) {
                    d.rev_intent = None;
                    d.rev_outcome_unknown = false;
                    d.rev_unresolved_since = None;
                }
            }
            BulkChangeEvent::RevServiceFailed(e) => {
                if let Some(d) = self.device_mut(e.device.device_change_id) {
                    d.rev_intent = None;
                    d.rev_unresolved_since = None;
                }
            }
            BulkChangeEvent::DeviceStepRetryScheduled(e) => {
                if let Some(d) = self.device_mut(e.device.device_change_id) {
                    d.status = DeviceStatus::Pending;
                    d.attempt = e.next_attempt;
                    d.due_at = Some(e.due_at);
                    if e.throttled || e.not_sent {
                        d.throttles += 1;
                    }
                    if e.held {
                        d.outage_attempts += 1;
                    }
                    if e.step == Step::RevService {
                        d.rev_intent = None;
                        d.rev_outcome_unknown = e.outcome_unknown;
                        if !e.outcome_unknown {
                            d.rev_unresolved_since = None;
                        }
                    }
                }
            }
            BulkChangeEvent::DeviceFailed(e) => {
                if let Some(d) = self.device_mut(e.device.device_change_id) {
                    d.status = DeviceStatus::ApiFailed;
                    d.attempt = e.attempt;
                    self.open = self.open.saturating_sub(1);
                    self.failed += 1;
                }
            }
            BulkChangeEvent::DeviceProcessed(e) => {
                if let Some(d) = self.device_mut(e.device.device_change_id) {
                    d.status = DeviceStatus::Processed;
                    self.open = self.open.saturating_sub(1);
                    self.processed += 1;
                    if e.billing_warning.is_some() {
                        self.billing_warnings += 1;
                    }
                }
            }
            BulkChangeEvent::BulkChangePaused(e) => {
                self.status = BulkChangeStatus::Paused;
                self.paused_reason = Some(e.reason);
            }
            BulkChangeEvent::DownstreamHeld(e) => {
                if !self.is_held(e.downstream) {
                    self.held.push((e.downstream, e.reason));
                }
            }
            BulkChangeEvent::DownstreamResumed(e) => {
                self.held.retain(|(d, _)| *d != e.downstream);
            }
            BulkChangeEvent::BulkChangeCompleted(e) => {
                self.status = e.status;
                self.held.clear();
            }
            BulkChangeEvent::BulkChangeCancelRequested(e) => {
                self.status = BulkChangeStatus::Cancelling;
                self.paused_reason = None;
                self.cancel = Some((e.by, e.reason));
            }
            BulkChangeEvent::DevicesCancelled(e) => {
                for c in e.devices {
                    if let Some(d) = self.device_mut(c.device.device_change_id) {
                        if !d.is_final() {
                            d.status = DeviceStatus::Cancelled;
                            self.open = self.open.saturating_sub(1);
                            self.cancelled += 1;
                        }
                    }
                }
            }
            BulkChangeEvent::BulkChangeCancelled(_) => {
                self.status = BulkChangeStatus::Cancelled;
                self.held.clear();
            }
            BulkChangeEvent::FailedDevicesRetried(e) => {
                self.round = self.round.max(e.round);
                self.status = e.status;
                for r in e.devices {
                    if let Some(d) = self.device_mut(r.device.device_change_id) {
                        if d.status == DeviceStatus::ApiFailed {
                            d.status = DeviceStatus::Pending;
                            d.step = r.step;
                            d.attempt = r.next_attempt;
                            d.round_base = r.next_attempt.saturating_sub(1);
                            d.round = e.round;
                            d.due_at = None;
                            d.throttles = 0;
                            d.outage_attempts = 0;
                            self.failed = self.failed.saturating_sub(1);
                            self.open += 1;
                        }
                    }
                }
            }
        }
    }
}

impl BulkChange {
    fn advance(&mut self, id: DeviceChangeId, next: Step) {
        if let Some(d) = self.device_mut(id) {
            d.status = DeviceStatus::Processing;
            d.step = next;
            d.attempt = 1;
            d.due_at = None;
            d.throttles = 0;
            d.outage_attempts = 0;
            d.round_base = 0;
        }
    }
}
