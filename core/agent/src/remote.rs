//! The remote driver: drives a server through the node agent running on it (the agent
//! protocol of `crate::protocol`).
//!
//! Invariants:
//! - Every mutation carries a fresh operation id; a request lost in transit is retried with the
//!   same id, so the agent runs it once however often it is sent.
//! - Every request has a deadline: a hanging agent costs the command that waits for it a
//!   bounded time and never blocks other servers.
//! - `export` has the agent snapshot the stopped guest and hands out a reference to that
//!   export; the importing agent pulls the bytes from the exporting one, so cold migration and
//!   cloning stream agent to agent, not via the core.

use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncSeekExt;

use crate::protocol::{ImageSource, Op, OpOutput, OpRequest, OpResponse, OpStatus, ProtocolError};
use cloud48_driver::{
    Capabilities, Driver, DriverError, ExecOutput, GuestImage, GuestInfo, GuestSpec, LiveOffer,
    LiveReport, LiveTarget, ServerStats,
};
use cloud48_model::Resources;

/// How often a long operation's progress is asked for and logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Prefix of a `GuestImage` that refers to a guest on an agent instead of holding its bytes.
const AGENT_IMAGE: &[u8] = b"cloud48-agent-image:";

/// Deadlines and retries of a remote driver.
#[derive(Debug, Clone, Copy)]
pub struct RemoteTimeouts {
    /// Deadline of one mutation request (an agent may take long to start software).
    pub operation: Duration,
    /// Deadline of one query (status, list, stats).
    pub query: Duration,
    /// Deadline of connecting.
    pub connect: Duration,
    /// How many times a request that never got an answer is sent.
    pub attempts: u32,
}

impl Default for RemoteTimeouts {
    fn default() -> Self {
        RemoteTimeouts {
            operation: Duration::from_secs(60),
            query: Duration::from_secs(3),
            connect: Duration::from_secs(1),
            attempts: 3,
        }
    }
}

/// A server driven through its agent.
pub struct RemoteDriver {
    name: String,
    url: String,
    token: String,
    client: reqwest::Client,
    timeouts: RemoteTimeouts,
    capabilities: RwLock<Capabilities>,
}

/// True when an image is a reference to an export on an agent rather than bytes. Images that
/// come from users (a platform import) must never be references: a forged one would make an
/// agent present the fleet's token to any address.
pub fn is_reference(image: &[u8]) -> bool {
    image.starts_with(AGENT_IMAGE) || image.starts_with(CORE_UPLOAD)
}

/// What stands for the disk of a container uploaded to a core (`container import` of a
/// streamed export): the upload's id, which agents pull from their cores.
const CORE_UPLOAD: &[u8] = b"cloud48-core-upload:";

/// The image that stands for upload `id` on a core.
pub fn core_upload(type_id: &str, id: &str) -> GuestImage {
    let mut data = CORE_UPLOAD.to_vec();
    data.extend_from_slice(id.as_bytes());
    GuestImage {
        type_id: type_id.to_string(),
        data,
    }
}

/// The core upload an image stands for, if it does.
pub fn upload_of(image: &GuestImage) -> Option<&str> {
    std::str::from_utf8(image.data.strip_prefix(CORE_UPLOAD)?).ok()
}

/// The image that refers to export `export` of the agent at `url`.
pub fn agent_image(type_id: &str, url: &str, export: &str) -> GuestImage {
    let mut data = AGENT_IMAGE.to_vec();
    data.extend(serde_json::to_vec(&(url, export)).expect("serializes"));
    GuestImage {
        type_id: type_id.to_string(),
        data,
    }
}

/// The agent and export an image refers to, if it is such a reference.
pub fn reference_of(image: &GuestImage) -> Result<Option<(String, String)>, DriverError> {
    reference(image)
}

/// Asks the agent at `url` to drop export `export` (read whole); one it cannot drop expires.
pub async fn drop_export(url: &str, export: &str, token: &str) {
    let gone = reqwest::Client::new()
        .delete(format!("{}/v1/exports/{export}", url.trim_end_matches('/')))
        .bearer_auth(token)
        .send()
        .await;
    if let Err(e) = gone {
        tracing::info!(%url, export, "the agent keeps its export until it expires: {e}");
    }
}

/// The bytes of export `export` on the agent at `url`, streamed, with their length.
pub async fn open_export(
    url: &str,
    export: &str,
    token: &str,
) -> Result<(u64, reqwest::Response), DriverError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client without TLS builds");
    let from = format!("{}/v1/exports/{export}", url.trim_end_matches('/'));
    let resp = client
        .get(&from)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| DriverError::Unreachable {
            server: url.to_string(),
            message: format!("cannot read export {export}: {e}"),
        })?;
    let status = resp.status();
    match resp.content_length() {
        Some(len) if status.is_success() => Ok((len, resp)),
        _ => Err(DriverError::Permanent(format!(
            "the agent {url} could not give export {export} ({status}, {:?} bytes)",
            resp.content_length()
        ))),
    }
}

fn reference(image: &GuestImage) -> Result<Option<(String, String)>, DriverError> {
    let Some(r) = image.data.strip_prefix(AGENT_IMAGE) else {
        return Ok(None);
    };
    serde_json::from_slice(r)
        .map(Some)
        .map_err(|e| DriverError::Permanent(format!("corrupt agent image reference: {e}")))
}

/// How many times a pull cut off is resumed before it fails.
const PULL_ATTEMPTS: u32 = 5;

/// Pulls export `export` from the agent at `url` into the file `to`, streamed; a transfer cut
/// off resumes where it stopped (`Range`), up to `PULL_ATTEMPTS` times. `progress` hears the
/// bytes received so far and the total when known. Returns the size.
pub async fn pull_export(
    client: &reqwest::Client,
    url: &str,
    export: &str,
    token: &str,
    to: &Path,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<u64, DriverError> {
    use tokio::io::AsyncWriteExt;
    let from = format!("{}/v1/exports/{export}", url.trim_end_matches('/'));
    let local = |e: std::io::Error| {
        DriverError::Permanent(format!("cannot write {} while pulling: {e}", to.display()))
    };
    let mut file = tokio::fs::File::create(to).await.map_err(local)?;
    let mut got: u64 = 0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = client.get(&from).bearer_auth(token);
        if got > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={got}-"));
        }
        let cut = |message: String, got: u64| -> Result<(), DriverError> {
            if attempt >= PULL_ATTEMPTS {
                Err(DriverError::Transient(format!(
                    "export {export} from {url} was cut off {attempt} times, last: {message}"
                )))
            } else {
                tracing::warn!(%url, export, got, "a pull was cut off, resuming: {message}");
                Ok(())
            }
        };
        let mut resp = match request.send().await {
            Ok(r) => r,
            Err(e) if got > 0 => {
                cut(e.to_string(), got)?;
                continue;
            }
            Err(e) => {
                return Err(DriverError::Unreachable {
                    server: url.to_string(),
                    message: format!("cannot pull export {export}: {e}"),
                });
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ProtocolError>(&body)
                .map(|p| p.error)
                .unwrap_or_else(|_| format!("{status}: {body}"));
            return Err(DriverError::Permanent(format!(
                "the source agent {url} could not give export {export}: {message}"
            )));
        }
        if got > 0 && status != reqwest::StatusCode::PARTIAL_CONTENT {
            // The source sends the whole export again: start over.
            file.set_len(0).await.map_err(local)?;
            file.rewind().await.map_err(local)?;
            got = 0;
        }
        let total = resp.content_length().map(|n| n + got);
        let finished = loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    file.write_all(&chunk).await.map_err(local)?;
                    got += chunk.len() as u64;
                    progress(got, total);
                }
                Ok(None) => break total.is_none_or(|t| got == t),
                Err(e) => {
                    cut(e.to_string(), got)?;
                    break false;
                }
            }
        };
        if finished {
            file.flush().await.map_err(local)?;
            return Ok(got);
        }
        if total.is_some_and(|t| got != t) && attempt >= PULL_ATTEMPTS {
            return Err(DriverError::Transient(format!(
                "export {export} from {url} ended after {got} of {} bytes",
                total.unwrap_or_default()
            )));
        }
    }
}

/// An image `target` can import: a reference to an agent's export stays a reference for a
/// remote target (its agent pulls it), and is pulled here for any other driver.
pub async fn for_target(
    image: GuestImage,
    target: &dyn Driver,
    token: &str,
) -> Result<GuestImage, DriverError> {
    if target.kind() == "remote" {
        Ok(image)
    } else {
        materialize(image, token).await
    }
}

/// The image with its bytes, pulled from the agent it refers to if needed (for a driver in
/// the core's own process, which tests use; agents pull into files).
pub async fn materialize(image: GuestImage, token: &str) -> Result<GuestImage, DriverError> {
    let Some((url, export)) = reference(&image)? else {
        return Ok(image);
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client without TLS builds");
    let path = std::env::temp_dir().join(format!(
        "cloud48-pull-{}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let pulled = pull_export(&client, &url, &export, token, &path, |_, _| {}).await;
    let data = match pulled {
        Ok(_) => tokio::fs::read(&path)
            .await
            .map_err(|e| DriverError::Permanent(format!("cannot read {}: {e}", path.display()))),
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&path).await;
    Ok(GuestImage {
        type_id: image.type_id,
        data: data?,
    })
}

impl RemoteDriver {
    /// A driver for the server `name` whose agent listens at `url`.
    pub fn new(name: &str, url: &str, token: &str, timeouts: RemoteTimeouts) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .build()
            .expect("an HTTP client without TLS builds");
        RemoteDriver {
            name: name.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            client,
            timeouts,
            capabilities: RwLock::new(Capabilities {
                suspend: true,
                exec: true,
                migrate: true,
                update: true,
                images: false,
                live_migrate: false,
                simulated: false,
                vm: None,
            }),
        }
    }

    /// The agent's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Records what the agent says it supports (from its heartbeats).
    pub fn set_capabilities(&self, c: Capabilities) {
        *self.capabilities.write().unwrap() = c;
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> DriverError {
        DriverError::Unreachable {
            server: self.name.clone(),
            message: format!("agent at {}: {e}", self.url),
        }
    }

    /// Turns a non-success protocol answer into a driver error.
    async fn protocol_error(&self, resp: reqwest::Response) -> DriverError {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if let Ok(OpResponse::Err(e)) = serde_json::from_str::<OpResponse>(&body) {
            return e;
        }
        let message = serde_json::from_str::<ProtocolError>(&body)
            .map(|p| p.error)
            .unwrap_or(body);
        DriverError::Permanent(format!(
            "agent {} refused the request ({status}): {message}",
            self.name
        ))
    }

    /// Sends a request until it is answered, at most `attempts` times with backoff from
    /// `backoff_ms`; a refusal becomes the agent's driver error or a protocol error.
    async fn answered<F, Fut>(
        &self,
        backoff_ms: u64,
        send: F,
    ) -> Result<reqwest::Response, DriverError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    {
        let mut last = None;
        for attempt in 0..self.timeouts.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(backoff_ms << attempt.min(4))).await;
            }
            match send().await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => return Err(self.protocol_error(resp).await),
                Err(e) => last = Some(e),
            }
        }
        Err(self.unreachable(last.map_or_else(|| "no answer".to_string(), |e| e.to_string())))
    }

    async fn op(&self, op: Op) -> Result<OpOutput, DriverError> {
        let request = OpRequest {
            id: hex::encode(rand::random::<[u8; 12]>()),
            op,
        };
        // A retry carries the same id: the agent runs the operation once.
        let resp = self.answered(100, || self.send_reporting(&request)).await?;
        let answer: OpResponse = resp
            .json()
            .await
            .map_err(|e| self.unreachable(format!("unreadable answer: {e}")))?;
        answer.into()
    }

    /// Sends an operation; while it runs longer than a few seconds, logs the agent's progress.
    async fn send_reporting(&self, request: &OpRequest) -> reqwest::Result<reqwest::Response> {
        let send = self
            .client
            .post(format!("{}/v1/ops", self.url))
            .bearer_auth(&self.token)
            .timeout(self.timeouts.operation)
            .json(request)
            .send();
        tokio::pin!(send);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let mut last = String::new();
        loop {
            tokio::select! {
                sent = &mut send => return sent,
                _ = tick.tick() => {
                    if let Ok(Some(s)) = self.progress(&request.id).await {
                        tracing::info!(server = %self.name, op = %request.id, elapsed_ms = s.elapsed_ms, progress = %s.progress, "agent operation in progress");
                        if s.progress != last {
                            cloud48_driver::activity::report(&format!("server {}: {}", self.name, s.progress));
                            last = s.progress;
                        }
                    }
                }
            }
        }
    }

    /// The agent's report on an operation; `None` if it does not know the id.
    pub async fn progress(&self, op_id: &str) -> Result<Option<OpStatus>, DriverError> {
        let resp = self
            .client
            .get(format!("{}/v1/ops/{op_id}", self.url))
            .bearer_auth(&self.token)
            .timeout(self.timeouts.query)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        resp.json()
            .await
            .map(Some)
            .map_err(|e| self.unreachable(format!("unreadable progress: {e}")))
    }

    async fn query<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, DriverError> {
        let url = format!("{}{path}", self.url);
        let resp = self
            .answered(50, || {
                self.client
                    .get(&url)
                    .bearer_auth(&self.token)
                    .timeout(self.timeouts.query)
                    .send()
            })
            .await?;
        resp.json::<T>()
            .await
            .map_err(|e| self.unreachable(format!("unreadable answer: {e}")))
    }

    async fn done(&self, op: Op) -> Result<(), DriverError> {
        self.op(op).await.map(|_| ())
    }

    fn unexpected(&self, answer: &OpOutput, wanted: &str) -> DriverError {
        DriverError::Permanent(format!(
            "agent {} answered {answer:?} where {wanted} was expected",
            self.name
        ))
    }

    async fn guest(&self, op: Op) -> Result<GuestInfo, DriverError> {
        match self.op(op).await? {
            OpOutput::Guest { guest } => Ok(guest),
            other => Err(DriverError::Permanent(format!(
                "agent {} answered {other:?} where a guest was expected",
                self.name
            ))),
        }
    }
}

#[async_trait]
impl Driver for RemoteDriver {
    fn kind(&self) -> &'static str {
        "remote"
    }

    fn capabilities(&self) -> Capabilities {
        *self.capabilities.read().unwrap()
    }

    async fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        self.guest(Op::Create { spec: spec.clone() }).await
    }

    async fn start(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::Start {
            guest: guest_id.into(),
        })
        .await
    }

    async fn stop(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::Stop {
            guest: guest_id.into(),
        })
        .await
    }

    async fn suspend(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::Suspend {
            guest: guest_id.into(),
        })
        .await
    }

    async fn resume(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::Resume {
            guest: guest_id.into(),
        })
        .await
    }

    async fn reboot(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::Reboot {
            guest: guest_id.into(),
        })
        .await
    }

    async fn destroy(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::Destroy {
            guest: guest_id.into(),
        })
        .await
    }

    async fn update(&self, guest_id: &str, resources: &Resources) -> Result<(), DriverError> {
        self.done(Op::Update {
            guest: guest_id.into(),
            resources: *resources,
        })
        .await
    }

    async fn export(&self, guest_id: &str) -> Result<GuestImage, DriverError> {
        if !self.capabilities().migrate {
            return Err(DriverError::Unsupported {
                driver: "remote".into(),
                operation: "export".into(),
            });
        }
        // The agent snapshots the stopped guest now; the bytes move later, agent to agent.
        let export = match self
            .op(Op::Export {
                guest: guest_id.into(),
            })
            .await?
        {
            OpOutput::Export { export, .. } => export,
            other => {
                return Err(DriverError::Permanent(format!(
                    "agent {} answered {other:?} where an export was expected",
                    self.name
                )));
            }
        };
        Ok(agent_image("", &self.url, &export))
    }

    async fn import(&self, spec: &GuestSpec, image: &GuestImage) -> Result<GuestInfo, DriverError> {
        if let Some(upload) = upload_of(image) {
            return self
                .guest(Op::Import {
                    spec: spec.clone(),
                    source: ImageSource::Core {
                        export: upload.to_string(),
                        type_id: spec.type_id.clone(),
                    },
                })
                .await;
        }
        let source = match reference(image)? {
            Some((url, export)) => ImageSource::Agent {
                url,
                export,
                type_id: spec.type_id.clone(),
            },
            None => ImageSource::Inline {
                type_id: image.type_id.clone(),
                data_hex: hex::encode(&image.data),
            },
        };
        self.guest(Op::Import {
            spec: spec.clone(),
            source,
        })
        .await
    }

    async fn live_offer(&self, guest_id: &str) -> Result<LiveOffer, DriverError> {
        match self
            .op(Op::LiveOffer {
                guest: guest_id.into(),
            })
            .await?
        {
            OpOutput::LiveOffer { offer } => Ok(offer),
            other => Err(self.unexpected(&other, "a live migration offer")),
        }
    }

    async fn live_receive(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        match self
            .op(Op::LiveReceive {
                spec: spec.clone(),
                offer: offer.clone(),
            })
            .await?
        {
            OpOutput::LiveTarget { target } => Ok(target),
            other => Err(self.unexpected(&other, "a live migration target")),
        }
    }

    async fn live_send(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        match self
            .op(Op::LiveSend {
                guest: guest_id.into(),
                target: target.clone(),
            })
            .await?
        {
            OpOutput::LiveReport { report } => Ok(report),
            other => Err(self.unexpected(&other, "a live migration report")),
        }
    }

    async fn live_finish(&self, guest_id: &str) -> Result<(), DriverError> {
        self.done(Op::LiveFinish {
            guest: guest_id.into(),
        })
        .await
    }

    async fn exec(
        &self,
        guest_id: &str,
        script: &str,
        args: &[String],
    ) -> Result<ExecOutput, DriverError> {
        match self
            .op(Op::Exec {
                guest: guest_id.into(),
                script: script.into(),
                args: args.to_vec(),
            })
            .await?
        {
            OpOutput::Exec { output } => Ok(output),
            other => Err(DriverError::Permanent(format!(
                "agent {} answered {other:?} where exec output was expected",
                self.name
            ))),
        }
    }

    async fn fetch_image(
        &self,
        from: &cloud48_driver::ImageOrigin,
        image: Option<&str>,
    ) -> Result<Vec<String>, DriverError> {
        match self
            .op(Op::FetchImage {
                from: from.clone(),
                image: image.map(String::from),
            })
            .await?
        {
            OpOutput::Images { images } => Ok(images),
            other => Err(self.unexpected(&other, "images")),
        }
    }

    async fn status(&self, guest_id: &str) -> Result<Option<GuestInfo>, DriverError> {
        self.query(&format!("/v1/guests/{guest_id}")).await
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        self.query("/v1/guests").await
    }

    async fn stats(&self) -> Result<ServerStats, DriverError> {
        self.query("/v1/stats").await
    }

    async fn logs(&self, guest_id: &str) -> Result<String, DriverError> {
        self.query(&format!("/v1/guests/{guest_id}/logs")).await
    }
}
