//! HTTP client of the REST API, used by the CLI and by tests.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::ErrorBody;
use crate::model::{Accepted, Command};

/// A client of one core.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client of the core at `base` (e.g. `http://127.0.0.1:4848`).
    pub fn new(base: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(330))
                .build()
                .expect("HTTP client builds"),
        }
    }

    async fn send<B: Serialize>(&self, method: Method, path: &str, body: Option<&B>) -> Result<reqwest::Response> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!("cannot reach the core at {}: is `cloud48 serve` running there? (use --server URL)", self.base)
            } else {
                anyhow!("request to {url} failed: {e}")
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => bail!("{} ({})", body.error.message, status_word(status)),
            Err(_) => bail!("the core answered {status}: {text}"),
        }
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send::<()>(Method::GET, path, None).await?;
        resp.json().await.context("the core sent JSON this client does not understand")
    }

    /// POST a JSON body, expecting JSON back.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.send(Method::POST, path, Some(body)).await?;
        resp.json().await.context("the core sent JSON this client does not understand")
    }

    /// DELETE, expecting JSON back.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send::<()>(Method::DELETE, path, None).await?;
        resp.json().await.context("the core sent JSON this client does not understand")
    }

    /// Submits a mutation: POST (or DELETE when `body` is None) answering 202.
    pub async fn submit<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<Accepted> {
        match body {
            Some(b) => self.post(path, b).await,
            None => self.delete(path).await,
        }
    }

    /// A command, waiting up to `wait_secs` for it to finish.
    pub async fn command(&self, id: i64, wait_secs: u64) -> Result<Command> {
        self.get(&format!("/v1/commands/{id}?wait={wait_secs}")).await
    }

    /// Waits until a command is terminal, calling `progress` with each state seen.
    pub async fn wait(&self, id: i64, mut progress: impl FnMut(&Command)) -> Result<Command> {
        loop {
            let cmd = self.command(id, 1).await?;
            progress(&cmd);
            if cmd.status.is_terminal() {
                return Ok(cmd);
            }
        }
    }
}

fn status_word(s: StatusCode) -> String {
    format!("HTTP {}", s.as_u16())
}
