//! `TestApp`: an engine on a fresh database, a simulator on a free loopback port, and the checks
//! the scenarios share.

use std::path::PathBuf;
use std::sync::Arc;

use bulkflow::app::Engine;
use bulkflow::config::Config;
use bulkflow::domain::bulk_change::BulkChangeEvent;
use bulkflow::domain::{BulkChangeId, BulkChangeRequest};
use bulkflow::sim::fixtures::configure_for_simulator;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};
use bulkflow::store::Db;
use bulkflow::with_pool;
use bulkflow::workflow::RunOutcome;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

/// The shipped workflow with short retry delays (20 ms, at most 200 ms) and a 2 s Rev timeout
/// (it bounds how long an unresolved intent waits before it is looked up), so tests do not sleep
/// for seconds.
pub fn test_workflow(dir: &std::path::Path) -> PathBuf {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/pond-status-update.toml"),
    )
    .unwrap();
    let mut definition: bulkflow::workflow::definition::Definition =
        toml::from_str(&shipped).unwrap();
    let steps = &mut definition.steps;
    for step in [
        &mut steps.device_status,
        &mut steps.service_status,
        &mut steps.rev_service,
    ] {
        step.retry.initial_delay_ms = 20;
        step.retry.max_delay_ms = 200;
    }
    definition.downstreams.rev.timeout_ms = 2_000;
    let path = dir.join("workflow.toml");
    std::fs::write(&path, toml::to_string(&definition).unwrap()).unwrap();
    path
}

pub struct TestApp {
    pub engine: Arc<Engine>,
    pub sim: Simulator,
    /// Base URL of `sim`.
    pub sim_url: String,
    pub db: Db,
    pub config: Config,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Which database a scenario runs on.
pub enum Backend {
    Postgres(sqlx::PgPool),
    Sqlite,
}

impl TestApp {
    pub async fn start(backend: Backend, profile: FaultProfile) -> Self {
        Self::start_with(backend, profile, |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        profile: FaultProfile,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let sim = Simulator::new(SimAuth::default(), profile, 7);
        Self::start_with_sim(backend, sim, tweak).await
    }

    /// As [`Self::start_with`], against a simulator set up by the caller (latency, limits).
    pub async fn start_with_sim(
        backend: Backend,
        sim: Simulator,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = match backend {
            Backend::Postgres(pool) => Db::Postgres(pool),
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                Db::connect(&url, 4).await.unwrap()
            }
        };
        db.migrate().await.unwrap();
        let (addr, server) = sim.start("127.0.0.1:0").await.unwrap();
        let mut config = Config {
            workflow: test_workflow(dir.path()),
            worker_id: "test-worker".into(),
            ..Config::default()
        };
        configure_for_simulator(&mut config, &format!("http://{addr}"), sim.auth());
        config.safety = test_safety();
        tweak(&mut config);
        let engine = Arc::new(Engine::with_db(config.clone(), db.clone()).unwrap());
        Self {
            engine,
            sim,
            sim_url: format!("http://{addr}"),
            db,
            config,
            server,
            _dir: dir,
        }
    }

    /// A URL other processes can open this test's database with.
    pub fn database_url(&self) -> String {
        match &self.db {
            Db::Sqlite(_) => format!("sqlite://{}", self._dir.path().join("test.db").display()),
            Db::Postgres(_) => panic!("use sqlx::test's database name"),
        }
    }

    /// A second engine on the same database (a restarted or another worker).
    pub fn another_engine(&self) -> Arc<Engine> {
        Arc::new(Engine::with_db(self.config.clone(), self.db.clone()).unwrap())
    }

    /// Submits (accepted, not queued nor run).
    pub async fn submit(&self, request: BulkChangeRequest) -> BulkChangeId {
        self.engine.submit(request, false).await.unwrap()
    }

    /// Submits, runs to an outcome, and brings the projections up to date.
    pub async fn run(&self, request: BulkChangeRequest) -> RunOutcome {
        let id = self.submit(request).await;
        let outcome = self
            .engine
            .run(id, &CancellationToken::new(), None)
            .await
            .unwrap();
        self.engine.projector.catch_up().await.unwrap();
        outcome
    }

    /// The bulk change's summary from the read models, once the projector has caught up.
    pub async fn summary(&self, id: BulkChangeId) -> bulkflow::projections::read::BulkSummary {
        self.engine.projector.catch_up().await.unwrap();
        bulkflow::projections::read::bulk_summary(&self.db, id)
            .await
            .unwrap()
            .unwrap()
    }

    pub async fn events(&self, id: BulkChangeId) -> Vec<BulkChangeEvent> {
        self.engine
            .store
            .events(id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect()
    }

    /// Every device ends exactly once (once a round, after a retry-failed), and no step succeeds
    /// twice for one device.
    pub async fn assert_no_device_processed_twice(&self, id: BulkChangeId) {
        use std::collections::HashMap;
        let mut finished: HashMap<i64, u32> = HashMap::new();
        let mut step_done: HashMap<(i64, &'static str), u32> = HashMap::new();
        for e in self.events(id).await {
            let (device, kind) = match &e {
                BulkChangeEvent::DeviceProcessed(p) => (p.device.device_change_id.get(), "end"),
                BulkChangeEvent::DeviceFailed(p) => (p.device.device_change_id.get(), "end"),
                BulkChangeEvent::DeviceStatusUpdated(p) => {
                    (p.device.device_change_id.get(), "device_status")
                }
                BulkChangeEvent::ServiceStatusUpdated(p) => {
                    (p.device.device_change_id.get(), "service_status")
                }
                BulkChangeEvent::RevServiceCreated(p) => (p.device.device_change_id.get(), "rev"),
                BulkChangeEvent::DevicesCancelled(c) => {
                    for d in &c.devices {
                        *finished.entry(d.device.device_change_id.get()).or_default() += 1;
                    }
                    continue;
                }
                // A new round (retry-failed): the device ends once more.
                BulkChangeEvent::FailedDevicesRetried(r) => {
                    for d in &r.devices {
                        finished.remove(&d.device.device_change_id.get());
                    }
                    continue;
                }
                _ => continue,
            };
            if kind == "end" {
                *finished.entry(device).or_default() += 1;
            } else {
                *step_done.entry((device, kind)).or_default() += 1;
            }
        }
        assert!(
            finished.values().all(|&n| n == 1),
            "a device finished twice"
        );
        assert!(
            step_done.values().all(|&n| n == 1),
            "a step succeeded twice"
        );
    }

    /// The live read-model rows of `id` equal those re-derived from its events alone.
    pub async fn assert_projections_match_events(&self, id: BulkChangeId) {
        self.engine.projector.catch_up().await.unwrap();
        let expected = bulkflow::projections::verify::expected(&self.engine.store, id)
            .await
            .unwrap();
        let live = bulkflow::projections::verify::live(&self.db, id)
            .await
            .unwrap();
        assert!(!expected.devices.is_empty() && !expected.logs.is_empty());
        let diff = bulkflow::projections::verify::diff(&expected, &live);
        assert!(
            diff.is_empty(),
            "projections differ from the events:\n{}",
            diff.join("\n")
        );
    }

    /// One `m2m_device_change` row as (status, status_details, is_processed, has_errors, rev_service_id, attempts).
    pub async fn device_row(&self, device_change_id: i64) -> DeviceRow {
        const SQL: &str = "SELECT status, status_details, is_processed, has_errors, rev_service_id,
            attempts, iccid, msisdn, processed_by FROM m2m_device_change WHERE id = $1";
        with_pool!(&self.db, pool => {
            let r = sqlx::query(SQL)
                .bind(device_change_id)
                .fetch_one(pool)
                .await
                .unwrap();
            DeviceRow {
                status: r.get(0),
                details: r.get(1),
                is_processed: r.get(2),
                has_errors: r.get(3),
                rev_service_id: r.get(4),
                attempts: r.get(5),
                iccid: r.get(6),
                msisdn: r.get(7),
                processed_by: r.get(8),
            }
        })
    }

    /// Log rows of one device as (description, request_text, response_text, error_text, response_status).
    pub async fn log_rows(&self, device_change_id: i64) -> Vec<LogRow> {
        const SQL: &str = "SELECT log_entry_description, request_text, response_text, error_text,
            response_status, has_errors FROM device_bulk_change_log
            WHERE m2m_device_change_id = $1 ORDER BY event_sequence";
        with_pool!(&self.db, pool => {
            sqlx::query(SQL)
                .bind(device_change_id)
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .map(|r| LogRow {
                    description: r.get(0),
                    request: r.get(1),
                    response: r.get(2),
                    error: r.get(3),
                    response_status: r.get(4),
                    has_errors: r.get(5),
                })
                .collect()
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub status: String,
    pub details: Option<String>,
    pub is_processed: bool,
    pub has_errors: bool,
    pub rev_service_id: Option<i64>,
    pub attempts: i32,
    pub iccid: String,
    pub msisdn: Option<String>,
    pub processed_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub description: String,
    pub request: Option<String>,
    pub response: Option<String>,
    pub error: Option<String>,
    pub response_status: String,
    pub has_errors: bool,
}

/// Runs `scenario` once on PostgreSQL and once on SQLite.
#[macro_export]
macro_rules! on_both_stores {
    ($name:ident, $scenario:ident) => {
        mod $name {
            #[sqlx::test(migrations = false)]
            async fn on_postgres(pool: sqlx::PgPool) {
                super::$scenario($crate::helpers::Backend::Postgres(pool)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                super::$scenario($crate::helpers::Backend::Sqlite).await;
            }
        }
    };
}

/// Safety bounds for a simulator on loopback that answers in milliseconds: a Rev POST leaves
/// within 1 s of its intent, and an unresolved one is looked up 0.5 s after it must have ended.
pub fn test_safety() -> bulkflow::config::SafetySection {
    bulkflow::config::SafetySection {
        rev_send_window_ms: 1_000,
        rev_lookup_margin_ms: 500,
        ..Default::default()
    }
}

/// The `bulkflow` binary set up to call the simulator at `sim_url` with `auth` (the caller adds the
/// database and its arguments), with the test workflow and [`test_safety`].
pub fn bulkflow_command(sim_url: &str, auth: &bulkflow::sim::SimAuth) -> std::process::Command {
    static WORKFLOW: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, workflow) = WORKFLOW.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = test_workflow(dir.path());
        (dir, path)
    });
    let safety = test_safety();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bulkflow"));
    cmd.env("BULKFLOW_WORKFLOW", workflow)
        .env(
            "BULKFLOW_SAFETY_REV_SEND_WINDOW_MS",
            safety.rev_send_window_ms.to_string(),
        )
        .env(
            "BULKFLOW_SAFETY_REV_LOOKUP_MARGIN_MS",
            safety.rev_lookup_margin_ms.to_string(),
        )
        .envs(bulkflow::sim::fixtures::simulator_env(sim_url, auth));
    cmd
}

/// A worker child process, killed (and reaped) when dropped.
pub struct Worker(pub std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A URL other processes can open this PostgreSQL test database with.
pub async fn pg_url(db: &Db) -> String {
    let Db::Postgres(pool) = db else {
        unreachable!("worker processes share PostgreSQL")
    };
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable")
}
