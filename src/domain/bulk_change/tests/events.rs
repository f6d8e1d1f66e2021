//! Every event's JSON form, frozen, and the upcast of older stored versions.

use super::*;

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
        BulkChangeEvent::BulkChangeCancelRequested(BulkChangeCancelRequested {
            bulk: bulk(),
            by: "ops".into(),
            reason: "wrong SIMs".into(),
            at: at(9),
        }),
        BulkChangeEvent::DevicesCancelled(DevicesCancelled {
            bulk: bulk(),
            devices: vec![CancelledDevice {
                device: dref(&d),
                step: Step::ServiceStatus,
            }],
            at: at(10),
        }),
        BulkChangeEvent::BulkChangeCancelled(BulkChangeCancelled {
            bulk: bulk(),
            by: "ops".into(),
            reason: "wrong SIMs".into(),
            total: 3,
            processed: 1,
            failed: 1,
            cancelled: 1,
            billing_warnings: 0,
            at: at(10),
        }),
        BulkChangeEvent::FailedDevicesRetried(FailedDevicesRetried {
            bulk: bulk(),
            by: "ops".into(),
            round: 1,
            devices: vec![RetriedDevice {
                device: dref(&d),
                step: Step::DeviceStatus,
                next_attempt: 4,
            }],
            status: BulkChangeStatus::Processing,
            at: at(11),
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
    assert_eq!(names.len(), 20, "every event variant has an example");
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
