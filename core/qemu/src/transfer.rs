//! A stopped VM as a file (cold migration, clone, export between cores): tar+gzip of its
//! image's digest (`vm.json`) and its own disk (the qcow2 overlay), streamed both ways; the
//! importing server fetches the same image by digest and points the disk at its base.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use cloud48_driver::{DriverError, GuestInfo, GuestSpec};
use cloud48_model::ImageRef;

use crate::machine::files;
use crate::{QemuDriver, disks, permanent, validate_id};

/// What an export holds beside the disk.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportMeta {
    /// The digest of the VM image the disk is an overlay of.
    pub image: String,
}

/// Writes the export of a guest (its image's digest, then its disk) to `to` as tar+gzip.
pub fn write_export(meta: &ExportMeta, disk: &Path, to: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::create(to)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let meta = serde_json::to_vec(meta).expect("serializes");
    let mut header = tar::Header::new_gnu();
    header.set_size(meta.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "vm.json", meta.as_slice())?;
    tar.append_path_with_name(disk, files::DISK)?;
    let mut file = tar.into_inner()?.finish()?;
    file.flush()?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Reads an export into `dir` (its disk) and returns its metadata; a cut or foreign archive
/// is refused.
pub fn read_export(from: &Path, dir: &Path) -> Result<ExportMeta, String> {
    let file =
        std::fs::File::open(from).map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut meta = None;
    let mut disk = false;
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| format!("the export is damaged: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        match name.as_str() {
            "vm.json" => {
                let mut text = Vec::new();
                entry.read_to_end(&mut text).map_err(|e| e.to_string())?;
                meta = Some(
                    serde_json::from_slice::<ExportMeta>(&text)
                        .map_err(|e| format!("the export's vm.json is not valid: {e}"))?,
                );
            }
            n if n == files::DISK => {
                let mut out =
                    std::fs::File::create(dir.join(files::DISK)).map_err(|e| e.to_string())?;
                std::io::copy(&mut entry, &mut out)
                    .map_err(|e| format!("the export is damaged or cut: {e}"))?;
                out.sync_all().map_err(|e| e.to_string())?;
                disk = true;
            }
            other => {
                return Err(format!(
                    "the export holds an unexpected file '{other}': it is not a VM's export"
                ));
            }
        }
    }
    match (meta, disk) {
        (Some(meta), true) => Ok(meta),
        _ => Err("the export lacks vm.json or disk.qcow2: it is not a whole VM export".into()),
    }
}

impl QemuDriver {
    pub(crate) async fn export_file(&self, guest_id: &str, to: &Path) -> Result<u64, DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.exportable(guest_id).await?;
        let disk = self.file(guest_id, files::DISK);
        let to = to.to_path_buf();
        tokio::task::spawn_blocking(move || {
            write_export(&ExportMeta { image: r.image }, &disk, &to)
                .map_err(|e| permanent(format!("cannot export guest {}: {e}", r.spec.guest_id)))
        })
        .await
        .map_err(permanent)?
    }

    pub(crate) async fn import_file(
        &self,
        spec: &GuestSpec,
        from: &Path,
    ) -> Result<GuestInfo, DriverError> {
        validate_id(&spec.guest_id)?;
        let _held = self.hold(&spec.guest_id).await;
        if let Ok(r) = self.record(&spec.guest_id) {
            let state = self.state(&r.spec.guest_id).await;
            return Ok(self.info(&r, state));
        }
        // Read the archive beside the guests first: nothing is reserved for a bad one.
        let staging = self.scratch();
        std::fs::create_dir_all(&staging).map_err(permanent)?;
        let (from, into) = (from.to_path_buf(), staging.clone());
        let meta = tokio::task::spawn_blocking(move || read_export(&from, &into))
            .await
            .map_err(permanent)?;
        let result = async {
            let meta =
                meta.map_err(|e| permanent(format!("cannot import guest {}: {e}", spec.guest_id)))?;
            let base = self
                .images
                .prepare(&ImageRef {
                    reference: meta.image.clone(),
                    digest: Some(meta.image.clone()),
                })
                .await?;
            let staged = staging.join(files::DISK);
            let machine_type = self.machine.machine_type.clone();
            self.make_guest(
                spec,
                &meta.image,
                &machine_type,
                async move |disk: PathBuf| {
                    tokio::fs::rename(&staged, &disk).await.map_err(permanent)?;
                    disks::rebase(&base, &disk).await
                },
            )
            .await
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        result
    }
}
