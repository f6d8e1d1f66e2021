//! The pace of one carrier account: a timeline of call slots at the account's current rate
//! (a GCRA, so the calls of every worker interleave without bursts), and how a 429 changes the
//! rate (additive increase, multiplicative decrease). Pure: the caller supplies the clock
//! (seconds on one clock for all workers: the database's on PostgreSQL) and stores the state.

/// A 429 cuts the rate to this fraction.
pub const DECREASE: f64 = 0.7;
/// Below 90 % of the rate that last drew a 429, the rate climbs by this fraction of the
/// configured rate a second (back quickly to where it was fine)…
const CLIMB: f64 = 0.10;
/// …above it, by this fraction of that rate a second (probing slowly for more).
const PROBE: f64 = 0.01;
/// The rate never goes below this fraction of the configured one.
const FLOOR: f64 = 0.01;
/// Slots a claim may start this far in the past, in slots (≤ the configured burst): makes up
/// for the time between two claims without letting idle time build a burst.
const SLACK: f64 = 0.02;
/// How much of an idle gap counts towards the climb.
const MAX_CLIMB_STEP_SECS: f64 = 1.0;

/// What is stored per account (`rate_limits` on PostgreSQL, memory on SQLite).
#[derive(Debug, Clone, PartialEq)]
pub struct Pace {
    /// Calls a second the deployment configured.
    pub configured: f64,
    /// Calls a second now (learned; ≤ `configured`).
    pub rate: f64,
    /// The rate that drew the last 429, if any.
    pub ceiling: Option<f64>,
    /// The next free slot.
    pub next_at: f64,
    /// Until when the carrier asked to wait (a 429's hint, capped).
    pub held_until: f64,
    /// When the rate was last adjusted upwards.
    pub climbed_at: f64,
    /// How many times the rate was lowered: a 429 lowers it only if the call went out at the
    /// current rate (one cut per episode, however many calls were refused in it).
    pub generation: i64,
    /// 429s seen on the account.
    pub throttled: i64,
    /// The daily budget (calls a UTC day), if any.
    pub per_day: Option<i64>,
    /// The day (`floor(seconds / 86,400)`) `day_used` counts.
    pub day: i64,
    /// Slots reserved in `day`.
    pub day_used: i64,
}

/// Seconds in a day of the daily budget.
pub const DAY_SECS: f64 = 86_400.0;

fn day_of(t: f64) -> i64 {
    (t / DAY_SECS).floor() as i64
}

/// Slots reserved by one claim: `count` calls at `start`, `start + spacing`, …
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    pub start: f64,
    pub spacing: f64,
    pub count: u32,
    /// The generation the calls go out under (reported back with a 429).
    pub generation: i64,
    pub rate: f64,
}

/// What a 429 did to the account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    /// The lowered rate, when this 429 lowered it.
    pub lowered_to: Option<f64>,
    pub held_until: f64,
}

impl Pace {
    pub fn new(configured: f64, now: f64) -> Self {
        Self {
            configured,
            rate: configured,
            ceiling: None,
            next_at: now,
            held_until: 0.0,
            climbed_at: now,
            generation: 0,
            throttled: 0,
            per_day: None,
            day: day_of(now),
            day_used: 0,
        }
    }

    /// The daily budget a worker configured (the last one configured wins).
    pub fn budget(&mut self, per_day: Option<u64>) {
        self.per_day = per_day.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `n` slots of today were not used for a call: the budget gets them back.
    pub fn refund(&mut self, now: f64, n: i64) {
        if self.per_day.is_some() && day_of(now) == self.day {
            self.day_used = (self.day_used - n).max(0);
        }
    }

    /// Calls the budget still allows on the day of `t` (None: no budget). Once a day is used
    /// up, the count has moved on to a later day: none are left on it.
    pub fn left_on(&self, t: f64) -> Option<i64> {
        let day = day_of(t);
        self.per_day.map(|n| match day.cmp(&self.day) {
            std::cmp::Ordering::Equal => (n - self.day_used).max(0),
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Greater => n,
        })
    }

    /// A worker configured with another rate: the last one configured wins; a learned rate
    /// stays if it is lower.
    pub fn configure(&mut self, configured: f64) {
        if configured != self.configured {
            if self.rate >= self.configured {
                self.rate = configured;
            }
            self.configured = configured;
            self.rate = self.rate.min(configured);
        }
    }

    /// How many slots one claim takes at most: about 50 ms of calls, at least one.
    pub fn slice(&self) -> u32 {
        (self.rate * 0.05).clamp(1.0, 2_000.0) as u32
    }

    /// The rate climbs back while the account is used.
    fn climb(&mut self, now: f64) {
        if now < self.held_until {
            self.climbed_at = now;
            return;
        }
        let dt = (now - self.climbed_at).clamp(0.0, MAX_CLIMB_STEP_SECS);
        self.climbed_at = now;
        let step = match self.ceiling {
            Some(c) if self.rate >= 0.9 * c => PROBE * c,
            _ => CLIMB * self.configured,
        };
        self.rate = (self.rate + step * dt).min(self.configured);
    }

    /// Reserves up to `wanted` slots (at most a slice), the first no earlier than now less
    /// a little slack, and not while the carrier asked to wait. With a daily budget, no more
    /// than the day has left; a day used up reserves nothing (`count` 0) and says, in `start`,
    /// when the next day begins: slots are never reserved on a later day (a worker that stopped
    /// with them would use that day up for nothing).
    pub fn claim(&mut self, now: f64, wanted: u32, burst: u32) -> Claim {
        self.climb(now);
        let mut count = wanted.clamp(1, self.slice());
        let spacing = 1.0 / self.rate;
        let slack = (self.rate * SLACK).min(f64::from(burst)) * spacing;
        let start = self.next_at.max(now - slack).max(self.held_until);
        if let Some(per_day) = self.per_day {
            // Slots count on the day their calls go out (a slot in the past goes out now).
            let sent = day_of(start.max(now));
            if sent > self.day {
                self.day = sent;
                self.day_used = 0;
            }
            let left = per_day - self.day_used;
            if left <= 0 {
                return Claim {
                    start: (self.day + 1) as f64 * DAY_SECS,
                    spacing,
                    count: 0,
                    generation: self.generation,
                    rate: self.rate,
                };
            }
            count = count.min(u32::try_from(left).unwrap_or(u32::MAX));
            self.day_used += i64::from(count);
        }
        self.next_at = start + f64::from(count) * spacing;
        Claim {
            start,
            spacing,
            count,
            generation: self.generation,
            rate: self.rate,
        }
    }

    /// A call that went out under `generation` got a 429 asking to wait `hold` seconds: the
    /// account waits, and the rate is lowered once per episode.
    pub fn throttled(&mut self, now: f64, generation: i64, hold: f64) -> Throttled {
        self.throttled += 1;
        self.held_until = self.held_until.max(now + hold);
        let lowered_to = (generation == self.generation).then(|| {
            self.ceiling = Some(self.rate);
            self.rate = (self.rate * DECREASE).max(self.configured * FLOOR);
            self.generation += 1;
            self.climbed_at = self.held_until;
            self.rate
        });
        Throttled {
            lowered_to,
            held_until: self.held_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_up_daily_budget_moves_the_next_slots_to_the_next_day() {
        // 1,000 calls a second (slices of 50), 5 a day; day 20,000 starts at 1,728,000,000 s.
        let day = 20_000.0 * DAY_SECS;
        let mut pace = Pace::new(1_000.0, day + 100.0);
        pace.budget(Some(5));
        assert_eq!(pace.left_on(day + 100.0), Some(5));
        let a = pace.claim(day + 100.0, 3, 1);
        let b = pace.claim(day + 100.0, 3, 1);
        assert_eq!(
            (a.count, b.count),
            (3, 2),
            "the budget cuts the second claim"
        );
        assert_eq!(pace.left_on(day + 100.0), Some(0));
        // Used up: nothing is reserved; the claim says when the next day starts.
        let c = pace.claim(day + 200.0, 3, 1);
        assert_eq!((c.start, c.count), (day + DAY_SECS, 0));
        assert_eq!(pace.left_on(day + 200.0), Some(0), "today stays used up");
        // The next day starts afresh (and only the calls of that day count).
        let d = pace.claim(day + DAY_SECS + 5.0, 4, 1);
        assert_eq!(d.count, 4, "{d:?}");
        assert!(d.start > day + DAY_SECS + 4.0, "{d:?}");
        assert_eq!(pace.left_on(day + DAY_SECS + 5.0), Some(1));
        assert_eq!(pace.day, 20_001);
        // No budget: claims are not cut.
        pace.budget(None);
        assert_eq!(pace.claim(day + 3.0 * DAY_SECS, 4, 1).count, 4);
        assert_eq!(pace.claim(day + 3.0 * DAY_SECS, 40, 1).count, 40);
        assert_eq!(pace.left_on(day), None);
    }

    #[test]
    fn slots_of_several_claims_interleave_at_the_rate() {
        let mut pace = Pace::new(100.0, 10.0);
        let a = pace.claim(10.0, 5, 20);
        let b = pace.claim(10.0, 5, 20);
        assert_eq!((a.start, a.count), (10.0, 5));
        assert!((b.start - 10.05).abs() < 1e-9, "{b:?}");
        // After an idle second, at most the slack is in the past: no burst built up.
        let c = pace.claim(11.5, 5, 20);
        assert!((c.start - (11.5 - 0.02)).abs() < 1e-9, "{c:?}");
        assert_eq!(pace.slice(), 5);
    }

    #[test]
    fn a_429_holds_the_account_and_cuts_the_rate_once_per_episode() {
        let mut pace = Pace::new(100.0, 0.0);
        let claim = pace.claim(0.0, 5, 20);
        let first = pace.throttled(0.01, claim.generation, 1.0);
        assert_eq!(first.lowered_to, Some(70.0));
        assert_eq!(first.held_until, 1.01);
        // Another refusal of the same episode (sent before the cut) only counts.
        let second = pace.throttled(0.02, claim.generation, 1.0);
        assert_eq!(second.lowered_to, None);
        assert_eq!((pace.rate, pace.throttled), (70.0, 2));
        let next = pace.claim(0.5, 5, 20);
        assert_eq!(next.start, 1.02, "nothing before the hint's end");
        assert_eq!(next.generation, 1);
    }

    #[test]
    fn the_rate_climbs_back_quickly_then_probes_slowly_up_to_the_configured_rate() {
        let mut pace = Pace::new(100.0, 0.0);
        pace.throttled(0.0, 0, 0.0);
        assert_eq!(pace.rate, 70.0);
        pace.claim(1.0, 1, 20);
        assert!((pace.rate - 80.0).abs() < 1e-9, "{}", pace.rate);
        pace.claim(2.0, 1, 20);
        pace.claim(2.5, 1, 20);
        assert!(
            (pace.rate - 90.5).abs() < 1e-9,
            "fast below 90: {}",
            pace.rate
        );
        pace.claim(3.5, 1, 20);
        assert!((pace.rate - 91.5).abs() < 1e-9, "slow above: {}", pace.rate);
        for t in 4..100 {
            pace.claim(f64::from(t), 1, 20);
        }
        assert_eq!(pace.rate, 100.0, "never above the configured rate");
    }

    #[test]
    fn a_new_configuration_replaces_the_rate_but_keeps_a_lower_learned_one() {
        let mut pace = Pace::new(100.0, 0.0);
        pace.configure(200.0);
        assert_eq!(pace.rate, 200.0);
        pace.throttled(0.0, 0, 0.0);
        pace.configure(300.0);
        assert_eq!((pace.configured, pace.rate), (300.0, 140.0));
        pace.configure(50.0);
        assert_eq!(pace.rate, 50.0);
    }

    /// A carrier that allows `limit` calls a second with bursts of a tenth of that (the
    /// simulator's GCRA), driven by `workers` claimants that each always have calls waiting.
    /// Returns (accepted calls a second over the last half, refused / sent over the whole run).
    fn against_a_carrier(configured: f64, limit: f64, workers: usize, secs: f64) -> (f64, f64) {
        let mut pace = Pace::new(configured, 0.0);
        let (emission, tolerance) = (1.0 / limit, (limit / 10.0 - 1.0) / limit);
        let mut carrier_tat = 0.0_f64;
        let mut queue: Vec<(f64, i64)> = Vec::new();
        let mut next_claim = vec![0.0_f64; workers];
        let (mut sent, mut refused, mut late_accepted) = (0u64, 0u64, 0u64);
        let mut now = 0.0;
        let step = 0.001;
        while now < secs {
            for at in next_claim.iter_mut() {
                if *at <= now {
                    let claim = pace.claim(now, u32::MAX, 20);
                    for i in 0..claim.count {
                        queue.push((claim.start + f64::from(i) * claim.spacing, claim.generation));
                    }
                    *at = claim.start + f64::from(claim.count) * claim.spacing - 0.002;
                }
            }
            queue.sort_by(|a, b| a.0.total_cmp(&b.0));
            let due = queue.partition_point(|(t, _)| *t <= now);
            for (t, generation) in queue.drain(..due).collect::<Vec<_>>() {
                sent += 1;
                let tat = carrier_tat.max(t);
                if tat - t > tolerance {
                    refused += 1;
                    pace.throttled(t, generation, 1.0);
                    // Slots the workers hold for the hold are refused too, as in real life.
                } else {
                    carrier_tat = tat + emission;
                    if t >= secs / 2.0 {
                        late_accepted += 1;
                    }
                }
            }
            now += step;
        }
        (
            late_accepted as f64 / (secs / 2.0),
            refused as f64 / sent as f64,
        )
    }

    #[test]
    fn at_the_carriers_limit_nothing_is_refused() {
        let (rate, refused) = against_a_carrier(200.0, 200.0, 3, 20.0);
        assert!(rate >= 0.95 * 200.0, "{rate}");
        assert_eq!(refused, 0.0);
    }

    #[test]
    fn configured_twice_the_carriers_limit_it_settles_just_under_it() {
        let (rate, refused) = against_a_carrier(200.0, 100.0, 3, 60.0);
        assert!((80.0..=100.0).contains(&rate), "{rate}");
        assert!(refused < 0.05, "{refused}");
    }
}
