//! Container types: the polymorphic behaviour of containers, behind one trait.
//!
//! Invariant: the core calls container behaviour only through `ContainerType`; it never looks
//! inside a state blob. Built-in types and the WASM plugin host both implement the trait.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use cloud48_model::{ContainerId, ContainerStatus, Requirements, Resources};

/// A read-only view of one container for hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Container id.
    pub id: ContainerId,
    /// Type id.
    pub type_id: String,
    /// Priority of its type (lower runs first).
    pub priority: i32,
    /// Lifecycle status.
    pub status: ContainerStatus,
    /// Server name.
    pub server: Option<String>,
    /// IP address.
    pub ip: Option<String>,
}

/// A read-only view of an environment for hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentView {
    /// Environment id.
    pub id: i64,
    /// Environment name.
    pub name: String,
    /// Existing members (not the one being added), ascending priority.
    pub members: Vec<MemberView>,
}

/// Why a container went down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownCause {
    /// Its server stopped answering.
    ServerUnreachable(String),
    /// It stopped by itself.
    Crashed(String),
}

/// The events a container type handles, in the vocabulary of the design notes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hook {
    /// This container is about to join the environment.
    BeforeItIsAdded,
    /// This container joined the environment.
    AfterItIsAdded,
    /// Another container is about to join.
    BeforeOtherIsAdded(MemberView),
    /// Another container joined.
    AfterOtherIsAdded(MemberView),
    /// This container is about to leave the environment.
    BeforeItIsRemoved,
    /// Another container left.
    AfterOtherIsRemoved(MemberView),
    /// This container became unavailable.
    IsDown(DownCause),
    /// This container is available again.
    IsUp,
    /// The core started.
    AfterCcStart,
    /// The core is stopping.
    BeforeCcStop,
}

impl Hook {
    /// Hook name as in the WIT contract, e.g. `before-it-is-added`.
    pub fn name(&self) -> &'static str {
        match self {
            Hook::BeforeItIsAdded => "before-it-is-added",
            Hook::AfterItIsAdded => "after-it-is-added",
            Hook::BeforeOtherIsAdded(_) => "before-other-is-added",
            Hook::AfterOtherIsAdded(_) => "after-other-is-added",
            Hook::BeforeItIsRemoved => "before-it-is-removed",
            Hook::AfterOtherIsRemoved(_) => "after-other-is-removed",
            Hook::IsDown(_) => "is-down",
            Hook::IsUp => "is-up",
            Hook::AfterCcStart => "after-cc-start",
            Hook::BeforeCcStop => "before-cc-stop",
        }
    }
}

/// Everything a hook sees.
#[derive(Debug, Clone)]
pub struct HookContext<'a> {
    /// The container whose hook runs.
    pub container: &'a MemberView,
    /// Its environment.
    pub environment: &'a EnvironmentView,
    /// Its current opaque state blob.
    pub state: &'a [u8],
}

/// Allow or deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Go on.
    Allow,
    /// Stop the operation; the reason is shown to the user.
    Deny(String),
}

/// Work a hook asks the core to do; each becomes a child command of the running command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookAction {
    /// Add a container of this type to the environment first.
    AddContainer(String),
    /// Remove (and destroy) this member.
    RemoveContainer(ContainerId),
    /// Run a script in a container (the CIS layer).
    Exec {
        /// The container.
        container: ContainerId,
        /// The script.
        script: String,
        /// Its arguments.
        args: Vec<String>,
    },
    /// Create a replacement of this container on another server.
    ReplaceContainer(ContainerId),
}

/// What a hook returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Work for the core, in order.
    pub actions: Vec<HookAction>,
    /// A new state blob, committed with the step that ran the hook.
    pub new_state: Option<Vec<u8>>,
}

impl HookOutcome {
    /// Allow, no actions, state unchanged.
    pub fn allow() -> Self {
        HookOutcome {
            verdict: Verdict::Allow,
            actions: Vec::new(),
            new_state: None,
        }
    }
}

/// A failure of a hook (a trap, a timeout, bad output): fails the command.
#[derive(Debug, Clone, thiserror::Error)]
#[error("container type {type_id}, hook {hook}: {cause}")]
pub struct TypeError {
    /// The type.
    pub type_id: String,
    /// The hook.
    pub hook: String,
    /// What went wrong.
    pub cause: String,
}

/// Behaviour of one container type.
pub trait ContainerType: Send + Sync + 'static {
    /// Type id, `name` or `name@version`.
    fn type_id(&self) -> &str;
    /// Priority of containers of this type (lower value runs first).
    fn priority(&self) -> i32;
    /// Requirements of a new container unless the user gives others.
    fn default_requirements(&self) -> Requirements;
    /// Initial state blob of a new container.
    fn initial_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Handles one event.
    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError>;
    /// The state blob as JSON for users (default: its size).
    fn inspect(&self, state: &[u8]) -> Result<serde_json::Value, TypeError> {
        Ok(serde_json::json!({ "bytes": state.len() }))
    }
}

/// The built-in `plain` type: one piece of software, no relations to other members.
pub struct PlainType;

impl ContainerType for PlainType {
    fn type_id(&self) -> &str {
        "plain"
    }
    fn priority(&self) -> i32 {
        100
    }
    fn default_requirements(&self) -> Requirements {
        Requirements {
            resources: Resources {
                cpu_millis: 500,
                memory_mb: 256,
                disk_mb: 1024,
            },
            labels: Vec::new(),
            spread: false,
        }
    }
    fn handle(&self, _hook: &Hook, _ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        Ok(HookOutcome::allow())
    }
}

fn version_of(type_id: &str) -> Option<semver::Version> {
    type_id
        .split_once('@')
        .and_then(|(_, v)| semver::Version::parse(v).ok())
}

/// The container types the core knows, by type id.
#[derive(Default, Clone)]
pub struct TypeRegistry {
    types: Arc<RwLock<BTreeMap<String, Arc<dyn ContainerType>>>>,
}

impl TypeRegistry {
    /// A registry with the built-in types.
    pub fn with_builtins() -> Self {
        let r = TypeRegistry::default();
        r.register(Arc::new(PlainType));
        r
    }

    /// Adds or replaces a type.
    pub fn register(&self, t: Arc<dyn ContainerType>) {
        self.types
            .write()
            .unwrap()
            .insert(t.type_id().to_string(), t);
    }

    /// The type with this id (`name@version`), or the newest installed version of a bare name.
    pub fn get(&self, type_id: &str) -> Option<Arc<dyn ContainerType>> {
        let types = self.types.read().unwrap();
        if let Some(t) = types.get(type_id) {
            return Some(t.clone());
        }
        if type_id.contains('@') {
            return None;
        }
        types
            .iter()
            .filter(|(id, _)| id.split('@').next() == Some(type_id))
            .max_by(|(a, _), (b, _)| version_of(a).cmp(&version_of(b)))
            .map(|(_, t)| t.clone())
    }

    /// Removes a type id.
    pub fn unregister(&self, type_id: &str) {
        self.types.write().unwrap().remove(type_id);
    }

    /// Every type id, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.types.read().unwrap().keys().cloned().collect()
    }

    /// The type with this id, or an error listing the known ones.
    pub fn require(&self, type_id: &str) -> Result<Arc<dyn ContainerType>, String> {
        self.get(type_id).ok_or_else(|| {
            format!(
                "unknown container type '{type_id}' (known types: {})",
                self.ids().join(", ")
            )
        })
    }
}
