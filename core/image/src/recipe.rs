//! `image build`: a Debian-based image from a short recipe, built on this machine with Debian's
//! own tools (debootstrap, then apt-get in a chroot) and no registry, cached by the recipe's
//! hash.
//!
//! Cache layout (a fixed directory outside any checkout, `/var/cache/cloud48` by default):
//! `debs/` the downloaded packages; `rootfs/<base>/` a minimal Debian per suite and mirror;
//! `images/<key>/` the finished image of a recipe as an OCI layout, where `<key>` hashes the
//! recipe, every file it copies and this builder's version. A build whose key is cached is an
//! import of that layout.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{ImageError, ImageSummary, Name, NewImage, Store, host_architecture};

/// Changes whenever the builder would make a different image from the same recipe.
const BUILDER_VERSION: &str = "1";

/// The mirror debootstrap and apt use unless told otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// An image recipe (TOML).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image's name (`cloud48/nginx`).
    pub name: Name,
    /// Debian suite of the base (`bookworm`).
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Debian packages to install (without recommends).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Files to put in the image, by absolute path.
    #[serde(default)]
    pub files: BTreeMap<String, FileSpec>,
    /// Shell commands run in the image's root (`/bin/sh -c`) after packages and files.
    #[serde(default)]
    pub run: Vec<String>,
    /// The process's entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The process's command (the entrypoint's arguments).
    #[serde(default)]
    pub command: Vec<String>,
    /// The process's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The process's working directory.
    pub workdir: Option<String>,
    /// Ports the image serves on (`80/tcp`).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Builds a virtual machine's image: the recipe's root file system plus Debian's kernel and
    /// initramfs, QEMU's guest agent and Cloud48's guest init (`image build --vm` sets it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vm: bool,
}

/// The label a VM image carries (its value: the version of the guest init inside).
pub const VM_LABEL: &str = "org.cloud48.vm";

/// PID 1 of a VM (`/sbin/cloud48-init`): file systems, network from the kernel's command
/// line, the guest agent, then the workload handed in through fw_cfg.
const VM_INIT: &str = include_str!("vm/init.sh");
/// `/sbin/shutdown` of a VM, which the guest agent's `guest-shutdown` runs.
const VM_SHUTDOWN: &str = include_str!("vm/shutdown.sh");
/// Drops the kernel's drivers for hardware a VM never has (a third of its size), then
/// rebuilds the module index.
const VM_PRUNE_MODULES: &str = "for k in /lib/modules/*; do \
  (cd \"$k/kernel\" && rm -rf sound drivers/gpu drivers/media drivers/infiniband drivers/usb \
  drivers/scsi drivers/iio drivers/net/wireless drivers/net/ethernet drivers/staging drivers/hid \
  drivers/input drivers/bluetooth drivers/isdn drivers/mmc drivers/nfc drivers/platform \
  drivers/hwmon drivers/mtd drivers/video drivers/net/can drivers/net/usb); \
  depmod -a \"${k##*/}\"; done";
/// Modules the initramfs holds: enough to mount a virtio disk's ext4 root.
const VM_INITRAMFS_MODULES: &str = "virtio_pci\nvirtio_blk\next4\n";

/// One file of a recipe: its content inline, or a file or directory next to the recipe.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// The file's content.
    pub content: Option<String>,
    /// A file or directory, relative to the recipe, copied to this path.
    pub source: Option<String>,
    /// Octal mode of a file given by `content` (default `0644`).
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_suite() -> String {
    "bookworm".into()
}

fn default_mode() -> String {
    "0644".into()
}

fn bad(recipe: &Path, what: String) -> ImageError {
    ImageError::Recipe(format!("{}: {what}", recipe.display()))
}

/// A path inside the image: absolute, without `..`.
fn image_path(recipe: &Path, p: &str) -> Result<PathBuf, ImageError> {
    let path = Path::new(p);
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(bad(
            recipe,
            format!("file path '{p}' must be absolute and must not contain '..'"),
        ));
    }
    Ok(path.strip_prefix("/").unwrap_or(path).to_path_buf())
}

impl Recipe {
    /// The virtual machine variant of this recipe: named `NAME-vm`, with a kernel, the guest
    /// agent and the guest init added.
    pub fn into_vm(mut self) -> Result<Recipe, ImageError> {
        if !self.vm {
            self.name = format!("{}-vm:{}", self.name.repository(), self.name.tag())
                .parse()
                .map_err(|e| ImageError::Recipe(format!("{e}")))?;
            self.vm = true;
        }
        Ok(self)
    }

    /// The packages installed: the recipe's, and for a VM what it boots with.
    fn all_packages(&self) -> Vec<String> {
        let mut all = self.packages.clone();
        if self.vm {
            all.extend(
                [
                    &format!("linux-image-{}", host_architecture()),
                    "qemu-guest-agent",
                    "iproute2",
                    "e2fsprogs",
                    "kmod",
                ]
                .map(|p| p.to_string()),
            );
        }
        all
    }

    /// Reads and checks the recipe at `path`.
    pub fn load(path: &Path) -> Result<Recipe, ImageError> {
        let text = fs::read_to_string(path)
            .map_err(ImageError::io(format!("reading recipe {}", path.display())))?;
        let recipe: Recipe =
            toml_edit::de::from_str(&text).map_err(|e| bad(path, e.to_string().trim().into()))?;
        recipe.check(path)?;
        Ok(recipe)
    }

    fn check(&self, path: &Path) -> Result<(), ImageError> {
        let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
        if !word(&self.suite) {
            return Err(bad(
                path,
                format!(
                    "suite '{}' is not a Debian suite name (e.g. bookworm)",
                    self.suite
                ),
            ));
        }
        for p in &self.packages {
            let ok = p.len() >= 2
                && p.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
            if !ok {
                return Err(bad(path, format!("'{p}' is not a Debian package name")));
            }
        }
        for (p, spec) in &self.files {
            image_path(path, p)?;
            if spec.content.is_some() == spec.source.is_some() {
                return Err(bad(
                    path,
                    format!("file '{p}' needs exactly one of `content` and `source`"),
                ));
            }
            if u32::from_str_radix(&spec.mode, 8).is_err() {
                return Err(bad(
                    path,
                    format!(
                        "file '{p}' has mode '{}', which is not octal (e.g. 0644)",
                        spec.mode
                    ),
                ));
            }
        }
        for port in &self.ports {
            let ok = match port.split_once('/') {
                Some((n, proto)) => n.parse::<u16>().is_ok() && matches!(proto, "tcp" | "udp"),
                None => false,
            };
            if !ok {
                return Err(bad(
                    path,
                    format!("port '{port}' is not PORT/tcp or PORT/udp"),
                ));
            }
        }
        if self.entrypoint.is_empty() && self.command.is_empty() {
            return Err(bad(
                path,
                "give a `command` (or an `entrypoint`) the image runs".into(),
            ));
        }
        Ok(())
    }
}

/// Builds images from recipes, with a cache.
#[derive(Debug, Clone)]
pub struct Builder {
    cache: PathBuf,
    mirror: String,
    vm: bool,
}

/// Unmounts what it mounted, even when the build fails.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn run(cmd: &mut Command, step: &str) -> Result<(), ImageError> {
    let out = cmd.output().map_err(|e| {
        ImageError::Build(format!("{step}: cannot run {:?}: {e}", cmd.get_program()))
    })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ImageError::Build(format!(
            "{step} failed ({}):\n{}",
            out.status,
            tail.join("\n")
        )));
    }
    Ok(())
}

fn hash_path(hash: &mut Sha256, path: &Path) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(path)
        .map_err(ImageError::io(format!("reading {}", path.display())))?;
    if meta.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(path)
            .map_err(ImageError::io(format!("reading {}", path.display())))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            hash.update(e.file_name().unwrap_or_default().as_encoded_bytes());
            hash_path(hash, &e)?;
        }
    } else {
        hash.update(fs::read(path).map_err(ImageError::io(format!("reading {}", path.display())))?);
    }
    Ok(())
}

impl Builder {
    /// A builder caching in `cache`, fetching packages from `mirror`.
    pub fn new(cache: impl Into<PathBuf>, mirror: impl Into<String>) -> Builder {
        Builder {
            cache: cache.into(),
            mirror: mirror.into(),
            vm: false,
        }
    }

    /// Builds the virtual machine variant of recipes (`Recipe::into_vm`) when `vm` is set.
    pub fn vm(mut self, vm: bool) -> Builder {
        self.vm = vm;
        self
    }

    /// The cache key of `recipe` (read from `path`): its content, every file it copies, the
    /// mirror and this builder's version.
    pub fn key(&self, recipe: &Recipe, path: &Path) -> Result<String, ImageError> {
        let mut hash = Sha256::new();
        hash.update(BUILDER_VERSION);
        hash.update(&self.mirror);
        hash.update(host_architecture());
        hash.update(serde_json::to_vec(recipe).unwrap_or_default());
        if recipe.vm {
            hash.update(VM_INIT);
            hash.update(VM_SHUTDOWN);
            hash.update(VM_INITRAMFS_MODULES);
            hash.update(VM_PRUNE_MODULES);
            // The image holds the boot files (disk, kernel, initramfs), not the root's files.
            hash.update("vm-layout-2");
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for spec in recipe.files.values() {
            if let Some(s) = &spec.source {
                hash_path(&mut hash, &dir.join(s))?;
            }
        }
        Ok(hex::encode(hash.finalize()))
    }

    /// Builds the recipe at `path` into the cache, unless it is there already. Returns the
    /// recipe, the OCI layout holding its image and whether it was cached.
    pub fn prepare(
        &self,
        path: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Recipe, PathBuf, bool), ImageError> {
        let mut recipe = Recipe::load(path)?;
        if self.vm {
            recipe = recipe.into_vm()?;
        }
        let key = self.key(&recipe, path)?;
        for d in ["debs", "rootfs", "images", "work"] {
            fs::create_dir_all(self.cache.join(d)).map_err(ImageError::io(format!(
                "creating {}/{d}",
                self.cache.display()
            )))?;
        }
        let _lock = Store::lock_file(&self.cache.join(".lock"))?;
        let done = self.cache.join("images").join(&key);
        let cached = done.join("index.json").is_file();
        if !cached {
            progress(&format!("building {} (recipe {})", recipe.name, &key[..12]));
            self.build_uncached(&recipe, path, &key, &done, progress)?;
        }
        Ok((recipe, done, cached))
    }

    /// Builds the recipe at `path` (or takes it from the cache) and puts the image into
    /// `store`. Returns the image and whether it came from the cache.
    pub fn build(
        &self,
        path: &Path,
        store: &Store,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(ImageSummary, bool), ImageError> {
        let (recipe, done, cached) = self.prepare(path, progress)?;
        let imported = store.import_path(&done, Some(&recipe.name))?;
        let image = imported.into_iter().next().ok_or_else(|| {
            ImageError::Build(format!(
                "the cached build {} holds no image",
                done.display()
            ))
        })?;
        Ok((image, cached))
    }

    fn base(&self, suite: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
        let mut hash = Sha256::new();
        hash.update(BUILDER_VERSION);
        hash.update(suite);
        hash.update(&self.mirror);
        hash.update(host_architecture());
        let base = self
            .cache
            .join("rootfs")
            .join(hex::encode(&hash.finalize()[..16]));
        if base.join("etc/debian_version").is_file() {
            return Ok(base);
        }
        let partial = base.with_extension("partial");
        let _ = fs::remove_dir_all(&partial);
        progress(&format!(
            "debootstrap {suite} from {} (first build on this machine: one to two minutes)",
            self.mirror
        ));
        run(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--cache-dir={}", self.cache.join("debs").display()))
                .arg(suite)
                .arg(&partial)
                .arg(&self.mirror),
            &format!("debootstrap of {suite}"),
        )?;
        fs::rename(&partial, &base)
            .map_err(ImageError::io(format!("renaming {}", partial.display())))?;
        Ok(base)
    }

    fn build_uncached(
        &self,
        recipe: &Recipe,
        path: &Path,
        key: &str,
        done: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let base = self.base(&recipe.suite, progress)?;
        let work = self.cache.join("work").join(key);
        let _ = fs::remove_dir_all(&work);
        run(
            Command::new("cp").arg("-a").arg(&base).arg(&work),
            "copying the base root file system",
        )?;
        let result = self.fill(recipe, path, &work, progress).and_then(|()| {
            progress("writing the image's layer");
            let partial = done.with_extension("partial");
            let _ = fs::remove_dir_all(&partial);
            let staging = Store::open(&partial)?;
            let layer = if recipe.vm {
                // A VM's image is its boot files: one disk made here, so that every server
                // boots (and overlays) the very same bytes.
                let boot = self.cache.join("work").join(format!("{key}.vm"));
                let _ = fs::remove_dir_all(&boot);
                let made = vm_boot_files(&work, &boot, progress)
                    .and_then(|()| staging.write_layer_from_dir(&boot));
                let _ = fs::remove_dir_all(&boot);
                made?
            } else {
                staging.write_layer_from_dir(&work)?
            };
            staging.commit(
                &recipe.name,
                &[layer],
                &NewImage {
                    entrypoint: recipe.entrypoint.clone(),
                    cmd: recipe.command.clone(),
                    // Debian's PATH unless the recipe gives its own.
                    env: (!recipe.env.contains_key("PATH"))
                        .then(|| {
                            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                                .to_string()
                        })
                        .into_iter()
                        .chain(recipe.env.iter().map(|(k, v)| format!("{k}={v}")))
                        .collect(),
                    workdir: recipe.workdir.clone(),
                    exposed_ports: recipe.ports.clone(),
                    created: None,
                    labels: std::iter::once(("org.cloud48.recipe".into(), key.to_string()))
                        .chain(recipe.vm.then(|| (VM_LABEL.into(), "1".into())))
                        .collect(),
                },
            )?;
            fs::rename(&partial, done)
                .map_err(ImageError::io(format!("renaming {}", partial.display())))
        });
        let _ = fs::remove_dir_all(&work);
        result
    }

    /// Installs the packages, writes the files and runs the commands in `root`.
    fn fill(
        &self,
        recipe: &Recipe,
        path: &Path,
        root: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let mut mounts = Mounts(Vec::new());
        let packages = recipe.all_packages();
        if !packages.is_empty() || !recipe.run.is_empty() {
            let proc = root.join("proc");
            run(
                Command::new("mount")
                    .args(["-t", "proc", "proc"])
                    .arg(&proc),
                "mounting /proc",
            )?;
            mounts.0.push(proc);
        }
        if recipe.vm {
            // A small initramfs: the modules that mount the root, not every driver there is.
            let conf = root.join("etc/initramfs-tools");
            fs::create_dir_all(conf.join("conf.d"))
                .map_err(ImageError::io("creating /etc/initramfs-tools"))?;
            fs::write(conf.join("conf.d/cloud48"), "MODULES=list\n")
                .and_then(|()| fs::write(conf.join("modules"), VM_INITRAMFS_MODULES))
                .map_err(ImageError::io("writing the initramfs configuration"))?;
        }
        if !packages.is_empty() {
            // Services must not start inside the build.
            let policy = root.join("usr/sbin/policy-rc.d");
            fs::write(&policy, "#!/bin/sh\nexit 101\n")
                .map_err(ImageError::io("writing policy-rc.d"))?;
            set_mode(&policy, 0o755)?;
            let archives = root.join("var/cache/apt/archives");
            run(
                Command::new("mount")
                    .arg("--bind")
                    .arg(self.cache.join("debs"))
                    .arg(&archives),
                "mounting the package cache",
            )?;
            mounts.0.push(archives);
            progress(&format!("installing {}", packages.join(", ")));
            let apt = |args: &[&str]| {
                let mut c = Command::new("chroot");
                c.arg(root)
                    .arg("apt-get")
                    .args([
                        "-o",
                        "Dpkg::Use-Pty=0",
                        "-o",
                        "APT::Install-Recommends=false",
                    ])
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .env("LC_ALL", "C");
                c
            };
            run(&mut apt(&["update", "-q"]), "apt-get update")?;
            let mut install = apt(&["install", "-y", "-q"]);
            install.args(&packages);
            run(&mut install, &format!("installing {}", packages.join(", ")))?;
            fs::remove_file(&policy).map_err(ImageError::io("removing policy-rc.d"))?;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for (p, spec) in &recipe.files {
            let target = root.join(image_path(path, p)?);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .map_err(ImageError::io(format!("creating {}", parent.display())))?;
            }
            match (&spec.content, &spec.source) {
                (Some(content), _) => {
                    fs::write(&target, content).map_err(ImageError::io(format!("writing {p}")))?;
                    set_mode(&target, u32::from_str_radix(&spec.mode, 8).unwrap_or(0o644))?;
                }
                (None, Some(source)) => run(
                    Command::new("cp")
                        .arg("-rT")
                        .arg(dir.join(source))
                        .arg(&target),
                    &format!("copying {source} to {p}"),
                )?,
                (None, None) => {}
            }
        }
        if recipe.vm {
            // A VM has virtio devices only: drivers for hardware it cannot have go.
            run(
                Command::new("chroot")
                    .arg(root)
                    .args(["/bin/sh", "-ec", VM_PRUNE_MODULES])
                    .env("LC_ALL", "C"),
                "removing kernel modules a VM does not use",
            )?;
            for (p, content) in [
                ("sbin/cloud48-init", VM_INIT),
                ("sbin/shutdown", VM_SHUTDOWN),
            ] {
                let target = root.join(p);
                let _ = fs::remove_file(&target);
                fs::write(&target, content).map_err(ImageError::io(format!("writing /{p}")))?;
                set_mode(&target, 0o755)?;
            }
        }
        for (i, cmd) in recipe.run.iter().enumerate() {
            progress(&format!("running step {} of {}", i + 1, recipe.run.len()));
            run(
                Command::new("chroot")
                    .arg(root)
                    .args(["/bin/sh", "-ec", cmd])
                    .env("LC_ALL", "C")
                    .env(
                        "PATH",
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    ),
                &format!("run step {} (`{cmd}`)", i + 1),
            )?;
        }
        drop(mounts);
        for junk in ["var/lib/apt/lists", "var/cache/apt/archives", "var/log/apt"] {
            let d = root.join(junk);
            if let Ok(entries) = fs::read_dir(&d) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Room a VM's disk has beyond its files (a VM's own disk may be larger: its init grows the
/// file system to the disk it is given).
const VM_DISK_HEADROOM_MB: u64 = 256;

/// Bytes of the files under `dir` (not following links).
fn dir_size(dir: &Path) -> u64 {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// Writes what a VM boots from the root file system `root` into the new directory `boot`:
/// `disk.qcow2` (the root as ext4), `vmlinuz` and `initrd.img` (its newest kernel), and
/// `size-mb` (the disk's size).
fn vm_boot_files(
    root: &Path,
    boot: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    fs::create_dir_all(boot).map_err(ImageError::io(format!("creating {}", boot.display())))?;
    for (prefix, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let mut found: Vec<PathBuf> = fs::read_dir(root.join("boot"))
            .map_err(ImageError::io("reading /boot"))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        found.sort();
        let newest = found.pop().ok_or_else(|| {
            ImageError::Build(format!(
                "the VM image has no /boot/{prefix}*: its kernel did not install"
            ))
        })?;
        fs::copy(&newest, boot.join(name))
            .map_err(ImageError::io(format!("copying {}", newest.display())))?;
    }
    let used_mb = dir_size(root) >> 20;
    let size_mb = used_mb + used_mb / 4 + VM_DISK_HEADROOM_MB;
    progress(&format!(
        "making the VM's disk ({size_mb} MiB, ext4 in qcow2)"
    ));
    let raw = boot.join("disk.raw");
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(root)
            .arg(&raw)
            .arg(format!("{size_mb}M")),
        "making the VM's disk (mkfs.ext4 -d; Debian: apt-get install e2fsprogs)",
    )?;
    let converted = run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(boot.join("disk.qcow2")),
        "converting the VM's disk (qemu-img; Debian: apt-get install qemu-utils)",
    );
    let _ = fs::remove_file(&raw);
    converted?;
    fs::write(boot.join("size-mb"), size_mb.to_string()).map_err(ImageError::io("writing size-mb"))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(ImageError::io(format!(
        "setting the mode of {}",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("r.toml");
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn recipes_are_checked_with_the_fault_named() {
        let dir = tempfile::tempdir().unwrap();
        let ok = write(
            dir.path(),
            "name = \"cloud48/x\"\npackages = [\"nginx-light\"]\ncommand = [\"nginx\"]\nports = [\"80/tcp\"]\n[files.\"/etc/x\"]\ncontent = \"1\"\n",
        );
        let r = Recipe::load(&ok).unwrap();
        assert_eq!(
            (r.suite.as_str(), r.files["/etc/x"].mode.as_str()),
            ("bookworm", "0644")
        );
        for (text, expect) in [
            ("name = \"X\"\ncommand = [\"a\"]", "not an image name"),
            ("name = \"x\"", "give a `command`"),
            (
                "name = \"x\"\ncommand = [\"a\"]\npackages = [\"Bad;rm\"]",
                "not a Debian package name",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[files.\"etc/x\"]\ncontent = \"\"",
                "must be absolute",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[files.\"/../x\"]\ncontent = \"\"",
                "must be absolute",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[files.\"/x\"]\nmode = \"0644\"",
                "exactly one of",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[files.\"/x\"]\ncontent = \"\"\nmode = \"rw\"",
                "not octal",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\nports = [\"http\"]",
                "PORT/tcp",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\nsuite = \"Bookworm\"",
                "not a Debian suite",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\npackage = []",
                "unknown field",
            ),
        ] {
            let err = Recipe::load(&write(dir.path(), text))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{text}: {err}");
            assert!(err.contains("r.toml"), "{err}");
        }
    }

    #[test]
    fn the_cache_key_follows_the_recipe_and_the_files_it_copies() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("app.txt"), "v1").unwrap();
        let text = "name = \"x\"\ncommand = [\"a\"]\n[files.\"/app\"]\nsource = \"app.txt\"\n";
        let p = write(dir.path(), text);
        let b = Builder::new(dir.path().join("cache"), DEFAULT_MIRROR);
        let k1 = b.key(&Recipe::load(&p).unwrap(), &p).unwrap();
        assert_eq!(k1, b.key(&Recipe::load(&p).unwrap(), &p).unwrap());
        fs::write(dir.path().join("app.txt"), "v2").unwrap();
        let k2 = b.key(&Recipe::load(&p).unwrap(), &p).unwrap();
        assert_ne!(k1, k2);
        let p = write(dir.path(), &text.replace("[\"a\"]", "[\"b\"]"));
        assert_ne!(k2, b.key(&Recipe::load(&p).unwrap(), &p).unwrap());
        let other_mirror = Builder::new(dir.path().join("cache"), "http://mirror.example/debian");
        assert_ne!(
            k2,
            other_mirror.key(&Recipe::load(&p).unwrap(), &p).unwrap()
        );
    }
}
