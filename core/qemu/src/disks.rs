//! VM images on a server: pulled into the server's store like any image (from the core, or
//! found there), then made once per image into a bootable base: its root file system as an
//! ext4 disk in qcow2 (`mkfs.ext4 -d`, `qemu-img convert`), its kernel and initramfs beside it.
//! A VM's own disk is a qcow2 overlay of that base: created in milliseconds, holding only what
//! the VM writes.
//!
//! Layout: `vm-images/<hex>/{disk.qcow2, vmlinuz, initrd.img}`; a base directory exists only
//! whole (built beside it and renamed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cloud48_driver::DriverError;
use cloud48_image::{Digest, ImageDetails, Store};
use cloud48_linux::images::{ImageSource, fetch};
use cloud48_model::ImageRef;

/// Extra room a base disk has beyond its files (the VM's disk may be larger still: its init
/// grows the file system to the disk).
const HEADROOM_MB: u64 = 256;

/// A VM image made ready to boot.
#[derive(Debug, Clone)]
pub struct Base {
    /// What the image says of itself.
    pub details: ImageDetails,
    /// Its disk (qcow2), the backing file of its VMs' disks.
    pub disk: PathBuf,
    /// Its kernel.
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initrd: PathBuf,
    /// The disk's size, MiB.
    pub size_mb: u64,
}

/// A server's VM images.
pub struct VmImages {
    name: String,
    store: Arc<Store>,
    source: Option<ImageSource>,
    dir: PathBuf,
    /// One base is made at a time: two VMs of a new image wait for one.
    preparing: tokio::sync::Mutex<()>,
}

fn permanent(e: impl std::fmt::Display) -> DriverError {
    DriverError::Permanent(e.to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), DriverError> {
    let out = cmd
        .output()
        .map_err(|e| permanent(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(permanent(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl VmImages {
    /// Opens the store in `data_dir/images`; bases go to `data_dir/vm-images`.
    pub fn open(
        name: &str,
        data_dir: &Path,
        source: Option<ImageSource>,
    ) -> Result<VmImages, String> {
        let store = Store::open(data_dir.join("images"))
            .map_err(|e| format!("cannot open the server's image store: {e}"))?;
        let dir = data_dir.join("vm-images");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(VmImages {
            name: name.into(),
            store: Arc::new(store),
            source,
            dir,
            preparing: tokio::sync::Mutex::new(()),
        })
    }

    /// The server's image store (its agent serves it to peers).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The images this server holds (`name@digest`).
    pub fn held(&self) -> Vec<String> {
        self.store
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|s| match &s.name {
                Some(n) => format!("{n}@{}", s.digest),
                None => s.digest.to_string(),
            })
            .collect()
    }

    fn base_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// The base of the image with `digest`, if it was made.
    pub fn made(&self, digest: &str) -> Option<Base> {
        let digest: Digest = digest.parse().ok()?;
        let details = self.store.show(digest.as_str()).ok()?;
        let dir = self.base_dir(&digest);
        let size = std::fs::read_to_string(dir.join("size-mb")).ok()?;
        Some(Base {
            details,
            disk: dir.join("disk.qcow2"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            size_mb: size.trim().parse().ok()?,
        })
    }

    /// Makes `image` ready to boot here: fetched unless the store has it, its base made
    /// unless it was.
    pub async fn prepare(self: &Arc<Self>, image: &ImageRef) -> Result<Base, DriverError> {
        let _one = self.preparing.lock().await;
        let this = self.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            let details = fetch(&this.store, this.source.as_deref(), &image, &this.name)?;
            let digest = details.summary.digest.clone();
            if let Some(base) = this.made(digest.as_str()) {
                return Ok(base);
            }
            this.make(&details, &image.reference)?;
            this.made(digest.as_str()).ok_or_else(|| {
                permanent(format!("the base disk of image {} vanished", image.reference))
            })
        })
        .await
        .map_err(permanent)?
    }

    fn make(&self, details: &ImageDetails, name: &str) -> Result<(), DriverError> {
        let dest = self.base_dir(&details.summary.digest);
        let partial = dest.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(permanent)?;
        let root = partial.join("root");
        let made = (|| {
            cloud48_oci::unpack(&self.store, details, &root, 0)
                .map_err(|e| permanent(format!("cannot unpack image {name}: {e}")))?;
            if !root.join("sbin/cloud48-init").is_file() {
                return Err(permanent(format!(
                    "image {name} is not a VM image (it has no /sbin/cloud48-init): build its \
                     VM variant with `cloud48 image build --vm RECIPE`"
                )));
            }
            let newest = |prefix: &str| {
                let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("boot"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .map(|e| e.path())
                    .collect();
                found.sort();
                found.pop().ok_or_else(|| {
                    permanent(format!(
                        "image {name} has no /boot/{prefix}*: a VM image needs Debian's kernel \
                         and initramfs (`cloud48 image build --vm` installs them)"
                    ))
                })
            };
            std::fs::copy(newest("vmlinuz-")?, partial.join("vmlinuz")).map_err(permanent)?;
            std::fs::copy(newest("initrd.img-")?, partial.join("initrd.img"))
                .map_err(permanent)?;
            let used_mb = cloud48_linux::images::dir_size(&root) >> 20;
            let size_mb = used_mb + used_mb / 4 + HEADROOM_MB;
            let raw = partial.join("disk.raw");
            run(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", "root", "-d"])
                    .arg(&root)
                    .arg(&raw)
                    .arg(format!("{size_mb}M")),
                &format!("making the disk of image {name} (mkfs.ext4 -d)"),
            )?;
            run(
                Command::new("qemu-img")
                    .args(["convert", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(partial.join("disk.qcow2")),
                &format!("converting the disk of image {name} (qemu-img convert)"),
            )?;
            let _ = std::fs::remove_file(&raw);
            std::fs::write(partial.join("size-mb"), size_mb.to_string()).map_err(permanent)
        })();
        let _ = std::fs::remove_dir_all(&root);
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
            return made;
        }
        std::fs::rename(&partial, &dest).map_err(permanent)
    }
}

/// Creates `disk`, a qcow2 overlay of `base` of `size_mb` (at least the base's size).
pub async fn overlay(base: &Base, disk: &Path, size_mb: u64) -> Result<(), DriverError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base.disk)
        .arg(disk)
        .arg(format!("{}M", size_mb.max(base.size_mb)))
        .output()
        .await
        .map_err(|e| {
            permanent(format!(
                "cannot run qemu-img (Debian: apt-get install qemu-utils): {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(permanent(format!(
            "qemu-img create of {} failed: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Points the overlay `disk` at `base` (its bytes are the same image's, at another path on
/// this server): rewrites the header only.
pub async fn rebase(base: &Base, disk: &Path) -> Result<(), DriverError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-F", "qcow2", "-b"])
        .arg(&base.disk)
        .arg(disk)
        .output()
        .await
        .map_err(|e| permanent(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(permanent(format!(
            "qemu-img rebase of {} failed: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
