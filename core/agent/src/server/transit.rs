//! Guests and images in transit: the agent's spool (exports it serves, imports it pulls,
//! streamed to and from files, never whole in memory), the export routes, and the image store
//! it serves to peer agents.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{AgentService, EXPORT_TTL, EXPORTS_MAX_BYTES, Export, Progress, refuse};
use crate::protocol::{ImageSource, OpOutput};
use cloud48_driver::{DriverError, GuestImage};

impl AgentService {
    /// Exports a stopped guest into the spool, kept for pulling under a new export id;
    /// `progress` hears how much is written.
    pub(super) async fn export_guest(
        &self,
        guest: &str,
        progress: &Progress,
    ) -> Result<OpOutput, DriverError> {
        let id = hex::encode(rand::random::<[u8; 12]>());
        let path = self.spool.export(&id);
        let exported = {
            let export = self.driver.export_to(guest, &path);
            tokio::pin!(export);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    done = &mut export => break done,
                    _ = tick.tick() => {
                        if let Ok(m) = tokio::fs::metadata(&path).await {
                            *progress.lock().unwrap() = format!("archived {} MiB of {guest}", m.len() >> 20);
                        }
                    }
                }
            }
        };
        let bytes = match exported {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e);
            }
        };
        let gone = {
            let mut exports = self.exports.lock().unwrap();
            exports.push(Export {
                id: id.clone(),
                made: std::time::Instant::now(),
                path,
                bytes,
            });
            // Expired exports go, then the oldest beyond the size cap (never the new one).
            let mut gone: Vec<Export> = exports
                .extract_if(.., |e| e.made.elapsed() >= EXPORT_TTL)
                .collect();
            while exports.iter().map(|e| e.bytes).sum::<u64>() > EXPORTS_MAX_BYTES
                && exports.len() > 1
            {
                gone.push(exports.remove(0));
            }
            gone
        };
        for e in gone {
            let _ = tokio::fs::remove_file(&e.path).await;
        }
        Ok(OpOutput::Export { export: id, bytes })
    }

    /// Imports a guest from bytes in the request or, streamed to a spool file with resumption,
    /// from another agent's export.
    pub(super) async fn import_guest(
        &self,
        spec: &cloud48_driver::GuestSpec,
        source: ImageSource,
        progress: &Progress,
    ) -> Result<OpOutput, DriverError> {
        let d = &self.driver;
        let guest = match source {
            ImageSource::Inline { type_id, data_hex } => {
                let data = hex::decode(&data_hex).map_err(|e| {
                    DriverError::Permanent(format!("inline image is not valid hex: {e}"))
                })?;
                d.import(spec, &GuestImage { type_id, data }).await?
            }
            ImageSource::Core { export, .. } => {
                if let Ok(Some(guest)) = d.status(&spec.guest_id).await {
                    return Ok(OpOutput::Guest { guest });
                }
                self.import_from_cores(spec, &export, progress).await?
            }
            ImageSource::Agent { url, export, .. } => {
                // Imported already (a step repeated after the export was dropped): as `import`
                // of an existing guest id, answer it.
                if let Ok(Some(guest)) = d.status(&spec.guest_id).await {
                    return Ok(OpOutput::Guest { guest });
                }
                let path = self.spool.import(&export);
                let pulled = crate::remote::pull_export(
                    &self.client,
                    &url,
                    &export,
                    &self.token,
                    &path,
                    |got, total| {
                        *progress.lock().unwrap() = match total {
                            Some(t) => {
                                format!("pulled {} of {} MiB from {url}", got >> 20, t >> 20)
                            }
                            None => format!("pulled {} MiB from {url}", got >> 20),
                        };
                    },
                )
                .await;
                let imported = match pulled {
                    Ok(_) => {
                        *progress.lock().unwrap() = "importing".into();
                        d.import_from(spec, &path).await
                    }
                    Err(e) => Err(e),
                };
                let _ = tokio::fs::remove_file(&path).await;
                let imported = imported?;
                // The source needs its copy no more (one export serves one import).
                let gone = self
                    .client
                    .delete(format!("{}/v1/exports/{export}", url.trim_end_matches('/')))
                    .bearer_auth(&self.token)
                    .send()
                    .await;
                if let Err(e) = gone {
                    tracing::info!(%url, export, "the source keeps its export until it expires: {e}");
                }
                imported
            }
        };
        Ok(OpOutput::Guest { guest })
    }

    /// Pulls `export` from the first of this agent's cores that holds it (streamed, resumed),
    /// then imports it.
    async fn import_from_cores(
        &self,
        spec: &cloud48_driver::GuestSpec,
        export: &str,
        progress: &Progress,
    ) -> Result<cloud48_driver::GuestInfo, DriverError> {
        let cores: Vec<String> = match self.cores.get() {
            Some(c) => c
                .lock()
                .unwrap()
                .rotation()
                .into_iter()
                .map(|(_, u)| u)
                .collect(),
            None => Vec::new(),
        };
        if cores.is_empty() {
            return Err(DriverError::Permanent(
                "this agent knows no core to pull the container from (start it with --core)".into(),
            ));
        }
        let path = self.spool.import(export);
        let mut problems = Vec::new();
        let mut pulled = false;
        for core in &cores {
            let got = crate::remote::pull_export(
                &self.client,
                core,
                export,
                &self.token,
                &path,
                |got, total| {
                    *progress.lock().unwrap() = match total {
                        Some(t) => format!("pulled {} of {} MiB from {core}", got >> 20, t >> 20),
                        None => format!("pulled {} MiB from {core}", got >> 20),
                    };
                },
            )
            .await;
            match got {
                Ok(_) => {
                    pulled = true;
                    break;
                }
                Err(e) => problems.push(format!("{core}: {e}")),
            }
        }
        let imported = if pulled {
            *progress.lock().unwrap() = "importing".into();
            self.driver.import_from(spec, &path).await
        } else {
            Err(DriverError::Permanent(format!(
                "no core this agent knows holds upload {export}: {}",
                problems.join("; ")
            )))
        };
        let _ = tokio::fs::remove_file(&path).await;
        imported
    }
}

/// Where guests in transit are kept: `exports/ID` served to other agents, `imports/ID`
/// pulled from them.
pub(super) struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub(super) fn open(dir: &std::path::Path) -> std::io::Result<Spool> {
        for sub in ["exports", "imports"] {
            let d = dir.join(sub);
            // Exports of an earlier run are no longer known; imports were not finished.
            match std::fs::remove_dir_all(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::create_dir_all(&d)?;
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    fn export(&self, id: &str) -> PathBuf {
        self.dir.join("exports").join(format!("{id}.tar.gz"))
    }

    fn import(&self, export: &str) -> PathBuf {
        // The export id is another agent's: keep only what is safe in a file name.
        let safe: String = export
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(64)
            .collect();
        let nonce = hex::encode(rand::random::<[u8; 6]>());
        self.dir
            .join("imports")
            .join(format!("{safe}-{nonce}.part"))
    }
}

/// Serves an export from its file, from the offset a `Range: bytes=N-` header asks for (a
/// pull cut off resumes where it stopped).
pub(super) async fn export(
    State(agent): State<Arc<AgentService>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let found = agent
        .exports
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.id == id && e.made.elapsed() < EXPORT_TTL)
        .map(|e| (e.path.clone(), e.bytes));
    let Some((path, size)) = found else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no export {id} on this agent (exports are kept {} minutes)",
                EXPORT_TTL.as_secs() / 60
            ),
        );
    };
    match tokio::fs::File::open(&path).await {
        Ok(file) => crate::ranged::serve(file, size, &headers, "application/gzip").await,
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("export {id} cannot be read: {e}"),
        ),
    }
}

/// The answer when this agent serves no images.
fn no_images() -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        "this agent keeps no images (its server runs none)",
    )
}

/// An image error as an answer: 404 for what the store lacks.
fn image_refusal(e: cloud48_image::ImageError) -> Response {
    let status = match e {
        cloud48_image::ImageError::NotFound(_) => StatusCode::NOT_FOUND,
        cloud48_image::ImageError::BadDigest(_) | cloud48_image::ImageError::BadName(_) => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refuse(status, e.to_string())
}

/// An image this server holds, described as the core describes its own.
pub(super) async fn show_image(
    State(agent): State<Arc<AgentService>>,
    Path(image): Path<String>,
) -> Response {
    let Some(store) = agent.images.get().cloned() else {
        return no_images();
    };
    match tokio::task::spawn_blocking(move || store.show(&image)).await {
        Ok(Ok(details)) => Json(details).into_response(),
        Ok(Err(e)) => image_refusal(e),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A blob of this server's store, from the offset a `Range: bytes=N-` header asks for.
pub(super) async fn image_blob(
    State(agent): State<Arc<AgentService>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(store) = agent.images.get().cloned() else {
        return no_images();
    };
    let digest: cloud48_image::Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return image_refusal(e),
    };
    let opened = tokio::task::spawn_blocking(move || {
        let file = store.open_blob(&digest)?;
        let len = file.metadata().map_err(|e| cloud48_image::ImageError::Io {
            context: format!("reading blob {digest}"),
            source: e,
        })?;
        Ok::<_, cloud48_image::ImageError>((file, len.len()))
    })
    .await;
    match opened {
        Ok(Ok((file, len))) => {
            let file = tokio::fs::File::from_std(file);
            crate::ranged::serve(file, len, &headers, "application/octet-stream").await
        }
        Ok(Err(e)) => image_refusal(e),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Removes an export once its importer has it (`DELETE /v1/exports/{id}`); an unknown one is
/// already gone.
pub(super) async fn drop_export(
    State(agent): State<Arc<AgentService>>,
    Path(id): Path<String>,
) -> Response {
    let found = {
        let mut exports = agent.exports.lock().unwrap();
        exports
            .iter()
            .position(|e| e.id == id)
            .map(|i| exports.remove(i))
    };
    if let Some(e) = found {
        let _ = tokio::fs::remove_file(&e.path).await;
    }
    StatusCode::NO_CONTENT.into_response()
}
