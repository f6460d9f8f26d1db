//! The SDK's own types: what a plugin reads and returns. They mirror the WIT contract the SDK
//! builds for, but belong to the SDK, so a new WIT version changes the conversion in
//! `export.rs`, not the vendors' code.

use std::collections::BTreeMap;

/// Lifecycle status of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Being created.
    Creating,
    /// Running.
    Running,
    /// Stopped.
    Stopped,
    /// Suspended.
    Suspended,
    /// Unavailable: its server stopped answering or it crashed.
    Down,
    /// Replaced while down; never shown among the members.
    Illegal,
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
    /// What it reserves.
    pub resources: Resources,
    /// Its type's endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Its parameters (defaults filled in).
    pub params: BTreeMap<String, String>,
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
    /// The environment's parameters (read-only), asked of the core when first read.
    pub params: EnvParams,
}

/// An environment's parameters: a read-only map, fetched from the core only when a hook first
/// reads it (most hooks do not, and every hook runs in a fresh instance).
pub struct EnvParams {
    map: std::cell::OnceCell<BTreeMap<String, String>>,
    fetch: fn() -> Vec<(String, String)>,
}

impl EnvParams {
    /// Parameters that `fetch` gives when first read.
    pub(crate) fn fetched_by(fetch: fn() -> Vec<(String, String)>) -> EnvParams {
        EnvParams {
            map: std::cell::OnceCell::new(),
            fetch,
        }
    }
}

impl std::ops::Deref for EnvParams {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &BTreeMap<String, String> {
        self.map
            .get_or_init(|| (self.fetch)().into_iter().collect())
    }
}

impl From<BTreeMap<String, String>> for EnvParams {
    fn from(map: BTreeMap<String, String>) -> EnvParams {
        EnvParams {
            map: map.into(),
            fetch: Vec::new,
        }
    }
}

impl Clone for EnvParams {
    fn clone(&self) -> EnvParams {
        EnvParams::from((**self).clone())
    }
}

impl PartialEq for EnvParams {
    fn eq(&self, other: &EnvParams) -> bool {
        **self == **other
    }
}

impl Eq for EnvParams {}

impl std::fmt::Debug for EnvParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
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
    /// When set, the requesting container's `after_exec` gets the result under this tag (and
    /// a failed script does not fail the command).
    pub tag: Option<String>,
}

/// Where a new container may go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Not on a server that runs a member of the same type in this environment.
    pub spread: bool,
    /// Not on these servers.
    pub avoid_servers: Vec<String>,
    /// Only on servers with all these labels.
    pub labels: Vec<String>,
}

/// A container to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRequest {
    /// Type name or id.
    pub type_id: String,
    /// Its parameters (the rest take their defaults).
    pub params: BTreeMap<String, String>,
    /// Its resources (none: the type's defaults).
    pub resources: Option<Resources>,
    /// Where it may go.
    pub placement: Placement,
}

/// Something a hook asks the core to do after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add a container to the environment.
    AddContainer(AddRequest),
    /// Remove this member.
    RemoveContainer(i64),
    /// Run a script in a member.
    Exec(ExecRequest),
    /// Replace this (down) member with a new one on another server.
    ReplaceContainer(i64),
    /// Change a member's parameters (those its type declares settable).
    SetParams {
        /// The member.
        container: i64,
        /// New values.
        params: BTreeMap<String, String>,
    },
}

/// A hook that cannot do its work: the command fails with `message` (or its step is retried
/// later when `retryable`); nothing the hook would have returned is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// What went wrong, for the user.
    pub message: String,
    /// Trying again later may succeed.
    pub retryable: bool,
}

/// What every hook returns.
pub type HookResult = Result<Outcome, HookError>;

/// The result of a tagged exec, delivered to `after_exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The request's tag.
    pub tag: String,
    /// The container it ran in.
    pub container: i64,
    /// Exit code (-1: it could not run).
    pub exit_code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Transport of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// HTTP.
    Http,
}

/// A named port the workload listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Transport.
    pub protocol: Protocol,
}

/// How the core knows the workload is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Ready once running.
    None,
    /// A TCP connection to the named endpoint succeeds.
    Tcp(String),
    /// `GET path` on the named endpoint answers 2xx/3xx: (endpoint, path).
    Http(String, String),
    /// This command exits 0 inside the container.
    Exec(Vec<String>),
}

/// A readiness check and its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// What to check.
    pub check: Check,
    /// Milliseconds between attempts.
    pub interval_ms: u32,
    /// Attempts before giving up.
    pub retries: u32,
}

/// A path whose content belongs to the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Name.
    pub name: String,
    /// Absolute path inside the container.
    pub path: String,
}

/// An image and the digest that pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Reference, e.g. `cloud48/nginx:1.22`.
    pub reference: String,
    /// `sha256:...`, or none for the newest the core holds.
    pub digest: Option<String>,
}

/// What runs in a container of the type (build it with [`Workload::command`] and the `with_*`
/// methods).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    /// Its image (none: the command runs on the server's own files).
    pub image: Option<Image>,
    /// Program and arguments; `${name}` is replaced by parameter `name`.
    pub command: Vec<String>,
    /// Environment variables; `${name}` in values is replaced by parameter `name`.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Ports.
    pub endpoints: Vec<Endpoint>,
    /// Readiness check.
    pub readiness: Option<Readiness>,
    /// The container's own paths.
    pub volumes: Vec<Volume>,
}

/// Kind of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Text.
    Text,
    /// Decimal integer.
    Integer,
    /// `true`/`false`.
    Boolean,
}

/// A parameter the type's containers take (build it with [`ParamSpec::text`] and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ParamKind,
    /// Default (none: required).
    pub default: Option<String>,
    /// One line for users.
    pub description: String,
    /// Other members' hooks may change it.
    pub settable: bool,
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Detail.
    Debug,
    /// Information.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
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
    /// Default placement of a new container (`avoid_servers` is ignored).
    pub placement: Placement,
    /// One line for users.
    pub description: String,
    /// What runs inside.
    pub workload: Workload,
    /// The parameters its containers take.
    pub params: Vec<ParamSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static FETCHES: AtomicUsize = AtomicUsize::new(0);

    fn fetch() -> Vec<(String, String)> {
        FETCHES.fetch_add(1, Ordering::SeqCst);
        vec![("zone".into(), "eu".into())]
    }

    #[test]
    fn environment_params_are_asked_for_once_when_first_read() {
        let params = EnvParams::fetched_by(fetch);
        assert_eq!(
            FETCHES.load(Ordering::SeqCst),
            0,
            "not before they are read"
        );
        assert_eq!(params.get("zone").map(String::as_str), Some("eu"));
        assert_eq!(params.len(), 1);
        assert_eq!(FETCHES.load(Ordering::SeqCst), 1, "once");
        let copy = params.clone();
        assert_eq!(copy, params);
        assert_eq!(format!("{copy:?}"), r#"{"zone": "eu"}"#);
        assert_eq!(FETCHES.load(Ordering::SeqCst), 1);
    }
}
