//! Given/When/Then tests of every command and every rejection, and JSON snapshots of every event,
//! by behaviour: intake (accept, start), the carrier steps, Rev creation, failures and retries,
//! completion and pausing, and the events' stored forms. The fixtures they share are here.

mod carrier_steps;
mod completion;
mod events;
mod failures;
mod intake;
mod operator;
mod rev;

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;

use super::*;
use crate::domain::api_call::ApiCall;
use crate::domain::ids::{
    BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId,
};
use crate::domain::policy::{Policy, RetryPolicy, WorkflowRef};
use crate::domain::request::{BulkChangeRequest, DeviceRequest, Origin, RevServiceRequest};
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
        post_update_status_id: None,
        rev_service: rev.then(|| {
            std::sync::Arc::new(RevServiceRequest {
                customer_id: "4411".into(),
                provider_id: 3,
                service_type_id: 4,
                usage_plan_group_id: Some(5),
                package_id: None,
                effective_date: None,
                activated_date: None,
                product_ids: vec![],
            })
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
        origin: Origin::Submitted,
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
            origin: Origin::Submitted,
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

/// The events recording `reports` at `at` adds to `given`.
fn recorded(
    given: Vec<BulkChangeEvent>,
    reports: Vec<StepReport>,
    at: DateTime<Utc>,
) -> Vec<BulkChangeEvent> {
    Given::with(())
        .given(given)
        .when(BulkChangeCommand::RecordResults { reports, at })
        .inspect_result()
        .unwrap()
}

/// A retry of `d`'s `step` after `attempt` failed with a 503 at 2 s, due at 3 s; a test sets
/// the fields it is about.
fn retry_of(d: &DeviceRequest, step: Step, attempt: u32) -> DeviceStepRetryScheduled {
    DeviceStepRetryScheduled {
        bulk: bulk(),
        device: dref(d),
        step,
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

fn at_rev_step(d: &DeviceRequest) -> Vec<BulkChangeEvent> {
    let mut e = started(std::slice::from_ref(d));
    e.push(status_updated(d));
    e.push(service_updated(d));
    e
}
