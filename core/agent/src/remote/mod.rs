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

mod exports;

use exports::reference;
pub use exports::{
    agent_image, core_upload, drop_export, for_target, is_reference, materialize, open_export,
    pull_export, reference_of, upload_of,
};

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
