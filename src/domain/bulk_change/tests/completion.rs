//! Completion within and beyond the tolerated failures, and pause / resume.

use super::*;

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
