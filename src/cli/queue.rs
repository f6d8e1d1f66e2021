use std::process::ExitCode;
use std::time::Duration;

use crate::adapters::sqs::{self, SqsQueue};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum QueueCommand {
    /// Create an SQS queue (and its dead-letter queue with a redrive policy); prints the URLs.
    Create {
        name: String,
        /// Name of the dead-letter queue to create and attach.
        #[arg(long)]
        dead_letter: Option<String>,
        /// Receives before SQS moves a message to the dead-letter queue.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        max_receive_count: u32,
        /// Default visibility timeout of the queue, in seconds.
        #[arg(long, default_value_t = 30)]
        visibility_timeout: u64,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        QueueCommand::Create {
            name,
            dead_letter,
            max_receive_count,
            visibility_timeout,
        } => {
            let client = sqs::client().await;
            let (url, dlq) = SqsQueue::create(
                &client,
                &name,
                Duration::from_secs(visibility_timeout),
                dead_letter.as_deref().map(|d| (d, max_receive_count)),
            )
            .await?;
            println!("queue: {url}");
            if let Some(dlq) = dlq {
                println!("dead-letter queue: {dlq} (after {max_receive_count} receives)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
