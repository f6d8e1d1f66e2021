use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::app::Engine;
use crate::config::Config;
use crate::domain::BulkChangeRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bulk change request in JSON (format: docs/request-format.md).
    pub file: PathBuf,
    /// Only record the bulk change; do not queue it for a worker.
    #[arg(long)]
    pub no_enqueue: bool,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let request = BulkChangeRequest::from_json(&bytes)
        .with_context(|| format!("{} is not a valid bulk change request", args.file.display()))?;
    let devices = request.devices.len();
    let engine = Engine::build(config).await?;
    let id = engine.submit(request, !args.no_enqueue).await?;
    println!(
        "bulk change {id} accepted ({devices} devices){}",
        if args.no_enqueue { "" } else { " and queued" }
    );
    Ok(ExitCode::SUCCESS)
}
