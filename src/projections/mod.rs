//! Read models, fed by checkpointed catch-up (never by `Query::dispatch`).
//!
//! Each event maps to row operations by a pure function ([`rows::ops`]); the [`projector`]
//! applies them and advances its checkpoint in one transaction, so a crash at any point neither
//! loses nor doubles an update. No projection calls anything external or decides anything: the
//! decisions are in the events.

mod batch;
pub mod projector;
pub mod read;
pub mod rebuild;
pub mod rows;
pub mod verify;

pub use projector::Projector;
