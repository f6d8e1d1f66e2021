//! The POND steps: device status (a SIM already at its target included) and service status.

use super::*;

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
    let d = device(1, TargetStatus::Active, false);
    let events = recorded(
        started(std::slice::from_ref(&d)),
        vec![report(&d, Step::DeviceStatus, 1, at_target())],
        at(2),
    );
    assert_eq!(events.len(), 2);
    assert!(
        matches!(&events[1], BulkChangeEvent::DeviceProcessed(p) if p.summary.contains("nothing written"))
    );
}

fn at_target() -> StepOutcome {
    StepOutcome::DeviceStatus {
        from: sim("ACTIVE", ServiceFlag::Enabled),
        already_at_target: true,
        calls: vec![call(Some(200))],
    }
}

/// The original created the Rev service after every successful carrier step, a SIM already in
/// service included: such a device goes on to its Rev service (no flags to write).
#[test]
fn a_sim_already_at_target_still_gets_its_rev_service() {
    let d = device(1, TargetStatus::Active, true);
    let mut given = started(std::slice::from_ref(&d));
    let events = recorded(
        given.clone(),
        vec![report(&d, Step::DeviceStatus, 1, at_target())],
        at(2),
    );
    assert!(
        matches!(&events[..], [BulkChangeEvent::DeviceStatusUpdated(u)] if u.already_at_target),
        "{events:?}"
    );
    given.extend(events);
    let mut state = BulkChange::default();
    for e in given {
        cqrs_es::Aggregate::apply(&mut state, e);
    }
    let device = state.device(d.device_change_id).unwrap();
    assert_eq!(device.step, Step::RevService);
    assert!(!device.is_final());
}

#[test]
fn service_status_without_rev_finishes_the_device() {
    let d = device(1, TargetStatus::Suspended, false);
    let events = recorded(
        {
            let mut e = started(std::slice::from_ref(&d));
            e.push(status_updated(&d));
            e
        },
        vec![report(
            &d,
            Step::ServiceStatus,
            1,
            StepOutcome::ServiceStatus {
                flag: ServiceFlag::Disabled,
                call: call(Some(204)),
            },
        )],
        at(3),
    );
    assert!(matches!(
        &events[0],
        BulkChangeEvent::ServiceStatusUpdated(_)
    ));
    assert!(
        matches!(&events[1], BulkChangeEvent::DeviceProcessed(p) if p.billing_warning.is_none())
    );
}
