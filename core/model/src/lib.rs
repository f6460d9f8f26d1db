//! Domain types shared by the queue, the managers, the API and the CLI.
//!
//! Invariant: these types are plain data (serde + OpenAPI schema); they know nothing about
//! the database or HTTP.

use serde::{Deserialize, Serialize};

mod project;
mod url;
mod workload;
pub use project::{Project, ProjectMember, Quota, Usage};
pub use url::{base_url, with_causes};

/// The fewest characters of the token agents present to cores (`agents.token`): agents and
/// cores both refuse a shorter one.
pub const MIN_AGENT_TOKEN: usize = 16;
pub use workload::{
    Check, Endpoint, ImageRef, ParamKind, ParamSpec, Params, Protocol, Readiness,
    SECRET_PLACEHOLDER, Volume, Workload, apply_settable, resolve_params, secret_param,
    upgrade_params, validate_schema,
};

/// Load figures of a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerStats {
    /// Total capacity.
    pub capacity: Resources,
    /// Resources reserved by guests.
    pub allocated: Resources,
    /// Number of guests.
    pub guests: u64,
    /// Resources the guests actually use (measured by real drivers: memory and disk in MB,
    /// cpu as millicores averaged since the previous report); `None` when not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<Resources>,
    /// Images the server holds, ready to run (`name@digest`), newest use first; empty for
    /// servers that run no images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

/// An identifier of one kind of object: a number on the wire and in the database, a type of
/// its own in the code, so that one kind of id cannot be passed where another is meant.
macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub struct $name(pub i64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }

        impl From<i64> for $name {
            fn from(id: i64) -> Self {
                $name(id)
            }
        }
    };
}

id_type!(
    /// Identifier of an environment.
    EnvironmentId
);
id_type!(
    /// Identifier of a persisted command.
    CommandId
);
id_type!(
    /// Identifier of a container, unique within a platform.
    ContainerId
);
id_type!(
    /// Identifier of a server (virtualization server, VS).
    ServerId
);

/// Compute resources: what a container needs or what a server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Disk in MiB.
    pub disk_mb: u64,
}

impl Resources {
    /// True when every figure of `self` is at most the same figure of `other`.
    pub fn fits_in(&self, other: &Resources) -> bool {
        self.cpu_millis <= other.cpu_millis
            && self.memory_mb <= other.memory_mb
            && self.disk_mb <= other.disk_mb
    }

    /// `n` times these resources.
    pub fn times(&self, n: u64) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis * n,
            memory_mb: self.memory_mb * n,
            disk_mb: self.disk_mb * n,
        }
    }

    /// Figure-wise sum.
    pub fn plus(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory_mb: self.memory_mb + other.memory_mb,
            disk_mb: self.disk_mb + other.disk_mb,
        }
    }

    /// Figure-wise difference, saturating at zero.
    pub fn minus(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            disk_mb: self.disk_mb.saturating_sub(other.disk_mb),
        }
    }

    /// Checks that no figure is zero or above [`Resources::MAX`]; names the first such figure
    /// otherwise.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in self.figures() {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        self.within_bounds()
    }

    /// The most any figure may be, of a container or a server: 2^40 (a million million
    /// millicores, mebibytes), so that the sums the ledger keeps of millions of them stay far
    /// inside its 64-bit signed counters.
    pub const MAX: u64 = 1 << 40;

    /// Checks that no figure is above [`Resources::MAX`].
    pub fn within_bounds(&self) -> Result<(), String> {
        match self.figures().into_iter().find(|(_, v)| *v > Self::MAX) {
            Some((name, value)) => Err(format!(
                "{name} {value} is more than Cloud48 counts for one container or server (at most {})",
                Self::MAX
            )),
            None => Ok(()),
        }
    }

    fn figures(&self) -> [(&'static str, u64); 3] {
        [
            ("cpu_millis", self.cpu_millis),
            ("memory_mb", self.memory_mb),
            ("disk_mb", self.disk_mb),
        ]
    }
}

/// What a container needs from the server it is placed on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Resources reserved for the container.
    #[serde(flatten)]
    pub resources: Resources,
    /// Labels the server must carry (all of them).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Never on the same server as another member of the same type in the same environment
    /// (anti-affinity).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spread: bool,
}

impl Requirements {
    /// Checks the resources ([`Resources::validate`]) and that every label is a word (not
    /// empty, no spaces): no server carries an empty label, so such a container would never
    /// be placed.
    pub fn validate(&self) -> Result<(), String> {
        self.resources.validate()?;
        match self
            .labels
            .iter()
            .find(|l| l.is_empty() || l.contains(char::is_whitespace))
        {
            Some(l) => Err(format!(
                "label '{l}' is empty or has spaces; servers carry labels like ssd or zone=a"
            )),
            None => Ok(()),
        }
    }
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        // By hand: the derive cannot read the renames through the macro and would show the
        // variants' Rust names, not the text the API answers with.
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable text form stored in the database and shown to users.
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "unknown {} '{}' (expected one of: {})",
                        stringify!($name),
                        s,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

string_enum!(
    /// Lifecycle status of a container.
    ContainerStatus {
        /// Being created on its server.
        Creating = "creating",
        /// Running.
        Running = "running",
        /// Created but not running.
        Stopped = "stopped",
        /// Frozen in memory.
        Suspended = "suspended",
        /// Destroyed; kept as history.
        Destroyed = "destroyed",
        /// Creation failed; nothing runs.
        Failed = "failed",
        /// Its server stopped answering; hooks decide what happens (`is-down`).
        Down = "down",
        /// Replaced while its server was down; the collector destroys it when the server is back.
        Illegal = "illegal",
    }
);

impl ContainerStatus {
    /// True when the container no longer exists on any server.
    pub fn is_gone(&self) -> bool {
        matches!(self, ContainerStatus::Destroyed | ContainerStatus::Failed)
    }

    /// True when the container belongs to its environment for hooks and fan-outs: it exists
    /// and was not replaced (illegal).
    pub fn is_member(&self) -> bool {
        !self.is_gone() && *self != ContainerStatus::Illegal
    }
}

string_enum!(
    /// Status of an environment.
    EnvironmentStatus {
        /// Its create command has not run yet.
        Creating = "creating",
        /// Usable.
        Active = "active",
        /// Destroyed; kept as history.
        Destroyed = "destroyed",
    }
);

string_enum!(
    /// Status of a server.
    ServerStatus {
        /// Answering.
        Up = "up",
        /// Not answering.
        Down = "down",
    }
);

string_enum!(
    /// Status of a persisted command.
    CommandStatus {
        /// Persisted, waiting for a worker (or for a lock, or for a retry).
        Queued = "queued",
        /// Claimed by a worker.
        Running = "running",
        /// Waiting for its child commands to finish.
        Waiting = "waiting",
        /// Finished successfully.
        Succeeded = "succeeded",
        /// Finished with an error.
        Failed = "failed",
        /// Cancelled before it started.
        Cancelled = "cancelled",
    }
);

string_enum!(
    /// What a persisted command does: the closed set of commands, stored as its text.
    CommandKind {
        /// Does nothing (queue benchmarks).
        Noop = "noop",
        /// Place and create one container.
        ContainerCreate = "container.create",
        /// Place and create many containers of one type.
        ContainerCreateMany = "container.create_many",
        /// Start a container.
        ContainerStart = "container.start",
        /// Stop a container.
        ContainerStop = "container.stop",
        /// Freeze a container.
        ContainerSuspend = "container.suspend",
        /// Thaw a container.
        ContainerResume = "container.resume",
        /// Restart a container.
        ContainerReboot = "container.reboot",
        /// Destroy a container.
        ContainerDestroy = "container.destroy",
        /// Change a container's resources.
        ContainerUpdate = "container.update",
        /// Copy a container.
        ContainerClone = "container.clone",
        /// Move a container to another server.
        ContainerMigrate = "container.migrate",
        /// Run a script inside a container (asked by a container type).
        ContainerExec = "container.exec",
        /// Move every container of a plugin to a newer version of it.
        PluginUpgrade = "plugin.upgrade",
        /// Make an environment usable.
        EnvironmentCreate = "environment.create",
        /// Add a container to an environment.
        EnvironmentAdd = "environment.add",
        /// Remove a container from an environment.
        EnvironmentRemove = "environment.remove",
        /// Replace a down member of an environment.
        EnvironmentReplace = "environment.replace",
        /// Tell an environment's types that a server went down.
        EnvironmentFailover = "environment.failover",
        /// Tell an environment's types that a server is back.
        EnvironmentRecover = "environment.recover",
        /// Tell an environment's types of an event.
        EnvironmentNotify = "environment.notify",
        /// Copy an environment.
        EnvironmentClone = "environment.clone",
        /// Start every member.
        EnvironmentStart = "environment.start",
        /// Stop every member.
        EnvironmentStop = "environment.stop",
        /// Freeze every member.
        EnvironmentSuspend = "environment.suspend",
        /// Thaw every member.
        EnvironmentResume = "environment.resume",
        /// Destroy every member and the environment.
        EnvironmentDestroy = "environment.destroy",
    }
);

impl CommandKind {
    /// True for the commands whose target is a container (the others act on an environment, or
    /// on nothing).
    pub fn on_container(&self) -> bool {
        self.as_str().starts_with("container.")
    }

    /// The command an environment-wide operation gives each member, e.g. `container.stop` for
    /// `environment.stop`.
    pub fn member_command(&self) -> Option<CommandKind> {
        use CommandKind::*;
        Some(match self {
            EnvironmentStart => ContainerStart,
            EnvironmentStop => ContainerStop,
            EnvironmentSuspend => ContainerSuspend,
            EnvironmentResume => ContainerResume,
            EnvironmentDestroy => ContainerDestroy,
            _ => return None,
        })
    }

    /// The operation without its object, e.g. `start` for `container.start`.
    pub fn op(&self) -> &'static str {
        let text = self.as_str();
        text.split_once('.').map_or(text, |(_, op)| op)
    }
}

impl CommandStatus {
    /// The status as a sentence's predicate: "is running", "has already succeeded", "was
    /// cancelled" (for messages such as "command 13 has already succeeded").
    pub fn predicate(&self) -> &'static str {
        match self {
            CommandStatus::Queued => "is queued",
            CommandStatus::Running => "is running",
            CommandStatus::Waiting => "is waiting for its child commands",
            CommandStatus::Succeeded => "has already succeeded",
            CommandStatus::Failed => "has already failed",
            CommandStatus::Cancelled => "was cancelled",
        }
    }

    /// True for succeeded, failed and cancelled.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            CommandStatus::Succeeded | CommandStatus::Failed | CommandStatus::Cancelled
        )
    }
}

/// A container as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Container {
    /// Unique within the platform.
    pub id: ContainerId,
    /// Container type id (`name` or `name@version`).
    #[serde(rename = "type")]
    pub type_id: String,
    /// Lifecycle status.
    pub status: ContainerStatus,
    /// Why it is in its status, where that does not say (why it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Name of the server it is on.
    pub server: Option<String>,
    /// Id of the server it is on.
    pub server_id: Option<ServerId>,
    /// IP address assigned by the server.
    pub ip: Option<String>,
    /// Name of its environment, if any.
    pub environment: Option<String>,
    /// Id of its environment, if any.
    pub environment_id: Option<EnvironmentId>,
    /// Name of its project.
    #[serde(default)]
    pub project: String,
    /// Identifier of the guest on its server.
    pub guest_id: String,
    /// What it needs from its server.
    pub requirements: Requirements,
    /// Priority of its type (lower runs first).
    pub priority: i32,
    /// Command currently holding its lock.
    pub locked_by: Option<CommandId>,
    /// Size of its opaque state blob in bytes.
    pub state_bytes: usize,
    /// Its parameters (its type's schema, defaults filled in).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub params: Params,
    /// Where it came from if it was imported from another platform.
    pub origin: Option<OriginIdentity>,
    /// Its state as its container type shows it (JSON), in single-container views.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspect: Option<serde_json::Value>,
    /// Scripts run inside it (newest last), in single-container views.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub execs: Vec<ExecSummary>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_at: i64,
}

/// A script run inside a container by a command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecSummary {
    /// The `container.exec` command.
    pub command_id: CommandId,
    /// Status of that command.
    pub status: CommandStatus,
    /// First line of the script.
    pub script: String,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Identity of a container migrated in from another platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OriginIdentity {
    /// Name of the origin platform.
    pub origin_platform: String,
    /// Container id on the origin platform.
    pub origin_container_id: i64,
    /// Guest id on the origin platform.
    pub guest_id: String,
}

/// An environment as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Environment {
    /// Identifier.
    pub id: EnvironmentId,
    /// Unique name.
    pub name: String,
    /// Status.
    pub status: EnvironmentStatus,
    /// Command currently holding its lock.
    pub locked_by: Option<CommandId>,
    /// Name of its project.
    #[serde(default)]
    pub project: String,
    /// Members in ascending priority order (existing containers only).
    pub members: Vec<Container>,
    /// Parameters its members' container types may read.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub params: Params,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// A server as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Server {
    /// Identifier.
    pub id: ServerId,
    /// Unique name.
    pub name: String,
    /// Driver kind (`sim`, or `remote` for a server run by a node agent).
    pub driver: String,
    /// Address of the server's agent (remote servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Status.
    pub status: ServerStatus,
    /// Total capacity.
    pub capacity: Resources,
    /// Resources reserved by its containers.
    pub allocated: Resources,
    /// Labels for placement.
    pub labels: Vec<String>,
    /// Number of existing containers on it, including placement reservations (dummies).
    pub containers: u64,
    /// Placement reservations (dummies) on it.
    pub dummies: u64,
    /// True while drained: placement puts nothing new there.
    pub draining: bool,
    /// Last heartbeat, milliseconds since the Unix epoch.
    pub last_heartbeat: Option<i64>,
    /// Load figures of the last heartbeat.
    pub load: Option<ServerStats>,
    /// What its driver can do: `suspend`, `exec`, `migrate`, `update`, and `images` (runs
    /// workloads from images) or `host-files` (runs them on the server's own files); empty
    /// when the core has no driver for it (a remote server not connected).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The subnet its containers' addresses come from, as its agent reported it (none for a
    /// simulated server of the core, or an agent that does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The part of that subnet it hands out, where agents share one network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<String>,
}

/// A persisted command as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Command {
    /// Identifier.
    pub id: CommandId,
    /// What it does, e.g. `container.start`.
    pub kind: String,
    /// Status.
    pub status: CommandStatus,
    /// `container` or `environment`.
    pub target_type: Option<String>,
    /// Id of the container or environment it acts on.
    pub target_id: Option<i64>,
    /// Parent command, if this is a child.
    pub parent: Option<CommandId>,
    /// Parameters it was submitted with.
    pub params: serde_json::Value,
    /// Last persisted step (0 = not started).
    pub step: i32,
    /// Result when succeeded (e.g. the id of a created container).
    pub result: Option<serde_json::Value>,
    /// Error message when failed or cancelled.
    pub error: Option<String>,
    /// What a queued command waits for (a lock, a retry, its children).
    pub waiting_on: Option<String>,
    /// Retries so far: failed runs of a step that were tried again (a command that "gave up
    /// after N attempts" shows N - 1; the CLI and the console call it "retries").
    pub attempts: i32,
    /// Who submitted it.
    pub requested_by: String,
    /// Submission time, milliseconds since the Unix epoch.
    pub created_at: i64,
    /// First start, milliseconds since the Unix epoch.
    pub started_at: Option<i64>,
    /// End, milliseconds since the Unix epoch.
    pub finished_at: Option<i64>,
    /// Lines the container types logged while the command ran their hooks, and what its long
    /// driver operations reported (a migration's bytes archived and pulled), oldest first
    /// (single-command views only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<LogEntry>,
}

/// A line a container type logged, or a driver reported, during a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogEntry {
    /// When, milliseconds since the Unix epoch.
    pub at: i64,
    /// The container whose hook logged it, or whose operation it reports.
    pub container: Option<ContainerId>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The line.
    pub message: String,
}

string_enum!(
    /// What an event is about.
    Topic {
        /// A command changed status (`action` is the new status).
        Command = "command",
        /// A container changed status or server.
        Container = "container",
        /// A server went up or down, or was added.
        Server = "server",
        /// An environment changed status.
        Environment = "environment",
    }
);

/// One entry of the event log (`GET /v1/events`): a change of an object's status, in the order
/// the database committed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Increases with every event; resume a stream after it (`Last-Event-ID`).
    pub id: i64,
    /// When, milliseconds since the Unix epoch (the database's clock).
    pub at: i64,
    /// What kind of object changed.
    pub topic: Topic,
    /// The object's id.
    pub object_id: i64,
    /// Its new status (`running`, `down`, `succeeded`, ...).
    pub action: String,
    /// A command's kind, a container's type, a server's driver or an environment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A command's target, or the environment of a container: `environment:4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related: Option<String>,
    /// The server of a container (or the server itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<i64>,
    /// Who asked, for commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The project of the object (none for servers and fleet-wide commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<i64>,
    /// Why, where the new status alone does not say: a failed command's error, a failed
    /// container's reason (at most 1,000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One entry of the audit trail (`GET /v1/audit`, `cloud48 audit`): a request that changed
/// something or tried to, or an administrator's change made on the core's machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Increases with every entry.
    pub id: i64,
    /// When, milliseconds since the Unix epoch.
    pub at: i64,
    /// The user (`anonymous` when none signed in; the name tried when sign-in failed).
    pub who: String,
    /// The client's address, for requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The HTTP method, or `cli` for a change made with the command line on the core's machine.
    pub action: String,
    /// The path asked for, or what the command line changed (`user add vera`).
    pub object: String,
    /// The answer's HTTP status (0 for the command line's changes).
    pub status: u16,
    /// The command that carries the change out, when one was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<i64>,
    /// What went wrong, when the change was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the request asked for: its JSON body, with passwords, secrets and tokens masked
    /// (none for other bodies, and for entries older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// Answer to a mutation: the command that will carry it out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Accepted {
    /// Id of the persisted command.
    pub command_id: CommandId,
    /// Id of the object created at submission time, if any (e.g. a new environment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_id: Option<i64>,
}

/// The name of a container type id: `tomcat` for `tomcat@0.2.0` (the built-in `plain` has no
/// version).
pub fn type_name(type_id: &str) -> &str {
    type_id.split('@').next().unwrap_or(type_id)
}

/// Checks a name for environments and servers: 1-63 characters of `a-z`, `0-9` and `-`,
/// starting with a letter or digit, not all digits (which would read as an id: `env show 1`).
pub fn validate_name(name: &str) -> Result<(), String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "'{name}' is only digits, which reads as an id; give a name with a letter in it (such as a-{name})"
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid name: use 1-63 characters of a-z, 0-9 and '-', not starting with '-'"
        ))
    }
}

/// Milliseconds since the Unix epoch according to the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_figures_are_above_zero_and_within_bounds() {
        let r = |m| Resources {
            cpu_millis: 1,
            memory_mb: m,
            disk_mb: 1,
        };
        assert!(r(Resources::MAX).validate().is_ok());
        assert_eq!(
            r(0).validate().unwrap_err(),
            "memory_mb must be greater than 0"
        );
        let huge = r(u64::MAX).validate().unwrap_err();
        assert!(huge.contains("memory_mb 18446744073709551615 is more than Cloud48 counts"));
        assert!(r(0).within_bounds().is_ok(), "a server may report no disk");
    }

    #[test]
    fn a_status_reads_as_a_sentence() {
        assert_eq!(
            format!("command 13 {}", CommandStatus::Succeeded.predicate()),
            "command 13 has already succeeded"
        );
        assert_eq!(CommandStatus::Cancelled.predicate(), "was cancelled");
    }

    #[test]
    fn names_cannot_be_mistaken_for_ids_or_break_the_rules() {
        for ok in ["shop", "env-1", "1a", "a"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let err = validate_name("1").unwrap_err();
        assert!(
            err.contains("reads as an id") && err.contains("such as a-1)"),
            "{err}"
        );
        for bad in ["", "-a", "Shop", "a_b", &"a".repeat(64)] {
            assert!(
                validate_name(bad).unwrap_err().contains("not a valid name"),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_id_is_a_bare_number_on_the_wire_and_in_text() {
        let id = CommandId(42);
        assert_eq!(serde_json::to_value(id).unwrap(), serde_json::json!(42));
        assert_eq!(serde_json::from_str::<CommandId>("42").unwrap(), id);
        assert!(serde_json::from_str::<CommandId>("\"42\"").is_err());
        assert_eq!(id.to_string(), "42");
        assert_eq!("42".parse::<CommandId>(), Ok(id));
        assert!("forty-two".parse::<EnvironmentId>().is_err());
    }

    #[test]
    fn every_command_kind_reads_back_from_its_text() {
        for k in CommandKind::ALL {
            assert_eq!(k.as_str().parse::<CommandKind>(), Ok(*k));
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::from(k.as_str())
            );
        }
        assert_eq!(CommandKind::ContainerCreateMany.op(), "create_many");
        assert_eq!(CommandKind::Noop.op(), "noop");
        for k in CommandKind::ALL {
            if let Some(member) = k.member_command() {
                assert!(member.on_container() && !k.on_container());
                assert_eq!(member.op(), k.op(), "{k}");
            }
        }
    }

    #[test]
    fn an_unknown_text_is_an_error_that_lists_the_known_ones() {
        let e = "container.explode".parse::<CommandKind>().unwrap_err();
        assert!(
            e.contains("unknown CommandKind 'container.explode'") && e.contains("container.start"),
            "{e}"
        );
        let e = "paused".parse::<CommandStatus>().unwrap_err();
        assert!(e.contains("queued"), "{e}");
    }

    #[test]
    fn resources_validate_and_subtract() {
        let a = Resources {
            cpu_millis: 1000,
            memory_mb: 512,
            disk_mb: 100,
        };
        let b = Resources {
            cpu_millis: 500,
            memory_mb: 1024,
            disk_mb: 100,
        };
        assert_eq!(
            a.minus(&b),
            Resources {
                cpu_millis: 500,
                memory_mb: 0,
                disk_mb: 0
            }
        );
        assert_eq!(
            b.minus(&a),
            Resources {
                cpu_millis: 0,
                memory_mb: 512,
                disk_mb: 0
            }
        );
    }
}
