//! Ready-made requests and configuration for running against the simulator (demo, tests,
//! benchmarks).

use secrecy::SecretString;

use super::SimAuth;
use crate::config::{Config, PondCredentials, RevCredentials};
use crate::domain::{
    BulkChangeId, BulkChangeRequest, DeviceChangeId, DeviceRequest, Iccid, Msisdn,
    RevServiceRequest, ServiceProviderId, TargetStatus, TenantId,
};
use crate::workflow::definition::Limits;

/// The demo's service provider; the simulator's credentials are configured for it.
pub const PROVIDER: i64 = 12;

/// A request of `n` devices: most to Active (a fifth of those with a Rev service), some
/// Suspended, a few Terminated. Ids derive from the bulk change id so runs never collide.
pub fn demo_request(bulk_change_id: i64, n: u32) -> BulkChangeRequest {
    let devices = (0..i64::from(n))
        .map(|i| {
            let target = match i % 20 {
                0 => TargetStatus::Terminated,
                1..=5 => TargetStatus::Suspended,
                _ => TargetStatus::Active,
            };
            let rev = target == TargetStatus::Active && i % 5 == 2;
            DeviceRequest {
                device_change_id: DeviceChangeId::new(bulk_change_id * 10_000_000 + i + 1)
                    .expect("positive"),
                iccid: Iccid::parse(&format!("8901{:06}{:09}", bulk_change_id % 1_000_000, i))
                    .expect("valid ICCID"),
                msisdn: Some(
                    Msisdn::parse(&format!("1{:03}{:07}", bulk_change_id % 1_000, i))
                        .expect("valid MSISDN"),
                ),
                target_status: target,
                is_ignore_current_status: false,
                post_update_status_id: None,
                rev_service: rev.then(|| {
                    std::sync::Arc::new(RevServiceRequest {
                        customer_id: "1001".into(),
                        provider_id: 7,
                        service_type_id: 3,
                        usage_plan_group_id: Some(11),
                        package_id: None,
                        effective_date: None,
                        activated_date: None,
                        product_ids: vec![],
                    })
                }),
            }
        })
        .collect();
    BulkChangeRequest {
        bulk_change_id: BulkChangeId::new(bulk_change_id).expect("positive"),
        tenant_id: TenantId::new(1).expect("positive"),
        service_provider_id: ServiceProviderId::new(PROVIDER).expect("positive"),
        change_request_type: "StatusUpdate".into(),
        integration: "Pond".into(),
        requested_by: Some("bulkflow demo".into()),
        origin: Default::default(),
        devices,
    }
}

/// `n` devices, every one going Active with a Rev service: three carrier/billing calls each (the
/// billable case).
pub fn billable_request(bulk_change_id: i64, n: u32) -> BulkChangeRequest {
    let mut request = demo_request(bulk_change_id, n);
    for d in &mut request.devices {
        d.target_status = TargetStatus::Active;
        d.rev_service = Some(std::sync::Arc::new(RevServiceRequest {
            customer_id: "2002".into(),
            provider_id: 7,
            service_type_id: 3,
            usage_plan_group_id: None,
            package_id: None,
            effective_date: None,
            activated_date: None,
            product_ids: vec![],
        }));
    }
    request
}

/// The `BULKFLOW_*` variables that point a `bulkflow` process at a simulator listening on
/// `base` (credentials only; limits and the database are the caller's).
pub fn simulator_env(base: &str, auth: &SimAuth) -> Vec<(&'static str, String)> {
    let (user, client_code) = auth
        .rev_user
        .split_once('@')
        .unwrap_or((&auth.rev_user, ""));
    vec![
        (
            "BULKFLOW_POND_BASE_URL",
            format!("{base}/ds/u/distributorPPUService/v1"),
        ),
        ("BULKFLOW_POND_DISTRIBUTOR_ID", auth.distributor_id.clone()),
        ("BULKFLOW_POND_API_KEY", auth.api_key.clone()),
        ("BULKFLOW_REV_BASE_URL", base.to_string()),
        ("BULKFLOW_REV_USERNAME", user.to_string()),
        ("BULKFLOW_REV_CLIENT_CODE", client_code.to_string()),
        ("BULKFLOW_REV_PASSWORD", auth.rev_password.clone()),
        (
            "BULKFLOW_REV_SUBSCRIPTION_KEY",
            auth.rev_subscription_key.clone(),
        ),
    ]
}

/// Points a configuration at a simulator listening on `base`.
pub fn configure_for_simulator(config: &mut Config, base: &str, auth: &SimAuth) {
    let (user, client_code) = auth
        .rev_user
        .split_once('@')
        .unwrap_or((&auth.rev_user, ""));
    config.pond.default = PondCredentials {
        base_url: Some(format!("{base}/ds/u/distributorPPUService/v1")),
        distributor_id: Some(auth.distributor_id.clone()),
        api_key: Some(SecretString::from(auth.api_key.clone())),
        write_enabled: Some(true),
    };
    config.pond.providers.clear();
    config.rev.default = RevCredentials {
        base_url: Some(base.to_string()),
        username: Some(user.to_string()),
        client_code: Some(client_code.to_string()),
        password: Some(SecretString::from(auth.rev_password.clone())),
        subscription_key: Some(SecretString::from(auth.rev_subscription_key.clone())),
    };
    config.rev.providers.clear();
    // The simulator is not the real carrier: let the engine run at the machine's pace, and time
    // out before the simulator's 1.5 s hangs answer.
    config.limits.pond = Some(Limits {
        rate_per_second: 5_000.0,
        burst: 200,
        max_concurrency: 64,
        timeout_ms: 1_000,
        breaker: Default::default(),
        max_calls_per_day: None,
    });
    config.limits.rev = Some(Limits {
        rate_per_second: 5_000.0,
        burst: 200,
        max_concurrency: 32,
        timeout_ms: 1_000,
        breaker: Default::default(),
        max_calls_per_day: None,
    });
}
