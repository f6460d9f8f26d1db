//! What changed in a container's upper directory since a first copy of it was taken while it
//! ran: a live move sends the directory whole while the container runs, then, after the
//! checkpoint (inside the downtime), only what this finds.
//!
//! Invariant: an entry whose inode changed in any way after its stamp was taken (content,
//! owner, mode, links: its change time moves) is in the delta, so a file written while the
//! first copy read it is sent again whole.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What identifies one state of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    mode: u32,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            ino: m.ino(),
            mode: m.mode(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Every entry under `root`, by path relative to it, with its stamp (links not followed).
pub type Manifest = HashMap<PathBuf, Stamp>;

/// Stamps every entry under `root` (take it before copying: a change after it shows).
pub fn manifest(root: &Path) -> std::io::Result<Manifest> {
    fn walk(root: &Path, dir: &Path, out: &mut Manifest) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let path = e.path();
            let m = std::fs::symlink_metadata(&path)?;
            let name = path
                .strip_prefix(root)
                .expect("inside the root")
                .to_path_buf();
            out.insert(name, Stamp::of(&m));
            if m.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Manifest::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// What differs between `root` now and `before`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Entries new or changed since, parents before children.
    pub changed: Vec<PathBuf>,
    /// Entries gone since (or replaced: also in `changed`), children before parents.
    pub gone: Vec<PathBuf>,
}

/// The delta of `root` against the `before` manifest.
pub fn delta(root: &Path, before: &Manifest) -> std::io::Result<Delta> {
    let now = manifest(root)?;
    let mut changed: Vec<PathBuf> = now
        .iter()
        .filter(|(p, s)| before.get(*p) != Some(*s))
        .map(|(p, _)| p.clone())
        .collect();
    // A replaced entry (another inode or kind) goes first, so nothing of the old one stays.
    let mut gone: Vec<PathBuf> = before
        .iter()
        .filter(|(p, s)| {
            now.get(*p)
                .is_none_or(|n| n.ino != s.ino || (n.mode ^ s.mode) & libc::S_IFMT != 0)
        })
        .map(|(p, _)| p.clone())
        .collect();
    changed.sort();
    gone.sort_by(|a, b| b.cmp(a));
    Ok(Delta { changed, gone })
}

/// Removes the `gone` entries of a delta from `root` (missing ones are fine); refuses a path
/// that would leave it.
pub fn remove_gone(root: &Path, gone: &[PathBuf]) -> Result<(), String> {
    for p in gone {
        if p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "a delta names {} outside its directory",
                p.display()
            ));
        }
        let path = root.join(p);
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delta_holds_what_changed_appeared_or_went_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("srv/keep")).unwrap();
        std::fs::write(root.join("srv/same"), "same").unwrap();
        std::fs::write(root.join("srv/edited"), "before").unwrap();
        std::fs::write(root.join("srv/removed"), "x").unwrap();
        std::fs::write(root.join("srv/keep/replaced"), "a file").unwrap();
        std::fs::write(root.join("chmodded"), "x").unwrap();
        let before = manifest(root).unwrap();

        std::fs::write(root.join("srv/edited"), "after, longer").unwrap();
        std::fs::remove_file(root.join("srv/removed")).unwrap();
        std::fs::write(root.join("srv/new"), "new").unwrap();
        std::fs::remove_file(root.join("srv/keep/replaced")).unwrap();
        std::fs::create_dir(root.join("srv/keep/replaced")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("chmodded"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();

        let d = delta(root, &before).unwrap();
        let names =
            |v: &[PathBuf]| -> Vec<String> { v.iter().map(|p| p.display().to_string()).collect() };
        // The directories whose entries changed come along (their times), the unchanged
        // file and directory do not.
        assert_eq!(
            names(&d.changed),
            [
                "chmodded",
                "srv",
                "srv/edited",
                "srv/keep",
                "srv/keep/replaced",
                "srv/new"
            ]
        );
        assert_eq!(names(&d.gone), ["srv/removed", "srv/keep/replaced"]);

        // Applied to a copy taken before: the copy minus what went equals the source.
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(copy.path().join("srv/keep/replaced")).unwrap();
        std::fs::write(copy.path().join("srv/removed"), "x").unwrap();
        remove_gone(copy.path(), &d.gone).unwrap();
        assert!(!copy.path().join("srv/removed").exists());
        assert!(!copy.path().join("srv/keep/replaced").exists());
        assert!(copy.path().join("srv/keep").is_dir());
        assert!(remove_gone(copy.path(), &[PathBuf::from("../etc")]).is_err());
    }
}
