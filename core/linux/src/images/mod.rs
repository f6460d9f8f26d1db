//! Guests that run their type's image: the image pulled into the server's store (from the core,
//! or found there), unpacked once into a root file system its guests share read-only, and each
//! guest an overlay of it with the guest's own upper directory, run by runc (`cloud48-oci`) in
//! its own user, PID, mount, UTS, IPC and network namespaces, in the same cgroups the driver
//! reads state, usage and freezing from.
//!
//! Layout under the data directory: `images/` (an OCI image layout), `rootfs/<hex>` (an image
//! unpacked, owners shifted into the user namespace's range), `guests/ID/{upper,work,merged,
//! bundle}`.
//!
//! Invariants:
//! - A root file system directory exists only whole (it is unpacked beside it and renamed).
//! - A guest's `upper` is everything that is its own: export archives exactly it, import
//!   restores exactly it (overlay whiteouts included).

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud48_driver::{DriverError, ImageOrigin};
use cloud48_image::{Digest, ImageDetails, Name, Source, Store};
use cloud48_model::ImageRef;
use cloud48_oci::{DEFAULT_ID_MAP, Runc};

mod upper;

pub use upper::{archive_entries, archive_upper, archive_upper_to_file, unpack_upper};

/// A store's images with when each was last used (the time of its unpacked directory, which
/// `unpacked` names), most recent first.
pub fn by_use(
    store: &Store,
    unpacked: &dyn Fn(&Digest) -> PathBuf,
) -> Vec<(cloud48_image::ImageSummary, std::time::SystemTime)> {
    let mut all: Vec<_> = store
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let used = std::fs::metadata(unpacked(&s.digest))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (s, used)
        })
        .collect();
    all.sort_by_key(|(_, used)| std::cmp::Reverse(*used));
    all
}

/// Removes from `store` (with their unpacked directories) the least recently used images no
/// guest uses (not in `in_use`, by digest) while the images, as stored plus unpacked, take
/// more than `limit` bytes; logs what it removed (blocking).
pub fn evict_unused(
    store: &Store,
    unpacked: &dyn Fn(&Digest) -> PathBuf,
    limit: u64,
    in_use: &std::collections::HashSet<String>,
) {
    let all = by_use(store, unpacked);
    let size = |s: &cloud48_image::ImageSummary| s.size + dir_size(&unpacked(&s.digest));
    let mut total: u64 = all.iter().map(|(s, _)| size(s)).sum();
    for (s, _) in all.iter().rev() {
        if total <= limit {
            break;
        }
        if in_use.contains(s.digest.as_str()) {
            continue;
        }
        let freed = size(s);
        let _ = std::fs::remove_dir_all(unpacked(&s.digest));
        match store.remove(s.digest.as_str()) {
            Ok(_) => {
                total = total.saturating_sub(freed);
                tracing::info!(image = %s.digest, bytes = freed, "removed an unused image: the server's image cache is full");
            }
            Err(e) => {
                tracing::warn!(image = %s.digest, error = %e, "cannot remove an unused image")
            }
        }
    }
    if total > limit {
        tracing::warn!(
            bytes = total,
            limit,
            "the images guests use take more than the image cache's limit"
        );
    }
}

/// The bound on a server's images (bytes as stored plus unpacked), and whether they grew past
/// it since they were last evicted: only an unpack can make them outgrow it, so creates of
/// cached images walk no directories.
pub struct CacheBound {
    limit: Option<u64>,
    grew: std::sync::atomic::AtomicBool,
}

impl CacheBound {
    /// At most `limit` bytes (`None`: no bound).
    pub fn new(limit: Option<u64>) -> CacheBound {
        CacheBound {
            limit,
            grew: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// An image was unpacked.
    pub fn grew(&self) {
        self.grew.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The limit, when an eviction is due (once per growth).
    pub fn due(&self) -> Option<u64> {
        let limit = self.limit?;
        self.grew
            .swap(false, std::sync::atomic::Ordering::AcqRel)
            .then_some(limit)
    }
}

/// Where a server's images come from when it lacks one (the core over HTTP, or another store).
pub type ImageSource = Arc<dyn Source + Send + Sync>;

/// Makes the source of a peer agent's store from its URL (the agent gives one: it knows the
/// fleet's token).
pub type PeerSources = Arc<dyn Fn(&str) -> ImageSource + Send + Sync>;

/// `name@digest` (or the digest of an image without a name), as servers report what they hold.
pub fn label(summary: &cloud48_image::ImageSummary) -> String {
    match &summary.name {
        Some(n) => format!("{n}@{}", summary.digest),
        None => summary.digest.to_string(),
    }
}

/// Makes images present in `store` from `from` (`Driver::fetch_image`): `source` is the
/// server's usual one (the core), `peers` makes a peer's. Blocking; `server` names this server
/// in errors. Says what the server holds of them (`name@digest`).
pub fn fetch_from(
    store: &Store,
    from: &ImageOrigin,
    image: Option<&str>,
    source: Option<&(dyn Source + Send + Sync)>,
    peers: Option<&PeerSources>,
    server: &str,
) -> Result<Vec<String>, DriverError> {
    let pull = |source: Option<&(dyn Source + Send + Sync)>| {
        let image = image.ok_or_else(|| {
            permanent(format!(
                "name the image to fetch from {from} (a name or a sha256: digest)"
            ))
        })?;
        let reference = ImageRef {
            reference: image.to_string(),
            digest: image.starts_with("sha256:").then(|| image.to_string()),
        };
        fetch(store, source, &reference, server).map(|d| vec![label(&d.summary)])
    };
    match from {
        ImageOrigin::Core => pull(source),
        ImageOrigin::Peer { url } => {
            let peers = peers.ok_or_else(|| {
                permanent(format!(
                    "server {server} cannot pull from other agents (it runs without an agent that gives it their address and token)"
                ))
            })?;
            let peer = peers(url);
            pull(Some(peer.as_ref()))
        }
        ImageOrigin::File { path } => {
            let held: Vec<String> = store
                .import_path(path, None)
                .map_err(|e| {
                    permanent(format!(
                        "server {server} cannot import {}: {e}",
                        path.display()
                    ))
                })?
                .iter()
                .map(label)
                .collect();
            match image {
                Some(wanted)
                    if !held.iter().any(|h| {
                        h == wanted
                            || h.split_once('@')
                                .is_some_and(|(n, d)| n == wanted || d == wanted)
                    }) =>
                {
                    Err(permanent(format!(
                        "{} holds no image {wanted} (it holds: {}); what it holds was imported",
                        path.display(),
                        held.join(", ")
                    )))
                }
                _ => Ok(held),
            }
        }
    }
}

/// A server's images and the runtime that runs them.
pub struct Images {
    name: String,
    store: Arc<Store>,
    source: Option<ImageSource>,
    peers: Option<PeerSources>,
    pub(crate) runc: Runc,
    rootfs: PathBuf,
    /// One unpack, pull or eviction at a time: two guests of a new image wait for one unpack.
    preparing: tokio::sync::Mutex<()>,
    /// Most bytes the images may take (stored plus unpacked).
    bound: CacheBound,
    /// What `held` reports (`name@digest`, most recently used first), kept current by
    /// `prepare` and `evict` so that heartbeats do not read the disk.
    held: std::sync::Mutex<Vec<String>>,
}

fn permanent(e: impl std::fmt::Display) -> DriverError {
    DriverError::Permanent(e.to_string())
}

impl Images {
    /// Opens the store in `data_dir/images` and finds runc; `runc_root` keeps runc's state.
    pub fn open(
        name: &str,
        data_dir: &Path,
        runc_root: &Path,
        (source, peers): (Option<ImageSource>, Option<PeerSources>),
        limit: Option<u64>,
    ) -> Result<Images, String> {
        let store = Store::open_server(data_dir)
            .map_err(|e| format!("cannot open the server's image store: {e}"))?;
        let runc = Runc::new(runc_root).map_err(|e| e.to_string())?;
        let rootfs = data_dir.join("rootfs");
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
        let images = Images {
            name: name.to_string(),
            store: Arc::new(store),
            source,
            peers,
            runc,
            rootfs,
            preparing: tokio::sync::Mutex::new(()),
            bound: CacheBound::new(limit),
            held: std::sync::Mutex::new(Vec::new()),
        };
        images.refresh_held();
        Ok(images)
    }

    /// The images this server holds (`name@digest`), most recently used first.
    pub fn held(&self) -> Vec<String> {
        self.held.lock().unwrap().clone()
    }

    fn by_use(&self) -> Vec<(cloud48_image::ImageSummary, std::time::SystemTime)> {
        by_use(&self.store, &|d| self.rootfs(d))
    }

    fn refresh_held(&self) {
        let held = self.by_use().into_iter().map(|(s, _)| label(&s)).collect();
        *self.held.lock().unwrap() = held;
    }

    /// `Driver::fetch_image` for this server's store.
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
            this.refresh_held();
            Ok(held)
        })
        .await
        .map_err(permanent)?
    }

    /// Removes the least recently used images that no container runs (not in `in_use`, by
    /// digest) while the images take more than the limit; says what it removed.
    pub async fn evict(self: &Arc<Self>, in_use: std::collections::HashSet<String>) {
        let Some(limit) = self.bound.due() else {
            return;
        };
        let _one = self.preparing.lock().await;
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            evict_unused(&this.store, &|d| this.rootfs(d), limit, &in_use);
            this.refresh_held();
        })
        .await;
    }

    /// The server's image store (which its agent also serves to peer agents).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The unpacked root file system of image `digest`.
    pub fn rootfs(&self, digest: &Digest) -> PathBuf {
        self.rootfs.join(digest.hex())
    }

    /// Makes the image `image` ready to run here: pulled from the source unless the store has
    /// it (by digest when the reference pins one, else the newest the source has under the
    /// name), then unpacked unless it already is. Returns what the image says of itself.
    pub async fn prepare(self: &Arc<Self>, image: &ImageRef) -> Result<ImageDetails, DriverError> {
        let _one = self.preparing.lock().await;
        let this = self.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || this.prepare_blocking(&image))
            .await
            .map_err(permanent)?
    }

    fn prepare_blocking(&self, image: &ImageRef) -> Result<ImageDetails, DriverError> {
        let details = fetch(&self.store, self.source.as_deref(), image, &self.name)?;
        let wanted = image.digest.as_deref().unwrap_or(&image.reference);
        let dest = self.rootfs(&details.summary.digest);
        if dest.is_dir() {
            // Its time is when it was last used (what eviction goes by).
            let _ = std::fs::File::open(&dest)
                .and_then(|d| d.set_modified(std::time::SystemTime::now()));
        } else {
            self.bound.grew();
            cloud48_oci::unpack(&self.store, &details, &dest, DEFAULT_ID_MAP.host).map_err(
                |e| {
                    permanent(format!(
                        "cannot unpack image {wanted} on server {}: {e}",
                        self.name
                    ))
                },
            )?;
        }
        self.refresh_held();
        Ok(details)
    }
}

/// Makes the image `image` present in `store`: pulled from `source` unless the store has it (by
/// digest when the reference pins one, else the newest the source has under the name). Returns
/// what the image says of itself. Blocking; `server` names this server in errors.
pub fn fetch(
    store: &Store,
    source: Option<&(dyn Source + Send + Sync)>,
    image: &ImageRef,
    server: &str,
) -> Result<ImageDetails, DriverError> {
    let name: Option<Name> = image.reference.parse().ok();
    let wanted = image.digest.as_deref().unwrap_or(&image.reference);
    let here = store.show(wanted);
    match (here, source) {
        // Pinned and here: nothing to fetch.
        (Ok(d), _) if image.digest.is_some() => Ok(d),
        // A source answers for the newest of a name, and has what is not here.
        (_, Some(source)) => {
            let mut last = 0u64;
            let summary = store
                .pull(source, wanted, name.as_ref(), &mut |p| {
                    if p.total > 0 && p.done * 10 / p.total > last {
                        last = p.done * 10 / p.total;
                        tracing::info!(image = %wanted, done = p.done, total = p.total, "pulling an image");
                    }
                })
                .map_err(|e| permanent(format!("cannot pull image {wanted}: {e}")))?;
            store.show(summary.digest.as_str())
        }
        (here, None) => here,
    }
    .map_err(|e| match e {
        cloud48_image::ImageError::NotFound(_) => permanent(format!(
            "image {wanted} is not on server {server} and its agent has no core to pull it from; import it there with `cloud48 image import` or start the agent with --core"
        )),
        e => permanent(format!("image {wanted} on server {server}: {e}")),
    })
}

/// Bytes of the files under `dir` (not following links).
pub fn dir_size(dir: &Path) -> u64 {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The process a guest of `image` runs: the workload's command when the type declares one,
/// else the image's entrypoint and command.
pub fn process_args(command: &[String], image: &ImageDetails) -> Vec<String> {
    if command.is_empty() {
        image.entrypoint.iter().chain(&image.cmd).cloned().collect()
    } else {
        command.to_vec()
    }
}

/// The environment of a guest's process: the image's, overridden by the workload's, with a
/// `PATH` if neither gives one, and `CLOUD48_CONTAINER`.
pub fn process_env(
    image: &ImageDetails,
    workload: &[(String, String)],
    guest: &str,
) -> Vec<String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(key, _)| key == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    for (k, v) in image.env.iter().filter_map(|e| e.split_once('=')) {
        set(k, v);
    }
    for (k, v) in workload {
        set(k, v);
    }
    set("CLOUD48_CONTAINER", guest);
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::upper::whiteout;
    use super::*;

    fn details(entrypoint: &[&str], cmd: &[&str], env: &[&str]) -> ImageDetails {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        serde_json::from_value(serde_json::json!({
            "name": null, "digest": format!("sha256:{}", "0".repeat(64)), "size": 0,
            "architecture": "amd64", "os": "linux", "created": null, "layer_count": 0,
            "config": format!("sha256:{}", "1".repeat(64)),
            "entrypoint": v(entrypoint), "cmd": v(cmd), "env": v(env),
            "workdir": null, "exposed_ports": [], "layers": [],
        }))
        .unwrap()
    }

    /// An image named `name` in a new OCI layout at `dir/layout`.
    fn layout(dir: &Path, name: &str) -> cloud48_image::ImageSummary {
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("hello"), name).unwrap();
        let store = Store::open(dir.join("layout")).unwrap();
        let layer = store.write_layer_from_dir(&rootfs).unwrap();
        let image = cloud48_image::NewImage {
            cmd: vec!["/bin/true".into()],
            ..Default::default()
        };
        store
            .commit(&name.parse().unwrap(), &[layer], &image)
            .unwrap()
    }

    #[test]
    fn images_come_from_files_and_peers_and_a_wrong_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let made = layout(dir.path(), "local/web:1");
        let server = Store::open_server(&dir.path().join("server")).unwrap();
        let file = ImageOrigin::File {
            path: dir.path().join("layout"),
        };
        // A file: everything in it, or an error naming what it holds instead.
        let held = fetch_from(&server, &file, None, None, None, "s1").unwrap();
        assert_eq!(held, [format!("local/web:1@{}", made.digest)]);
        assert_eq!(
            server.show("local/web:1").unwrap().summary.digest,
            made.digest
        );
        let e = fetch_from(&server, &file, Some("local/db:1"), None, None, "s1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds no image local/db:1") && e.contains("local/web:1@"),
            "{e}"
        );
        let missing = ImageOrigin::File {
            path: dir.path().join("nowhere.tar"),
        };
        let e = fetch_from(&server, &missing, None, None, None, "s1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server s1 cannot import") && e.contains("nowhere.tar"),
            "{e}"
        );

        // A peer: pulled from its store by name, verified; a server with no way to reach
        // peers, or a pull without a name, says so.
        let other = Store::open_server(&dir.path().join("other")).unwrap();
        let peer_store: ImageSource =
            Arc::new(Store::open_server(&dir.path().join("server")).unwrap());
        let peers: PeerSources = Arc::new(move |_url: &str| peer_store.clone());
        let peer = ImageOrigin::Peer {
            url: "http://peer".into(),
        };
        let held =
            fetch_from(&other, &peer, Some("local/web:1"), None, Some(&peers), "s2").unwrap();
        assert_eq!(held, [format!("local/web:1@{}", made.digest)]);
        let e = fetch_from(&other, &peer, Some("local/web:1"), None, None, "s2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot pull from other agents"), "{e}");
        let e = fetch_from(&other, &peer, None, None, Some(&peers), "s2")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("name the image to fetch from the agent at http://peer"),
            "{e}"
        );
        let e = fetch_from(
            &other,
            &ImageOrigin::Core,
            Some("local/none:1"),
            None,
            None,
            "s2",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no core to pull it from"), "{e}");
    }

    #[test]
    fn the_workload_command_wins_over_the_image_entrypoint() {
        let image = details(&["/entry"], &["arg"], &[]);
        assert_eq!(process_args(&[], &image), ["/entry", "arg"]);
        assert_eq!(process_args(&["nginx".into()], &image), ["nginx"]);
    }

    #[test]
    fn the_workload_environment_overrides_the_image_and_path_is_always_set() {
        let image = details(&[], &[], &["A=image", "B=kept"]);
        let env = process_env(&image, &[("A".into(), "workload".into())], "g1");
        assert!(env.contains(&"A=workload".to_string()), "{env:?}");
        assert!(env.contains(&"B=kept".to_string()));
        assert!(env.contains(&"CLOUD48_CONTAINER=g1".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));
        let with_path = details(&[], &[], &["PATH=/usr/bin", "PATH=/opt/bin"]);
        let env = process_env(&with_path, &[], "g1");
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(env.contains(&"PATH=/opt/bin".to_string()));
    }

    #[test]
    fn an_upper_directory_survives_archive_and_unpack_with_owners_and_whiteouts() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("etc/app")).unwrap();
        std::fs::write(upper.join("etc/app/conf"), "x=1\n").unwrap();
        std::os::unix::fs::lchown(upper.join("etc/app/conf"), Some(100_033), Some(100_033))
            .unwrap();
        whiteout(&upper.join("etc/removed"), 100_000, 100_000).unwrap();
        // In memory (plain tar) and as a compressed file (how guests travel).
        let data = archive_upper(&upper, Vec::new()).unwrap();
        let file = dir.path().join("guest.tar.gz");
        let size = archive_upper_to_file(&upper, &file).unwrap();
        assert_eq!(size, std::fs::metadata(&file).unwrap().len());
        assert!(std::fs::read(&file).unwrap().starts_with(&[0x1f, 0x8b]));

        for (i, input) in [
            Box::new(&data[..]) as Box<dyn Read>,
            Box::new(std::fs::File::open(&file).unwrap()),
        ]
        .into_iter()
        .enumerate()
        {
            let restored = dir.path().join(format!("restored{i}"));
            std::fs::create_dir_all(&restored).unwrap();
            unpack_upper(input, &restored).unwrap();
            let conf = restored.join("etc/app/conf");
            assert_eq!(std::fs::read_to_string(&conf).unwrap(), "x=1\n");
            assert_eq!(std::fs::metadata(&conf).unwrap().uid(), 100_033);
            let w = std::fs::symlink_metadata(restored.join("etc/removed")).unwrap();
            assert!(w.file_type().is_char_device());
            assert_eq!(w.rdev(), 0);
            assert_eq!(w.uid(), 100_000);
        }
    }

    #[test]
    fn a_truncated_compressed_archive_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(&upper).unwrap();
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(upper.join("data"), &noise).unwrap();
        let file = dir.path().join("guest.tar.gz");
        archive_upper_to_file(&upper, &file).unwrap();
        let whole = std::fs::read(&file).unwrap();
        let restored = dir.path().join("restored");
        std::fs::create_dir_all(&restored).unwrap();
        let err = unpack_upper(&whole[..whole.len() / 2], &restored).unwrap_err();
        assert!(err.to_string().contains("not a valid archive"), "{err}");
    }

    #[test]
    fn an_archive_naming_a_path_outside_is_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        h.set_mode(0o600);
        // `append_data` refuses `..`; write the name into the header directly.
        h.as_gnu_mut().unwrap().name[..8].copy_from_slice(b"../evil\0");
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        let data = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = unpack_upper(&data[..], dir.path()).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        assert!(!dir.path().parent().unwrap().join("evil").exists());
    }
}
