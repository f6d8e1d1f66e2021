use std::process::ExitCode;

use secrecy::ExposeSecret;

use crate::config::Config;
use crate::store::Db;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to serve the API (`/api/v1`), `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
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
    let db = Db::connect(config.database_url.expose_secret(), config.max_connections).await?;
    db.migrate().await?;
    let cancel = super::shutdown_token();
    let (local, task) = crate::api::serve(args.listen, db, token, cancel.clone()).await?;
    tracing::info!(address = %local, "serving the operator API under /api/v1, /metrics, /healthz and /readyz");
    let _ = task.await;
    Ok(ExitCode::SUCCESS)
}
