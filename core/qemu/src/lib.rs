//! Cloud48's qemu driver: each container a virtual machine.
//!
//! A container of this server is a QEMU process (daemonized, so it outlives a restarted agent)
//! booting its type's VM image: the image's kernel and initramfs, a qcow2 disk that is an
//! overlay of the image's disk (`disks.rs`), virtio disk and network on a tap device on the
//! agent's bridge, the guest agent on a virtio serial port. It is controlled through QMP and
//! scripts run inside through the guest agent (`control.rs`). KVM runs it where the machine
//! has hardware virtualization, TCG elsewhere (`machine.rs`).
//!
//! Layout under the data directory: `images/` (the server's image store), `vm-images/<hex>/`
//! (bootable bases), `guests/ID/{guest.json, disk.qcow2, run.sh, console.log, qemu.pid,
//! qmp.sock, qga.sock}`.
//!
//! Invariants:
//! - The guests are the records on disk; whether one runs is read from its QEMU process (its
//!   pid file, checked against the process's command line) and QMP, so a restarted agent finds
//!   its VMs running and controls them again.
//! - A started guest has booted: its guest agent answers and its declared readiness check
//!   passes; a guest that does not boot in time is stopped and the error shows the end of its
//!   console.
//! - A guest's own data is exactly its overlay disk: export archives it, import restores it
//!   over the same image's base (fetched by digest), and a guest is recorded only once its disk
//!   is whole.

mod boot;
pub mod control;
pub mod disks;
mod driver;
pub mod live;
pub mod machine;
mod migrate;
mod resize;
pub mod shape;
mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use cloud48_driver::{
    Capabilities, Driver, DriverError, ExecOutput, GuestImage, GuestInfo, GuestSpec, GuestState,
    LiveOffer, LiveReport, LiveTarget, ServerStats,
};
use cloud48_linux::images::ImageSource;
use cloud48_linux::network::{self, AddressRange, GuestNet, Subnet};
use cloud48_linux::{admit, admit_resize, find_program, machine_capacity, read_records, tail};
use cloud48_model::{ImageRef, Resources};

use disks::{Base, VmImages};
use machine::{Accel, AccelChoice, MachineModel, MachineShape, files};

/// How much of a console `logs` and errors show.
const LOG_TAIL: u64 = 64 << 10;
/// How long a script run by `exec` may take.
const EXEC_LIMIT: Duration = Duration::from_secs(300);
/// How many VMs a `list` asks for their run state at once.
const LIST_FAN_OUT: usize = 16;
/// The line the guest init writes once its guest agent runs.
const UP_MARKER: &str = "cloud48: up";

/// Configuration of a qemu driver.
#[derive(Clone)]
pub struct QemuConfig {
    /// Server name, for messages.
    pub name: String,
    /// Where images, bases and guests live.
    pub data_dir: PathBuf,
    /// Bridge the guests' tap devices join.
    pub bridge: String,
    /// Subnet of the guests; the bridge takes its first address.
    pub subnet: Subnet,
    /// The range of the subnet new guests get addresses from (all of it when `None`): servers
    /// sharing a network each hand out their own. A guest received live keeps its address,
    /// which may be in another server's range.
    pub addresses: Option<AddressRange>,
    /// Most bytes the server's VM images may take (as stored plus their bases); the least
    /// recently used ones no VM is made of go beyond it (`None`: no bound).
    pub image_cache_bytes: Option<u64>,
    /// Prefix (1-5 characters of a-z0-9) of the tap devices' names.
    pub prefix: String,
    /// Capacity offered; `None` measures the machine.
    pub capacity: Option<Resources>,
    /// How long a stop waits for the guest to power off before QEMU is ended.
    pub stop_grace: Duration,
    /// How long a boot may take until the guest agent answers.
    pub boot_timeout: Duration,
    /// Which accelerator to use.
    pub accel: AccelChoice,
    /// Where an image this server lacks is pulled from (the core).
    pub source: Option<ImageSource>,
    /// Makes the source of a peer agent's store from its URL (`fetch_image` from a peer).
    pub peers: Option<cloud48_linux::images::PeerSources>,
    /// The address other servers reach this one at for live migrations (the disk's NBD
    /// export and the memory stream listen there).
    pub migration_host: String,
    /// VMs boot with room to grow while they run (a virtio-mem region and vCPUs up to the
    /// server's size), so that an update gives them more at once. Off by default: under TCG
    /// with QEMU 10.0 a VM booted so was found with corrupted memory (a kernel panic) after
    /// about one live migration in fifty; without it, growing a running VM is refused with
    /// the reason and takes a restart.
    pub grow_live: bool,
}

/// A guest as the driver keeps it on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: GuestSpec,
    ip: Ipv4Addr,
    /// The digest of the VM image it boots.
    image: String,
    /// QEMU's machine type it runs on (kept across live migrations; absent from records
    /// written before machine types were kept: the newest `q35`).
    #[serde(default)]
    machine_type: Option<String>,
    /// The memory and CPUs its QEMU was started with (absent from records written before VMs
    /// could grow while they run: booted with their resources, no room to grow).
    #[serde(default)]
    shape: Option<MachineShape>,
}

/// Drives virtual machines on this machine with QEMU.
pub struct QemuDriver {
    cfg: QemuConfig,
    accel: Accel,
    /// The machine new VMs get here.
    machine: MachineModel,
    /// The machine types this server's QEMU knows.
    machine_types: Vec<String>,
    images: Arc<VmImages>,
    capacity: Resources,
    guests: Mutex<BTreeMap<String, Record>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cpu_sample: Mutex<Option<(Instant, u64)>>,
}

fn permanent(e: impl std::fmt::Display) -> DriverError {
    DriverError::Permanent(e.to_string())
}

/// The QEMU binary of this machine's architecture.
fn qemu_binary() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "qemu-system-aarch64",
        _ => "qemu-system-x86_64",
    }
}

/// Guest ids become directory and host names.
fn validate_id(id: &str) -> Result<(), DriverError> {
    if id.is_empty()
        || id.len() > 63
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(permanent(format!(
            "guest id '{id}' must be 1-63 characters of letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

impl QemuDriver {
    /// The subnet the server's VMs get addresses of, and its range of it when it shares the
    /// network (what its agent reports to the core).
    pub fn network(&self) -> (Subnet, Option<AddressRange>) {
        (self.cfg.subnet, self.cfg.addresses)
    }

    /// Checks privileges, QEMU and its tools, chooses the accelerator, prepares the bridge and
    /// loads the guests recorded in the data directory.
    pub async fn open(cfg: QemuConfig) -> Result<QemuDriver, String> {
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
            return Err("the qemu driver needs root (tap devices on the bridge); run the agent as root or use --driver sim".into());
        }
        for (program, package) in [
            (
                qemu_binary(),
                "qemu-system-x86 (on Debian bookworm from bookworm-backports, to match qemu-utils)",
            ),
            ("qemu-img", "qemu-utils"),
            ("mkfs.ext4", "e2fsprogs"),
            ("ip", "iproute2"),
        ] {
            if find_program(program).is_none() {
                return Err(format!(
                    "{program} is not installed (Debian: apt-get install {package})"
                ));
            }
        }
        let dev_kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| e.to_string());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let unusable = machine::kvm_unusable(&cpuinfo, dev_kvm);
        let accel = machine::choose(cfg.accel, unusable.clone())?;
        if let (Accel::Tcg, Some(why), AccelChoice::Auto) = (accel, &unusable, cfg.accel) {
            tracing::warn!(server = %cfg.name, reason = %why, "virtual machines run under TCG (emulation, far slower than KVM)");
        }
        if let Some(range) = &cfg.addresses {
            range.check_within(&cfg.subnet)?;
        }
        network::ensure_bridge(&cfg.bridge, &cfg.subnet).await?;
        let guests: BTreeMap<String, Record> = read_records(&cfg.data_dir.join("guests"))?
            .into_iter()
            .map(|r: Record| (r.spec.guest_id.clone(), r))
            .collect();
        let capacity = cfg
            .capacity
            .unwrap_or_else(|| machine_capacity(&cfg.data_dir));
        let images = Arc::new(VmImages::open(
            &cfg.name,
            &cfg.data_dir,
            (cfg.source.clone(), cfg.peers.clone()),
            cfg.image_cache_bytes,
        )?);
        let (machine_types, q35) = match std::process::Command::new(qemu_binary())
            .args(["-machine", "help"])
            .output()
        {
            Ok(out) if out.status.success() => {
                machine::machine_types(&String::from_utf8_lossy(&out.stdout))
            }
            Ok(out) => {
                return Err(format!(
                    "{} -machine help failed: {}",
                    qemu_binary(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(e) => return Err(format!("cannot run {}: {e}", qemu_binary())),
        };
        let machine = MachineModel {
            machine_type: q35.unwrap_or_else(|| "q35".into()),
            accel,
            cpu: machine::cpu_of(accel, &cpuinfo),
        };
        Ok(QemuDriver {
            cfg,
            accel,
            machine,
            machine_types,
            images,
            capacity,
            guests: Mutex::new(guests),
            locks: Mutex::new(HashMap::new()),
            cpu_sample: Mutex::new(None),
        })
    }

    /// The accelerator this driver's VMs run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The server's image store (its agent serves it to peer agents).
    pub fn image_store(&self) -> Arc<cloud48_image::Store> {
        self.images.store().clone()
    }

    /// Ends every guest's QEMU, removes the guests and the bridge (for tests).
    pub async fn teardown(&self) {
        let ids: Vec<String> = self.guests.lock().unwrap().keys().cloned().collect();
        for id in ids {
            let _ = self.destroy(&id).await;
        }
        network::remove_bridge(&self.cfg.bridge).await;
    }

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

    fn file(&self, guest: &str, name: &str) -> PathBuf {
        self.dir(guest).join(name)
    }

    fn tap(&self, guest: &str) -> String {
        GuestNet::new(&self.cfg.prefix, guest).host_if
    }

    fn record(&self, guest: &str) -> Result<Record, DriverError> {
        self.guests
            .lock()
            .unwrap()
            .get(guest)
            .cloned()
            .ok_or_else(|| DriverError::NotFound(guest.into()))
    }

    /// Writes `r` and makes it the guest's record.
    fn keep(&self, r: &Record) -> Result<(), DriverError> {
        self.save(r)?;
        self.guests
            .lock()
            .unwrap()
            .insert(r.spec.guest_id.clone(), r.clone());
        Ok(())
    }

    fn save(&self, r: &Record) -> Result<(), DriverError> {
        let dir = self.dir(&r.spec.guest_id);
        let tmp = dir.join("guest.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r).expect("serializes"))
            .and_then(|()| std::fs::rename(&tmp, dir.join("guest.json")))
            .map_err(|e| {
                permanent(format!(
                    "cannot write the record of {}: {e}",
                    r.spec.guest_id
                ))
            })
    }

    fn allocated(&self) -> Resources {
        self.guests
            .lock()
            .unwrap()
            .values()
            .fold(Resources::default(), |acc, r| acc.plus(&r.spec.resources))
    }

    /// Reserves capacity and an address for a new guest under one lock; `Err(info)` when the
    /// guest exists.
    fn reserve(
        &self,
        spec: &GuestSpec,
        image: &str,
        machine_type: &str,
    ) -> Result<Result<Record, GuestInfo>, DriverError> {
        let mut guests = self.guests.lock().unwrap();
        if let Some(existing) = guests.get(&spec.guest_id).cloned() {
            drop(guests);
            return Ok(Err(self.info(&existing, GuestState::Stopped)));
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
        let record = Record {
            spec,
            ip,
            image: image.to_string(),
            machine_type: Some(machine_type.to_string()),
            shape: None,
        };
        guests.insert(record.spec.guest_id.clone(), record.clone());
        Ok(Ok(record))
    }

    fn info(&self, r: &Record, state: GuestState) -> GuestInfo {
        GuestInfo {
            guest_id: r.spec.guest_id.clone(),
            state,
            ip: Some(r.ip.to_string()),
            resources: r.spec.resources,
        }
    }

    /// The VM image a spec boots, made ready here: the VM variant of the image its type
    /// declares (`NAME-vm`, which `image build --vm` makes), so that one type runs as OS
    /// containers on linux servers and as VMs here.
    async fn base_for(&self, spec: &GuestSpec) -> Result<Base, DriverError> {
        let image = spec.workload.image.as_ref().ok_or_else(|| {
            permanent(format!(
                "server {} runs virtual machines, which boot a VM image, but container type \
                 '{}' declares no image; declare one and build its VM variant with \
                 `cloud48 image build --vm`",
                self.cfg.name, spec.type_id
            ))
        })?;
        let variant = disks::vm_variant(image);
        self.images.prepare(&variant).await.map_err(|e| {
            if variant.reference == image.reference {
                return e;
            }
            permanent(format!(
                "server {} runs virtual machines: container type '{}' runs there as {}, the \
                 VM variant of its image {} (build it with `cloud48 image build --vm RECIPE`): {e}",
                self.cfg.name, spec.type_id, variant.reference, image.reference
            ))
        })
    }

    /// The base of the image a recorded guest boots (fetched again by digest if it went).
    async fn base_of(&self, r: &Record) -> Result<Base, DriverError> {
        match self.images.made(&r.image) {
            Some(base) => Ok(base),
            None => {
                self.images
                    .prepare(&ImageRef {
                        reference: r.image.clone(),
                        digest: Some(r.image.clone()),
                    })
                    .await
            }
        }
    }

    /// Records a new guest whose disk `fill` makes in its (new) directory; the record on
    /// disk is written last, so a guest without one does not exist.
    async fn make_guest<F, Fut>(
        &self,
        spec: &GuestSpec,
        image: &str,
        machine_type: &str,
        fill: F,
    ) -> Result<GuestInfo, DriverError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), DriverError>>,
    {
        let record = match self.reserve(spec, image, machine_type)? {
            Ok(r) => r,
            Err(existing) => return Ok(existing),
        };
        let dir = self.dir(&spec.guest_id);
        let made = async {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            tokio::fs::create_dir_all(&dir).await.map_err(permanent)?;
            fill(dir.join(files::DISK)).await?;
            self.save(&record)
        }
        .await;
        if let Err(e) = made {
            self.guests.lock().unwrap().remove(&spec.guest_id);
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        // Room for what it brought: images no VM here is made of go, least recently used first.
        let in_use = self
            .guests
            .lock()
            .unwrap()
            .values()
            .map(|r| r.image.clone())
            .collect();
        self.images.evict(in_use).await;
        Ok(self.info(&record, GuestState::Stopped))
    }

    /// Removes a guest: its QEMU ended, its directory and record gone.
    async fn remove(&self, guest: &str) -> Result<(), DriverError> {
        self.halt(guest, false).await?;
        tokio::fs::remove_dir_all(self.dir(guest))
            .await
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(permanent(format!("cannot remove guest {guest}: {e}"))),
            })?;
        self.guests.lock().unwrap().remove(guest);
        Ok(())
    }

    /// The size of a guest's disk as the VM sees it, MiB.
    async fn disk_size_mb(&self, guest: &str) -> Result<u64, DriverError> {
        let out = tokio::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(self.file(guest, files::DISK))
            .output()
            .await
            .map_err(|e| permanent(format!("cannot run qemu-img: {e}")))?;
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
            permanent(format!(
                "qemu-img info of guest {guest}'s disk failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        info["virtual-size"]
            .as_u64()
            .map(|b| b >> 20)
            .ok_or_else(|| permanent("qemu-img info gave no virtual size"))
    }

    async fn running(&self, guest: &str, operation: &str) -> Result<Record, DriverError> {
        let r = self.record(guest)?;
        match self.state(guest).await {
            GuestState::Running => Ok(r),
            state => Err(DriverError::InvalidState {
                guest: guest.into(),
                state,
                operation: operation.into(),
            }),
        }
    }

    /// A stopped guest's record, for export.
    async fn exportable(&self, guest: &str) -> Result<Record, DriverError> {
        let r = self.record(guest)?;
        match self.state(guest).await {
            GuestState::Stopped => Ok(r),
            state => Err(DriverError::InvalidState {
                guest: guest.into(),
                state,
                operation: "export".into(),
            }),
        }
    }

    fn scratch(&self) -> PathBuf {
        let dir = self.cfg.data_dir.join("tmp");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!(
            "transfer-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ))
    }
}
