//! An operator's cancel and retry-failed.

use super::*;

fn cancel_requested() -> BulkChangeEvent {
    BulkChangeEvent::BulkChangeCancelRequested(BulkChangeCancelRequested {
        bulk: bulk(),
        by: "ops".into(),
        reason: "wrong SIMs".into(),
        at: at(5),
    })
}

fn cancel() -> BulkChangeCommand {
    BulkChangeCommand::Cancel {
        by: "ops".into(),
        reason: "wrong SIMs".into(),
        at: at(5),
    }
}

fn device_failed(d: &DeviceRequest, attempt: u32) -> BulkChangeEvent {
    BulkChangeEvent::DeviceFailed(DeviceFailed {
        bulk: bulk(),
        device: dref(d),
        step: Step::DeviceStatus,
        attempt,
        reason: "gave up after 3 attempts: 503".into(),
        error_code: Some("HTTP_503".into()),
        calls: vec![],
        at: at(2),
    })
}

fn completed(status: BulkChangeStatus, processed: usize, failed: usize) -> BulkChangeEvent {
    BulkChangeEvent::BulkChangeCompleted(BulkChangeCompleted {
        bulk: bulk(),
        status,
        total: processed + failed,
        processed,
        failed,
        billing_warnings: 0,
        at: at(3),
    })
}

#[test]
fn a_cancel_is_recorded_once_and_refused_when_finished() {
    let d = device(1, TargetStatus::Active, false);
    Given::with(())
        .given(started(std::slice::from_ref(&d)))
        .when(cancel())
        .then_expect_events(vec![cancel_requested()]);
    let mut given = started(std::slice::from_ref(&d));
    given.push(cancel_requested());
    Given::with(())
        .given(given)
        .when(cancel())
        .then_expect_events(vec![]);
    let mut finished = started(std::slice::from_ref(&d));
    finished.push(device_failed(&d, 3));
    finished.push(completed(BulkChangeStatus::Error, 0, 1));
    Given::with(())
        .given(finished)
        .when(cancel())
        .then_expect_error(Error::WrongStatus(BulkChangeStatus::Error));
    Given::with(())
        .given_no_previous_events()
        .when(cancel())
        .then_expect_error(Error::NotAccepted);
}

#[test]
fn a_cancelled_bulk_change_records_calls_in_flight_but_starts_no_rev_creation() {
    let (a, b) = (
        device(1, TargetStatus::Active, false),
        device(2, TargetStatus::Active, true),
    );
    let mut given = started(&[a.clone(), b.clone()]);
    given.push(status_updated(&b));
    given.push(service_updated(&b));
    given.push(cancel_requested());
    // The outcome of a call that was in flight is recorded; the Rev intent asked in the same
    // commit is not (no POST may follow).
    let events = Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::RecordResultsAndBeginRev {
            reports: vec![report(
                &a,
                Step::DeviceStatus,
                1,
                StepOutcome::DeviceStatus {
                    from: sim("SUSPENDED", ServiceFlag::Disabled),
                    already_at_target: false,
                    calls: vec![call(Some(200))],
                },
            )],
            rev: vec![(b.device_change_id, 1)],
            at: at(6),
        })
        .inspect_result()
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name(), "DeviceStatusUpdated");
    Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::BeginRevCreations {
            devices: vec![(b.device_change_id, 1)],
            at: at(6),
        })
        .then_expect_error(Error::WrongStatus(BulkChangeStatus::Cancelling));
    // A systemic failure of a call in flight does not pause a cancelled bulk change.
    let events = recorded(
        given,
        vec![report(
            &a,
            Step::DeviceStatus,
            1,
            failed(FailureClass::Systemic),
        )],
        at(6),
    );
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name(), "DeviceStepRetryScheduled");
}

#[test]
fn the_end_of_a_cancel_waits_for_unresolved_rev_creations_then_cancels_the_open_devices() {
    let (a, b, c) = (
        device(1, TargetStatus::Active, false),
        device(2, TargetStatus::Active, true),
        device(3, TargetStatus::Active, false),
    );
    let mut given = started(&[a.clone(), b.clone(), c.clone()]);
    given.push(BulkChangeEvent::DeviceProcessed(DeviceProcessed {
        bulk: bulk(),
        device: dref(&c),
        summary: "ok".into(),
        billing_warning: None,
        at: at(2),
    }));
    given.push(status_updated(&b));
    given.push(service_updated(&b));
    given.push(BulkChangeEvent::RevServiceCreationStarted(
        RevServiceCreationStarted {
            bulk: bulk(),
            device: dref(&b),
            attempt: 1,
            number: "15550000002".into(),
            at: at(4),
        },
    ));
    given.push(cancel_requested());
    Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::Complete { at: at(9) })
        .then_expect_error(Error::RevUnresolved(b.device_change_id));
    // The lookup found nothing: nothing was created, the device is resolved.
    let mut looked_up = retry_of(&b, Step::RevService, 1);
    looked_up.not_sent = true;
    given.push(BulkChangeEvent::DeviceStepRetryScheduled(looked_up));
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::Complete { at: at(9) })
        .then_expect_events(vec![
            BulkChangeEvent::DevicesCancelled(DevicesCancelled {
                bulk: bulk(),
                devices: vec![
                    CancelledDevice {
                        device: dref(&a),
                        step: Step::DeviceStatus,
                    },
                    CancelledDevice {
                        device: dref(&b),
                        step: Step::RevService,
                    },
                ],
                at: at(9),
            }),
            BulkChangeEvent::BulkChangeCancelled(BulkChangeCancelled {
                bulk: bulk(),
                by: "ops".into(),
                reason: "wrong SIMs".into(),
                total: 3,
                processed: 1,
                failed: 0,
                cancelled: 2,
                billing_warnings: 0,
                at: at(9),
            }),
        ]);
}

#[test]
fn a_cancelled_bulk_change_is_final_and_its_devices_cancelled() {
    let d = device(1, TargetStatus::Active, false);
    let mut given = started(std::slice::from_ref(&d));
    given.push(cancel_requested());
    let mut state = BulkChange::default();
    let events = Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::Complete { at: at(9) })
        .inspect_result()
        .unwrap();
    for e in given.into_iter().chain(events) {
        cqrs_es::Aggregate::apply(&mut state, e);
    }
    assert_eq!(state.status(), BulkChangeStatus::Cancelled);
    assert!(state.status().is_final());
    assert_eq!(state.cancelled_devices(), 1);
    assert_eq!(state.open_devices(), 0);
    assert_eq!(
        state.device(d.device_change_id).unwrap().status,
        DeviceStatus::Cancelled
    );
}

#[test]
fn retry_failed_reopens_the_failed_devices_with_a_new_round_of_attempts() {
    let (a, b) = (
        device(1, TargetStatus::Active, false),
        device(2, TargetStatus::Active, false),
    );
    let mut given = started(&[a.clone(), b.clone()]);
    given.push(device_failed(&a, 3));
    given.push(BulkChangeEvent::DeviceProcessed(DeviceProcessed {
        bulk: bulk(),
        device: dref(&b),
        summary: "ok".into(),
        billing_warning: None,
        at: at(2),
    }));
    given.push(completed(BulkChangeStatus::Error, 1, 1));
    let retried = BulkChangeEvent::FailedDevicesRetried(FailedDevicesRetried {
        bulk: bulk(),
        by: "ops".into(),
        round: 1,
        devices: vec![RetriedDevice {
            device: dref(&a),
            step: Step::DeviceStatus,
            next_attempt: 4,
        }],
        status: BulkChangeStatus::Processing,
        at: at(10),
    });
    Given::with(())
        .given(given.clone())
        .when(BulkChangeCommand::RetryFailed {
            by: "ops".into(),
            at: at(10),
        })
        .then_expect_events(vec![retried.clone()]);
    given.push(retried);
    // The new round counts from its own first attempt: attempt 4 failing is its first failure
    // (the policy allows 3), so it is retried, not given up.
    let events = recorded(
        given.clone(),
        vec![report(&a, Step::DeviceStatus, 4, failed(retryable()))],
        at(11),
    );
    assert_eq!(events.len(), 1);
    let BulkChangeEvent::DeviceStepRetryScheduled(r) = &events[0] else {
        panic!("expected a retry, got {events:?}")
    };
    assert_eq!((r.failed_attempt, r.next_attempt), (4, 5));
    // Nothing left to retry once no device is API_FAILED.
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::RetryFailed {
            by: "ops".into(),
            at: at(12),
        })
        .then_expect_error(Error::NothingToRetry);
}

#[test]
fn retry_failed_is_refused_while_cancelling() {
    let d = device(1, TargetStatus::Active, false);
    let mut given = started(std::slice::from_ref(&d));
    given.push(device_failed(&d, 3));
    given.push(cancel_requested());
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::RetryFailed {
            by: "ops".into(),
            at: at(12),
        })
        .then_expect_error(Error::WrongStatus(BulkChangeStatus::Cancelling));
}
