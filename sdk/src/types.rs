//! The SDK's own types: what a plugin reads and returns. They mirror the WIT contract the SDK
//! builds for, but belong to the SDK, so a new WIT version changes the conversion in
//! `export.rs`, not the vendors' code.

/// Lifecycle status of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Being created.
    Creating,
    /// Running.
    Running,
    /// Stopped (also shown for a member whose server is down).
    Stopped,
    /// Suspended.
    Suspended,
    /// Destroyed.
    Destroyed,
    /// Its creation failed.
    Failed,
}

/// A container of the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id (0 for a container not created yet).
    pub id: i64,
    /// Its type id, `name@version`.
    pub type_id: String,
    /// Its type's priority (lower runs first).
    pub priority: i32,
    /// Its status.
    pub status: Status,
    /// Its server's name, once placed.
    pub server: Option<String>,
    /// Its address, once created.
    pub ip: Option<String>,
}

/// An environment and its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// The members, without the container the hook runs for.
    pub members: Vec<Member>,
}

/// What a hook sees: its container, the environment and the container's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The container the hook runs for.
    pub container: Member,
    /// Its environment.
    pub environment: Environment,
    /// Its state blob.
    pub state: Vec<u8>,
}

/// Why a container is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownCause {
    /// Its server stopped answering.
    ServerUnreachable(String),
    /// It crashed.
    Crashed(String),
}

/// Compute resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Disk in MiB.
    pub disk_mb: u64,
}

/// A script to run in a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The member.
    pub container: i64,
    /// The script (`sh`).
    pub script: String,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Something a hook asks the core to do after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add a container of this type to the environment.
    AddContainer(String),
    /// Remove this member.
    RemoveContainer(i64),
    /// Run a script in a member.
    Exec(ExecRequest),
    /// Replace this (down) member with a new one on another server.
    ReplaceContainer(i64),
}

/// Whether a `before-*` hook lets the change happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Allow,
    /// Refuse, with a reason the user sees.
    Deny(String),
}

/// What a hook returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Actions, run in order after the hook.
    pub actions: Vec<Action>,
    /// The container's new state, if it changed.
    pub new_state: Option<Vec<u8>>,
}

/// What a container type says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Type name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// The WIT contract it is built for.
    pub wit_version: String,
    /// Priority (lower runs first).
    pub priority: i32,
    /// Default resources of a new container.
    pub requirements: Resources,
    /// One line for users.
    pub description: String,
}
