//! Cloud48's image store: a directory that is itself an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`), so any OCI tool (skopeo, umoci) can read it.
//!
//! Every blob is written to a temporary file while its sha256 is computed and only renamed into
//! `blobs/` when digest and size match what its descriptor says; an image appears in `index.json`
//! only once its manifest, config and every layer are present and verified, so a failed or
//! interrupted import leaves nothing that looks like an image (its new blobs are removed). The
//! index names each image by an annotation `org.opencontainers.image.ref.name` holding its full
//! name, `repository:tag`.

mod import;
mod pull;
mod recipe;
mod reference;
mod store;
#[cfg(test)]
mod tests;
mod write;

pub use pull::{PullProgress, Source};
pub use recipe::{Builder, DEFAULT_MIRROR, FileSpec, Recipe};
pub use reference::{DEFAULT_TAG, Digest, Name};
pub use store::{ImageDetails, ImageSummary, LayerInfo, Removed, Store};
pub use write::{NewImage, NewLayer, archive_layout};

/// Why an image operation failed. Each message names the image, blob or file and says what to
/// do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A digest that is not `sha256:` and 64 lowercase hex digits.
    #[error("{0}")]
    BadDigest(String),
    /// An image name that is not `repository[:tag]`.
    #[error("{0}")]
    BadName(String),
    /// No image (or blob) by that name or digest.
    #[error("{0}")]
    NotFound(String),
    /// Content that does not match its digest or size, or that is not what it claims to be.
    #[error("{0}")]
    Corrupt(String),
    /// A well-formed input this store does not take (a docker archive, another architecture).
    #[error("{0}")]
    Unsupported(String),
    /// A recipe that cannot be built as written.
    #[error("{0}")]
    Recipe(String),
    /// A build step (debootstrap, apt-get, a `run` command) failed; the message ends with its
    /// output.
    #[error("{0}")]
    Build(String),
    /// The file system failed (a full disk, a missing permission).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}

/// The OCI architecture of this machine (`amd64`, `arm64`, …), which an image must match.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}
