use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::adapters::sqs::{self, SqsQueue};
use crate::app::{Engine, WorkOptions};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SQS queue to take bulk changes from (region, credentials and endpoint come from the AWS
    /// configuration chain, e.g. AWS_REGION and AWS_ENDPOINT_URL_SQS). Without it, the local
    /// queue in the database.
    #[arg(long, env = "BULKFLOW_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Where rejected messages go, with their reason (default: the queue's redrive target).
    #[arg(long, env = "BULKFLOW_DEAD_LETTER_QUEUE_URL")]
    pub dead_letter_queue_url: Option<String>,
    /// Exit 0 once the queue is empty and no bulk change runs here (for scripts and tests).
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Bulk changes run at once; the per-downstream rate and concurrency limits are shared.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Seconds a received message stays hidden; extended every third of it while it runs.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=43_200))]
    pub visibility_timeout: u64,
    /// Long-polling wait of a receive, in seconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=20))]
    pub wait_time_seconds: u64,
    /// Serve Prometheus metrics (`/metrics`) and health (`/healthz`, `/readyz`) on this address,
    /// e.g. 0.0.0.0:9464.
    #[arg(long, env = "BULKFLOW_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let engine = Arc::new(Engine::build(config).await?);
    let cancel = super::shutdown_token();
    if let Some(addr) = args.metrics_listen {
        let local = crate::metrics::serve(addr, engine.db.clone(), cancel.child_token()).await?;
        tracing::info!(address = %local, "serving /metrics, /healthz and /readyz");
    }
    let projections = tokio::spawn(engine.projector.clone().run(cancel.child_token()));
    // The platform's tables get the outcomes of its bulk changes ([platform] configured).
    let write_back = engine.write_back().map(Arc::new);
    let writing = write_back.clone().map(|w| {
        let token = cancel.child_token();
        tokio::spawn(async move { w.run(token).await })
    });
    // Finished devices of the platform's bulk changes go to its webhook, if one is configured.
    let notifier = engine.notifier().map(Arc::new);
    let notifying = notifier.clone().map(|n| {
        let token = cancel.child_token();
        tokio::spawn(async move { n.run(token).await })
    });
    let options = WorkOptions {
        exit_when_idle: args.exit_when_idle,
        concurrency: usize::from(args.concurrency),
        visibility: Duration::from_secs(args.visibility_timeout),
        wait: Duration::from_secs(args.wait_time_seconds),
        ..WorkOptions::default()
    };
    let result = match &args.queue_url {
        Some(url) => {
            let queue =
                SqsQueue::open(sqs::client().await, url, args.dead_letter_queue_url.clone())
                    .await?;
            tracing::info!(queue = %url, dead_letters = ?queue.dead_letter_url(), "taking bulk changes from SQS");
            engine.work(&Arc::new(queue), &cancel, options, None).await
        }
        None => {
            tracing::info!("taking bulk changes from the local queue");
            engine
                .work(&Arc::new(engine.queue.clone()), &cancel, options, None)
                .await
        }
    };
    engine.limits.release().await;
    if let Err(e) = engine.projector.catch_up().await {
        tracing::warn!(error = %e, "projections not fully caught up at exit");
    }
    if let Some(w) = &write_back {
        if let Err(e) = w.catch_up().await {
            tracing::warn!(error = %e, "platform write-back not fully caught up at exit; the next worker goes on");
        }
    }
    if let Some(n) = &notifier {
        if let Err(e) = n.catch_up().await {
            tracing::warn!(error = %e, "notifications not all delivered at exit; the next worker goes on");
        }
    }
    cancel.cancel();
    let _ = projections.await;
    if let Some(writing) = writing {
        let _ = writing.await;
    }
    if let Some(notifying) = notifying {
        let _ = notifying.await;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}
