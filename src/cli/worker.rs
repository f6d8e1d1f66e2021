use std::process::ExitCode;

use crate::app::Engine;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Exit 0 once the queue is empty (for scripts and tests).
    #[arg(long)]
    pub exit_when_idle: bool,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let engine = Engine::build(config).await?;
    let cancel = super::shutdown_token();
    let projector = engine.projector.clone();
    let projections = tokio::spawn(projector.run(cancel.child_token()));
    let result = engine.work(&cancel, args.exit_when_idle, None).await;
    engine.projector.catch_up().await?;
    cancel.cancel();
    let _ = projections.await;
    result?;
    Ok(ExitCode::SUCCESS)
}
