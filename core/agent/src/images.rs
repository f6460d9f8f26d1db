//! Where an agent pulls the images its containers run: the core's image store over HTTP
//! (`GET /v1/images/{name}` to resolve a name, `GET /v1/images/blobs/{digest}` with
//! `Range: bytes=OFFSET-` for the bytes), streamed into the agent's store, which verifies each
//! blob and resumes one a broken connection left half-written.

use std::io::{self, Read};

use futures::TryStreamExt;
use tokio::runtime::Handle;

use cloud48_image::{Digest, ImageDetails, ImageError, Source};

/// The core's image store, read with the agent token.
pub struct CoreImages {
    client: reqwest::Client,
    base: String,
    token: String,
    runtime: Handle,
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
            token: token.to_string(),
            runtime,
        }
    }

    fn unreachable(&self, what: &str, e: impl std::fmt::Display) -> ImageError {
        ImageError::Io {
            context: format!("{what} from the core at {}", self.base),
            source: io::Error::other(e.to_string()),
        }
    }

    /// An answer that is not a success, as the error the store reports.
    fn refused(&self, what: &str, status: reqwest::StatusCode, body: &str) -> ImageError {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_else(|| body.trim().to_string());
        let message = format!("{what}: the core answered {status}: {message}");
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

impl Source for CoreImages {
    fn resolve(&self, image: &str) -> Result<Digest, ImageError> {
        let what = format!("image {image}");
        let url = format!("{}/{}", self.base, image.replace('/', "%2F"));
        self.runtime.block_on(async {
            let r = self
                .client
                .get(&url)
                .bearer_auth(&self.token)
                .send()
                .await
                .map_err(|e| self.unreachable(&what, e))?;
            let status = r.status();
            let body = r.text().await.map_err(|e| self.unreachable(&what, e))?;
            if !status.is_success() {
                return Err(self.refused(&what, status, &body));
            }
            let details: ImageDetails = serde_json::from_str(&body).map_err(|e| {
                ImageError::Corrupt(format!(
                    "the core's description of {what} is not valid: {e}"
                ))
            })?;
            Ok(details.summary.digest)
        })
    }

    fn blob(&self, digest: &Digest, offset: u64) -> Result<Box<dyn Read + '_>, ImageError> {
        let what = format!("blob {digest}");
        let url = format!("{}/blobs/{digest}", self.base);
        let response = self.runtime.block_on(async {
            let mut req = self.client.get(&url).bearer_auth(&self.token);
            if offset > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
            }
            let r = req.send().await.map_err(|e| self.unreachable(&what, e))?;
            let status = r.status();
            let expected = if offset > 0 {
                reqwest::StatusCode::PARTIAL_CONTENT
            } else {
                reqwest::StatusCode::OK
            };
            if status != expected {
                let body = r.text().await.unwrap_or_default();
                return Err(self.refused(&what, status, &body));
            }
            Ok(r)
        })?;
        let stream = response.bytes_stream().map_err(io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
            reader,
            self.runtime.clone(),
        )))
    }
}
