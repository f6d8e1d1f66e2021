//! Failures: retries on a recorded schedule, exhausted and permanent failures, systemic pauses, stale or unknown results, rate limits and held downstreams.

use super::*;

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
                reason: "500 Internal Server Error".into(),
                outcome_unknown: true,
                calls: vec![call(Some(500))],
                ..retry_of(&d, Step::DeviceStatus, 1)
            },
        )]);
}

#[test]
fn retries_exhausted_fail_the_device() {
    let d = device(1, TargetStatus::Active, false);
    let mut given = started(std::slice::from_ref(&d));
    for attempt in 1..3 {
        given.push(BulkChangeEvent::DeviceStepRetryScheduled(retry_of(
            &d,
            Step::DeviceStatus,
            attempt,
        )));
    }
    let events = recorded(
        given,
        vec![report(&d, Step::DeviceStatus, 3, failed(retryable()))],
        at(9),
    );
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceFailed(f)] if f.attempt == 3 && f.reason.starts_with("gave up after 3 attempts"))
    );
}

#[test]
fn permanent_failure_fails_the_device_at_once() {
    let d = device(1, TargetStatus::Active, false);
    let events = recorded(
        started(std::slice::from_ref(&d)),
        vec![report(
            &d,
            Step::DeviceStatus,
            1,
            failed(FailureClass::Permanent),
        )],
        at(2),
    );
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceFailed(f)] if f.step == Step::DeviceStatus)
    );
}

#[test]
fn systemic_failure_pauses_once_and_charges_no_device() {
    let a = device(1, TargetStatus::Active, false);
    let b = device(2, TargetStatus::Active, false);
    let events = recorded(
        started(&[a.clone(), b.clone()]),
        vec![
            report(&a, Step::DeviceStatus, 1, failed(FailureClass::Systemic)),
            report(&b, Step::DeviceStatus, 1, failed(FailureClass::Systemic)),
        ],
        at(2),
    );
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
fn rate_limited_attempts_do_not_use_up_the_step() {
    let d = device(1, TargetStatus::Active, false);
    let throttled = |attempt: u32| {
        BulkChangeEvent::DeviceStepRetryScheduled(DeviceStepRetryScheduled {
            reason: "429".into(),
            throttled: true,
            ..retry_of(&d, Step::DeviceStatus, attempt)
        })
    };
    // Three 429s, then a 5xx at attempt 4: with max_attempts 3 it is only the first counted
    // failure, so it is retried.
    let mut given = started(std::slice::from_ref(&d));
    given.extend((1..4).map(throttled));
    let events = recorded(
        given,
        vec![report(&d, Step::DeviceStatus, 4, failed(retryable()))],
        at(9),
    );
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStepRetryScheduled(r)] if r.next_attempt == 5 && !r.throttled),
        "{events:?}"
    );
    // A 429 is recorded as throttled.
    let events = recorded(
        started(std::slice::from_ref(&d)),
        vec![report(
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
        at(2),
    );
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStepRetryScheduled(r)] if r.throttled && r.due_at == at(4)),
        "{events:?}"
    );
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
            held: true,
            at: at(3),
            ..retry_of(&d, Step::DeviceStatus, attempt)
        })
    };
    // Held: a 5xx at the last allowed attempt is the outage's, retried at once, not a failure.
    let mut given = started(std::slice::from_ref(&d));
    given.push(held.clone());
    given.extend((1..3).map(outage_failure));
    let events = recorded(
        given.clone(),
        vec![report(&d, Step::DeviceStatus, 3, failed(retryable()))],
        at(9),
    );
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
    let events = recorded(
        given,
        vec![report(&d, Step::DeviceStatus, 4, failed(retryable()))],
        at(10),
    );
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
