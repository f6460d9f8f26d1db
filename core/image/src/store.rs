//! The store: blobs by digest, the index of named images, listing, removal and garbage
//! collection.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Digest, ImageError, Name};

/// The annotation that names an image in `index.json`.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest manifest, index or config this store reads (they are small JSON documents).
pub(crate) const MAX_JSON: u64 = 4 << 20;

/// An image store in a directory (an OCI image layout).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// One image, as `image list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// Its name, if it has one (an image imported without a name is known by digest).
    pub name: Option<Name>,
    /// The digest of its manifest: what identifies the image.
    pub digest: Digest,
    /// Bytes of manifest, config and layers (compressed, as stored).
    pub size: u64,
    /// OCI architecture (`amd64`).
    pub architecture: String,
    /// OCI operating system (`linux`).
    pub os: String,
    /// When it was built, as the image says (RFC 3339), if it says.
    pub created: Option<String>,
    /// How many layers it has.
    pub layer_count: usize,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Digest of the layer as stored (compressed).
    pub digest: Digest,
    /// Its size as stored.
    pub size: u64,
    /// Its media type (`application/vnd.oci.image.layer.v1.tar+gzip`).
    pub media_type: String,
    /// Digest of its uncompressed tar (the config's `diff_id`), checked when it is unpacked.
    pub diff_id: String,
}

/// Everything `image show` tells about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDetails {
    /// What `image list` shows.
    #[serde(flatten)]
    pub summary: ImageSummary,
    /// Digest of its config blob.
    pub config: Digest,
    /// The process it runs by default: entrypoint then command.
    pub entrypoint: Vec<String>,
    /// Arguments to the entrypoint.
    pub cmd: Vec<String>,
    /// Its environment (`NAME=value`).
    pub env: Vec<String>,
    /// Working directory of its process.
    pub workdir: Option<String>,
    /// Ports it declares (`80/tcp`).
    pub exposed_ports: Vec<String>,
    /// Its layers, bottom first.
    pub layers: Vec<LayerInfo>,
}

/// What `image rm` freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The names removed.
    pub names: Vec<String>,
    /// Blobs no image uses any more, now deleted.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// A lock on the store, held while `index.json` or `blobs/` change.
pub(crate) struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

static TEMP: AtomicU64 = AtomicU64::new(0);

fn json_error(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Corrupt(format!("{what} is not valid: {e}"))
}

impl Store {
    /// Opens the store a server keeps in its data directory (`DATA/images`): the one its driver
    /// runs images from, and that `cloud48 agent --import-image` fills.
    pub fn open_server(data_dir: &Path) -> Result<Store, ImageError> {
        Store::open(data_dir.join("images"))
    }

    /// Opens the store in `root`, creating it if needed, and removes temporary files an
    /// interrupted import left.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, ImageError> {
        let store = Store { root: root.into() };
        let root = &store.root;
        fs::create_dir_all(root.join("blobs/sha256"))
            .map_err(ImageError::io(format!("creating {}", root.display())))?;
        fs::create_dir_all(root.join("tmp"))
            .map_err(ImageError::io(format!("creating {}/tmp", root.display())))?;
        let lock = store.lock()?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !root.join("index.json").exists() {
            store.write_index(&empty_index())?;
        }
        for entry in fs::read_dir(root.join("tmp"))
            .map_err(ImageError::io(format!("reading {}/tmp", root.display())))?
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
        drop(lock);
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn lock(&self) -> Result<Lock, ImageError> {
        Store::lock_file(&self.root.join(".lock"))
    }

    /// An exclusive lock on the file `path` (created if needed), until dropped.
    pub(crate) fn lock_file(path: &Path) -> Result<Lock, ImageError> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(ImageError::io(format!("opening {}", path.display())))?;
        f.lock()
            .map_err(ImageError::io(format!("locking {}", path.display())))?;
        Ok(Lock(f))
    }

    /// Where the blob `digest` is (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob `digest` is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens the blob `digest` for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, ImageError> {
        File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ImageError::NotFound(format!("this store has no blob {digest}"))
            }
            _ => ImageError::Io {
                context: format!("opening blob {digest}"),
                source: e,
            },
        })
    }

    pub(crate) fn temp_path(&self) -> PathBuf {
        let n = TEMP.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let tmp = self.temp_path();
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ImageError::Io {
                context: format!("writing {}", path.display()),
                source: e,
            }
        })
    }

    /// Streams `reader` into the store as one blob, computing its digest on the way. With
    /// `expected`, the content must have that digest (and `size`, if given) or nothing is kept;
    /// a blob already present is not written again, but what `reader` gives is still checked
    /// (an archive whose copy of a blob is corrupt is refused, whatever the store holds).
    /// `what` names the blob in errors. Returns the digest, the size and whether the blob is
    /// new.
    pub fn write_blob(
        &self,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
        size: Option<u64>,
        what: &str,
    ) -> Result<(Digest, u64, bool), ImageError> {
        if let Some(d) = expected
            && let Ok(meta) = fs::metadata(self.blob_path(d))
            && size.is_none_or(|s| s == meta.len())
        {
            let (digest, read) = hash_stream(reader, &mut std::io::sink(), what)?;
            check_blob(expected, size, &digest, read, what)?;
            return Ok((d.clone(), meta.len(), false));
        }
        let tmp = self.temp_path();
        let result = self.copy_hashing(reader, &tmp, what);
        let (digest, written) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = check_blob(expected, size, &digest, written, what) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let path = self.blob_path(&digest);
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ImageError::Io {
                context: format!("storing {what} as {}", path.display()),
                source: e,
            }
        })?;
        Ok((digest, written, true))
    }

    fn copy_hashing(
        &self,
        reader: &mut dyn Read,
        tmp: &Path,
        what: &str,
    ) -> Result<(Digest, u64), ImageError> {
        let mut out = File::create(tmp).map_err(ImageError::io(format!(
            "creating {} for {what}",
            tmp.display()
        )))?;
        let done = hash_stream(reader, &mut out, what)?;
        out.sync_all().map_err(ImageError::io(format!(
            "writing {what} into the image store"
        )))?;
        Ok(done)
    }

    /// Reads a small JSON blob (manifest, index, config) whole, checking its digest again.
    pub(crate) fn read_json_blob(
        &self,
        digest: &Digest,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(ImageError::io(format!("reading {what}")))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(ImageError::Corrupt(format!(
                "{what} is larger than {MAX_JSON} bytes; it is not a manifest or config"
            )));
        }
        if Digest::from_sha256(&Sha256::digest(&bytes)) != *digest {
            return Err(ImageError::Corrupt(format!(
                "{what} in the store no longer matches its digest {digest}; remove the image and import it again"
            )));
        }
        Ok(bytes)
    }

    pub(crate) fn read_index(&self) -> Result<ImageIndex, ImageError> {
        let path = self.root.join("index.json");
        let f = File::open(&path).map_err(ImageError::io(format!("opening {}", path.display())))?;
        ImageIndex::from_reader(f.take(MAX_JSON))
            .map_err(|e| json_error(&format!("the store's index {}", path.display()), e))
    }

    pub(crate) fn write_index(&self, index: &ImageIndex) -> Result<(), ImageError> {
        let bytes = index
            .to_string_pretty()
            .map_err(|e| json_error("the store's new index", e))?;
        self.write_atomic(&self.root.join("index.json"), bytes.as_bytes())
    }

    pub(crate) fn manifest(&self, digest: &Digest) -> Result<ImageManifest, ImageError> {
        let what = format!("manifest {digest}");
        let bytes = self.read_json_blob(digest, &what)?;
        ImageManifest::from_reader(&bytes[..]).map_err(|e| json_error(&what, e))
    }

    pub(crate) fn config(&self, digest: &Digest) -> Result<ImageConfiguration, ImageError> {
        let what = format!("image config {digest}");
        let bytes = self.read_json_blob(digest, &what)?;
        ImageConfiguration::from_reader(&bytes[..]).map_err(|e| json_error(&what, e))
    }

    fn summarize(&self, d: &Descriptor) -> Result<ImageDetails, ImageError> {
        let digest: Digest = d.digest().to_string().parse()?;
        let manifest = self.manifest(&digest)?;
        let config_digest: Digest = manifest.config().digest().to_string().parse()?;
        let config = self.config(&config_digest)?;
        let name = d
            .annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .and_then(|n| n.parse().ok());
        let diff_ids = config.rootfs().diff_ids();
        let layers: Vec<LayerInfo> = manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(LayerInfo {
                    digest: l.digest().to_string().parse()?,
                    size: l.size(),
                    media_type: l.media_type().to_string(),
                    diff_id: diff_ids.get(i).cloned().unwrap_or_default(),
                })
            })
            .collect::<Result<_, ImageError>>()?;
        let c = config.config().clone().unwrap_or_default();
        Ok(ImageDetails {
            summary: ImageSummary {
                name,
                digest,
                size: d.size()
                    + manifest.config().size()
                    + layers.iter().map(|l| l.size).sum::<u64>(),
                architecture: config.architecture().to_string(),
                os: config.os().to_string(),
                created: config.created().clone(),
                layer_count: layers.len(),
            },
            config: config_digest,
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            workdir: c.working_dir().clone(),
            exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
            layers,
        })
    }

    /// Every image in the store, by name (unnamed ones last, by digest).
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        let mut out: Vec<ImageSummary> = self
            .read_index()?
            .manifests()
            .iter()
            .map(|d| self.summarize(d).map(|d| d.summary))
            .collect::<Result<_, _>>()?;
        out.sort_by(|a, b| {
            (a.name.is_none(), &a.name, &a.digest).cmp(&(b.name.is_none(), &b.name, &b.digest))
        });
        Ok(out)
    }

    /// The images `what` (a name, or a manifest digest or its first 12 or more hex digits)
    /// designates, as `remove` would find them.
    pub fn designated(&self, what: &str) -> Result<Vec<ImageSummary>, ImageError> {
        let index = self.read_index()?;
        self.find(&index, what)?
            .into_iter()
            .map(|i| self.summarize(&index.manifests()[i]).map(|d| d.summary))
            .collect()
    }

    /// The descriptors in the index that `what` (a name, or a manifest digest or its first 12
    /// or more hex digits) designates.
    fn find(&self, index: &ImageIndex, what: &str) -> Result<Vec<usize>, ImageError> {
        let by_digest = |d: &Descriptor| {
            let text = d.digest().to_string();
            let hex = text.strip_prefix("sha256:").unwrap_or(&text);
            text == what || (what.len() >= 12 && hex.starts_with(what))
        };
        let name: Option<Name> = what.parse().ok();
        let found: Vec<usize> = index
            .manifests()
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                by_digest(d)
                    || name.as_ref().is_some_and(|n| {
                        d.annotations()
                            .as_ref()
                            .and_then(|a| a.get(REF_NAME))
                            .is_some_and(|r| *r == n.to_string())
                    })
            })
            .map(|(i, _)| i)
            .collect();
        if found.is_empty() {
            return Err(ImageError::NotFound(not_found_message(index, what)));
        }
        Ok(found)
    }

    /// The image `what` designates (a name or a manifest digest), with its config.
    pub fn show(&self, what: &str) -> Result<ImageDetails, ImageError> {
        let index = self.read_index()?;
        let found = self.find(&index, what)?;
        self.summarize(&index.manifests()[found[0]])
    }

    /// Gives the image `digest` the name `name`, taking the name from any image that had it.
    pub(crate) fn tag_locked(
        &self,
        index: &mut ImageIndex,
        descriptor: Descriptor,
        name: Option<&Name>,
    ) {
        let digest = descriptor.digest().to_string();
        let mut manifests = index.manifests().clone();
        if let Some(name) = name {
            let text = name.to_string();
            manifests
                .retain(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)) != Some(&text));
            let mut d = descriptor;
            d.set_annotations(Some(HashMap::from([(REF_NAME.to_string(), text)])));
            d.set_platform(None);
            manifests.push(d);
        } else if !manifests.iter().any(|d| d.digest().to_string() == digest) {
            let mut d = descriptor;
            d.set_annotations(None);
            manifests.push(d);
        }
        index.set_manifests(manifests);
    }

    /// Removes the image `what` designates (every name of it when `what` is a digest), then
    /// every blob no remaining image uses.
    pub fn remove(&self, what: &str) -> Result<Removed, ImageError> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let found = self.find(&index, what)?;
        let mut names = Vec::new();
        let mut i = 0;
        let mut manifests = index.manifests().clone();
        manifests.retain(|d| {
            let keep = !found.contains(&i);
            i += 1;
            if !keep {
                names.push(
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME).cloned())
                        .unwrap_or_else(|| d.digest().to_string()),
                );
            }
            keep
        });
        index.set_manifests(manifests);
        self.write_index(&index)?;
        let (blobs, bytes) = self.collect_garbage_locked(&index)?;
        Ok(Removed {
            names,
            blobs,
            bytes,
        })
    }

    /// The blobs the images of `index` use.
    fn referenced(&self, index: &ImageIndex) -> Result<BTreeSet<String>, ImageError> {
        let mut used = BTreeSet::new();
        for d in index.manifests() {
            let digest: Digest = d.digest().to_string().parse()?;
            used.insert(digest.hex().to_string());
            if let Ok(m) = self.manifest(&digest) {
                used.insert(digest_hex(m.config().digest().as_ref()));
                for l in m.layers() {
                    used.insert(digest_hex(l.digest().as_ref()));
                }
            }
        }
        Ok(used)
    }

    /// Deletes the blobs no image of `index` uses; the caller holds the lock.
    pub(crate) fn collect_garbage_locked(
        &self,
        index: &ImageIndex,
    ) -> Result<(usize, u64), ImageError> {
        let used = self.referenced(index)?;
        let dir = self.root.join("blobs/sha256");
        let (mut blobs, mut bytes) = (0, 0);
        for entry in fs::read_dir(&dir)
            .map_err(ImageError::io(format!("reading {}", dir.display())))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if !used.contains(&name) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    blobs += 1;
                    bytes += len;
                }
            }
        }
        Ok((blobs, bytes))
    }
}

fn digest_hex(d: &str) -> String {
    d.strip_prefix("sha256:").unwrap_or(d).to_string()
}

pub(crate) fn empty_index() -> ImageIndex {
    ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::<Descriptor>::new())
        .build()
        .expect("an empty index is complete")
}

/// Why `what` designates no image of `index`, and how to get it: the tags the store holds of
/// the same repository (a name without a tag means `:latest`), the reference recipe of a
/// `cloud48/NAME` image.
fn not_found_message(index: &ImageIndex, what: &str) -> String {
    let repository = |n: &str| {
        n.rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(n, |(r, _)| r)
            .to_string()
    };
    let wanted = repository(what);
    let tags: Vec<String> = index
        .manifests()
        .iter()
        .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).cloned())
        .filter(|n| repository(n) == wanted)
        .collect();
    let recipe = match wanted.strip_prefix("cloud48/") {
        Some(x) if !x.is_empty() => format!("images/{x}.toml"),
        _ => "RECIPE".to_string(),
    };
    let mut message = format!("no image '{what}' in the store");
    if !tags.is_empty() {
        message.push_str(&format!(
            " (a name without a tag means :latest; the store has {})",
            tags.join(", ")
        ));
    }
    message.push_str(&format!(
        ": build it (`cloud48 image build {recipe}`) or import it (`cloud48 image import \
         FILE`); `cloud48 image list` shows the images there are"
    ));
    message
}

/// Copies `reader` into `out`, hashing it: its digest and length.
fn hash_stream(
    reader: &mut dyn Read,
    out: &mut dyn Write,
    what: &str,
) -> Result<(Digest, u64), ImageError> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ImageError::Io {
                    context: format!("reading {what}"),
                    source: e,
                });
            }
        };
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(ImageError::io(format!(
            "writing {what} into the image store"
        )))?;
        written += n as u64;
    }
    Ok((Digest::from_sha256(&hash.finalize()), written))
}

/// Refuses a blob whose content (`digest`, `len` bytes) is not what its descriptor says.
fn check_blob(
    expected: Option<&Digest>,
    size: Option<u64>,
    digest: &Digest,
    len: u64,
    what: &str,
) -> Result<(), ImageError> {
    let mismatch = match (expected, size) {
        (_, Some(s)) if s != len => Some(format!(
            "{what} is truncated or padded: {len} bytes where its descriptor says {s}"
        )),
        (Some(d), _) if d != digest => Some(format!(
            "{what} does not match its digest: expected {d}, the content is {digest}"
        )),
        _ => None,
    };
    mismatch.map_or(Ok(()), |m| Err(ImageError::Corrupt(m)))
}
