//! The saga: the workflow definition, the steps that call POND and Rev, and the runner that
//! drives a bulk change from its recorded events.

pub mod breaker;
pub mod definition;
pub mod limiter;
pub mod runner;
pub mod steps;

pub use runner::{Progress, RunOutcome};
