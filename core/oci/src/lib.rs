//! The OCI runtime side of Cloud48's containers: an image's layers unpacked into a root file
//! system shared read-only by its containers (`unpack.rs`), each container's root an overlay of
//! it and the container's own upper directory, an OCI runtime bundle generated with `oci-spec`
//! (`bundle.rs`: user, PID, mount, UTS, IPC and network namespaces, cgroup limits, Docker's
//! default capabilities), and Debian's runc running it (`runc.rs`), checkpointing and
//! restoring it through CRIU where CRIU works (`criu.rs`).

mod bundle;
mod criu;
mod runc;
mod unpack;

pub use bundle::{
    Bundle, DEFAULT_ID_MAP, IdMap, is_mounted, mount_overlay, mounts_under, unmount, unmount_under,
};
pub use criu::criu_works;
pub use runc::{ExecOutput, Runc, RuncState, RuncStatus};
pub use unpack::unpack;

/// Why preparing or running an OCI container failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image is missing, corrupt or cannot be unpacked.
    #[error("{0}")]
    Image(String),
    /// The bundle cannot be made.
    #[error("{0}")]
    Bundle(String),
    /// runc is missing or refused.
    #[error("{0}")]
    Runtime(String),
    /// The file system failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
        let context = context.into();
        move |source| OciError::Io { context, source }
    }
}

impl From<cloud48_image::ImageError> for OciError {
    fn from(e: cloud48_image::ImageError) -> Self {
        OciError::Image(e.to_string())
    }
}

#[cfg(test)]
mod tests;
