//! A request read as a stream (`bulkflow submit`): checked in a first pass, appended in parts in
//! one transaction in a second, so an invalid request writes nothing and an interrupted accept
//! leaves nothing behind.

use std::path::Path;
use std::process::{Command, Output};

use bulkflow::domain::{BulkChangeRequest, Iccid, TargetStatus};
use bulkflow::sim::fixtures::demo_request;

fn submit(db_url: &str, file: &Path, failpoint: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkflow"));
    cmd.args(["submit", file.to_str().unwrap(), "--no-enqueue"])
        .env("BULKFLOW_DATABASE_URL", db_url)
        .env("BULKFLOW_WORKER_ID", "intake-test")
        .env("RUST_LOG", "warn")
        .env_remove("BULKFLOW_FAILPOINT");
    if let Some(point) = failpoint {
        cmd.env("BULKFLOW_FAILPOINT", point);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The request's JSON with its devices first and its own fields after them (valid JSON; the
/// fingerprint then needs a pass of its own).
fn devices_first(request: &BulkChangeRequest) -> String {
    let devices = serde_json::to_string(&request.devices).unwrap();
    let head = serde_json::to_string(&BulkChangeRequest {
        devices: vec![],
        ..request.clone()
    })
    .unwrap();
    let fields = head
        .strip_prefix('{')
        .and_then(|h| h.strip_suffix(r#","devices":[]}"#))
        .unwrap();
    format!(r#"{{"devices": {devices}, {fields}}}"#)
}

async fn events_of(pool: &sqlx::PgPool, id: i64) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE aggregate_id = $1")
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_big_request_is_appended_in_parts_and_an_interrupted_accept_leaves_nothing(
    pool: sqlx::PgPool,
) {
    let db = bulkflow::store::Db::Postgres(pool.clone());
    db.migrate().await.unwrap();
    let url = crate::helpers::pg_url(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let request = demo_request(900, 5_000);
    let file = dir.path().join("big.json");
    std::fs::write(&file, devices_first(&request)).unwrap();

    // Killed (abort, as kill -9) after its third part of 1,000 devices went in.
    let (url2, file2) = (url.clone(), file.clone());
    let crashed =
        tokio::task::spawn_blocking(move || submit(&url2, &file2, Some("accept.chunk_appended@3")))
            .await
            .unwrap();
    assert!(!crashed.status.success(), "the failpoint ended the process");
    assert!(text(&crashed.stderr).contains("accept.chunk_appended"));
    assert_eq!(events_of(&pool, 900).await, 0, "nothing of it is kept");

    // Submitted again: all of it, once.
    let (url2, file2) = (url.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || submit(&url2, &file2, None))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("bulk change 900 accepted (5000 devices)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(events_of(&pool, 900).await, 6, "accepted + 5 parts");
    let stored: (String,) = sqlx::query_as(
        "SELECT payload->'BulkChangeAccepted'->>'request_fingerprint' FROM events
          WHERE aggregate_id = '900' AND sequence = 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored.0,
        request.fingerprint(),
        "the streamed fingerprint is the whole request's (keys in another order)"
    );
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM m2m_device_change WHERE bulk_change_id = 900")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 5_000, "submit caught the read models up");
    // The engine reads what was appended as it reads any bulk change.
    let store = bulkflow::store::EventStore::new(&db);
    let state = store
        .inspect(bulkflow::domain::BulkChangeId::new(900).unwrap(), |b| {
            (b.devices().len(), b.devices()[4_321].request.clone())
        })
        .await
        .unwrap();
    assert_eq!(state, (5_000, request.devices[4_321].clone()));

    // The same request again (this time as the in-memory JSON order): nothing new.
    let same = dir.path().join("same.json");
    std::fs::write(&same, serde_json::to_vec(&request).unwrap()).unwrap();
    let (url2, same2) = (url.clone(), same.clone());
    let again = tokio::task::spawn_blocking(move || submit(&url2, &same2, None))
        .await
        .unwrap();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("was already accepted"));
    assert_eq!(events_of(&pool, 900).await, 6);

    // Another request under the same id: refused, nothing written.
    let mut other = request.clone();
    other.devices[4_999].target_status = TargetStatus::Suspended;
    other.devices[4_999].rev_service = None;
    let other_file = dir.path().join("other.json");
    std::fs::write(&other_file, serde_json::to_vec(&other).unwrap()).unwrap();
    let refused = tokio::task::spawn_blocking(move || submit(&url, &other_file, None))
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("different request"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(events_of(&pool, 900).await, 6);
}

#[tokio::test]
async fn an_invalid_request_names_its_first_problem_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("intake.db").display());
    let mut request = demo_request(901, 3_000);
    // A repeated ICCID at 2,500, and a device's own problem later: the ICCID is named.
    request.devices[2_500].iccid = request.devices[17].iccid.clone();
    request.devices[2_700].iccid = Iccid::parse("8901260882319999999").unwrap();
    request.devices[2_900].target_status = TargetStatus::Suspended;
    let file = dir.path().join("bad.json");
    let mut json = serde_json::to_string(&request).unwrap();
    if request.devices[2_900].rev_service.is_none() {
        // The demo request gives only some devices a Rev service: make this one need Active.
        let device = serde_json::to_string(&request.devices[2_900]).unwrap();
        let with_rev = device.replacen(
            '}',
            r#","rev_service":{"customer_id":"1","provider_id":1,"service_type_id":1}}"#,
            1,
        );
        json = json.replacen(&device, &with_rev, 1);
    }
    std::fs::write(&file, json).unwrap();
    let (url2, file2) = (url.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || submit(&url2, &file2, None))
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("devices[2500].iccid")
            && stderr.contains(request.devices[17].iccid.as_str()),
        "{stderr}"
    );
    let db = bulkflow::store::Db::connect(&url, 1).await.unwrap();
    db.migrate().await.unwrap();
    let bulkflow::store::Db::Sqlite(pool) = &db else {
        unreachable!()
    };
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(events, 0, "an invalid request writes nothing");

    // Without the repeat, the device's own problem at 2,900 is named.
    let fixed = std::fs::read_to_string(&file).unwrap().replacen(
        &format!("\"{}\"", request.devices[17].iccid),
        "\"8901260882318888888\"",
        2,
    );
    let fixed = fixed.replacen(
        "\"8901260882318888888\"",
        &format!("\"{}\"", request.devices[17].iccid),
        1,
    );
    std::fs::write(&file, fixed).unwrap();
    let out = tokio::task::spawn_blocking(move || submit(&url, &file, None))
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("devices[2900].rev_service"),
        "{}",
        text(&out.stderr)
    );
}
