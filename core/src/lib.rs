//! Cloud48's command line (`cloud48`): the CLI and its HTTP client, `serve`, and the developer
//! tools (benchmarks, the demo, the lab of real servers) behind the `dev` feature.
//!
//! For the tests and tools its root re-exports the engine's modules and the API under the paths
//! they had before the engine had a crate of its own. See `ARCHITECTURE.md`.

#[cfg(feature = "dev")]
pub mod bench;
pub mod cli;
#[cfg(feature = "dev")]
pub mod demo;
#[cfg(feature = "dev")]
pub mod lab;
pub mod scaffold;

pub use cloud48_api as api;
pub use cloud48_engine::{
    Core, CoreConfig, CoreError, agent, agents, auth, collector, commands, config, core, driver,
    entities, fleet, health, managers, model, placement, plugins, queue, rebalance, types,
};
