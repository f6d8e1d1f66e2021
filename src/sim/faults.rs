//! Fault injection: named profiles of random faults (seeded) and per-ICCID scripts.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// One injected behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this status and body instead of doing the work.
    Status { status: u16, body: String },
    /// 429 with `Retry-After` and Rev's "Try again in N seconds".
    RateLimited { retry_after_secs: u64 },
    /// Do the work after a delay.
    Slow { ms: u64 },
    /// Wait, then answer 504 without doing the work (clients with a shorter timeout see a timeout).
    Hang { ms: u64 },
    /// Rev create only: create the service, then wait and answer 504 (the response is "lost").
    AfterEffectHang { ms: u64 },
}

/// A fault for one ICCID, for some operation(s), some number of times.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Script {
    /// `get_status`, `set_status`, `purge`, `rev_create`, `rev_product`, or `*`.
    pub op: String,
    pub fault: Fault,
    /// How many calls it affects; `None` = every call.
    #[serde(default)]
    pub times: Option<u32>,
    /// Only calls of these attempts (from POND's `RequestId` header, which bulkflow ends with
    /// the attempt number): a repeated attempt meets the same fault. `None` = any call.
    #[serde(default)]
    pub attempts: Option<Vec<u32>>,
}

impl Script {
    pub fn always(op: &str, fault: Fault) -> Self {
        Self {
            op: op.into(),
            fault,
            times: None,
            attempts: None,
        }
    }

    /// Affects every call made for one of `attempts` (never used up).
    pub fn on_attempts(op: &str, fault: Fault, attempts: &[u32]) -> Self {
        Self {
            op: op.into(),
            fault,
            times: None,
            attempts: Some(attempts.to_vec()),
        }
    }

    pub fn times(op: &str, fault: Fault, times: u32) -> Self {
        Self {
            op: op.into(),
            fault,
            times: Some(times),
            attempts: None,
        }
    }

    pub(super) fn applies(&self, op: &str, attempt: Option<u32>) -> bool {
        let op_matches = self.op == "*" || self.op == op;
        let attempt_matches = match (&self.attempts, attempt) {
            (None, _) => true,
            (Some(list), Some(a)) => list.contains(&a),
            (Some(_), None) => false,
        };
        op_matches && attempt_matches
    }

    /// Uses one application; true when the script is spent.
    pub(super) fn consume(&mut self) -> bool {
        match &mut self.times {
            None => false,
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
        }
    }
}

/// Named random-fault profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultProfile {
    None,
    /// 4 % 5xx, 0.5 % 429 (wait 1 s; bulkflow holds all calls to that API meanwhile), 2 % hangs of 1.5 s (a timeout for clients waiting less; half of those on writes
    /// after doing the work),
    /// 5 % slow responses (50–300 ms).
    Flaky,
}

impl std::str::FromStr for FaultProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "flaky" => Ok(Self::Flaky),
            other => Err(format!(
                "unknown fault profile {other:?}; expected none or flaky"
            )),
        }
    }
}

pub(super) struct Injector {
    profile: FaultProfile,
    rng: SmallRng,
}

impl Default for Injector {
    fn default() -> Self {
        Self::new(FaultProfile::None, 0)
    }
}

impl Injector {
    pub(super) fn new(profile: FaultProfile, seed: u64) -> Self {
        Self {
            profile,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// A random fault for `op`, or none. Half the hangs of writes happen after the work was done
    /// (the response is lost), the case that makes non-idempotent calls dangerous.
    pub(super) fn draw(&mut self, op: &str) -> Option<Fault> {
        match self.profile {
            FaultProfile::None => None,
            FaultProfile::Flaky => {
                let x: f64 = self.rng.random();
                if x < 0.04 {
                    Some(Fault::Status {
                        status: if x < 0.02 { 500 } else { 503 },
                        body: r#"{"status":503,"code":"UNAVAILABLE","message":"try later"}"#.into(),
                    })
                } else if x < 0.045 {
                    Some(Fault::RateLimited {
                        retry_after_secs: 1,
                    })
                } else if x < 0.065 {
                    if op != "get_status" && x < 0.055 {
                        Some(Fault::AfterEffectHang { ms: 1_500 })
                    } else {
                        Some(Fault::Hang { ms: 1_500 })
                    }
                } else if x < 0.115 {
                    Some(Fault::Slow {
                        ms: self.rng.random_range(50..300),
                    })
                } else {
                    None
                }
            }
        }
    }
}
