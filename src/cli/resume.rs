use std::process::ExitCode;

use crate::app::Engine;
use crate::config::Config;
use crate::domain::BulkChangeId;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: BulkChangeId,
    /// Who resumes it (recorded in the event).
    #[arg(long, default_value = "operator")]
    pub by: String,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let engine = Engine::build(config).await?;
    if let Err(e) = engine.resume(args.id, &args.by).await {
        return super::exit::report_refused(args.id, e);
    }
    println!("bulk change {} resumed and queued", args.id);
    Ok(ExitCode::SUCCESS)
}
