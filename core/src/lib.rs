//! Cloud48 cloud core: a control plane for fleets of virtualization servers.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod agents;
pub mod api;
pub mod auth;
#[cfg(feature = "dev")]
pub mod bench;
pub mod cli;
pub mod collector;
pub mod commands;
pub mod config;
pub mod core;
#[cfg(feature = "dev")]
pub mod demo;
pub mod entities;
pub mod fleet;
pub mod health;
#[cfg(feature = "dev")]
pub mod lab;
pub mod managers;
pub mod placement;
pub mod plugins;
pub mod queue;
pub mod rebalance;
pub mod scaffold;

pub use crate::core::{Core, CoreConfig, CoreError};
pub use cloud48_agent as agent;
pub use cloud48_model as model;
pub use cloud48_plugin_host::types;

/// The drivers: the trait and the simulated driver, the linux driver, and the remote driver over a
/// node agent.
pub mod driver {
    pub use cloud48_agent::remote;
    pub use cloud48_driver::*;
    pub use cloud48_linux as linux;
}
