//! Guests that run their image, started by runc: the image made ready for a new guest, the
//! bundle a guest runs with, its root (overlay, `/etc/hosts`, log) made ready, its launch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cloud48_driver::{DriverError, GuestSpec};

use crate::network::{self, GuestNet};
use crate::{LinuxDriver, Record, cgroups, images, permanent, ready, templates};

impl LinuxDriver {
    /// The image a new guest of `spec` runs, made ready here (pulled, unpacked), when this
    /// server runs images and the workload names one.
    pub(crate) async fn image_for(&self, spec: &GuestSpec) -> Result<Option<String>, DriverError> {
        let (Some(images), Some(image)) = (&self.images, &spec.workload.image) else {
            return Ok(None);
        };
        let digest = images.prepare(image).await?.summary.digest.to_string();
        // Room for it: images no container runs go, least recently used first.
        let mut in_use: std::collections::HashSet<String> = self
            .guests
            .lock()
            .unwrap()
            .values()
            .filter_map(|r| r.image.clone())
            .collect();
        in_use.insert(digest.clone());
        images.evict(in_use).await;
        Ok(Some(digest))
    }

    /// What runs guest `r` on image `digest` (pulled and unpacked again if the server's cache
    /// lost it since the guest was made): its bundle, the `/etc/hosts` it gets, its image's
    /// unpacked root (its overlay's lower directory), and runc.
    pub(crate) async fn image_bundle(
        &self,
        r: &Record,
        digest: &str,
    ) -> Result<(cloud48_oci::Bundle, String, PathBuf, cloud48_oci::Runc), DriverError> {
        let guest = &r.spec.guest_id;
        let images = self.images.clone().ok_or_else(|| {
            permanent(format!(
                "container {guest} runs image {digest}, but this agent runs no images; start it with --images on (runc installed)"
            ))
        })?;
        let reference = cloud48_model::ImageRef {
            reference: r
                .spec
                .workload
                .image
                .as_ref()
                .map(|i| i.reference.clone())
                .unwrap_or_else(|| digest.to_string()),
            digest: Some(digest.to_string()),
        };
        let details = images.prepare(&reference).await?;
        let dir = self.dir(guest);
        let w = &r.spec.workload;
        let vars = BTreeMap::from([("id", guest.to_string()), ("ip", r.ip.to_string())]);
        let command: Vec<String> = w
            .command
            .iter()
            .map(|s| templates::fill(s, &vars))
            .collect();
        let bundle = cloud48_oci::Bundle {
            rootfs: dir.join("merged"),
            args: images::process_args(&command, &details),
            env: images::process_env(&details, &w.env, guest),
            cwd: w
                .workdir
                .clone()
                .or_else(|| details.workdir.clone())
                .unwrap_or_else(|| "/".into()),
            hostname: guest.chars().take(63).collect(),
            netns: None,
            id_map: cloud48_oci::DEFAULT_ID_MAP,
            memory_mb: r.spec.resources.memory_mb,
            cpu_millis: r.spec.resources.cpu_millis,
            pids: i64::from(cgroups::PIDS_MAX),
            // Its name resolves to its address (Java and MariaDB look their own host up).
            binds: vec![(dir.join("hosts"), "/etc/hosts".into())],
            cgroup: format!("/{}/{guest}", self.cfg.prefix),
            criu_config: self
                .live
                .is_ok()
                .then(|| self.cfg.data_dir.join(crate::live::CRIU_CONFIG)),
        };
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
            r.ip, bundle.hostname
        );
        if bundle.args.is_empty() {
            return Err(permanent(format!(
                "neither the type of {guest} nor its image {} says what to run",
                reference.reference
            )));
        }
        let lower = images.rootfs(&details.summary.digest);
        Ok((bundle, hosts, lower, images.runc.clone()))
    }

    /// Starts a guest that runs its image: its overlay mounted, its bundle written, runc
    /// creates it, its network namespace gets the veth, runc starts it.
    pub(crate) async fn launch_image(&self, r: &Record, digest: &str) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let (bundle, hosts, lower, runc) = self.image_bundle(r, digest).await?;
        let (dir, started_with) = (self.dir(guest), runc.clone());
        let id = guest.to_string();
        let created = tokio::task::spawn_blocking(move || {
            runc.delete(&id, true)?;
            ready_root(&dir, &lower, &hosts, &bundle)?;
            let owner = bundle.id_map.host;
            runc.create(&id, &dir.join("bundle"), &dir.join("console.log"), owner)
        })
        .await
        .map_err(permanent)?;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.halt(guest).await;
                return Err(permanent(format!("cannot create container {guest}: {e}")));
            }
        };
        let net = GuestNet::new(&self.cfg.prefix, guest);
        let started = async {
            network::attach_pid(&net, &self.cfg.bridge, &self.cfg.subnet, r.ip, pid)
                .await
                .map_err(permanent)?;
            let id = guest.to_string();
            tokio::task::spawn_blocking(move || started_with.start(&id))
                .await
                .map_err(permanent)?
                .map_err(|e| permanent(format!("cannot start container {guest}: {e}")))
        }
        .await;
        if let Err(e) = started {
            let _ = self.halt(guest).await;
            return Err(e);
        }
        self.wait_ready(r, &ready::Probe::of(&r.spec.workload), None, None)
            .await
    }
}

/// Makes what runc needs to run (or restore) a guest in its directory `dir`: its overlay of
/// `lower` mounted (unless it is), its `/etc/hosts`, a log its root may reopen, its bundle.
pub(crate) fn ready_root(
    dir: &Path,
    lower: &Path,
    hosts: &str,
    bundle: &cloud48_oci::Bundle,
) -> Result<(), cloud48_oci::OciError> {
    let merged = dir.join("merged");
    if !cloud48_oci::is_mounted(&merged) {
        cloud48_oci::mount_overlay(lower, &dir.join("fs"), &dir.join("work"), &merged)?;
    }
    std::fs::write(dir.join("hosts"), hosts).map_err(cloud48_oci::OciError::io(
        "writing the container's /etc/hosts",
    ))?;
    // Its output is its own: a program that reopens /dev/stdout (nginx's logs) must be
    // allowed to.
    let log = dir.join("console.log");
    let owner = cloud48_oci::DEFAULT_ID_MAP.host;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|_| std::os::unix::fs::chown(&log, Some(owner), Some(owner)))
        .map_err(cloud48_oci::OciError::io("giving the container its log"))?;
    bundle.write(&dir.join("bundle"))
}

/// Gives a guest's upper directory to its root (the first id of its user namespace's range).
pub(crate) fn own_root(fs: &Path) -> Result<(), DriverError> {
    let id = cloud48_oci::DEFAULT_ID_MAP.host;
    std::os::unix::fs::chown(fs, Some(id), Some(id)).map_err(|e| {
        permanent(format!(
            "cannot give {} to the container's root: {e}",
            fs.display()
        ))
    })
}
