//! One attempt of one step for one device: the calls, and the outcome to record.

use crate::adapters::pond::PondClient;
use crate::adapters::rev::RevClient;
use crate::adapters::Failure;
use crate::domain::bulk_change::{DeviceState, FailureClass, StepOutcome};
use crate::domain::{BulkChangeId, Step, TargetStatus};

/// What a dispatched attempt needs to know.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub bulk_change_id: BulkChangeId,
    pub device: DeviceState,
    /// For the Rev step: an earlier attempt may have created the service.
    pub rev_lookup: bool,
}

impl Attempt {
    /// `RequestId` sent to POND: stable per device, step and attempt (a correlation id).
    fn request_id(&self) -> String {
        format!(
            "bulkflow-{}-{}-{}-{}",
            self.bulk_change_id,
            self.device.request.device_change_id,
            self.device.step,
            self.device.attempt
        )
    }
}

fn failed(f: Failure) -> StepOutcome {
    StepOutcome::Failed {
        class: f.class,
        reason: f.reason,
        calls: f.calls,
    }
}

/// Runs the device's current step once.
pub async fn run(attempt: &Attempt, pond: &PondClient, rev: Option<&RevClient>) -> StepOutcome {
    let device = &attempt.device;
    let iccid = &device.request.iccid;
    let target = device.request.target_status;
    match device.step {
        Step::DeviceStatus => {
            let (sim, get) = match pond.get_status(iccid, attempt.request_id()).await {
                Ok(ok) => ok,
                Err(f) => return failed(f),
            };
            let at_target = sim.is_at(target);
            if at_target
                && (!device.request.is_ignore_current_status || target == TargetStatus::Terminated)
            {
                return StepOutcome::DeviceStatus {
                    from: sim,
                    already_at_target: true,
                    calls: vec![get],
                };
            }
            if sim.is_terminated() {
                return StepOutcome::Failed {
                    class: FailureClass::Permanent,
                    reason: format!("SIM {iccid} is Terminated and cannot be changed"),
                    calls: vec![get],
                };
            }
            if target == TargetStatus::Terminated {
                return match pond.purge(iccid, attempt.request_id(), vec![get]).await {
                    Ok(calls) => StepOutcome::DeviceStatus {
                        from: sim,
                        already_at_target: false,
                        calls,
                    },
                    Err(f) => failed(f),
                };
            }
            StepOutcome::DeviceStatus {
                from: sim,
                already_at_target: at_target,
                calls: vec![get],
            }
        }
        Step::ServiceStatus => {
            let flag = target.service_flag();
            match pond
                .set_service_status(iccid, flag, attempt.request_id())
                .await
            {
                Ok(call) => StepOutcome::ServiceStatus { flag, call },
                Err(f) => failed(f),
            }
        }
        Step::RevService => {
            let Some(service) = &device.request.rev_service else {
                return StepOutcome::Failed {
                    class: FailureClass::Permanent,
                    reason: "no Rev service requested for this device".into(),
                    calls: vec![],
                };
            };
            let Some(rev) = rev else {
                return StepOutcome::Failed {
                    class: FailureClass::Systemic,
                    reason: "no Rev credentials configured for this service provider".into(),
                    calls: vec![],
                };
            };
            let number = device.rev_number();
            let mut calls = vec![];
            if attempt.rev_lookup {
                match rev.find_service(&number).await {
                    Ok((Some(id), call)) => {
                        return StepOutcome::RevService {
                            rev_service_id: id,
                            number,
                            adopted: true,
                            calls: vec![call],
                        }
                    }
                    Ok((None, call)) => calls.push(call),
                    Err(f) => return failed(f),
                }
            }
            match rev.create_service(service, &number, iccid, calls).await {
                Ok((id, calls)) => StepOutcome::RevService {
                    rev_service_id: id,
                    number,
                    adopted: false,
                    calls,
                },
                Err(f) => failed(f),
            }
        }
    }
}
