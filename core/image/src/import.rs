//! Importing images from an OCI image layout (a directory) or an OCI archive (that directory as
//! a tar, plain or gzip-compressed, as `podman save --format oci-archive` and `skopeo copy …
//! oci-archive:` write it).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path};

use oci_spec::image::{Descriptor, ImageIndex, MediaType};

use crate::store::{MAX_JSON, REF_NAME};
use crate::{Digest, ImageError, ImageSummary, Name, Store, host_architecture};

/// The annotation containerd and podman put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Where an import reads blobs from.
enum Source<'a> {
    /// An OCI layout directory: blobs are copied (and verified) as they are needed.
    Layout(&'a Path),
    /// An archive already streamed: every blob it held is in the store.
    Streamed { source: String },
}

impl Store {
    /// Imports every image of the OCI layout directory or OCI archive file at `path`. With
    /// `name`, the (single) image imported takes that name; otherwise each keeps the name its
    /// source gives it, if any.
    pub fn import_path(
        &self,
        path: &Path,
        name: Option<&Name>,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        let meta = std::fs::metadata(path)
            .map_err(ImageError::io(format!("reading {}", path.display())))?;
        if meta.is_dir() {
            if !path.join("oci-layout").is_file() {
                return Err(if path.join("manifest.json").is_file() {
                    docker_format(&path.display().to_string())
                } else {
                    ImageError::Unsupported(format!(
                        "{} is not an OCI image layout (it has no oci-layout file); give a \
                         directory written by `skopeo copy … oci:DIR` or an OCI archive",
                        path.display()
                    ))
                });
            }
            check_layout_version(
                &std::fs::read(path.join("oci-layout")).map_err(ImageError::io(format!(
                    "reading {}/oci-layout",
                    path.display()
                )))?,
                &path.display().to_string(),
            )?;
            let index_path = path.join("index.json");
            let index = File::open(&index_path)
                .map_err(ImageError::io(format!("reading {}", index_path.display())))?;
            let index = ImageIndex::from_reader(index.take(MAX_JSON)).map_err(|e| {
                ImageError::Corrupt(format!("{} is not an OCI index: {e}", index_path.display()))
            })?;
            let _lock = self.lock()?;
            self.finish(index, Source::Layout(path), name)
        } else {
            let f =
                File::open(path).map_err(ImageError::io(format!("opening {}", path.display())))?;
            self.import_archive(f, &path.display().to_string(), name)
        }
    }

    /// Imports the images of an OCI archive read from `reader` (a tar, plain or gzip). `source`
    /// names it in errors.
    pub fn import_archive(
        &self,
        reader: impl Read,
        source: &str,
        name: Option<&Name>,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        let _lock = self.lock()?;
        let mut reader = BufReader::with_capacity(256 * 1024, reader);
        let gzip = reader
            .fill_buf()
            .map_err(ImageError::io(format!("reading {source}")))?
            .starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn Read + '_> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(reader))
        } else {
            Box::new(reader)
        };
        let index = match self.stream_blobs(reader, source) {
            Ok(index) => index,
            Err(e) => {
                self.collect_garbage_locked(&self.read_index()?)?;
                return Err(e);
            }
        };
        self.finish(
            index,
            Source::Streamed {
                source: source.to_string(),
            },
            name,
        )
    }

    /// Writes every blob of the archive into the store (each verified against the digest its
    /// path names) and returns the archive's index.
    fn stream_blobs(
        &self,
        reader: Box<dyn Read + '_>,
        source: &str,
    ) -> Result<ImageIndex, ImageError> {
        let corrupt = |e: std::io::Error| {
            ImageError::Corrupt(format!(
                "{source} is not a readable tar archive ({e}); give an OCI archive \
                 (`podman save --format oci-archive`) or an OCI layout directory"
            ))
        };
        let mut archive = tar::Archive::new(reader);
        let (mut index, mut layout, mut docker) = (None, None, false);
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(corrupt)?.into_owned();
            let parts: Vec<String> = path
                .components()
                .filter_map(|c| match c {
                    Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            match parts.as_slice() {
                ["index.json"] => index = Some(read_small(&mut entry, source, "index.json")?),
                ["oci-layout"] => layout = Some(read_small(&mut entry, source, "oci-layout")?),
                ["manifest.json"] => docker = true,
                ["blobs", "sha256", hex] => {
                    let digest: Digest = format!("sha256:{hex}").parse()?;
                    let size = entry.header().size().ok();
                    let what = format!("blob {digest} of {source}");
                    self.write_blob(&mut entry, Some(&digest), size, &what)?;
                }
                _ => {}
            }
        }
        let Some(layout) = layout else {
            return Err(if docker {
                docker_format(source)
            } else {
                ImageError::Unsupported(format!(
                    "{source} is not an OCI archive (it has no oci-layout file); give an OCI \
                     archive (`podman save --format oci-archive`) or an OCI layout directory"
                ))
            });
        };
        check_layout_version(&layout, source)?;
        let index = index.ok_or_else(|| {
            ImageError::Corrupt(format!(
                "{source} has no index.json: the archive is incomplete"
            ))
        })?;
        ImageIndex::from_reader(&index[..]).map_err(|e| {
            ImageError::Corrupt(format!("the index.json of {source} is not valid: {e}"))
        })
    }

    /// Verifies every image the source's index names and adds them to the store's index; on
    /// any error, the blobs this import added are removed and the index is unchanged.
    fn finish(
        &self,
        index: ImageIndex,
        source: Source<'_>,
        name: Option<&Name>,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        let result = self.verify_all(&index, &source, name);
        let mut store_index = self.read_index()?;
        let images = match result {
            Ok(images) => images,
            Err(e) => {
                self.collect_garbage_locked(&store_index)?;
                return Err(e);
            }
        };
        // What was imported: each digest with the name it took (or none).
        let imported: BTreeSet<(String, Option<String>)> = images
            .iter()
            .map(|(d, n)| (d.digest().to_string(), n.as_ref().map(Name::to_string)))
            .collect();
        for (descriptor, name) in images {
            self.tag_locked(&mut store_index, descriptor, name.as_ref());
        }
        self.write_index(&store_index)?;
        let list = self.list()?;
        Ok(list
            .into_iter()
            .filter(|s| {
                imported.contains(&(s.digest.to_string(), s.name.as_ref().map(Name::to_string)))
            })
            .collect())
    }

    /// The image manifests of `index` (following nested indexes to this machine's platform),
    /// each with every blob present and verified, with the name it takes.
    fn verify_all(
        &self,
        index: &ImageIndex,
        source: &Source<'_>,
        name: Option<&Name>,
    ) -> Result<Vec<(Descriptor, Option<Name>)>, ImageError> {
        let src = match source {
            Source::Layout(p) => p.display().to_string(),
            Source::Streamed { source } => source.clone(),
        };
        let mut images = Vec::new();
        for d in index.manifests() {
            let given = source_name(d);
            for m in self.manifests_of(d, source, &src)? {
                images.push((m, given.clone()));
            }
        }
        if images.is_empty() {
            return Err(ImageError::Unsupported(format!("{src} holds no image")));
        }
        if let Some(name) = name {
            if images.len() > 1 {
                return Err(ImageError::Unsupported(format!(
                    "{src} holds {} images; import it without a name (each keeps its own) or \
                     give a source with one image",
                    images.len()
                )));
            }
            images[0].1 = Some(name.clone());
        }
        for (d, _) in &images {
            self.verify_image(d, source, &src)?;
        }
        Ok(images)
    }

    /// The image manifests `d` stands for: itself, or the entries of a nested index for this
    /// machine's platform.
    fn manifests_of(
        &self,
        d: &Descriptor,
        source: &Source<'_>,
        src: &str,
    ) -> Result<Vec<Descriptor>, ImageError> {
        match d.media_type() {
            MediaType::ImageManifest => Ok(vec![d.clone()]),
            MediaType::ImageIndex => {
                let digest = self.fetch(d, source, src, "image index")?;
                let nested = ImageIndex::from_reader(
                    &self.read_json_blob(&digest, &format!("image index {digest} of {src}"))?[..],
                )
                .map_err(|e| ImageError::Corrupt(format!("image index {digest} of {src}: {e}")))?;
                let arch = host_architecture();
                let mut seen = Vec::new();
                let mine: Vec<Descriptor> = nested
                    .manifests()
                    .iter()
                    .filter(|m| match m.platform() {
                        Some(p) => {
                            seen.push(format!("{}/{}", p.os(), p.architecture()));
                            p.architecture().to_string() == arch && p.os().to_string() == "linux"
                        }
                        None => true,
                    })
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    return Err(ImageError::Unsupported(format!(
                        "{src} has no image for linux/{arch} (it has {}); build or pull one for this architecture",
                        seen.join(", ")
                    )));
                }
                Ok(mine)
            }
            other => Err(ImageError::Unsupported(format!(
                "{src} names a {other} where an image manifest or index belongs"
            ))),
        }
    }

    /// Makes sure the manifest `d`, its config and its layers are in the store and verified.
    fn verify_image(
        &self,
        d: &Descriptor,
        source: &Source<'_>,
        src: &str,
    ) -> Result<(), ImageError> {
        let digest = self.fetch(d, source, src, "manifest")?;
        let manifest = self.manifest(&digest)?;
        let config_digest = self.fetch(manifest.config(), source, src, "image config")?;
        let config = self.config(&config_digest)?;
        let image = format!("image {} of {src}", digest.short());
        let (arch, os) = (config.architecture().to_string(), config.os().to_string());
        if arch != host_architecture() || os != "linux" {
            return Err(ImageError::Unsupported(format!(
                "{image} is for {os}/{arch}; this machine runs linux/{}",
                host_architecture()
            )));
        }
        if config.rootfs().diff_ids().len() != manifest.layers().len() {
            return Err(ImageError::Corrupt(format!(
                "{image} has {} layers but its config lists {} diff_ids",
                manifest.layers().len(),
                config.rootfs().diff_ids().len()
            )));
        }
        for layer in manifest.layers() {
            match layer.media_type() {
                MediaType::ImageLayer | MediaType::ImageLayerGzip => {}
                MediaType::Other(t) if t == "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
                }
                other => {
                    return Err(ImageError::Unsupported(format!(
                        "{image} has a layer of type {other}; Cloud48 unpacks tar and tar+gzip layers"
                    )));
                }
            }
            self.fetch(layer, source, src, "layer")?;
        }
        Ok(())
    }

    /// Makes sure the blob `d` describes is in the store, copying it from a layout directory
    /// (verified) if needed.
    fn fetch(
        &self,
        d: &Descriptor,
        source: &Source<'_>,
        src: &str,
        kind: &str,
    ) -> Result<Digest, ImageError> {
        let digest: Digest = d.digest().to_string().parse()?;
        let what = format!("{kind} {digest} of {src}");
        match source {
            Source::Layout(dir) => {
                // Read even when the store has it: a corrupt copy in the layout is refused.
                let path = dir.join("blobs/sha256").join(digest.hex());
                let mut f = File::open(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => ImageError::Corrupt(format!(
                        "{what} is missing ({} does not exist)",
                        path.display()
                    )),
                    _ => ImageError::Io {
                        context: format!("reading {}", path.display()),
                        source: e,
                    },
                })?;
                self.write_blob(&mut f, Some(&digest), Some(d.size()), &what)?;
            }
            Source::Streamed { .. } => {
                let len = std::fs::metadata(self.blob_path(&digest)).map(|m| m.len());
                match len {
                    Ok(len) if len == d.size() => {}
                    Ok(len) => {
                        return Err(ImageError::Corrupt(format!(
                            "{what} has {len} bytes where its descriptor says {}",
                            d.size()
                        )));
                    }
                    Err(_) => {
                        return Err(ImageError::Corrupt(format!(
                            "{what} is missing from the archive"
                        )));
                    }
                }
            }
        }
        Ok(digest)
    }
}

/// The name a source's index gives an image, if it is a full name (a bare tag such as
/// `latest`, which `skopeo copy … oci:DIR:TAG` writes, is not).
fn source_name(d: &Descriptor) -> Option<Name> {
    let a = d.annotations().as_ref()?;
    a.get(CONTAINERD_NAME)
        .into_iter()
        .chain(a.get(REF_NAME).filter(|n| n.contains(['/', ':'])))
        .find_map(|n| n.parse().ok())
}

fn read_small(entry: &mut impl Read, source: &str, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut bytes = Vec::new();
    entry
        .take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(ImageError::io(format!("reading {what} of {source}")))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(ImageError::Corrupt(format!(
            "the {what} of {source} is larger than {MAX_JSON} bytes"
        )));
    }
    Ok(bytes)
}

fn check_layout_version(bytes: &[u8], source: &str) -> Result<(), ImageError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ImageError::Corrupt(format!("the oci-layout file of {source} is not JSON: {e}"))
    })?;
    match v.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some(v) if v.starts_with("1.") => Ok(()),
        other => Err(ImageError::Unsupported(format!(
            "{source} is an OCI layout of version {other:?}; Cloud48 reads version 1.x"
        ))),
    }
}

fn docker_format(source: &str) -> ImageError {
    ImageError::Unsupported(format!(
        "{source} is in Docker's format, not OCI's; save it with `podman save --format \
         oci-archive -o FILE IMAGE` or convert it with `skopeo copy docker-archive:{source} \
         oci-archive:FILE`"
    ))
}
