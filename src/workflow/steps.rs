//! One attempt of one step for one device: the calls, and the outcome to record.

use chrono::{DateTime, Utc};

use crate::adapters::{Failure, PondApi, RevApi};
use crate::domain::bulk_change::{DeviceState, FailureClass, StepOutcome};
use crate::domain::{BulkChangeId, DeviceChangeId, Step, TargetStatus};

/// What a dispatched attempt needs to know.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub bulk_change_id: BulkChangeId,
    pub device: DeviceState,
    /// For the Rev step: an earlier attempt may have created the service.
    pub rev_lookup: bool,
    /// For the Rev step: the POST goes out no later than this (its intent's time plus the send
    /// window), so that a worker adopting the bulk change knows when it must have ended.
    pub send_by: Option<DateTime<Utc>>,
    /// For the Rev step of a bulk change being cancelled: only look the unresolved creation up
    /// (adopt the service if it exists); never POST.
    pub resolve_only: bool,
}

impl Attempt {
    /// A Rev creation whose intent is not recorded yet (it must be, before the POST).
    pub fn needs_intent(&self) -> bool {
        !self.resolve_only
            && self.device.step == Step::RevService
            && self.device.rev_intent != Some(self.device.attempt)
    }

    /// The (device, attempt) of its Rev creation intent.
    pub fn intent(&self) -> (DeviceChangeId, u32) {
        (self.device.request.device_change_id, self.device.attempt)
    }

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

/// A Rev attempt that sent nothing: due again at once, not counted against the step's attempts.
fn not_sent(reason: String, calls: Vec<crate::domain::ApiCall>) -> StepOutcome {
    StepOutcome::Failed {
        class: FailureClass::Retryable {
            retry_after_secs: None,
            outcome_unknown: false,
            throttled: false,
            not_sent: true,
        },
        reason,
        calls,
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
pub async fn run(attempt: &Attempt, pond: &impl PondApi, rev: Option<&impl RevApi>) -> StepOutcome {
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
            // The intent of this very attempt was recorded by an earlier run, which may have sent
            // its POST: this attempt only looks. A POST, if one is needed, goes out under a new
            // intent (the next attempt), so every POST in the trail has an intent of its own.
            let lookup_only = device.rev_intent == Some(device.attempt);
            if attempt.resolve_only {
                return match rev.find_service(&number, service).await {
                    Ok((Some(id), found)) => {
                        with_products(rev, service, id, number, true, found).await
                    }
                    Ok((None, found)) => not_sent(
                        format!("cancelled: no Rev service found for {number}; none is created"),
                        found,
                    ),
                    Err(f) => failed(f),
                };
            }
            if attempt.rev_lookup || lookup_only {
                match rev.find_service(&number, service).await {
                    Ok((Some(id), found)) => {
                        return with_products(rev, service, id, number, true, found).await
                    }
                    Ok((None, found)) if lookup_only => {
                        return not_sent(
                            format!(
                                "no Rev service found for the unresolved intent of attempt {}; a new intent follows",
                                device.attempt
                            ),
                            found,
                        )
                    }
                    Ok((None, found)) => calls.extend(found),
                    Err(f) => return failed(f),
                }
            }
            if attempt.send_by.is_some_and(|by| Utc::now() > by) {
                return not_sent(
                    "Rev creation not sent within its window after the intent; a new intent follows"
                        .into(),
                    calls,
                );
            }
            match rev
                .create_service(service, &number, iccid, attempt.send_by, calls)
                .await
            {
                Ok((id, calls)) => with_products(rev, service, id, number, false, calls).await,
                Err(f) => failed(f),
            }
        }
    }
}

/// The Rev service `id` with its products (`product_ids`, when the request has them): each is
/// added unless the service has it already (looked up for an adopted service, which an earlier
/// attempt may have given some). A product that fails leaves the step retryable with its
/// outcome unknown, so the next attempt looks the service up and adds only what is missing.
async fn with_products(
    rev: &impl RevApi,
    service: &crate::domain::RevServiceRequest,
    id: i64,
    number: String,
    adopted: bool,
    mut calls: Vec<crate::domain::ApiCall>,
) -> StepOutcome {
    let incomplete = |f: Failure, mut calls: Vec<crate::domain::ApiCall>| {
        calls.extend(f.calls);
        let class = match f.class {
            FailureClass::Retryable {
                retry_after_secs,
                throttled,
                ..
            } => FailureClass::Retryable {
                retry_after_secs,
                outcome_unknown: true,
                throttled,
                not_sent: false,
            },
            other => other,
        };
        StepOutcome::Failed {
            class,
            reason: format!(
                "Rev service {id} created, but not all its products: {}",
                f.reason
            ),
            calls,
        }
    };
    if !service.product_ids.is_empty() {
        let existing = if adopted {
            match rev.find_products(id).await {
                Ok((existing, found)) => {
                    calls.extend(found);
                    existing
                }
                Err(f) => return incomplete(f, calls),
            }
        } else {
            Vec::new()
        };
        for &product in service.product_ids.iter().filter(|p| !existing.contains(p)) {
            match rev.create_product(id, product, service).await {
                Ok(call) => calls.push(call),
                Err(f) => return incomplete(f, calls),
            }
        }
    }
    StepOutcome::RevService {
        rev_service_id: id,
        number,
        adopted,
        calls,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::Utc;

    use super::*;
    use crate::domain::bulk_change::DeviceState;
    use crate::domain::{
        ApiCall, DeviceChangeId, DeviceRequest, DeviceStatus, Iccid, RevServiceRequest,
        ServiceFlag, SimStatus,
    };

    fn call(method: &str) -> ApiCall {
        ApiCall {
            method: method.into(),
            url: "http://test".into(),
            request_body: None,
            status: Some(200),
            response_body: None,
            error: None,
            retry_after_secs: None,
            request_id: None,
            started_at: Utc::now(),
            duration_ms: 1,
        }
    }

    struct FakePond {
        sim: SimStatus,
        log: Mutex<Vec<&'static str>>,
    }

    impl FakePond {
        fn new(status_of_sim: &str, status: &str, flag: ServiceFlag) -> Self {
            Self {
                sim: SimStatus {
                    status_of_sim: status_of_sim.into(),
                    status: status.into(),
                    data: flag,
                    voice: flag,
                    sms: flag,
                },
                log: Mutex::new(vec![]),
            }
        }

        fn log(&self) -> Vec<&'static str> {
            self.log.lock().unwrap().clone()
        }
    }

    impl PondApi for FakePond {
        async fn get_status(&self, _: &Iccid, _: String) -> Result<(SimStatus, ApiCall), Failure> {
            self.log.lock().unwrap().push("get");
            Ok((self.sim.clone(), call("GET")))
        }
        async fn set_service_status(
            &self,
            _: &Iccid,
            _: ServiceFlag,
            _: String,
        ) -> Result<ApiCall, Failure> {
            self.log.lock().unwrap().push("set");
            Ok(call("POST"))
        }
        async fn purge(
            &self,
            _: &Iccid,
            _: String,
            mut earlier: Vec<ApiCall>,
        ) -> Result<Vec<ApiCall>, Failure> {
            self.log.lock().unwrap().push("purge");
            earlier.push(call("DELETE"));
            Ok(earlier)
        }
    }

    struct FakeRev {
        existing: Option<i64>,
        log: Mutex<Vec<&'static str>>,
    }

    impl FakeRev {
        fn log(&self) -> Vec<&'static str> {
            self.log.lock().unwrap().clone()
        }
    }

    impl RevApi for FakeRev {
        async fn create_service(
            &self,
            _: &RevServiceRequest,
            _: &str,
            _: &Iccid,
            _: Option<DateTime<Utc>>,
            mut earlier: Vec<ApiCall>,
        ) -> Result<(i64, Vec<ApiCall>), Failure> {
            self.log.lock().unwrap().push("create");
            earlier.push(call("POST"));
            Ok((500, earlier))
        }
        async fn find_service(
            &self,
            _: &str,
            _: &RevServiceRequest,
        ) -> Result<(Option<i64>, Vec<ApiCall>), Failure> {
            self.log.lock().unwrap().push("find");
            Ok((self.existing, vec![call("GET")]))
        }
        async fn create_product(
            &self,
            _: i64,
            product: i64,
            _: &RevServiceRequest,
        ) -> Result<ApiCall, Failure> {
            self.log.lock().unwrap().push(match product {
                501 => "product 501",
                _ => "product",
            });
            Ok(call("POST"))
        }
        async fn find_products(&self, _: i64) -> Result<(Vec<i64>, Vec<ApiCall>), Failure> {
            self.log.lock().unwrap().push("find products");
            Ok((vec![501], vec![call("GET")]))
        }
    }

    fn attempt(step: Step, target: TargetStatus, ignore: bool, rev_lookup: bool) -> Attempt {
        Attempt {
            bulk_change_id: BulkChangeId::new(1).unwrap(),
            rev_lookup,
            send_by: None,
            resolve_only: false,
            device: DeviceState {
                request: DeviceRequest {
                    device_change_id: DeviceChangeId::new(2).unwrap(),
                    iccid: Iccid::parse("8901000000000000001").unwrap(),
                    msisdn: None,
                    target_status: target,
                    is_ignore_current_status: ignore,
                    post_update_status_id: None,
                    rev_service: Some(std::sync::Arc::new(RevServiceRequest {
                        customer_id: "1".into(),
                        provider_id: 1,
                        service_type_id: 2,
                        usage_plan_group_id: None,
                        package_id: None,
                        effective_date: None,
                        activated_date: None,
                        product_ids: vec![],
                    })),
                },
                status: DeviceStatus::Processing,
                step,
                attempt: 1,
                due_at: None,
                rev_intent: None,
                rev_outcome_unknown: false,
                rev_unresolved_since: None,
                throttles: 0,
                outage_attempts: 0,
                round: 0,
                round_base: 0,
            },
        }
    }

    const NO_REV: Option<&FakeRev> = None;

    #[tokio::test]
    async fn a_terminated_sim_cannot_be_changed() {
        let pond = FakePond::new("Terminated", "SUSPENDED", ServiceFlag::Disabled);
        let out = run(
            &attempt(Step::DeviceStatus, TargetStatus::Active, false, false),
            &pond,
            NO_REV,
        )
        .await;
        assert!(
            matches!(&out, StepOutcome::Failed { class: FailureClass::Permanent, reason, .. } if reason.contains("Terminated")),
            "{out:?}"
        );
        assert_eq!(pond.log(), vec!["get"]);
    }

    #[tokio::test]
    async fn terminating_purges_and_keeps_both_calls() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let out = run(
            &attempt(Step::DeviceStatus, TargetStatus::Terminated, false, false),
            &pond,
            NO_REV,
        )
        .await;
        assert!(
            matches!(&out, StepOutcome::DeviceStatus { already_at_target: false, calls, .. } if calls.len() == 2)
        );
        assert_eq!(pond.log(), vec!["get", "purge"]);
    }

    #[tokio::test]
    async fn a_sim_at_target_is_reported_without_writing() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let out = run(
            &attempt(Step::DeviceStatus, TargetStatus::Active, false, false),
            &pond,
            NO_REV,
        )
        .await;
        assert!(matches!(
            out,
            StepOutcome::DeviceStatus {
                already_at_target: true,
                ..
            }
        ));
        assert_eq!(pond.log(), vec!["get"]);
    }

    #[tokio::test]
    async fn service_status_sets_the_flag_of_the_target() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let out = run(
            &attempt(Step::ServiceStatus, TargetStatus::Suspended, false, false),
            &pond,
            NO_REV,
        )
        .await;
        assert!(matches!(
            out,
            StepOutcome::ServiceStatus {
                flag: ServiceFlag::Disabled,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn an_unknown_earlier_outcome_is_looked_up_and_adopted() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: Some(77),
            log: Mutex::new(vec![]),
        };
        let out = run(
            &attempt(Step::RevService, TargetStatus::Active, false, true),
            &pond,
            Some(&rev),
        )
        .await;
        assert!(matches!(
            out,
            StepOutcome::RevService {
                rev_service_id: 77,
                adopted: true,
                ..
            }
        ));
        assert_eq!(*rev.log.lock().unwrap(), vec!["find"], "no second POST");
    }

    fn with_products(mut a: Attempt) -> Attempt {
        if let Some(rev) = a.device.request.rev_service.as_mut() {
            std::sync::Arc::make_mut(rev).product_ids = vec![501, 502];
        }
        a
    }

    #[tokio::test]
    async fn a_new_service_gets_each_of_its_products() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: None,
            log: Mutex::new(vec![]),
        };
        let a = with_products(attempt(
            Step::RevService,
            TargetStatus::Active,
            false,
            false,
        ));
        let out = run(&a, &pond, Some(&rev)).await;
        assert!(
            matches!(&out, StepOutcome::RevService { rev_service_id: 500, adopted: false, calls, .. } if calls.len() == 3),
            "{out:?}"
        );
        assert_eq!(rev.log(), vec!["create", "product 501", "product"]);
    }

    #[tokio::test]
    async fn an_adopted_service_gets_only_the_products_it_lacks() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: Some(77),
            log: Mutex::new(vec![]),
        };
        let a = with_products(attempt(Step::RevService, TargetStatus::Active, false, true));
        let out = run(&a, &pond, Some(&rev)).await;
        assert!(
            matches!(
                &out,
                StepOutcome::RevService {
                    rev_service_id: 77,
                    adopted: true,
                    ..
                }
            ),
            "{out:?}"
        );
        // Product 501 is there already (an earlier attempt added it): only 502 is added.
        assert_eq!(rev.log(), vec!["find", "find products", "product"]);
    }

    #[tokio::test]
    async fn a_lookup_that_finds_nothing_creates_the_service() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: None,
            log: Mutex::new(vec![]),
        };
        let out = run(
            &attempt(Step::RevService, TargetStatus::Active, false, true),
            &pond,
            Some(&rev),
        )
        .await;
        assert!(
            matches!(&out, StepOutcome::RevService { rev_service_id: 500, adopted: false, calls, .. } if calls.len() == 2)
        );
        assert_eq!(*rev.log.lock().unwrap(), vec!["find", "create"]);
    }

    #[tokio::test]
    async fn an_intent_left_by_an_earlier_run_is_only_looked_up() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: None,
            log: Mutex::new(vec![]),
        };
        let mut a = attempt(Step::RevService, TargetStatus::Active, false, true);
        a.device.rev_intent = Some(1);
        let out = run(&a, &pond, Some(&rev)).await;
        assert!(
            matches!(
                &out,
                StepOutcome::Failed {
                    class: FailureClass::Retryable { not_sent: true, outcome_unknown: false, .. },
                    calls,
                    ..
                } if calls.len() == 1
            ),
            "{out:?}"
        );
        assert_eq!(
            *rev.log.lock().unwrap(),
            vec!["find"],
            "no POST under an old intent"
        );
    }

    #[tokio::test]
    async fn a_creation_past_its_send_window_is_not_sent() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: None,
            log: Mutex::new(vec![]),
        };
        let mut a = attempt(Step::RevService, TargetStatus::Active, false, false);
        a.send_by = Some(Utc::now() - chrono::Duration::seconds(1));
        let out = run(&a, &pond, Some(&rev)).await;
        assert!(
            matches!(
                &out,
                StepOutcome::Failed {
                    class: FailureClass::Retryable { not_sent: true, .. },
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(rev.log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_first_attempt_creates_without_lookup() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let rev = FakeRev {
            existing: Some(1),
            log: Mutex::new(vec![]),
        };
        run(
            &attempt(Step::RevService, TargetStatus::Active, false, false),
            &pond,
            Some(&rev),
        )
        .await;
        assert_eq!(*rev.log.lock().unwrap(), vec!["create"]);
    }

    #[tokio::test]
    async fn missing_rev_credentials_are_systemic() {
        let pond = FakePond::new("In-Service", "ACTIVE", ServiceFlag::Enabled);
        let out = run(
            &attempt(Step::RevService, TargetStatus::Active, false, false),
            &pond,
            NO_REV,
        )
        .await;
        assert!(matches!(
            out,
            StepOutcome::Failed {
                class: FailureClass::Systemic,
                ..
            }
        ));
    }
}
