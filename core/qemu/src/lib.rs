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

pub mod control;
pub mod disks;
pub mod live;
pub mod machine;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use cloud48_driver::{
    Capabilities, Driver, DriverError, ExecOutput, GuestImage, GuestInfo, GuestSpec, GuestState,
    LiveOffer, LiveReport, LiveTarget, ServerStats, activity,
};
use cloud48_linux::images::{ImageSource, process_args, process_env};
use cloud48_linux::network::{self, GuestNet, Subnet};
use cloud48_linux::ready::Probe;
use cloud48_linux::{find_program, machine_capacity, tail};
use cloud48_model::{ImageRef, Resources};

use disks::{Base, VmImages};
use machine::{Accel, AccelChoice, Launch, files};

/// How much of a console `logs` and errors show.
const LOG_TAIL: u64 = 64 << 10;
/// How long a script run by `exec` may take.
const EXEC_LIMIT: Duration = Duration::from_secs(300);
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
    /// The address other servers reach this one at for live migrations (the disk's NBD
    /// export and the memory stream listen there).
    pub migration_host: String,
}

/// A guest as the driver keeps it on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: GuestSpec,
    ip: Ipv4Addr,
    /// The digest of the VM image it boots.
    image: String,
}

/// What an export holds beside the disk.
#[derive(Debug, Serialize, Deserialize)]
struct ExportMeta {
    /// The digest of the VM image the disk is an overlay of.
    image: String,
}

/// Drives virtual machines on this machine with QEMU.
pub struct QemuDriver {
    cfg: QemuConfig,
    accel: Accel,
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
            (qemu_binary(), "qemu-system-x86 (on Debian bookworm from bookworm-backports, to match qemu-utils)"),
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
        network::ensure_bridge(&cfg.bridge, &cfg.subnet).await?;
        let guests_dir = cfg.data_dir.join("guests");
        std::fs::create_dir_all(&guests_dir)
            .map_err(|e| format!("cannot create {}: {e}", guests_dir.display()))?;
        let mut guests = BTreeMap::new();
        for entry in std::fs::read_dir(&guests_dir)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let file = entry.path().join("guest.json");
            match std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => {
                    guests.insert(r.spec.guest_id.clone(), r);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "skipping an unreadable guest record")
                }
            }
        }
        let capacity = cfg
            .capacity
            .unwrap_or_else(|| machine_capacity(&cfg.data_dir));
        let images = Arc::new(VmImages::open(
            &cfg.name,
            &cfg.data_dir,
            cfg.source.clone(),
        )?);
        Ok(QemuDriver {
            cfg,
            accel,
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

    fn save(&self, r: &Record) -> Result<(), DriverError> {
        let dir = self.dir(&r.spec.guest_id);
        let tmp = dir.join("guest.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r).expect("serializes"))
            .and_then(|()| std::fs::rename(&tmp, dir.join("guest.json")))
            .map_err(|e| permanent(format!("cannot write the record of {}: {e}", r.spec.guest_id)))
    }

    fn allocated(&self) -> Resources {
        self.guests
            .lock()
            .unwrap()
            .values()
            .fold(Resources::default(), |acc, r| acc.plus(&r.spec.resources))
    }

    fn over_capacity(&self, wanted: Resources) -> DriverError {
        DriverError::Capacity {
            server: self.cfg.name.clone(),
            message: format!("{wanted:?} would exceed the capacity {:?}", self.capacity),
        }
    }

    /// Reserves capacity and an address for a new guest under one lock; `Err(info)` when the
    /// guest exists.
    fn reserve(
        &self,
        spec: &GuestSpec,
        image: &str,
    ) -> Result<Result<Record, GuestInfo>, DriverError> {
        let mut guests = self.guests.lock().unwrap();
        if let Some(existing) = guests.get(&spec.guest_id).cloned() {
            drop(guests);
            return Ok(Err(self.info(&existing, GuestState::Stopped)));
        }
        let wanted = guests
            .values()
            .fold(spec.resources, |acc, r| acc.plus(&r.spec.resources));
        if !wanted.fits_in(&self.capacity) {
            return Err(self.over_capacity(wanted));
        }
        let used: Vec<Ipv4Addr> = guests.values().map(|r| r.ip).collect();
        let asked = spec
            .ip
            .as_deref()
            .and_then(|w| w.parse::<Ipv4Addr>().ok())
            .filter(|ip| self.cfg.subnet.contains(*ip) && !used.contains(ip));
        let ip = asked
            .or_else(|| self.cfg.subnet.hosts().find(|ip| !used.contains(ip)))
            .ok_or_else(|| DriverError::Capacity {
                server: self.cfg.name.clone(),
                message: format!("no free address left in {}", self.cfg.subnet),
            })?;
        let mut spec = spec.clone();
        spec.ip = Some(ip.to_string());
        let record = Record {
            spec,
            ip,
            image: image.to_string(),
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

    /// The VM image a spec boots, made ready here.
    async fn base_for(&self, spec: &GuestSpec) -> Result<Base, DriverError> {
        let image = spec.workload.image.as_ref().ok_or_else(|| {
            permanent(format!(
                "server {} runs virtual machines, which boot a VM image, but container type \
                 '{}' declares no image; declare one built with `cloud48 image build --vm`",
                self.cfg.name, spec.type_id
            ))
        })?;
        self.images.prepare(image).await
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
        fill: F,
    ) -> Result<GuestInfo, DriverError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), DriverError>>,
    {
        let record = match self.reserve(spec, image)? {
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
        Ok(self.info(&record, GuestState::Stopped))
    }

    /// QEMU's pid for `guest` when its process runs (the pid file's process must be the QEMU
    /// of this guest's directory).
    fn pid(&self, guest: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.file(guest, files::PID))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mine = self.file(guest, files::QMP);
        String::from_utf8_lossy(&cmdline)
            .contains(&*mine.to_string_lossy())
            .then_some(pid)
    }

    /// The guest's state: from its QEMU's run state when one runs. A QEMU that sent its VM
    /// away (`postmigrate`) or waits to receive one (`inmigrate`) runs no VM: stopped.
    async fn state(&self, guest: &str) -> GuestState {
        if self.pid(guest).is_none() {
            return GuestState::Stopped;
        }
        match control::run_state(&self.file(guest, files::QMP))
            .await
            .as_deref()
        {
            Ok("paused") | Ok("suspended") => GuestState::Suspended,
            Ok("postmigrate") | Ok("inmigrate") | Ok("prelaunch") => GuestState::Stopped,
            _ => GuestState::Running,
        }
    }

    /// Boots the guest of `r` and waits until it is up and ready.
    async fn launch(&self, r: &Record) -> Result<(), DriverError> {
        self.spawn(r, false).await?;
        activity::report(&format!("booting VM {} under {}", r.spec.guest_id, self.accel));
        self.wait_booted(r).await
    }

    /// Starts QEMU for the guest of `r`: booting, or (`incoming`) paused, waiting for a live
    /// migration.
    async fn spawn(&self, r: &Record, incoming: bool) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let base = self.base_of(r).await?;
        let dir = self.dir(guest);
        let w = &r.spec.workload;
        let script = machine::run_script(
            &process_args(&w.command, &base.details),
            &process_env(&base.details, &w.env, guest),
            w.workdir.as_deref().or(base.details.workdir.as_deref()),
        );
        tokio::fs::write(dir.join(files::RUN), script)
            .await
            .map_err(permanent)?;
        for f in [files::CONSOLE, files::QMP, files::QGA, files::PID] {
            let _ = tokio::fs::remove_file(dir.join(f)).await;
        }
        let tap = self.tap(guest);
        self.make_tap(&tap).await?;
        let launch = Launch {
            guest: guest.clone(),
            dir: dir.clone(),
            kernel: base.kernel.clone(),
            initrd: base.initrd.clone(),
            disk: dir.join(files::DISK),
            tap: tap.clone(),
            ip: r.ip,
            prefix: self.cfg.subnet.prefix,
            gateway: self.cfg.subnet.gateway(),
            memory_mb: r.spec.resources.memory_mb.max(128),
            vcpus: r.spec.resources.cpu_millis.div_ceil(1000).max(1),
            accel: self.accel,
            run_script: dir.join(files::RUN),
            incoming,
        };
        let out = tokio::process::Command::new(qemu_binary())
            .args(machine::args(&launch))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| permanent(format!("cannot run {}: {e}", qemu_binary())))?;
        if !out.status.success() {
            let _ = network::run("ip", &["link", "del", &tap]).await;
            return Err(permanent(format!(
                "QEMU did not start guest {guest} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn make_tap(&self, tap: &str) -> Result<(), DriverError> {
        let _ = network::run("ip", &["link", "del", tap]).await;
        network::run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])
            .await
            .map_err(permanent)?;
        if let Err(e) = network::run(
            "ip",
            &["link", "set", tap, "master", &self.cfg.bridge, "up"],
        )
        .await
        {
            let _ = network::run("ip", &["link", "del", tap]).await;
            return Err(permanent(e));
        }
        Ok(())
    }

    /// Waits until the guest init says it is up and the guest agent answers, then until the
    /// workload passes its readiness check; stops the VM and says why when it does not.
    async fn wait_booted(&self, r: &Record) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let console = self.file(guest, files::CONSOLE);
        let qga = self.file(guest, files::QGA);
        let started = Instant::now();
        let deadline = started + self.cfg.boot_timeout;
        let failed = async |why: String| {
            let _ = self.halt(guest, false).await;
            Err(permanent(format!(
                "VM {guest} {why}; its console ends with:\n{}",
                tail(&console, 2048).trim_end()
            )))
        };
        loop {
            if self.pid(guest).is_none() {
                return failed("stopped while booting".into()).await;
            }
            let up = tail(&console, LOG_TAIL).contains(UP_MARKER);
            if up && control::ga_ping(&qga, Duration::from_secs(10)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let hint = match self.accel {
                    Accel::Kvm => " under KVM: the boot made no progress (a /dev/kvm that cannot run this guest's kernel stalls it; start the agent with --accel tcg)",
                    Accel::Tcg => " under TCG",
                };
                return failed(format!(
                    "did not boot within {:?}{hint}",
                    self.cfg.boot_timeout
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::debug!(%guest, elapsed = ?started.elapsed(), "a VM booted");
        let probe = Probe::of(&r.spec.workload);
        if probe == Probe::Running {
            return Ok(());
        }
        let declared = r
            .spec
            .workload
            .readiness
            .as_ref()
            .map(|x| Duration::from_millis(u64::from(x.interval_ms) * u64::from(x.retries)))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let deadline = Instant::now() + declared;
        loop {
            let last = match probe.check(r.ip).await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if self.pid(guest).is_none() || Instant::now() > deadline {
                return failed(format!("did not become ready ({last})")).await;
            }
            tokio::time::sleep(probe.pause().max(Duration::from_millis(50))).await;
        }
    }

    /// Ends the guest's QEMU: gracefully (the guest powers off, its workload told first) when
    /// `graceful`, then by QMP `quit`, then by SIGKILL. Removes its tap device.
    async fn halt(&self, guest: &str, graceful: bool) -> Result<(), DriverError> {
        let qmp = self.file(guest, files::QMP);
        if let Some(pid) = self.pid(guest) {
            let state = control::run_state(&qmp).await.unwrap_or_default();
            // Only a VM that runs (or is merely paused) can power itself off.
            if graceful && (state == "running" || state == "paused") {
                if state == "paused" {
                    let _ = control::qmp(&qmp, qapi::qmp::cont {}).await;
                }
                match control::ga_shutdown(&self.file(guest, files::QGA), false).await {
                    Ok(()) => {
                        let _ = self.exited(pid, self.cfg.stop_grace).await;
                    }
                    Err(e) => tracing::warn!(%guest, error = %e, "the guest agent did not take the shutdown; ending QEMU"),
                }
            }
            if self.pid(guest).is_some() {
                let _ = control::qmp(&qmp, qapi::qmp::quit {}).await;
                if !self.exited(pid, Duration::from_secs(5)).await {
                    // SAFETY: kill has no memory preconditions; pid is QEMU's (checked above).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    if !self.exited(pid, Duration::from_secs(5)).await {
                        return Err(DriverError::Transient(format!(
                            "QEMU of guest {guest} (pid {pid}) does not end"
                        )));
                    }
                }
            }
        }
        let _ = network::run("ip", &["link", "del", &self.tap(guest)]).await;
        Ok(())
    }

    /// Whether process `pid` ends within `limit`.
    async fn exited(&self, pid: i32, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
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

/// Writes the export of a guest (its image's digest, then its disk) to `to` as tar+gzip.
fn write_export(meta: &ExportMeta, disk: &Path, to: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::create(to)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let meta = serde_json::to_vec(meta).expect("serializes");
    let mut header = tar::Header::new_gnu();
    header.set_size(meta.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "vm.json", meta.as_slice())?;
    tar.append_path_with_name(disk, files::DISK)?;
    let mut file = tar.into_inner()?.finish()?;
    file.flush()?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Reads an export into `dir` (its disk) and returns its metadata; a cut or foreign archive
/// is refused.
fn read_export(from: &Path, dir: &Path) -> Result<ExportMeta, String> {
    let file = std::fs::File::open(from).map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut meta = None;
    let mut disk = false;
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| format!("the export is damaged: {e}"))?;
        let name = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        match name.as_str() {
            "vm.json" => {
                let mut text = Vec::new();
                entry.read_to_end(&mut text).map_err(|e| e.to_string())?;
                meta = Some(
                    serde_json::from_slice::<ExportMeta>(&text)
                        .map_err(|e| format!("the export's vm.json is not valid: {e}"))?,
                );
            }
            n if n == files::DISK => {
                let mut out = std::fs::File::create(dir.join(files::DISK)).map_err(|e| e.to_string())?;
                std::io::copy(&mut entry, &mut out)
                    .map_err(|e| format!("the export is damaged or cut: {e}"))?;
                out.sync_all().map_err(|e| e.to_string())?;
                disk = true;
            }
            other => return Err(format!("the export holds an unexpected file '{other}': it is not a VM's export")),
        }
    }
    match (meta, disk) {
        (Some(meta), true) => Ok(meta),
        _ => Err("the export lacks vm.json or disk.qcow2: it is not a whole VM export".into()),
    }
}

#[async_trait]
impl Driver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend: true,
            exec: true,
            migrate: true,
            update: true,
            images: true,
            live_migrate: true,
            simulated: false,
            vm: Some(self.accel),
        }
    }

    async fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        validate_id(&spec.guest_id)?;
        let _held = self.hold(&spec.guest_id).await;
        if let Ok(r) = self.record(&spec.guest_id) {
            let state = self.state(&r.spec.guest_id).await;
            return Ok(self.info(&r, state));
        }
        let base = self.base_for(spec).await?;
        let size = spec.resources.disk_mb;
        let digest = base.details.summary.digest.to_string();
        self.make_guest(spec, &digest, async move |disk: PathBuf| {
            disks::overlay(&base, &disk, size).await
        })
        .await
    }

    async fn start(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.record(guest_id)?;
        match self.state(guest_id).await {
            GuestState::Running => Ok(()),
            GuestState::Suspended => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state: GuestState::Suspended,
                operation: "start".into(),
            }),
            GuestState::Stopped => {
                let qmp = self.file(guest_id, files::QMP);
                if self.pid(guest_id).is_some() {
                    if control::run_state(&qmp).await.as_deref() == Ok("postmigrate") {
                        // It sent itself away and the target did not take over: it goes on
                        // here, from its memory, as if it had never left.
                        return control::qmp(&qmp, qapi::qmp::cont {})
                            .await
                            .map(|_| ())
                            .map_err(permanent);
                    }
                    // A QEMU that never ran this VM (an incoming migration that did not come).
                    self.halt(guest_id, false).await?;
                }
                self.launch(&r).await
            }
        }
    }

    async fn stop(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        self.halt(guest_id, true).await
    }

    async fn suspend(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        match self.state(guest_id).await {
            GuestState::Suspended => Ok(()),
            GuestState::Running => control::qmp(&self.file(guest_id, files::QMP), qapi::qmp::stop {})
                .await
                .map(|_| ())
                .map_err(permanent),
            state => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "suspend".into(),
            }),
        }
    }

    async fn resume(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        match self.state(guest_id).await {
            GuestState::Running => Ok(()),
            GuestState::Suspended => control::qmp(&self.file(guest_id, files::QMP), qapi::qmp::cont {})
                .await
                .map(|_| ())
                .map_err(permanent),
            state => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "resume".into(),
            }),
        }
    }

    async fn reboot(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.running(guest_id, "reboot").await?;
        self.halt(guest_id, true).await?;
        self.launch(&r).await
    }

    async fn destroy(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        if self.record(guest_id).is_err() {
            return Ok(());
        }
        self.remove(guest_id).await
    }

    async fn update(&self, guest_id: &str, resources: &Resources) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let mut r = self.record(guest_id)?;
        let wanted = self
            .allocated()
            .minus(&r.spec.resources)
            .plus(resources);
        if !wanted.fits_in(&self.capacity) {
            return Err(self.over_capacity(wanted));
        }
        if self.state(guest_id).await != GuestState::Stopped {
            // The balloon gives memory back now (up to what the VM booted with); more memory
            // or CPUs than it booted with take effect at its next start.
            let bytes = (resources.memory_mb.max(128) << 20) as i64;
            control::qmp(
                &self.file(guest_id, files::QMP),
                qapi::qmp::balloon { value: bytes },
            )
            .await
            .map_err(permanent)?;
            if resources.memory_mb > r.spec.resources.memory_mb
                || resources.cpu_millis.div_ceil(1000) > r.spec.resources.cpu_millis.div_ceil(1000)
            {
                activity::report(&format!(
                    "VM {guest_id}: memory or CPUs beyond what it booted with take effect at its next start"
                ));
            }
        }
        r.spec.resources = *resources;
        self.save(&r)?;
        self.guests.lock().unwrap().insert(guest_id.to_string(), r);
        Ok(())
    }

    async fn export(&self, guest_id: &str) -> Result<GuestImage, DriverError> {
        let file = self.scratch();
        let size = self.export_to(guest_id, &file).await;
        let data = match size {
            Ok(_) => tokio::fs::read(&file).await.map_err(permanent),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&file).await;
        let r = self.record(guest_id)?;
        Ok(GuestImage {
            type_id: r.spec.type_id,
            data: data?,
        })
    }

    async fn import(&self, spec: &GuestSpec, image: &GuestImage) -> Result<GuestInfo, DriverError> {
        let file = self.scratch();
        tokio::fs::write(&file, &image.data)
            .await
            .map_err(permanent)?;
        let result = self.import_from(spec, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        result
    }

    async fn export_to(&self, guest_id: &str, to: &Path) -> Result<u64, DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.exportable(guest_id).await?;
        let disk = self.file(guest_id, files::DISK);
        let to = to.to_path_buf();
        tokio::task::spawn_blocking(move || {
            write_export(&ExportMeta { image: r.image }, &disk, &to)
                .map_err(|e| permanent(format!("cannot export guest {}: {e}", r.spec.guest_id)))
        })
        .await
        .map_err(permanent)?
    }

    async fn import_from(&self, spec: &GuestSpec, from: &Path) -> Result<GuestInfo, DriverError> {
        validate_id(&spec.guest_id)?;
        let _held = self.hold(&spec.guest_id).await;
        if let Ok(r) = self.record(&spec.guest_id) {
            let state = self.state(&r.spec.guest_id).await;
            return Ok(self.info(&r, state));
        }
        // Read the archive beside the guests first: nothing is reserved for a bad one.
        let staging = self.scratch();
        std::fs::create_dir_all(&staging).map_err(permanent)?;
        let (from, into) = (from.to_path_buf(), staging.clone());
        let meta = tokio::task::spawn_blocking(move || read_export(&from, &into))
            .await
            .map_err(permanent)?;
        let result = async {
            let meta = meta.map_err(|e| permanent(format!("cannot import guest {}: {e}", spec.guest_id)))?;
            let base = self
                .images
                .prepare(&ImageRef {
                    reference: meta.image.clone(),
                    digest: Some(meta.image.clone()),
                })
                .await?;
            let staged = staging.join(files::DISK);
            self.make_guest(spec, &meta.image, async move |disk: PathBuf| {
                tokio::fs::rename(&staged, &disk).await.map_err(permanent)?;
                disks::rebase(&base, &disk).await
            })
            .await
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        result
    }

    async fn exec(
        &self,
        guest_id: &str,
        script: &str,
        args: &[String],
    ) -> Result<ExecOutput, DriverError> {
        let _held = self.hold(guest_id).await;
        self.running(guest_id, "exec").await?;
        control::ga_exec(&self.file(guest_id, files::QGA), script, args, EXEC_LIMIT)
            .await
            .map_err(|e| permanent(format!("exec in VM {guest_id}: {e}")))
    }

    async fn status(&self, guest_id: &str) -> Result<Option<GuestInfo>, DriverError> {
        let Ok(r) = self.record(guest_id) else {
            return Ok(None);
        };
        let state = self.state(guest_id).await;
        Ok(Some(self.info(&r, state)))
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        let records: Vec<Record> = self.guests.lock().unwrap().values().cloned().collect();
        let mut all = Vec::with_capacity(records.len());
        for r in records {
            let state = self.state(&r.spec.guest_id).await;
            all.push(self.info(&r, state));
        }
        Ok(all)
    }

    async fn stats(&self) -> Result<ServerStats, DriverError> {
        let ids: Vec<String> = self.guests.lock().unwrap().keys().cloned().collect();
        let (mut memory, mut ticks, mut disk) = (0u64, 0u64, 0u64);
        for id in &ids {
            if let Some(pid) = self.pid(id) {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Fields after the command's closing parenthesis: utime and stime are 12th and
                // 13th there, rss the 22nd (pages).
                let fields: Vec<u64> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
                    .unwrap_or_default();
                ticks += fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
                memory += fields.get(21).copied().unwrap_or(0) * 4096;
            }
            disk += std::fs::metadata(self.file(id, files::DISK))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        // Clock ticks are 1/100 s on Linux.
        let cpu_ns = ticks * 10_000_000;
        let now = Instant::now();
        let cpu_millis = {
            let mut last = self.cpu_sample.lock().unwrap();
            let millis = match *last {
                Some((at, before)) if now > at => {
                    cpu_ns.saturating_sub(before) * 1000 / (now - at).as_nanos().max(1) as u64
                }
                _ => 0,
            };
            *last = Some((now, cpu_ns));
            millis
        };
        Ok(ServerStats {
            capacity: self.capacity,
            allocated: self.allocated(),
            guests: ids.len() as u64,
            used: Some(Resources {
                cpu_millis,
                memory_mb: memory >> 20,
                disk_mb: disk >> 20,
            }),
            images: self.images.held(),
        })
    }

    async fn logs(&self, guest_id: &str) -> Result<String, DriverError> {
        self.record(guest_id)?;
        Ok(tail(&self.file(guest_id, files::CONSOLE), LOG_TAIL))
    }

    async fn live_offer(&self, guest_id: &str) -> Result<LiveOffer, DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.running(guest_id, "live migration").await?;
        Ok(LiveOffer {
            image: r.image,
            disk_mb: self.disk_size_mb(guest_id).await?,
        })
    }

    async fn live_receive(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        validate_id(&spec.guest_id)?;
        let guest = &spec.guest_id;
        let _held = self.hold(guest).await;
        // The VM keeps its address (configured inside it): this server must be on its network.
        let ip = spec.ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        if !ip.is_some_and(|ip| self.cfg.subnet.contains(ip)) {
            return Err(permanent(format!(
                "server {} cannot receive VM {guest} live: the VM keeps its address {} and this                  server's network is {}; migrate it without --live, or to a server on its network",
                self.cfg.name,
                spec.ip.as_deref().unwrap_or("(none)"),
                self.cfg.subnet
            )));
        }
        let taken = self
            .guests
            .lock()
            .unwrap()
            .values()
            .any(|r| Some(r.ip) == ip && r.spec.guest_id != *guest);
        if taken {
            return Err(permanent(format!(
                "server {} cannot receive VM {guest} live: another guest here has its address {}",
                self.cfg.name,
                spec.ip.as_deref().unwrap_or_default()
            )));
        }
        if self.record(guest).is_ok() {
            // What an interrupted attempt left: the source still has the VM.
            self.remove(guest).await?;
        }
        let base = self
            .images
            .prepare(&ImageRef {
                reference: offer.image.clone(),
                digest: Some(offer.image.clone()),
            })
            .await?;
        let size = offer.disk_mb;
        self.make_guest(spec, &offer.image, async move |disk: PathBuf| {
            disks::overlay(&base, &disk, size).await
        })
        .await?;
        let received = async {
            let r = self.record(guest)?;
            self.spawn(&r, true).await?;
            live::receive(&self.file(guest, files::QMP), &self.cfg.migration_host)
                .await
                .map_err(|e| permanent(format!("VM {guest} cannot wait for its migration: {e}")))
        }
        .await;
        if received.is_err() {
            let _ = self.remove(guest).await;
        }
        received
    }

    async fn live_send(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        let _held = self.hold(guest_id).await;
        self.running(guest_id, "live migration").await?;
        let qmp = self.file(guest_id, files::QMP);
        let report = live::send(&qmp, guest_id, target)
            .await
            .map_err(|e| permanent(format!("live migration of VM {guest_id}: {e}")))?;
        activity::report(&format!(
            "VM {guest_id} sent in {} ms, paused {} ms for the last pass",
            report.total_ms, report.downtime_ms
        ));
        // The target holds it all; this QEMU stays, paused (`postmigrate`: stopped), until the
        // guest is destroyed here, or goes on if the target does not take over (`start`).
        Ok(report)
    }

    async fn live_finish(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        if self.pid(guest_id).is_none() {
            return Err(permanent(format!(
                "VM {guest_id} is not running here: its live migration did not reach this server"
            )));
        }
        let qmp = self.file(guest_id, files::QMP);
        // The source is done; this side may still be taking in the last bytes.
        let deadline = Instant::now() + Duration::from_secs(30);
        while control::run_state(&qmp).await.map_err(permanent)? == "inmigrate" {
            if Instant::now() > deadline {
                return Err(permanent(format!(
                    "VM {guest_id} is still receiving its migration after 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        live::received(&qmp).await.map_err(permanent)?;
        if control::paused(&qmp).await.map_err(permanent)? {
            control::qmp(&qmp, qapi::qmp::cont {})
                .await
                .map_err(permanent)?;
        }
        Ok(())
    }
}
