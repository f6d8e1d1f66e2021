//! `bulkflow cancel ID` and `bulkflow retry-failed ID`: an operator stops a bulk change, or
//! gives its failed devices a new round.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::app::Engine;
use crate::config::Config;
use crate::domain::BulkChangeId;
use crate::workflow::RunOutcome;

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    pub id: BulkChangeId,
    /// Who cancels it (recorded in the event).
    #[arg(long, default_value = "operator")]
    pub by: String,
    /// Why (recorded in the event and shown in the status details).
    #[arg(long, default_value = "cancelled by an operator")]
    pub reason: String,
    /// Only record the cancel; the worker driving the bulk change (or the next to take it up)
    /// ends it. Without it, when no worker drives it, this command ends it itself.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    pub id: BulkChangeId,
    /// Who asks for it (recorded in the event).
    #[arg(long, default_value = "operator")]
    pub by: String,
}

pub async fn cancel(
    args: CancelArgs,
    config: Config,
    stop: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let engine = Engine::build(config).await?;
    let id = args.id;
    if let Err(e) = engine.cancel(id, &args.by, &args.reason).await {
        return super::exit::report_refused(id, e);
    }
    println!("bulk change {id}: cancel recorded; no new carrier call starts");
    if !args.no_wait {
        // Nobody drives it (paused, queued, or its worker is gone): end it here. A worker that
        // drives it ends it itself (`Busy` here).
        match engine.run(id, &stop, None).await? {
            RunOutcome::Busy => println!(
                "a worker drives it: it lets the calls in flight finish and ends it CANCELLED (see `bulkflow status {id}`)"
            ),
            RunOutcome::Completed(status) => {
                let (processed, failed, cancelled, warnings) = engine
                    .store
                    .inspect(id, |bc| {
                        (
                            bc.processed_devices(),
                            bc.failed_devices(),
                            bc.cancelled_devices(),
                            bc.billing_warnings(),
                        )
                    })
                    .await?;
                println!(
                    "bulk change {id}: {status}: {processed} processed ({warnings} with billing warnings), {failed} failed, {cancelled} cancelled"
                );
            }
            other => println!("bulk change {id}: {other:?}; a worker ends the cancel"),
        }
    }
    engine.projector.catch_up().await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn retry_failed(args: RetryArgs, config: Config) -> anyhow::Result<ExitCode> {
    let engine = Engine::build(config).await?;
    let id = args.id;
    let devices = match engine.retry_failed(id, &args.by).await {
        Ok(devices) => devices,
        Err(e) => return super::exit::report_refused(id, e),
    };
    engine.enqueue_local(id).await?;
    engine.projector.catch_up().await?;
    println!("bulk change {id}: {devices} failed devices get a new round; queued");
    Ok(ExitCode::SUCCESS)
}
