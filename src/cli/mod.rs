//! The `bulkflow` command line: one module per subcommand.

mod cancel;
mod demo;
pub mod exit;
mod list;
mod migrate;
mod queue;
mod rebuild;
mod replay;
mod resume;
mod serve;
mod sim;
mod status;
mod submit;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "bulkflow",
    version,
    about = "Durable, event-sourced bulk changes of IoT devices (POND IoT + Rev.io)"
)]
pub struct Cli {
    /// Configuration file (default: ./bulkflow.toml when present). BULKFLOW_* variables override it.
    #[arg(long, global = true, env = "BULKFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. info or bulkflow=debug (RUST_LOG wins when set).
    #[arg(long, global = true, env = "BULKFLOW_LOG")]
    pub log: Option<String>,
    /// Log lines as text (for people) or one JSON object each (for log collectors).
    #[arg(long, global = true, env = "BULKFLOW_LOG_FORMAT", value_enum, default_value_t = crate::telemetry::Format::Text)]
    pub log_format: crate::telemetry::Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole bulk change on the embedded default: SQLite file, local queue, simulator.
    Demo(demo::Args),
    /// Serve the POND + Rev simulator.
    Sim(sim::Args),
    /// Accept a bulk change request (JSON file) and queue it.
    Submit(submit::Args),
    /// Run queued bulk changes and keep the projections up to date until stopped.
    Worker(worker::Args),
    /// Show a bulk change from the read models: counts, progress, rate, the driving worker.
    Status(status::Args),
    /// List bulk changes from the read models, newest first.
    List(list::Args),
    /// Serve the operator API (/api/v1, bearer token), /metrics, /healthz and /readyz.
    Serve(serve::Args),
    /// Resume a paused bulk change and queue it.
    Resume(resume::Args),
    /// Cancel a bulk change: no new carrier call; calls in flight finish; the rest ends CANCELLED.
    Cancel(cancel::CancelArgs),
    /// Give the devices that ended API_FAILED a new round of attempts, and queue the bulk change.
    RetryFailed(cancel::RetryArgs),
    /// The audit timeline of a bulk change from its events alone; --verify checks the read models.
    Replay(replay::Args),
    /// Rebuild the read models from the whole event history and swap them in atomically.
    Rebuild(rebuild::Args),
    /// Apply database migrations.
    Migrate,
    /// Manage SQS queues (for local development and tests).
    Queue(queue::Args),
}

impl Cli {
    pub fn log_filter(&self) -> &str {
        match (&self.log, &self.command) {
            (Some(filter), _) => filter,
            (None, Command::Demo(_)) => "warn",
            (None, _) => "info",
        }
    }

    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let config = || Config::load(self.config.as_deref());
        match self.command {
            Command::Demo(args) => demo::run(args, self.config.as_deref()).await,
            Command::Sim(args) => sim::run(args).await,
            Command::Submit(args) => submit::run(args, config()?).await,
            Command::Worker(args) => worker::run(args, config()?).await,
            Command::Status(args) => status::run(args, config()?).await,
            Command::List(args) => list::run(args, config()?).await,
            Command::Serve(args) => serve::run(args, config()?).await,
            Command::Resume(args) => resume::run(args, config()?).await,
            Command::Cancel(args) => cancel::cancel(args, config()?, shutdown_token()).await,
            Command::RetryFailed(args) => cancel::retry_failed(args, config()?).await,
            Command::Replay(args) => replay::run(args, config()?).await,
            Command::Rebuild(args) => rebuild::run(args, config()?).await,
            Command::Migrate => migrate::run(config()?).await,
            Command::Queue(args) => queue::run(args).await,
        }
    }
}

/// A token cancelled by Ctrl-C or SIGTERM.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; finishing work in hand");
        t.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
