use std::process::ExitCode;

use std::sync::Arc;

use crate::app::{Engine, WorkOptions};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Exit 0 once the queue is empty (for scripts and tests).
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Bulk changes run at once; the per-downstream rate and concurrency limits are shared.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let engine = Arc::new(Engine::build(config).await?);
    let cancel = super::shutdown_token();
    let projector = engine.projector.clone();
    let projections = tokio::spawn(projector.run(cancel.child_token()));
    let result = engine
        .work(
            &cancel,
            WorkOptions {
                exit_when_idle: args.exit_when_idle,
                concurrency: usize::from(args.concurrency),
            },
            None,
        )
        .await;
    engine.projector.catch_up().await?;
    cancel.cancel();
    let _ = projections.await;
    result?;
    Ok(ExitCode::SUCCESS)
}
