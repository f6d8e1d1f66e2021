use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

use crate::adapters::queue::Queue;
use crate::adapters::sqs::{self, SqsQueue};

use crate::app::{Engine, Source, Submitted};
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
    if let Some(url) = &args.queue_url {
        return send(&args.file, url).await;
    }
    // Read as a stream: checked in a first pass (before the database is even opened, so an
    // invalid request writes nothing), appended in a second; memory does not grow with it.
    let source = Arc::new(Source::File(args.file.clone()));
    let checked = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || source.check()).await??
    }
    .with_context(|| format!("{} is not a valid bulk change request", args.file.display()))?;
    let engine = Engine::build(config).await?;
    let submitted = engine
        .submit_checked(source, checked, !args.no_enqueue)
        .await?;
    let Submitted { id, devices, new } = submitted;
    // So that `bulkflow status` and `list` show it at once (the accept is already durable; a
    // worker's projector catches up otherwise).
    if let Err(e) = engine.projector.catch_up().await {
        tracing::warn!(error = %e, "the read models did not catch up; status shows the bulk change once a worker's projector does");
    }
    println!(
        "bulk change {id} {} ({devices} devices){}",
        if new {
            "accepted"
        } else {
            "was already accepted"
        },
        if args.no_enqueue { "" } else { " and queued" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Sends the request as a JSON message for a worker on that queue to create and run (a queue
/// message is small: the request is checked here first, then sent as it is).
async fn send(file: &std::path::Path, url: &str) -> anyhow::Result<ExitCode> {
    let body =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let request = BulkChangeRequest::from_json(body.as_bytes())
        .with_context(|| format!("{} is not a valid bulk change request", file.display()))?;
    let queue = SqsQueue::open(sqs::client().await, url, None).await?;
    let body = serde_json::to_string(&request)?;
    queue.send(&body, &BTreeMap::new(), Duration::ZERO).await?;
    println!(
        "bulk change {} ({} devices) sent to {url}",
        request.bulk_change_id,
        request.devices.len()
    );
    Ok(ExitCode::SUCCESS)
}
