//! The `bulkflow` binary, driven as an operator would: submit, worker, status, demo.

use std::path::Path;
use std::process::{Command, Output};

use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};

fn with_env(cmd: &mut Command, dir: &Path, sim: &str, auth: &SimAuth) {
    let base = crate::helpers::bulkflow_command(sim, auth);
    for (key, value) in base.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    cmd.env(
        "BULKFLOW_DATABASE_URL",
        format!("sqlite://{}", dir.join("cli.db").display()),
    )
    .env("BULKFLOW_WORKER_ID", "cli-worker");
}

fn bulkflow(dir: &Path, sim: &str, auth: &SimAuth, args: &[&str]) -> Output {
    bulkflow_with(dir, sim, auth, args, &[])
}

/// The `bulkflow` binary with nothing of this process's environment but `PATH`, set up for the
/// simulator at `sim` and a SQLite database in `dir`, plus `extra` variables.
pub fn bulkflow_with(
    dir: &Path,
    sim: &str,
    auth: &SimAuth,
    args: &[&str],
    extra: &[(&str, &Path)],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkflow"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    with_env(&mut cmd, dir, sim, auth);
    cmd.envs(extra.iter().copied());
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_worker_and_status_run_a_bulk_change_end_to_end() {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 1);
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, serde_json::to_vec(&demo_request(301, 30)).unwrap()).unwrap();
    let auth = sim.auth().clone();
    let d = dir.path().to_path_buf();
    let (submit, worker, status) = tokio::task::spawn_blocking(move || {
        let submit = bulkflow(&d, &base, &auth, &["submit", file.to_str().unwrap()]);
        let worker = bulkflow(&d, &base, &auth, &["worker", "--exit-when-idle"]);
        let status = bulkflow(&d, &base, &auth, &["status", "301", "--json"]);
        (submit, worker, status)
    })
    .await
    .unwrap();
    assert!(submit.status.success(), "{}", text(&submit.stderr));
    assert!(text(&submit.stdout).contains("bulk change 301 accepted (30 devices) and queued"));
    assert!(worker.status.success(), "{}", text(&worker.stderr));
    assert!(status.status.success(), "{}", text(&status.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(summary["status"], "PROCESSED");
    assert_eq!(summary["processed"], 30);
    assert_eq!(summary["devices_by_status"]["PROCESSED"], 30);
    assert_eq!(sim.report().rev_duplicate_numbers, 0);
    // The worker logged at info; the credentials never appear.
    let logs = text(&worker.stderr);
    assert!(!logs.contains(&sim.auth().api_key) && !logs.contains(&sim.auth().rev_password));
}

#[tokio::test]
async fn an_invalid_request_file_is_rejected_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    let mut request = serde_json::to_value(demo_request(302, 3)).unwrap();
    request["devices"][1]["iccid"] = serde_json::Value::from("89-not-an-iccid");
    std::fs::write(&file, serde_json::to_vec(&request).unwrap()).unwrap();
    let out = bulkflow(
        dir.path(),
        "http://127.0.0.1:9",
        &SimAuth::default(),
        &["submit", file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("ICCID") && err.contains("89-not-an-iccid"),
        "{err}"
    );
    assert!(
        !dir.path().join("cli.db").exists(),
        "nothing written for a rejected request"
    );
}

#[tokio::test]
async fn a_bad_setting_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkflow"))
        .args(["status", "1"])
        .env("BULKFLOW_DATABASE_URL", "mysql://nope")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("postgres:// or sqlite://"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn demo_json_reports_every_device_final() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let out = Command::new(env!("CARGO_BIN_EXE_bulkflow"))
        .args([
            "demo",
            "--devices",
            "200",
            "--json",
            "--db",
            db.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("BULKFLOW_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "bulk_change_id",
        "status",
        "devices",
        "processed",
        "failed",
        "elapsed_ms",
        "rev_duplicate_numbers",
    ] {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    assert_eq!(report["status"], "PROCESSED");
    assert_eq!(report["devices"], 200);
    assert_eq!(report["final"], 200);
    assert_eq!(report["rev_duplicate_numbers"], 0);
}

/// A whole bulk change, logging at `trace`, including rejected credentials: no secret appears in
/// the logs, the events, the read models or the error messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_events_projections_or_errors() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let auth = SimAuth {
        api_key: format!("pond-key-{tag}"),
        rev_password: format!("rev-password-{tag}"),
        rev_subscription_key: format!("rev-subscription-{tag}"),
        ..SimAuth::default()
    };
    let wrong = format!("wrong-{}", auth.rev_password);
    // The raw secrets, and the Basic-auth form the Rev password travels in.
    let secrets = [
        auth.api_key.clone(),
        auth.rev_password.clone(),
        auth.rev_subscription_key.clone(),
        wrong.clone(),
        base64(format!("{}:{}", auth.rev_user, auth.rev_password).as_bytes()),
        base64(format!("{}:{}", auth.rev_user, wrong).as_bytes()),
    ];
    let sim = Simulator::new(auth.clone(), FaultProfile::None, 1);
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, serde_json::to_vec(&demo_request(310, 25)).unwrap()).unwrap();
    // Service provider 13 gets a wrong Rev password: its bulk change pauses with a 401.
    let mut bad_request = demo_request(311, 25);
    bad_request.service_provider_id = bulkflow::domain::ServiceProviderId::new(13).unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&bad_request).unwrap()).unwrap();
    let d = dir.path().to_path_buf();
    let outputs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkflow"));
            cmd.args(args).current_dir(&d).env("RUST_LOG", "trace");
            cmd.env("BULKFLOW_REV_13_PASSWORD", &wrong);
            with_env(&mut cmd, &d, &base, &auth);
            cmd.output().unwrap()
        };
        vec![
            run(&["submit", good.to_str().unwrap()]),
            run(&["submit", bad.to_str().unwrap()]),
            run(&["worker", "--exit-when-idle"]),
            run(&["status", "311"]),
        ]
    })
    .await
    .unwrap();
    let mut text = String::new();
    for o in &outputs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        text.push_str(&String::from_utf8_lossy(&o.stdout));
        text.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    assert!(
        text.contains("TRACE") || text.contains("trace"),
        "logging ran at trace"
    );
    assert!(
        text.contains("401"),
        "the rejected credentials were reported"
    );
    // Everything the database holds, as text.
    let db = bulkflow::store::Db::connect(
        &format!("sqlite://{}", dir.path().join("cli.db").display()),
        1,
    )
    .await
    .unwrap();
    let bulkflow::store::Db::Sqlite(pool) = &db else {
        unreachable!()
    };
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut stored = String::new();
    let mut dumped = std::collections::BTreeMap::new();
    for table in &tables {
        let columns: Vec<String> =
            sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .fetch_all(pool)
                .await
                .unwrap();
        let row = columns
            .iter()
            .map(|c| format!("COALESCE(CAST(\"{c}\" AS TEXT), '')"))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(&format!("SELECT {row} FROM \"{table}\""))
            .fetch_all(pool)
            .await
            .unwrap();
        dumped.insert(table.clone(), rows.len());
        for r in rows {
            stored.push_str(&String::from_utf8_lossy(&r));
            stored.push('\n');
        }
    }
    // The dump covers the events and every read model, rows and all.
    assert!(stored.contains("BulkChangePaused"));
    for table in [
        "events",
        "m2m_device_change",
        "device_bulk_change_log",
        "device_bulk_change",
    ] {
        assert!(
            dumped.get(table).is_some_and(|&n| n > 0),
            "{table} is in the dump: {dumped:?}"
        );
    }
    let events: Vec<String> = sqlx::query_scalar("SELECT payload FROM events")
        .fetch_all(pool)
        .await
        .unwrap();
    let logs: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT request_text, response_text, error_text FROM device_bulk_change_log",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(events.len() > 50 && logs.len() > 50);
    let everything = format!("{text}{stored}{}{logs:?}", events.join(""));
    for secret in &secrets {
        assert!(!everything.contains(secret.as_str()), "a secret leaked");
    }
    assert!(events
        .iter()
        .any(|e| e.contains("BulkChangePaused") && e.contains("401")));
}

/// Standard base64 (the form a Basic auth header would carry).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_reference() {
    assert_eq!(base64(b"aladdin:opensesame"), "YWxhZGRpbjpvcGVuc2VzYW1l");
    assert_eq!(base64(b"u:p"), "dTpw");
    assert_eq!(base64(b"ab"), "YWI=");
}

/// Hostile arguments, configuration and workflow files: a clear error naming the problem and a
/// non-zero exit, nothing written.
#[test]
fn hostile_arguments_configuration_and_workflows_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkflow"));
        cmd.args(args).current_dir(dir.path()).env_clear();
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let db = format!("sqlite://{}", dir.path().join("h.db").display());
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["demo", "--devices", "0"], vec![], "--devices"),
        (vec!["demo", "--devices", "many"], vec![], "many"),
        (vec!["demo", "--faults", "chaos"], vec![], "chaos"),
        (vec!["status", "-5"], vec![], "-5"),
        (vec!["status", "abc"], vec![], "abc"),
        (vec!["frobnicate"], vec![], "frobnicate"),
        (vec!["serve"], vec![], "BULKFLOW_API_TOKEN"),
        (
            vec!["serve"],
            vec![("BULKFLOW_API_TOKEN", "short")],
            "shorter than 16",
        ),
        (
            vec!["worker", "--concurrency", "0"],
            vec![],
            "--concurrency",
        ),
        (
            vec!["migrate"],
            vec![("BULKFLOW_MAX_CONNECTIONS", "lots")],
            "BULKFLOW_MAX_CONNECTIONS",
        ),
        (
            vec!["migrate", "--config", "missing.toml"],
            vec![],
            "missing.toml",
        ),
        (vec!["migrate", "--config", "bad.toml"], vec![], "bad.toml"),
        (
            vec!["migrate", "--config", "unknown.toml"],
            vec![],
            "databse_url",
        ),
        (
            vec!["worker"],
            vec![
                ("BULKFLOW_DATABASE_URL", &db),
                ("BULKFLOW_WORKFLOW", "wf.toml"),
            ],
            "wf.toml",
        ),
        (
            vec!["worker"],
            vec![
                ("BULKFLOW_DATABASE_URL", &db),
                ("BULKFLOW_WORKFLOW", "binary.toml"),
            ],
            "UTF-8",
        ),
    ];
    std::fs::write(dir.path().join("bad.toml"), "database_url = [").unwrap();
    std::fs::write(
        dir.path().join("unknown.toml"),
        "databse_url = \"sqlite://x.db\"",
    )
    .unwrap();
    std::fs::write(dir.path().join("wf.toml"), "name = 3").unwrap();
    std::fs::write(dir.path().join("binary.toml"), [0xff, 0xfe, 0x00, 0x41]).unwrap();
    for (args, envs, expected) in cases {
        let (code, err) = run(&args, &envs);
        assert!(code.is_some_and(|c| c != 0), "{args:?} must fail: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: {err:?} should name {expected:?}"
        );
        assert!(err.len() < 2_000, "{args:?}: error too long");
    }
    assert!(!dir.path().join("x.db").exists());
    // An unknown BULKFLOW_ variable (deploy systems set their own) is a warning naming it.
    let (code, err) = run(
        &["migrate"],
        &[
            ("BULKFLOW_DATABASE_URL", &db),
            ("BULKFLOW_DATABSE_URL", "x"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("WARN") && err.contains("BULKFLOW_DATABSE_URL"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shows_the_timeline_and_verify_catches_a_corrupted_row() {
    use bulkflow::sim::{Fault, Script};
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 1);
    let request = demo_request(320, 12);
    for d in &request.devices[7..=8] {
        sim.away_from(d.iccid.as_str(), d.target_status);
    }
    let failing = request.devices[8].iccid.to_string();
    sim.script(
        &failing,
        Script::always(
            "set_status",
            Fault::Status {
                status: 400,
                body: r#"{"code":"INVALID_STATE"}"#.into(),
            },
        ),
    );
    let retried = request.devices[7].iccid.to_string();
    sim.script(
        &retried,
        Script::times(
            "set_status",
            Fault::Status {
                status: 503,
                body: "busy".into(),
            },
            1,
        ),
    );
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, serde_json::to_vec(&request).unwrap()).unwrap();
    let auth = sim.auth().clone();
    let d = dir.path().to_path_buf();
    let device = retried.clone();
    let (json, verified, one_device, summary) = tokio::task::spawn_blocking({
        let (d, base, auth) = (d.clone(), base.clone(), auth.clone());
        move || {
            assert!(
                bulkflow(&d, &base, &auth, &["submit", file.to_str().unwrap()])
                    .status
                    .success()
            );
            assert!(bulkflow(&d, &base, &auth, &["worker", "--exit-when-idle"])
                .status
                .success());
            let json = bulkflow(&d, &base, &auth, &["replay", "320", "--json"]);
            let verified = bulkflow(&d, &base, &auth, &["replay", "320", "--verify"]);
            let one = bulkflow(&d, &base, &auth, &["replay", "320", "--device", &device]);
            let summary = bulkflow(&d, &base, &auth, &["replay", "320", "--summary"]);
            (json, verified, one, summary)
        }
    })
    .await
    .unwrap();
    // The summary: the bulk change's milestones and counts, no device.
    assert!(summary.status.success(), "{}", text(&summary.stderr));
    let summary = text(&summary.stdout);
    for expected in [
        "bulk change 320",
        "accepted",
        "12 devices",
        "started",
        "11 processed, 1 failed, 0 cancelled, 0 not ended",
    ] {
        assert!(
            summary.contains(expected),
            "{expected:?} missing: {summary}"
        );
    }
    assert!(
        !summary.contains("ICCID") && !summary.contains(&retried),
        "no device in the summary: {summary}"
    );
    // Corrupt one live row by hand: verify names it and fails.
    let db = bulkflow::store::Db::connect(&format!("sqlite://{}", d.join("cli.db").display()), 1)
        .await
        .unwrap();
    let bulkflow::store::Db::Sqlite(pool) = &db else {
        unreachable!()
    };
    sqlx::query("UPDATE m2m_device_change SET status_details = 'tampered' WHERE id = 3200000003")
        .execute(pool)
        .await
        .unwrap();
    db.close().await;
    let corrupted = tokio::task::spawn_blocking(move || {
        bulkflow(&d, &base, &auth, &["replay", "320", "--verify"])
    })
    .await
    .unwrap();
    assert!(json.status.success(), "{}", text(&json.stderr));
    let timeline: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(timeline["status"], "ERROR");
    assert_eq!(timeline["devices"].as_array().unwrap().len(), 12);
    let failed = timeline["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["iccid"] == failing)
        .unwrap();
    assert_eq!(failed["status"], "API_FAILED");
    let last = failed["entries"].as_array().unwrap().last().unwrap();
    assert_eq!(last["outcome"], "failed");
    assert_eq!(last["calls"][0]["status"], 400);
    assert!(verified.status.success(), "{}", text(&verified.stdout));
    assert!(text(&verified.stdout).contains("verify: the read models match the events"));
    let one = text(&one_device.stdout);
    assert!(
        one.contains(&retried) && one.contains("retry") && one.contains("503"),
        "{one}"
    );
    assert_eq!(one.matches("\ndevice ").count(), 1);
    assert_eq!(
        corrupted.status.code(),
        Some(i32::from(bulkflow::cli::exit::DIFFERENCES)),
        "verify's differences have their own exit code"
    );
    let out = text(&corrupted.stdout);
    assert!(
        out.contains("m2m_device_change id 3200000003") && out.contains("tampered"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_status_show_progress_and_unknown_ids_exit_with_not_found() {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 1);
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let mut second = demo_request(332, 5);
    second.tenant_id = bulkflow::domain::TenantId::new(7).unwrap();
    for (name, request) in [("a.json", demo_request(331, 20)), ("b.json", second)] {
        std::fs::write(dir.path().join(name), serde_json::to_vec(&request).unwrap()).unwrap();
    }
    let auth = sim.auth().clone();
    let d = dir.path().to_path_buf();
    let outs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| bulkflow(&d, &base, &auth, args);
        assert!(run(&["submit", "a.json"]).status.success());
        // Submitted, not run yet: listed as accepted, no worker drives it.
        let waiting = run(&["status", "331"]);
        assert!(run(&["worker", "--exit-when-idle"]).status.success());
        assert!(run(&["submit", "b.json", "--no-enqueue"]).status.success());
        vec![
            waiting,
            run(&["status", "331"]),
            run(&["list"]),
            run(&["list", "--json", "--status", "processed"]),
            run(&["list", "--json", "--tenant", "7"]),
            run(&["list", "--json", "--limit", "1"]),
            run(&["list", "--json", "--before", "332"]),
            run(&["status", "999"]),
            run(&["replay", "999"]),
            run(&["list", "--limit", "0"]),
        ]
    })
    .await
    .unwrap();
    let [waiting, done, table, processed, tenant, first, after, unknown, no_events, bad] =
        <[Output; 10]>::try_from(outs).unwrap();
    let waiting = text(&waiting.stdout);
    assert!(waiting.contains("progress:  0.0 % (0 of 20)"), "{waiting}");
    assert!(waiting.contains("no worker holds it now"), "{waiting}");
    let done = text(&done.stdout);
    assert!(done.contains("progress:  100.0 % (20 of 20)"), "{done}");
    assert!(done.contains("devices/s"), "{done}");
    assert!(
        !done.contains("driven by"),
        "a finished one has no driver: {done}"
    );
    let table = text(&table.stdout);
    assert!(table.contains("331") && table.contains("332"), "{table}");
    let ids = |o: &Output| -> Vec<i64> {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&o.stderr)));
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["bulk_change_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids(&processed), vec![331]);
    assert_eq!(ids(&tenant), vec![332]);
    assert_eq!(ids(&first), vec![332], "newest first");
    assert_eq!(ids(&after), vec![331], "the next page");
    let not_found = Some(i32::from(bulkflow::cli::exit::NOT_FOUND));
    assert_eq!(unknown.status.code(), not_found);
    assert_eq!(no_events.status.code(), not_found);
    assert_eq!(
        bad.status.code(),
        Some(i32::from(bulkflow::cli::exit::USAGE))
    );
}

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = bulkflow(
        dir.path(),
        "http://127.0.0.1:9",
        &SimAuth::default(),
        &[
            "--log-format",
            "json",
            "--log",
            "info",
            "worker",
            "--exit-when-idle",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["fields"]["message"] == "taking bulk changes from the local queue"),
        "{lines:?}"
    );
}

/// `cancel` ends a bulk change nobody drives (no carrier call), refuses a second one with its own
/// exit code, and `retry-failed` names an unknown id (3) and a state without failures (5).
#[tokio::test]
async fn cancel_and_retry_failed_from_the_command_line() {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 1);
    let (addr, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.json"),
        serde_json::to_vec(&demo_request(333, 5)).unwrap(),
    )
    .unwrap();
    let auth = sim.auth().clone();
    let d = dir.path().to_path_buf();
    let outs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| bulkflow(&d, &base, &auth, args);
        assert!(run(&["submit", "a.json", "--no-enqueue"]).status.success());
        vec![
            run(&["cancel", "333", "--reason", "not needed", "--by", "ops"]),
            run(&["cancel", "333"]),
            run(&["status", "333"]),
            run(&["retry-failed", "999"]),
            run(&["retry-failed", "333"]),
            run(&["replay", "333"]),
        ]
    })
    .await
    .unwrap();
    let [cancelled, again, status, unknown, nothing, replay] =
        <[Output; 6]>::try_from(outs).unwrap();
    assert!(cancelled.status.success(), "{}", text(&cancelled.stderr));
    let said = text(&cancelled.stdout);
    assert!(
        said.contains("CANCELLED: 0 processed (0 with billing warnings), 0 failed, 5 cancelled"),
        "{said}"
    );
    assert_eq!(again.status.code(), Some(5), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("is CANCELLED"),
        "{}",
        text(&again.stderr)
    );
    let status = text(&status.stdout);
    assert!(status.contains("bulk change 333: CANCELLED"), "{status}");
    assert!(status.contains("cancelled by ops: not needed"), "{status}");
    assert!(status.contains("progress:  100.0 % (5 of 5)"), "{status}");
    assert_eq!(unknown.status.code(), Some(3));
    assert_eq!(nothing.status.code(), Some(5));
    let replay = text(&replay.stdout);
    assert!(
        replay.contains("cancel requested") && replay.contains("not needed"),
        "{replay}"
    );
    assert_eq!(
        sim.report().pond_calls,
        0,
        "no carrier call for a cancelled bulk change"
    );
}
