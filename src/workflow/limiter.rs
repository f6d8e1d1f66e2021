//! Per-downstream limits shared by every bulk change a worker runs: a token bucket (governor),
//! a concurrency cap, and a gate that holds all calls after a 429 asked to wait.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::definition::{Breaker, Limits};

pub struct Limiter {
    rate: DefaultDirectRateLimiter,
    slots: Arc<Semaphore>,
    blocked_until: Mutex<Option<Instant>>,
    max_concurrency: usize,
    timeout: Duration,
    breaker: Breaker,
}

impl Limiter {
    pub fn new(limits: &Limits) -> Self {
        let period = Duration::from_secs_f64(1.0 / limits.rate_per_second);
        let burst = NonZeroU32::new(limits.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            rate: RateLimiter::direct(quota),
            slots: Arc::new(Semaphore::new(limits.max_concurrency)),
            blocked_until: Mutex::new(None),
            max_concurrency: limits.max_concurrency,
            timeout: Duration::from_millis(limits.timeout_ms),
            breaker: limits.breaker.clone(),
        }
    }

    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// When an outage holds the downstream.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The downstream's request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits for a concurrency slot, any 429 back-off, and a rate token.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("limiter semaphore is never closed");
        loop {
            let until = *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        self.rate.until_ready().await;
        permit
    }

    /// Holds every call to this downstream for `secs` (a server's wait hint).
    pub fn back_off(&self, secs: u64) {
        let Some(until) = Instant::now().checked_add(Duration::from_secs(secs)) else {
            return;
        };
        let mut blocked = self.blocked_until.lock().unwrap_or_else(|p| p.into_inner());
        if blocked.is_none_or(|t| t < until) {
            *blocked = Some(until);
        }
    }
}
