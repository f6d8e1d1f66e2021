//! bulkflow: a durable, event-sourced workflow engine that carries out bulk changes of IoT
//! devices at their carrier (POND IoT) and creates the matching billing services (Rev.io).
//!
//! # Layout
//! - [`domain`]: pure: ids, statuses, the request, the `BulkChange` aggregate.
//! - [`workflow`]: the saga: the workflow definition, the steps and the runner that drives a
//!   bulk change from recorded events.
//! - [`store`]: event store on PostgreSQL (postgres-es) or SQLite (sqlite-es), checkpointed
//!   catch-up, the database-backed local queue.
//! - [`projections`]: the read models `m2m_device_change`, `device_bulk_change_log`,
//!   `device_bulk_change`.
//! - [`adapters`]: the POND and Rev.io HTTP clients.
//! - [`sim`]: the POND + Rev simulator for tests and demos.
//! - [`config`], [`app`], [`cli`]: wiring.

pub mod adapters;
pub mod api;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod domain;
pub mod failpoints;
pub mod metrics;
pub mod platform;
pub mod projections;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod workflow;

/// mimalloc for every binary linked with bulkflow: the engine allocates and frees many
/// short-lived JSON values and strings, which fragment glibc's allocator (in profiles its
/// `malloc_consolidate`/`unlink_chunk` took ~10 % of the runner's time).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
