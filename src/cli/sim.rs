use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::sim::{FaultProfile, Script, SimAuth, Simulator};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Random fault profile: none or flaky.
    #[arg(long, default_value = "none")]
    pub faults: FaultProfile,
    /// Seed of the random faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// JSON file of per-ICCID scripts: {"<iccid>": [{"op": "set_status", "fault": {"kind": "status", "status": 400, "body": "…"}, "times": 1}]}.
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Enforce this many POND calls per second (429 beyond).
    #[arg(long)]
    pub pond_rate_limit: Option<u32>,
    /// Enforce this many Rev calls per second (429 beyond).
    #[arg(long)]
    pub rev_rate_limit: Option<u32>,
    /// Fixed latency added to every call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let sim = Simulator::new(SimAuth::default(), args.faults, args.seed)
        .with_rate_limits(args.pond_rate_limit, args.rev_rate_limit)
        .with_latency(std::time::Duration::from_millis(args.latency_ms));
    if let Some(path) = &args.script {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let scripts: std::collections::HashMap<String, Vec<Script>> =
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid script file", path.display()))?;
        for (iccid, list) in scripts {
            for s in list {
                sim.script(&iccid, s);
            }
        }
    }
    let (addr, server) = sim.start(&args.listen).await?;
    let auth = sim.auth();
    println!(
        "simulator listening on http://{addr} (faults: {:?})",
        args.faults
    );
    println!("  BULKFLOW_POND_BASE_URL=http://{addr}/ds/u/distributorPPUService/v1");
    println!(
        "  BULKFLOW_POND_DISTRIBUTOR_ID={}  BULKFLOW_POND_API_KEY=<the simulator's key>",
        auth.distributor_id
    );
    println!("  BULKFLOW_REV_BASE_URL=http://{addr}  report: http://{addr}/_sim/report");
    let cancel = super::shutdown_token();
    cancel.cancelled().await;
    server.abort();
    Ok(ExitCode::SUCCESS)
}
