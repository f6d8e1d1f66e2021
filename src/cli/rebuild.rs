use secrecy::ExposeSecret;
use std::io::IsTerminal;
use std::process::ExitCode;

use crate::config::Config;
use crate::projections::rebuild::rebuild;
use crate::store::Db;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this read model: device_bulk_change, m2m_device_change or device_bulk_change_log.
    #[arg(long)]
    pub projection: Option<String>,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(config.database_url.expose_secret(), config.max_connections).await?;
    db.migrate().await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let stats = rebuild(&db, args.projection.as_deref(), |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })
    .await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    println!(
        "rebuilt {} from {} events in {:.2} s ({:.0} events/s){}; swapped in atomically",
        args.projection.as_deref().unwrap_or("all read models"),
        stats.events,
        stats.elapsed.as_secs_f64(),
        stats.events_per_second(),
        if stats.resumed {
            ", resumed from an interrupted rebuild"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
