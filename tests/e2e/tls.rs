//! The real clients speak HTTPS, as they do to the real POND and Rev: the simulator behind a
//! TLS front whose certificate comes from a private CA (tests/fixtures/tls). Trusted through
//! `SSL_CERT_FILE`, a bulk change runs; not trusted, it pauses with the reason (no device fails,
//! nothing is created) and, once the CA is trusted, resumes to the end; a trust store that cannot
//! be loaded stops the worker at start with the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bulkflow::sim::fixtures::demo_request;
use bulkflow::sim::{FaultProfile, SimAuth, Simulator};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::cli::bulkflow_with;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// Handshakes a TLS front completed and refused.
#[derive(Default)]
struct Front {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

/// Terminates TLS on a loopback port (certificate for `localhost` and 127.0.0.1) and passes the
/// plain bytes on to `upstream`, as a carrier's load balancer does.
async fn tls_front(upstream: SocketAddr) -> (SocketAddr, Arc<Front>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let front = Arc::new(Front::default());
    let counts = front.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counts) = (acceptor.clone(), counts.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        counts.accepted.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    }
                    Err(_) => {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, front)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_an_untrusted_carrier_pauses_the_bulk_change_and_a_trusted_one_completes_it() {
    let sim = Simulator::new(SimAuth::default(), FaultProfile::None, 3);
    let (plain, _server) = sim.start("127.0.0.1:0").await.unwrap();
    let (addr, front) = tls_front(plain).await;
    let base = format!("https://localhost:{}", addr.port());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, serde_json::to_vec(&demo_request(811, 12)).unwrap()).unwrap();
    let run = {
        let (d, base, auth) = (dir.path().to_path_buf(), base.clone(), sim.auth().clone());
        move |args: Vec<String>, ca: Option<PathBuf>| {
            let (d, base, auth) = (d.clone(), base.clone(), auth.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let extra: Vec<(&str, &Path)> = ca
                        .iter()
                        .map(|ca| ("SSL_CERT_FILE", ca.as_path()))
                        .collect();
                    bulkflow_with(&d, &base, &auth, &args, &extra)
                })
                .await
                .unwrap()
            }
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let submit = run(args(&["submit", file.to_str().unwrap()]), None).await;
    assert!(submit.status.success(), "{}", text(&submit.stderr));
    // The system's trust store does not hold the test CA.
    let untrusted = run(args(&["worker", "--exit-when-idle"]), None).await;
    assert!(untrusted.status.success(), "{}", text(&untrusted.stderr));
    let paused = run(args(&["status", "811", "--json"]), None).await;
    let paused: serde_json::Value = serde_json::from_slice(&paused.stdout).unwrap();
    assert_eq!(paused["status"], "PAUSED", "{paused}");
    let reason = paused["status_details"].as_str().unwrap_or_default();
    assert!(
        reason.contains("certificate is not accepted") && reason.contains("SSL_CERT_FILE"),
        "{reason}"
    );
    assert_eq!(
        paused["failed"], 0,
        "no device fails for the carrier's TLS: {paused}"
    );
    assert!(front.refused.load(Ordering::SeqCst) >= 1);
    assert_eq!(front.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(
        sim.report().pond_calls,
        0,
        "nothing reached the carrier through a refused handshake"
    );
    // The recorded call says why, and names no URL twice nor any secret.
    let logs = text(&untrusted.stderr);
    assert!(!logs.contains(&sim.auth().api_key) && !logs.contains(&sim.auth().rev_password));

    // A trust store that cannot be loaded is named at start, not met as a panic mid-run.
    let missing = dir.path().join("no-such-ca.pem");
    let broken = run(args(&["worker", "--exit-when-idle"]), Some(missing)).await;
    let err = text(&broken.stderr);
    assert!(!broken.status.success(), "{err}");
    assert!(
        err.contains("TLS: no trusted CA certificate could be loaded")
            && err.contains("SSL_CERT_FILE")
            && !err.contains("panicked"),
        "{err}"
    );

    // The operator trusts the CA and resumes.
    let resume = run(args(&["resume", "811"]), None).await;
    assert!(resume.status.success(), "{}", text(&resume.stderr));
    let trusted = run(
        args(&["worker", "--exit-when-idle"]),
        Some(fixture("ca.pem")),
    )
    .await;
    assert!(trusted.status.success(), "{}", text(&trusted.stderr));
    let done = run(args(&["status", "811", "--json"]), None).await;
    let done: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(done["status"], "PROCESSED", "{done}");
    assert_eq!(done["processed"], 12, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    assert!(front.accepted.load(Ordering::SeqCst) >= 1);
    let report = sim.report();
    assert!(report.pond_status_reads >= 12, "{report:?}");
    assert_eq!(report.rev_duplicate_numbers, 0);
}
