//! Container types: the `ContainerType` trait the engine consults through hooks, its registry
//! with the built-in `plain` type, and the wasmtime host that runs container types shipped as
//! WebAssembly components.
//!
//! Invariant: wasmtime types never leave `host` (the engine sees `types::ContainerType`); this is
//! the only crate of the workspace that depends on wasmtime.

pub mod harness;
pub mod host;
pub mod types;

pub use host::{Limits, PluginHost, PluginMeta, WasmPlugin};
