//! OCI runtime bundles: the `config.json` runc reads, generated with `oci-spec`'s types, and the
//! overlay each container's root is.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    UserBuilder, get_default_namespaces, get_rootless_mounts,
};

use crate::OciError;

/// The ids a container's user namespace maps: container ids `0..size` are host ids
/// `host..host + size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First host id.
    pub host: u32,
    /// How many ids.
    pub size: u32,
}

/// The default mapping: 65,536 ids from host id 100,000, which image roots are shifted into.
pub const DEFAULT_ID_MAP: IdMap = IdMap {
    host: 100_000,
    size: 65_536,
};

/// What a container's bundle says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The root file system (the container's overlay).
    pub rootfs: PathBuf,
    /// The process: program and arguments.
    pub args: Vec<String>,
    /// Its environment (`NAME=value`).
    pub env: Vec<String>,
    /// Its working directory.
    pub cwd: String,
    /// The container's host name.
    pub hostname: String,
    /// A network namespace to join (`/run/netns/NAME`); `None` makes a new, empty one, owned
    /// by the container's user namespace, which the caller configures between `create` and
    /// `start` (`runc exec` cannot enter a network namespace the user namespace does not own).
    pub netns: Option<PathBuf>,
    /// Its user namespace's mapping.
    pub id_map: IdMap,
    /// Memory limit in MiB (0: none).
    pub memory_mb: u64,
    /// CPU in thousandths of a core (0: no limit).
    pub cpu_millis: u64,
    /// Most processes (0: no limit).
    pub pids: i64,
    /// Directories bind-mounted into the container: (host path, container path).
    pub binds: Vec<(PathBuf, String)>,
    /// The cgroup path (`/cloud48/ID`).
    pub cgroup: String,
    /// A CRIU configuration file runc hands CRIU when it checkpoints or restores the
    /// container (the `org.criu.config` annotation); `None`: CRIU's defaults.
    pub criu_config: Option<PathBuf>,
}

/// Capabilities of a container's processes: Docker's default set, which nginx, Tomcat and
/// MariaDB need (chown, setuid, binding port 80); all are confined to the user namespace.
const CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn spec_error(e: oci_spec::OciSpecError) -> OciError {
    OciError::Bundle(format!(
        "the container's OCI configuration is incomplete: {e}"
    ))
}

impl Bundle {
    /// The OCI runtime configuration of this bundle.
    pub fn spec(&self) -> Result<Spec, OciError> {
        let caps: std::collections::HashSet<Capability> = CAPABILITIES.iter().copied().collect();
        let process = ProcessBuilder::default()
            .terminal(false)
            .user(
                UserBuilder::default()
                    .uid(0u32)
                    .gid(0u32)
                    .build()
                    .map_err(spec_error)?,
            )
            .args(self.args.clone())
            .env(self.env.clone())
            .cwd(self.cwd.clone())
            .no_new_privileges(false)
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps)
                    .build()
                    .map_err(spec_error)?,
            )
            .build()
            .map_err(spec_error)?;
        let mut namespaces: Vec<LinuxNamespace> = get_default_namespaces()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
        if let Some(p) = &self.netns {
            net = net.path(p.clone());
        }
        namespaces.push(net.build().map_err(spec_error)?);
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()
                .map_err(spec_error)?,
        );
        let map = LinuxIdMappingBuilder::default()
            .host_id(self.id_map.host)
            .container_id(0u32)
            .size(self.id_map.size)
            .build()
            .map_err(spec_error)?;
        let mut resources = LinuxResourcesBuilder::default();
        if self.memory_mb > 0 {
            let bytes = (self.memory_mb * 1024 * 1024) as i64;
            resources = resources.memory(
                LinuxMemoryBuilder::default()
                    .limit(bytes)
                    .swap(bytes)
                    .build()
                    .map_err(spec_error)?,
            );
        }
        if self.cpu_millis > 0 {
            let period = 100_000u64;
            resources = resources.cpu(
                LinuxCpuBuilder::default()
                    .period(period)
                    .quota((self.cpu_millis * period / 1000) as i64)
                    .build()
                    .map_err(spec_error)?,
            );
        }
        if self.pids > 0 {
            resources = resources.pids(
                LinuxPidsBuilder::default()
                    .limit(self.pids)
                    .build()
                    .map_err(spec_error)?,
            );
        }
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .uid_mappings(vec![map])
            .gid_mappings(vec![map])
            .resources(resources.build().map_err(spec_error)?)
            .cgroups_path(PathBuf::from(&self.cgroup))
            .masked_paths(
                [
                    "/proc/acpi",
                    "/proc/kcore",
                    "/proc/keys",
                    "/proc/latency_stats",
                    "/proc/timer_list",
                    "/proc/timer_stats",
                    "/proc/sched_debug",
                    "/sys/firmware",
                    "/proc/scsi",
                ]
                .map(String::from)
                .to_vec(),
            )
            .readonly_paths(
                [
                    "/proc/asound",
                    "/proc/bus",
                    "/proc/fs",
                    "/proc/irq",
                    "/proc/sys",
                    "/proc/sysrq-trigger",
                ]
                .map(String::from)
                .to_vec(),
            )
            .build()
            .map_err(spec_error)?;
        // The rootless set, no cgroup file system. /sys: a sysfs of the container's own network
        // namespace (CRIU cannot restore a bind of the host's), or with a namespace the user
        // namespace does not own, which cannot mount one, the host's bound read-only.
        let mut mounts = get_rootless_mounts();
        if self.netns.is_none() {
            for m in &mut mounts {
                if m.destination() == Path::new("/sys") {
                    *m = MountBuilder::default()
                        .destination("/sys")
                        .typ("sysfs")
                        .source("sysfs")
                        .options(
                            ["nosuid", "noexec", "nodev", "ro"]
                                .map(String::from)
                                .to_vec(),
                        )
                        .build()
                        .map_err(spec_error)?;
                }
            }
        }
        for (host, container) in &self.binds {
            mounts.push(
                MountBuilder::default()
                    .destination(container)
                    .typ("bind")
                    .source(host.clone())
                    .options(vec!["rbind".to_string(), "rw".to_string()])
                    .build()
                    .map_err(spec_error)?,
            );
        }
        let mut spec = Spec::default();
        spec.set_process(Some(process));
        spec.set_root(Some(
            RootBuilder::default()
                .path(self.rootfs.clone())
                .readonly(false)
                .build()
                .map_err(spec_error)?,
        ));
        spec.set_hostname(Some(self.hostname.clone()));
        if let Some(conf) = &self.criu_config {
            spec.set_annotations(Some(
                [(
                    "org.criu.config".to_string(),
                    conf.to_string_lossy().into_owned(),
                )]
                .into(),
            ));
        }
        spec.set_mounts(Some(mounts));
        spec.set_linux(Some(linux));
        Ok(spec)
    }

    /// Writes `config.json` into the bundle directory `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), OciError> {
        std::fs::create_dir_all(dir)
            .map_err(OciError::io(format!("creating {}", dir.display())))?;
        self.spec()?
            .save(dir.join("config.json"))
            .map_err(|e| OciError::Bundle(format!("writing {}/config.json: {e}", dir.display())))
    }
}

fn cstr(p: &Path) -> Result<CString, OciError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| OciError::Bundle(format!("{} contains a NUL byte", p.display())))
}

/// Mounts an overlay at `merged`: `lower` read-only below, `upper` (the container's own
/// files) above, `work` its scratch space (same file system as `upper`).
pub fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<(), OciError> {
    for d in [upper, work, merged] {
        std::fs::create_dir_all(d).map_err(OciError::io(format!("creating {}", d.display())))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let options = CString::new(options)
        .map_err(|_| OciError::Bundle("overlay paths contain a NUL byte".into()))?;
    let (fstype, target) = (CString::new("overlay").expect("no NUL"), cstr(merged)?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(OciError::Io {
            context: format!("mounting the overlay at {}", merged.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// The mount points strictly below `dir`, deepest first (as `/proc/self/mountinfo` names
/// them; mount points with spaces or other escaped characters are skipped).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| !m.contains('\\'))
        .map(PathBuf::from)
        .filter(|m| m != dir && m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Unmounts everything mounted below `dir` (a server's data directory a test or a lab is
/// done with: its guests' overlays would keep the directory from being removed); tries every
/// mount and returns the first failure.
pub fn unmount_under(dir: &Path) -> Result<(), OciError> {
    let mut first = Ok(());
    for m in mounts_under(dir) {
        if let Err(e) = unmount(&m)
            && first.is_ok()
        {
            first = Err(e);
        }
    }
    first
}

/// Unmounts `path` (lazily, so a process still inside does not block it); nothing mounted is
/// not an error.
pub fn unmount(path: &Path) -> Result<(), OciError> {
    if !is_mounted(path) {
        return Ok(());
    }
    let target = cstr(path)?;
    // SAFETY: `target` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(OciError::Io {
            context: format!("unmounting {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn mounts_under_a_directory_are_found_deepest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (outer, inner) = (dir.path().join("a"), dir.path().join("a/b"));
        std::fs::create_dir_all(&outer).unwrap();
        let tmpfs = |at: &Path| {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "mount a tmpfs at {} (run as root)", at.display());
        };
        tmpfs(&outer);
        std::fs::create_dir_all(&inner).unwrap();
        tmpfs(&inner);
        assert_eq!(mounts_under(dir.path()), vec![inner.clone(), outer.clone()]);
        assert_eq!(
            mounts_under(&inner),
            Vec::<PathBuf>::new(),
            "strictly below"
        );
        unmount_under(dir.path()).unwrap();
        assert!(!is_mounted(&outer) && !is_mounted(&inner));
        assert_eq!(mounts_under(dir.path()), Vec::<PathBuf>::new());
    }

    fn bundle(netns: Option<PathBuf>) -> Bundle {
        Bundle {
            rootfs: "/r".into(),
            args: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            hostname: "h".into(),
            netns,
            id_map: DEFAULT_ID_MAP,
            memory_mb: 0,
            cpu_millis: 0,
            pids: 0,
            binds: vec![],
            cgroup: "/c/h".into(),
            criu_config: None,
        }
    }

    fn sys_type(b: &Bundle) -> Option<String> {
        let spec = b.spec().unwrap();
        spec.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .and_then(|m| m.typ().clone())
    }

    #[test]
    fn a_container_with_its_own_network_gets_its_own_sysfs_else_the_hosts_read_only() {
        // Its own: what CRIU can restore.
        assert_eq!(sys_type(&bundle(None)).as_deref(), Some("sysfs"));
        // Another's network namespace: its user namespace could not mount a sysfs of it.
        assert_ne!(
            sys_type(&bundle(Some("/run/netns/x".into()))).as_deref(),
            Some("sysfs")
        );
    }
}
