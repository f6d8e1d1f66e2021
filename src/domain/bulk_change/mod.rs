//! The `BulkChange` aggregate: one event stream per bulk change.
//!
//! Shape (see `docs/adr/0001-aggregate-shape.md`): one stream holds the bulk change and all its
//! devices; the state is compact (a few dozen bytes a device) and the store keeps it in memory
//! between commands of the single writer, so the cost of a command does not grow with the bulk
//! change. Device outcomes arrive in batches (`RecordResults`), many events per commit.

mod aggregate;
mod commands;
mod error;
mod events;
#[cfg(test)]
mod tests;
pub mod upcast;

pub use aggregate::{BulkChange, DeviceState, Header, DEVICES_PER_EVENT, MAX_THROTTLES};
pub use commands::{BulkChangeCommand, FailureClass, StepOutcome, StepReport};
pub use error::Error;
pub use events::*;
