//! Cloud48's engine: the persisted command queue, the command steps, the managers, placement,
//! health, the collector and the rebalancer, over one database. It knows nothing of HTTP (the
//! REST API is `cloud48-api`) or of the command line (`cloud48`).
//!
//! See `ARCHITECTURE.md` at the repository root for the map of the workspace.

pub mod agents;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod collector;
pub mod commands;
pub mod config;
pub mod core;
pub mod entities;
pub mod events;
pub mod export_archive;
pub mod fleet;
pub mod health;
pub mod managers;
pub mod metrics;
pub mod placement;
pub mod plugins;
pub mod projects;
pub mod queue;
pub mod rebalance;
pub mod secrets;
pub mod services;
pub mod statistics;
mod submitter;
pub mod throttle;

pub use crate::core::{Core, CoreConfig, CoreError};
pub use cloud48_agent as agent;
pub use cloud48_model as model;
pub use cloud48_plugin_host::types;

/// The image store (OCI image layouts by digest) and `image build`.
pub mod images {
    pub use cloud48_image::*;
}

/// The drivers: the trait and the simulated driver, the linux driver, and the remote driver over a
/// node agent.
pub mod driver {
    pub use cloud48_agent::remote;
    pub use cloud48_driver::*;
    pub use cloud48_linux as linux;
}
