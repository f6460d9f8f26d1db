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
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

mod transit;

use transit::{Spool, drop_export, export, image_blob, show_image};

use super::protocol::{AgentInfo, Op, OpOutput, OpRequest, OpResponse, OpStatus, ProtocolError};
use cloud48_driver::{Driver, DriverError};

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
    /// The cores this agent knows (heartbeats learn them): where `ImageSource::Core` is pulled.
    cores: std::sync::OnceLock<crate::SharedCores>,
    /// Whether a core accepted one of this run's heartbeats.
    accepted: watch::Sender<bool>,
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
            cores: std::sync::OnceLock::new(),
            accepted: watch::Sender::new(false),
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

    /// The cores this agent knows, where it pulls guests uploaded to a core.
    pub fn know_cores(&self, cores: crate::SharedCores) {
        let _ = self.cores.set(cores);
    }

    /// Whether a core has accepted one of this run's heartbeats (it stays so).
    pub fn accepted(&self) -> watch::Receiver<bool> {
        self.accepted.subscribe()
    }

    /// A core accepted a heartbeat of this run.
    pub(crate) fn mark_accepted(&self) {
        self.accepted
            .send_if_modified(|a| !std::mem::replace(a, true));
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
            Op::LiveOffer { guest } => d
                .live_offer(&guest)
                .await
                .map(|offer| OpOutput::LiveOffer { offer }),
            Op::LiveReceive { spec, offer } => d
                .live_receive(&spec, &offer)
                .await
                .map(|target| OpOutput::LiveTarget { target }),
            Op::LiveSend { guest, target } => d
                .live_send(&guest, &target)
                .await
                .map(|report| OpOutput::LiveReport { report }),
            Op::LiveFinish { guest } => d.live_finish(&guest).await.map(|_| OpOutput::Done),
            Op::FetchImage { from, image } => d
                .fetch_image(&from, image.as_deref())
                .await
                .map(|images| OpOutput::Images { images }),
        };
        *progress.lock().unwrap() = if result.is_ok() {
            "done".into()
        } else {
            "failed".into()
        };
        result.into()
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
mod tests;
