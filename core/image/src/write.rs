//! Writing new images into the store: layers streamed from a directory (tar, gzip) with both
//! digests computed on the way, then config, manifest and the index entry.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageManifestBuilder, MediaType,
    RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Digest, ImageError, ImageSummary, Name, Store, host_architecture};

/// A layer written into the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewLayer {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Size of the compressed blob.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
}

/// The process settings of a new image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewImage {
    /// Entrypoint (may be empty).
    pub entrypoint: Vec<String>,
    /// Command, the entrypoint's arguments.
    pub cmd: Vec<String>,
    /// Environment, `NAME=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Ports it serves on (`80/tcp`).
    pub exposed_ports: Vec<String>,
    /// When it was built (RFC 3339); left out for reproducible images.
    pub created: Option<String>,
    /// Labels (recipe hash, builder version).
    pub labels: Vec<(String, String)>,
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Store {
    /// Writes the directory `dir` as one layer (a gzip-compressed tar of its content, owners,
    /// modes, links and device nodes kept, symbolic links not followed), streamed: never whole
    /// in memory.
    pub fn write_layer_from_dir(&self, dir: &Path) -> Result<NewLayer, ImageError> {
        let what = format!("the layer of {}", dir.display());
        let tmp = self.temp_path();
        let result = (|| -> io::Result<(Digest, u64, Digest)> {
            let file = Hashing {
                inner: io::BufWriter::with_capacity(256 * 1024, File::create(&tmp)?),
                hash: Sha256::new(),
                len: 0,
            };
            let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let tar_out = Hashing {
                inner: gz,
                hash: Sha256::new(),
                len: 0,
            };
            let mut tar = tar::Builder::new(tar_out);
            tar.follow_symlinks(false);
            tar.mode(tar::HeaderMode::Complete);
            tar.append_dir_all(".", dir)?;
            let tar_out = tar.into_inner()?;
            let diff_id = Digest::from_sha256(&tar_out.hash.finalize());
            let mut file = tar_out.inner.finish()?;
            file.flush()?;
            let digest = Digest::from_sha256(&file.hash.finalize());
            let size = file.len;
            file.inner
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()?;
            Ok((digest, size, diff_id))
        })();
        let (digest, size, diff_id) = result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ImageError::Io {
                context: format!("writing {what}"),
                source: e,
            }
        })?;
        fs::rename(&tmp, self.blob_path(&digest)).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ImageError::Io {
                context: format!("storing {what}"),
                source: e,
            }
        })?;
        Ok(NewLayer {
            digest,
            size,
            diff_id,
        })
    }

    /// Writes the config and manifest of an image made of `layers` (bottom first) and gives it
    /// `name`. The layers must have been written by [`Store::write_layer_from_dir`].
    pub fn commit(
        &self,
        name: &Name,
        layers: &[NewLayer],
        image: &NewImage,
    ) -> Result<ImageSummary, ImageError> {
        let bad = |e: oci_spec::OciSpecError| {
            ImageError::Corrupt(format!("the new image {name} is not complete: {e}"))
        };
        let mut config = ConfigBuilder::default()
            .entrypoint(image.entrypoint.clone())
            .cmd(image.cmd.clone())
            .env(image.env.clone())
            .exposed_ports(image.exposed_ports.clone())
            .labels(
                image
                    .labels
                    .iter()
                    .cloned()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
        if let Some(w) = &image.workdir {
            config = config.working_dir(w.clone());
        }
        let mut configuration = ImageConfigurationBuilder::default()
            .architecture(host_architecture())
            .os("linux")
            .config(config.build().map_err(bad)?)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(
                        layers
                            .iter()
                            .map(|l| l.diff_id.to_string())
                            .collect::<Vec<_>>(),
                    )
                    .build()
                    .map_err(bad)?,
            );
        if let Some(c) = &image.created {
            configuration = configuration.created(c.clone());
        }
        let config_json = configuration
            .build()
            .map_err(bad)?
            .to_string()
            .map_err(bad)?;
        let (config_digest, config_size) =
            self.put_json(config_json.as_bytes(), &format!("the config of {name}"))?;
        let oci_digest = |d: &Digest| -> Result<oci_spec::image::Digest, ImageError> {
            d.as_str()
                .parse()
                .map_err(|e| ImageError::BadDigest(format!("{d}: {e}")))
        };
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(
                DescriptorBuilder::default()
                    .media_type(MediaType::ImageConfig)
                    .size(config_size)
                    .digest(oci_digest(&config_digest)?)
                    .build()
                    .map_err(bad)?,
            )
            .layers(
                layers
                    .iter()
                    .map(|l| {
                        DescriptorBuilder::default()
                            .media_type(MediaType::ImageLayerGzip)
                            .size(l.size)
                            .digest(oci_digest(&l.digest)?)
                            .build()
                            .map_err(bad)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
            .build()
            .map_err(bad)?;
        let manifest_json = manifest.to_string().map_err(bad)?;
        let (manifest_digest, manifest_size) =
            self.put_json(manifest_json.as_bytes(), &format!("the manifest of {name}"))?;
        let descriptor = DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .size(manifest_size)
            .digest(oci_digest(&manifest_digest)?)
            .build()
            .map_err(bad)?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        self.tag_locked(&mut index, descriptor, Some(name));
        self.write_index(&index)?;
        self.show(manifest_digest.as_str()).map(|d| d.summary)
    }

    fn put_json(&self, bytes: &[u8], what: &str) -> Result<(Digest, u64), ImageError> {
        let expected = Digest::from_sha256(&Sha256::digest(bytes));
        let (digest, size, _) = self.write_blob(&mut &bytes[..], Some(&expected), None, what)?;
        Ok((digest, size))
    }
}

/// Writes the OCI layout directory `dir` as an OCI archive (an uncompressed tar of its
/// `oci-layout`, `index.json` and `blobs/`) to `out`, streamed.
pub fn archive_layout(dir: &Path, out: impl Write) -> Result<(), ImageError> {
    if !dir.join("oci-layout").is_file() {
        return Err(ImageError::Unsupported(format!(
            "{} is not an OCI image layout (it has no oci-layout file)",
            dir.display()
        )));
    }
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let result = (|| -> io::Result<()> {
        tar.append_path_with_name(dir.join("oci-layout"), "oci-layout")?;
        tar.append_path_with_name(dir.join("index.json"), "index.json")?;
        tar.append_dir_all("blobs", dir.join("blobs"))?;
        tar.into_inner()?.flush()
    })();
    result.map_err(ImageError::io(format!("archiving {}", dir.display())))
}
