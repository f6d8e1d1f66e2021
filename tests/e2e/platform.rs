//! The portal's own tables as the intake: a test plays the portal (rows in `DeviceBulkChange` /
//! `M2M_DeviceChange`, then exactly its legacy message) and checks what bulkflow reads, refuses
//! and writes back. PostgreSQL only: the platform adapter is built for PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bulkflow::app::WorkOptions;
use bulkflow::config::PlatformSection;
use bulkflow::domain::{BulkChangeId, Origin};
use bulkflow::platform::postgres::PgPlatform;
use bulkflow::sim::FaultProfile;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp};

/// The schema the test's portal tables live in (not `public`, to exercise the setting).
const SCHEMA: &str = "portal";

/// Creates the portal's tables (the shipped DDL fixture) in `SCHEMA`.
pub async fn create_portal_tables(pool: &PgPool) -> PlatformSection {
    let ddl = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/platform/postgres.sql"),
    )
    .unwrap();
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {SCHEMA}; SET search_path TO {SCHEMA}; {ddl}; RESET search_path;"
    ))
    .execute(pool)
    .await
    .unwrap();
    PlatformSection {
        schema: SCHEMA.into(),
        processed_by: "bulkflow-test".into(),
        ..PlatformSection::default()
    }
}

/// One device row the portal writes.
pub struct PortalRow {
    pub id: i64,
    pub iccid: String,
    pub msisdn: String,
    pub change_request: String,
    /// Failed the portal's own validation: inserted already finished.
    pub invalid: bool,
}

/// `n` rows: every fourth with a Rev service (every eighth of those with products 501 and 502
/// instead of a package), the rest Suspend; every `invalid_every`th already marked invalid by the
/// portal.
pub fn portal_rows(bulk: i64, n: i64, invalid_every: i64) -> Vec<PortalRow> {
    (1..=n)
        .map(|i| {
            let id = bulk * 100_000 + i;
            let msisdn = format!("1{:03}{:07}", bulk % 1_000, i);
            let change_request = if i % 8 == 0 {
                format!(
                    r#"{{"UpdateStatus":"Active","PostUpdateStatusId":3,"RevService":{{"RevCustomerId":"4411","Number":"{msisdn}","ServiceTypeId":3,"ProviderId":7,"RevProductIdList":[501,502],"Prorate":false}}}}"#
                )
            } else if i % 4 == 0 {
                format!(
                    r#"{{"UpdateStatus":"Active","PostUpdateStatusId":3,"IsIgnoreCurrentStatus":false,"RevService":{{"RevCustomerId":"4411","Number":"{msisdn}","DeviceId":{i},"ServiceTypeId":3,"ProviderId":7,"UsagePlanGroupId":11,"RevPackageId":31,"ActivatedDate":"2026-11-01T00:00:00","Prorate":false}}}}"#
                )
            } else {
                r#"{"UpdateStatus":"Suspended","PostUpdateStatusId":4,"IsIgnoreCurrentStatus":false}"#
                    .to_string()
            };
            PortalRow {
                id,
                iccid: format!("8901{:06}{:09}", bulk % 1_000_000, i),
                msisdn,
                change_request,
                invalid: invalid_every > 0 && i % invalid_every == 0,
            }
        })
        .collect()
}

/// What the portal writes: the bulk change `PROCESSING` and its rows.
pub async fn insert_portal_bulk_change(pool: &PgPool, bulk: i64, rows: &[PortalRow]) {
    sqlx::query(&format!(
        r#"INSERT INTO {SCHEMA}."DeviceBulkChange" ("Id", "TenantId", "Status", "ChangeRequestTypeId",
           "ChangeRequestType", "ServiceProviderId", "ServiceProvider", "IntegrationId", "Integration",
           "PortalTypeId", "CreatedBy") VALUES ($1, 1, 'PROCESSING', 1, 'StatusUpdate', 12, 'POND test', 17, 'Pond', 0, 'portal-user')"#
    ))
    .bind(bulk)
    .execute(pool)
    .await
    .unwrap();
    for r in rows {
        let (status, details) = if r.invalid {
            ("ERROR", Some("Invalid ICCID"))
        } else {
            ("NEW", None)
        };
        sqlx::query(&format!(
            r#"INSERT INTO {SCHEMA}."M2M_DeviceChange" ("Id", "BulkChangeId", "ICCID", "MSISDN",
               "DeviceIdentifier", "Status", "StatusDetails", "ChangeRequest", "IsProcessed", "HasErrors",
               "CreatedBy") VALUES ($1, $2, $3, $4, $3, $5, $6, $7, $8, $8, 'portal-user')"#
        ))
        .bind(r.id)
        .bind(bulk)
        .bind(&r.iccid)
        .bind(&r.msisdn)
        .bind(status)
        .bind(details)
        .bind(&r.change_request)
        .bind(r.invalid)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Exactly the portal's message: body `Not used` and the eight String attributes it always sends.
pub fn portal_message(bulk: i64) -> (String, BTreeMap<String, String>) {
    let attributes = [
        ("BulkChangeId", bulk.to_string()),
        ("ServiceProviderId", "12".into()),
        ("RetryNumber", "0".into()),
        ("M2MDeviceChangeId", "0".into()),
        ("AdditionBulkChangeId", "0".into()),
        ("NewServiceActivations", "false".into()),
        ("NewServiceActivationIteration", "0".into()),
        ("IsFromAutomatedUpdateDeviceStatusLambda", "false".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    ("Not used".into(), attributes)
}

async fn app_with_portal(pool: PgPool) -> TestApp {
    let section = create_portal_tables(&pool).await;
    let mut app = TestApp::start(Backend::Postgres(pool.clone()), FaultProfile::None).await;
    let platform = Arc::new(PgPlatform::new(pool, &section));
    Arc::get_mut(&mut app.engine)
        .expect("no other handle on the engine yet")
        .platform = Some(platform);
    app
}

async fn work_until_idle(app: &TestApp) {
    let queue = Arc::new(app.engine.queue.clone());
    let options = WorkOptions {
        exit_when_idle: true,
        ..Default::default()
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        app.engine
            .work(&queue, &CancellationToken::new(), options, None),
    )
    .await
    .expect("the worker went idle")
    .unwrap();
}

async fn send(app: &TestApp, bulk: i64) {
    use bulkflow::adapters::queue::Queue;
    let (body, attributes) = portal_message(bulk);
    app.engine
        .queue
        .send(&body, &attributes, Duration::ZERO)
        .await
        .unwrap();
}

/// `(Status, StatusDetails, IsProcessed, HasErrors)` of a platform device row.
async fn portal_row(pool: &PgPool, id: i64) -> (String, Option<String>, bool, bool) {
    sqlx::query_as(&format!(
        r#"SELECT "Status", "StatusDetails", "IsProcessed", "HasErrors" FROM {SCHEMA}."M2M_DeviceChange" WHERE "Id" = $1"#
    ))
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn portal_status(pool: &PgPool, bulk: i64) -> String {
    sqlx::query_scalar(&format!(
        r#"SELECT "Status" FROM {SCHEMA}."DeviceBulkChange" WHERE "Id" = $1"#
    ))
    .bind(bulk)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn portal_log_rows(pool: &PgPool, bulk: i64) -> i64 {
    sqlx::query_scalar(&format!(
        r#"SELECT COUNT(*) FROM {SCHEMA}."DeviceBulkChangeLog" WHERE "BulkChangeId" = $1"#
    ))
    .bind(bulk)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The portal's message for a bulk change bulkflow has never seen: read from the platform's
/// rows (the portal's invalid rows left alone and counted) and run to the end.
#[sqlx::test]
async fn a_portal_bulk_change_is_read_from_its_tables_and_run(pool: PgPool) {
    let app = app_with_portal(pool.clone()).await;
    let bulk = 7101;
    let rows = portal_rows(bulk, 60, 10);
    insert_portal_bulk_change(&pool, bulk, &rows).await;
    send(&app, bulk).await;
    work_until_idle(&app).await;

    let id = BulkChangeId::new(bulk).unwrap();
    let (origin, devices, status) = app
        .engine
        .store
        .inspect(id, |b| {
            (b.header().map(|h| h.origin), b.devices().len(), b.status())
        })
        .await
        .unwrap();
    assert_eq!(origin, Some(Origin::Platform { skipped: 6 }));
    assert_eq!(
        devices, 54,
        "every valid row, none of the portal's invalid ones"
    );
    assert!(status.is_final(), "{status}");
    assert_eq!(
        app.engine.queue.depth().await.unwrap(),
        0,
        "message deleted"
    );
    // The portal's invalid rows are as the portal left them.
    let invalid = portal_row(&pool, rows[9].id).await;
    assert_eq!(
        invalid,
        ("ERROR".into(), Some("Invalid ICCID".into()), true, true)
    );
    // A Rev service from the ChangeRequest was created for every Active row.
    for r in rows
        .iter()
        .filter(|r| !r.invalid && r.change_request.contains("RevService"))
    {
        assert_eq!(
            app.sim.services_for(&r.msisdn),
            1,
            "Rev service for {}",
            r.msisdn
        );
    }

    // Without a package, each product of RevProductIdList was added to the service, once.
    let with_products: Vec<&PortalRow> = rows
        .iter()
        .filter(|r| !r.invalid && r.change_request.contains("RevProductIdList"))
        .collect();
    assert!(!with_products.is_empty());
    for r in with_products {
        assert_eq!(
            app.sim.products_for(&r.msisdn),
            vec![501, 502],
            "{}",
            r.msisdn
        );
    }
    assert_eq!(app.sim.report().rev_duplicate_products, 0);

    // Write-back: each device's end, one log row per recorded call, the bulk change's end.
    let write_back = app.engine.write_back().expect("a platform is configured");
    write_back.catch_up().await.unwrap();
    let calls: usize = app.events(id).await.iter().map(|e| e.calls().len()).sum();
    assert!(
        calls >= 54,
        "{calls} calls recorded: at least one per device"
    );
    assert_eq!(portal_log_rows(&pool, bulk).await, calls as i64);
    assert_eq!(portal_status(&pool, bulk).await, status.as_str());
    for r in rows.iter().filter(|r| !r.invalid) {
        let (status, details, processed, _) = portal_row(&pool, r.id).await;
        assert!(processed, "row {} processed", r.id);
        assert!(
            status == "PROCESSED" || status == "API_FAILED",
            "row {}: {status}",
            r.id
        );
        assert!(details.is_some_and(|d| !d.is_empty()));
    }
    let by: Vec<String> = sqlx::query_scalar(&format!(
        r#"SELECT DISTINCT "ProcessedBy" FROM {SCHEMA}."M2M_DeviceChange" WHERE "BulkChangeId" = $1 AND NOT "HasErrors""#
    ))
    .bind(bulk)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(by, vec!["bulkflow-test".to_string()]);
    // The portal's invalid rows are still as the portal left them.
    assert_eq!(
        portal_row(&pool, rows[9].id).await,
        ("ERROR".into(), Some("Invalid ICCID".into()), true, true)
    );

    // Every batch again (a crash after the platform's commit, before the checkpoint's), and a
    // rebuild of bulkflow's own read models: no log row twice.
    sqlx::query("DELETE FROM consumer_checkpoints WHERE consumer = $1")
        .bind(bulkflow::platform::writeback::CONSUMER)
        .execute(&pool)
        .await
        .unwrap();
    bulkflow::projections::rebuild::rebuild(&app.db, None, |_, _| {})
        .await
        .unwrap();
    app.engine.write_back().unwrap().catch_up().await.unwrap();
    assert_eq!(portal_log_rows(&pool, bulk).await, calls as i64);
    // The portal's message again: the bulk change is known and finished; nothing changes.
    send(&app, bulk).await;
    work_until_idle(&app).await;
    write_back.catch_up().await.unwrap();
    assert_eq!(portal_log_rows(&pool, bulk).await, calls as i64);
    assert_eq!(app.engine.queue.depth().await.unwrap(), 0);
}

/// Bulk changes submitted to bulkflow (not from the platform) are never written to the
/// platform's tables, even when rows with their ids exist there.
#[sqlx::test]
async fn only_the_platforms_bulk_changes_are_written_back(pool: PgPool) {
    let app = app_with_portal(pool.clone()).await;
    let request = bulkflow::sim::fixtures::demo_request(7106, 5);
    let rows: Vec<PortalRow> = request
        .devices
        .iter()
        .map(|d| PortalRow {
            id: d.device_change_id.get(),
            iccid: d.iccid.to_string(),
            msisdn: d.msisdn.as_ref().unwrap().to_string(),
            change_request: r#"{"UpdateStatus":"Active"}"#.into(),
            invalid: false,
        })
        .collect();
    insert_portal_bulk_change(&pool, 7106, &rows).await;
    app.run(request).await;
    app.engine.write_back().unwrap().catch_up().await.unwrap();
    assert_eq!(portal_log_rows(&pool, 7106).await, 0);
    assert_eq!(portal_status(&pool, 7106).await, "PROCESSING");
    assert_eq!(portal_row(&pool, rows[0].id).await.0, "NEW");
}

/// A row whose `ChangeRequest` does not map refuses the bulk change: the reason names the row
/// and field, is written back to the platform (the row, the others not run, a log row, the bulk
/// change `ERROR`), and the message is dead-lettered with it. A second delivery changes nothing.
#[sqlx::test]
async fn a_bulk_change_that_does_not_map_is_refused_and_written_back(pool: PgPool) {
    let app = app_with_portal(pool.clone()).await;
    let bulk = 7102;
    let mut rows = portal_rows(bulk, 8, 0);
    rows[3].change_request = rows[3]
        .change_request
        .replace(r#""RevCustomerId":"4411""#, r#""RevCustomerId":"CUST-9""#);
    insert_portal_bulk_change(&pool, bulk, &rows).await;
    send(&app, bulk).await;
    work_until_idle(&app).await;

    let dead = app.engine.queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    let bad = rows[3].id;
    assert!(
        dead[0].reason.contains(&format!(
            "M2M_DeviceChange {bad}.ChangeRequest.RevService.RevCustomerId"
        )),
        "{}",
        dead[0].reason
    );
    let (status, details, processed, errors) = portal_row(&pool, bad).await;
    assert_eq!((status.as_str(), processed, errors), ("ERROR", true, true));
    assert!(details.unwrap().contains("RevCustomerId"));
    let (status, details, processed, _) = portal_row(&pool, rows[0].id).await;
    assert_eq!((status.as_str(), processed), ("ERROR", true));
    assert!(details
        .unwrap()
        .starts_with("not run: the bulk change was refused"));
    assert_eq!(portal_status(&pool, bulk).await, "ERROR");
    assert_eq!(portal_log_rows(&pool, bulk).await, 1);
    // Nothing of it entered bulkflow.
    let known = app
        .engine
        .store
        .inspect(BulkChangeId::new(bulk).unwrap(), |b| b.header().is_some())
        .await
        .unwrap();
    assert!(!known);

    // The portal's message again: the bulk change is finished there; nothing changes.
    send(&app, bulk).await;
    work_until_idle(&app).await;
    assert_eq!(app.engine.queue.depth().await.unwrap(), 0);
    assert_eq!(app.engine.queue.dead_letters().await.unwrap().len(), 1);
    assert_eq!(portal_log_rows(&pool, bulk).await, 1);
}

/// Types and integrations bulkflow does not run are refused with the field named; an id the
/// platform does not have is dead-lettered saying so.
#[sqlx::test]
async fn other_bulk_changes_and_unknown_ids_are_refused_by_name(pool: PgPool) {
    let app = app_with_portal(pool.clone()).await;
    insert_portal_bulk_change(&pool, 7103, &portal_rows(7103, 3, 0)).await;
    sqlx::query(&format!(
        r#"UPDATE {SCHEMA}."DeviceBulkChange" SET "ChangeRequestType" = 'CarrierRatePlanChange' WHERE "Id" = 7103"#
    ))
    .execute(&pool)
    .await
    .unwrap();
    send(&app, 7103).await;
    send(&app, 7104).await;
    work_until_idle(&app).await;
    let dead = app.engine.queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead
        .iter()
        .any(|d| d.reason.contains("DeviceBulkChange 7103.ChangeRequestType")));
    assert!(dead.iter().any(|d| d
        .reason
        .contains("7104 is neither in bulkflow nor in the platform")));
    assert_eq!(portal_status(&pool, 7103).await, "ERROR");
    let (status, _, processed, _) = portal_row(&pool, 7103 * 100_000 + 1).await;
    assert_eq!((status.as_str(), processed), ("ERROR", true));
}

/// A platform database that cannot be reached holds the message back (it reappears later),
/// never dead-letters it.
#[sqlx::test]
async fn an_unreachable_platform_holds_the_message_back(pool: PgPool) {
    let mut app = TestApp::start(Backend::Postgres(pool), FaultProfile::None).await;
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let section = PlatformSection {
        database_url: Some(format!("postgres://postgres@127.0.0.1:{port}/nowhere").into()),
        ..PlatformSection::default()
    };
    let platform = bulkflow::platform::connect(&section).unwrap().unwrap();
    Arc::get_mut(&mut app.engine).unwrap().platform = Some(platform);
    send(&app, 7105).await;
    let queue = Arc::new(app.engine.queue.clone());
    let cancel = CancellationToken::new();
    let worker = {
        let engine = app.engine.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            engine
                .work(&queue, &cancel, WorkOptions::default(), None)
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    cancel.cancel();
    worker.await.unwrap().unwrap();
    assert!(app.engine.queue.dead_letters().await.unwrap().is_empty());
    assert_eq!(
        app.engine.queue.depth().await.unwrap(),
        1,
        "the message waits to be retried"
    );
}

/// The platform's database down while outcomes are written back: the write-back fails, its
/// checkpoint stays, and once the platform answers everything arrives, once.
#[sqlx::test]
async fn a_platform_that_is_down_holds_the_write_back_without_losing_anything(pool: PgPool) {
    use bulkflow::platform::writeback::{WriteBack, CONSUMER};
    use bulkflow::store::catchup::{load_checkpoint, Checkpoint};

    let app = app_with_portal(pool.clone()).await;
    let bulk = 7107;
    insert_portal_bulk_change(&pool, bulk, &portal_rows(bulk, 12, 0)).await;
    send(&app, bulk).await;
    work_until_idle(&app).await;

    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let down = bulkflow::platform::connect(&PlatformSection {
        database_url: Some(format!("postgres://postgres@127.0.0.1:{port}/nowhere").into()),
        ..PlatformSection::default()
    })
    .unwrap()
    .unwrap();
    let blocked = WriteBack::new(app.db.clone(), down);
    assert!(blocked.step().await.is_err());
    assert_eq!(
        load_checkpoint(&app.db, CONSUMER).await.unwrap(),
        Checkpoint::default(),
        "the checkpoint did not move"
    );
    assert_eq!(portal_log_rows(&pool, bulk).await, 0);

    app.engine.write_back().unwrap().catch_up().await.unwrap();
    let id = BulkChangeId::new(bulk).unwrap();
    let calls: usize = app.events(id).await.iter().map(|e| e.calls().len()).sum();
    assert_eq!(portal_log_rows(&pool, bulk).await, calls as i64);
    assert_eq!(portal_status(&pool, bulk).await, "PROCESSED");
}

/// A stand-in for the platform's status webhook: checks each notification's signature, answers
/// 500 to the first `fail_first` requests, and keeps what it accepted.
pub struct Receiver {
    pub url: String,
    pub secret: String,
    state: Arc<std::sync::Mutex<ReceiverState>>,
    _server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ReceiverState {
    fail_first: usize,
    requests: usize,
    bad_signatures: usize,
    accepted: Vec<serde_json::Value>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Self {
        use axum::http::{HeaderMap, StatusCode};
        let secret = "webhook-s3cret".to_string();
        let state = Arc::new(std::sync::Mutex::new(ReceiverState {
            fail_first,
            ..Default::default()
        }));
        let handler = {
            let (state, secret) = (state.clone(), secret.clone());
            move |headers: HeaderMap, body: axum::body::Bytes| {
                let (state, secret) = (state.clone(), secret.clone());
                async move {
                    let header = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let timestamp: i64 = header("X-Bulkflow-Timestamp").parse().unwrap_or(0);
                    let expected =
                        bulkflow::platform::notify::signature(secret.as_bytes(), timestamp, &body);
                    let mut s = state.lock().unwrap();
                    s.requests += 1;
                    if header("X-Bulkflow-Signature") != expected {
                        s.bad_signatures += 1;
                        return StatusCode::UNAUTHORIZED;
                    }
                    if s.requests <= s.fail_first {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    s.accepted.push(serde_json::from_slice(&body).unwrap());
                    StatusCode::NO_CONTENT
                }
            }
        };
        let app = axum::Router::new().route("/hooks/status", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hooks/status"),
            secret,
            state,
            _server: server,
        }
    }

    /// `(requests, bad signatures)` so far.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.requests, s.bad_signatures)
    }

    /// The distinct changes (by their event sequence) accepted for each device of `bulk`.
    pub fn distinct(&self, bulk: i64) -> BTreeMap<i64, std::collections::BTreeSet<i64>> {
        let s = self.state.lock().unwrap();
        let mut out: BTreeMap<i64, std::collections::BTreeSet<i64>> = BTreeMap::new();
        for n in s.accepted.iter().filter(|n| n["bulk_change_id"] == bulk) {
            for c in n["changes"].as_array().unwrap() {
                out.entry(c["m2m_device_change_id"].as_i64().unwrap())
                    .or_default()
                    .insert(c["event_sequence"].as_i64().unwrap());
            }
        }
        out
    }

    /// Every accepted device change id of `bulk`, with how many accepted notifications carried
    /// it, and the largest notification's size.
    pub fn received(&self, bulk: i64) -> (BTreeMap<i64, usize>, usize) {
        let s = self.state.lock().unwrap();
        let mut seen = BTreeMap::new();
        let mut largest = 0;
        for n in s.accepted.iter().filter(|n| n["bulk_change_id"] == bulk) {
            let changes = n["changes"].as_array().unwrap();
            largest = largest.max(changes.len());
            for c in changes {
                *seen
                    .entry(c["m2m_device_change_id"].as_i64().unwrap())
                    .or_insert(0) += 1;
            }
        }
        (seen, largest)
    }
}

/// Finished devices are notified to the platform's webhook, signed; a webhook that fails holds
/// the notifications back (the checkpoint stays) and they arrive once it answers, each once.
#[sqlx::test]
async fn finished_devices_are_notified_to_the_webhook_at_least_once(pool: PgPool) {
    use bulkflow::platform::notify::Notifier;
    let app = app_with_portal(pool.clone()).await;
    let bulk = 7108;
    let rows = portal_rows(bulk, 30, 10);
    insert_portal_bulk_change(&pool, bulk, &rows).await;
    send(&app, bulk).await;
    work_until_idle(&app).await;

    let receiver = Receiver::start(1).await;
    let notifier = Notifier::new(
        app.db.clone(),
        receiver.url.clone(),
        receiver.secret.clone().into(),
        bulkflow::adapters::http::client(std::time::Duration::from_secs(10)).unwrap(),
    );
    assert!(
        notifier.catch_up().await.is_err(),
        "the first delivery got a 500"
    );
    notifier.catch_up().await.unwrap();
    let (seen, largest) = receiver.received(bulk);
    let expected: Vec<i64> = rows.iter().filter(|r| !r.invalid).map(|r| r.id).collect();
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), expected);
    assert!(seen.values().all(|n| *n == 1), "each device once: {seen:?}");
    assert!(largest <= 100);
    assert_eq!(receiver.counts().1, 0, "every signature checked out");

    // A notifier with the wrong secret is refused by the receiver and delivers nothing.
    sqlx::query("DELETE FROM consumer_checkpoints WHERE consumer = $1")
        .bind(bulkflow::platform::notify::CONSUMER)
        .execute(&pool)
        .await
        .unwrap();
    let forged = Notifier::new(
        app.db.clone(),
        receiver.url.clone(),
        "guess".to_string().into(),
        bulkflow::adapters::http::client(std::time::Duration::from_secs(10)).unwrap(),
    );
    assert!(forged.catch_up().await.is_err());
    assert!(receiver.counts().1 > 0);
    assert!(receiver.received(bulk).0.values().all(|n| *n == 1));
}

/// A product POST whose answer is lost (the product was added, the client got a 504) is not sent
/// again: the next attempt looks the service up, sees the product and adds only what is missing.
#[sqlx::test]
async fn a_lost_product_answer_adds_no_product_twice(pool: PgPool) {
    use bulkflow::sim::{Fault, Script};
    let app = app_with_portal(pool.clone()).await;
    let bulk = 7109;
    let rows = portal_rows(bulk, 16, 0);
    let product_rows: Vec<&PortalRow> = rows
        .iter()
        .filter(|r| r.change_request.contains("RevProductIdList"))
        .collect();
    assert_eq!(product_rows.len(), 2);
    for r in &product_rows {
        app.sim.script(
            &r.iccid,
            Script::times("rev_product", Fault::AfterEffectHang { ms: 2_500 }, 1),
        );
    }
    insert_portal_bulk_change(&pool, bulk, &rows).await;
    send(&app, bulk).await;
    work_until_idle(&app).await;
    let report = app.sim.report();
    assert_eq!(report.rev_duplicate_products, 0, "{report:?}");
    assert_eq!(report.rev_duplicate_numbers, 0, "{report:?}");
    for r in &product_rows {
        assert_eq!(
            app.sim.products_for(&r.msisdn),
            vec![501, 502],
            "{}",
            r.msisdn
        );
    }
    let events = app.events(BulkChangeId::new(bulk).unwrap()).await;
    let retried = events
        .iter()
        .filter(|e| matches!(e, bulkflow::domain::bulk_change::BulkChangeEvent::DeviceStepRetryScheduled(r) if r.outcome_unknown && r.reason.contains("products")))
        .count();
    assert_eq!(
        retried, 2,
        "each lost answer made one retry that looked up first"
    );
}

/// 100,000 rows are read in keyset pages (one page of rows in memory at a time) and all mapped.
#[sqlx::test]
async fn a_hundred_thousand_rows_are_read_page_by_page(pool: PgPool) {
    use bulkflow::platform::{Loaded, Platform};
    let section = create_portal_tables(&pool).await;
    let bulk = 7110_i64;
    insert_portal_bulk_change(&pool, bulk, &[]).await;
    // The rows in one statement (the portal's own bulk insert), the tenth one already invalid.
    sqlx::query(&format!(
        r#"INSERT INTO {SCHEMA}."M2M_DeviceChange" ("Id", "BulkChangeId", "ICCID", "MSISDN", "Status",
               "ChangeRequest", "IsProcessed", "HasErrors")
           SELECT $1 * 1000000 + i, $1, '8901' || lpad(i::text, 15, '0'), '1555' || lpad(i::text, 7, '0'),
                  CASE WHEN i % 10 = 0 THEN 'ERROR' ELSE 'NEW' END,
                  '{{"UpdateStatus":"Suspend"}}', i % 10 = 0, i % 10 = 0
             FROM generate_series(1, 100000) AS i"#
    ))
    .bind(bulk)
    .execute(&pool)
    .await
    .unwrap();
    let platform = PgPlatform::new(pool.clone(), &section);
    let Loaded::Request(request) = platform
        .load(BulkChangeId::new(bulk).unwrap())
        .await
        .unwrap()
    else {
        panic!("the bulk change maps");
    };
    assert_eq!(request.devices.len(), 90_000);
    assert_eq!(request.origin, Origin::Platform { skipped: 10_000 });
    let ids: Vec<i64> = request
        .devices
        .iter()
        .map(|d| d.device_change_id.get())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in Id order, none twice"
    );
}
