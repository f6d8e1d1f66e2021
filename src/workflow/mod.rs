//! The saga: the workflow definition, the steps that call POND and Rev, and the runner that
//! drives a bulk change from its recorded events.

pub mod breaker;
pub mod definition;
pub mod limits;
pub mod per_downstream;
pub mod runner;
pub mod steps;

pub use per_downstream::PerDownstream;
pub use runner::{Progress, RunOutcome};
