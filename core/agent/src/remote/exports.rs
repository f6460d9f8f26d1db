//! References to exports and uploads travelling in place of a guest's image, and pulling an
//! export's bytes from the agent that holds it (ranged, resumed, retried).

use super::*;

/// True when an image is a reference to an export on an agent rather than bytes. Images that
/// come from users (a platform import) must never be references: a forged one would make an
/// agent present the fleet's token to any address.
pub fn is_reference(image: &[u8]) -> bool {
    image.starts_with(AGENT_IMAGE) || image.starts_with(CORE_UPLOAD)
}

/// What stands for the disk of a container uploaded to a core (`container import` of a
/// streamed export): the upload's id, which agents pull from their cores.
pub(super) const CORE_UPLOAD: &[u8] = b"cloud48-core-upload:";

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

pub(super) fn reference(image: &GuestImage) -> Result<Option<(String, String)>, DriverError> {
    let Some(r) = image.data.strip_prefix(AGENT_IMAGE) else {
        return Ok(None);
    };
    serde_json::from_slice(r)
        .map(Some)
        .map_err(|e| DriverError::Permanent(format!("corrupt agent image reference: {e}")))
}

/// How many times a pull cut off is resumed before it fails.
pub(super) const PULL_ATTEMPTS: u32 = 5;

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
