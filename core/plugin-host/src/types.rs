//! Container types: the polymorphic behaviour of containers, behind one trait.
//!
//! Invariant: the core calls container behaviour only through `ContainerType`; it never looks
//! inside a state blob. Built-in types and the WASM plugin host both implement the trait.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use cloud48_model::{
    ContainerId, ContainerStatus, Endpoint, ParamSpec, Params, Requirements, Resources, Workload,
};

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
    /// What it reserves.
    #[serde(default)]
    pub resources: Resources,
    /// Its type's endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Its parameters (defaults filled in).
    #[serde(default)]
    pub params: Params,
}

/// A read-only view of an environment for hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentView {
    /// Environment id.
    pub id: i64,
    /// Environment name.
    pub name: String,
    /// Members other than the container whose hook runs, ascending priority then id.
    pub members: Vec<MemberView>,
    /// The environment's parameters (read by plugins through the `host` import).
    #[serde(default)]
    pub params: Params,
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
    /// This container left the environment.
    AfterItIsRemoved,
    /// Another container is about to leave.
    BeforeOtherIsRemoved(MemberView),
    /// Another container left.
    AfterOtherIsRemoved(MemberView),
    /// This container became unavailable.
    IsDown(DownCause),
    /// This container is available again.
    IsUp,
    /// Another container became unavailable.
    AfterOtherIsDown(MemberView, DownCause),
    /// Another container is available again.
    AfterOtherIsUp(MemberView),
    /// A script this container's hook asked for with a tag ended.
    AfterExec(ExecResult),
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
            Hook::AfterItIsRemoved => "after-it-is-removed",
            Hook::BeforeOtherIsRemoved(_) => "before-other-is-removed",
            Hook::AfterOtherIsRemoved(_) => "after-other-is-removed",
            Hook::IsDown(_) => "is-down",
            Hook::IsUp => "is-up",
            Hook::AfterOtherIsDown(..) => "after-other-is-down",
            Hook::AfterOtherIsUp(_) => "after-other-is-up",
            Hook::AfterExec(_) => "after-exec",
            Hook::AfterCcStart => "after-cc-start",
            Hook::BeforeCcStop => "before-cc-stop",
        }
    }
}

/// The result of a tagged exec, delivered to the requesting container's `after-exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The request's tag.
    pub tag: String,
    /// The container the script ran in.
    pub container: ContainerId,
    /// Exit code (-1: it could not run).
    pub exit_code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
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

/// A container a hook asks to add: its type, parameters, resources and where it may go.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "AddRepr")]
pub struct AddRequest {
    /// Type id.
    pub type_id: String,
    /// Parameters (the rest take their defaults).
    pub params: Params,
    /// Resources (none: the type's defaults).
    pub resources: Option<Resources>,
    /// Not on a server that runs a member of the same type in the environment.
    pub spread: bool,
    /// Not on these servers (names).
    pub avoid_servers: Vec<String>,
    /// Only on servers with all these labels.
    pub labels: Vec<String>,
}

impl AddRequest {
    /// A container of `type_id` with defaults everywhere.
    pub fn of_type(type_id: impl Into<String>) -> Self {
        AddRequest {
            type_id: type_id.into(),
            ..AddRequest::default()
        }
    }
}

/// How an `AddRequest` was persisted: a bare type id before WIT 0.2.0 (in the progress of
/// commands written by older cores), the full request since.
#[derive(Deserialize)]
#[serde(untagged)]
enum AddRepr {
    TypeId(String),
    Full {
        type_id: String,
        #[serde(default)]
        params: Params,
        #[serde(default)]
        resources: Option<Resources>,
        #[serde(default)]
        spread: bool,
        #[serde(default)]
        avoid_servers: Vec<String>,
        #[serde(default)]
        labels: Vec<String>,
    },
}

impl From<AddRepr> for AddRequest {
    fn from(r: AddRepr) -> Self {
        match r {
            AddRepr::TypeId(t) => AddRequest::of_type(t),
            AddRepr::Full {
                type_id,
                params,
                resources,
                spread,
                avoid_servers,
                labels,
            } => AddRequest {
                type_id,
                params,
                resources,
                spread,
                avoid_servers,
                labels,
            },
        }
    }
}

/// Work a hook asks the core to do; each becomes a child command of the running command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookAction {
    /// Add a container to the environment first.
    AddContainer(AddRequest),
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
        /// When given, the result goes to the requester's `after-exec` under this tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// Create a replacement of this container on another server.
    ReplaceContainer(ContainerId),
    /// Change parameters of a member (only those its type declares settable).
    SetParams {
        /// The member.
        container: ContainerId,
        /// New values.
        params: Params,
    },
}

/// Severity of a plugin's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Detail.
    Debug,
    /// Information.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

impl LogLevel {
    /// Its name: `debug`, `info`, `warn` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// A line a plugin logged during a hook call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// The text.
    pub message: String,
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
    /// Lines the hook logged.
    pub logs: Vec<LogLine>,
}

impl HookOutcome {
    /// Allow, no actions, state unchanged.
    pub fn allow() -> Self {
        HookOutcome {
            verdict: Verdict::Allow,
            actions: Vec::new(),
            new_state: None,
            logs: Vec::new(),
        }
    }
}

/// A failure of a hook (a trap, a timeout, bad output, or the hook's own `hook-error`): fails
/// the command, or retries its step when `retryable`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("container type {type_id}, hook {hook}: {cause}")]
pub struct TypeError {
    /// The type.
    pub type_id: String,
    /// The hook.
    pub hook: String,
    /// What went wrong.
    pub cause: String,
    /// The hook said that trying again later may succeed.
    pub retryable: bool,
    /// What the plugin logged in this call before it failed (kept with the command, for the
    /// vendor to see what led to the failure).
    pub logs: Vec<LogLine>,
}

impl TypeError {
    /// A failure of `hook` of `type_id` that retrying does not cure.
    pub fn new(
        type_id: impl Into<String>,
        hook: impl Into<String>,
        cause: impl Into<String>,
    ) -> Self {
        TypeError {
            type_id: type_id.into(),
            hook: hook.into(),
            cause: cause.into(),
            retryable: false,
            logs: Vec::new(),
        }
    }
}

/// Behaviour of one container type.
pub trait ContainerType: Send + Sync + 'static {
    /// Type id, `name` or `name@version`.
    fn type_id(&self) -> &str;
    /// Priority of containers of this type (lower value runs first).
    fn priority(&self) -> i32;
    /// Requirements of a new container unless the user gives others.
    fn default_requirements(&self) -> Requirements;
    /// Initial state blob of a new container; an error fails the add or create.
    fn initial_state(&self) -> Result<Vec<u8>, TypeError> {
        Ok(Vec::new())
    }
    /// What runs in its containers (default: nothing declared).
    fn workload(&self) -> Workload {
        Workload::default()
    }
    /// The endpoints of its workload (what members show of it; default: the workload's).
    fn endpoints(&self) -> Vec<Endpoint> {
        self.workload().endpoints
    }
    /// The parameters its containers take (default: none).
    fn param_specs(&self) -> Vec<ParamSpec> {
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
