//! PostgreSQL through a real connection pooler: Debian's PgBouncer (scripts/test.sh installs it),
//! with its default settings but for the pool mode, in front of the test database.
//!
//! In session mode bulkflow connects (no startup parameter PgBouncer refuses), runs bulk
//! changes, and a worker killed with SIGKILL has its bulk change taken over by the next one (the
//! hold's advisory lock ends with the client's session: PgBouncer resets the server connection).
//! A pooler that hands sessions on — transaction mode, or session mode with its reset query
//! emptied — would keep a dead worker's lock alive in the pool (its bulk change never taken
//! over) or hand it to another worker: every command refuses it at start, naming why.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkflow::sim::fixtures::billable_request;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};
use bulkflow::store::Db;

use crate::helpers::{Backend, TestApp, Worker};
use crate::limits::wait_for_all;

/// A PgBouncer process on a free loopback port, stopped when dropped.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("pgbouncer is not installed: scripts/test.sh installs Debian's (apt-get install -y pgbouncer)")
}

impl Bouncer {
    /// PgBouncer in `pool_mode` in front of 127.0.0.1:5432 (trust auth), plus `extra` settings.
    fn start(pool_mode: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port=5432\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = {pool_mode}\nmax_client_conn = 200\ndefault_pool_size = 40\n{extra}\n",
                users.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(pgbouncer_binary());
        // PgBouncer will not run as root; it drops to `postgres`, who must read its files.
        let root = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
        };
        if root {
            use std::os::unix::fs::PermissionsExt;
            for path in [dir.path(), users.as_path(), ini.as_path()] {
                let mode = if path.is_dir() { 0o755 } else { 0o644 };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "pgbouncer did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The URL of the test database through this pooler (with a password, which trust
    /// authentication ignores, so that messages can be checked for it).
    async fn url(&self, db: &Db) -> String {
        let direct = crate::helpers::pg_url(db).await;
        direct.replace(
            "postgres@127.0.0.1:5432",
            &format!("postgres:pooled-secret@127.0.0.1:{}", self.port),
        )
    }
}

fn worker(app: &TestApp, url: &str, name: &str) -> Worker {
    Worker(
        crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
            .args(["worker", "--exit-when-idle", "--visibility-timeout", "2"])
            .env("BULKFLOW_DATABASE_URL", url)
            .env("BULKFLOW_WORKER_ID", name)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Through PgBouncer in session mode (its defaults otherwise): a worker is killed with SIGKILL
/// while it drives a billable bulk change, the next worker takes it over and completes it; no
/// Rev service twice, no device processed twice.
#[sqlx::test]
async fn through_pgbouncer_in_session_mode_a_killed_workers_bulk_change_is_taken_over(
    pool: sqlx::PgPool,
) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 11)
        .with_latency(Duration::from_millis(30));
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let bouncer = Bouncer::start("session", "");
    let url = bouncer.url(&app.db).await;
    let id = app
        .engine
        .submit(billable_request(9_701, 150), true)
        .await
        .unwrap();
    let mut first = worker(&app, &url, "pooled-first");
    let started = Instant::now();
    while app.sim.report().rev_creates < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first worker made no progress through the pooler: {:?}",
            app.sim.report()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.0.kill().unwrap(); // SIGKILL
    first.0.wait().unwrap();
    let done_by_first = app.sim.report().rev_creates;
    assert!(done_by_first < 150, "finished before the kill");
    // If the killed worker's session lived on in the pool, its hold's lock would too, and the
    // second worker would find the bulk change held and exit with it unfinished.
    let second = worker(&app, &url, "pooled-second");
    wait_for_all(vec![second], Duration::from_secs(120)).await;
    let summary = app.summary(id).await;
    assert_eq!((summary.processed, summary.failed), (150, 0), "{summary:?}");
    let report = app.sim.report();
    assert_eq!(report.rev_services, 150, "{report:?}");
    assert_eq!(report.rev_duplicate_numbers, 0, "{report:?}");
    app.assert_no_device_processed_twice(id).await;
}

/// A pooler that hands sessions on is refused by every command at start, with the reason and
/// without the password; nothing is written.
#[sqlx::test]
async fn a_pooler_that_hands_sessions_on_is_refused_at_start(pool: sqlx::PgPool) {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 12);
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&billable_request(9_702, 5)).unwrap(),
    )
    .unwrap();
    for (mode, extra) in [
        ("transaction", ""),
        ("statement", ""),
        // Session mode that does not reset a session before handing it on.
        ("session", "server_reset_query ="),
    ] {
        let bouncer = Bouncer::start(mode, extra);
        let url = bouncer.url(&app.db).await;
        for args in [
            vec!["submit", file.to_str().unwrap()],
            vec!["worker", "--exit-when-idle"],
        ] {
            let out = crate::helpers::bulkflow_command(&app.sim_url, app.sim.auth())
                .args(&args)
                .env("BULKFLOW_DATABASE_URL", &url)
                .env("BULKFLOW_WORKER_ID", "pooled")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{mode} {extra}: {args:?}: {err}");
            assert!(
                err.contains("keeps a session alive after its connection closed")
                    && err.contains("session mode")
                    && err.contains(&format!("127.0.0.1:{}", bouncer.port)),
                "{mode} {extra}: {args:?}: {err}"
            );
            assert!(!err.contains("pooled-secret"), "{err}");
        }
    }
    let Db::Postgres(pool) = &app.db else {
        unreachable!()
    };
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(events, 0, "nothing was written through the pooler");
    assert_eq!(app.sim.report().pond_calls, 0);
}
