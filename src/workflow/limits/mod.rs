//! Carrier limits per account (a POND distributor, a Rev client code), shared by every bulk
//! change and, on PostgreSQL, by every worker.
//!
//! - **Rate**: calls go out in slots of one timeline per account ([`pace`]), which workers
//!   reserve in slices of about 50 ms (one short transaction per slice, not per call). A 429
//!   holds only its account for the carrier's hint (capped) and lowers the account's rate; the
//!   rate climbs back while calls succeed.
//! - **Concurrency**: each worker holds a share of the account's concurrency ([`share`]), a
//!   lease it renews every half second; a dead worker's share runs out within seconds.
//! - **Fairness**: within a worker, an account's slots go round-robin to the bulk changes
//!   waiting for them; between workers, slices are reserved in turn and shares are max-min fair.
//!
//! The embedded SQLite mode keeps all of it in the worker's memory ([`store::Store::Memory`]).

pub mod pace;
pub mod paced;
pub mod share;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::definition;
use super::per_downstream::PerDownstream;
use crate::domain::{BulkChangeId, Downstream};
use store::{Configured, Store};

/// How long a worker's share of an account's concurrency lasts without renewal.
const SHARE_TTL_SECS: f64 = 3.0;
/// How often a worker in use of an account renews its share.
const RENEW: Duration = Duration::from_millis(250);
/// How soon a worker short of slots asks again.
const RENEW_SHORT: Duration = Duration::from_millis(50);
/// A reservation covers about this long of calls (see [`pace::Pace::slice`]).
const SLICE_SECS: f64 = 0.05;
/// A reserved slot not used this long after its time is dropped.
const STALE: Duration = Duration::from_millis(100);
/// How many times a caller that woke too late for its slot takes a fresh one before it goes
/// anyway (a host always that late still makes progress).
const LATE_TRIES: u32 = 3;
/// While an account's daily budget is used up, how often a worker looks again (a budget may be
/// raised, or the day turn, meanwhile).
const BUDGET_RECHECK_SECS: f64 = 5.0;
/// After a failed read or write of the shared limit, the next try.
const STORE_RETRY: Duration = Duration::from_millis(250);

/// The limits of every account this process uses.
pub struct Limits {
    store: Arc<Store>,
    /// This process's name in shares.
    owner: String,
    config: PerDownstream<definition::Limits>,
    /// A 429's wait hint holds the account at most this long.
    max_hold_secs: u64,
    accounts: Mutex<HashMap<String, Arc<Account>>>,
}

impl Limits {
    /// Shared through the database on PostgreSQL, in this process on SQLite.
    pub fn new(
        db: &crate::store::Db,
        owner: String,
        config: PerDownstream<definition::Limits>,
        max_hold_secs: u64,
    ) -> Self {
        let store = match db {
            crate::store::Db::Postgres(pool) => Store::postgres(pool.clone()),
            crate::store::Db::Sqlite(_) => Store::memory(),
        };
        Self {
            store: Arc::new(store),
            owner,
            config,
            max_hold_secs,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The configured limits of a downstream (rate, concurrency, timeout, breaker).
    pub fn config(&self, downstream: Downstream) -> &definition::Limits {
        &self.config[downstream]
    }

    /// Gives back this worker's shares of every account's concurrency at once (a worker
    /// leaving), rather than when they run out.
    pub async fn release(&self) {
        for account in self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            account.inner.closed.store(true, Ordering::Relaxed);
        }
        if let Err(e) = self.store.release(&self.owner).await {
            tracing::warn!(error = %e, "shares of the carrier accounts not given back; they run out within seconds");
        }
    }

    /// The account `name` of `downstream` (`pond:<name>`, `rev:<name>`).
    pub fn account(&self, downstream: Downstream, name: &str) -> Arc<Account> {
        let key = format!("{downstream}:{name}");
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts
            .entry(key.clone())
            .or_insert_with(|| {
                let config = &self.config[downstream];
                Account::start(
                    key,
                    Configured {
                        rate: config.rate_per_second,
                        burst: config.burst,
                        max_concurrency: config.max_concurrency,
                        per_day: config.max_calls_per_day,
                    },
                    self.owner.clone(),
                    self.store.clone(),
                    self.max_hold_secs,
                )
            })
            .clone()
    }
}

/// A rate slot a call went out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The account's generation when the slot was reserved (see [`pace::Pace::generation`]).
    pub generation: i64,
}

/// Where a waiting caller gets its slot: when, and under which generation.
type Reply = oneshot::Sender<(Instant, i64)>;

enum Ask {
    Slot {
        bulk: BulkChangeId,
        reply: Reply,
    },
    Throttled {
        generation: i64,
        hold_secs: u64,
    },
    /// A slot was taken but no call went out in it: its place in the day's budget comes back.
    Unused,
}

/// What the account's pump and its callers share.
struct Inner {
    key: String,
    configured: Configured,
    owner: String,
    store: Arc<Store>,
    max_hold_secs: u64,
    /// Concurrency slots: as many permits as this worker's share.
    gate: Arc<Semaphore>,
    sizing: Mutex<Sizing>,
    /// Calls waiting for a concurrency slot.
    entering: AtomicUsize,
    /// The most slots wanted at once since the last renewal (so that a moment between two
    /// rounds of a run does not give the share away).
    peak: AtomicUsize,
    /// Someone started waiting for a concurrency slot.
    wake: Notify,
    /// The worker left (or its database pool closed): its share is given back, and nothing is
    /// reserved or renewed any more.
    closed: std::sync::atomic::AtomicBool,
    /// Until when the carrier asked this account to wait (seen by this worker).
    held_until: Mutex<Option<Instant>>,
}

/// How many concurrency permits exist, and how many of the busy ones are to go when their calls
/// end (the share shrank while they ran).
#[derive(Debug, Default)]
struct Sizing {
    permits: usize,
    excess: usize,
}

impl Inner {
    fn in_use(&self) -> usize {
        let sizing = self.sizing.lock().unwrap_or_else(|p| p.into_inner());
        sizing.permits.saturating_sub(self.gate.available_permits())
    }

    fn permits(&self) -> usize {
        self.sizing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .permits
    }

    /// Makes the gate hold `granted` permits: busy ones over it go when their calls end.
    fn resize(&self, granted: usize) {
        let mut sizing = self.sizing.lock().unwrap_or_else(|p| p.into_inner());
        if granted >= sizing.permits {
            self.gate.add_permits(granted - sizing.permits);
            sizing.permits = granted;
            sizing.excess = 0;
        } else {
            let forgotten = self.gate.forget_permits(sizing.permits - granted);
            sizing.permits -= forgotten;
            sizing.excess = sizing.permits - granted;
        }
    }
}

/// One account's limits in this process; its pump task ends when the last handle is dropped.
pub struct Account {
    inner: Arc<Inner>,
    asks: mpsc::UnboundedSender<Ask>,
}

/// A concurrency slot, held while a step's calls run.
pub struct Entered {
    permit: Option<OwnedSemaphorePermit>,
    inner: Arc<Inner>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut sizing = self.inner.sizing.lock().unwrap_or_else(|p| p.into_inner());
        if sizing.excess > 0 {
            sizing.excess -= 1;
            sizing.permits -= 1;
            if let Some(permit) = self.permit.take() {
                permit.forget();
            }
        }
    }
}

impl Account {
    fn start(
        key: String,
        configured: Configured,
        owner: String,
        store: Arc<Store>,
        max_hold_secs: u64,
    ) -> Arc<Self> {
        // Shared: no slot until the first share is granted; in memory: all of them.
        let initial = if store.is_shared() {
            0
        } else {
            configured.max_concurrency
        };
        let inner = Arc::new(Inner {
            key,
            configured,
            owner,
            store,
            max_hold_secs,
            gate: Arc::new(Semaphore::new(initial)),
            sizing: Mutex::new(Sizing {
                permits: initial,
                excess: 0,
            }),
            entering: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            wake: Notify::new(),
            held_until: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let (asks, rx) = mpsc::unbounded_channel();
        tokio::spawn(Pump::new(inner.clone()).run(rx));
        Arc::new(Self { inner, asks })
    }

    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// Waits for a concurrency slot (held while one step's calls run).
    pub async fn enter(&self) -> Entered {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let entering = self.inner.entering.fetch_add(1, Ordering::Relaxed) + 1;
        let _waiting = Waiting(&self.inner.entering);
        self.inner
            .peak
            .fetch_max(self.inner.in_use() + entering, Ordering::Relaxed);
        if self.inner.gate.available_permits() == 0 {
            // This caller waits: the pump may ask for a bigger share.
            self.inner.wake.notify_one();
        }
        let permit = self
            .inner
            .gate
            .clone()
            .acquire_owned()
            .await
            .expect("the account's gate is never closed");
        Entered {
            permit: Some(permit),
            inner: self.inner.clone(),
        }
    }

    /// Waits for a rate slot for one call of `bulk` (slots go round-robin to the bulk changes
    /// waiting), and past any wait a carrier asked for.
    pub async fn slot(&self, bulk: BulkChangeId) -> Slot {
        let mut late = 0;
        loop {
            let (reply, slot) = oneshot::channel();
            if self.asks.send(Ask::Slot { bulk, reply }).is_err() {
                // The pump ended (only when the account is dropped): nothing to wait for.
                return Slot { generation: 0 };
            }
            let Ok((at, generation)) = slot.await else {
                return Slot { generation: 0 };
            };
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            // Woken long after its slot (its task starved: a stalled or overloaded host), the
            // call would go out with the calls paced for now, a burst the carrier counts: it
            // takes a fresh slot instead.
            if Instant::now() > at + STALE && late < LATE_TRIES {
                late += 1;
                continue;
            }
            let held = *self
                .inner
                .held_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match held {
                // A 429 arrived while this slot waited: it is not used; wait for a new one.
                Some(until) if until > Instant::now() => continue,
                _ => return Slot { generation },
            }
        }
    }

    /// No call went out in `slot`: with a daily budget, the day gets its place back.
    pub fn unused(&self, _slot: Slot) {
        if self.inner.configured.per_day.is_some() {
            let _ = self.asks.send(Ask::Unused);
        }
    }

    /// A call that went out in `slot` got a 429 asking to wait `hint_secs` (1 s if it did not
    /// say): holds the account (capped) and lowers its rate.
    pub fn throttled(&self, slot: Slot, hint_secs: Option<u64>) {
        let hold_secs = hint_secs.unwrap_or(1).min(self.inner.max_hold_secs);
        if let Some(until) = Instant::now().checked_add(Duration::from_secs(hold_secs)) {
            let mut held = self
                .inner
                .held_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if held.is_none_or(|h| h < until) {
                *held = Some(until);
            }
        }
        let _ = self.asks.send(Ask::Throttled {
            generation: slot.generation,
            hold_secs,
        });
    }
}

/// The account's one task: reserves slices of slots and hands them out, reports 429s, and
/// renews this worker's share of the concurrency.
struct Pump {
    inner: Arc<Inner>,
    /// Bulk changes waiting for slots, in turn; each with its callers in order.
    waiting: VecDeque<(BulkChangeId, VecDeque<Reply>)>,
    /// Reserved slots not handed out yet.
    slots: VecDeque<(Instant, i64)>,
    /// Slots handed out since the last claim, and when that was: the next claim reserves what
    /// this rate of use needs for a slice's time (at most a slice), so that a busy worker makes
    /// about 20 reservations a second, not one per call.
    handed: usize,
    claimed_at: Instant,
    next_renewal: Instant,
    /// The rate last seen, for the log.
    rate: f64,
    failing: bool,
    /// The account's daily budget is used up: no claim before this (the next day, or a
    /// few seconds on, to see a budget changed meanwhile).
    budget_wait: Option<Instant>,
    /// The log said the budget is used up (it says so once, and again when calls go on).
    budget_used_up: bool,
}

impl Pump {
    fn new(inner: Arc<Inner>) -> Self {
        let rate = inner.configured.rate;
        Self {
            inner,
            waiting: VecDeque::new(),
            slots: VecDeque::new(),
            handed: 0,
            claimed_at: Instant::now(),
            next_renewal: Instant::now(),
            rate,
            failing: false,
            budget_wait: None,
            budget_used_up: false,
        }
    }

    async fn run(mut self, mut asks: mpsc::UnboundedReceiver<Ask>) {
        let shared = self.inner.store.is_shared();
        loop {
            // Everyone who asked meanwhile shares the next reservation.
            loop {
                match asks.try_recv() {
                    Ok(ask) => self.take(ask).await,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            self.hand_out();
            let closed = self.inner.closed.load(Ordering::Relaxed);
            if self.budget_wait.is_some_and(|t| t <= Instant::now()) {
                self.budget_wait = None;
            }
            if self.slots.is_empty()
                && !self.waiting.is_empty()
                && !closed
                && self.budget_wait.is_none()
            {
                self.claim().await;
                continue;
            }
            let busy = self.inner.permits() > 0 || self.inner.entering.load(Ordering::Relaxed) > 0;
            let renew_at = if shared && busy && !closed {
                Some(self.next_renewal)
            } else {
                None
            };
            tokio::select! {
                ask = asks.recv() => match ask {
                    None => return,
                    Some(ask) => self.take(ask).await,
                },
                _ = sleep_until_opt(renew_at) => self.renew().await,
                _ = sleep_until_opt(self.budget_wait) => {}
                _ = self.inner.wake.notified(), if shared => {
                    // Someone waits for a slot: ask for more soon if this worker is short.
                    if self.inner.permits() < self.inner.configured.max_concurrency {
                        self.next_renewal = self.next_renewal.min(Instant::now() + RENEW_SHORT);
                    }
                }
            }
        }
    }

    async fn take(&mut self, ask: Ask) {
        match ask {
            Ask::Slot { bulk, reply } => self.wait(bulk, reply),
            Ask::Throttled {
                generation,
                hold_secs,
            } => self.throttled(generation, hold_secs).await,
            Ask::Unused => self.unused().await,
        }
    }

    fn wait(&mut self, bulk: BulkChangeId, reply: Reply) {
        match self.waiting.iter_mut().find(|(b, _)| *b == bulk) {
            Some((_, callers)) => callers.push_back(reply),
            None => self.waiting.push_back((bulk, VecDeque::from([reply]))),
        }
    }

    /// Gives the reserved slots to the waiting bulk changes in turn. A slot left over (its
    /// caller went away) and long past is dropped: used late, it would add to a burst.
    fn hand_out(&mut self) {
        let stale = Instant::now().checked_sub(STALE);
        while self
            .slots
            .front()
            .is_some_and(|(at, _)| stale.is_some_and(|s| *at < s))
        {
            self.slots.pop_front();
        }
        while let Some(slot) = self.slots.front().copied() {
            let Some((bulk, mut callers)) = self.waiting.pop_front() else {
                return;
            };
            let mut given = false;
            while let Some(reply) = callers.pop_front() {
                if reply.send(slot).is_ok() {
                    given = true;
                    break;
                }
            }
            if given {
                self.slots.pop_front();
                self.handed += 1;
            }
            if !callers.is_empty() {
                self.waiting.push_back((bulk, callers));
            }
        }
    }

    /// Reserves the next slice of slots for the callers waiting.
    async fn claim(&mut self) {
        let waiting: usize = self.waiting.iter().map(|(_, c)| c.len()).sum();
        let since = self.claimed_at.elapsed().as_secs_f64().max(0.001);
        let in_use = (std::mem::take(&mut self.handed) as f64 / since * SLICE_SECS).ceil();
        let wanted = waiting.max(in_use as usize);
        self.claimed_at = Instant::now();
        let burst = self.inner.configured.burst;
        let result = self
            .inner
            .store
            .pace(&self.inner.key, self.inner.configured, |pace, now| {
                pace.claim(now, wanted.min(u32::MAX as usize) as u32, burst)
            })
            .await;
        match result {
            Ok(at) => {
                self.recovered();
                let claim = at.value;
                let base = Instant::now();
                if claim.count == 0 {
                    // The day's budget is used up: the callers wait for the next day.
                    let wait = (claim.start - at.now).clamp(0.0, BUDGET_RECHECK_SECS);
                    if !std::mem::replace(&mut self.budget_used_up, true) {
                        tracing::warn!(account = %self.inner.key, next_day_in_secs = (claim.start - at.now).round(),
                            "the account's daily budget is used up: its calls wait for the next day");
                    }
                    self.budget_wait = Some(base + Duration::from_secs_f64(wait));
                    return;
                }
                if std::mem::take(&mut self.budget_used_up) {
                    tracing::info!(account = %self.inner.key, "the account's daily budget allows calls again");
                }
                for i in 0..claim.count {
                    let offset = claim.start + f64::from(i) * claim.spacing - at.now;
                    let when = if offset > 0.0 {
                        base + Duration::from_secs_f64(offset)
                    } else {
                        base
                    };
                    self.slots.push_back((when, claim.generation));
                }
                self.note_rate(claim.rate);
            }
            Err(e) => self.failed(e).await,
        }
    }

    fn note_rate(&mut self, rate: f64) {
        metrics::gauge!(crate::metrics::ACCOUNT_RATE, "account" => self.inner.key.clone())
            .set(rate);
        let configured = self.inner.configured.rate;
        if rate >= configured && self.rate < configured {
            tracing::info!(account = %self.inner.key, rate, "the account's rate is back at its configured rate");
        } else if rate < configured && (rate - self.rate).abs() >= 0.1 * configured {
            tracing::info!(account = %self.inner.key, rate = (rate * 10.0).round() / 10.0, configured,
                "the account's learned rate");
        } else {
            return;
        }
        self.rate = rate;
    }

    async fn throttled(&mut self, generation: i64, hold_secs: u64) {
        // Slots reserved before the 429 are not used.
        self.slots.clear();
        let result = self
            .inner
            .store
            .pace(&self.inner.key, self.inner.configured, |pace, now| {
                pace.throttled(now, generation, hold_secs as f64)
            })
            .await;
        match result {
            Ok(at) => {
                self.recovered();
                metrics::counter!(crate::metrics::THROTTLED, "account" => self.inner.key.clone())
                    .increment(1);
                metrics::counter!(crate::metrics::HELD_SECONDS, "account" => self.inner.key.clone())
                    .increment(hold_secs);
                if let Some(rate) = at.value.lowered_to {
                    metrics::gauge!(crate::metrics::ACCOUNT_RATE, "account" => self.inner.key.clone())
                        .set(rate);
                    tracing::warn!(
                        account = %self.inner.key,
                        rate = (rate * 10.0).round() / 10.0,
                        configured = self.inner.configured.rate,
                        hold_secs,
                        "429 from the carrier: holding the account and lowering its rate"
                    );
                    self.rate = rate;
                }
            }
            Err(e) => self.failed(e).await,
        }
    }

    /// A slot went unused (a Rev creation past its send window is not sent): the day's budget
    /// gets it back, and callers waiting for the next day look again at once.
    async fn unused(&mut self) {
        let result = self
            .inner
            .store
            .pace(&self.inner.key, self.inner.configured, |pace, now| {
                pace.refund(now, 1)
            })
            .await;
        match result {
            Ok(_) => {
                self.recovered();
                self.budget_wait = None;
            }
            Err(e) => self.failed(e).await,
        }
    }

    /// Renews this worker's share of the account's concurrency and resizes the gate to it.
    async fn renew(&mut self) {
        let in_use = self.inner.in_use();
        let now_wanted = in_use + self.inner.entering.load(Ordering::Relaxed);
        let wanted = now_wanted
            .max(self.inner.peak.swap(now_wanted, Ordering::Relaxed))
            .min(self.inner.configured.max_concurrency);
        let inner = self.inner.clone();
        let result = self
            .inner
            .store
            .share(
                &self.inner.key,
                &self.inner.owner,
                self.inner.configured,
                wanted,
                SHARE_TTL_SECS,
                move |granted| {
                    inner.resize(granted);
                    inner.permits()
                },
            )
            .await;
        let now = Instant::now();
        let granted = match result {
            Ok(granted) => {
                self.recovered();
                granted
            }
            Err(e) => {
                // The share is written on the connection holding this worker's liveness lock:
                // once a write fails, that connection (and with it the share, for the others)
                // may be gone already, so no new call enters until a renewal succeeds again
                // (calls in flight go on).
                self.inner.resize(0);
                self.failed(e).await;
                0
            }
        };
        let short = granted < wanted.max(1) && self.inner.entering.load(Ordering::Relaxed) > 0;
        self.next_renewal = now + if short { RENEW_SHORT } else { RENEW };
    }

    fn recovered(&mut self) {
        if self.failing {
            tracing::info!(account = %self.inner.key, "the shared rate limit is reachable again");
            self.failing = false;
        }
    }

    async fn failed(&mut self, error: store::Error) {
        if error.pool_closed() {
            // The engine is shutting down: nothing to reserve or renew any more.
            self.inner.closed.store(true, Ordering::Relaxed);
            return;
        }
        if !self.failing {
            tracing::warn!(account = %self.inner.key, error = %error, "the shared rate limit could not be reached; calls of this account wait");
            self.failing = true;
        }
        tokio::time::sleep(STORE_RETRY).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime's only thread is blocked while ten callers wait for their slots (20 calls a
    /// second: 50 ms apart): woken late all at once, they do not all go out at once.
    #[tokio::test]
    async fn callers_woken_late_take_fresh_slots_instead_of_bursting() {
        let configured = Configured {
            rate: 20.0,
            burst: 1,
            max_concurrency: 100,
            per_day: None,
        };
        let account = Account::start(
            "pond:test".into(),
            configured,
            "me".into(),
            Arc::new(Store::memory()),
            60,
        );
        let bulk = BulkChangeId::new(1).unwrap();
        let started = Instant::now();
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let account = account.clone();
                tokio::spawn(async move {
                    account.slot(bulk).await;
                    Instant::now()
                })
            })
            .collect();
        // Every caller has its slot (the last ~450 ms ahead) and sleeps until it...
        tokio::time::sleep(Duration::from_millis(20)).await;
        // ... when the host stalls for 700 ms.
        std::thread::sleep(Duration::from_millis(700));
        let mut went: Vec<f64> = Vec::new();
        for c in callers {
            went.push(c.await.unwrap().duration_since(started).as_secs_f64());
        }
        went.sort_by(f64::total_cmp);
        // Any 100 ms after the stall: a slot or two, never the whole backlog.
        let most = went
            .iter()
            .map(|&t| went.iter().filter(|&&u| u >= t && u < t + 0.1).count())
            .max()
            .unwrap();
        assert!(most <= 3, "{most} calls within 100 ms: {went:?}");
    }
}
