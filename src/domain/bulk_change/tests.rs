//! Given/When/Then tests of every command and every rejection, and JSON snapshots of every event.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;

use super::*;
use crate::domain::api_call::ApiCall;
use crate::domain::ids::{
    BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId,
};
use crate::domain::policy::{Policy, RetryPolicy, WorkflowRef};
use crate::domain::request::{BulkChangeRequest, DeviceRequest, RevServiceRequest};
use crate::domain::status::*;

type Given = TestFramework<BulkChange>;

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + secs, 0).unwrap()
}

fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay_ms: 1_000,
        multiplier: 2.0,
        max_delay_ms: 60_000,
        jitter: 0.0,
    }
}

fn workflow() -> WorkflowRef {
    WorkflowRef {
        name: "pond-status-update".into(),
        version: 1,
        hash: "abc123".into(),
        policy: Policy {
            device_status: retry(3),
            service_status: retry(3),
            rev_service: retry(2),
            tolerated_failure_percent: 0.0,
        },
    }
}

fn dev_id(n: i64) -> DeviceChangeId {
    DeviceChangeId::new(n).unwrap()
}

fn device(n: i64, target: TargetStatus, rev: bool) -> DeviceRequest {
    DeviceRequest {
        device_change_id: dev_id(n),
        iccid: Iccid::parse(&format!("89012608823100{n:05}")).unwrap(),
        msisdn: Some(Msisdn::parse(&format!("1555000{n:04}")).unwrap()),
        target_status: target,
        is_ignore_current_status: false,
        rev_service: rev.then(|| RevServiceRequest {
            customer_id: "CUST-1".into(),
            provider_id: 3,
            service_type_id: 4,
            usage_plan_group_id: Some(5),
            package_id: None,
            effective_date: None,
            activated_date: None,
        }),
    }
}

fn request(devices: Vec<DeviceRequest>) -> BulkChangeRequest {
    BulkChangeRequest {
        bulk_change_id: BulkChangeId::new(81234).unwrap(),
        tenant_id: TenantId::new(1).unwrap(),
        service_provider_id: ServiceProviderId::new(12).unwrap(),
        change_request_type: "StatusUpdate".into(),
        integration: "Pond".into(),
        requested_by: Some("ops@example.com".into()),
        devices,
    }
}

fn bulk() -> BulkRef {
    BulkRef {
        bulk_change_id: BulkChangeId::new(81234).unwrap(),
        tenant_id: TenantId::new(1).unwrap(),
        service_provider_id: ServiceProviderId::new(12).unwrap(),
    }
}

fn dref(d: &DeviceRequest) -> DeviceRef {
    DeviceRef {
        device_change_id: d.device_change_id,
        iccid: d.iccid.clone(),
        msisdn: d.msisdn.clone(),
    }
}

fn call(status: Option<u16>) -> ApiCall {
    ApiCall {
        method: "POST".into(),
        url: "http://pond.test/ds/u/distributorPPUService/v1/D1/sim/8901/status".into(),
        request_body: Some(serde_json::json!({"simDataServiceStatus": "ENABLED"})),
        status,
        response_body: None,
        error: status.is_none().then(|| "timed out".to_string()),
        retry_after_secs: None,
        request_id: Some("r-1".into()),
        started_at: at(0),
        duration_ms: 12,
    }
}

fn sim(status: &str, flag: ServiceFlag) -> SimStatus {
    SimStatus {
        status_of_sim: "In-Service".into(),
        status: status.into(),
        data: flag,
        voice: flag,
        sms: flag,
    }
}

fn accepted(devices: &[DeviceRequest]) -> Vec<BulkChangeEvent> {
    let req = request(devices.to_vec());
    vec![
        BulkChangeEvent::BulkChangeAccepted(BulkChangeAccepted {
            bulk: bulk(),
            change_request_type: "StatusUpdate".into(),
            integration: "Pond".into(),
            requested_by: Some("ops@example.com".into()),
            workflow: workflow(),
            device_count: devices.len(),
            request_fingerprint: req.fingerprint(),
            at: at(0),
        }),
        BulkChangeEvent::DevicesAdded(DevicesAdded {
            bulk: bulk(),
            devices: devices.to_vec(),
            at: at(0),
        }),
    ]
}

fn started(devices: &[DeviceRequest]) -> Vec<BulkChangeEvent> {
    let mut events = accepted(devices);
    events.push(BulkChangeEvent::BulkChangeStarted(BulkChangeStarted {
        bulk: bulk(),
        worker: "w1".into(),
        at: at(1),
    }));
    events
}

fn status_updated(d: &DeviceRequest) -> BulkChangeEvent {
    BulkChangeEvent::DeviceStatusUpdated(DeviceStatusUpdated {
        bulk: bulk(),
        device: dref(d),
        attempt: 1,
        from: sim("SUSPENDED", ServiceFlag::Disabled),
        to: d.target_status,
        already_at_target: false,
        calls: vec![call(Some(200))],
        at: at(2),
    })
}

fn service_updated(d: &DeviceRequest) -> BulkChangeEvent {
    BulkChangeEvent::ServiceStatusUpdated(ServiceStatusUpdated {
        bulk: bulk(),
        device: dref(d),
        attempt: 1,
        flag: ServiceFlag::Enabled,
        call: call(Some(204)),
        at: at(3),
    })
}

fn report(d: &DeviceRequest, step: Step, attempt: u32, outcome: StepOutcome) -> StepReport {
    StepReport {
        device_change_id: d.device_change_id,
        step,
        attempt,
        outcome,
    }
}

fn failed(class: FailureClass) -> StepOutcome {
    StepOutcome::Failed {
        class,
        reason: "500 Internal Server Error".into(),
        calls: vec![call(Some(500))],
    }
}

fn retryable() -> FailureClass {
    FailureClass::Retryable {
        retry_after_secs: None,
        outcome_unknown: true,
        throttled: false,
        not_sent: false,
    }
}

#[test]
fn accept_records_the_request_and_its_devices() {
    let devices = vec![device(1, TargetStatus::Active, true)];
    Given::with(())
        .given_no_previous_events()
        .when(BulkChangeCommand::Accept {
            request: Box::new(request(devices.clone())),
            workflow: workflow(),
            at: at(0),
        })
        .then_expect_events(accepted(&devices));
}

#[test]
fn accept_splits_large_device_lists_into_chunks() {
    let devices: Vec<_> = (1..=2_500)
        .map(|n| device(n, TargetStatus::Suspended, false))
        .collect();
    let events = Given::with(())
        .given_no_previous_events()
        .when(BulkChangeCommand::Accept {
            request: Box::new(request(devices)),
            workflow: workflow(),
            at: at(0),
        })
        .inspect_result()
        .unwrap();
    let sizes: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            BulkChangeEvent::DevicesAdded(d) => Some(d.devices.len()),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, vec![1_000, 1_000, 500]);
}

#[test]
fn accepting_the_same_request_twice_is_a_no_op() {
    let devices = vec![device(1, TargetStatus::Active, false)];
    Given::with(())
        .given(accepted(&devices))
        .when(BulkChangeCommand::Accept {
            request: Box::new(request(devices)),
            workflow: workflow(),
            at: at(5),
        })
        .then_expect_events(vec![]);
}

#[test]
fn accepting_a_different_request_under_the_same_id_is_rejected() {
    let devices = vec![device(1, TargetStatus::Active, false)];
    Given::with(())
        .given(accepted(&devices))
        .when(BulkChangeCommand::Accept {
            request: Box::new(request(vec![device(2, TargetStatus::Active, false)])),
            workflow: workflow(),
            at: at(5),
        })
        .then_expect_error(Error::ConflictingRequest);
}

#[test]
fn accept_rejects_an_invalid_request() {
    Given::with(())
        .given_no_previous_events()
        .when(BulkChangeCommand::Accept {
            request: Box::new(request(vec![])),
            workflow: workflow(),
            at: at(0),
        })
        .then_expect_error(Error::InvalidRequest(
            crate::domain::request::Error::NoDevices,
        ));
}

#[test]
fn start_moves_a_new_bulk_change_to_processing() {
    let devices = vec![device(1, TargetStatus::Active, false)];
    Given::with(())
        .given(accepted(&devices))
        .when(BulkChangeCommand::Start {
            worker: "w1".into(),
            at: at(1),
        })
        .then_expect_events(vec![BulkChangeEvent::BulkChangeStarted(
            BulkChangeStarted {
                bulk: bulk(),
                worker: "w1".into(),
                at: at(1),
            },
        )]);
}

#[test]
fn start_is_rejected_before_accept_and_after_completion() {
    Given::with(())
        .given_no_previous_events()
        .when(BulkChangeCommand::Start {
            worker: "w1".into(),
            at: at(1),
        })
        .then_expect_error(Error::NotAccepted);
    let d = device(1, TargetStatus::Terminated, false);
    let mut events = started(std::slice::from_ref(&d));
    events.push(status_updated(&d));
    events.push(BulkChangeEvent::BulkChangeCompleted(BulkChangeCompleted {
        bulk: bulk(),
        status: BulkChangeStatus::Processed,
        total: 1,
        processed: 1,
        failed: 0,
        billing_warnings: 0,
        at: at(9),
    }));
    Given::with(())
        .given(events)
        .when(BulkChangeCommand::Start {
            worker: "w2".into(),
            at: at(10),
        })
        .then_expect_error(Error::WrongStatus(BulkChangeStatus::Processed));
}

#[test]
fn device_status_success_moves_on_to_service_status() {
    let d = device(1, TargetStatus::Active, false);
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::DeviceStatus,
                1,
                StepOutcome::DeviceStatus {
                    from: sim("SUSPENDED", ServiceFlag::Disabled),
                    already_at_target: false,
                    calls: vec![call(Some(200))],
                },
            )],
            at: at(2),
        })
        .then_expect_events(vec![status_updated(&d)]);
}

#[test]
fn a_sim_already_at_target_is_processed_without_writes() {
    let d = device(1, TargetStatus::Active, true);
    let events = Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::DeviceStatus,
                1,
                StepOutcome::DeviceStatus {
                    from: sim("ACTIVE", ServiceFlag::Enabled),
                    already_at_target: true,
                    calls: vec![call(Some(200))],
                },
            )],
            at: at(2),
        })
        .inspect_result()
        .unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        matches!(&events[1], BulkChangeEvent::DeviceProcessed(p) if p.summary.contains("nothing written"))
    );
}

#[test]
fn service_status_without_rev_finishes_the_device() {
    let d = device(1, TargetStatus::Suspended, false);
    let events = Given::with(())
        .given({
            let mut e = started(std::slice::from_ref(&d));
            e.push(status_updated(&d));
            e
        })
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::ServiceStatus,
                1,
                StepOutcome::ServiceStatus {
                    flag: ServiceFlag::Disabled,
                    call: call(Some(204)),
                },
            )],
            at: at(3),
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(
        &events[0],
        BulkChangeEvent::ServiceStatusUpdated(_)
    ));
    assert!(
        matches!(&events[1], BulkChangeEvent::DeviceProcessed(p) if p.billing_warning.is_none())
    );
}

fn at_rev_step(d: &DeviceRequest) -> Vec<BulkChangeEvent> {
    let mut e = started(std::slice::from_ref(d));
    e.push(status_updated(d));
    e.push(service_updated(d));
    e
}

#[test]
fn rev_intent_is_recorded_before_creation() {
    let d = device(1, TargetStatus::Active, true);
    Given::with(())
        .given(at_rev_step(&d))
        .when(BulkChangeCommand::BeginRevCreations {
            devices: vec![(d.device_change_id, 1)],
            at: at(4),
        })
        .then_expect_events(vec![BulkChangeEvent::RevServiceCreationStarted(
            RevServiceCreationStarted {
                bulk: bulk(),
                device: dref(&d),
                attempt: 1,
                number: "15550000001".into(),
                at: at(4),
            },
        )]);
}

/// At the Rev step with the intent of attempt 1 recorded (and no outcome).
fn intent_recorded(d: &DeviceRequest) -> Vec<BulkChangeEvent> {
    let mut given = at_rev_step(d);
    given.push(BulkChangeEvent::RevServiceCreationStarted(
        RevServiceCreationStarted {
            bulk: bulk(),
            device: dref(d),
            attempt: 1,
            number: "15550000001".into(),
            at: at(4),
        },
    ));
    given
}

#[test]
fn a_second_rev_intent_for_the_same_attempt_is_refused() {
    let d = device(1, TargetStatus::Active, true);
    let given = intent_recorded(&d);
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::BeginRevCreations {
            devices: vec![(d.device_change_id, 1)],
            at: at(5),
        })
        .then_expect_error(Error::RevIntentExists {
            device: d.device_change_id,
            attempt: 1,
        });
}

#[test]
fn a_lookup_that_found_nothing_moves_on_at_once_without_using_an_attempt() {
    let d = device(1, TargetStatus::Active, true);
    let given = intent_recorded(&d);
    let not_sent = FailureClass::Retryable {
        retry_after_secs: None,
        outcome_unknown: false,
        throttled: false,
        not_sent: true,
    };
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::RevService, 1, failed(not_sent))],
            at: at(9),
        })
        .then_expect_events(vec![BulkChangeEvent::DeviceStepRetryScheduled(
            DeviceStepRetryScheduled {
                bulk: bulk(),
                device: dref(&d),
                step: Step::RevService,
                failed_attempt: 1,
                next_attempt: 2,
                due_at: at(9),
                reason: "500 Internal Server Error".into(),
                outcome_unknown: false,
                throttled: false,
                not_sent: true,
                held: false,
                calls: vec![call(Some(500))],
                at: at(9),
            },
        )]);
}

#[test]
fn outcomes_and_rev_intents_go_in_one_command() {
    let a = device(1, TargetStatus::Active, true);
    let b = device(2, TargetStatus::Active, false);
    let mut given = started(&[a.clone(), b.clone()]);
    given.push(status_updated(&a));
    given.push(service_updated(&a));
    let success = StepOutcome::DeviceStatus {
        from: sim("SUSPENDED", ServiceFlag::Disabled),
        already_at_target: false,
        calls: vec![],
    };
    let events = Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::RecordResultsAndBeginRev {
            reports: vec![report(&b, Step::DeviceStatus, 1, success)],
            rev: vec![(a.device_change_id, 1)],
            at: at(4),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(
            &events[..],
            [
                BulkChangeEvent::DeviceStatusUpdated(s),
                BulkChangeEvent::RevServiceCreationStarted(r),
            ] if s.device == dref(&b) && r.device == dref(&a) && r.attempt == 1
        ),
        "{events:?}"
    );
    // Outcomes that pause the bulk change: no intent (nothing will be dispatched).
    let events = Given::with(())
        .given(given)
        .when(BulkChangeCommand::RecordResultsAndBeginRev {
            reports: vec![report(
                &b,
                Step::DeviceStatus,
                1,
                failed(FailureClass::Systemic),
            )],
            rev: vec![(a.device_change_id, 1)],
            at: at(4),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::BulkChangePaused(_)]),
        "{events:?}"
    );
}

#[test]
fn rev_intent_for_a_device_not_at_the_rev_step_is_rejected() {
    let d = device(1, TargetStatus::Active, true);
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::BeginRevCreations {
            devices: vec![(d.device_change_id, 1)],
            at: at(4),
        })
        .then_expect_error(Error::StaleResult {
            device: d.device_change_id,
            step: Step::DeviceStatus,
            attempt: 1,
            got_step: Step::RevService,
            got_attempt: 1,
        });
}

#[test]
fn rev_created_finishes_the_device() {
    let d = device(1, TargetStatus::Active, true);
    let events = Given::with(())
        .given(at_rev_step(&d))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::RevService,
                1,
                StepOutcome::RevService {
                    rev_service_id: 77,
                    number: "15550000001".into(),
                    adopted: false,
                    calls: vec![call(Some(201))],
                },
            )],
            at: at(5),
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(&events[0], BulkChangeEvent::RevServiceCreated(r) if r.rev_service_id == 77));
    assert!(matches!(&events[1], BulkChangeEvent::DeviceProcessed(_)));
}

#[test]
fn rev_failure_keeps_the_carrier_change_and_warns() {
    let d = device(1, TargetStatus::Active, true);
    let events = Given::with(())
        .given(at_rev_step(&d))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::RevService,
                1,
                failed(FailureClass::Permanent),
            )],
            at: at(5),
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(&events[0], BulkChangeEvent::RevServiceFailed(_)));
    assert!(
        matches!(&events[1], BulkChangeEvent::DeviceProcessed(p) if p.billing_warning.is_some())
    );
}

#[test]
fn retryable_failure_schedules_a_deterministic_retry() {
    let d = device(1, TargetStatus::Active, false);
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 1, failed(retryable()))],
            at: at(2),
        })
        .then_expect_events(vec![BulkChangeEvent::DeviceStepRetryScheduled(
            DeviceStepRetryScheduled {
                bulk: bulk(),
                device: dref(&d),
                step: Step::DeviceStatus,
                failed_attempt: 1,
                next_attempt: 2,
                due_at: at(3),
                reason: "500 Internal Server Error".into(),
                outcome_unknown: true,
                throttled: false,
                not_sent: false,
                held: false,
                calls: vec![call(Some(500))],
                at: at(2),
            },
        )]);
}

#[test]
fn retries_exhausted_fail_the_device() {
    let d = device(1, TargetStatus::Active, false);
    let mut given = started(std::slice::from_ref(&d));
    for attempt in 1..3 {
        given.push(BulkChangeEvent::DeviceStepRetryScheduled(
            DeviceStepRetryScheduled {
                bulk: bulk(),
                device: dref(&d),
                step: Step::DeviceStatus,
                failed_attempt: attempt,
                next_attempt: attempt + 1,
                due_at: at(3),
                reason: "503".into(),
                outcome_unknown: false,
                throttled: false,
                not_sent: false,
                held: false,
                calls: vec![],
                at: at(2),
            },
        ));
    }
    let events = Given::with(())
        .given(given)
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 3, failed(retryable()))],
            at: at(9),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceFailed(f)] if f.attempt == 3 && f.reason.starts_with("gave up after 3 attempts"))
    );
}

#[test]
fn permanent_failure_fails_the_device_at_once() {
    let d = device(1, TargetStatus::Active, false);
    let events = Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::DeviceStatus,
                1,
                failed(FailureClass::Permanent),
            )],
            at: at(2),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceFailed(f)] if f.step == Step::DeviceStatus)
    );
}

#[test]
fn systemic_failure_pauses_once_and_charges_no_device() {
    let a = device(1, TargetStatus::Active, false);
    let b = device(2, TargetStatus::Active, false);
    let events = Given::with(())
        .given(started(&[a.clone(), b.clone()]))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![
                report(&a, Step::DeviceStatus, 1, failed(FailureClass::Systemic)),
                report(&b, Step::DeviceStatus, 1, failed(FailureClass::Systemic)),
            ],
            at: at(2),
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(
        &events[..],
        [BulkChangeEvent::BulkChangePaused(_)]
    ));
}

#[test]
fn results_for_unknown_finished_or_stale_devices_are_rejected() {
    let d = device(1, TargetStatus::Active, false);
    let success = StepOutcome::DeviceStatus {
        from: sim("SUSPENDED", ServiceFlag::Disabled),
        already_at_target: false,
        calls: vec![],
    };
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &device(9, TargetStatus::Active, false),
                Step::DeviceStatus,
                1,
                success.clone(),
            )],
            at: at(2),
        })
        .then_expect_error(Error::UnknownDevice(dev_id(9)));
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 2, success.clone())],
            at: at(2),
        })
        .then_expect_error(Error::StaleResult {
            device: dev_id(1),
            step: Step::DeviceStatus,
            attempt: 1,
            got_step: Step::DeviceStatus,
            got_attempt: 2,
        });
    let mut finished = started(std::slice::from_ref(&d));
    finished.push(BulkChangeEvent::DeviceFailed(DeviceFailed {
        bulk: bulk(),
        device: dref(&d),
        step: Step::DeviceStatus,
        attempt: 1,
        reason: "404".into(),
        error_code: None,
        calls: vec![],
        at: at(2),
    }));
    Given::with(())
        .given(finished)
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 1, success.clone())],
            at: at(3),
        })
        .then_expect_error(Error::DeviceFinished(dev_id(1)));
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![
                report(&d, Step::DeviceStatus, 1, success.clone()),
                report(&d, Step::DeviceStatus, 1, success),
            ],
            at: at(2),
        })
        .then_expect_error(Error::DuplicateInBatch(dev_id(1)));
}

#[test]
fn completion_while_devices_are_open_is_rejected() {
    let d = device(1, TargetStatus::Active, false);
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::Complete { at: at(9) })
        .then_expect_error(Error::DevicesStillOpen { open: 1 });
}

fn finished_with(failures: usize, total: i64) -> Vec<BulkChangeEvent> {
    let devices: Vec<_> = (1..=total)
        .map(|n| device(n, TargetStatus::Terminated, false))
        .collect();
    let mut events = started(&devices);
    for (i, d) in devices.iter().enumerate() {
        if i < failures {
            events.push(BulkChangeEvent::DeviceFailed(DeviceFailed {
                bulk: bulk(),
                device: dref(d),
                step: Step::DeviceStatus,
                attempt: 1,
                reason: "404".into(),
                error_code: None,
                calls: vec![],
                at: at(2),
            }));
        } else {
            events.push(BulkChangeEvent::DeviceProcessed(DeviceProcessed {
                bulk: bulk(),
                device: dref(d),
                summary: "ok".into(),
                billing_warning: None,
                at: at(2),
            }));
        }
    }
    events
}

#[test]
fn completion_is_processed_within_the_tolerated_failures() {
    Given::with(())
        .given(finished_with(0, 2))
        .when(BulkChangeCommand::Complete { at: at(9) })
        .then_expect_events(vec![BulkChangeEvent::BulkChangeCompleted(
            BulkChangeCompleted {
                bulk: bulk(),
                status: BulkChangeStatus::Processed,
                total: 2,
                processed: 2,
                failed: 0,
                billing_warnings: 0,
                at: at(9),
            },
        )]);
}

#[test]
fn completion_is_error_beyond_the_tolerated_failures() {
    let events = Given::with(())
        .given(finished_with(1, 2))
        .when(BulkChangeCommand::Complete { at: at(9) })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::BulkChangeCompleted(c)] if c.status == BulkChangeStatus::Error && c.failed == 1)
    );
}

#[test]
fn pause_and_resume() {
    let d = device(1, TargetStatus::Active, false);
    let paused = BulkChangeEvent::BulkChangePaused(BulkChangePaused {
        bulk: bulk(),
        reason: "POND writes are disabled".into(),
        at: at(2),
    });
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::Pause {
            reason: "POND writes are disabled".into(),
            at: at(2),
        })
        .then_expect_events(vec![paused.clone()]);
    let mut given = started(std::slice::from_ref(&d));
    given.push(paused);
    Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::Resume {
            by: "ops".into(),
            at: at(3),
        })
        .then_expect_events(vec![BulkChangeEvent::BulkChangeResumed(
            BulkChangeResumed {
                bulk: bulk(),
                by: "ops".into(),
                at: at(3),
            },
        )]);
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::Complete { at: at(3) })
        .then_expect_error(Error::WrongStatus(BulkChangeStatus::Paused));
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::Resume {
            by: "ops".into(),
            at: at(3),
        })
        .then_expect_error(Error::WrongStatus(BulkChangeStatus::Processing));
}

#[test]
fn state_after_a_crash_asks_for_a_rev_lookup() {
    let d = device(1, TargetStatus::Active, true);
    let mut events = at_rev_step(&d);
    events.push(BulkChangeEvent::RevServiceCreationStarted(
        RevServiceCreationStarted {
            bulk: bulk(),
            device: dref(&d),
            attempt: 1,
            number: "15550000001".into(),
            at: at(4),
        },
    ));
    let mut state = BulkChange::default();
    for e in events {
        cqrs_es::Aggregate::apply(&mut state, e);
    }
    assert!(state.device(d.device_change_id).unwrap().rev_needs_lookup());
}

/// One example of every event, frozen as JSON under `src/domain/bulk_change/snapshots/`.
fn every_event() -> Vec<BulkChangeEvent> {
    let d = device(1, TargetStatus::Active, true);
    let mut events = at_rev_step(&d);
    events.extend([
        BulkChangeEvent::RevServiceCreationStarted(RevServiceCreationStarted {
            bulk: bulk(),
            device: dref(&d),
            attempt: 1,
            number: "15550000001".into(),
            at: at(4),
        }),
        BulkChangeEvent::RevServiceCreated(RevServiceCreated {
            bulk: bulk(),
            device: dref(&d),
            attempt: 1,
            rev_service_id: 77,
            number: "15550000001".into(),
            adopted: false,
            calls: vec![call(Some(201))],
            at: at(5),
        }),
        BulkChangeEvent::RevServiceFailed(RevServiceFailed {
            bulk: bulk(),
            device: dref(&d),
            attempt: 2,
            reason: "400 customer not found".into(),
            calls: vec![call(Some(400))],
            at: at(5),
        }),
        BulkChangeEvent::DeviceStepRetryScheduled(DeviceStepRetryScheduled {
            bulk: bulk(),
            device: dref(&d),
            step: Step::ServiceStatus,
            failed_attempt: 1,
            next_attempt: 2,
            due_at: at(7),
            reason: "timed out".into(),
            outcome_unknown: true,
            throttled: false,
            not_sent: false,
            held: false,
            calls: vec![call(None)],
            at: at(5),
        }),
        BulkChangeEvent::DeviceFailed(DeviceFailed {
            bulk: bulk(),
            device: dref(&d),
            step: Step::DeviceStatus,
            attempt: 1,
            reason: "404 SIM not found".into(),
            error_code: Some("HTTP_404".into()),
            calls: vec![call(Some(404))],
            at: at(5),
        }),
        BulkChangeEvent::DeviceProcessed(DeviceProcessed {
            bulk: bulk(),
            device: dref(&d),
            summary: "Active".into(),
            billing_warning: Some("Rev service not created".into()),
            at: at(6),
        }),
        BulkChangeEvent::BulkChangePaused(BulkChangePaused {
            bulk: bulk(),
            reason: "POND rejected the API key (401)".into(),
            at: at(6),
        }),
        BulkChangeEvent::BulkChangeResumed(BulkChangeResumed {
            bulk: bulk(),
            by: "ops".into(),
            at: at(7),
        }),
        BulkChangeEvent::DownstreamHeld(DownstreamHeld {
            bulk: bulk(),
            downstream: crate::domain::Downstream::Pond,
            reason: "10 failures in a row like an outage, the last: POND get status: 503".into(),
            at: at(7),
        }),
        BulkChangeEvent::DownstreamResumed(DownstreamResumed {
            bulk: bulk(),
            downstream: crate::domain::Downstream::Pond,
            at: at(7),
        }),
        BulkChangeEvent::BulkChangeCompleted(BulkChangeCompleted {
            bulk: bulk(),
            status: BulkChangeStatus::Processed,
            total: 1,
            processed: 1,
            failed: 0,
            billing_warnings: 1,
            at: at(8),
        }),
    ]);
    events
}

#[test]
fn every_event_matches_its_json_snapshot() {
    use cqrs_es::DomainEvent;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain/bulk_change/snapshots");
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let events = every_event();
    let names: std::collections::BTreeSet<&str> = events.iter().map(|e| e.name()).collect();
    assert_eq!(names.len(), 16, "every event variant has an example");
    for event in events {
        let json = serde_json::to_string_pretty(&event).unwrap() + "\n";
        let path = dir.join(format!("{}-v{}.json", event.name(), event.event_version()));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &json).unwrap();
        }
        let frozen = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "missing snapshot {}; run with UPDATE_SNAPSHOTS=1",
                path.display()
            )
        });
        assert_eq!(json, frozen, "{} changed its JSON form", event.name());
        let back: BulkChangeEvent = serde_json::from_str(&frozen).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn rate_limited_attempts_do_not_use_up_the_step() {
    let d = device(1, TargetStatus::Active, false);
    let throttled = |attempt: u32| {
        BulkChangeEvent::DeviceStepRetryScheduled(DeviceStepRetryScheduled {
            bulk: bulk(),
            device: dref(&d),
            step: Step::DeviceStatus,
            failed_attempt: attempt,
            next_attempt: attempt + 1,
            due_at: at(3),
            reason: "429".into(),
            outcome_unknown: false,
            throttled: true,
            not_sent: false,
            held: false,
            calls: vec![],
            at: at(2),
        })
    };
    // Three 429s, then a 5xx at attempt 4: with max_attempts 3 it is only the first counted
    // failure, so it is retried.
    let mut given = started(std::slice::from_ref(&d));
    given.extend((1..4).map(throttled));
    let events = Given::with(())
        .given(given)
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 4, failed(retryable()))],
            at: at(9),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStepRetryScheduled(r)] if r.next_attempt == 5 && !r.throttled),
        "{events:?}"
    );
    // A 429 is recorded as throttled.
    let events = Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(
                &d,
                Step::DeviceStatus,
                1,
                failed(FailureClass::Retryable {
                    retry_after_secs: Some(2),
                    outcome_unknown: false,
                    throttled: true,
                    not_sent: false,
                }),
            )],
            at: at(2),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStepRetryScheduled(r)] if r.throttled && r.due_at == at(4)),
        "{events:?}"
    );
}

#[test]
fn a_stored_version_1_device_failed_is_upcast_to_version_2() {
    use cqrs_es::persist::SerializedEvent;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain/bulk_change/snapshots");
    let v1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("DeviceFailed-v1.0.json")).unwrap())
            .unwrap();
    assert!(
        v1["DeviceFailed"].get("error_code").is_none(),
        "the frozen v1 has no error_code"
    );
    let stored = SerializedEvent::new(
        "81234".into(),
        9,
        "BulkChange".into(),
        "DeviceFailed".into(),
        "1.0".into(),
        v1,
        serde_json::json!({}),
    );
    let upcast = super::upcast::upcast(stored);
    assert_eq!(upcast.event_version, "2.0");
    let event: BulkChangeEvent = serde_json::from_value(upcast.payload).unwrap();
    let BulkChangeEvent::DeviceFailed(failed) = event else {
        panic!("not a DeviceFailed")
    };
    assert_eq!(failed.error_code.as_deref(), Some("HTTP_404"));
    assert_eq!(failed.reason, "404 SIM not found");
}

#[test]
fn error_codes_come_from_the_carriers_response() {
    use crate::domain::api_call::error_code;
    let mut c = call(Some(400));
    c.response_body = Some(r#"{"status":400,"code":"SIM_PLAN_LOCKED","message":"no"}"#.into());
    assert_eq!(error_code(&[c.clone()]).as_deref(), Some("SIM_PLAN_LOCKED"));
    c.response_body = Some("not json".into());
    assert_eq!(error_code(&[c]).as_deref(), Some("HTTP_400"));
    assert_eq!(error_code(&[call(None)]).as_deref(), Some("NO_RESPONSE"));
    assert_eq!(error_code(&[call(Some(200))]), None);
    assert_eq!(error_code(&[]), None);
}

#[test]
fn failures_while_the_downstream_is_held_do_not_use_up_attempts() {
    let d = device(1, TargetStatus::Active, false);
    let held = BulkChangeEvent::DownstreamHeld(DownstreamHeld {
        bulk: bulk(),
        downstream: crate::domain::Downstream::Pond,
        reason: "outage".into(),
        at: at(2),
    });
    let outage_failure = |attempt: u32| {
        BulkChangeEvent::DeviceStepRetryScheduled(DeviceStepRetryScheduled {
            bulk: bulk(),
            device: dref(&d),
            step: Step::DeviceStatus,
            failed_attempt: attempt,
            next_attempt: attempt + 1,
            due_at: at(3),
            reason: "503".into(),
            outcome_unknown: false,
            throttled: false,
            not_sent: false,
            held: true,
            calls: vec![],
            at: at(3),
        })
    };
    // Held: a 5xx at the last allowed attempt is the outage's, retried at once, not a failure.
    let mut given = started(std::slice::from_ref(&d));
    given.push(held.clone());
    given.extend((1..3).map(outage_failure));
    let events = Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 3, failed(retryable()))],
            at: at(9),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStepRetryScheduled(r)]
            if r.held && r.next_attempt == 4 && r.due_at == at(9)),
        "{events:?}"
    );
    // Resumed: the next failure is the first that counts, so it is retried with backoff.
    given.push(outage_failure(3));
    given.push(BulkChangeEvent::DownstreamResumed(DownstreamResumed {
        bulk: bulk(),
        downstream: crate::domain::Downstream::Pond,
        at: at(9),
    }));
    let events = Given::with(())
        .given(given)
        .when(BulkChangeCommand::RecordResults {
            reports: vec![report(&d, Step::DeviceStatus, 4, failed(retryable()))],
            at: at(10),
        })
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStepRetryScheduled(r)]
            if !r.held && r.next_attempt == 5 && r.due_at > at(10)),
        "{events:?}"
    );
    // Holding twice records one hold.
    Given::with(())
        .given([started(std::slice::from_ref(&d)), vec![held]].concat())
        .when(BulkChangeCommand::HoldDownstream {
            downstream: crate::domain::Downstream::Pond,
            reason: "again".into(),
            at: at(4),
        })
        .then_expect_events(vec![]);
}
