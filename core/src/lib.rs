//! Cloud48's command line (`cloud48`): the CLI and its HTTP client, `serve`, and the developer
//! tools (benchmarks, the demo, the lab of real servers) behind the `dev` feature.
//! The engine, the API and the crates below them are used by their own names
//! (`cloud48_engine`, `cloud48_api`, ...). See `ARCHITECTURE.md`.

#[cfg(feature = "dev")]
pub mod bench;
pub mod cli;
#[cfg(feature = "dev")]
pub mod demo;
#[cfg(feature = "dev")]
pub mod lab;
pub mod scaffold;
#[cfg(feature = "dev")]
pub mod serving;
