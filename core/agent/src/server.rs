//! The agent's HTTP side: it serves the agent protocol over one driver.
//!
//! Invariants:
//! - Every request must carry the shared token; without it nothing reaches the driver.
//! - An operation id runs at most once: the operation runs on its own task, so a client that
//!   disconnects mid-operation neither cancels it nor, on retry, starts it again.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::protocol::{
    AgentInfo, ImageSource, Op, OpOutput, OpRequest, OpResponse, OpStatus, ProtocolError,
};
use cloud48_driver::{Driver, DriverError, GuestImage};

/// How many finished operations the agent remembers for retries.
const REMEMBERED_OPS: usize = 10_000;
/// How long an export is kept for pulling.
const EXPORT_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// How many bytes of exports the agent keeps at most on disk (the oldest go first).
const EXPORTS_MAX_BYTES: u64 = 8 << 30;
/// Deadline of connecting to a source agent, and of each read while pulling.
const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An operation by id: its request (to refuse a reused id), its progress and its result once
/// known.
struct Slot {
    op: Op,
    started: std::time::Instant,
    progress: Progress,
    result: watch::Receiver<Option<OpResponse>>,
}

/// What a running operation last said about itself.
type Progress = Arc<Mutex<String>>;

/// State shared by the agent's handlers.
pub struct AgentService {
    driver: Arc<dyn Driver>,
    token: String,
    info: AgentInfo,
    ops: Mutex<(HashMap<String, Slot>, VecDeque<String>)>,
    exports: Mutex<Vec<Export>>,
    spool: Spool,
    /// The server's image store, served to peer agents (`GET /v1/images/...`).
    images: std::sync::OnceLock<Arc<cloud48_image::Store>>,
    client: reqwest::Client,
}

/// An export kept for pulling: a file in the spool.
struct Export {
    id: String,
    made: std::time::Instant,
    path: PathBuf,
    bytes: u64,
}

impl AgentService {
    /// An agent serving `driver`, accepting requests that carry `token`, keeping guests in
    /// transit (exports it serves, imports it pulls) as files under `spool`, whose leftovers
    /// from an earlier run it removes.
    pub fn new(
        driver: Arc<dyn Driver>,
        token: impl Into<String>,
        info: AgentInfo,
        spool: &std::path::Path,
    ) -> std::io::Result<Arc<Self>> {
        let spool = Spool::open(spool)?;
        Ok(Arc::new(AgentService {
            driver,
            token: token.into(),
            info,
            ops: Mutex::new((HashMap::new(), VecDeque::new())),
            exports: Mutex::new(Vec::new()),
            spool,
            images: std::sync::OnceLock::new(),
            client: reqwest::Client::builder()
                .connect_timeout(PULL_TIMEOUT)
                .read_timeout(PULL_TIMEOUT)
                .build()
                .expect("an HTTP client without TLS builds"),
        }))
    }

    /// Serves `store` to peer agents, which pull the images this server holds from it rather
    /// than from the core (read-only, with the fleet's token, as the core serves its own).
    pub fn serve_images(&self, store: Arc<cloud48_image::Store>) {
        let _ = self.images.set(store);
    }

    /// What the agent says about itself.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// The driver behind the agent.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// The HTTP router of the agent protocol.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/info", get(info))
            .route("/v1/stats", get(stats))
            .route("/v1/guests", get(list))
            .route("/v1/guests/{id}", get(status))
            .route("/v1/guests/{id}/logs", get(logs))
            .route("/v1/exports/{id}", get(export).delete(drop_export))
            .route("/v1/images/{image}", get(show_image))
            .route("/v1/images/blobs/{digest}", get(image_blob))
            .route("/v1/ops", post(op))
            .route("/v1/ops/{id}", get(op_status))
            .fallback(|| async {
                refuse(
                    StatusCode::NOT_FOUND,
                    "no such agent endpoint; see the agent protocol in ARCHITECTURE.md",
                )
            })
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                authenticate,
            ))
            .layer(axum::extract::DefaultBodyLimit::max(1 << 30))
            .with_state(self.clone())
    }

    /// Runs `request` once per id; a repeat waits for and returns the first result.
    async fn run_once(
        self: &Arc<Self>,
        request: OpRequest,
    ) -> Result<OpResponse, (StatusCode, String)> {
        let mut rx = {
            let mut guard = self.ops.lock().unwrap();
            let (slots, order) = &mut *guard;
            match slots.get(&request.id) {
                Some(slot) if slot.op != request.op => {
                    return Err((
                        StatusCode::CONFLICT,
                        format!(
                            "operation id {} was already used for a different operation; use a new id per operation",
                            request.id
                        ),
                    ));
                }
                Some(slot) => slot.result.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let progress: Progress = Arc::new(Mutex::new("started".into()));
                    slots.insert(
                        request.id.clone(),
                        Slot {
                            op: request.op.clone(),
                            started: std::time::Instant::now(),
                            progress: progress.clone(),
                            result: rx.clone(),
                        },
                    );
                    order.push_back(request.id.clone());
                    // Forget the oldest finished operations; running ones stay.
                    while order.len() > REMEMBERED_OPS {
                        let finished = order.iter().position(|id| {
                            slots.get(id).is_none_or(|s| s.result.borrow().is_some())
                        });
                        let Some(old) = finished.and_then(|i| order.remove(i)) else {
                            break;
                        };
                        slots.remove(&old);
                    }
                    let me = self.clone();
                    tokio::spawn(async move {
                        let result = me.execute(request.op, &progress).await;
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let done = rx.wait_for(Option::is_some).await.map_err(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the operation's task ended without a result".to_string(),
            )
        })?;
        Ok(done.clone().expect("waited for a result"))
    }

    /// The state of an operation: `None` when the id is unknown.
    fn op_status(&self, id: &str) -> Option<OpStatus> {
        let guard = self.ops.lock().unwrap();
        let slot = guard.0.get(id)?;
        let done = slot.result.borrow().is_some();
        Some(OpStatus {
            id: id.to_string(),
            done,
            elapsed_ms: slot.started.elapsed().as_millis() as u64,
            progress: slot.progress.lock().unwrap().clone(),
        })
    }

    async fn execute(&self, op: Op, progress: &Progress) -> OpResponse {
        let d = &self.driver;
        let result = match op {
            Op::Create { spec } => d.create(&spec).await.map(|guest| OpOutput::Guest { guest }),
            Op::Start { guest } => d.start(&guest).await.map(|_| OpOutput::Done),
            Op::Stop { guest } => d.stop(&guest).await.map(|_| OpOutput::Done),
            Op::Suspend { guest } => d.suspend(&guest).await.map(|_| OpOutput::Done),
            Op::Resume { guest } => d.resume(&guest).await.map(|_| OpOutput::Done),
            Op::Reboot { guest } => d.reboot(&guest).await.map(|_| OpOutput::Done),
            Op::Destroy { guest } => d.destroy(&guest).await.map(|_| OpOutput::Done),
            Op::Update { guest, resources } => {
                d.update(&guest, &resources).await.map(|_| OpOutput::Done)
            }
            Op::Exec {
                guest,
                script,
                args,
            } => d
                .exec(&guest, &script, &args)
                .await
                .map(|output| OpOutput::Exec { output }),
            Op::Export { guest } => self.export_guest(&guest, progress).await,
            Op::Import { spec, source } => self.import_guest(&spec, source, progress).await,
        };
        *progress.lock().unwrap() = if result.is_ok() {
            "done".into()
        } else {
            "failed".into()
        };
        result.into()
    }

    /// Exports a stopped guest into the spool, kept for pulling under a new export id;
    /// `progress` hears how much is written.
    async fn export_guest(
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
            let mut gone: Vec<Export> = Vec::new();
            let (keep, old): (Vec<_>, Vec<_>) = std::mem::take(&mut *exports)
                .into_iter()
                .partition(|e| e.made.elapsed() < EXPORT_TTL);
            gone.extend(old);
            *exports = keep;
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
    async fn import_guest(
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
}

/// Where guests in transit are kept: `exports/ID` served to other agents, `imports/ID`
/// pulled from them.
struct Spool {
    dir: PathBuf,
}

impl Spool {
    fn open(dir: &std::path::Path) -> std::io::Result<Spool> {
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

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ProtocolError {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn authenticate(
    State(agent): State<Arc<AgentService>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "this agent needs 'Authorization: Bearer TOKEN' with the fleet's agent token (agents.token on the core, --token on the agent)",
        ),
        Some(t) if !bool::from(t.as_bytes().ct_eq(agent.token.as_bytes())) => refuse(
            StatusCode::UNAUTHORIZED,
            "wrong agent token; core and agent must share the same agents.token",
        ),
        Some(_) => next.run(req).await,
    }
}

fn driver_result<T: serde::Serialize>(r: Result<T, DriverError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            let status = match e {
                DriverError::NotFound(_) => StatusCode::NOT_FOUND,
                DriverError::InvalidState { .. } => StatusCode::CONFLICT,
                DriverError::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(OpResponse::Err(e))).into_response()
        }
    }
}

async fn info(State(agent): State<Arc<AgentService>>) -> Response {
    Json(agent.info.clone()).into_response()
}

async fn stats(State(agent): State<Arc<AgentService>>) -> Response {
    driver_result(agent.driver.stats().await)
}

async fn list(State(agent): State<Arc<AgentService>>) -> Response {
    driver_result(agent.driver.list().await)
}

async fn status(State(agent): State<Arc<AgentService>>, Path(id): Path<String>) -> Response {
    driver_result(agent.driver.status(&id).await)
}

async fn logs(State(agent): State<Arc<AgentService>>, Path(id): Path<String>) -> Response {
    driver_result(agent.driver.logs(&id).await)
}

/// Serves an export from its file, from the offset a `Range: bytes=N-` header asks for (a
/// pull cut off resumes where it stopped).
async fn export(
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
async fn show_image(State(agent): State<Arc<AgentService>>, Path(image): Path<String>) -> Response {
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
async fn image_blob(
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
async fn drop_export(State(agent): State<Arc<AgentService>>, Path(id): Path<String>) -> Response {
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

async fn op_status(State(agent): State<Arc<AgentService>>, Path(id): Path<String>) -> Response {
    match agent.op_status(&id) {
        Some(s) => Json(s).into_response(),
        None => refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no operation {id} on this agent (ids are kept for the last {REMEMBERED_OPS} operations)"
            ),
        ),
    }
}

async fn op(State(agent): State<Arc<AgentService>>, body: Bytes) -> Response {
    let request: OpRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "malformed operation: {e}; expected {{\"id\": \"...\", \"op\": \"create|start|stop|...\", ...}}"
                ),
            );
        }
    };
    if request.id.is_empty() || request.id.len() > 100 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "operation id must have 1-100 characters",
        );
    }
    match agent.run_once(request).await {
        Ok(r) => Json(r).into_response(),
        Err((status, message)) => refuse(status, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud48_driver::GuestSpec;
    use cloud48_driver::sim::{SimLatency, SimServer};
    use cloud48_model::Resources;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const TOKEN: &str = "a-token-of-at-least-some-length";

    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "cloud48-agent-{tag}-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ))
    }

    /// An agent over a sim server holding a stopped guest `g` whose disk is `disk`, exported;
    /// returns its URL, the export id and the agent.
    async fn exported(disk: &[u8]) -> (String, String, Arc<AgentService>) {
        let sim = SimServer::new(
            "s1",
            1,
            Resources {
                cpu_millis: 1000,
                memory_mb: 1024,
                disk_mb: 1024,
            },
            SimLatency::uniform(std::time::Duration::ZERO),
        );
        let spec = GuestSpec {
            guest_id: "g".into(),
            type_id: "plain".into(),
            resources: Resources {
                cpu_millis: 100,
                memory_mb: 64,
                disk_mb: 64,
            },
            ip: None,
            workload: Default::default(),
        };
        let image = GuestImage {
            type_id: "plain".into(),
            data: disk.to_vec(),
        };
        sim.import(&spec, &image).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let info = AgentInfo {
            name: "s1".into(),
            url: url.clone(),
            driver: "sim".into(),
            capabilities: sim.capabilities(),
            labels: vec![],
        };
        let agent = AgentService::new(Arc::new(sim), TOKEN, info, &scratch("spool")).unwrap();
        let progress: Progress = Arc::default();
        let OpOutput::Export { export, bytes } = agent.export_guest("g", &progress).await.unwrap()
        else {
            panic!("an export was expected");
        };
        assert_eq!(bytes, disk.len() as u64);
        let router = agent.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (url, export, agent)
    }

    /// A proxy to `upstream` that cuts its first connection after `cut` bytes of the answer;
    /// returns its URL and the count of connections.
    async fn cutting_proxy(upstream: &str, cut: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let mut server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(async move {
                    if n > 0 {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut sent = 0;
                        let mut buf = vec![0u8; 8192];
                        while sent < cut {
                            let n = sr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            let n = n.min(cut - sent);
                            cw.write_all(&buf[..n]).await.unwrap();
                            sent += n;
                        }
                    };
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn a_pull_cut_off_resumes_where_it_stopped_and_gets_every_byte() {
        let disk: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let (url, export, _agent) = exported(&disk).await;
        let (proxy, connections) = cutting_proxy(&url, 1 << 20).await;
        let to = scratch("pulled");
        let mut heard = 0;
        let size = crate::remote::pull_export(
            &reqwest::Client::new(),
            &proxy,
            &export,
            TOKEN,
            &to,
            |got, _| heard = got,
        )
        .await
        .unwrap();
        assert_eq!(size, disk.len() as u64);
        assert_eq!(heard, size, "progress heard the last byte");
        assert!(std::fs::read(&to).unwrap() == disk, "every byte, in order");
        assert_eq!(
            connections.load(Ordering::SeqCst),
            2,
            "one cut connection, one resumed"
        );
        let _ = std::fs::remove_file(&to);
    }

    #[tokio::test]
    async fn an_export_answers_ranges_and_refuses_one_past_its_end() {
        let disk = b"0123456789".repeat(100);
        let (url, export, _agent) = exported(&disk).await;
        let client = reqwest::Client::new();
        let get = |range: &str| {
            client
                .get(format!("{url}/v1/exports/{export}"))
                .bearer_auth(TOKEN)
                .header(header::RANGE, range)
                .send()
        };
        let tail = get("bytes=990-").await.unwrap();
        assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(tail.headers()[header::CONTENT_RANGE], "bytes 990-999/1000");
        assert_eq!(&tail.bytes().await.unwrap()[..], b"0123456789");
        let past = get("bytes=1001-").await.unwrap();
        assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert!(past.text().await.unwrap().contains("has 1000 bytes"));
        let missing = client
            .get(format!("{url}/v1/exports/nope"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }
}
