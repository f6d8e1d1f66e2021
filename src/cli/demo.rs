//! `bulkflow demo`: the main job end to end on the embedded default, with nothing to install:
//! a SQLite file, the local durable queue, and the simulator in-process on loopback.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::json;

use crate::app::Engine;
use crate::config::{Config, PondCredentials, RevCredentials};
use crate::domain::{
    BulkChangeId, BulkChangeRequest, DeviceChangeId, DeviceRequest, Iccid, Msisdn,
    RevServiceRequest, ServiceProviderId, TargetStatus, TenantId,
};
use crate::projections::read::{bulk_summary, max_bulk_change_id};
use crate::sim::{FaultProfile, SimAuth, Simulator};
use crate::workflow::definition::Limits;
use crate::workflow::Progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Devices in the bulk change.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,
    /// Simulator fault profile: none or flaky.
    #[arg(long, default_value = "none")]
    pub faults: FaultProfile,
    /// SQLite file holding the events, read models and queue.
    #[arg(long, default_value = "bulkflow-demo.db")]
    pub db: PathBuf,
    /// Seed of the simulator's random faults.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// The demo's service provider; the simulator's credentials are configured for it.
const PROVIDER: i64 = 12;

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
                    Msisdn::parse(&format!("1{:03}{:07}", bulk_change_id % 1_000, i)).expect("valid MSISDN"),
                ),
                target_status: target,
                is_ignore_current_status: false,
                rev_service: rev.then(|| RevServiceRequest {
                    customer_id: "DEMO-CUSTOMER".into(),
                    provider_id: 7,
                    service_type_id: 3,
                    usage_plan_group_id: Some(11),
                    package_id: None,
                    effective_date: None,
                    activated_date: None,
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
        devices,
    }
}

/// Points a configuration at a simulator listening on `base`.
pub fn configure_for_simulator(config: &mut Config, base: &str, auth: &SimAuth) {
    let (user, client_code) = auth.rev_user.split_once('@').unwrap_or((&auth.rev_user, ""));
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
    });
    config.limits.rev = Some(Limits {
        rate_per_second: 5_000.0,
        burst: 200,
        max_concurrency: 32,
        timeout_ms: 1_000,
    });
}

pub async fn run(args: Args, config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config_path)?;
    config.database_url = format!("sqlite://{}", args.db.display());
    if config.worker_id.starts_with("bulkflow-") {
        config.worker_id = "bulkflow-demo".into();
    }
    let sim = Simulator::new(SimAuth::default(), args.faults, args.seed);
    let (addr, server) = sim.start("127.0.0.1:0").await?;
    configure_for_simulator(&mut config, &format!("http://{addr}"), sim.auth());

    let engine = Arc::new(Engine::build(config).await?);
    let id = max_bulk_change_id(&engine.db).await? + 1;
    let request = demo_request(id, args.devices);
    let started = Instant::now();
    let bulk_change_id = engine.submit(request, true).await?;

    let cancel = super::shutdown_token();
    let projections = tokio::spawn(engine.projector.clone().run(cancel.child_token()));
    let progress = Arc::new(Progress::default());
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(u64::from(args.devices));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} devices ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let bar2 = bar.clone();
        let p = progress.clone();
        tokio::spawn(async move {
            loop {
                bar2.set_position(p.finished.load(Ordering::Relaxed) as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        bar
    });
    let worked = engine.work(&cancel, true, Some(&progress)).await;
    let elapsed = started.elapsed();
    if let Some(bar) = &bar {
        bar.set_position(progress.finished.load(Ordering::Relaxed) as u64);
        bar.finish();
    }
    worked?;
    engine.projector.catch_up().await?;
    cancel.cancel();
    let _ = projections.await;
    let report = sim.report();
    server.abort();

    let summary = bulk_summary(&engine.db, bulk_change_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("bulk change {bulk_change_id} missing from the read model"))?;
    let final_count: i64 = summary
        .devices_by_status
        .iter()
        .filter(|(s, _)| matches!(s.as_str(), "PROCESSED" | "API_FAILED" | "ERROR"))
        .map(|(_, n)| n)
        .sum();
    let per_sec = f64::from(args.devices) / elapsed.as_secs_f64().max(1e-9);
    if args.json {
        let out = json!({
            "bulk_change_id": bulk_change_id.get(),
            "status": summary.status,
            "devices": args.devices,
            "processed": summary.processed,
            "failed": summary.failed,
            "billing_warnings": summary.billing_warnings,
            "final": final_count,
            "devices_by_status": summary.devices_by_status,
            "elapsed_ms": elapsed.as_millis() as u64,
            "devices_per_second": (per_sec * 10.0).round() / 10.0,
            "faults": format!("{:?}", args.faults).to_lowercase(),
            "database": args.db.display().to_string(),
            "rev_duplicate_numbers": report.rev_duplicate_numbers,
            "simulator": report,
        });
        println!("{out}");
    } else {
        println!("bulk change {bulk_change_id}: {}", summary.status);
        if let Some(details) = &summary.status_details {
            println!("  {details}");
        }
        println!("  devices by status:");
        for (status, count) in &summary.devices_by_status {
            println!("    {status:<12} {count}");
        }
        println!(
            "  elapsed {:.2} s, {per_sec:.0} devices/s (faults: {:?})",
            elapsed.as_secs_f64(),
            args.faults
        );
        println!(
            "  simulator: {} POND calls, {} Rev services created, {} numbers with duplicate Rev services, {} faults injected",
            report.pond_calls, report.rev_creates, report.rev_duplicate_numbers, report.faults_injected
        );
        println!("  data: {} (SQLite). Inspect it with:", args.db.display());
        println!("    bulkflow status {bulk_change_id} --config /dev/null  # with BULKFLOW_DATABASE_URL=sqlite://{}", args.db.display());
        println!("    sqlite3 {} 'SELECT status, COUNT(*) FROM m2m_device_change WHERE bulk_change_id = {bulk_change_id} GROUP BY status'", args.db.display());
    }
    Ok(ExitCode::SUCCESS)
}
