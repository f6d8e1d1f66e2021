use std::process::ExitCode;

use crate::audit::Timeline;
use crate::config::Config;
use crate::domain::BulkChangeId;
use crate::projections::verify;
use crate::store::{Db, EventStore};
use secrecy::ExposeSecret;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: BulkChangeId,
    /// Only this device (ICCID or device change id).
    #[arg(long)]
    pub device: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also show each call's request and response.
    #[arg(long)]
    pub calls: bool,
    /// Re-derive the read-model rows from the events and compare them with the live rows; exit 1
    /// on any difference.
    #[arg(long)]
    pub verify: bool,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(config.database_url.expose_secret(), 2).await?;
    db.migrate().await?;
    let store = EventStore::new(&db);
    let events: Vec<_> = store
        .events(args.id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into_iter()
        .map(|e| e.payload)
        .collect();
    if events.is_empty() {
        eprintln!("bulk change {} has no events", args.id);
        return Ok(super::exit::not_found());
    }
    let mut timeline = Timeline::from_events(&events);
    if let Some(device) = &args.device {
        if !timeline.only_device(device) {
            eprintln!("bulk change {} has no device {device}", args.id);
            return Ok(super::exit::not_found());
        }
    }
    let differences = if args.verify {
        let expected = verify::expected(&store, args.id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let live = verify::live(&db, args.id).await?;
        Some(verify::diff(&expected, &live))
    } else {
        None
    };
    if args.json {
        let mut value = serde_json::to_value(&timeline)?;
        if let Some(diff) = &differences {
            value["verify"] = serde_json::json!({ "ok": diff.is_empty(), "differences": diff });
        }
        println!("{value}");
    } else {
        let text = timeline.render(args.calls || args.device.is_some());
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
        if let Some(diff) = &differences {
            if diff.is_empty() {
                println!(
                    "\nverify: the read models match the events (device_bulk_change, {} m2m_device_change rows and their log rows)",
                    timeline.devices.len()
                );
            } else {
                println!(
                    "\nverify: {} difference(s) between the events and the read models:",
                    diff.len()
                );
                for d in diff {
                    println!("  {d}");
                }
            }
        }
    }
    Ok(match differences {
        Some(diff) if !diff.is_empty() => super::exit::differences(),
        _ => ExitCode::SUCCESS,
    })
}
