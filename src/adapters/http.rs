//! One HTTP exchange, recorded and classified.

use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::domain::bulk_change::FailureClass;
use crate::domain::ApiCall;

/// Longest response body kept in an event.
const MAX_BODY: usize = 4_000;
/// Most of a response body read at all: the rest of an over-long body is not downloaded (no
/// answer bulkflow reads is anywhere near this long).
const MAX_READ: usize = 1 << 20;

/// A failed step attempt: how to treat it, why, and the calls made.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub class: FailureClass,
    pub reason: String,
    pub calls: Vec<ApiCall>,
}

impl Failure {
    /// Nothing was sent (and nothing is counted against the step's attempts): due again at once.
    pub fn not_sent(reason: &str, calls: Vec<ApiCall>) -> Self {
        Self {
            class: FailureClass::Retryable {
                retry_after_secs: None,
                outcome_unknown: false,
                throttled: false,
                not_sent: true,
            },
            reason: reason.to_string(),
            calls,
        }
    }
}

/// The result of sending one request.
pub struct Exchange {
    pub call: ApiCall,
    pub status: Option<StatusCode>,
    pub body: String,
    /// The TLS handshake refused the server (its certificate, or what it offered): no request
    /// was sent, and no retry can change it until the trust store or the base URL is fixed.
    pub tls_refused: bool,
}

/// Builds a shared client with the engine's settings. Fails, naming the cause, when no trusted
/// CA certificate can be loaded (a machine without its CA bundle, `SSL_CERT_FILE` naming a file
/// that is missing or holds none): a carrier's HTTPS could not be verified.
pub fn client(timeout: Duration) -> Result<reqwest::Client, crate::config::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        // A carrier's API answers where it was asked: a redirect is recorded as the answer, not
        // followed (following one would send a POST's body, or the credentials, elsewhere).
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            let mut why = String::new();
            let mut next = std::error::Error::source(&e);
            while let Some(cause) = next {
                why = cause.to_string();
                next = cause.source();
            }
            crate::config::Error::Tls(format!(
                "no trusted CA certificate could be loaded ({why}); install the system's CA \
                 bundle (ca-certificates) or set SSL_CERT_FILE to a PEM file of the CAs to trust"
            ))
        })
}

/// Sends `builder` (which already carries credentials) and records the exchange.
/// `url` and `body` are what the record shows; they must not contain secrets.
pub async fn send(
    point: &str,
    builder: RequestBuilder,
    method: &Method,
    url: &str,
    body: Option<&Value>,
    request_id: Option<String>,
) -> Exchange {
    let started_at = Utc::now();
    let clock = Instant::now();
    let failpoints = cfg!(feature = "failpoints");
    let sent = if failpoints {
        format!("{point}.request_sent")
    } else {
        String::new()
    };
    let result = if failpoints && crate::failpoints::is_armed(&sent) {
        // Let the request reach the server, then crash before its response is read.
        let in_flight = tokio::spawn(builder.send());
        // (the crash tests check that the server saw it by then)
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        crate::failpoints::hit(&sent);
        match in_flight.await {
            Ok(result) => result,
            Err(_) => unreachable!("the request task is never cancelled"),
        }
    } else {
        builder.send().await
    };
    if failpoints {
        crate::failpoints::hit(&format!("{point}.response_received"));
    }
    let mut tls_refused = false;
    let (status, text, error, retry_after) = match result {
        Ok(response) => {
            let status = response.status();
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            };
            let retry_after = header(reqwest::header::RETRY_AFTER)
                .and_then(|v| wait_hint(v, header(reqwest::header::DATE), Utc::now()));
            match read_capped(response).await {
                Ok(text) => (Some(status), text, None, retry_after),
                Err(e) => (Some(status), String::new(), Some(describe(&e)), retry_after),
            }
        }
        Err(e) => {
            let tls = tls_problem(&e);
            tls_refused = tls.as_ref().is_some_and(|t| t.refused);
            let error = match tls {
                Some(t) => t.what,
                None => describe(&e),
            };
            (None, String::new(), Some(error), None)
        }
    };
    crate::metrics::carrier_call(point, status.map(|s| s.as_u16()), clock.elapsed());
    // (a success needs no wait hint: its body is not searched for one)
    let retry_after = match status {
        Some(s) if s.is_success() => retry_after,
        _ => retry_after.or_else(|| try_again_in(&text)),
    };
    // At most MAX_BODY characters (a body of no more bytes than that has no more characters).
    let kept: String = if text.len() <= MAX_BODY {
        text.clone()
    } else {
        text.chars().take(MAX_BODY).collect()
    };
    Exchange {
        call: ApiCall {
            method: method.to_string(),
            url: url.to_string(),
            request_body: body.cloned(),
            status: status.map(|s| s.as_u16()),
            response_body: (!kept.is_empty()).then_some(kept),
            error,
            retry_after_secs: retry_after,
            request_id,
            started_at,
            duration_ms: clock.elapsed().as_millis() as u64,
        },
        status,
        body: text,
        tls_refused,
    }
}

/// The body as text, at most [`MAX_READ`] bytes of it (the rest is dropped unread).
async fn read_capped(mut response: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_READ - bytes.len();
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() >= MAX_READ {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What went wrong in TLS, if anything did.
struct TlsProblem {
    /// In words, without the URL.
    what: String,
    /// The handshake refused the server: a configuration problem, not a passing one.
    refused: bool,
}

/// The TLS error under a transport error (rustls's, which sits inside an `io::Error` that the
/// `source()` chain skips over), in words an operator can act on.
fn tls_problem(e: &reqwest::Error) -> Option<TlsProblem> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        let tls = err
            .downcast_ref::<rustls::Error>()
            .or_else(|| inner.and_then(|i| i.downcast_ref::<rustls::Error>()));
        if let Some(tls) = tls {
            return Some(match tls {
                rustls::Error::InvalidCertificate(why) => TlsProblem {
                    what: format!(
                        "TLS: the server's certificate is not accepted ({why:?}); trust its CA \
                         (SSL_CERT_FILE) or fix the base URL, then resume the bulk change"
                    ),
                    refused: true,
                },
                rustls::Error::PeerIncompatible(why) => TlsProblem {
                    what: format!("TLS: the server offers nothing bulkflow accepts ({why:?})"),
                    refused: true,
                },
                rustls::Error::InvalidMessage(_) => TlsProblem {
                    what: format!(
                        "TLS: the server did not answer in TLS ({tls}); is the base URL's scheme right?"
                    ),
                    refused: true,
                },
                other => TlsProblem {
                    what: format!("TLS error: {other}"),
                    refused: false,
                },
            });
        }
        next = inner.or_else(|| err.source());
    }
    None
}

/// A transport error in words, without the URL (which reqwest would include).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out waiting for the response".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else if e.is_body() || e.is_decode() {
        "response body could not be read".into()
    } else {
        "request failed before a response arrived".into()
    }
}

/// A `Retry-After` value in seconds. RFC 9110 allows two forms: a number of seconds, or an
/// HTTP-date (what many gateways and load balancers send). A date is measured from the response's
/// own `Date` when it has one (the server's clock, so a skewed local clock does not stretch or
/// shrink the wait), else from `now`; a date already past means no wait; rounded up to a second.
fn wait_hint(value: &str, date: Option<&str>, now: chrono::DateTime<Utc>) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs);
    }
    let at = http_date(value)?;
    let from = date.and_then(http_date).unwrap_or(now);
    let millis = (at - from).num_milliseconds().max(0);
    Some((millis as u64).div_ceil(1_000))
}

/// An HTTP-date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`; RFC 2822 parsing also reads the
/// obsolete forms that carry a weekday and a zone).
fn http_date(value: &str) -> Option<chrono::DateTime<Utc>> {
    chrono::DateTime::parse_from_rfc2822(value.trim())
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// Rev's 429 body says "Try again in N seconds".
fn try_again_in(body: &str) -> Option<u64> {
    let lower = body.to_ascii_lowercase();
    let rest = &lower[lower.find("try again in")? + "try again in".len()..];
    rest.split_whitespace()
        .next()?
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

impl Exchange {
    pub fn is_success(&self) -> bool {
        self.status.is_some_and(|s| s.is_success())
    }

    /// How a non-success exchange is treated. `idempotent` says whether a lost response leaves the
    /// outcome unknown (it does for non-idempotent calls).
    pub fn failure(self, what: &str, idempotent: bool, mut earlier: Vec<ApiCall>) -> Failure {
        let (class, reason) = match self.status {
            // A refused handshake sent nothing, and every call to this server will be refused
            // the same way: the bulk change pauses with the reason instead of failing every
            // device after its retries (as for rejected credentials).
            None if self.tls_refused => (
                FailureClass::Systemic,
                format!("{what}: {}", self.call.error.clone().unwrap_or_default()),
            ),
            None => (
                FailureClass::Retryable {
                    retry_after_secs: None,
                    outcome_unknown: !idempotent,
                    throttled: false,
                    not_sent: false,
                },
                format!(
                    "{what}: {}",
                    self.call
                        .error
                        .clone()
                        .unwrap_or_else(|| "no response".into())
                ),
            ),
            Some(StatusCode::TOO_MANY_REQUESTS) => (
                FailureClass::Retryable {
                    retry_after_secs: self.call.retry_after_secs,
                    outcome_unknown: false,
                    throttled: true,
                    not_sent: false,
                },
                format!("{what}: 429 rate limited"),
            ),
            Some(s) if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => (
                FailureClass::Systemic,
                format!(
                    "{what}: {} {} - credentials rejected; fix them and resume the bulk change",
                    s.as_u16(),
                    s.canonical_reason().unwrap_or("")
                ),
            ),
            Some(s) if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => (
                FailureClass::Retryable {
                    retry_after_secs: self.call.retry_after_secs,
                    outcome_unknown: !idempotent,
                    throttled: false,
                    not_sent: false,
                },
                format!("{what}: {} {}", s.as_u16(), short(&self.body)),
            ),
            Some(s) => (
                FailureClass::Permanent,
                format!("{what}: {} {}", s.as_u16(), short(&self.body)),
            ),
        };
        earlier.push(self.call);
        Failure {
            class,
            reason: reason.trim().to_string(),
            calls: earlier,
        }
    }
}

fn short(body: &str) -> String {
    body.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_revs_wait_hint() {
        assert_eq!(
            super::try_again_in("Rate limit is exceeded. Try again in 12 seconds."),
            Some(12)
        );
        assert_eq!(super::try_again_in("nothing"), None);
    }

    #[test]
    fn reads_both_forms_of_retry_after() {
        use super::wait_hint;
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(wait_hint(" 7 ", None, now), Some(7));
        // An HTTP-date, measured from the local clock when the response has no Date...
        assert_eq!(
            wait_hint("Thu, 03 Dec 2026 10:00:30 GMT", None, now),
            Some(30)
        );
        // ... and from the server's Date when it has one (here the local clock is 10 s behind).
        assert_eq!(
            wait_hint(
                "Thu, 03 Dec 2026 10:00:30 GMT",
                Some("Thu, 03 Dec 2026 10:00:10 GMT"),
                now
            ),
            Some(20)
        );
        // A date already past: no wait. A part-second rounds up.
        assert_eq!(
            wait_hint("Thu, 03 Dec 2026 09:59:00 GMT", None, now),
            Some(0)
        );
        let later = now + chrono::Duration::milliseconds(200);
        assert_eq!(
            wait_hint("Thu, 03 Dec 2026 10:00:05 GMT", None, later),
            Some(5)
        );
        // Neither form: no hint (the step's own backoff applies).
        assert_eq!(wait_hint("soon", None, now), None);
        assert_eq!(wait_hint("-3", None, now), None);
    }

    /// Serves `app` on a loopback port and sends `GET {scheme}://{addr}/sim` through [`super::send`].
    async fn get_from(app: axum::Router, scheme: &str) -> (super::Exchange, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = super::client(std::time::Duration::from_secs(5)).unwrap();
        let url = format!("{scheme}://{addr}/sim");
        let exchange = super::send(
            "pond.read",
            client.get(&url),
            &reqwest::Method::GET,
            &url,
            None,
            None,
        )
        .await;
        (exchange, addr)
    }

    /// An `https://` base URL on a port that answers in plain HTTP: the handshake is refused,
    /// named as such, and the failure is systemic (the bulk change pauses) with nothing sent.
    #[tokio::test]
    async fn https_to_a_plain_port_is_refused_and_named() {
        let app = axum::Router::new().route("/sim", axum::routing::get(|| async { "plain" }));
        let (exchange, addr) = get_from(app, "https").await;
        assert_eq!(exchange.call.status, None);
        assert!(exchange.tls_refused);
        let error = exchange.call.error.clone().unwrap();
        assert!(error.contains("did not answer in TLS"), "{error}");
        assert!(
            !error.contains(&addr.to_string()),
            "no URL in the error: {error}"
        );
        let failure = exchange.failure("POND get SIM status", true, vec![]);
        assert_eq!(
            failure.class,
            crate::domain::bulk_change::FailureClass::Systemic
        );
    }

    #[tokio::test]
    async fn a_gateways_dated_retry_after_is_read() {
        let app = axum::Router::new().route(
            "/sim",
            axum::routing::get(|| async {
                let now = chrono::Utc::now();
                let at = now + chrono::Duration::seconds(45);
                let fmt = "%a, %d %b %Y %H:%M:%S GMT";
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    [
                        ("Retry-After", at.format(fmt).to_string()),
                        ("Date", now.format(fmt).to_string()),
                    ],
                    "<html><body>503 Service Temporarily Unavailable</body></html>",
                )
            }),
        );
        let (exchange, _) = get_from(app, "http").await;
        assert_eq!(exchange.call.status, Some(503));
        // (both headers carry whole seconds of the same instant: exactly 45)
        assert_eq!(exchange.call.retry_after_secs, Some(45));
    }

    #[tokio::test]
    async fn a_redirect_is_recorded_as_the_answer_not_followed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let followed = Arc::new(AtomicUsize::new(0));
        let counter = followed.clone();
        let app = axum::Router::new()
            .route(
                "/services",
                axum::routing::post(|| async { axum::response::Redirect::temporary("/elsewhere") }),
            )
            .route(
                "/elsewhere",
                axum::routing::any(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { "created" }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = super::client(std::time::Duration::from_secs(5)).unwrap();
        let url = format!("http://{addr}/services");
        let body = serde_json::json!({"number": "1555"});
        let exchange = super::send(
            "rev.create",
            client.post(&url).json(&body),
            &reqwest::Method::POST,
            &url,
            Some(&body),
            None,
        )
        .await;
        assert_eq!(exchange.call.status, Some(307));
        assert_eq!(
            followed.load(Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
        assert!(!exchange.is_success());
    }
}
