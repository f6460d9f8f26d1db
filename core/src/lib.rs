//! Cloud48 cloud core: a control plane for fleets of virtualization servers.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod agent;
pub mod agents;
pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod collector;
pub mod commands;
pub mod config;
pub mod core;
pub mod demo;
pub mod driver;
pub mod entities;
pub mod health;
pub mod lab;
pub mod managers;
pub mod model;
pub mod placement;
pub mod plugins;
pub mod queue;
pub mod rebalance;
pub mod scaffold;
pub mod types;

pub use crate::core::{Core, CoreConfig, CoreError};
