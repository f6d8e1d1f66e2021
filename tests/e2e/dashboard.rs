//! The dashboard in headless Chromium: while a 2,000-device bulk change runs against the
//! simulator, its page shows the progress rising; its Cancel button stops it; the page then shows
//! CANCELLED with the counts the read models hold. Screenshots go under `target/tmp/dashboard/`.

use std::time::Duration;

use bulkflow::domain::BulkChangeStatus;
use bulkflow::sim::fixtures::billable_request;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};
use bulkflow::workflow::RunOutcome;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::browser::Browser;
use crate::helpers::{Backend, TestApp};

const TOKEN: &str = "dashboard-test-token-0123456789";

#[sqlx::test]
async fn the_dashboard_shows_progress_and_its_cancel_button_stops_the_bulk_change(
    pool: sqlx::PgPool,
) {
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 5)
        .with_suspended_sims()
        .with_latency(Duration::from_millis(20));
    // 150 POND calls a second: the 2,000 devices would take about half a minute.
    let app = TestApp::start_with_sim(Backend::Postgres(pool), sim, |c| {
        c.limits.pond.as_mut().unwrap().rate_per_second = 150.0;
    })
    .await;
    let request = billable_request(150, 2_000);
    let id = app.engine.submit(request.clone(), false).await.unwrap();
    let driver = app.engine.clone();
    let run = tokio::spawn(async move { driver.run(id, &CancellationToken::new(), None).await });
    // The API and dashboard in their own engine, as `bulkflow serve` beside a worker.
    let stop = CancellationToken::new();
    let (addr, _server) = bulkflow::api::serve(
        "127.0.0.1:0".parse().unwrap(),
        app.another_engine(),
        None,
        SecretString::from(TOKEN),
        1 << 20,
        stop.clone(),
    )
    .await
    .unwrap();
    // The worker's projector keeps the read models up to date meanwhile.
    let projecting = tokio::spawn(app.engine.projector.clone().run(stop.child_token()));

    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/#/bulk/{id}")).await;
    // Signing in with the operator token.
    browser
        .wait_for(
            "the sign-in form",
            "!!document.querySelector('#login')",
            Duration::from_secs(10),
        )
        .await;
    browser
        .eval(&format!(
            "document.querySelector('#token').value = '{TOKEN}'; document.querySelector('#login').requestSubmit(); true"
        ))
        .await;
    let finished = "Number(document.querySelector('#progress')?.dataset.finished || 0)";
    let first = browser
        .wait_for("devices to finish", finished, Duration::from_secs(30))
        .await
        .as_i64()
        .unwrap();
    let rising = format!("{finished} >= {} ? {finished} : 0", first + 100);
    let later = browser
        .wait_for("the progress to rise", &rising, Duration::from_secs(30))
        .await
        .as_i64()
        .unwrap();
    assert!(later > first && later < 2_000, "{first} then {later}");
    assert_eq!(
        browser
            .eval("document.querySelector('#status').dataset.status")
            .await,
        "PROCESSING"
    );
    browser
        .wait_for(
            "the throughput chart",
            "!!document.querySelector('#chart rect')",
            Duration::from_secs(10),
        )
        .await;
    browser.screenshot(&shots.join("running.png")).await;

    // Cancel, through the confirmation.
    assert_eq!(
        browser
            .eval("document.querySelector('#cancel').disabled")
            .await,
        false
    );
    browser
        .eval("document.querySelector('#cancel').click(); !document.querySelector('#cancel-confirm').hidden")
        .await;
    browser
        .eval("document.querySelector('#cancel-reason').value = 'wrong SIM list'; document.querySelector('#cancel-go').click(); true")
        .await;
    browser
        .wait_for(
            "CANCELLED on the page",
            "document.querySelector('#status')?.dataset.status === 'CANCELLED'",
            Duration::from_secs(60),
        )
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, RunOutcome::Completed(BulkChangeStatus::Cancelled));
    // The page's counts are the read models'.
    app.engine.projector.catch_up().await.unwrap();
    let summary = bulkflow::projections::read::bulk_summary(&app.db, id)
        .await
        .unwrap()
        .unwrap();
    browser
        .wait_for(
            "the final counts",
            &format!(
                "Number(document.querySelector('#progress').dataset.cancelled) === {}",
                summary.cancelled
            ),
            Duration::from_secs(10),
        )
        .await;
    let counts = browser
        .eval("(() => { const d = document.querySelector('#progress').dataset; return [d.processed, d.failed, d.cancelled, d.total].map(Number); })()")
        .await;
    let counts: Vec<i64> = serde_json::from_value(counts).unwrap();
    assert_eq!(
        counts,
        vec![summary.processed, summary.failed, summary.cancelled, 2_000]
    );
    assert_eq!(counts[0] + counts[1] + counts[2], 2_000);
    assert!(counts[0] >= later && counts[2] > 0, "{counts:?}");
    let details = browser
        .eval("document.querySelector('#details').textContent")
        .await;
    assert!(
        details.as_str().unwrap().contains("wrong SIM list"),
        "{details}"
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#cancel').disabled")
            .await,
        true,
        "a cancelled bulk change cannot be cancelled again"
    );
    browser.screenshot(&shots.join("cancelled.png")).await;

    // The list shows it CANCELLED.
    browser.goto(&format!("http://{addr}/#/")).await;
    browser
        .wait_for(
            "the list",
            &format!("document.querySelector('#bulk-list tr[data-id=\"{id}\"]')?.dataset.status === 'CANCELLED'"),
            Duration::from_secs(10),
        )
        .await;
    browser.screenshot(&shots.join("list.png")).await;

    // One processed device's timeline, with its recorded calls.
    let device = bulkflow::projections::read::devices(&app.db, id, Some("PROCESSED"), None, 1)
        .await
        .unwrap()
        .remove(0);
    browser
        .goto(&format!(
            "http://{addr}/#/bulk/{id}/device/{}",
            device.device_change_id
        ))
        .await;
    let steps = browser
        .wait_for(
            "the device's timeline",
            "document.querySelectorAll('#timeline tr[data-outcome=\"ok\"]').length",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(steps, 3, "device status, service status and Rev service");
    let calls = browser
        .eval("[...document.querySelectorAll('#timeline summary')].map(s => s.textContent).join('\\n')")
        .await;
    assert!(
        calls.as_str().unwrap().contains("POST")
            && calls.as_str().unwrap().contains("/v1/Services"),
        "{calls}"
    );
    browser.screenshot(&shots.join("device.png")).await;
    stop.cancel();
    let _ = projecting.await;
    println!("screenshots in {}", shots.display());
}
