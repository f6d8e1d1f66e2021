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
        return Ok(ExitCode::from(2));
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
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
            "  devices:   {} total, {} processed, {} failed, {} billing warnings",
            summary.total, summary.processed, summary.failed, summary.billing_warnings
        );
        for (status, count) in &summary.devices_by_status {
            println!("    {status:<12} {count}");
        }
        println!("  created:   {}", summary.created_date.to_rfc3339());
        if let Some(done) = summary.processed_date {
            println!("  processed: {}", done.to_rfc3339());
        }
    }
    Ok(ExitCode::SUCCESS)
}
