use std::process::ExitCode;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::projections::read::{list_bulk_changes, ListFilter};
use crate::store::Db;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only bulk changes in this status (PROCESSING, PAUSED, PROCESSED, ERROR, …; any case).
    #[arg(long)]
    pub status: Option<String>,
    /// Only this tenant's.
    #[arg(long)]
    pub tenant: Option<i64>,
    /// Only those created at or after this time (RFC 3339, e.g. 2026-11-28T00:00:00Z).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// The page after this id (ids below it).
    #[arg(long)]
    pub before: Option<i64>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub limit: i64,
    /// One JSON array.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(config.database_url.expose_secret(), 2).await?;
    db.migrate().await?;
    let filter = ListFilter {
        status: args.status,
        tenant_id: args.tenant,
        since: args.since,
        before_id: args.before,
        limit: args.limit,
    };
    let lines = list_bulk_changes(&db, &filter).await?;
    if args.json {
        println!("{}", serde_json::to_string(&lines)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>12} {:>8} {:<11} {:>9} {:>9} {:>7} {:>8}  created",
        "id", "tenant", "status", "devices", "finished", "failed", "progress"
    );
    for l in &lines {
        let finished = l.processed + l.failed;
        let progress = if l.total > 0 {
            100.0 * finished as f64 / l.total as f64
        } else {
            100.0
        };
        println!(
            "{:>12} {:>8} {:<11} {:>9} {:>9} {:>7} {:>7.1}%  {}",
            l.bulk_change_id,
            l.tenant_id,
            l.status,
            l.total,
            finished,
            l.failed,
            progress,
            l.created_date.format("%Y-%m-%d %H:%M:%S")
        );
    }
    if lines.len() as i64 == filter.limit {
        if let Some(last) = lines.last() {
            println!("(more: --before {})", last.bulk_change_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
