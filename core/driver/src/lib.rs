//! Hypervisor drivers (the VSH layer): one trait for the whole container lifecycle on one server.
//!
//! Invariants:
//! - One `Driver` value drives one server; the core keeps a map from server id to driver.
//! - Every operation is idempotent where the driver can tell: `create`/`import` of a guest id
//!   that exists returns the existing guest, `start` of a running guest and `stop` of a stopped
//!   one succeed, `destroy` of a missing guest succeeds. A resumed command may therefore repeat
//!   its last step without repeating its side effect.
//! - Errors say whether a retry can help (`DriverError::is_transient`).
//! - Optional operations are announced by `capabilities`; unsupported ones answer
//!   `DriverError::Unsupported`.

pub mod activity;
pub mod address;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod sim;

use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use cloud48_model::Resources;
pub use cloud48_model::ServerStats;

/// An error of a driver operation (it crosses the agent protocol as JSON).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum DriverError {
    /// The server does not answer; retrying later may help.
    #[error("server {server} is unreachable: {message}")]
    Unreachable {
        /// Server name.
        server: String,
        /// What happened.
        message: String,
    },
    /// A temporary failure; retrying may help.
    #[error("{0}")]
    Transient(String),
    /// The guest does not exist on this server.
    #[error("guest {0} does not exist on this server")]
    NotFound(String),
    /// The server lacks capacity for the request.
    #[error("not enough capacity on server {server}: {message}")]
    Capacity {
        /// Server name.
        server: String,
        /// Which figure does not fit.
        message: String,
    },
    /// The guest is in a state that does not allow the operation.
    #[error("guest {guest} is {state}; {operation} is not possible")]
    InvalidState {
        /// Guest id.
        guest: String,
        /// Its current state.
        state: GuestState,
        /// The refused operation.
        operation: String,
    },
    /// The driver does not support the operation.
    #[error("driver {driver} does not support {operation}")]
    Unsupported {
        /// Driver kind.
        driver: String,
        /// The operation.
        operation: String,
    },
    /// Any other permanent failure.
    #[error("{0}")]
    Permanent(String),
}

impl DriverError {
    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DriverError::Unreachable { .. } | DriverError::Transient(_)
        )
    }
}

/// State of a guest as its server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    /// Running.
    Running,
    /// Created, not running.
    Stopped,
    /// Frozen.
    Suspended,
}

impl std::fmt::Display for GuestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestState::Running => "running",
            GuestState::Stopped => "stopped",
            GuestState::Suspended => "suspended",
        })
    }
}

/// What to create on a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSpec {
    /// Guest id, unique on the platform; chosen by the core, so creation is idempotent.
    pub guest_id: String,
    /// Container type id, for drivers that pick a template per type.
    pub type_id: String,
    /// Resources to reserve.
    pub resources: Resources,
    /// Address to keep (a migrating container keeps its IP); `None` lets the server assign one.
    #[serde(default)]
    pub ip: Option<String>,
    /// What runs inside, as the container's type declares it, parameters filled in (empty for
    /// types that declare nothing: the driver runs an idle process).
    #[serde(default)]
    pub workload: cloud48_model::Workload,
    /// Addresses the server must not give it: containers on other servers of its network
    /// hold them (a server sharing its network, whose VMs moved away live, cannot see them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
}

/// A guest as its server reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Guest id.
    pub guest_id: String,
    /// Current state.
    pub state: GuestState,
    /// Assigned IP address.
    pub ip: Option<String>,
    /// Reserved resources.
    pub resources: Resources,
}

/// Portable image of a stopped guest, produced by `export` and consumed by `import`
/// (cold migration and cloning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// Type id of the exported guest.
    pub type_id: String,
    /// Opaque disk content.
    pub data: Vec<u8>,
}

/// Live migration, from the source: what the target needs to receive a running guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveOffer {
    /// The digest of the image the guest's disk is an overlay of (the target boots the same).
    pub image: String,
    /// The size of the guest's disk, MiB.
    pub disk_mb: u64,
    /// The machine the guest runs on, which the target must give it unchanged (absent from
    /// drivers that do not say).
    #[serde(default)]
    pub machine: Option<MachineModel>,
    /// How the guest's memory and CPUs are laid out now, which the target must give it
    /// unchanged (absent from drivers that do not say: the target boots the guest's resources).
    #[serde(default)]
    pub shape: Option<MachineShape>,
}

/// How a running VM's memory and CPUs are laid out: what it booted with, how far it may grow
/// while it runs, and what was plugged in since. A live migration's target starts with the
/// same devices, or the guest's state would not fit its new machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    /// Memory it booted with, MiB.
    pub boot_memory_mb: u64,
    /// The most memory it may have while it runs, MiB: what it booted with and a region that
    /// memory is plugged into (none when equal).
    pub max_memory_mb: u64,
    /// Virtual CPUs it booted with.
    pub boot_vcpus: u64,
    /// The most virtual CPUs it may have while it runs.
    pub max_vcpus: u64,
    /// Memory plugged in since it booted, MiB.
    #[serde(default)]
    pub plugged_memory_mb: u64,
    /// Virtual CPUs plugged in since it booted, in the order plugged.
    #[serde(default)]
    pub cpus: Vec<PluggedCpu>,
}

/// A virtual CPU plugged into a running VM: the hypervisor's device type and the CPU's place
/// in the machine's topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluggedCpu {
    /// The device's id.
    pub id: String,
    /// The hypervisor's CPU device type, e.g. QEMU's `max-x86_64-cpu`.
    pub driver: String,
    /// Where it sits: (property, index), e.g. `("socket-id", 2)`.
    pub place: Vec<(String, i64)>,
}

/// What a running VM's machine is, as a live migration's target must reproduce it: the guest
/// keeps its devices and CPU features across the move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineModel {
    /// The hypervisor's versioned machine type, e.g. QEMU's `pc-q35-10.0`.
    pub machine_type: String,
    /// What executes its instructions.
    pub accel: Accel,
    /// Its CPU: `max` when emulated, the host's CPU model under KVM (`-cpu host`).
    pub cpu: String,
}

/// Live migration, from the target: where the source sends the guest's disk and memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTarget {
    /// The target's address for migration streams.
    pub host: String,
    /// Port of the disk's mirror (an NBD export of the target's disk).
    pub disk_port: u16,
    /// Port of the memory's stream.
    pub memory_port: u16,
    /// A secret the source presents first on each connection, so that nothing else can
    /// hand the target a guest (empty: the transport asks for none, as QEMU's does not).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

/// How a live migration went, from the source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveReport {
    /// From the first byte sent to the guest paused on the source, ms.
    pub total_ms: u64,
    /// How long the guest was paused for the last pass, as the hypervisor reports it, ms.
    pub downtime_ms: u64,
    /// Memory sent, bytes.
    pub memory_bytes: u64,
    /// Disk sent, bytes.
    pub disk_bytes: u64,
}

/// Result of running a script inside a container (the CIS layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecOutput {
    /// Exit code of the script.
    pub exit_code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Optional operations a driver supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `suspend` and `resume`.
    pub suspend: bool,
    /// `exec`.
    pub exec: bool,
    /// `export` and `import` (cold migration and cloning).
    pub migrate: bool,
    /// `update` of resources of an existing guest.
    pub update: bool,
    /// Runs a workload from its image. Without it, a workload runs on the server's own files:
    /// its declared command when the server has the program, else a stand-in listening on its
    /// endpoints (the linux driver), or nothing at all (sim).
    #[serde(default)]
    pub images: bool,
    /// Moves a running guest to another server without stopping it (live migration: the
    /// `live_*` operations). The qemu driver does; the linux driver does for containers that
    /// run their image, where CRIU works (checkpoint, stream, restore).
    #[serde(default)]
    pub live_migrate: bool,
    /// A simulation: no process runs in its containers (an operator's `exec` has nothing to
    /// run in; a hook's scripts are recorded, not run).
    #[serde(default)]
    pub simulated: bool,
    /// Its containers are virtual machines, run with this accelerator (the qemu driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Accel>,
}

/// What executes a virtual machine's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's own translator: any machine, far slower.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Operations on the containers of one server.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Driver kind, e.g. `sim`.
    fn kind(&self) -> &'static str;
    /// Optional operations this driver supports.
    fn capabilities(&self) -> Capabilities;
    /// Creates a stopped guest; returns the existing one if `spec.guest_id` exists.
    async fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError>;
    /// Starts a stopped guest; succeeds if it is already running.
    async fn start(&self, guest_id: &str) -> Result<(), DriverError>;
    /// Stops a running or suspended guest; succeeds if it is already stopped.
    async fn stop(&self, guest_id: &str) -> Result<(), DriverError>;
    /// Freezes a running guest; succeeds if it is already suspended.
    async fn suspend(&self, guest_id: &str) -> Result<(), DriverError>;
    /// Thaws a suspended guest; succeeds if it is already running.
    async fn resume(&self, guest_id: &str) -> Result<(), DriverError>;
    /// Restarts a running guest.
    async fn reboot(&self, guest_id: &str) -> Result<(), DriverError>;
    /// Destroys a guest; succeeds if it does not exist.
    async fn destroy(&self, guest_id: &str) -> Result<(), DriverError>;
    /// Changes the resources of a guest.
    async fn update(&self, guest_id: &str, resources: &Resources) -> Result<(), DriverError>;
    /// Exports a stopped guest's disk.
    async fn export(&self, guest_id: &str) -> Result<GuestImage, DriverError>;
    /// Creates a stopped guest from an image; returns the existing one if the id exists.
    async fn import(&self, spec: &GuestSpec, image: &GuestImage) -> Result<GuestInfo, DriverError>;
    /// Exports a stopped guest's disk into the new file `to`, streamed (how guests travel
    /// between servers: never whole in memory); returns the file's size. The default writes
    /// `export`'s bytes, for drivers whose disks are small.
    async fn export_to(&self, guest_id: &str, to: &Path) -> Result<u64, DriverError> {
        let image = self.export(guest_id).await?;
        tokio::fs::write(to, &image.data)
            .await
            .map_err(|e| DriverError::Permanent(format!("cannot write {}: {e}", to.display())))?;
        Ok(image.data.len() as u64)
    }
    /// Creates a stopped guest from a file `export_to` wrote, streamed; returns the existing
    /// one if the id exists. A guest is either imported whole or not at all. The default reads
    /// the file and calls `import`.
    async fn import_from(&self, spec: &GuestSpec, from: &Path) -> Result<GuestInfo, DriverError> {
        let data = tokio::fs::read(from)
            .await
            .map_err(|e| DriverError::Permanent(format!("cannot read {}: {e}", from.display())))?;
        let image = GuestImage {
            type_id: spec.type_id.clone(),
            data,
        };
        self.import(spec, &image).await
    }
    /// Runs a script with arguments inside a running guest.
    async fn exec(
        &self,
        guest_id: &str,
        script: &str,
        args: &[String],
    ) -> Result<ExecOutput, DriverError>;
    /// Reports one guest, or `None` if it does not exist.
    async fn status(&self, guest_id: &str) -> Result<Option<GuestInfo>, DriverError>;
    /// Reports every guest of the server.
    async fn list(&self) -> Result<Vec<GuestInfo>, DriverError>;
    /// Reports load figures.
    async fn stats(&self) -> Result<ServerStats, DriverError>;
    /// Live migration, source side, first: what the target needs to receive the running
    /// guest `guest_id`. Drivers without `live_migrate` answer `Unsupported`.
    async fn live_offer(&self, guest_id: &str) -> Result<LiveOffer, DriverError> {
        let _ = guest_id;
        Err(self.no_live())
    }
    /// Live migration, target side: creates the guest of `spec` waiting to receive a running
    /// guest as `offer` describes (a leftover of an earlier attempt is replaced) and says where
    /// the source sends it. The guest exists here, not running, until `live_finish`.
    async fn live_receive(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        let _ = (spec, offer);
        Err(self.no_live())
    }
    /// Live migration, source side: sends the running guest to `target` (disk, then memory,
    /// while it runs), pauses it for the last pass, and ends it here once the target holds it
    /// all (its record stays, stopped, until destroyed). On failure the guest keeps running
    /// here. Progress goes to `activity`.
    async fn live_send(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        let _ = (guest_id, target);
        Err(self.no_live())
    }
    /// Live migration, target side, last: runs the received guest; succeeds if it runs.
    async fn live_finish(&self, guest_id: &str) -> Result<(), DriverError> {
        let _ = guest_id;
        Err(self.no_live())
    }
    /// The error of a live migration step this driver cannot do.
    fn no_live(&self) -> DriverError {
        DriverError::Unsupported {
            driver: self.kind().into(),
            operation: "live migration".into(),
        }
    }
    /// The recent standard output and error of a guest's main process.
    async fn logs(&self, guest_id: &str) -> Result<String, DriverError> {
        let _ = guest_id;
        Err(DriverError::Unsupported {
            driver: self.kind().into(),
            operation: "logs".into(),
        })
    }
    /// Makes images present on this server from `from` before any guest needs them (an
    /// operator loading a server ahead of a rollout; an agent importing files at start):
    /// `image` (a name or `sha256:` digest) from the core or a peer, or every image of a
    /// file (`image`, if given, must be among them). Says what the server then holds of them
    /// (`name@digest`). Drivers that run no images answer `Unsupported`.
    async fn fetch_image(
        &self,
        from: &ImageOrigin,
        image: Option<&str>,
    ) -> Result<Vec<String>, DriverError> {
        let _ = (from, image);
        Err(DriverError::Unsupported {
            driver: self.kind().into(),
            operation: "images".into(),
        })
    }
}

/// Where a server gets an image it lacks. Guests are created with `Core` (the server's usual
/// source); `Driver::fetch_image` takes any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase")]
pub enum ImageOrigin {
    /// The core's image store, or the peers that hold the image when the core does not.
    Core,
    /// The image store of the agent at `url` (a peer that holds it: the core's own store and
    /// link are spared).
    Peer {
        /// The peer agent's base URL.
        url: String,
    },
    /// An OCI archive or OCI layout directory on the server itself (what `podman save` or
    /// `skopeo copy` write).
    File {
        /// Its path on the server.
        path: std::path::PathBuf,
    },
}

impl std::fmt::Display for ImageOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageOrigin::Core => f.write_str("the core"),
            ImageOrigin::Peer { url } => write!(f, "the agent at {url}"),
            ImageOrigin::File { path } => write!(f, "{}", path.display()),
        }
    }
}
