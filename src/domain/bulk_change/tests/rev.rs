//! Rev creation: the intent before the POST, the lookup after a crash, the outcome.

use super::*;

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
                due_at: at(9),
                reason: "500 Internal Server Error".into(),
                not_sent: true,
                calls: vec![call(Some(500))],
                at: at(9),
                ..retry_of(&d, Step::RevService, 1)
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
    let events = recorded(
        at_rev_step(&d),
        vec![report(
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
        at(5),
    );
    assert!(matches!(&events[0], BulkChangeEvent::RevServiceCreated(r) if r.rev_service_id == 77));
    assert!(matches!(&events[1], BulkChangeEvent::DeviceProcessed(_)));
}

#[test]
fn rev_failure_keeps_the_carrier_change_and_warns() {
    let d = device(1, TargetStatus::Active, true);
    let events = recorded(
        at_rev_step(&d),
        vec![report(
            &d,
            Step::RevService,
            1,
            failed(FailureClass::Permanent),
        )],
        at(5),
    );
    assert!(matches!(&events[0], BulkChangeEvent::RevServiceFailed(_)));
    assert!(
        matches!(&events[1], BulkChangeEvent::DeviceProcessed(p) if p.billing_warning.is_some())
    );
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
