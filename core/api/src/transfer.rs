//! Containers between platforms: `GET /v1/containers/{id}/export` streams an archive
//! (`cloud48_engine::export_archive`: the description, then the disk as it comes from the
//! server's agent), `POST /v1/containers/import` takes one (or a format 1 JSON export) and
//! writes its disk to an upload on this core, and `GET /v1/exports/{id}` serves an upload to
//! the agent that imports it (agent token, `Range`), as agents serve their exports.

use axum::body::Body;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::{Accept, ApiError, ApiJson, ApiQuery, ErrorBody, accepted, parse_id, projects};
use cloud48_engine::auth::{Principal, Scope};
use cloud48_engine::core::Core;
use cloud48_engine::export_archive;
use cloud48_engine::managers::{ContainerExport, ExportDisk};
use cloud48_engine::model::Accepted;

/// How an export is written.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// 2 (default): a tar archive streamed from the server; 1: the whole export as one JSON
    /// document, the disk hex-encoded (small containers, older cores).
    pub format: Option<u32>,
}

fn internal(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message, None)
}

#[utoipa::path(get, path = "/v1/containers/{id}/export", tag = "containers",
    description = "A stopped container for another platform: a tar archive of `cloud48-export.json` and `disk`, streamed as the disk comes from its server (never whole in the core's memory); `?format=1` gives the older JSON document. Operators.",
    params(("id" = i64, Path, description = "Container id (stopped)"), ExportQuery),
    responses((status = 200, description = "The archive (`application/x-tar`), or with `format=1` the JSON export (`application/json`)",
               content((Vec<u8> = "application/x-tar"), (ContainerExport = "application/json"))),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn export_container(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id("id", &id)?;
    match q.format.unwrap_or(ContainerExport::STREAMED) {
        ContainerExport::FORMAT => {
            let export = core.containers().export(id).await?;
            // The audit record: who took a copy of which container's disk.
            tracing::info!(target: "cloud48::audit", user = who.audit_name(), container = %id, disk_bytes = export.disk_hex.len() / 2, "container exported");
            return Ok(Json(export).into_response());
        }
        ContainerExport::STREAMED => {}
        other => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("format: {other} is not an export format (1: JSON, 2: tar archive)"),
                Some("format"),
            ));
        }
    }
    let (description, disk) = core.containers().export_parts(id).await?;
    type Chunks = futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;
    let (size, chunks): (u64, Chunks) = match disk {
        ExportDisk::Bytes(data) => (
            data.len() as u64,
            futures::stream::once(async move { Ok(bytes::Bytes::from(data)) }).boxed(),
        ),
        ExportDisk::Agent { url, export } => {
            let token = core.services().agent_token().to_string();
            let (size, resp) = cloud48_engine::driver::remote::open_export(&url, &export, &token)
                .await
                .map_err(|e| {
                    ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string(), None)
                })?;
            // Once all of it went out, the agent's copy is needed no more (one export serves
            // one copy; cut off, it expires on the agent).
            let dropped = futures::stream::once(async move {
                cloud48_engine::driver::remote::drop_export(&url, &export, &token).await;
                Ok(bytes::Bytes::new())
            });
            let chunks = resp.bytes_stream().map_err(std::io::Error::other);
            (size, chunks.chain(dropped).boxed())
        }
    };
    tracing::info!(target: "cloud48::audit", user = who.audit_name(), container = %id, disk_bytes = size, "container exported");
    let head = export_archive::head(&description, size);
    let mut tail = export_archive::padding(size);
    tail.extend_from_slice(&export_archive::END);
    let total = head.len() as u64 + size + tail.len() as u64;
    let body = futures::stream::once(async move { Ok(bytes::Bytes::from(head)) })
        .chain(chunks)
        .chain(futures::stream::once(async move {
            Ok(bytes::Bytes::from(tail))
        }));
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"container-{id}.tar\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Where an imported container goes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// Project (name or id); default: `default`.
    pub project: Option<String>,
}

#[utoipa::path(post, path = "/v1/containers/import", tag = "containers",
    description = "A container another platform exported: the archive `GET /v1/containers/{id}/export` wrote (`Content-Type: application/x-tar`, streamed to this core's disk), or a format 1 JSON export.",
    request_body(content((Vec<u8> = "application/x-tar"), (ContainerExport = "application/json"))),
    params(ImportQuery),
    responses((status = 202, body = Accepted, description = "object_id is the new container"), (status = 409, body = ErrorBody, description = "Over the project's quota"), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn import_container(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Extension(scope): Extension<Scope>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    req: Request,
) -> Result<Accept, ApiError> {
    projects::act_in(&core, &scope, q.project.as_deref()).await?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let archive = content_type.starts_with("application/x-tar");
    if !archive && !content_type.starts_with("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
            "send the archive `cloud48 container export` wrote with 'Content-Type: application/x-tar' (or a format 1 JSON export with 'Content-Type: application/json')",
            None,
        ));
    }
    if !archive {
        let ApiJson(export) = ApiJson::<ContainerExport>::from_request(req, &()).await?;
        let (cmd, id) = core
            .containers()
            .import(&export, q.project.as_deref(), who.audit_name())
            .await?;
        return Ok(accepted(cmd, Some(id.0)));
    }
    let (upload, dir) = core.new_upload()?;
    let stream = req
        .into_body()
        .into_data_stream()
        .map_err(|e| std::io::Error::other(format!("the upload broke off: {e}")));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let at = dir.clone();
    let received = tokio::task::spawn_blocking(move || export_archive::receive(reader, &at))
        .await
        .map_err(|e| internal(format!("reading the upload stopped: {e}")))?;
    let imported = match received {
        Ok(export) => core
            .containers()
            .import_upload(&export, &upload, q.project.as_deref(), who.audit_name())
            .await
            .map_err(ApiError::from),
        Err(message) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("not a container export archive: {message}"),
            None,
        )),
    };
    match imported {
        Ok((cmd, id)) => Ok(accepted(cmd, Some(id.0))),
        Err(e) => {
            // Nothing half-imported stays behind.
            let _ = tokio::fs::remove_dir_all(&dir).await;
            Err(e)
        }
    }
}

#[utoipa::path(get, path = "/v1/exports/{id}", tag = "containers",
    description = "The disk of a container uploaded to this core, for the agent that imports it (agent token). A `Range` header gets part of it.",
    params(("id" = String, Path, description = "Upload id")),
    responses((status = 200, description = "The disk", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 206, description = "The requested range"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_upload(
    State(core): State<Core>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_here = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("upload {id} is not on this core"),
            None,
        )
    };
    let disk = core.upload_disk(&id).ok_or_else(not_here)?;
    let file = tokio::fs::File::open(&disk).await.map_err(|_| not_here())?;
    let len = file
        .metadata()
        .await
        .map_err(|e| internal(e.to_string()))?
        .len();
    Ok(cloud48_engine::agent::ranged::serve(file, len, &headers, "application/octet-stream").await)
}
