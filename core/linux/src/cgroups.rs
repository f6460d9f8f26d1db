//! Control groups of guests: limits, membership, freezing, usage. Works on cgroup v2
//! (unified) and on the v1 hierarchies (memory, cpu, cpuacct, pids, freezer).

use std::path::{Path, PathBuf};

use cloud48_model::Resources;

/// Processes one guest may run at most.
pub(crate) const PIDS_MAX: u32 = 1024;
/// Period of the cpu bandwidth limit, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroup layout of this machine.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v2: one tree.
    V2 {
        /// The directory that holds the guests' groups.
        parent: PathBuf,
    },
    /// cgroup v1: one tree per controller.
    V1 {
        /// `/sys/fs/cgroup`.
        root: PathBuf,
        /// The group name prefix under each controller (`cloud48`).
        prefix: String,
    },
}

const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

impl Cgroups {
    /// Detects the layout and prepares the parent group `prefix`.
    pub fn detect(prefix: &str) -> Result<Cgroups, String> {
        let root = PathBuf::from("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            let parent = root.join(prefix);
            std::fs::create_dir_all(&parent).map_err(|e| privileges(&parent, e))?;
            let _ = write(&root.join("cgroup.subtree_control"), "+memory +cpu +pids");
            write(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
            return Ok(Cgroups::V2 { parent });
        }
        for c in V1_CONTROLLERS {
            let dir = root.join(c);
            if !dir.exists() {
                return Err(format!(
                    "the cgroup controller {c} is not mounted at {}; the linux driver needs memory, cpu, cpuacct, pids and freezer (v1) or cgroup v2 (inside `ip netns exec`, which remounts /sys, start the agent with `nsenter --net=/run/netns/NAME` instead)",
                    dir.display()
                ));
            }
            let parent = dir.join(prefix);
            std::fs::create_dir_all(&parent).map_err(|e| privileges(&parent, e))?;
        }
        Ok(Cgroups::V1 {
            root,
            prefix: prefix.to_string(),
        })
    }

    fn dirs(&self, guest: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { parent } => vec![parent.join(guest)],
            Cgroups::V1 { root, prefix } => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(prefix).join(guest))
                .collect(),
        }
    }

    fn dir(&self, controller: &str, guest: &str) -> PathBuf {
        match self {
            Cgroups::V2 { parent } => parent.join(guest),
            Cgroups::V1 { root, prefix } => root.join(controller).join(prefix).join(guest),
        }
    }

    /// Creates the guest's groups with its limits.
    pub fn create(&self, guest: &str, r: &Resources) -> Result<(), String> {
        for d in self.dirs(guest) {
            std::fs::create_dir_all(&d).map_err(|e| privileges(&d, e))?;
        }
        self.limit(guest, r)
    }

    /// Sets memory, cpu and pids limits.
    pub fn limit(&self, guest: &str, r: &Resources) -> Result<(), String> {
        let memory = (r.memory_mb << 20).to_string();
        let quota = (r.cpu_millis.max(1) * CPU_PERIOD_US / 1000).max(1000);
        match self {
            Cgroups::V2 { .. } => {
                let d = self.dir("", guest);
                write(&d.join("memory.max"), &memory)?;
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&d.join("pids.max"), &PIDS_MAX.to_string())
            }
            Cgroups::V1 { .. } => {
                // With swap accounting, memory+swap is held at the memory limit (no swap, as
                // runc sets it for image containers); the kernel refuses a memory limit above
                // memory+swap, so the one that grows is written first.
                let mem = self.dir("memory", guest);
                let (limit, memsw) = (
                    mem.join("memory.limit_in_bytes"),
                    mem.join("memory.memsw.limit_in_bytes"),
                );
                let current: u64 = std::fs::read_to_string(&limit)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(u64::MAX);
                let swap_accounted = memsw.exists();
                if swap_accounted && r.memory_mb << 20 > current {
                    write(&memsw, &memory)?;
                }
                write(&limit, &memory)?;
                if swap_accounted {
                    write(&memsw, &memory)?;
                }
                write(
                    &self.dir("cpu", guest).join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(
                    &self.dir("cpu", guest).join("cpu.cfs_quota_us"),
                    &quota.to_string(),
                )?;
                write(
                    &self.dir("pids", guest).join("pids.max"),
                    &PIDS_MAX.to_string(),
                )
            }
        }
    }

    /// The `cgroup.procs` files a process writes its pid into to join the guest.
    pub fn procs_files(&self, guest: &str) -> Vec<PathBuf> {
        self.dirs(guest)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Processes of the guest.
    pub fn pids(&self, guest: &str) -> Vec<i32> {
        std::fs::read_to_string(self.dir("pids", guest).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Freezes or thaws the guest and waits until the kernel is done.
    pub async fn freeze(&self, guest: &str, frozen: bool) -> Result<(), String> {
        // A busy machine may need several requests (v1 stays FREEZING while a task cannot stop).
        for attempt in 0..1000 {
            if attempt % 50 == 0 {
                self.request_freeze(guest, frozen)?;
            }
            if self.frozen(guest) == frozen {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(2 + attempt / 100)).await;
        }
        Err(format!(
            "the kernel did not {} guest {guest} within several seconds; try again",
            if frozen { "freeze" } else { "thaw" }
        ))
    }

    /// Asks the kernel to freeze or thaw the guest (it may take a while; see `freeze`).
    pub fn request_freeze(&self, guest: &str, frozen: bool) -> Result<(), String> {
        match self {
            Cgroups::V2 { .. } => write(
                &self.dir("", guest).join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
            Cgroups::V1 { .. } => write(
                &self.dir("freezer", guest).join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
        }
    }

    /// True when the guest is frozen.
    pub fn frozen(&self, guest: &str) -> bool {
        match self {
            Cgroups::V2 { .. } => {
                std::fs::read_to_string(self.dir("", guest).join("cgroup.events"))
                    .map(|s| s.lines().any(|l| l.trim() == "frozen 1"))
                    .unwrap_or(false)
            }
            Cgroups::V1 { .. } => {
                std::fs::read_to_string(self.dir("freezer", guest).join("freezer.state"))
                    .map(|s| s.trim() == "FROZEN")
                    .unwrap_or(false)
            }
        }
    }

    /// Memory in bytes and cpu time in nanoseconds the guest has used.
    pub fn usage(&self, guest: &str) -> (u64, u64) {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        match self {
            Cgroups::V2 { .. } => {
                let d = self.dir("", guest);
                let mem = read(d.join("memory.current")).trim().parse().unwrap_or(0);
                let cpu_us: u64 = read(d.join("cpu.stat"))
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("usage_usec ")
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0);
                (mem, cpu_us * 1000)
            }
            Cgroups::V1 { .. } => (
                read(self.dir("memory", guest).join("memory.usage_in_bytes"))
                    .trim()
                    .parse()
                    .unwrap_or(0),
                read(self.dir("cpuacct", guest).join("cpuacct.usage"))
                    .trim()
                    .parse()
                    .unwrap_or(0),
            ),
        }
    }

    /// Removes the guest's (empty) groups.
    pub fn remove(&self, guest: &str) {
        for d in self.dirs(guest) {
            let _ = std::fs::remove_dir(&d);
        }
    }

    /// Removes the parent groups (when the driver is torn down and holds no guest).
    pub fn remove_parent(&self) {
        match self {
            Cgroups::V2 { parent } => {
                let _ = std::fs::remove_dir(parent);
            }
            Cgroups::V1 { root, prefix } => {
                for c in V1_CONTROLLERS {
                    let _ = std::fs::remove_dir(root.join(c).join(prefix));
                }
            }
        }
    }

    /// Names of every guest group under the parent.
    pub fn guests(&self) -> Vec<String> {
        let parent = match self {
            Cgroups::V2 { parent } => parent.clone(),
            Cgroups::V1 { root, prefix } => root.join("pids").join(prefix),
        };
        std::fs::read_dir(parent)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn privileges(path: &Path, e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            "cannot create the cgroup {}: permission denied; the linux driver must run as root (or with CAP_SYS_ADMIN)",
            path.display()
        )
    } else {
        format!("cannot create the cgroup {}: {e}", path.display())
    }
}
