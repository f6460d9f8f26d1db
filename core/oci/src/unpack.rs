//! Image layers unpacked into one root file system: OCI whiteouts applied, each layer's
//! uncompressed digest checked against the config's `diff_id`, owners shifted into the range a
//! user namespace maps to root, device nodes left out (the runtime gives `/dev`).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use cloud48_image::{Digest, ImageDetails, Store};
use sha2::{Digest as _, Sha256};

use crate::OciError;

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The path of a layer entry below the root, without `.`, `..` or a leading `/`; `None` for an
/// entry that would leave the root.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Unpacks the layers of `image` (from `store`) into `dest`, which must not exist: first into
/// `dest.partial`, renamed when complete, so `dest` is either whole or absent. Owners are
/// shifted by `id_shift` (0 for none).
pub fn unpack(
    store: &Store,
    image: &ImageDetails,
    dest: &Path,
    id_shift: u32,
) -> Result<(), OciError> {
    let partial = dest.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)
        .map_err(OciError::io(format!("creating {}", partial.display())))?;
    let name = image
        .summary
        .name
        .as_ref()
        .map_or_else(|| image.summary.digest.to_string(), |n| n.to_string());
    let result = image
        .layers
        .iter()
        .try_for_each(|layer| unpack_layer(store, &layer.digest, &layer.diff_id, &partial, &name));
    let result = result.and_then(|()| {
        if id_shift > 0 {
            shift_owners(&partial, id_shift)?;
        }
        fs::rename(&partial, dest).map_err(OciError::io(format!("renaming {}", partial.display())))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

fn unpack_layer(
    store: &Store,
    digest: &Digest,
    diff_id: &str,
    root: &Path,
    image: &str,
) -> Result<(), OciError> {
    let what = format!("layer {} of image {image}", digest.short());
    // Sniff gzip from the buffer (as an import does), without reading the blob twice.
    let mut blob = io::BufReader::new(store.open_blob(digest)?);
    let gzip = io::BufRead::fill_buf(&mut blob)
        .map_err(OciError::io(format!("reading {what}")))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let mut hashing = Hashing {
        inner: reader,
        hash: Sha256::new(),
    };
    let corrupt = |e: io::Error| OciError::Image(format!("{what} cannot be read: {e}"));
    {
        let mut archive = tar::Archive::new(&mut hashing);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_unpack_xattrs(false);
        archive.set_overwrite(true);
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            let path = entry.path().map_err(corrupt)?.into_owned();
            let Some(rel) = relative(&path) else {
                return Err(OciError::Image(format!(
                    "{what} has an entry outside the root: {}",
                    path.display()
                )));
            };
            let file_name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(name) = file_name.as_deref().and_then(|n| n.strip_prefix(".wh.")) {
                let dir = root.join(rel.parent().unwrap_or(Path::new("")));
                if name == ".wh..opq" {
                    // Opaque directory: what lower layers put there is hidden.
                    if let Ok(children) = fs::read_dir(&dir) {
                        for c in children.flatten() {
                            remove_any(&c.path());
                        }
                    }
                } else {
                    remove_any(&dir.join(name));
                }
                continue;
            }
            let kind = entry.header().entry_type();
            if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                continue;
            }
            // A later layer replaces a directory by a file (or the reverse) wholesale.
            let target = root.join(&rel);
            if let Ok(m) = fs::symlink_metadata(&target)
                && m.is_dir() != kind.is_dir()
            {
                remove_any(&target);
            }
            entry.unpack_in(root).map_err(|e| {
                OciError::Image(format!("{what}: cannot unpack {}: {e}", rel.display()))
            })?;
        }
    }
    // Read what follows the tar's end so the digest covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).map_err(corrupt)?;
    let actual = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
    if actual != diff_id {
        return Err(OciError::Image(format!(
            "{what} does not match its diff_id: expected {diff_id}, the content is {actual}; remove the image and import it again"
        )));
    }
    Ok(())
}

/// Adds `shift` to the owner and group of everything under `root` (not following links),
/// keeping set-user-id and set-group-id bits that `chown` clears.
fn shift_owners(root: &Path, shift: u32) -> Result<(), OciError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)
            .map_err(OciError::io(format!("reading {}", path.display())))?;
        std::os::unix::fs::lchown(&path, Some(meta.uid() + shift), Some(meta.gid() + shift))
            .map_err(OciError::io(format!(
                "changing the owner of {}",
                path.display()
            )))?;
        if !meta.file_type().is_symlink() && meta.mode() & 0o6000 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(
                OciError::io(format!("restoring the mode of {}", path.display())),
            )?;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)
                .map_err(OciError::io(format!("reading {}", path.display())))?
                .flatten()
            {
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_cannot_leave_the_root() {
        assert_eq!(relative(Path::new("./etc/x")), Some(PathBuf::from("etc/x")));
        assert_eq!(relative(Path::new("/etc/x")), Some(PathBuf::from("etc/x")));
        assert_eq!(relative(Path::new("etc/../../x")), None);
    }
}
