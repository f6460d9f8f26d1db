//! VM images on a server: pulled into the server's store like any image (from the core, or
//! found there) and unpacked once into a bootable base. A VM image's one layer holds its boot
//! files, made when the image was built (`image build --vm`): `disk.qcow2` (its root file
//! system as ext4), `vmlinuz`, `initrd.img` and `size-mb`; so every server boots the very same
//! disk bytes, verified by digest, and a VM's disk — a qcow2 overlay of that base, created in
//! milliseconds, holding only what the VM writes — means the same on any server.
//!
//! Layout: `vm-images/<hex>/{disk.qcow2, vmlinuz, initrd.img, size-mb}`; a base directory
//! exists only whole (unpacked beside it and renamed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud48_driver::{DriverError, ImageOrigin};
use cloud48_image::{Digest, ImageDetails, Store};
use cloud48_linux::images::{
    CacheBound, ImageSource, PeerSources, evict_unused, fetch, fetch_from, label,
};
use cloud48_model::ImageRef;

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
    peers: Option<PeerSources>,
    dir: PathBuf,
    /// One base is made (or evicted) at a time: two VMs of a new image wait for one.
    preparing: tokio::sync::Mutex<()>,
    /// Most bytes the images may take (stored plus their bases).
    bound: CacheBound,
}

fn permanent(e: impl std::fmt::Display) -> DriverError {
    DriverError::Permanent(e.to_string())
}

impl VmImages {
    /// Opens the store in `data_dir/images`; bases go to `data_dir/vm-images`; the images
    /// take at most `limit` bytes beyond those VMs use.
    pub fn open(
        name: &str,
        data_dir: &Path,
        (source, peers): (Option<ImageSource>, Option<PeerSources>),
        limit: Option<u64>,
    ) -> Result<VmImages, String> {
        let store = Store::open_server(data_dir)
            .map_err(|e| format!("cannot open the server's image store: {e}"))?;
        let dir = data_dir.join("vm-images");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(VmImages {
            name: name.into(),
            store: Arc::new(store),
            source,
            peers,
            dir,
            preparing: tokio::sync::Mutex::new(()),
            bound: CacheBound::new(limit),
        })
    }

    /// Removes the least recently used images no VM here is made of (not in `in_use`, by
    /// digest) while the images take more than the limit: a VM's disk is an overlay of its
    /// image's base, so a stopped VM's image stays too.
    pub async fn evict(self: &Arc<Self>, in_use: std::collections::HashSet<String>) {
        let Some(limit) = self.bound.due() else {
            return;
        };
        let _one = self.preparing.lock().await;
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            evict_unused(&this.store, &|d| this.base_dir(d), limit, &in_use);
        })
        .await;
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
            .iter()
            .map(label)
            .collect()
    }

    /// `Driver::fetch_image` for this server's store (bases are made when a VM needs one).
    pub async fn fetch_from(
        self: &Arc<Self>,
        from: &ImageOrigin,
        image: Option<&str>,
    ) -> Result<Vec<String>, DriverError> {
        let _one = self.preparing.lock().await;
        let (this, from, image) = (self.clone(), from.clone(), image.map(String::from));
        tokio::task::spawn_blocking(move || {
            let held = fetch_from(
                &this.store,
                &from,
                image.as_deref(),
                this.source.as_deref(),
                this.peers.as_ref(),
                &this.name,
            )?;
            this.bound.grew();
            Ok(held)
        })
        .await
        .map_err(permanent)?
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
                // Its time is when it was last used (what eviction goes by).
                let _ = std::fs::File::open(this.base_dir(&digest))
                    .and_then(|d| d.set_modified(std::time::SystemTime::now()));
                return Ok(base);
            }
            this.bound.grew();
            this.make(&details, &image.reference)?;
            this.made(digest.as_str()).ok_or_else(|| {
                permanent(format!(
                    "the base disk of image {} vanished",
                    image.reference
                ))
            })
        })
        .await
        .map_err(permanent)?
    }

    fn make(&self, details: &ImageDetails, name: &str) -> Result<(), DriverError> {
        let dest = self.base_dir(&details.summary.digest);
        let partial = dest.with_extension("unpacking");
        let _ = std::fs::remove_dir_all(&partial);
        cloud48_oci::unpack(&self.store, details, &partial, 0)
            .map_err(|e| permanent(format!("cannot unpack image {name}: {e}")))?;
        // `unpack` renamed its work to `partial` whole; what it holds decides.
        let whole = ["disk.qcow2", "vmlinuz", "initrd.img", "size-mb"]
            .iter()
            .all(|f| partial.join(f).is_file());
        if !whole {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(permanent(format!(
                "image {name} is not a VM image (it holds no disk.qcow2, vmlinuz and initrd.img): \
                 build its VM variant with `cloud48 image build --vm RECIPE`"
            )));
        }
        std::fs::rename(&partial, &dest).map_err(permanent)
    }
}

/// The VM variant of `image`: `NAME-vm` with the same tag (a digest pins the container
/// image, not its variant, so it is dropped); a reference to a VM image already is itself.
pub fn vm_variant(image: &ImageRef) -> ImageRef {
    let Ok(name) = image.reference.parse::<cloud48_image::Name>() else {
        return image.clone();
    };
    if name.repository().ends_with("-vm") {
        return image.clone();
    }
    ImageRef {
        reference: format!("{}-vm:{}", name.repository(), name.tag()),
        digest: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_runs_the_vm_variant_of_its_image() {
        let r = |reference: &str, digest: Option<&str>| ImageRef {
            reference: reference.into(),
            digest: digest.map(String::from),
        };
        assert_eq!(
            vm_variant(&r("cloud48/nginx", None)),
            r("cloud48/nginx-vm:latest", None)
        );
        assert_eq!(
            vm_variant(&r("cloud48/tomcat:10", Some("sha256:ab"))),
            r("cloud48/tomcat-vm:10", None)
        );
        assert_eq!(
            vm_variant(&r("cloud48/nginx-vm:1", Some("sha256:cd"))),
            r("cloud48/nginx-vm:1", Some("sha256:cd"))
        );
    }
}
