//! One projector batch as few statements as possible: a device's row updates within a batch
//! merge into one (every column is last-write-wins, some with `COALESCE`), log rows go in
//! together, and runs of counter increments on a bulk change go in as one guarded update.
//!
//! Applying a merged batch leaves every row as applying its operations one by one would, also
//! when another projector applied part of the batch first (each row's `last_sequence` guard
//! still decides per event).

use std::collections::HashMap;

use super::rows::{DeviceUpdate, RowOp};

/// A run of consecutive counter increments on one bulk change: (sequence, processed, failed,
/// billing warnings, cancelled), in sequence order.
#[derive(Debug, Default, PartialEq)]
pub struct Counts {
    pub id: i64,
    pub items: Vec<(i64, i64, i64, i64, i64)>,
}

/// What one batch writes, grouped.
#[derive(Debug, Default)]
pub struct Plan {
    /// Bulk-change rows and device inserts, in event order.
    pub ordered: Vec<Ordered>,
    /// One merged update per device.
    pub devices: Vec<DeviceUpdate>,
    device_index: HashMap<i64, usize>,
    /// `RowOp::Log`s, in event order.
    pub logs: Vec<RowOp>,
    /// `RowOp::Ended`s: (bulk change, sequence, Unix second), in event order.
    pub ended: Vec<(i64, i64, i64)>,
}

#[derive(Debug, PartialEq)]
pub enum Ordered {
    Op(RowOp),
    Counts(Counts),
}

impl Plan {
    pub fn new(ops: impl IntoIterator<Item = RowOp>) -> Self {
        let mut plan = Self::default();
        for op in ops {
            plan.push(op);
        }
        plan
    }

    fn push(&mut self, op: RowOp) {
        match op {
            RowOp::Device(update) => match self.device_index.get(&update.id) {
                Some(&i) => self.devices[i].then(update),
                None => {
                    self.device_index.insert(update.id, self.devices.len());
                    self.devices.push(update);
                }
            },
            RowOp::Log(_) => self.logs.push(op),
            RowOp::Ended { id, at, sequence } => self.ended.push((id, sequence, at.timestamp())),
            RowOp::BulkCounts {
                id,
                processed,
                failed,
                billing_warnings,
                cancelled,
                sequence,
            } => {
                let item = (sequence, processed, failed, billing_warnings, cancelled);
                // Only a run with nothing else on the bulk change's row in between merges, so the
                // status updates keep their place relative to the counts.
                let run = self.ordered.iter_mut().rev().find_map(|o| match o {
                    Ordered::Counts(c) if c.id == id => Some(Some(c)),
                    Ordered::Op(
                        RowOp::BulkStatus { id: other, .. } | RowOp::InsertBulk(_, other),
                    ) if *other == id => Some(None),
                    _ => None,
                });
                match run.flatten() {
                    Some(counts) => counts.items.push(item),
                    None => self.ordered.push(Ordered::Counts(Counts {
                        id,
                        items: vec![item],
                    })),
                }
            }
            other => self.ordered.push(Ordered::Op(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::status::{BulkChangeStatus, DeviceStatus};
    use chrono::{TimeZone, Utc};

    fn device(
        id: i64,
        seq: i64,
        rev: Option<i64>,
        attempts: i32,
        by: Option<&str>,
    ) -> DeviceUpdate {
        DeviceUpdate {
            id,
            status: DeviceStatus::Processing,
            details: format!("seq {seq}"),
            is_processed: false,
            has_errors: false,
            rev_service_id: rev,
            attempts,
            processed_date: None,
            processed_by: by.map(str::to_string),
            sequence: seq,
        }
    }

    fn counts(id: i64, seq: i64) -> RowOp {
        RowOp::BulkCounts {
            id,
            processed: 1,
            failed: 0,
            billing_warnings: 0,
            cancelled: 0,
            sequence: seq,
        }
    }

    #[test]
    fn device_updates_merge_like_applying_them_in_order() {
        let plan = Plan::new(
            [
                device(1, 3, None, 1, Some("w1")),
                device(2, 4, None, 1, None),
                device(1, 5, Some(77), 2, None),
                device(1, 6, None, 0, None),
            ]
            .map(RowOp::Device),
        );
        assert_eq!(plan.devices.len(), 2);
        assert_eq!(plan.devices[0], device(1, 6, Some(77), 2, Some("w1")));
        assert_eq!(plan.devices[1], device(2, 4, None, 1, None));
    }

    #[test]
    fn counts_merge_only_between_other_writes_to_the_same_row() {
        let status = RowOp::BulkStatus {
            id: 10,
            status: BulkChangeStatus::Paused,
            details: None,
            started_date: None,
            processed_date: Some(Utc.timestamp_opt(0, 0).unwrap()),
            processed_by: None,
            sequence: 7,
        };
        let plan = Plan::new([
            counts(10, 3),
            counts(20, 4),
            counts(10, 5),
            status.clone(),
            counts(10, 8),
            counts(10, 9),
        ]);
        assert_eq!(
            plan.ordered,
            vec![
                Ordered::Counts(Counts {
                    id: 10,
                    items: vec![(3, 1, 0, 0, 0), (5, 1, 0, 0, 0)]
                }),
                Ordered::Counts(Counts {
                    id: 20,
                    items: vec![(4, 1, 0, 0, 0)]
                }),
                Ordered::Op(status),
                Ordered::Counts(Counts {
                    id: 10,
                    items: vec![(8, 1, 0, 0, 0), (9, 1, 0, 0, 0)]
                }),
            ]
        );
    }
}
