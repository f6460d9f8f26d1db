//! A container's upper directory as a tar stream: written with its owners, modes and overlay
//! whiteouts kept, and unpacked back exactly (export, import, live moves).

use super::*;

/// Writes a tar archive of a guest's upper directory to `out`, as it is walked (never whole
/// in memory): directories, files, symlinks and overlay whiteouts (character devices 0:0),
/// owners kept; anything else is skipped. Returns `out`.
pub fn archive_upper<W: Write>(upper: &Path, out: W) -> std::io::Result<W> {
    fn add<W: Write>(b: &mut tar::Builder<W>, root: &Path, dir: &Path) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            append_entry(b, root, &path)?;
            if e.file_type()?.is_dir() {
                add(b, root, &path)?;
            }
        }
        Ok(())
    }
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    add(&mut b, upper, upper)?;
    b.into_inner()
}

/// Writes a tar archive of just `entries` of `upper` (paths relative to it, parents first; a
/// directory without what it holds) to `out`, as `archive_upper` writes each: what a live
/// move's delta sends. Returns `out`.
pub fn archive_entries<W: Write>(upper: &Path, entries: &[PathBuf], out: W) -> std::io::Result<W> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    for e in entries {
        append_entry(&mut b, upper, &upper.join(e))?;
    }
    b.into_inner()
}

/// Appends `path` (under `root`, named relative to it) to `b`: a directory (its entry alone),
/// a file or symlink, an overlay whiteout; anything else is skipped.
fn append_entry<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    path: &Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let name = path.strip_prefix(root).expect("inside the root");
    let meta = std::fs::symlink_metadata(path)?;
    let kind = meta.file_type();
    if kind.is_dir() {
        b.append_dir(name, path)
    } else if kind.is_char_device() && meta.rdev() == 0 {
        // Built by hand: tar's own special-file path would store the absolute path.
        let mut h = tar::Header::new_gnu();
        h.set_metadata(&meta);
        h.set_entry_type(tar::EntryType::Char);
        h.set_device_major(0)?;
        h.set_device_minor(0)?;
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty())
    } else if kind.is_file() || kind.is_symlink() {
        b.append_path_with_name(path, name)
    } else {
        Ok(())
    }
}

/// Writes `archive_upper`'s archive of `upper`, gzip-compressed, to the file `to` (how guests
/// travel between servers); returns its size.
pub fn archive_upper_to_file(upper: &Path, to: &Path) -> std::io::Result<u64> {
    let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(to)?);
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let file = archive_upper(upper, gz)?.finish()?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Restores an upper directory from `archive_upper`'s archive read from `input`, plain or
/// gzip-compressed (told by its first bytes): owners and modes kept, whiteouts made again.
pub fn unpack_upper<R: Read>(input: R, upper: &Path) -> Result<(), DriverError> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let gzip = input
        .fill_buf()
        .map_err(|e| permanent(format!("cannot read the guest image: {e}")))?
        .starts_with(&[0x1f, 0x8b]);
    if gzip {
        unpack_tar(flate2::bufread::GzDecoder::new(input), upper)
    } else {
        unpack_tar(input, upper)
    }
}

fn unpack_tar<R: Read>(data: R, upper: &Path) -> Result<(), DriverError> {
    let bad = |e: std::io::Error| permanent(format!("the guest image is not a valid archive: {e}"));
    let mut archive = tar::Archive::new(data);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.header().entry_type() == tar::EntryType::Char {
            let path = entry.path().map_err(bad)?.into_owned();
            if path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(permanent(format!(
                    "the guest image names {} outside its directory",
                    path.display()
                )));
            }
            let target = upper.join(&path);
            // A delta may bring one where an entry was.
            if std::fs::symlink_metadata(&target).is_ok() {
                std::fs::remove_file(&target).map_err(bad)?;
            }
            let uid = entry.header().uid().map_err(bad)? as u32;
            let gid = entry.header().gid().map_err(bad)? as u32;
            whiteout(&target, uid, gid).map_err(bad)?;
            continue;
        }
        entry.unpack_in(upper).map_err(bad)?;
    }
    // The archive ends with two empty blocks; read what follows too, so that a compressed
    // stream's trailer (its length and checksum) is checked and a cut one refused.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(bad)?;
    Ok(())
}

/// Makes an overlay whiteout (character device 0:0) at `path`.
pub(super) fn whiteout(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives both calls.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}
