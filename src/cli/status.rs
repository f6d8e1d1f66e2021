use std::process::ExitCode;

use crate::config::Config;
use crate::domain::BulkChangeId;
use crate::projections::read::bulk_summary;
use crate::store::Db;
use secrecy::ExposeSecret;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: BulkChangeId,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(config.database_url.expose_secret(), 2).await?;
    db.migrate().await?;
    let Some(summary) = bulk_summary(&db, args.id).await? else {
        eprintln!(
            "bulk change {} is not known (or its projection has not caught up yet)",
            args.id
        );
        return Ok(super::exit::not_found());
    };
    let limits = crate::workflow::limits::store::accounts(&db).await?;
    if args.json {
        let now = chrono::Utc::now();
        let mut json = serde_json::to_value(&summary)?;
        json["limits"] = serde_json::to_value(&limits)?;
        json["devices_per_second"] = serde_json::to_value(summary.rate(now))?;
        json["eta_seconds"] = serde_json::to_value(summary.eta_secs(now))?;
        println!("{json}");
    } else {
        println!("bulk change {}: {}", summary.bulk_change_id, summary.status);
        if let Some(details) = &summary.status_details {
            println!("  {details}");
        }
        println!(
            "  workflow:  {} ({})",
            summary.workflow,
            &summary.workflow_hash[..12.min(summary.workflow_hash.len())]
        );
        println!(
            "  devices:   {} total, {} processed, {} failed, {} cancelled, {} billing warnings",
            summary.total,
            summary.processed,
            summary.failed,
            summary.cancelled,
            summary.billing_warnings
        );
        let now = chrono::Utc::now();
        let percent = if summary.total > 0 {
            100.0 * summary.finished() as f64 / summary.total as f64
        } else {
            100.0
        };
        let mut progress = format!(
            "  progress:  {percent:.1} % ({} of {})",
            summary.finished(),
            summary.total
        );
        if let Some(rate) = summary.rate(now) {
            progress += &format!(", {rate:.1} devices/s");
        }
        if let Some(eta) = summary.eta_secs(now) {
            progress += &format!(", about {} left", human_secs(eta));
        }
        println!("{progress}");
        match &summary.driving_worker {
            Some(worker) => println!("  driven by: {worker}"),
            None if summary.processed_date.is_none() => {
                println!("  driven by: no worker holds it now")
            }
            None => {}
        }
        for (status, count) in &summary.devices_by_status {
            println!("    {status:<12} {count}");
        }
        println!("  created:   {}", summary.created_date.to_rfc3339());
        if let Some(done) = summary.processed_date {
            println!("  processed: {}", done.to_rfc3339());
        }
        print_limits(&db, &limits);
    }
    Ok(ExitCode::SUCCESS)
}

/// The carrier accounts' shared limits: the learned rate against the configured one.
fn print_limits(db: &Db, limits: &[crate::workflow::limits::store::AccountView]) {
    if matches!(db, Db::Sqlite(_)) {
        println!("  limits:    kept in the worker's memory (embedded mode); see its log");
        return;
    }
    if limits.is_empty() {
        return;
    }
    println!("  limits (shared by every worker, per carrier account):");
    for a in limits {
        let mut line = format!(
            "    {:<24} {:.1}/s of {:.1}/s configured",
            a.key, a.rate, a.configured_rate
        );
        if a.throttled > 0 {
            line += &format!(", {} 429s ({} cuts)", a.throttled, a.lowered);
        }
        if a.held_for_secs > 0.0 {
            line += &format!(", held {:.1} s more", a.held_for_secs);
        }
        if let (Some(per_day), Some(left)) = (a.max_calls_per_day, a.calls_left_today) {
            line += &format!(", {left} of {per_day} calls a day left today (UTC)");
            if left == 0 {
                line += ": waiting for the next day";
            }
        }
        line += &format!(
            ", {} of {} slots held by {} worker(s)",
            a.slots_held, a.max_concurrency, a.workers
        );
        println!("{line}");
    }
}

/// `95 s`, `12 min`, `3.5 h`.
fn human_secs(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7_200.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3_600.0)
    }
}
