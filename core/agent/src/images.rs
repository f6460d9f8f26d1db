//! Where an agent pulls the images its containers run: peer agents that hold the image, and
//! the core's image store, over HTTP (`GET /v1/images/{name}` to resolve a name,
//! `GET /v1/images/blobs/{digest}` with `Range: bytes=OFFSET-` for the bytes; agents serve
//! their own stores the same way), streamed into the agent's store, which verifies each blob
//! and resumes one a broken connection left half-written.
//!
//! The core names the holders (`GET /v1/images/{name}/holders`, from the agents' heartbeats).
//! A name is resolved at the core, or at a holder when the core no longer has it; blobs come
//! from a holder when one answers, else from the core. A peer cannot slip in other bytes: the
//! store checks every blob against its digest. An agent that knows several cores (a cluster)
//! asks them in the order its heartbeats do, so a pull goes on when a core is down.

use std::io::{self, Read};

use futures::TryStreamExt;
use tokio::runtime::Handle;

use cloud48_image::{Digest, ImageDetails, ImageError, Source};

/// The core's image store, read with the agent token.
pub struct CoreImages {
    client: reqwest::Client,
    base: String,
    /// The agent's cores, when it pulls from whichever of them answers (`base` is then the
    /// one that resolved the image being pulled).
    cores: Option<crate::SharedCores>,
    /// The `/v1/images` base of the core that resolved the image being pulled.
    resolved_at: std::sync::Mutex<Option<String>>,
    token: String,
    runtime: Handle,
    /// This agent's own address (never its own peer).
    me: Option<String>,
    /// The image being pulled, and the `/v1/images` bases of the peers that hold it once
    /// asked (only when a blob must be fetched: a cached image costs no such request).
    peers: std::sync::Mutex<(String, Option<Vec<String>>)>,
}

impl CoreImages {
    /// The store of the core at `core_url`; `runtime` runs the requests (a pull runs on a
    /// blocking thread and waits on it).
    pub fn new(core_url: &str, token: &str, runtime: Handle) -> CoreImages {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("an HTTP client without TLS builds");
        CoreImages {
            client,
            base: format!("{}/v1/images", core_url.trim_end_matches('/')),
            cores: None,
            resolved_at: Default::default(),
            token: token.to_string(),
            runtime,
            me: None,
            peers: Default::default(),
        }
    }

    /// The stores of the cores in `cores` (an agent's, shared with its heartbeats), asked in
    /// the order heartbeats go: the one that answered last first.
    pub fn over_cores(cores: crate::SharedCores, token: &str, runtime: Handle) -> CoreImages {
        let first = cores.lock().unwrap().current().to_string();
        CoreImages {
            cores: Some(cores),
            ..CoreImages::new(&first, token, runtime)
        }
    }

    /// The `/v1/images` bases of the cores to ask, in order.
    fn core_bases(&self) -> Vec<String> {
        match &self.cores {
            Some(cores) => cores
                .lock()
                .unwrap()
                .rotation()
                .into_iter()
                .map(|(_, url)| format!("{url}/v1/images"))
                .collect(),
            None => vec![self.base.clone()],
        }
    }

    /// The core to read blobs from: the one that resolved the image, else the first.
    fn core_base(&self) -> String {
        self.resolved_at
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| self.core_bases().swap_remove(0))
    }

    /// The same, for the agent at `url`, which never pulls from itself.
    pub fn for_agent(mut self, url: &str) -> CoreImages {
        self.me = Some(url.trim_end_matches('/').to_string());
        self
    }

    fn unreachable(base: &str, what: &str, e: impl std::fmt::Display) -> ImageError {
        ImageError::Io {
            context: format!("{what} from {base}"),
            source: io::Error::other(e.to_string()),
        }
    }

    /// An answer that is not a success, as the error the store reports.
    fn refused(base: &str, what: &str, status: reqwest::StatusCode, body: &str) -> ImageError {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v["error"]["message"]
                    .as_str()
                    .or(v["error"].as_str())
                    .or(v["message"].as_str())
                    .map(String::from)
            })
            .unwrap_or_else(|| body.trim().to_string());
        let message = format!("{what}: {base} answered {status}: {message}");
        if status == reqwest::StatusCode::NOT_FOUND {
            ImageError::NotFound(message)
        } else {
            ImageError::Io {
                context: message,
                source: io::Error::other("refused"),
            }
        }
    }
}

impl CoreImages {
    /// A GET of `url` with the fleet's token.
    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.get(url).bearer_auth(&self.token)
    }

    /// The `/v1/images` bases of the agents the core says hold `image` (none when it cannot
    /// say).
    async fn holders(&self, image: &str) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Holders {
            holders: Vec<String>,
        }
        // The core that resolved the image first, then the others: the first that answers.
        let mut bases = self.core_bases();
        if let Some(resolved) = self.resolved_at.lock().unwrap().clone() {
            bases.retain(|b| *b != resolved);
            bases.insert(0, resolved);
        }
        let mut answer = None;
        for base in bases {
            let url = format!("{base}/{}/holders", image.replace('/', "%2F"));
            let asked = async {
                let r = self.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())?;
                r.json::<Holders>().await.ok()
            };
            if let Some(h) = asked.await {
                answer = Some(h);
                break;
            }
        }
        answer
            .map(|h| h.holders)
            .unwrap_or_default()
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .filter(|u| Some(u) != self.me.as_ref())
            .map(|u| format!("{u}/v1/images"))
            .collect()
    }

    /// The manifest digest of `image` at the store whose API is at `base`.
    async fn resolve_at(&self, base: &str, image: &str) -> Result<Digest, ImageError> {
        let what = format!("image {image}");
        let url = format!("{base}/{}", image.replace('/', "%2F"));
        let r = self
            .get(&url)
            .send()
            .await
            .map_err(|e| Self::unreachable(base, &what, e))?;
        let status = r.status();
        let body = r
            .text()
            .await
            .map_err(|e| Self::unreachable(base, &what, e))?;
        if !status.is_success() {
            return Err(Self::refused(base, &what, status, &body));
        }
        let details: ImageDetails = serde_json::from_str(&body).map_err(|e| {
            ImageError::Corrupt(format!("{base}'s description of {what} is not valid: {e}"))
        })?;
        Ok(details.summary.digest)
    }

    /// The answer of the store at `base` to a request for blob `digest` from `offset`.
    async fn blob_at(
        &self,
        base: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, ImageError> {
        let what = format!("blob {digest}");
        let url = format!("{base}/blobs/{digest}");
        let mut req = self.get(&url);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let r = req
            .send()
            .await
            .map_err(|e| Self::unreachable(base, &what, e))?;
        let status = r.status();
        let expected = if offset > 0 {
            reqwest::StatusCode::PARTIAL_CONTENT
        } else {
            reqwest::StatusCode::OK
        };
        if status != expected {
            let body = r.text().await.unwrap_or_default();
            return Err(Self::refused(base, &what, status, &body));
        }
        Ok(r)
    }
}

impl Source for CoreImages {
    fn resolve(&self, image: &str) -> Result<Digest, ImageError> {
        self.runtime.block_on(async {
            *self.peers.lock().unwrap() = (image.to_string(), None);
            *self.resolved_at.lock().unwrap() = None;
            // The cores in turn: one that is down (or lacks the image) passes to the next.
            let mut at_core = None;
            for base in self.core_bases() {
                match self.resolve_at(&base, image).await {
                    Ok(digest) => {
                        *self.resolved_at.lock().unwrap() = Some(base);
                        return Ok(digest);
                    }
                    Err(e) => {
                        tracing::info!(core = %base, image, "a core could not resolve the image: {e}");
                        at_core.get_or_insert(Err(e));
                    }
                }
            }
            let at_core = at_core.expect("an agent knows at least one core");
            let peers = self.holders(image).await;
            self.peers.lock().unwrap().1 = Some(peers.clone());
            for peer in &peers {
                match self.resolve_at(peer, image).await {
                    Ok(digest) => return Ok(digest),
                    Err(e) => {
                        tracing::info!(%peer, image, "a holder could not resolve the image: {e}")
                    }
                }
            }
            at_core
        })
    }

    fn blob(&self, digest: &Digest, offset: u64) -> Result<Box<dyn Read + '_>, ImageError> {
        let response = self.runtime.block_on(async {
            let (image, known) = self.peers.lock().unwrap().clone();
            let peers = match known {
                Some(peers) => peers,
                None => {
                    let peers = self.holders(&image).await;
                    self.peers.lock().unwrap().1 = Some(peers.clone());
                    peers
                }
            };
            for peer in &peers {
                match self.blob_at(peer, digest, offset).await {
                    Ok(r) => return Ok(r),
                    Err(e) => tracing::info!(%peer, %digest, "pulling from the core instead: {e}"),
                }
            }
            self.blob_at(&self.core_base(), digest, offset).await
        })?;
        let stream = response.bytes_stream().map_err(io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
            reader,
            self.runtime.clone(),
        )))
    }
}
