//! Pulling an image by digest from another store (the core's, or a peer agent's), blob by blob,
//! each verified, resuming a blob an interrupted pull left half-written.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Digest, ImageError, ImageSummary, Name, Store};

/// Where a pull reads from. The agent implements it over HTTP (`GET /v1/images/{name}` and
/// `GET /v1/images/blobs/{digest}` with `Range: bytes=OFFSET-`); tests over another store.
pub trait Source {
    /// The manifest digest of `image` (a name or a digest) at the source.
    fn resolve(&self, image: &str) -> Result<Digest, ImageError>;
    /// The bytes of blob `digest` from `offset` on.
    fn blob(&self, digest: &Digest, offset: u64) -> Result<Box<dyn Read + '_>, ImageError>;
}

/// How far a pull is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    /// Bytes of the image already here (blobs present before the pull count as done).
    pub done: u64,
    /// Bytes of the whole image, once its manifest is known.
    pub total: u64,
}

impl Store {
    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.root().join("partial").join(digest.hex())
    }

    /// Pulls `image` from `source` into this store and names it `name` (if given); blobs
    /// already here are not fetched again, and a blob an earlier pull left half-written is
    /// resumed from where it stopped. Calls `progress` as bytes arrive.
    pub fn pull(
        &self,
        source: &dyn Source,
        image: &str,
        name: Option<&Name>,
        progress: &mut dyn FnMut(&PullProgress),
    ) -> Result<ImageSummary, ImageError> {
        let _lock = self.lock()?;
        fs::create_dir_all(self.root().join("partial"))
            .map_err(ImageError::io("creating the store's partial directory"))?;
        let digest = source.resolve(image)?;
        let mut state = PullProgress { done: 0, total: 0 };
        self.fetch_remote(
            source,
            &digest,
            None,
            &format!("manifest of {image}"),
            &mut state,
            progress,
        )?;
        let manifest = self.manifest(&digest)?;
        let config: Digest = manifest.config().digest().to_string().parse()?;
        let layers: Vec<(Digest, u64)> = manifest
            .layers()
            .iter()
            .map(|l| Ok((l.digest().to_string().parse()?, l.size())))
            .collect::<Result<_, ImageError>>()?;
        let manifest_size = fs::metadata(self.blob_path(&digest))
            .map(|m| m.len())
            .unwrap_or(0);
        state.total =
            manifest_size + manifest.config().size() + layers.iter().map(|(_, s)| s).sum::<u64>();
        let config_size = Some(manifest.config().size());
        self.fetch_remote(
            source,
            &config,
            config_size,
            &format!("config of {image}"),
            &mut state,
            progress,
        )?;
        for (i, (layer, size)) in layers.iter().enumerate() {
            let what = format!("layer {} of {} of {image}", i + 1, layers.len());
            self.fetch_remote(source, layer, Some(*size), &what, &mut state, progress)?;
        }
        let descriptor = oci_spec::image::DescriptorBuilder::default()
            .media_type(oci_spec::image::MediaType::ImageManifest)
            .size(manifest_size)
            .digest(
                digest
                    .as_str()
                    .parse::<oci_spec::image::Digest>()
                    .map_err(|e| ImageError::BadDigest(format!("{digest}: {e}")))?,
            )
            .build()
            .map_err(|e| ImageError::Corrupt(format!("the manifest of {image}: {e}")))?;
        let mut index = self.read_index()?;
        self.tag_locked(&mut index, descriptor, name);
        self.write_index(&index)?;
        self.show(digest.as_str()).map(|d| d.summary)
    }

    /// Makes sure blob `digest` is here, fetching the rest of it from `source`.
    fn fetch_remote(
        &self,
        source: &dyn Source,
        digest: &Digest,
        size: Option<u64>,
        what: &str,
        state: &mut PullProgress,
        progress: &mut dyn FnMut(&PullProgress),
    ) -> Result<(), ImageError> {
        if let Ok(meta) = fs::metadata(self.blob_path(digest)) {
            state.done += meta.len();
            progress(state);
            return Ok(());
        }
        let partial = self.partial_path(digest);
        // What an interrupted pull wrote is kept; hash it again and ask for the rest.
        let mut hash = Sha256::new();
        let mut have = 0u64;
        if let Ok(mut f) = File::open(&partial) {
            have = io::copy(&mut f, &mut HashWriter(&mut hash))
                .map_err(ImageError::io(format!("reading the partial {what}")))?;
        }
        if size.is_some_and(|s| have > s) {
            let _ = fs::remove_file(&partial);
            (hash, have) = (Sha256::new(), 0);
        }
        state.done += have;
        let mut out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .map_err(ImageError::io(format!("opening the partial {what}")))?;
        let mut reader = source.blob(digest, have)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Kept: the next pull resumes here.
                    return Err(ImageError::Io {
                        context: format!(
                            "pulling {what} ({digest}) broke off after {have} bytes; pulling again resumes there"
                        ),
                        source: e,
                    });
                }
            };
            out.write_all(&buf[..n]).map_err(ImageError::io(format!(
                "writing {what} into the image store"
            )))?;
            hash.update(&buf[..n]);
            have += n as u64;
            state.done += n as u64;
            progress(state);
            if size.is_some_and(|s| have > s) {
                break;
            }
        }
        out.sync_all().map_err(ImageError::io(format!(
            "writing {what} into the image store"
        )))?;
        let actual = Digest::from_sha256(&hash.finalize());
        let wrong = match size {
            Some(s) if s != have => Some(format!(
                "{what} has {have} bytes at the source where its manifest says {s}"
            )),
            _ if actual != *digest => Some(format!(
                "{what} does not match its digest: expected {digest}, the content is {actual}"
            )),
            _ => None,
        };
        if let Some(w) = wrong {
            let _ = fs::remove_file(&partial);
            return Err(ImageError::Corrupt(w));
        }
        fs::rename(&partial, self.blob_path(digest))
            .map_err(ImageError::io(format!("storing {what}")))
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Another store as a source (a peer's store on a shared disk; the tests).
impl Source for Store {
    fn resolve(&self, image: &str) -> Result<Digest, ImageError> {
        self.show(image).map(|d| d.summary.digest)
    }

    fn blob(&self, digest: &Digest, offset: u64) -> Result<Box<dyn Read + '_>, ImageError> {
        use std::io::Seek;
        let mut f = self.open_blob(digest)?;
        f.seek(io::SeekFrom::Start(offset))
            .map_err(ImageError::io(format!("reading blob {digest}")))?;
        Ok(Box::new(f))
    }
}
