//! Accepting a request and starting a bulk change.

use super::*;

#[test]
fn accept_records_the_request_and_its_devices() {
    let devices = vec![device(1, TargetStatus::Active, true)];
    Given::with(())
        .given_no_previous_events()
        .when(BulkChangeCommand::Accept {
            request: std::sync::Arc::new(request(devices.clone())),
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
            request: std::sync::Arc::new(request(devices)),
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
            request: std::sync::Arc::new(request(devices)),
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
            request: std::sync::Arc::new(request(vec![device(2, TargetStatus::Active, false)])),
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
            request: std::sync::Arc::new(request(vec![])),
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

/// Applies `accepted(devices)` to a fresh aggregate.
fn applied(devices: &[DeviceRequest]) -> BulkChange {
    use cqrs_es::Aggregate as _;
    let mut bc = BulkChange::default();
    for e in accepted(devices) {
        bc.apply(e);
    }
    bc
}

#[test]
fn every_device_is_found_by_its_id_in_any_order_of_ids() {
    let ids: [&[i64]; 4] = [
        // Consecutive, with gaps, out of order from the start, out of order late.
        &[5, 6, 7, 8, 9],
        &[3, 10, 11, 400, 401, 9_000],
        &[20, 4, 7, 1, 13],
        &[1, 2, 3, 4, 100, 50, 51, 52],
    ];
    for ids in ids {
        let devices: Vec<_> = ids
            .iter()
            .map(|&n| device(n, TargetStatus::Active, false))
            .collect();
        let bc = applied(&devices);
        for &n in ids {
            let found = bc.device(dev_id(n)).map(|d| d.request.device_change_id);
            assert_eq!(found, Some(dev_id(n)), "{ids:?}");
        }
        for missing in [2, 12, 99, 402, 10_000] {
            if !ids.contains(&missing) {
                assert!(bc.device(dev_id(missing)).is_none(), "{missing} in {ids:?}");
            }
        }
    }
}

/// The state holds one copy of a Rev service however many devices create it (a million
/// devices' copies were a quarter of a worker's memory), and the JSON of the devices is the
/// same as before it was shared.
#[test]
fn devices_creating_the_same_rev_service_share_one_copy_of_it() {
    use std::sync::Arc;

    let mut devices: Vec<_> = (1..=2_500)
        .map(|n| device(n, TargetStatus::Active, true))
        .collect();
    let mut other = (*devices[7].rev_service.clone().unwrap()).clone();
    other.customer_id = "9900".into();
    devices[7].rev_service = Some(Arc::new(other));
    devices[8].rev_service = None;
    let events = BulkChange::default()
        .decide(BulkChangeCommand::Accept {
            request: Arc::new(request(devices.clone())),
            workflow: workflow(),
            at: at(0),
        })
        .unwrap();
    // Applied as a load applies them: from their stored JSON, each device's service its own
    // value until the state shares it.
    let mut state = BulkChange::default();
    for event in events {
        let json = serde_json::to_string(&event).unwrap();
        cqrs_es::Aggregate::apply(&mut state, serde_json::from_str(&json).unwrap());
    }
    let held: Vec<Option<Arc<RevServiceRequest>>> = state
        .devices()
        .iter()
        .map(|d| d.request.rev_service.clone())
        .collect();
    let first = held[0].clone().unwrap();
    let shared = held
        .iter()
        .flatten()
        .filter(|r| Arc::ptr_eq(r, &first))
        .count();
    assert_eq!(
        shared, 2_498,
        "every device with the common service shares one copy"
    );
    assert_eq!(held[7].as_deref().unwrap().customer_id, "9900");
    assert!(held[8].is_none());
    let requests: Vec<DeviceRequest> = state.devices().iter().map(|d| d.request.clone()).collect();
    assert_eq!(requests, devices);
    assert_eq!(
        serde_json::to_value(&requests).unwrap(),
        serde_json::to_value(&devices).unwrap()
    );
    let one = serde_json::to_value(&devices[0]).unwrap();
    assert_eq!(one["rev_service"]["customer_id"], "4411");
}
