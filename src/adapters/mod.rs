//! Clients of the external systems. They record every exchange as an [`ApiCall`] without
//! credentials, and classify failures as the workflow needs them.

pub mod http;
pub mod pond;
pub mod rev;

pub use http::Failure;
