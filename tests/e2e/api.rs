//! The operator API (`bulkflow serve`): every endpoint so far, the token, and the error cases.

use bulkflow::adapters::queue::Queue;
use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::{Fault, FaultProfile, Script};
use secrecy::SecretString;
use serde_json::Value;

use crate::helpers::{Backend, TestApp};

const TOKEN: &str = "operator-token-for-tests-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_bulk_changes_devices_and_timelines_to_the_token_holder_only() {
    let app = TestApp::start(Backend::Sqlite, FaultProfile::None).await;
    let request = demo_request(360, 12);
    let failing = request.devices[4].iccid.to_string();
    app.sim.script(
        &failing,
        Script::times(
            "get_status",
            Fault::Status {
                status: 400,
                body: r#"{"status":400,"message":"bad ICCID"}"#.into(),
            },
            9,
        ),
    );
    app.run(request.clone()).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let (addr, _task) = bulkflow::api::serve(
        "127.0.0.1:0".parse().unwrap(),
        app.engine.clone(),
        None,
        SecretString::from(TOKEN),
        1 << 20,
        cancel.clone(),
    )
    .await
    .unwrap();
    // A fresh connection a request: a server refusing an oversized body (413) before reading it
    // closes the connection, which a pooled client would reuse for the next request.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let call = |path: &str, token: Option<&str>| {
        let mut r = http.get(format!("http://{addr}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let json = |path: &'static str| {
        let call = &call;
        async move {
            let r = call(path, Some(TOKEN)).await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // The token.
    for token in [None, Some("wrong-token")] {
        let r = call("/api/v1/bulk-changes", token).await.unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // Health needs none.
    assert_eq!(call("/healthz", None).await.unwrap().status(), 200);
    // The list.
    let (status, list) = json("/api/v1/bulk-changes").await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["bulk_change_id"], 360);
    // One failed device of 12 is over the tolerated share: the bulk change ends ERROR.
    assert_eq!(list["items"][0]["status"], "ERROR");
    let (_, errors) = json("/api/v1/bulk-changes?status=error").await;
    assert_eq!(errors["items"].as_array().unwrap().len(), 1);
    let (_, none) = json("/api/v1/bulk-changes?status=processed").await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    // One bulk change.
    let (status, one) = json("/api/v1/bulk-changes/360").await;
    assert_eq!(status, 200);
    assert_eq!(
        (one["total"].as_i64(), one["failed"].as_i64()),
        (Some(12), Some(1))
    );
    assert_eq!(one["progress"], 1.0);
    // Its devices, paged, and by status.
    let (_, page) = json("/api/v1/bulk-changes/360/devices?limit=5").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    let next = page["next_after"].as_i64().unwrap();
    let rest = call(
        &format!("/api/v1/bulk-changes/360/devices?limit=50&after={next}"),
        Some(TOKEN),
    )
    .await
    .unwrap()
    .json::<Value>()
    .await
    .unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 7);
    assert_eq!(rest["next_after"], Value::Null);
    let (_, failed) = json("/api/v1/bulk-changes/360/devices?status=api_failed").await;
    assert_eq!(failed["items"][0]["iccid"], failing.as_str());
    // One device's timeline, with its recorded calls.
    let timeline = call(
        &format!("/api/v1/bulk-changes/360/devices/{failing}/timeline"),
        Some(TOKEN),
    )
    .await
    .unwrap()
    .json::<Value>()
    .await
    .unwrap();
    assert_eq!(timeline["status"], "API_FAILED");
    assert_eq!(
        timeline["entries"].as_array().unwrap().last().unwrap()["calls"][0]["status"],
        400
    );
    // The OpenAPI document, as checked in.
    let (status, doc) = json("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(bulkflow::api::OPENAPI).unwrap()
    );
    // Errors: JSON with a stable code.
    for (path, code, want) in [
        ("/api/v1/bulk-changes/999", 404, "not_found"),
        ("/api/v1/bulk-changes/abc", 400, "bad_request"),
        ("/api/v1/bulk-changes/-3", 400, "bad_request"),
        ("/api/v1/bulk-changes/999/devices", 404, "not_found"),
        (
            "/api/v1/bulk-changes/360/devices/8900000000/timeline",
            404,
            "not_found",
        ),
        ("/api/v1/bulk-changes?limit=0", 400, "bad_request"),
        ("/api/v1/bulk-changes?colour=red", 400, "bad_request"),
        ("/api/v1/bulk-changes?since=yesterday", 400, "bad_request"),
        ("/api/v1/nothing-here", 404, "not_found"),
    ] {
        let (status, body) = json(path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (code, Some(want)),
            "{path}: {body}"
        );
    }
    // Writes.
    let post = |path: &str, token: Option<&str>, body: Vec<u8>| {
        let mut r = http
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let new = serde_json::to_vec(&demo_request(361, 3)).unwrap();
    // Without the token nothing is accepted.
    let r = post("/api/v1/bulk-changes", None, new.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        call("/api/v1/bulk-changes/361", Some(TOKEN))
            .await
            .unwrap()
            .status(),
        404
    );
    for _ in 0..2 {
        // The same request twice: accepted both times (idempotent), queued for the workers.
        let r = post("/api/v1/bulk-changes", Some(TOKEN), new.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(r.headers()["location"], "/api/v1/bulk-changes/361");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (body["bulk_change_id"].as_i64(), body["devices"].as_i64()),
            (Some(361), Some(3))
        );
    }
    let (status, accepted) = json("/api/v1/bulk-changes/361").await;
    assert_eq!((status, accepted["total"].as_i64()), (200, Some(3)));
    assert!(
        !app.engine.queue.is_empty().await.unwrap(),
        "queued for the workers"
    );
    // Another request under the same id, an invalid one, a broken one, an oversized one.
    let other = serde_json::to_vec(&demo_request(361, 4)).unwrap();
    let mut invalid = serde_json::to_value(demo_request(362, 2)).unwrap();
    invalid["devices"][1]["iccid"] = Value::from("89-not-an-iccid");
    for (body, code, want) in [
        (other, 409, "conflict"),
        (
            serde_json::to_vec(&invalid).unwrap(),
            400,
            "invalid_request",
        ),
        (b"{not json".to_vec(), 400, "invalid_request"),
        (
            serde_json::to_vec(&demo_request(363, 20_000)).unwrap(),
            413,
            "payload_too_large",
        ),
    ] {
        let r = post("/api/v1/bulk-changes", Some(TOKEN), body)
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (code, Some(want)),
            "{body}"
        );
    }
    let (_, oversized) = json("/api/v1/bulk-changes/363").await;
    assert_eq!(
        oversized["error"]["code"], "not_found",
        "nothing written for an oversized one"
    );
    let (_, invalid_named) = json("/api/v1/bulk-changes/362").await;
    assert_eq!(
        invalid_named["error"]["code"], "not_found",
        "nothing written for an invalid one"
    );
    // Resume: only a paused one; an unknown one is not found.
    let r = post("/api/v1/bulk-changes/360/resume", Some(TOKEN), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = post("/api/v1/bulk-changes/998/resume", Some(TOKEN), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Throughput and failures by reason.
    let (status, throughput) = json("/api/v1/bulk-changes/360/throughput").await;
    assert_eq!(status, 200, "{throughput}");
    assert!(throughput["bucket_seconds"].as_i64().unwrap() >= 1);
    let ended: i64 = throughput["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_i64().unwrap())
        .sum();
    assert_eq!(ended, 12, "every device worked to an end: {throughput}");
    let (status, failures) = json("/api/v1/bulk-changes/360/failures").await;
    assert_eq!(status, 200);
    let groups = failures.as_array().unwrap();
    assert_eq!(groups.len(), 1, "{failures}");
    assert_eq!(groups[0]["status"], "API_FAILED");
    assert_eq!(groups[0]["devices"], 1);
    assert!(
        groups[0]["reason"].as_str().unwrap().contains("bad ICCID"),
        "{failures}"
    );
    assert_eq!(
        groups[0]["example_device_change_id"].as_i64(),
        Some(request.devices[4].device_change_id.get())
    );
    for path in [
        "/api/v1/bulk-changes/998/throughput",
        "/api/v1/bulk-changes/998/failures",
    ] {
        assert_eq!(json(path).await.0, 404, "{path}");
    }
    assert_eq!(
        call("/api/v1/bulk-changes/360/failures", None)
            .await
            .unwrap()
            .status(),
        401
    );
    // The dashboard's files need no token (the page asks for it); the data does.
    let page = call("/", None).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/dashboard/app.js"));
    let script = call("/dashboard/app.js", None).await.unwrap();
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(script.text().await.unwrap().contains("/api/v1"));
    // Cancel and retry-failed: unknown ids, a finished bulk change, a bad body, the token.
    for (path, code, want) in [
        ("/api/v1/bulk-changes/998/cancel", 404, "not_found"),
        ("/api/v1/bulk-changes/998/retry-failed", 404, "not_found"),
        ("/api/v1/bulk-changes/360/cancel", 409, "conflict"),
        ("/api/v1/bulk-changes/361/retry-failed", 409, "conflict"),
    ] {
        let r = post(path, Some(TOKEN), vec![]).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (code, Some(want)),
            "{path}: {body}"
        );
    }
    let r = post("/api/v1/bulk-changes/361/cancel", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = post(
        "/api/v1/bulk-changes/361/cancel",
        Some(TOKEN),
        b"{\"why\": 1}".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400, "an unknown field is refused");
    let (_, untouched) = json("/api/v1/bulk-changes/361").await;
    assert_eq!(
        untouched["status"], "NEW",
        "nothing written for a refused cancel"
    );
    for _ in 0..2 {
        // A second cancel is accepted and changes nothing.
        let body = br#"{"reason": "duplicate request", "by": "ops@example.com"}"#.to_vec();
        let r = post("/api/v1/bulk-changes/361/cancel", Some(TOKEN), body)
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "CANCELLING");
    }
    let (_, cancelling) = json("/api/v1/bulk-changes/361").await;
    assert_eq!(cancelling["status"], "CANCELLING");
    assert_eq!(
        cancelling["status_details"],
        "cancel requested by ops@example.com: duplicate request"
    );
    // Retry-failed of 360's failed device: it runs again.
    let r = post("/api/v1/bulk-changes/360/retry-failed", Some(TOKEN), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["devices"], 1);
    let (_, retried) = json("/api/v1/bulk-changes/360").await;
    assert_eq!(
        (retried["status"].as_str(), retried["failed"].as_i64()),
        (Some("PROCESSING"), Some(0))
    );
    let r = post("/api/v1/bulk-changes/360/retry-failed", Some(TOKEN), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "nothing failed any more");
    // The API's own requests are counted on /metrics (no token needed there).
    let metrics = call("/metrics", None).await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("bulkflow_api_requests_total")
                && l.contains(r#"route="/api/v1/bulk-changes/{id}/cancel""#)
                && l.contains(r#"status="202""#)),
        "{metrics}"
    );
    assert!(metrics.contains("bulkflow_api_request_seconds_bucket"));
    cancel.cancel();
}
