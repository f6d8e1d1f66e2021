//! The part of a workflow definition that decides outcomes: retry policies per step and the
//! tolerated-failure threshold. It is recorded in `BulkChangeAccepted`, so a bulk change runs to
//! its end under the policy it started with even if the definition file changes.

use chrono::Duration;
use serde::{Deserialize, Serialize};

use super::ids::{BulkChangeId, DeviceChangeId};
use super::status::Step;

/// Exponential backoff with deterministic jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub multiplier: f64,
    pub max_delay_ms: u64,
    /// Fraction (0..=1) of the delay that may be taken off, seeded from the ids and the attempt.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Delay before the attempt after `failed_attempt`, honouring a server's wait hint.
    ///
    /// A pure function of its arguments: the same history always yields the same schedule.
    pub fn delay(
        &self,
        bulk_change_id: BulkChangeId,
        device_change_id: DeviceChangeId,
        step: Step,
        failed_attempt: u32,
        retry_after_secs: Option<u64>,
    ) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(63) as i32;
        let base = (self.initial_delay_ms as f64) * self.multiplier.powi(exponent);
        let capped = base.min(self.max_delay_ms as f64).max(0.0);
        let unit = unit_interval(&[
            bulk_change_id.get() as u64,
            device_change_id.get() as u64,
            step as u64,
            u64::from(failed_attempt),
        ]);
        let jittered = capped * (1.0 - self.jitter.clamp(0.0, 1.0) * unit);
        let hinted = retry_after_secs.map_or(0.0, |s| (s as f64) * 1000.0);
        Duration::milliseconds(jittered.max(hinted).round() as i64)
    }
}

/// A number in `[0, 1)` derived from `parts` with splitmix64: stable across builds and platforms.
fn unit_interval(parts: &[u64]) -> f64 {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for part in parts {
        state ^= part.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        state = splitmix64(state);
    }
    (state >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Outcome rules of one workflow version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub device_status: RetryPolicy,
    pub service_status: RetryPolicy,
    pub rev_service: RetryPolicy,
    /// A completed bulk change is `ERROR` when more than this share of its devices failed.
    pub tolerated_failure_percent: f64,
}

impl Policy {
    pub fn retry(&self, step: Step) -> &RetryPolicy {
        match step {
            Step::DeviceStatus => &self.device_status,
            Step::ServiceStatus => &self.service_status,
            Step::RevService => &self.rev_service,
        }
    }
}

/// Which workflow definition a bulk change runs under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowRef {
    pub name: String,
    pub version: u32,
    /// SHA-256 of the definition file, hex.
    pub hash: String,
    pub policy: Policy,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_delay_ms: 100,
            multiplier: 2.0,
            max_delay_ms: 1_000,
            jitter: 0.5,
        }
    }

    fn ids() -> (BulkChangeId, DeviceChangeId) {
        (
            BulkChangeId::new(7).unwrap(),
            DeviceChangeId::new(11).unwrap(),
        )
    }

    #[test]
    fn delay_is_deterministic_and_grows_until_the_cap() {
        let (b, d) = ids();
        let p = policy();
        let first = p.delay(b, d, Step::DeviceStatus, 1, None);
        assert_eq!(first, p.delay(b, d, Step::DeviceStatus, 1, None));
        assert!(first.num_milliseconds() > 50 && first.num_milliseconds() <= 100);
        let fifth = p.delay(b, d, Step::DeviceStatus, 5, None);
        assert!(fifth.num_milliseconds() >= 500 && fifth.num_milliseconds() <= 1_000);
    }

    #[test]
    fn jitter_differs_between_devices() {
        let p = policy();
        let b = BulkChangeId::new(7).unwrap();
        let delays: std::collections::HashSet<i64> = (1..20)
            .map(|d| {
                p.delay(
                    b,
                    DeviceChangeId::new(d).unwrap(),
                    Step::RevService,
                    2,
                    None,
                )
                .num_milliseconds()
            })
            .collect();
        assert!(delays.len() > 5, "{delays:?}");
    }

    #[test]
    fn server_wait_hint_wins_when_longer() {
        let (b, d) = ids();
        let delay = policy().delay(b, d, Step::RevService, 1, Some(30));
        assert_eq!(delay.num_milliseconds(), 30_000);
    }
}
