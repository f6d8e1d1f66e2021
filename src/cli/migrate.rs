use std::process::ExitCode;

use crate::config::Config;
use crate::store::{redact_url, Db};
use secrecy::ExposeSecret;

pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(config.database_url.expose_secret(), 2).await?;
    db.migrate().await?;
    println!(
        "migrations applied to {}",
        redact_url(config.database_url.expose_secret())
    );
    Ok(ExitCode::SUCCESS)
}
