//! Projection == fold(events): random valid histories (retries, throttling, carrier failures,
//! Rev failures, pauses, completion), driven through the real aggregate and store, give live
//! read models equal to their re-derivation from the events and to a full rebuild, on
//! PostgreSQL and SQLite.

use bulkflow::domain::bulk_change::{BulkChangeCommand, FailureClass, StepOutcome, StepReport};
use bulkflow::domain::{ApiCall, BulkChangeId, ServiceFlag, SimStatus, Step, TargetStatus};
use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::FaultProfile;
use chrono::Utc;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use crate::helpers::{Backend, TestApp};
use crate::on_both_stores;

/// What happens at one step: `retries` retryable failures (throttled or not), then success or
/// a permanent failure.
#[derive(Debug, Clone)]
struct StepPlan {
    retries: Vec<bool>,
    fails: bool,
}

#[derive(Debug, Clone)]
struct Plan {
    devices: u32,
    steps: Vec<[StepPlan; 3]>,
    batch: usize,
    pause_after: Option<usize>,
}

fn step_plan() -> impl Strategy<Value = StepPlan> {
    (
        prop::collection::vec(any::<bool>(), 0..6),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(retries, fails)| StepPlan { retries, fails })
}

fn plan() -> impl Strategy<Value = Plan> {
    (3u32..25).prop_flat_map(|devices| {
        (
            Just(devices),
            prop::collection::vec([step_plan(), step_plan(), step_plan()], devices as usize),
            1usize..8,
            prop::option::of(0usize..10),
        )
            .prop_map(|(devices, steps, batch, pause_after)| Plan {
                devices,
                steps,
                batch,
                pause_after,
            })
    })
}

fn call(status: u16) -> ApiCall {
    ApiCall {
        method: "POST".into(),
        url: "http://carrier.test/x".into(),
        request_body: None,
        status: Some(status),
        response_body: Some(format!(r#"{{"status":{status},"code":"C{status}"}}"#)),
        error: None,
        retry_after_secs: (status == 429).then_some(1),
        request_id: None,
        started_at: Utc::now(),
        duration_ms: 3,
    }
}

fn outcome(step: Step, target: TargetStatus) -> StepOutcome {
    match step {
        Step::DeviceStatus => StepOutcome::DeviceStatus {
            from: SimStatus {
                status_of_sim: "In-Service".into(),
                status: "SUSPENDED".into(),
                data: ServiceFlag::Disabled,
                voice: ServiceFlag::Disabled,
                sms: ServiceFlag::Disabled,
            },
            already_at_target: target == TargetStatus::Suspended,
            calls: vec![call(200)],
        },
        Step::ServiceStatus => StepOutcome::ServiceStatus {
            flag: target.service_flag(),
            call: call(204),
        },
        Step::RevService => StepOutcome::RevService {
            rev_service_id: 4242,
            number: "1".into(),
            adopted: false,
            calls: vec![call(201)],
        },
    }
}

/// Retries (one throttled) at every step, a carrier failure, a Rev failure, Rev retries
/// exhausted, and a pause.
fn covering_plan() -> Plan {
    let ok = || StepPlan {
        retries: vec![false, true],
        fails: false,
    };
    let mut steps: Vec<[StepPlan; 3]> = (0..13).map(|_| [ok(), ok(), ok()]).collect();
    steps[3][0].fails = true; // a carrier failure at the device status step
    steps[7][2].fails = true; // a Rev failure (devices 7 and 12 ask for a Rev service)
    steps[2][0].retries = vec![false; 6]; // device-status retries exhausted
    Plan {
        devices: 13,
        steps,
        batch: 3,
        pause_after: Some(2),
    }
}

/// Drives one bulk change through `plan` with commands, as a runner would.
async fn drive(app: &TestApp, id: i64, plan: &Plan) -> BulkChangeId {
    let request = demo_request(id, plan.devices);
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    let exec = |c: BulkChangeCommand| async move {
        app.engine.store.execute(id, c, "prop").await.unwrap()
    };
    exec(BulkChangeCommand::Start {
        worker: "prop".into(),
        at: Utc::now(),
    })
    .await;
    let mut cursor: Vec<usize> = vec![0; request.devices.len()];
    let mut round = 0;
    loop {
        let open: Vec<_> = app
            .engine
            .store
            .inspect(id, |b| {
                b.devices()
                    .iter()
                    .filter(|d| !d.is_final())
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap();
        if open.is_empty() {
            break;
        }
        round += 1;
        if plan.pause_after == Some(round) {
            exec(BulkChangeCommand::Pause {
                reason: "401 from POND".into(),
                at: Utc::now(),
            })
            .await;
            exec(BulkChangeCommand::Resume {
                by: "ops".into(),
                at: Utc::now(),
            })
            .await;
        }
        let batch: Vec<_> = open.into_iter().take(plan.batch).collect();
        let intents: Vec<_> = batch
            .iter()
            .filter(|d| d.step == Step::RevService && d.rev_intent != Some(d.attempt))
            .map(|d| (d.request.device_change_id, d.attempt))
            .collect();
        if !intents.is_empty() {
            exec(BulkChangeCommand::BeginRevCreations {
                devices: intents,
                at: Utc::now(),
            })
            .await;
        }
        let reports = batch
            .iter()
            .map(|d| {
                let index = (d.request.device_change_id.get() - id.get() * 10_000_000 - 1) as usize;
                let step_plan = &plan.steps[index][d.step as usize];
                let k = cursor[index];
                cursor[index] += 1;
                let outcome = if let Some(&throttled) = step_plan.retries.get(k) {
                    StepOutcome::Failed {
                        class: FailureClass::Retryable {
                            retry_after_secs: throttled.then_some(1),
                            outcome_unknown: d.step == Step::RevService && !throttled,
                            throttled,
                            not_sent: false,
                        },
                        reason: if throttled {
                            "429".into()
                        } else {
                            "503 busy".into()
                        },
                        calls: vec![call(if throttled { 429 } else { 503 })],
                    }
                } else if step_plan.fails {
                    StepOutcome::Failed {
                        class: FailureClass::Permanent,
                        reason: "400 no".into(),
                        calls: vec![call(400)],
                    }
                } else {
                    outcome(d.step, d.request.target_status)
                };
                StepReport {
                    device_change_id: d.request.device_change_id,
                    step: d.step,
                    attempt: d.attempt,
                    outcome,
                }
            })
            .collect::<Vec<_>>();
        // A device moving to its next step starts that step's plan afresh.
        for r in &reports {
            let index = (r.device_change_id.get() - id.get() * 10_000_000 - 1) as usize;
            let done = !matches!(r.outcome, StepOutcome::Failed { .. });
            if done {
                cursor[index] = 0;
            }
        }
        exec(BulkChangeCommand::RecordResults {
            reports,
            at: Utc::now(),
        })
        .await;
    }
    exec(BulkChangeCommand::Complete { at: Utc::now() }).await;
    id
}

async fn projection_equals_fold(backend: Backend) {
    let app = TestApp::start(backend, FaultProfile::None).await;
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: 12,
        ..Default::default()
    });
    let strategy = plan();
    let mut ids = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for case in 0..16 {
        // The first history is written out so that every path is always covered; the others
        // are random.
        let plan = if case == 0 {
            covering_plan()
        } else {
            strategy.new_tree(&mut runner).unwrap().current()
        };
        let id = drive(&app, 800 + case, &plan).await;
        app.engine.projector.catch_up().await.unwrap();
        let expected = bulkflow::projections::verify::expected(&app.engine.store, id)
            .await
            .unwrap();
        let live = bulkflow::projections::verify::live(&app.db, id)
            .await
            .unwrap();
        let diff = bulkflow::projections::verify::diff(&expected, &live);
        assert!(diff.is_empty(), "plan {plan:?}\n{}", diff.join("\n"));
        for e in app.events(id).await {
            *seen.entry(e.name()).or_insert(0) += 1;
        }
        if case == 0 {
            for name in [
                "RevServiceCreated",
                "RevServiceFailed",
                "DeviceFailed",
                "BulkChangePaused",
            ] {
                assert!(
                    seen.contains_key(name),
                    "the covering history has no {name}: {seen:?}"
                );
            }
        }
        ids.push((id, live));
    }
    // The generated histories cover the interesting paths.
    for name in [
        "DeviceStepRetryScheduled",
        "DeviceFailed",
        "RevServiceFailed",
        "RevServiceCreated",
        "BulkChangePaused",
        "BulkChangeCompleted",
    ] {
        assert!(
            seen.get(name).copied().unwrap_or(0) > 0,
            "no {name} in {seen:?}"
        );
    }
    // And a full rebuild reproduces every live row.
    bulkflow::projections::rebuild::rebuild(&app.db, None, |_, _| {})
        .await
        .unwrap();
    for (id, live) in ids {
        assert_eq!(
            bulkflow::projections::verify::live(&app.db, id)
                .await
                .unwrap(),
            live
        );
    }
}
on_both_stores!(
    live_projections_equal_a_fold_of_random_histories,
    projection_equals_fold
);
