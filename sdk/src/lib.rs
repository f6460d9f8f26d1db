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
//!     }
//!     fn before_it_is_added(&self, ctx: &Context) -> Outcome {
//!         if ctx.members_of_type("memcached").count() > 0 {
//!             return Outcome::deny("one cache per environment");
//!         }
//!         Outcome::allow()
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
        path: "../wit/0.1.0",
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

mod export;
mod types;

#[doc(hidden)]
pub use export::Export;
pub use types::{
    Action, Context, DownCause, Environment, ExecRequest, Member, Metadata, Outcome, Resources,
    Status, Verdict,
};

/// The version of the WIT contract this SDK builds plugins for.
pub const WIT_VERSION: &str = "0.1.0";

/// Behaviour of a container type. Every hook defaults to "allow, do nothing".
pub trait ContainerType: Default {
    /// Name, version, priority and default resources.
    fn metadata(&self) -> Metadata;
    /// State blob of a new container (default: empty).
    fn initial_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// This container is about to join `ctx.environment` (its id is 0).
    fn before_it_is_added(&self, _ctx: &Context) -> Outcome {
        Outcome::allow()
    }
    /// This container joined the environment.
    fn after_it_is_added(&self, _ctx: &Context) -> Outcome {
        Outcome::allow()
    }
    /// `other` is about to join.
    fn before_other_is_added(&self, _ctx: &Context, _other: &Member) -> Outcome {
        Outcome::allow()
    }
    /// `other` joined.
    fn after_other_is_added(&self, _ctx: &Context, _other: &Member) -> Outcome {
        Outcome::allow()
    }
    /// This container is about to leave.
    fn before_it_is_removed(&self, _ctx: &Context) -> Outcome {
        Outcome::allow()
    }
    /// `other` left.
    fn after_other_is_removed(&self, _ctx: &Context, _other: &Member) -> Outcome {
        Outcome::allow()
    }
    /// This container became unavailable.
    fn is_down(&self, _ctx: &Context, _cause: &DownCause) -> Outcome {
        Outcome::allow()
    }
    /// This container is available again.
    fn is_up(&self, _ctx: &Context) -> Outcome {
        Outcome::allow()
    }
    /// The core started.
    fn after_cc_start(&self, _ctx: &Context) -> Outcome {
        Outcome::allow()
    }
    /// The core is stopping.
    fn before_cc_stop(&self, _ctx: &Context) -> Outcome {
        Outcome::allow()
    }
    /// The state as JSON for users (default: the state if it is JSON, else its length).
    fn inspect(&self, state: &[u8]) -> String {
        match serde_json::from_slice::<serde_json::Value>(state) {
            Ok(v) => v.to_string(),
            Err(_) => serde_json::json!({ "bytes": state.len() }).to_string(),
        }
    }
    /// Converts state written by an older version (default: unchanged).
    fn migrate_state(&self, _from_version: &str, state: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(state)
    }
}

impl Metadata {
    /// Metadata for the current WIT version.
    pub fn new(name: &str, version: &str, priority: i32, requirements: Resources) -> Self {
        Metadata {
            name: name.into(),
            version: version.into(),
            wit_version: WIT_VERSION.into(),
            priority,
            requirements,
            description: String::new(),
        }
    }
    /// With a one-line description.
    pub fn described(mut self, description: &str) -> Self {
        self.description = description.into();
        self
    }
}

impl Resources {
    /// CPU in thousandths of a core, memory and disk in MiB.
    pub fn new(cpu_millis: u64, memory_mb: u64, disk_mb: u64) -> Self {
        Resources {
            cpu_millis,
            memory_mb,
            disk_mb,
        }
    }
}

impl Outcome {
    /// Allow, no actions, state unchanged.
    pub fn allow() -> Self {
        Outcome {
            verdict: Verdict::Allow,
            actions: Vec::new(),
            new_state: None,
        }
    }
    /// Deny with a reason the user sees.
    pub fn deny(reason: impl Into<String>) -> Self {
        Outcome {
            verdict: Verdict::Deny(reason.into()),
            actions: Vec::new(),
            new_state: None,
        }
    }
    /// Adds an action.
    pub fn with_action(mut self, action: Action) -> Self {
        self.actions.push(action);
        self
    }
    /// Sets a new state blob.
    pub fn with_state(mut self, state: Vec<u8>) -> Self {
        self.new_state = Some(state);
        self
    }
    /// Sets a new state serialized as JSON.
    pub fn with_json_state<T: serde::Serialize>(self, state: &T) -> Self {
        self.with_state(serde_json::to_vec(state).expect("state serializes"))
    }
}

impl Action {
    /// Run `script` with `args` in container `container`.
    pub fn exec(container: i64, script: &str, args: &[&str]) -> Action {
        Action::Exec(ExecRequest {
            container,
            script: script.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }
    /// Add a container of `type_name` to the environment before going on.
    pub fn add(type_name: &str) -> Action {
        Action::AddContainer(type_name.into())
    }
}

impl Context {
    /// Members whose type name (before `@`) is `name`.
    pub fn members_of_type<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.environment
            .members
            .iter()
            .filter(move |m| type_name(&m.type_id) == name)
    }
    /// The state parsed as JSON, or `T::default()` when empty or unreadable.
    pub fn json_state<T: serde::de::DeserializeOwned + Default>(&self) -> T {
        serde_json::from_slice(&self.state).unwrap_or_default()
    }
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
