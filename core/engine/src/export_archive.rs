//! The archive a container export travels in between platforms (format 2): a tar stream of
//! `cloud48-export.json` (what `ContainerExport` says of the container, without its disk) and
//! `disk` (the server's export of its files, as `Driver::export_to` writes it). The core writes
//! it while the disk streams from the server's agent and reads an upload entry by entry into a
//! file, so neither side holds a disk in memory; `tar tf` lists it.

use std::io::Read;
use std::path::Path;

use crate::managers::ContainerExport;

/// Name of the description entry.
pub const DESCRIPTION: &str = "cloud48-export.json";
/// Name of the disk entry.
pub const DISK: &str = "disk";
/// Largest description read (it holds the container's state, hex-encoded).
const DESCRIPTION_MAX: u64 = 64 << 20;

/// The tar header of a regular file `name` of `size` bytes.
pub fn header(name: &str, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("a short relative name");
    h.set_size(size);
    h.set_mode(0o600);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    h.set_cksum();
    *h.as_bytes()
}

/// Zero bytes that pad an entry of `size` bytes to a whole block.
pub fn padding(size: u64) -> Vec<u8> {
    vec![0; ((512 - size % 512) % 512) as usize]
}

/// What ends an archive: two zero blocks.
pub const END: [u8; 1024] = [0; 1024];

/// Everything that comes before the disk's bytes: the description entry and the disk's
/// header (the disk is `disk_size` bytes, then `padding(disk_size)` and `END`).
pub fn head(description: &ContainerExport, disk_size: u64) -> Vec<u8> {
    let json = serde_json::to_vec_pretty(description).expect("serializable");
    let mut out = Vec::with_capacity(json.len() + 1536);
    out.extend_from_slice(&header(DESCRIPTION, json.len() as u64));
    out.extend_from_slice(&json);
    out.extend(padding(json.len() as u64));
    out.extend_from_slice(&header(DISK, disk_size));
    out
}

/// The description at the start of an archive (what a client says before it uploads one).
pub fn describe(from: impl Read) -> Result<ContainerExport, String> {
    let mut archive = tar::Archive::new(from);
    let mut entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    let entry = entries
        .next()
        .ok_or("an empty archive")?
        .map_err(|e| format!("not a tar archive: {e}"))?;
    if entry.path().ok().as_deref() != Some(Path::new(DESCRIPTION))
        || entry.size() > DESCRIPTION_MAX
    {
        return Err(format!("its first entry is not {DESCRIPTION}"));
    }
    serde_json::from_reader(entry)
        .map_err(|e| format!("{DESCRIPTION} is not a container export: {e}"))
}

/// Reads an uploaded archive from `from`: the description, and the disk written to
/// `dir/disk`. Says what was wrong with an archive that is not one of ours.
pub fn receive(mut from: impl Read, dir: &Path) -> Result<ContainerExport, String> {
    let mut first = [0u8; 512];
    let mut n = 0;
    while n < first.len() {
        match from.read(&mut first[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("the upload broke off: {e}")),
        }
    }
    if first[..n].trim_ascii_start().starts_with(b"{") {
        return Err(
            "this is a JSON export (format 1): send it with 'Content-Type: application/json'"
                .into(),
        );
    }
    let mut archive = tar::Archive::new((&first[..n]).chain(from));
    let mut entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    let mut next = |what: &str| -> Result<tar::Entry<'_, _>, String> {
        let entry = entries
            .next()
            .ok_or_else(|| format!("the archive ends before its {what}"))?
            .map_err(|e| format!("the archive is cut short or damaged before its {what}: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("an entry has no readable name: {e}"))?
            .to_string_lossy()
            .into_owned();
        if name != what {
            return Err(format!(
                "the archive holds '{name}' where '{what}' belongs (write it with `cloud48 container export`)"
            ));
        }
        Ok(entry)
    };
    let entry = next(DESCRIPTION)?;
    if entry.size() > DESCRIPTION_MAX {
        return Err(format!(
            "{DESCRIPTION} is larger than {DESCRIPTION_MAX} bytes"
        ));
    }
    let description: ContainerExport = serde_json::from_reader(entry)
        .map_err(|e| format!("{DESCRIPTION} is not a container export: {e}"))?;
    let mut disk = next(DISK)?;
    let size = disk.size();
    let path = dir.join(DISK);
    let mut file = std::fs::File::create(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let copied =
        std::io::copy(&mut disk, &mut file).map_err(|e| format!("the disk is cut short: {e}"))?;
    if copied != size {
        return Err(format!(
            "the disk is cut short: {copied} of {size} bytes arrived"
        ));
    }
    file.sync_all()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(description)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerId, Requirements};

    fn description() -> ContainerExport {
        ContainerExport {
            format: 2,
            platform: "elsewhere".into(),
            container_id: ContainerId(7),
            guest_id: "g7".into(),
            type_id: "plain".into(),
            requirements: Requirements::default(),
            state_hex: "00ff".into(),
            disk_hex: String::new(),
        }
    }

    fn archive(disk: &[u8]) -> Vec<u8> {
        let mut out = head(&description(), disk.len() as u64);
        out.extend_from_slice(disk);
        out.extend(padding(disk.len() as u64));
        out.extend_from_slice(&END);
        out
    }

    #[test]
    fn an_archive_reads_back_and_tar_lists_it() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let bytes = archive(&disk);
        assert_eq!(bytes.len() % 512, 0);
        let got = receive(bytes.as_slice(), dir.path()).unwrap();
        assert_eq!(
            (got.guest_id.as_str(), got.state_hex.as_str()),
            ("g7", "00ff")
        );
        assert_eq!(std::fs::read(dir.path().join(DISK)).unwrap(), disk);
        let names: Vec<String> = tar::Archive::new(bytes.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [DESCRIPTION, DISK]);
        assert_eq!(describe(bytes.as_slice()).unwrap().guest_id, "g7");
    }

    #[test]
    fn a_cut_or_foreign_archive_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(&[7; 3000]);
        let cut = &bytes[..1536 + 1000];
        let e = receive(cut, dir.path()).unwrap_err();
        assert!(e.contains("cut short"), "{e}");
        let e = receive(&b"{\"format\": 1}"[..], dir.path()).unwrap_err();
        assert!(e.contains("JSON export (format 1)"), "{e}");
        let e = receive(&bytes[..700], dir.path()).unwrap_err();
        assert!(e.contains(DESCRIPTION), "{e}");
        let mut other = header("etc/passwd", 3).to_vec();
        other.extend_from_slice(b"abc");
        other.extend(padding(3));
        other.extend_from_slice(&END);
        let e = receive(other.as_slice(), dir.path()).unwrap_err();
        assert!(e.contains("'etc/passwd'") && e.contains(DESCRIPTION), "{e}");
    }
}
