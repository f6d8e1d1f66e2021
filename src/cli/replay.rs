use std::process::ExitCode;

use crate::audit::Timeline;
use crate::config::Config;
use crate::domain::BulkChangeId;
use crate::projections::{read, verify};
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
    /// Only the bulk change's own milestones (accepted, started, paused, cancelled, completed,
    /// retried) and its device counts: no device event is read, so it is as quick for
    /// 1,000,000 devices as for 10.
    #[arg(long, conflicts_with_all = ["device", "calls", "verify"])]
    pub summary: bool,
}

pub async fn run(args: Args, config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(config.database_url.expose_secret(), 2).await?;
    db.migrate().await?;
    let store = EventStore::new(&db);
    if args.summary {
        return summary(&db, &store, args.id, args.json).await;
    }
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

/// `replay --summary`: the milestones from the events, and the device counts now from the read
/// model (its counters: no scan).
async fn summary(
    db: &Db,
    store: &EventStore,
    id: BulkChangeId,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let events: Vec<_> = store
        .milestones(id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into_iter()
        .map(|e| e.payload)
        .collect();
    if events.is_empty() {
        eprintln!("bulk change {id} has no events");
        return Ok(super::exit::not_found());
    }
    let timeline = Timeline::from_events(&events);
    let now = read::bulk_summary(db, id).await?;
    if json {
        let mut value = serde_json::to_value(&timeline)?;
        if let Some(object) = value.as_object_mut() {
            object.remove("devices");
        }
        value["devices_now"] = match &now {
            Some(s) => serde_json::json!({
                "total": s.total,
                "processed": s.processed,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "by_status": s.devices_by_status,
            }),
            None => serde_json::Value::Null,
        };
        println!("{value}");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", timeline.render(false));
    match now {
        Some(s) => println!(
            "  devices now (read model): {} in all, {} processed, {} failed, {} cancelled, {} not ended",
            s.total,
            s.processed,
            s.failed,
            s.cancelled,
            s.total - s.finished()
        ),
        None => println!("  devices now: not in the read model yet (its projector has not caught up)"),
    }
    Ok(ExitCode::SUCCESS)
}
