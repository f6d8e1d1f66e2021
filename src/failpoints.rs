//! Named crash points, for tests that must crash the process at a precise instant (between a
//! request being sent, its response arriving, and the outcome being committed).
//!
//! Compiled in only with the `failpoints` feature (the test script enables it; release builds
//! do not). Armed by `BULKFLOW_FAILPOINT=<name>` or `<name>@<n>` (crash on the n-th hit): the
//! process aborts at once, as a `kill -9` would end it.
//!
//! Points: `<call>.request_sent`, `<call>.response_received` for `pond.get_status`,
//! `pond.set_status`, `pond.purge`, `rev.find`, `rev.create`; `rev.intent_committed`;
//! `results.before_commit`, `results.appending`, `results.appended` (inside the commit in
//! flight, while other calls run: before its append, and after it but before the runner took
//! it in), `results.after_commit`; `accept.chunk_appended` (a request read as a
//! stream, after each part appended inside its transaction).
//!
//! `BULKFLOW_FAILPOINT=panic:<name>[@<n>]` panics at the point instead (the task it runs in
//! unwinds; the process lives on), for the tests of what a panicking step becomes.

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    static POINT: OnceLock<Option<(String, u32)>> = OnceLock::new();
    static PANIC: OnceLock<bool> = OnceLock::new();

    fn panics() -> bool {
        *PANIC.get_or_init(|| {
            std::env::var("BULKFLOW_FAILPOINT").is_ok_and(|s| s.starts_with("panic:"))
        })
    }
    static HITS: AtomicU32 = AtomicU32::new(0);

    fn point() -> Option<&'static (String, u32)> {
        POINT
            .get_or_init(|| {
                let spec = std::env::var("BULKFLOW_FAILPOINT").ok()?;
                let spec = spec.strip_prefix("panic:").unwrap_or(&spec).to_string();
                let (name, n) = match spec.split_once('@') {
                    Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                    None => (spec, 1),
                };
                Some((name, n.max(1)))
            })
            .as_ref()
    }

    pub fn is_armed(name: &str) -> bool {
        point().is_some_and(|(armed, _)| armed == name)
    }

    pub fn hit(name: &str) {
        if let Some((armed, n)) = point() {
            if armed == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
                if panics() {
                    panic!("failpoint {name}: panicking");
                }
                eprintln!("failpoint {name}: crashing");
                std::process::abort();
            }
        }
    }
}

/// Crashes the process here when this point is armed.
#[inline]
pub fn hit(_name: &str) {
    #[cfg(feature = "failpoints")]
    armed::hit(_name);
}

/// Whether this point is armed (so a caller can set up the instant, e.g. a request in flight).
#[inline]
pub fn is_armed(_name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    return armed::is_armed(_name);
    #[cfg(not(feature = "failpoints"))]
    false
}
