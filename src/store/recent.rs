//! The events this process appended lately, still decoded, for its own catch-up consumer (the
//! projector): it reads which events come next from the events table as always (the table
//! alone decides order and visibility, see [`super::catchup`]) but takes the payloads of the
//! ones found here instead of reading their JSON back and decoding it again.
//!
//! Only events whose append succeeded are put here (an append that failed, lost a race or was
//! fenced put nothing), so an entry is exactly what the table holds under its aggregate id and
//! sequence. Whatever is not here (another process's events, an accept, anything after a
//! restart) is read from the table. Bounded: past [`CAP`] events nobody took (no consumer in
//! this process, or another worker's projector applied them first), it starts over empty.

use std::collections::HashMap;
use std::sync::Mutex;

use cqrs_es::EventEnvelope;

use crate::domain::{BulkChange, BulkChangeEvent};

/// Most events kept (a few MB: a projector keeping up takes them a commit or two after they
/// were put; one further behind reads from the table, as without this).
pub const CAP: usize = 4_000;

/// An event and its metadata.
pub type Payload = (BulkChangeEvent, HashMap<String, String>);

#[derive(Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By aggregate id, then sequence.
    streams: HashMap<String, HashMap<i64, Payload>>,
    len: usize,
}

impl Recent {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the events of an append that succeeded.
    pub fn put(&self, envelopes: &[EventEnvelope<BulkChange>]) {
        let Some(first) = envelopes.first() else {
            return;
        };
        let mut inner = self.inner();
        if inner.len + envelopes.len() > CAP {
            inner.streams.clear();
            inner.len = 0;
        }
        let stream = inner.streams.entry(first.aggregate_id.clone()).or_default();
        let mut added = 0;
        for e in envelopes {
            debug_assert_eq!(e.aggregate_id, first.aggregate_id);
            let payload = (e.payload.clone(), e.metadata.clone());
            if stream.insert(e.sequence as i64, payload).is_none() {
                added += 1;
            }
        }
        inner.len += added;
    }

    /// Takes the event at `sequence` of `aggregate_id`, if kept.
    pub fn take(&self, aggregate_id: &str, sequence: i64) -> Option<Payload> {
        let mut inner = self.inner();
        let stream = inner.streams.get_mut(aggregate_id)?;
        let taken = stream.remove(&sequence)?;
        if stream.is_empty() {
            inner.streams.remove(aggregate_id);
        }
        inner.len -= 1;
        Some(taken)
    }

    /// Events kept.
    pub fn len(&self) -> usize {
        self.inner().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::bulk_change::{BulkChangeResumed, BulkRef};
    use crate::domain::ids::{BulkChangeId, ServiceProviderId, TenantId};

    fn envelope(id: &str, sequence: usize) -> EventEnvelope<BulkChange> {
        EventEnvelope {
            aggregate_id: id.into(),
            sequence,
            payload: BulkChangeEvent::BulkChangeResumed(BulkChangeResumed {
                bulk: BulkRef {
                    bulk_change_id: BulkChangeId::new(1).unwrap(),
                    tenant_id: TenantId::new(1).unwrap(),
                    service_provider_id: ServiceProviderId::new(1).unwrap(),
                },
                by: format!("op-{sequence}"),
                at: chrono::Utc::now(),
            }),
            metadata: HashMap::from([("worker".into(), "w".into())]),
        }
    }

    #[test]
    fn an_event_is_taken_once_and_the_cache_stays_bounded() {
        let recent = Recent::new();
        recent.put(&[envelope("1", 1), envelope("1", 2)]);
        recent.put(&[envelope("2", 1)]);
        assert_eq!(recent.len(), 3);
        let (event, metadata) = recent.take("1", 2).unwrap();
        assert!(matches!(event, BulkChangeEvent::BulkChangeResumed(r) if r.by == "op-2"));
        assert_eq!(metadata["worker"], "w");
        assert!(recent.take("1", 2).is_none(), "taken twice");
        assert!(recent.take("3", 1).is_none());
        assert_eq!(recent.len(), 2);
        // Nobody takes them: past the cap it starts over instead of growing.
        let many: Vec<_> = (1..=CAP).map(|s| envelope("9", s)).collect();
        recent.put(&many);
        assert_eq!(recent.len(), CAP);
        assert!(recent.take("1", 1).is_none(), "kept past the cap");
        recent.put(&[envelope("10", 1)]);
        assert_eq!(recent.len(), 1);
    }
}
