use std::process::ExitCode;

use secrecy::ExposeSecret;

use crate::adapters::sqs::{self, SqsQueue};
use crate::app::Engine;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to serve the API (`/api/v1`), `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
    /// Queue new and resumed bulk changes on this SQS queue (where the workers read); without
    /// it, on the local queue in the database.
    #[arg(long, env = "BULKFLOW_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Largest request body, in MiB (a 10,000-device request is about 3 MiB).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_body_mib: u64,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let Some(token) = config.api.token.clone() else {
        anyhow::bail!(
            "no operator token: set [api] token in the config file or BULKFLOW_API_TOKEN (every API request must present it)"
        );
    };
    if token.expose_secret().len() < 16 {
        anyhow::bail!("[api] token is shorter than 16 characters; use a long random one");
    }
    let engine = std::sync::Arc::new(Engine::build(config).await?);
    let queue = match &args.queue_url {
        Some(url) => Some(std::sync::Arc::new(
            SqsQueue::open(sqs::client().await, url, None).await?,
        )),
        None => None,
    };
    let cancel = super::shutdown_token();
    let (local, task) = crate::api::serve(
        args.listen,
        engine,
        queue,
        token,
        (args.max_body_mib as usize) << 20,
        cancel.clone(),
    )
    .await?;
    tracing::info!(address = %local, "serving the operator API under /api/v1, /metrics, /healthz and /readyz");
    let _ = task.await;
    Ok(ExitCode::SUCCESS)
}
