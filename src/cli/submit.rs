use std::path::PathBuf;
use std::process::ExitCode;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

use crate::adapters::queue::Queue;
use crate::adapters::sqs::{self, SqsQueue};

use crate::app::Engine;
use crate::config::Config;
use crate::domain::BulkChangeRequest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bulk change request in JSON (format: docs/request-format.md).
    pub file: PathBuf,
    /// Only record the bulk change; do not queue it for a worker.
    #[arg(long, conflicts_with = "queue_url")]
    pub no_enqueue: bool,
    /// Send the request as a JSON message to this SQS queue instead of recording it here; a
    /// worker on that queue creates and runs it.
    #[arg(long, env = "BULKFLOW_QUEUE_URL")]
    pub queue_url: Option<String>,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let request = {
        // The file's bytes are dropped once it is decoded.
        let bytes = std::fs::read(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
        BulkChangeRequest::from_json(&bytes).with_context(|| {
            format!("{} is not a valid bulk change request", args.file.display())
        })?
    };
    let devices = request.devices.len();
    if let Some(url) = &args.queue_url {
        let queue = SqsQueue::open(sqs::client().await, url, None).await?;
        let body = serde_json::to_string(&request)?;
        queue.send(&body, &BTreeMap::new(), Duration::ZERO).await?;
        println!(
            "bulk change {} ({devices} devices) sent to {url}",
            request.bulk_change_id
        );
        return Ok(ExitCode::SUCCESS);
    }
    let engine = Engine::build(config).await?;
    let id = engine.submit(request, !args.no_enqueue).await?;
    // This process does not run it: its state need not stay in memory.
    engine.store.forget(id);
    // So that `bulkflow status` and `list` show it at once (the accept is already durable; a
    // worker's projector catches up otherwise).
    if let Err(e) = engine.projector.catch_up().await {
        tracing::warn!(error = %e, "the read models did not catch up; status shows the bulk change once a worker's projector does");
    }
    println!(
        "bulk change {id} accepted ({devices} devices){}",
        if args.no_enqueue { "" } else { " and queued" }
    );
    Ok(ExitCode::SUCCESS)
}
