//! One integration-test binary: the real engine against the simulator over HTTP on loopback,
//! on PostgreSQL (`#[sqlx::test]`, needs DATABASE_URL) and SQLite.

mod api;
mod browser;
mod cli;
mod crash;
mod dashboard;
mod faults;
mod fleet;
mod helpers;
mod intake;
mod limits;
mod metrics;
mod operator;
mod pipeline;
mod platform;
mod pooler;
mod property;
mod scenarios;
mod server_settings;
mod sqs;
mod store;
mod tls;
