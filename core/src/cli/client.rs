//! HTTP client of the REST API, used by the CLI and by tests.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use cloud48_api::ErrorBody;
use cloud48_engine::events::{Delivery, Shared};
use cloud48_engine::model::{Accepted, Command};

/// A request body.
enum Body {
    Json(serde_json::Value),
    Wasm(Vec<u8>),
    /// A file streamed from disk (opened again for each attempt), with its content type.
    File(std::path::PathBuf, &'static str),
}

/// A user name and password for HTTP Digest authentication.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password (kept in memory only).
    pub password: String,
}

/// A client of one core.
#[derive(Clone)]
pub struct Client {
    /// The core's base URL, or why the one given is not one (said at the first request:
    /// commands that talk to no core do not mind it).
    base: std::result::Result<String, String>,
    http: reqwest::Client,
    /// For requests that send a file (an image, an export): their answer comes after the
    /// upload and the core's work on it, which may take longer than `SILENT`.
    uploads: reqwest::Client,
    credentials: Option<Credentials>,
    /// The last Digest challenge, reused (with increasing nonce counts) until refused.
    prompt: std::sync::Arc<std::sync::Mutex<Option<digest_auth::WwwAuthenticateHeader>>>,
    /// Whether the challenge was asked for already (a core without users never sends one).
    probed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How long the client waits for the next bytes of an answer before it gives the core up.
const SILENT: Duration = Duration::from_secs(120);

/// The longest one read of a command waits for it to finish, seconds.
const WAIT_CHUNK: u64 = 60;

impl Client {
    /// A client of the core at `base` (e.g. `http://127.0.0.1:4848`).
    pub fn new(base: &str) -> Self {
        Client {
            base: cloud48_engine::model::base_url(base)
                .map_err(|e| format!("--server (or CLOUD48_SERVER) {e}")),
            // A core that stopped answering (frozen, overloaded) is given up on: every answer
            // comes sooner (an event stream sends a comment every 15 s, a waiting read at most
            // WAIT_CHUNK). No bound on the whole: an event stream lasts as long as it is read.
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(SILENT)
                .build()
                .expect("HTTP client builds"),
            uploads: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(3600))
                .build()
                .expect("HTTP client builds"),
            credentials: None,
            prompt: Default::default(),
            probed: Default::default(),
        }
    }

    /// The same client, authenticating as `credentials`.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    fn authorization(&self, method: &Method, uri: &str) -> Option<String> {
        let creds = self.credentials.as_ref()?;
        let mut prompt = self.prompt.lock().unwrap();
        let p = prompt.as_mut()?;
        let ctx = digest_auth::AuthContext::new_with_method(
            creds.user.as_str(),
            creds.password.as_str(),
            uri,
            Option::<&[u8]>::None,
            digest_auth::HttpMethod::from(method.as_str()),
        );
        p.respond(&ctx).ok().map(|h| h.to_string())
    }

    /// Remembers the best challenge of a 401 answer; false if there is none to answer.
    fn learn_challenge(&self, resp: &reqwest::Response) -> bool {
        let challenges: Vec<digest_auth::WwwAuthenticateHeader> = resp
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| digest_auth::parse(v).ok())
            .collect();
        let best = challenges
            .iter()
            .find(|c| c.algorithm.algo == digest_auth::AlgorithmType::SHA2_256)
            .or(challenges.first())
            .cloned();
        let found = best.is_some();
        *self.prompt.lock().unwrap() = best;
        found
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response> {
        self.send_raw(
            method,
            path,
            body.map(|b| Body::Json(serde_json::to_value(b).expect("serializable"))),
        )
        .await
    }

    /// Sends a WASM component (`application/wasm`), expecting JSON back (or nothing).
    pub async fn send_wasm<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        wasm: Vec<u8>,
    ) -> Result<T> {
        let resp = self.send_raw(method, path, Some(Body::Wasm(wasm))).await?;
        resp.json()
            .await
            .context("the core sent JSON this client does not understand")
    }

    /// POSTs the file at `file` as the body, streamed, expecting JSON back. With credentials,
    /// a first small request learns the Digest challenge, so that the upload is not answered
    /// 401 halfway through.
    pub async fn post_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
        content_type: &'static str,
    ) -> Result<T> {
        let resp = self
            .send_raw(
                Method::POST,
                path,
                Some(Body::File(file.to_path_buf(), content_type)),
            )
            .await?;
        resp.json()
            .await
            .context("the core sent JSON this client does not understand")
    }

    /// With credentials but no Digest challenge yet, learns one with a small request that
    /// anonymous callers may never make (the audit trail is for admins), once per client, so
    /// that every request is signed: an upload is then not answered 401 halfway through, and a
    /// read that anonymous callers may make is not answered as to one (they see the project
    /// `default` only).
    async fn sign_in_first(&self) -> Result<()> {
        let known = self.prompt.lock().unwrap().is_some();
        let Ok(base) = self.base.as_deref() else {
            return Ok(());
        };
        use std::sync::atomic::Ordering::Relaxed;
        if self.credentials.is_none() || known || self.probed.load(Relaxed) {
            return Ok(());
        }
        // A failure to connect is said by the request that follows (and the next asks again).
        if let Ok(resp) = self
            .http
            .get(format!("{base}/v1/audit?limit=1"))
            .send()
            .await
        {
            self.probed.store(true, Relaxed);
            if resp.status() == StatusCode::UNAUTHORIZED {
                self.learn_challenge(&resp);
            }
        }
        Ok(())
    }

    /// GETs `path` and writes the body, streamed, to `to` (standard output when `None`);
    /// returns its length. A regular file is written beside `to` and renamed over it only once
    /// the whole body arrived: a refusal or a broken download leaves an existing `to` as it
    /// was (a device, pipe or link is written through).
    pub async fn download(&self, path: &str, to: Option<&std::path::Path>) -> Result<u64> {
        let resp = self.send_raw(Method::GET, path, None).await?;
        let Some(to) = to else {
            return Self::stream_to(resp, path, Box::new(tokio::io::stdout())).await;
        };
        // A device, a pipe (`-o >(gzip > x)`) or a link is written through, as it is.
        let plain = match std::fs::symlink_metadata(to) {
            Ok(m) => m.file_type().is_file(),
            Err(_) => true,
        };
        if !plain {
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(to)
                .await
                .with_context(|| format!("cannot write {}", to.display()))?;
            return Self::stream_to(resp, path, Box::new(file)).await;
        }
        let name = to.file_name().map_or_else(
            || std::ffi::OsString::from("download"),
            std::ffi::OsStr::to_os_string,
        );
        let mut partial = std::ffi::OsString::from(".");
        partial.push(&name);
        partial.push(".partial");
        let partial = to.with_file_name(partial);
        let file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let written = Self::stream_to(resp, path, Box::new(file)).await;
        let renamed = match written {
            Ok(n) => tokio::fs::rename(&partial, to)
                .await
                .with_context(|| format!("cannot write {}", to.display()))
                .map(|()| n),
            Err(e) => Err(e),
        };
        if renamed.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        renamed
    }

    /// Writes the body of `resp` (the answer to `path`) to `out`; returns its length.
    async fn stream_to(
        mut resp: reqwest::Response,
        path: &str,
        mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    ) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let expected = resp.content_length();
        let mut got = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("the download of {path} broke off after {got} bytes"))?
        {
            out.write_all(&chunk)
                .await
                .context("cannot write the download")?;
            got += chunk.len() as u64;
        }
        out.flush().await.context("cannot write the download")?;
        if expected.is_some_and(|n| n != got) {
            bail!("the download of {path} broke off after {got} bytes");
        }
        Ok(got)
    }

    /// DELETE expecting no content.
    pub async fn delete_empty(&self, path: &str) -> Result<()> {
        self.send_raw(Method::DELETE, path, None).await.map(|_| ())
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<reqwest::Response> {
        let base = self.base.as_deref().map_err(|e| anyhow!("{e}"))?;
        let route = path.split('?').next().unwrap_or(path);
        if route.ends_with('/') || route.contains("//") {
            bail!("a name or id given is empty: give the name or id of the object ({route})");
        }
        self.sign_in_first().await?;
        let url = format!("{base}{path}");
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let client = match &body {
                Some(Body::File(..)) => &self.uploads,
                _ => &self.http,
            };
            let mut req = client.request(method.clone(), &url);
            match &body {
                Some(Body::Json(v)) => req = req.json(v),
                Some(Body::Wasm(w)) => {
                    req = req
                        .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                        .body(w.clone())
                }
                Some(Body::File(path, content_type)) => {
                    let file = tokio::fs::File::open(path)
                        .await
                        .with_context(|| format!("opening {}", path.display()))?;
                    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                    req = req
                        .header(reqwest::header::CONTENT_TYPE, *content_type)
                        .header(reqwest::header::CONTENT_LENGTH, len)
                        .body(reqwest::Body::from(file))
                }
                None => {}
            }
            let signed = match self.authorization(&method, path) {
                Some(h) => {
                    req = req.header(reqwest::header::AUTHORIZATION, h);
                    true
                }
                None => false,
            };
            let resp = req.send().await.map_err(|e| {
                // The transport's error stays in the chain (`wait` tells a cut-off by it).
                if e.is_connect() {
                    anyhow::Error::new(e).context(format!("cannot reach the core at {base}: is `cloud48 serve` running there? (use --server URL)"))
                } else if e.is_timeout() {
                    anyhow::Error::new(e).context(format!(
                        "the core at {base} did not answer within {} s: it may be stopped, \
                         overloaded or cut off; try again (with several cores, --server naming \
                         another one)",
                        SILENT.as_secs()
                    ))
                } else {
                    anyhow::Error::new(e).context(format!("request to {url} failed"))
                }
            })?;
            // Answer a challenge (a first one, or a stale nonce) once or twice, then give up; a
            // signed request refused with a fresh nonce had wrong credentials, and trying them
            // again only counts another failed sign-in.
            if resp.status() == StatusCode::UNAUTHORIZED
                && self.credentials.is_some()
                && attempt < 3
                && self.learn_challenge(&resp)
                && (!signed
                    || self
                        .prompt
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_some_and(|p| p.stale))
            {
                continue;
            }
            break resp;
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        // A node agent answers every request without its token so.
        if text.contains("this agent needs 'Authorization: Bearer TOKEN'") {
            bail!(
                "{base} is a node agent (`cloud48 agent`), not a core: give --server the URL of \
                 `cloud48 serve` (agents are reached through their core)"
            );
        }
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => body.error.message,
            Err(_) => format!("the core answered: {text}"),
        };
        match (status, &self.credentials) {
            (StatusCode::UNAUTHORIZED, None) => bail!(
                "{message} ({}): sign in with --user NAME; the password comes from CLOUD48_PASSWORD, --credentials FILE or a prompt",
                status_word(status)
            ),
            (StatusCode::UNAUTHORIZED, Some(c)) => {
                bail!(
                    "authentication as '{}' failed: {message} ({})",
                    c.user,
                    status_word(status)
                )
            }
            _ => bail!("{message} ({})", status_word(status)),
        }
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send::<()>(Method::GET, path, None).await?;
        resp.json()
            .await
            .context("the core sent JSON this client does not understand")
    }

    /// GET a text document (such as `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let resp = self.send::<()>(Method::GET, path, None).await?;
        resp.text()
            .await
            .context("the core's answer ended before it was whole")
    }

    /// GET every page of a list, following each page's `Link: <…>; rel="next"` header.
    pub async fn get_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>> {
        let mut all = Vec::new();
        self.pages(path, |page| {
            all.extend(page);
            Ok(())
        })
        .await?;
        Ok(all)
    }

    /// GET a list page by page, following each page's `Link: <…>; rel="next"` header, handing
    /// each page to `on` as it arrives (a list of any length in the memory of one page).
    pub async fn pages<T: DeserializeOwned>(
        &self,
        path: &str,
        mut on: impl FnMut(Vec<T>) -> Result<()>,
    ) -> Result<()> {
        let mut next = Some(path.to_string());
        while let Some(path) = next.take() {
            let page: Vec<T>;
            (page, next) = self.page(&path).await?;
            if page.is_empty() {
                break;
            }
            on(page)?;
        }
        Ok(())
    }

    /// GET one page of a list: its items and the path of the next page, if there is one.
    pub async fn page<T: DeserializeOwned>(&self, path: &str) -> Result<(Vec<T>, Option<String>)> {
        let resp = self.send::<()>(Method::GET, path, None).await?;
        let next = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let page = resp
            .json()
            .await
            .context("the core sent JSON this client does not understand")?;
        Ok((page, next))
    }

    /// POST a JSON body, expecting JSON back.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.send(Method::POST, path, Some(body)).await?;
        resp.json()
            .await
            .context("the core sent JSON this client does not understand")
    }

    /// PUT a JSON body, expecting JSON back.
    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.send(Method::PUT, path, Some(body)).await?;
        resp.json()
            .await
            .context("the core sent JSON this client does not understand")
    }

    /// DELETE, expecting JSON back.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send::<()>(Method::DELETE, path, None).await?;
        resp.json()
            .await
            .context("the core sent JSON this client does not understand")
    }

    /// Submits a mutation: POST (or DELETE when `body` is None) answering 202.
    pub async fn submit<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<Accepted> {
        match body {
            Some(b) => self.post(path, b).await,
            None => self.delete(path).await,
        }
    }

    /// A command, waiting up to `wait_secs` for it to finish (in reads of at most
    /// `WAIT_CHUNK` each, well within the client's read timeout).
    pub async fn command(
        &self,
        id: cloud48_engine::model::CommandId,
        wait_secs: u64,
    ) -> Result<Command> {
        let deadline = std::time::Instant::now() + Duration::from_secs(wait_secs);
        loop {
            let left = deadline
                .saturating_duration_since(std::time::Instant::now())
                .as_secs();
            let wait = left.min(WAIT_CHUNK);
            let cmd: Command = self.get(&format!("/v1/commands/{id}?wait={wait}")).await?;
            if cmd.status.is_terminal() || left <= WAIT_CHUNK {
                return Ok(cmd);
            }
        }
    }

    /// Opens the event stream at `path` (`/v1/events?...`): its `ready` message, then events,
    /// until the connection ends (the core stopping ends it: reconnect after the last id seen).
    pub async fn events(
        &self,
        path: &str,
    ) -> Result<impl futures::Stream<Item = Result<Delivery>> + use<>> {
        use futures::StreamExt;
        let resp = self.send::<()>(Method::GET, path, None).await?;
        Ok(sse_parse::EventStream::new(resp.bytes_stream()).map(|r| {
            let m = r.map_err(|e| anyhow!("the event stream broke: {e}"))?;
            match m.event.as_str() {
                "ready" => Ok(Delivery::Ready(m.data.trim().parse().with_context(
                    || {
                        format!(
                            "the core sent a ready message this client does not understand: {}",
                            m.data
                        )
                    },
                )?)),
                "error" => Err(anyhow!("{}", m.data)),
                _ => Ok(Delivery::Event(Shared::decode(m.data).context(
                    "the core sent an event this client does not understand",
                )?)),
            }
        }))
    }

    /// Follows the event stream for good: `path(after)` is the stream to open after an event
    /// id (first `after`); when a connection ends (the client's deadline) it opens the stream
    /// again after the last id seen, so nothing is missed. `on` sees every delivery (a `Ready`
    /// at each connection) until it returns a value.
    pub async fn follow<T>(
        &self,
        mut after: Option<i64>,
        path: impl Fn(Option<i64>) -> String,
        mut on: impl AsyncFnMut(Delivery) -> Result<Option<T>>,
    ) -> Result<T> {
        use futures::StreamExt;
        loop {
            let mut events = std::pin::pin!(self.events(&path(after)).await?);
            while let Some(item) = events.next().await {
                let delivery = item?;
                after = Some(match &delivery {
                    Delivery::Ready(from) => *from,
                    Delivery::Event(e) => e.id,
                });
                if let Some(done) = on(delivery).await? {
                    return Ok(done);
                }
            }
        }
    }

    /// Waits until a command is terminal, calling `progress` with each state seen: reads it
    /// once the stream of its events is live, then again at each of them, never on a timer.
    pub async fn wait(
        &self,
        id: cloud48_engine::model::CommandId,
        mut progress: impl FnMut(&Command),
    ) -> Result<Command> {
        let path = |after: Option<i64>| match after {
            Some(a) => format!("/v1/events?object=command:{id}&after={a}"),
            None => format!("/v1/events?object=command:{id}"),
        };
        self.follow(None, path, async |_| {
            let cmd = self.command(id, 0).await?;
            progress(&cmd);
            Ok(cmd.status.is_terminal().then_some(cmd))
        })
        .await
        .map_err(|e| {
            // Cut off from the core: the command is the core's and goes on (another core of
            // a cluster resumes it).
            if cut_off(&e) {
                e.context(format!(
                    "stopped waiting for command {id}, which goes on; follow it with `cloud48 \
                     command wait {id}` (with several cores, --server naming another one)"
                ))
            } else {
                e
            }
        })
    }
}

/// Whether `e` says the client lost its core (it stopped, or the connection broke) rather
/// than that the core refused something.
pub fn cut_off(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<reqwest::Error>().is_some()
            || c.to_string().starts_with("the event stream broke")
    })
}

fn status_word(s: StatusCode) -> String {
    format!("HTTP {}", s.as_u16())
}

/// The target of the `rel="next"` entry of a `Link` header (a path on the core).
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|entry| {
        let (target, params) = entry.trim().split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        assert_eq!(
            super::next_link("</v1/containers?all=true&after=1000>; rel=\"next\""),
            Some("/v1/containers?all=true&after=1000".into())
        );
        assert_eq!(
            super::next_link("</a>; rel=\"prev\", </b>; rel=\"next\""),
            Some("/b".into())
        );
        assert_eq!(super::next_link("</a>; rel=\"prev\""), None);
    }
}
