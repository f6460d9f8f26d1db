//! Files served from the offset a `Range: bytes=N-` header asks for: how the core's image
//! blobs, an agent's image blobs and an agent's exports are pulled, and resumed where a cut
//! transfer stopped. Other range forms get the whole file.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncSeekExt;

/// The start of a `bytes=N-` range.
pub fn range_start(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

/// `file` (of `len` bytes) as the answer to a request with `headers`: `206` from the start of
/// its `bytes=N-` range, `416` when N is past the end, else `200` with all of it.
pub async fn serve(
    mut file: tokio::fs::File,
    len: u64,
    headers: &HeaderMap,
    content_type: &'static str,
) -> Response {
    let kind = (header::CONTENT_TYPE, content_type.to_string());
    let Some(start) = range_start(headers) else {
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16));
        return (
            [
                kind,
                (header::CONTENT_LENGTH, len.to_string()),
                (header::ACCEPT_RANGES, "bytes".to_string()),
            ],
            body,
        )
            .into_response();
    };
    if start > len {
        let error = format!("it has {len} bytes; ask for a range bytes=N- with N at most that");
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            axum::Json(serde_json::json!({ "error": error })),
        )
            .into_response();
    }
    if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
        let error = format!("cannot read the file: {e}");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({ "error": error })),
        )
            .into_response();
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16));
    (
        StatusCode::PARTIAL_CONTENT,
        [
            kind,
            (header::CONTENT_LENGTH, (len - start).to_string()),
            (
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{len}", len.saturating_sub(1)),
            ),
        ],
        body,
    )
        .into_response()
}
