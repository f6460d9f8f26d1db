//! SDK for Cloud48 container types.
//!
//! A container type is a WASM component that implements the hooks of the
//! `cloud48:container` WIT contract. With this crate it is a Rust type implementing
//! [`ContainerType`] (every hook has a default that allows and does nothing) plus one
//! [`export_container_type!`] line:
//!
//! ```
//! use cloud48_sdk::*;
//!
//! #[derive(Default)]
//! struct Memcached;
//!
//! impl ContainerType for Memcached {
//!     fn metadata(&self) -> Metadata {
//!         Metadata::new("memcached", "0.1.0", 30, Resources::new(250, 128, 256))
//!             .described("in-memory cache")
//!             .with_workload(
//!                 Workload::command(["memcached", "-m", "${memory-mb}"])
//!                     .with_endpoint("cache", 11211, Protocol::Tcp)
//!                     .ready_when(Check::Tcp("cache".into())),
//!             )
//!             .with_param(ParamSpec::integer("memory-mb", 64, "cache size in MiB"))
//!     }
//!     fn before_it_is_added(&self, ctx: &Context) -> HookResult {
//!         if ctx.members_of_type("memcached").count() > 0 {
//!             return Ok(Outcome::deny("one cache per environment"));
//!         }
//!         Ok(Outcome::allow())
//!     }
//! }
//!
//! export_container_type!(Memcached);
//! # fn main() {}
//! ```
//!
//! See `sdk/README.md` for the hook order, the actions, the limits and testing with
//! [`testing`].

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/0.2.0",
        world: "container-type",
        pub_export_macro: true,
        default_bindings_module: "cloud48_sdk::bindings",
        export_macro_name: "export_world",
    });
}

pub mod testing;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

// Without the global allocator only its arithmetic is used (by its tests).
#[cfg_attr(not(all(target_arch = "wasm32", feature = "arena")), allow(dead_code))]
mod arena;
mod builders;
mod export;
mod types;

#[doc(hidden)]
pub use export::Export;
pub use types::{
    Action, AddRequest, Check, Context, DownCause, Endpoint, EnvParams, Environment, ExecRequest,
    ExecResult, HookError, HookResult, Image, Level, Member, Metadata, Outcome, ParamKind,
    ParamSpec, Placement, Protocol, Readiness, Resources, Status, Verdict, Volume, Workload,
};

/// The version of the WIT contract this SDK builds plugins for.
pub const WIT_VERSION: &str = "0.2.0";

/// Behaviour of a container type. Every hook defaults to "allow, do nothing".
pub trait ContainerType: Default {
    /// Name, version, priority, default resources, workload and parameters.
    fn metadata(&self) -> Metadata;
    /// State blob of a new container (default: empty). The host calls it once and gives
    /// every new container that answer, unless the plugin imports randomness (`wasi:random`,
    /// e.g. through `std`'s `RandomState` or the `getrandom` crate): then it asks for each.
    fn initial_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// This container is about to join `ctx.environment` (its id is 0).
    fn before_it_is_added(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// This container joined the environment.
    fn after_it_is_added(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// `other` is about to join.
    fn before_other_is_added(&self, _ctx: &Context, _other: &Member) -> HookResult {
        Ok(Outcome::allow())
    }
    /// `other` joined.
    fn after_other_is_added(&self, _ctx: &Context, _other: &Member) -> HookResult {
        Ok(Outcome::allow())
    }
    /// This container is about to leave.
    fn before_it_is_removed(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// This container left (it is destroyed; a denial is ignored).
    fn after_it_is_removed(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// `other` is about to leave.
    fn before_other_is_removed(&self, _ctx: &Context, _other: &Member) -> HookResult {
        Ok(Outcome::allow())
    }
    /// `other` left.
    fn after_other_is_removed(&self, _ctx: &Context, _other: &Member) -> HookResult {
        Ok(Outcome::allow())
    }
    /// This container became unavailable.
    fn is_down(&self, _ctx: &Context, _cause: &DownCause) -> HookResult {
        Ok(Outcome::allow())
    }
    /// This container is available again.
    fn is_up(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// `other` became unavailable (after its own `is_down`).
    fn after_other_is_down(
        &self,
        _ctx: &Context,
        _other: &Member,
        _cause: &DownCause,
    ) -> HookResult {
        Ok(Outcome::allow())
    }
    /// `other` is available again (after its own `is_up`).
    fn after_other_is_up(&self, _ctx: &Context, _other: &Member) -> HookResult {
        Ok(Outcome::allow())
    }
    /// A script this container's hook asked for with a tag ended.
    fn after_exec(&self, _ctx: &Context, _result: &ExecResult) -> HookResult {
        Ok(Outcome::allow())
    }
    /// The core started.
    fn after_cc_start(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// The core is stopping.
    fn before_cc_stop(&self, _ctx: &Context) -> HookResult {
        Ok(Outcome::allow())
    }
    /// The state as JSON for users (default: the state if it is JSON, else its length).
    fn inspect(&self, state: &[u8]) -> String {
        match serde_json::from_slice::<serde_json::Value>(state) {
            Ok(v) => v.to_string(),
            Err(_) => serde_json::json!({ "bytes": state.len() }).to_string(),
        }
    }
    /// Converts the state of a container written by version `from_version` of this type
    /// (`ctx.state`) to this version; `ctx` shows the container and its environment. An error
    /// refuses the upgrade of that container (default: the state unchanged).
    fn migrate_state(&self, _from_version: &str, ctx: &Context) -> Result<Vec<u8>, String> {
        Ok(ctx.state.clone())
    }
}

/// Writes a line to the core's log and to the record of the command running the hook (in
/// native tests, to [`testing::Platform::logs`]).
pub fn log(level: Level, message: impl AsRef<str>) {
    #[cfg(target_arch = "wasm32")]
    export::log(level, message.as_ref());
    #[cfg(not(target_arch = "wasm32"))]
    testing::record_log(level, message.as_ref());
}

/// The name part of a type id (`balancer@0.1.0` -> `balancer`).
pub fn type_name(type_id: &str) -> &str {
    type_id.split('@').next().unwrap_or(type_id)
}

/// Exports a [`ContainerType`] as the plugin's WIT implementation.
#[macro_export]
macro_rules! export_container_type {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type Cloud48Plugin = $crate::Export<$t>;
    $crate::bindings::export_world!(Cloud48Plugin with_types_in $crate::bindings);
        };
    };
}
