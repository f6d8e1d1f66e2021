//! The circuit breaker of one downstream within a run: when calls keep failing as in an outage,
//! the runner holds the downstream (recorded as `DownstreamHeld`, so devices are not charged with
//! the failures) and sends one probe call now and then; the first probe that gets an answer
//! resumes it (`DownstreamResumed`). The decisions are recorded; this is only the runner's
//! memory of when to probe next.

use std::time::Duration;

use tokio::time::Instant;

use super::definition::Breaker;
use crate::domain::bulk_change::{FailureClass, StepOutcome, StepReport};
use crate::domain::DeviceChangeId;

/// What an outcome says about the downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// 5xx, timeout, connection refused or reset: it may be down.
    Outage,
    /// It answered (a success, a 429, a device's own error).
    Answered,
    /// Nothing was sent.
    Nothing,
}

fn signal(outcome: &StepOutcome) -> Signal {
    match outcome {
        StepOutcome::Failed {
            class: FailureClass::Retryable { not_sent: true, .. },
            ..
        } => Signal::Nothing,
        StepOutcome::Failed {
            class: FailureClass::Retryable {
                throttled: false, ..
            },
            ..
        } => Signal::Outage,
        _ => Signal::Answered,
    }
}

/// What the runner must record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Hold the downstream, for this reason.
    Hold(String),
    Resume,
}

#[derive(Debug)]
struct Held {
    next_probe: Instant,
    delay: Duration,
    /// The device whose attempt is the probe in flight.
    probe: Option<DeviceChangeId>,
}

#[derive(Debug)]
pub struct Circuit {
    config: Breaker,
    failures_in_row: u32,
    held: Option<Held>,
}

impl Circuit {
    pub fn new(config: Breaker) -> Self {
        Self {
            config,
            failures_in_row: 0,
            held: None,
        }
    }

    fn probe_delay(&self) -> Duration {
        Duration::from_millis(self.config.probe_ms)
    }

    /// The downstream was held when the run began (by an earlier run): probe at once.
    pub fn start_held(&mut self, now: Instant) {
        self.held = Some(Held {
            next_probe: now,
            delay: self.probe_delay(),
            probe: None,
        });
    }

    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Takes one outcome into account; says what to record when the downstream is to be held or
    /// resumed.
    pub fn observe(&mut self, report: &StepReport, now: Instant) -> Option<Change> {
        let signal = signal(&report.outcome);
        let max = Duration::from_millis(self.config.max_probe_ms);
        if let Some(held) = &mut self.held {
            if held.probe != Some(report.device_change_id) {
                // A call that was in flight when the downstream was held.
                return None;
            }
            held.probe = None;
            return match signal {
                Signal::Answered => {
                    self.held = None;
                    self.failures_in_row = 0;
                    Some(Change::Resume)
                }
                Signal::Outage => {
                    held.delay = (held.delay * 2).min(max);
                    held.next_probe = now + held.delay;
                    None
                }
                Signal::Nothing => {
                    held.next_probe = now;
                    None
                }
            };
        }
        match signal {
            Signal::Outage => {
                self.failures_in_row += 1;
                if self.failures_in_row >= self.config.failures {
                    self.held = Some(Held {
                        next_probe: now + self.probe_delay(),
                        delay: self.probe_delay(),
                        probe: None,
                    });
                    let why = match &report.outcome {
                        StepOutcome::Failed { reason, .. } => reason.as_str(),
                        _ => "",
                    };
                    return Some(Change::Hold(format!(
                        "{} failures in a row like an outage, the last: {why}",
                        self.failures_in_row
                    )));
                }
                None
            }
            Signal::Answered => {
                self.failures_in_row = 0;
                None
            }
            Signal::Nothing => None,
        }
    }

    /// How many calls may start now out of `room`: all of them, or while held one probe when it
    /// is due and none is in flight.
    pub fn room(&self, room: usize, now: Instant) -> usize {
        match &self.held {
            None => room,
            Some(h) if h.probe.is_none() && now >= h.next_probe => room.min(1),
            Some(_) => 0,
        }
    }

    /// A call for `device` started; while held it is the probe.
    pub fn started(&mut self, device: DeviceChangeId) {
        if let Some(held) = &mut self.held {
            held.probe = Some(device);
        }
    }

    /// The probe for `device` was not sent after all (the run is stopping or pausing).
    pub fn not_started(&mut self, device: DeviceChangeId) {
        if let Some(held) = &mut self.held {
            if held.probe == Some(device) {
                held.probe = None;
            }
        }
    }

    /// While held, the earliest moment a call may start (a probe), or `None` when one is in
    /// flight; `Some(now)`-or-earlier values mean "whenever a device is due".
    pub fn not_before(&self) -> Option<Option<Instant>> {
        self.held.as_ref().map(|h| match h.probe {
            Some(_) => None,
            None => Some(h.next_probe),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ApiCall;
    use crate::domain::Step;

    fn report(device: i64, outcome: StepOutcome) -> StepReport {
        StepReport {
            device_change_id: DeviceChangeId::new(device).unwrap(),
            step: Step::DeviceStatus,
            attempt: 1,
            outcome,
        }
    }

    fn unavailable() -> StepOutcome {
        StepOutcome::Failed {
            class: FailureClass::Retryable {
                retry_after_secs: None,
                outcome_unknown: false,
                throttled: false,
                not_sent: false,
            },
            reason: "503".into(),
            calls: vec![],
        }
    }

    fn answered() -> StepOutcome {
        StepOutcome::ServiceStatus {
            flag: crate::domain::ServiceFlag::Enabled,
            call: ApiCall {
                method: "POST".into(),
                url: "u".into(),
                request_body: None,
                status: Some(204),
                response_body: None,
                error: None,
                retry_after_secs: None,
                request_id: None,
                started_at: chrono::Utc::now(),
                duration_ms: 1,
            },
        }
    }

    fn breaker() -> Breaker {
        Breaker {
            failures: 3,
            probe_ms: 100,
            max_probe_ms: 300,
        }
    }

    #[test]
    fn holds_after_failures_in_a_row_and_an_answer_resets_the_count() {
        let now = Instant::now();
        let mut c = Circuit::new(breaker());
        assert_eq!(c.observe(&report(1, unavailable()), now), None);
        assert_eq!(c.observe(&report(2, unavailable()), now), None);
        assert_eq!(c.observe(&report(3, answered()), now), None);
        assert_eq!(c.observe(&report(4, unavailable()), now), None);
        assert_eq!(c.observe(&report(5, unavailable()), now), None);
        assert!(matches!(
            c.observe(&report(6, unavailable()), now),
            Some(Change::Hold(why)) if why.contains("3 failures") && why.contains("503")
        ));
        assert_eq!(c.room(32, now), 0, "nothing until the first probe is due");
    }

    #[test]
    fn probes_one_at_a_time_backing_off_until_one_is_answered() {
        let now = Instant::now();
        let mut c = Circuit::new(breaker());
        c.start_held(now);
        assert_eq!(c.room(32, now), 1);
        c.started(DeviceChangeId::new(9).unwrap());
        assert_eq!(c.room(32, now), 0, "one probe at a time");
        // A call from before the hold does not end the hold.
        assert_eq!(c.observe(&report(1, answered()), now), None);
        assert_eq!(c.observe(&report(9, unavailable()), now), None);
        assert_eq!(c.room(32, now), 0);
        assert_eq!(
            c.room(32, now + Duration::from_millis(200)),
            1,
            "probe delay doubled"
        );
        c.started(DeviceChangeId::new(9).unwrap());
        assert_eq!(c.observe(&report(9, unavailable()), now), None);
        assert_eq!(c.room(32, now + Duration::from_millis(299)), 0);
        assert_eq!(c.room(32, now + Duration::from_millis(300)), 1, "capped");
        c.started(DeviceChangeId::new(9).unwrap());
        assert_eq!(c.observe(&report(9, answered()), now), Some(Change::Resume));
        assert_eq!(c.room(32, now), 32);
    }
}
