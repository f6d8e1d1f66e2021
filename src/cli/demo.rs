//! `bulkflow demo`: the main job end to end on the embedded default, with nothing to install:
//! a SQLite file, the local durable queue, and the simulator in-process on loopback.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::app::{Engine, WorkOptions};
use crate::config::Config;
use crate::projections::read::{bulk_summary, max_bulk_change_id};
use crate::sim::fixtures::{configure_for_simulator, demo_request};
use crate::sim::{FaultProfile, SimAuth, Simulator};
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

pub async fn run(args: Args, config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config_path)?;
    config.database_url = format!("sqlite://{}", args.db.display()).into();
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
    let options = WorkOptions {
        exit_when_idle: true,
        concurrency: 1,
        ..WorkOptions::default()
    };
    let queue = Arc::new(engine.queue.clone());
    let worked = engine
        .work(&queue, &cancel, options, Some(progress.clone()))
        .await;
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
        .ok_or_else(|| {
            anyhow::anyhow!("bulk change {bulk_change_id} missing from the read model")
        })?;
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
        println!(
            "    BULKFLOW_DATABASE_URL=sqlite://{} bulkflow status {bulk_change_id}",
            args.db.display()
        );
        println!("    sqlite3 {} 'SELECT status, COUNT(*) FROM m2m_device_change WHERE bulk_change_id = {bulk_change_id} GROUP BY status'", args.db.display());
    }
    Ok(ExitCode::SUCCESS)
}
