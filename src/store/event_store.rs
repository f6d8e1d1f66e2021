//! The event store: postgres-es or sqlite-es tables for persistence, with each bulk change's
//! state kept in memory between commands so a command costs the same at 1,000 or 1,000,000
//! devices.
//!
//! A command is decided on the cached state brought up to date in place with the events appended
//! after it (by another process; usually none, one indexed query) and appended in one
//! transaction under the optimistic-concurrency key (aggregate id, sequence). A lost race leaves
//! the cache as it was (a consistent prefix of the stream): the next command catches it up. This
//! replaces cqrs-es snapshots, which double-apply events in 0.5.0, and `CqrsFramework`, whose
//! `EventStore::load_aggregate` takes the state out of the cache while it is read, so a reader
//! beside a runner made the runner reload the whole stream (see [`CachingStore`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::batched::BatchedPgRepository;
use super::lease::{Fence, Fenced};
use super::sqlite::SqliteRepository;
use std::future::Future;

use cqrs_es::persist::{PersistedEventRepository, PersistenceError, SerializedEvent};
use cqrs_es::{Aggregate, AggregateError, DomainEvent, EventEnvelope};

use super::Db;
use crate::domain::bulk_change::upcast::upcast;
use crate::domain::bulk_change::{
    BulkChange, BulkChangeCommand, BulkChangeEvent, Error as DomainError,
};
use crate::domain::BulkChangeId;

/// Why a command could not be carried out: the domain refused it (`UserError`), another writer
/// got in first (`AggregateConflict`), or the database failed ([`fenced`] tells a fenced append).
pub type Error = AggregateError<DomainError>;

/// Metadata key of the lease epoch a runner's events were written under (the fence they passed).
pub const EPOCH_KEY: &str = "epoch";

/// The fence an append was refused by, if that is why `error` happened.
pub fn fenced(error: &Error) -> Option<Fence> {
    match error {
        Error::UnexpectedError(e) => e.downcast_ref::<Fenced>().map(|f| f.0),
        _ => None,
    }
}

/// Who writes a command's events: recorded in their metadata, and with a fence, checked against
/// the current lease epoch in the same transaction.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub worker: &'a str,
    pub fence: Option<Fence>,
}

impl Writer<'_> {
    /// The metadata of each event it writes to `id`: its worker, and under a fence its epoch.
    fn metadata(&self, id: BulkChangeId) -> HashMap<String, String> {
        let mut metadata = HashMap::from([("worker".to_string(), self.worker.to_string())]);
        if let Some(fence) = self.fence {
            debug_assert_eq!(fence.bulk_change_id, id);
            metadata.insert(EPOCH_KEY.to_string(), fence.epoch.to_string());
        }
        metadata
    }
}

/// One command's events as the envelopes that follow `sequence` in the stream.
fn envelopes(
    aggregate_id: &str,
    sequence: usize,
    events: Vec<BulkChangeEvent>,
    metadata: &HashMap<String, String>,
) -> Vec<EventEnvelope<BulkChange>> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, payload)| EventEnvelope {
            aggregate_id: aggregate_id.to_string(),
            sequence: sequence + i + 1,
            payload,
            metadata: metadata.clone(),
        })
        .collect()
}

/// What the event store needs of a database: a stream's events, those after a sequence, and an
/// append of one command's events (fenced or not).
pub trait Repository: Send + Sync {
    fn events(
        &self,
        aggregate_id: &str,
    ) -> impl Future<Output = Result<Vec<SerializedEvent>, PersistenceError>> + Send;
    fn events_after(
        &self,
        aggregate_id: &str,
        sequence: usize,
    ) -> impl Future<Output = Result<Vec<SerializedEvent>, PersistenceError>> + Send;
    fn append(
        &self,
        envelopes: &[EventEnvelope<BulkChange>],
        fence: Option<Fence>,
    ) -> impl Future<Output = Result<(), PersistenceError>> + Send;
    /// At most `limit` events after `sequence`, as their stored JSON text.
    fn page(
        &self,
        aggregate_id: &str,
        sequence: usize,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredText>, PersistenceError>> + Send;
}

/// One stored event as text: (sequence, event type, event version, payload, metadata).
pub type StoredText = (i64, String, String, String, String);

/// Text a cold load reads per query, about: the page size follows the events' sizes (a
/// `DevicesAdded` of 1,000 devices is ~250 KB, most others under 1 KB), so neither the
/// memory held nor the number of queries grows with the bulk change.
const LOAD_PAGE_BYTES: usize = 8 << 20;
/// Events a cold load reads per query: the first page, and the bounds.
const LOAD_PAGE: (usize, usize, usize) = (32, 8, 4_096);

/// A stored event decoded straight from its text into the event, as catch-up does (a
/// `serde_json::Value` of a 1,000-device `DevicesAdded` takes several times its text).
fn decode(aggregate_id: &str, row: StoredText) -> Result<EventEnvelope<BulkChange>, Error> {
    let (sequence, event_type, event_version, payload, metadata) = row;
    let stored = super::catchup::decode(
        super::catchup::Checkpoint::default(),
        aggregate_id.to_string(),
        sequence,
        event_type,
        event_version,
        payload,
        metadata,
    )
    .map_err(|e| Error::from(PersistenceError::DeserializationError(Box::new(e))))?;
    Ok(EventEnvelope {
        aggregate_id: stored.aggregate_id,
        sequence: stored.sequence as usize,
        payload: stored.event,
        metadata: stored.metadata,
    })
}

/// The repository of the configured database. The two append differently (arrays against
/// `json_each`) and read through their own cqrs-es crate, so this is a real dispatch.
pub enum AnyRepository {
    Postgres(BatchedPgRepository),
    Sqlite(SqliteRepository),
}

impl AnyRepository {
    pub fn new(db: &Db) -> Self {
        match db {
            Db::Postgres(pool) => Self::Postgres(BatchedPgRepository::new(pool.clone())),
            Db::Sqlite(pool) => Self::Sqlite(SqliteRepository::new(pool.clone())),
        }
    }
}

impl Repository for AnyRepository {
    async fn events(&self, aggregate_id: &str) -> Result<Vec<SerializedEvent>, PersistenceError> {
        match self {
            Self::Postgres(r) => r.inner.get_events::<BulkChange>(aggregate_id).await,
            Self::Sqlite(r) => r.inner.get_events::<BulkChange>(aggregate_id).await,
        }
    }

    async fn events_after(
        &self,
        aggregate_id: &str,
        sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        match self {
            Self::Postgres(r) => r.events_after::<BulkChange>(aggregate_id, sequence).await,
            Self::Sqlite(r) => {
                r.inner
                    .get_last_events::<BulkChange>(aggregate_id, sequence)
                    .await
            }
        }
    }

    async fn append(
        &self,
        envelopes: &[EventEnvelope<BulkChange>],
        fence: Option<Fence>,
    ) -> Result<(), PersistenceError> {
        match self {
            Self::Postgres(r) => r.append(envelopes, fence).await,
            Self::Sqlite(r) => r.append(envelopes, fence).await,
        }
    }

    async fn page(
        &self,
        aggregate_id: &str,
        sequence: usize,
        limit: usize,
    ) -> Result<Vec<StoredText>, PersistenceError> {
        const PG: &str = "SELECT sequence, event_type, event_version, payload::text, metadata::text
            FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
            ORDER BY sequence LIMIT $4";
        const SQLITE: &str = "SELECT sequence, event_type, event_version, payload, metadata
            FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
            ORDER BY sequence LIMIT $4";
        let (kind, after, limit) = (BulkChange::TYPE, sequence as i64, limit as i64);
        match self {
            Self::Postgres(r) => sqlx::query_as(PG)
                .bind(kind)
                .bind(aggregate_id)
                .bind(after)
                .bind(limit)
                .fetch_all(r.pool())
                .await
                .map_err(persistence_error),
            Self::Sqlite(r) => sqlx::query_as(SQLITE)
                .bind(kind)
                .bind(aggregate_id)
                .bind(after)
                .bind(limit)
                .fetch_all(r.pool())
                .await
                .map_err(persistence_error),
        }
    }
}

/// An append of `attempted` events that inserted `inserted` rows: none under a fence means the
/// fence refused it ([`Fenced`]).
pub(super) fn fence_result(
    fence: Option<Fence>,
    attempted: usize,
    inserted: u64,
) -> Result<(), PersistenceError> {
    match fence {
        Some(f) if attempted > 0 && inserted == 0 => {
            Err(PersistenceError::UnknownError(Box::new(Fenced(f))))
        }
        _ => Ok(()),
    }
}

/// How a failed statement reads to cqrs-es: a unique violation is a lost optimistic-concurrency
/// race, a broken link a connection error.
pub(super) fn persistence_error(e: sqlx::Error) -> PersistenceError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            PersistenceError::ConnectionError(Box::new(e))
        }
        _ => PersistenceError::UnknownError(Box::new(e)),
    }
}

/// The state of each bulk change this process works on, kept between commands and reads.
///
/// A state never leaves the cache while it is read or brought up to date: a read beside a
/// runner (a worker's message handler, an operator's command in the same process) catches the
/// cached state up in place, so the runner never finds it gone and never reloads the whole
/// stream because of it. A state in the cache is always the fold of a prefix of its stream; a
/// failed append leaves it as it was.
///
/// Each bulk change's state has a lock of its own: a read of one (a runner's scan of a million
/// devices, an API read) never waits for another's, so a worker running several bulk changes
/// side by side does not run them one lock at a time, and reads of the same state run together.
/// The map's lock is held only to find, add or drop a state, and no other lock is taken while
/// it is held (a state's lock may be held while taking it, never the reverse).
pub struct CachingStore<R> {
    repo: R,
    cache: Mutex<HashMap<String, Slot>>,
    /// Whole streams loaded, not counting empty ones (none cached, or the cached one was
    /// dropped).
    cold_loads: AtomicU64,
}

/// One bulk change's state and the sequence of the last event folded into it; never empty (a
/// slot is made with a state in it).
type Slot = Arc<RwLock<(BulkChange, usize)>>;

// Nothing panics while holding a lock here (`apply` never fails; a reader's closure could), and
// a state poisoned by a panicking reader is still a consistent state: it is used as it is.
fn read_lock(slot: &Slot) -> RwLockReadGuard<'_, (BulkChange, usize)> {
    slot.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock(slot: &Slot) -> RwLockWriteGuard<'_, (BulkChange, usize)> {
    slot.write().unwrap_or_else(|e| e.into_inner())
}

impl<R: Repository> CachingStore<R> {
    pub fn new(repo: R) -> Self {
        Self {
            repo,
            cache: Mutex::new(HashMap::new()),
            cold_loads: AtomicU64::new(0),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, id: &str) -> Option<Slot> {
        self.slots().get(id).cloned()
    }

    /// Puts a loaded state in the cache unless a newer one is already there, and reads the one
    /// that stays.
    fn put_then<T>(
        &self,
        id: &str,
        aggregate: BulkChange,
        sequence: usize,
        f: impl FnOnce(&BulkChange, usize) -> T,
    ) -> T {
        let mut loaded = Some((aggregate, sequence));
        let slot = self
            .slots()
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(RwLock::new(loaded.take().expect("taken once"))))
            .clone();
        if let Some((aggregate, sequence)) = loaded {
            let mut state = write_lock(&slot);
            if state.1 < sequence {
                *state = (aggregate, sequence);
            }
        }
        let state = read_lock(&slot);
        f(&state.0, state.1)
    }

    /// Reads the cached state as it is, without looking for newer events.
    fn peek<T>(&self, id: &str, f: impl FnOnce(&BulkChange) -> T) -> Option<T> {
        let slot = self.slot(id)?;
        let state = read_lock(&slot);
        Some(f(&state.0))
    }

    /// Reads the cached state and its sequence.
    fn peek_with_sequence<T>(
        &self,
        id: &str,
        f: impl FnOnce(&BulkChange, usize) -> T,
    ) -> Option<T> {
        let slot = self.slot(id)?;
        let state = read_lock(&slot);
        Some(f(&state.0, state.1))
    }

    /// Reads the state with every event appended so far (by this process or another): the
    /// cached one caught up in place (usually nothing new, one indexed query), or the whole
    /// stream loaded when none is cached.
    async fn current<T>(
        &self,
        id: &str,
        f: impl FnOnce(&BulkChange, usize) -> T,
    ) -> Result<T, Error> {
        loop {
            let Some(from) = self.peek_with_sequence(id, |_, sequence| sequence) else {
                let (aggregate, sequence) = self.load(id).await?;
                if sequence == 0 {
                    // No such stream (yet): nothing worth keeping.
                    return Ok(f(&aggregate, 0));
                }
                return Ok(self.put_then(id, aggregate, sequence, f));
            };
            let newer = deserialize(self.repo.events_after(id, from).await?)?;
            // The state now in the cache: dropped meanwhile (done, or handed over), look again.
            let Some(slot) = self.slot(id) else {
                continue;
            };
            if !newer.is_empty() {
                let mut state = write_lock(&slot);
                let (aggregate, sequence) = &mut *state;
                // On the state the query followed, or one that took some of its events in
                // meanwhile (another reader, an applied commit): the rest goes on top (none
                // fits one that is behind it, which the check below sends round again).
                for envelope in newer {
                    if envelope.sequence == *sequence + 1 {
                        *sequence = envelope.sequence;
                        aggregate.apply(envelope.payload);
                    }
                }
            }
            // Read under the shared lock: the state read may have moved on since (a commit
            // applied), never back.
            let state = read_lock(&slot);
            if state.1 < from {
                continue;
            }
            return Ok(f(&state.0, state.1));
        }
    }

    /// Folds a whole stream. It pages through it, so a bulk change's whole history (a million
    /// devices: thousands of events, hundreds of MB of JSON) is never in memory at once.
    async fn load(&self, id: &str) -> Result<(BulkChange, usize), Error> {
        let mut aggregate = BulkChange::default();
        let mut sequence = 0;
        let (mut limit, least, most) = LOAD_PAGE;
        loop {
            let page = self.repo.page(id, sequence, limit).await?;
            let full = page.len() == limit;
            let bytes: usize = page.iter().map(|row| row.3.len()).sum::<usize>().max(1);
            limit = (limit * LOAD_PAGE_BYTES / bytes).clamp(least, most);
            for row in page {
                let envelope = decode(id, row)?;
                sequence = envelope.sequence;
                aggregate.apply(envelope.payload);
            }
            if !full {
                break;
            }
        }
        if sequence > 0 {
            self.cold_loads.fetch_add(1, Ordering::Relaxed);
        }
        Ok((aggregate, sequence))
    }

    /// Brings an appended command's events into the cached state: applied when the state is
    /// still the one they were decided on (a new stream's first command starts one), nothing
    /// when a read already brought them in (the cached state is at or after their last
    /// sequence), forgotten otherwise.
    fn applied(&self, decided: Decided) {
        let Decided {
            key,
            base,
            envelopes,
            ..
        } = decided;
        let last = base + envelopes.len();
        let Some(slot) = self.slot(&key) else {
            if base == 0 && last > 0 {
                // A new stream: its state is these events alone, folded before it is put in
                // (a slot is never seen empty). One already there was loaded after this append
                // (a load before it finds no stream and keeps nothing): it holds them.
                let mut aggregate = BulkChange::default();
                for envelope in envelopes {
                    aggregate.apply(envelope.payload);
                }
                self.slots()
                    .entry(key)
                    .or_insert_with(|| Arc::new(RwLock::new((aggregate, last))));
            }
            return;
        };
        let mut state = write_lock(&slot);
        let (aggregate, sequence) = &mut *state;
        if *sequence == base {
            for envelope in envelopes {
                aggregate.apply(envelope.payload);
            }
            *sequence = last;
        } else if *sequence < last {
            // Neither: forgotten, while its lock is held so nothing catches it up meanwhile.
            let mut slots = self.slots();
            if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(&key);
            }
        }
    }

    fn evict(&self, id: &str) {
        self.slots().remove(id);
    }
}

fn deserialize(events: Vec<SerializedEvent>) -> Result<Vec<EventEnvelope<BulkChange>>, Error> {
    events
        .into_iter()
        .map(|e| EventEnvelope::<BulkChange>::try_from(upcast(e)).map_err(Error::from))
        .collect()
}

/// A command decided on the state in memory, its events not yet applied to it
/// ([`EventStore::decide`]).
pub struct Decided {
    key: String,
    /// The sequence the events follow.
    base: usize,
    envelopes: Vec<EventEnvelope<BulkChange>>,
    fence: Option<Fence>,
}

/// A decided command whose events are in the store ([`EventStore::append_decided`]), to be
/// [`applied`](EventStore::applied) to the state in memory.
pub struct Appended(Decided);

/// Executes `BulkChange` commands on whichever database is configured.
pub struct EventStore {
    store: Arc<CachingStore<AnyRepository>>,
    db: Db,
    /// Where the runner's appended events are handed to this process's projector.
    recent: Option<Arc<super::recent::Recent>>,
}

impl EventStore {
    pub fn new(db: &Db) -> Self {
        let store = Arc::new(CachingStore::new(AnyRepository::new(db)));
        Self {
            store,
            db: db.clone(),
            recent: None,
        }
    }

    /// Hands the events of every decided command it appends to `recent` (for this process's
    /// projector, see [`super::recent`]).
    pub fn with_recent(mut self, recent: Arc<super::recent::Recent>) -> Self {
        self.recent = Some(recent);
        self
    }

    /// Runs one command, unfenced; `worker` is recorded in each event's metadata.
    pub async fn execute(
        &self,
        id: BulkChangeId,
        command: BulkChangeCommand,
        worker: &str,
    ) -> Result<(), Error> {
        self.execute_as(
            id,
            command,
            Writer {
                worker,
                fence: None,
            },
        )
        .await
    }

    /// Runs one command as `writer`: its worker (and epoch) go into each event's metadata, and
    /// with a fence the events are refused ([`fenced`]) once a later holder took the bulk change.
    pub async fn execute_as(
        &self,
        id: BulkChangeId,
        command: BulkChangeCommand,
        writer: Writer<'_>,
    ) -> Result<(), Error> {
        let key = id.to_string();
        let (events, base) = self
            .store
            .current(&key, |aggregate, sequence| {
                (aggregate.decide(command), sequence)
            })
            .await?;
        let envelopes = envelopes(
            &key,
            base,
            events.map_err(Error::UserError)?,
            &writer.metadata(id),
        );
        let decided = Decided {
            key,
            base,
            envelopes,
            fence: writer.fence,
        };
        let appended = self.append_decided(decided).await?;
        self.applied(appended);
        Ok(())
    }

    /// Runs one command, then reads the state it left. The read is from the cache without a query:
    /// the commit just proved no other writer got in first (a later one makes the next command
    /// fail and catch up).
    pub async fn execute_then<T>(
        &self,
        id: BulkChangeId,
        command: BulkChangeCommand,
        writer: Writer<'_>,
        f: impl FnOnce(&BulkChange) -> T,
    ) -> Result<T, Error> {
        self.execute_as(id, command, writer).await?;
        self.read(id, f).await
    }

    /// Reads the current state, with every event appended so far by any process, without
    /// copying it: the state in memory caught up in place, or the stream loaded when none is
    /// there. The state stays in memory throughout, so a runner beside it never misses it.
    pub async fn inspect<T>(
        &self,
        id: BulkChangeId,
        f: impl FnOnce(&BulkChange) -> T,
    ) -> Result<T, Error> {
        self.store
            .current(&id.to_string(), |aggregate, _| f(aggregate))
            .await
    }

    /// Whole streams this process has loaded (a state not in memory, or dropped): a runner
    /// loads its bulk change once, and reads beside it never make it load again.
    pub fn cold_loads(&self) -> u64 {
        self.store.cold_loads.load(Ordering::Relaxed)
    }

    /// Reads the state in memory as it is, without a query (`None` when none is there).
    pub fn peek<T>(&self, id: BulkChangeId, f: impl FnOnce(&BulkChange) -> T) -> Option<T> {
        self.store.peek(&id.to_string(), f)
    }

    /// Reads the state in memory, or loads it when none is there (no query when it is).
    pub async fn read<T>(
        &self,
        id: BulkChangeId,
        f: impl FnOnce(&BulkChange) -> T,
    ) -> Result<T, Error> {
        let mut f = Some(f);
        if let Some(value) = self
            .store
            .peek(&id.to_string(), |bc| (f.take().unwrap())(bc))
        {
            return Ok(value);
        }
        match f {
            Some(f) => self.inspect(id, f).await,
            None => unreachable!("peek returned nothing after running the reader"),
        }
    }

    /// Decides `command` on the state in memory (loaded first when none is there), leaving
    /// that state as it is: while the events are appended ([`Self::append_decided`]) and
    /// until they are applied ([`Self::applied`]), reads see the state before the command.
    /// This is how a runner keeps one commit in flight while it dispatches what is due. One
    /// decided command at a time per bulk change: the next is decided once this one is
    /// applied (two decided on the same state would both claim the same sequence, and the
    /// second append would lose the optimistic-concurrency race).
    pub async fn decide(
        &self,
        id: BulkChangeId,
        command: BulkChangeCommand,
        writer: Writer<'_>,
    ) -> Result<Decided, Error> {
        let key = id.to_string();
        // Loaded into memory first when it is not there.
        self.read(id, |_| ()).await?;
        let decided = self.store.peek_with_sequence(&key, |aggregate, sequence| {
            (aggregate.decide(command), sequence)
        });
        let Some((events, base)) = decided else {
            return Err(Error::UnexpectedError(
                format!("bulk change {id}: no state in memory to decide a command on").into(),
            ));
        };
        let events = events.map_err(Error::UserError)?;
        let envelopes = envelopes(&key, base, events, &writer.metadata(id));
        Ok(Decided {
            key,
            base,
            envelopes,
            fence: writer.fence,
        })
    }

    /// Appends a decided command's events (in one transaction, under its writer's fence). A
    /// refused append (lost race, fence, database) leaves the state in memory as it was: still
    /// a prefix of the stream, which the next [`Self::inspect`] or command catches up. Only
    /// what it returns can be [`applied`](Self::applied): refused events never reach the state.
    pub async fn append_decided(&self, decided: Decided) -> Result<Appended, Error> {
        if !decided.envelopes.is_empty() {
            self.store
                .repo
                .append(&decided.envelopes, decided.fence)
                .await?;
            if let Some(recent) = &self.recent {
                recent.put(&decided.envelopes);
            }
        }
        Ok(Appended(decided))
    }

    /// Applies an appended command's events to the state in memory (unless a read already
    /// brought them in).
    pub fn applied(&self, appended: Appended) {
        self.store.applied(appended.0);
    }

    /// Every event of one bulk change, in order.
    pub async fn events(&self, id: BulkChangeId) -> Result<Vec<EventEnvelope<BulkChange>>, Error> {
        deserialize(self.store.repo.events(&id.to_string()).await?)
    }

    /// Forgets the in-memory state of a bulk change (done, or handed to another worker).
    pub fn forget(&self, id: BulkChangeId) {
        self.store.evict(&id.to_string());
    }
}

/// The event types about devices; every other type is a milestone of the bulk change itself.
/// The same list is in the milestones query below and in the partial index it uses
/// (`events_milestones`, migration 0009): change all three together.
pub const DEVICE_EVENT_TYPES: [&str; 10] = [
    "DevicesAdded",
    "DeviceStatusUpdated",
    "ServiceStatusUpdated",
    "RevServiceCreationStarted",
    "RevServiceCreated",
    "RevServiceFailed",
    "DeviceStepRetryScheduled",
    "DeviceFailed",
    "DeviceProcessed",
    "DevicesCancelled",
];

/// No `aggregate_type` condition (every stream in `events` is a `BulkChange`): with one,
/// PostgreSQL without fresh statistics walked the primary key through all of a bulk change's
/// events (2.7 s at 1,000,000 devices) instead of the partial index (under 1 ms).
macro_rules! milestones_sql {
    ($payload:literal) => {
        concat!(
            "SELECT sequence, event_type, event_version, ",
            $payload,
            " FROM events WHERE aggregate_id = $1
               AND event_type NOT IN ('DevicesAdded', 'DeviceStatusUpdated', 'ServiceStatusUpdated',
                 'RevServiceCreationStarted', 'RevServiceCreated', 'RevServiceFailed',
                 'DeviceStepRetryScheduled', 'DeviceFailed', 'DeviceProcessed', 'DevicesCancelled')
             ORDER BY sequence"
        )
    };
}
const MILESTONES_PG: &str = milestones_sql!("payload::text, metadata::text");
const MILESTONES_SQLITE: &str = milestones_sql!("payload, metadata");

impl EventStore {
    /// The bulk change's own events (accepted, started, paused, held, cancel, completed,
    /// retried), without those of its devices: through an index, so as cheap at 1,000,000
    /// devices as at 10.
    pub async fn milestones(
        &self,
        id: BulkChangeId,
    ) -> Result<Vec<EventEnvelope<BulkChange>>, Error> {
        let key = id.to_string();
        let rows: Vec<(i64, String, String, String, String)> = crate::with_pool!(&self.db, pool => {
            sqlx::query_as(self.db.pick(MILESTONES_PG, MILESTONES_SQLITE))
                .bind(&key)
                .fetch_all(pool)
                .await
                .map_err(persistence_error)?
        });
        rows.into_iter().map(|row| decode(&key, row)).collect()
    }

    /// The fingerprint of the request `id` was accepted with; `None` if it was not (reads its
    /// first event only).
    pub async fn accepted_fingerprint(&self, id: BulkChangeId) -> Result<Option<String>, Error> {
        let key = id.to_string();
        let first = self.store.repo.page(&key, 0, 1).await?;
        let Some(row) = first.into_iter().next() else {
            return Ok(None);
        };
        match decode(&key, row)?.payload {
            BulkChangeEvent::BulkChangeAccepted(e) => Ok(Some(e.request_fingerprint)),
            other => Err(Error::UnexpectedError(
                format!(
                    "bulk change {id}: its first event is {}, not BulkChangeAccepted",
                    other.event_type()
                )
                .into(),
            )),
        }
    }

    /// Starts accepting a bulk change not yet in the store, in one transaction that takes its
    /// events in parts (a request read as a stream): nothing is seen by anyone, or kept should
    /// the process die, before [`Accepting::commit`]. A writer that accepted the same id first
    /// makes an append or the commit fail with `AggregateConflict`.
    pub async fn begin_accept(&self, id: BulkChangeId, worker: &str) -> Result<Accepting, Error> {
        let tx = self.db.begin().await.map_err(persistence_error)?;
        Ok(Accepting {
            tx,
            aggregate_id: id.to_string(),
            sequence: 0,
            metadata: HashMap::from([("worker".to_string(), worker.to_string())]),
        })
    }
}

/// A bulk change being accepted in parts ([`EventStore::begin_accept`]); dropped without
/// [`commit`](Accepting::commit), it leaves nothing behind.
pub struct Accepting {
    tx: super::Tx,
    aggregate_id: String,
    sequence: usize,
    metadata: HashMap<String, String>,
}

impl Accepting {
    /// Appends the next events of the stream (the first is its `BulkChangeAccepted`).
    pub async fn append(&mut self, events: Vec<BulkChangeEvent>) -> Result<(), Error> {
        let envelopes = envelopes(&self.aggregate_id, self.sequence, events, &self.metadata);
        match &mut self.tx {
            super::Tx::Postgres(tx) => super::batched::append(&mut **tx, &envelopes, None).await?,
            super::Tx::Sqlite(tx) => super::sqlite::append(&mut **tx, &envelopes, None).await?,
        }
        self.sequence += envelopes.len();
        Ok(())
    }

    /// Makes the whole stream visible at once.
    pub async fn commit(self) -> Result<(), Error> {
        self.tx
            .commit()
            .await
            .map_err(|e| Error::from(persistence_error(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_milestones_query_and_its_index_name_the_same_device_events() {
        let count = |text: &str| text.matches('\'').count() / 2;
        for migration in [
            include_str!("../../migrations/postgres/0009_milestones_index.sql"),
            include_str!("../../migrations/sqlite/0009_milestones_index.sql"),
        ] {
            for sql in [migration, MILESTONES_PG, MILESTONES_SQLITE] {
                for name in DEVICE_EVENT_TYPES {
                    assert!(
                        sql.contains(&format!("'{name}'")),
                        "{name} missing from {sql}"
                    );
                }
            }
            let listed = &migration[migration.find("NOT IN").unwrap()..];
            assert_eq!(count(listed), DEVICE_EVENT_TYPES.len());
        }
        let listed = &MILESTONES_PG[MILESTONES_PG.find("NOT IN").unwrap()..];
        assert_eq!(count(listed), DEVICE_EVENT_TYPES.len());
    }
}
