//! The Linux driver: OS containers ("Vz" servers) made of namespaces, cgroups and a veth pair.
//!
//! A guest is a process tree in its own network, mount, PID and UTS namespaces. Its network
//! namespace is joined by a veth pair to the driver's bridge and has its own address from the
//! driver's subnet; cgroups limit its memory, cpu and processes, and the freezer suspends it.
//! Its private directories live in `DATA/guests/ID/fs` and are bind-mounted over the same paths
//! inside its mount namespace, so clone and cold migration copy exactly them. What runs inside
//! is the workload the container's type declares ([`templates::from_workload`]).
//!
//! Invariants:
//! - The on-disk record (`guest.json`) is the list of guests; the state (running, stopped,
//!   suspended) is read from the kernel (cgroup members, freezer), so an agent that restarts
//!   finds its guests as they are.
//! - Operations on one guest are serialized; operations on different guests run in parallel.
//! - Stop is graceful (SIGTERM, then SIGKILL after the grace period) and leaves no process,
//!   namespace or veth behind; destroy also removes the cgroups and the directory.

pub mod cgroups;
mod delta;
mod driver;
mod host;
pub mod images;
mod live;
pub mod network;
mod process;
pub mod ready;
mod run_image;
pub mod templates;
mod wire;

/// What a test or a lab that is done with a server's data directory unmounts under it.
pub use cloud48_oci::unmount_under;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use self::cgroups::Cgroups;
pub use self::host::{
    admit, admit_resize, cpu_rate, find_program, machine_capacity, read_records, tail,
};
use self::host::{allocated_in, validate_id};
use self::images::{ImageSource, Images};
use self::network::{GuestNet, Subnet};
use self::process::{JOIN, signal_all};
use self::run_image::own_root;
use self::templates::Template;
use cloud48_driver::{
    Capabilities, Driver, DriverError, ExecOutput, GuestImage, GuestInfo, GuestSpec, GuestState,
    LiveOffer, LiveReport, LiveTarget, ServerStats,
};
use cloud48_model::Resources;

/// How long `exec` may run.
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a started guest has to answer on its ready port.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of each output stream `exec` returns.
const EXEC_OUTPUT_MAX: usize = 1 << 20;
/// How often the disk use of the guests is measured again.
const DISK_WALK_EVERY: Duration = Duration::from_secs(10);
/// How much of the log `logs` returns.
const LOG_TAIL: u64 = 64 << 10;
/// Where runc keeps the state of each driver's containers (under the driver's prefix); in
/// `/run`, so a rebooted server starts with none.
const RUNC_ROOT: &str = "/run/cloud48-runc";

/// Configuration of a Linux driver.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// Server name, for messages.
    pub name: String,
    /// Where guests' directories and records live.
    pub data_dir: PathBuf,
    /// Bridge the guests' veths join.
    pub bridge: String,
    /// Subnet of the guests; the bridge takes its first address.
    pub subnet: Subnet,
    /// The range of the subnet new guests get addresses from (all of it when `None`): servers
    /// sharing one network (so that a container moving live keeps its address) each give a
    /// range of their own. A guest moving in keeps its address from anywhere in the subnet.
    pub addresses: Option<network::AddressRange>,
    /// Prefix (1-5 characters of a-z0-9) of namespaces, interfaces and the parent cgroup.
    pub prefix: String,
    /// Capacity offered; `None` measures the machine.
    pub capacity: Option<Resources>,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// This program, whose `guest-http` stands in for workloads whose image it cannot run.
    pub exe: PathBuf,
    /// Whether workloads run their images (under runc, on their own root) and where missing
    /// images come from; `None` runs every workload on the server's own files.
    pub images: Option<ImagesConfig>,
}

/// Image support of a linux driver.
#[derive(Clone, Default)]
pub struct ImagesConfig {
    /// Where an image this server lacks is pulled from (the core); `None`: only images
    /// imported on the server run.
    pub source: Option<ImageSource>,
    /// Makes the source of a peer agent's store from its URL (`fetch_image` from a peer);
    /// `None`: this server pulls only from `source`.
    pub peers: Option<images::PeerSources>,
    /// Most bytes the server's images may take (as stored, plus unpacked); the least recently
    /// used images no container runs are removed beyond it. `None`: no bound.
    pub cache_bytes: Option<u64>,
    /// The address other servers send containers moving live to (where CRIU works); `None`:
    /// containers do not move live to or from this server.
    pub migration_host: Option<String>,
}

impl std::fmt::Debug for ImagesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagesConfig")
            .field("source", &self.source.as_ref().map(|_| "…"))
            .field("cache_bytes", &self.cache_bytes)
            .field("migration_host", &self.migration_host)
            .finish()
    }
}

/// A guest as the driver keeps it on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: GuestSpec,
    ip: Ipv4Addr,
    /// The digest of the image it runs on its own root (under runc); `None`: it runs on the
    /// server's files.
    #[serde(default)]
    image: Option<String>,
}

/// Drives OS containers on this machine.
pub struct LinuxDriver {
    cfg: LinuxConfig,
    cgroups: Cgroups,
    images: Option<Arc<Images>>,
    capacity: Resources,
    guests: Mutex<BTreeMap<String, Record>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cpu_sample: Mutex<Option<(Instant, u64)>>,
    disk_sample: Mutex<Option<(Instant, u64)>>,
    /// Whether CRIU works here (its version), or why not.
    live: Result<String, String>,
    /// Guests this server is receiving live.
    receiving: Mutex<HashMap<String, live::Receiving>>,
}

fn permanent(e: impl std::fmt::Display) -> DriverError {
    DriverError::Permanent(e.to_string())
}

impl LinuxDriver {
    /// The subnet the server's guests get addresses of, and its range of it when it shares
    /// the network (what its agent reports to the core).
    pub fn network(&self) -> (Subnet, Option<network::AddressRange>) {
        (self.cfg.subnet, self.cfg.addresses)
    }

    /// The server's image store, when it runs images (its agent serves it to peer agents).
    pub fn image_store(&self) -> Option<Arc<cloud48_image::Store>> {
        self.images.as_ref().map(|i| i.store().clone())
    }

    /// Checks privileges and tools, prepares cgroups and the bridge, and loads the guests
    /// recorded in the data directory.
    pub async fn open(cfg: LinuxConfig) -> Result<LinuxDriver, String> {
        if !(1..=5).contains(&cfg.prefix.len())
            || !cfg
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "prefix '{}' must be 1-5 characters of a-z and 0-9",
                cfg.prefix
            ));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the linux driver needs root (namespaces, cgroups and veths); run the agent as root or use --driver sim".into());
        }
        for program in ["ip", "unshare", "nsenter", "mount", "hostname"] {
            if find_program(program).is_none() {
                return Err(format!(
                    "{program} is not installed (Debian: apt-get install {})",
                    network::package_of(program)
                ));
            }
        }
        if let Some(range) = &cfg.addresses {
            range.check_within(&cfg.subnet)?;
        }
        let cgroups = Cgroups::detect(&cfg.prefix)?;
        network::ensure_bridge(&cfg.bridge, &cfg.subnet).await?;
        let guests: BTreeMap<String, Record> = read_records(&cfg.data_dir.join("guests"))?
            .into_iter()
            .map(|r: Record| (r.spec.guest_id.clone(), r))
            .collect();
        // After a reboot of the host the kernel has no cgroups for the recorded guests.
        for r in guests.values() {
            if let Err(e) = cgroups.create(&r.spec.guest_id, &r.spec.resources) {
                tracing::warn!(guest = %r.spec.guest_id, error = %e, "cannot restore the cgroups of a guest");
            }
        }
        let capacity = cfg
            .capacity
            .unwrap_or_else(|| machine_capacity(&cfg.data_dir));
        let images = match &cfg.images {
            Some(i) => Some(Arc::new(Images::open(
                &cfg.name,
                &cfg.data_dir,
                &Path::new(RUNC_ROOT).join(&cfg.prefix),
                (i.source.clone(), i.peers.clone()),
                i.cache_bytes,
            )?)),
            None => None,
        };
        let live = match cfg.images.as_ref().and_then(|i| i.migration_host.as_ref()) {
            Some(_) => {
                let scratch = cfg.data_dir.join("criu-probe");
                let works = tokio::task::spawn_blocking(move || cloud48_oci::criu_works(&scratch))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                let works = works.and_then(|v| live::write_criu_config(&cfg.data_dir).map(|()| v));
                match &works {
                    Ok(v) => tracing::info!(criu = %v, "containers move live (CRIU works)"),
                    Err(why) => tracing::warn!(%why, "containers cannot move live"),
                }
                works
            }
            None => Err("live migration is off".into()),
        };
        let driver = LinuxDriver {
            cfg,
            cgroups,
            images,
            capacity,
            guests: Mutex::new(guests),
            locks: Mutex::new(HashMap::new()),
            cpu_sample: Mutex::new(None),
            disk_sample: Mutex::new(None),
            live,
            receiving: Mutex::new(HashMap::new()),
        };
        driver.recover_sends().await;
        Ok(driver)
    }

    /// Destroys every guest, then removes the bridge and the parent cgroups.
    pub async fn teardown(&self) {
        let ids: Vec<String> = self.guests.lock().unwrap().keys().cloned().collect();
        for id in ids {
            let _ = self.destroy(&id).await;
        }
        network::remove_bridge(&self.cfg.bridge).await;
        self.cgroups.remove_parent();
    }

    /// How a guest is launched: the workload of its spec on this server's files.
    fn template(&self, spec: &GuestSpec) -> Template {
        templates::from_workload(&spec.workload, &self.cfg.exe.to_string_lossy(), |p| {
            find_program(p).is_some()
        })
    }

    /// Holds the guest's lock: operations on one guest run one at a time.
    async fn hold(&self, guest: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap()
            .entry(guest.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn dir(&self, guest: &str) -> PathBuf {
        self.cfg.data_dir.join("guests").join(guest)
    }

    fn record(&self, guest: &str) -> Result<Record, DriverError> {
        self.guests
            .lock()
            .unwrap()
            .get(guest)
            .cloned()
            .ok_or_else(|| DriverError::NotFound(guest.into()))
    }

    fn save(&self, r: &Record) -> Result<(), DriverError> {
        let dir = self.dir(&r.spec.guest_id);
        let tmp = dir.join("guest.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r).expect("serializes"))
            .map_err(permanent)?;
        std::fs::rename(&tmp, dir.join("guest.json")).map_err(permanent)?;
        self.guests
            .lock()
            .unwrap()
            .insert(r.spec.guest_id.clone(), r.clone());
        Ok(())
    }

    fn state(&self, guest: &str) -> GuestState {
        if self.cgroups.pids(guest).is_empty() {
            GuestState::Stopped
        } else if self.cgroups.frozen(guest) {
            GuestState::Suspended
        } else {
            GuestState::Running
        }
    }

    fn info(&self, r: &Record) -> GuestInfo {
        GuestInfo {
            guest_id: r.spec.guest_id.clone(),
            state: self.state(&r.spec.guest_id),
            ip: Some(r.ip.to_string()),
            resources: r.spec.resources,
        }
    }

    fn allocated(&self) -> Resources {
        allocated_in(&self.guests.lock().unwrap())
    }

    /// Reserves capacity and an address for a new guest by recording it in memory, under one
    /// lock, so concurrent creates never share an address or over-commit. `Err(info)` when the
    /// guest exists.
    fn reserve(
        &self,
        spec: &GuestSpec,
        image: Option<String>,
    ) -> Result<Result<Record, GuestInfo>, DriverError> {
        let mut guests = self.guests.lock().unwrap();
        if let Some(existing) = guests.get(&spec.guest_id).cloned() {
            drop(guests);
            return Ok(Err(self.info(&existing)));
        }
        let ip = admit(
            &self.cfg.name,
            &self.capacity,
            (&self.cfg.subnet, self.cfg.addresses),
            guests.values().map(|r| (r.spec.resources, r.ip)),
            spec,
        )?;
        let mut spec = spec.clone();
        spec.ip = Some(ip.to_string());
        let record = Record { spec, ip, image };
        guests.insert(record.spec.guest_id.clone(), record.clone());
        Ok(Ok(record))
    }

    /// Makes the guest's directory, cgroups and record; `fill` writes its private files (off
    /// the async runtime). The record on disk is written last: a guest without one does not exist.
    /// A stopped guest's record and upper directory, for export.
    fn exportable(&self, guest_id: &str) -> Result<(Record, PathBuf), DriverError> {
        let r = self.record(guest_id)?;
        let state = self.state(guest_id);
        if state != GuestState::Stopped {
            return Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "export".into(),
            });
        }
        Ok((r, self.dir(guest_id).join("fs")))
    }

    /// Creates a stopped guest whose upper directory `unpack` fills from an export (or returns
    /// the existing one); the guest exists only once it is filled whole.
    async fn import_with(
        &self,
        spec: &GuestSpec,
        unpack: impl FnOnce(&Path) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<GuestInfo, DriverError> {
        validate_id(&spec.guest_id)?;
        let _held = self.hold(&spec.guest_id).await;
        if let Ok(r) = self.record(&spec.guest_id) {
            return Ok(self.info(&r));
        }
        let runs = self.image_for(spec).await?;
        let own = runs.is_some();
        self.make_guest(spec, runs, move |fs| {
            unpack(fs)?;
            if own { own_root(fs) } else { Ok(()) }
        })
        .await
    }

    async fn make_guest(
        &self,
        spec: &GuestSpec,
        image: Option<String>,
        fill: impl FnOnce(&Path) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<GuestInfo, DriverError> {
        let record = match self.reserve(spec, image)? {
            Ok(r) => r,
            Err(existing) => return Ok(existing),
        };
        let dir = self.dir(&spec.guest_id);
        let made = async {
            let fs = dir.join("fs");
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&fs).map_err(permanent)?;
                fill(&fs)
            })
            .await
            .map_err(permanent)??;
            self.cgroups
                .create(&spec.guest_id, &spec.resources)
                .map_err(permanent)?;
            self.save(&record)
        }
        .await;
        if let Err(e) = made {
            self.guests.lock().unwrap().remove(&spec.guest_id);
            self.cgroups.remove(&spec.guest_id);
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        Ok(self.info(&record))
    }

    /// Bytes in the guests' directories, walked off the async runtime at most every
    /// `DISK_WALK_EVERY` (heartbeats ask every half second).
    async fn disk_used(&self) -> u64 {
        if let Some((at, bytes)) = *self.disk_sample.lock().unwrap()
            && at.elapsed() < DISK_WALK_EVERY
        {
            return bytes;
        }
        let root = self.cfg.data_dir.join("guests");
        let bytes = tokio::task::spawn_blocking(move || images::dir_size(&root))
            .await
            .unwrap_or(0);
        *self.disk_sample.lock().unwrap() = Some((Instant::now(), bytes));
        bytes
    }
}

/// Removes, without a running driver, everything drivers with `prefix` left on this machine:
/// processes in their cgroups, the cgroups, runc's records, their network namespaces and
/// `bridges`.
/// For tests and for cleaning up after a crashed agent.
pub fn sweep(prefix: &str, bridges: &[&str]) {
    if let Ok(cg) = Cgroups::detect(prefix) {
        for guest in cg.guests() {
            for _ in 0..100 {
                let pids = cg.pids(&guest);
                if pids.is_empty() {
                    break;
                }
                if cg.frozen(&guest) {
                    let _ = cg.request_freeze(&guest, false);
                }
                signal_all(pids, libc::SIGKILL);
                std::thread::sleep(Duration::from_millis(20));
            }
            cg.remove(&guest);
        }
        cg.remove_parent();
    }
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for ns in netns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
    {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .output();
    }
    let _ = std::fs::remove_dir_all(Path::new(RUNC_ROOT).join(prefix));
    for b in bridges {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", b])
            .output();
    }
}
