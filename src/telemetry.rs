//! Logging, set up once: `RUST_LOG` (or `--log`) filters; output goes to stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One readable line each.
    Text,
    /// One JSON object each: `timestamp`, `level`, `fields` (with `message`), `span`, `spans`.
    Json,
}

pub fn init(default_filter: &str, format: Format) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        Format::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        Format::Json => builder.json().try_init(),
    };
}
