//! `/v1/images`: the core's image store (import an OCI archive, list, show, remove) and the
//! blobs agents pull by digest.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures::TryStreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use cloud48_engine::core::Core;
use cloud48_engine::images::{Digest, ImageDetails, ImageError, ImageSummary, Name, Removed};

use crate::{ApiError, ApiQuery, ErrorBody};

fn image_error(e: ImageError) -> ApiError {
    let (status, code) = match &e {
        ImageError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ImageError::BadName(_) | ImageError::BadDigest(_) => {
            (StatusCode::BAD_REQUEST, "bad_request")
        }
        ImageError::Corrupt(_) | ImageError::Unsupported(_) | ImageError::Recipe(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
        }
        ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            (StatusCode::INSUFFICIENT_STORAGE, "storage_full")
        }
        ImageError::Io { .. } | ImageError::Build(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    };
    ApiError::new(status, code, e.to_string(), None)
}

/// Runs a store operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the image store task failed: {e}"),
                None,
            )
        })?
        .map_err(image_error)
}

#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "Every image in the core's store, by name", body = Vec<serde_json::Value>)))]
pub(crate) async fn list_images(
    State(core): State<Core>,
) -> Result<Json<Vec<ImageSummary>>, ApiError> {
    let store = core.images().clone();
    Ok(Json(blocking(move || store.list()).await?))
}

#[utoipa::path(get, path = "/v1/images/{image}", tag = "images",
    params(("image" = String, Path, description = "Name (`cloud48/nginx:latest`, '/' written %2F) or manifest digest (full, or its first 12 hex digits)")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = ErrorBody)))]
pub(crate) async fn show_image(
    State(core): State<Core>,
    Path(image): Path<String>,
) -> Result<Json<ImageDetails>, ApiError> {
    let store = core.images().clone();
    Ok(Json(blocking(move || store.show(&image)).await?))
}

/// The agents that hold an image.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Holders {
    /// Addresses of the agents of servers that are up and last reported holding it, for an
    /// agent to pull the image's blobs from a peer rather than from the core.
    pub holders: Vec<String>,
}

#[utoipa::path(get, path = "/v1/images/{image}/holders", tag = "images",
    params(("image" = String, Path, description = "Name (`cloud48/nginx:latest`, '/' written %2F) or manifest digest (`sha256:...`)")),
    responses((status = 200, body = Holders), (status = 400, body = ErrorBody)))]
pub(crate) async fn image_holders(
    State(core): State<Core>,
    Path(image): Path<String>,
) -> Result<Json<Holders>, ApiError> {
    let wanted = if image.starts_with("sha256:") {
        let digest: Digest = image.parse().map_err(image_error)?;
        cloud48_engine::model::ImageRef {
            reference: String::new(),
            digest: Some(digest.to_string()),
        }
    } else {
        image.parse::<Name>().map_err(image_error)?;
        cloud48_engine::model::ImageRef {
            reference: image,
            digest: None,
        }
    };
    let ids = core.placement().holders(&wanted);
    let servers = core.servers().list().await?;
    let holders = ids
        .iter()
        .filter_map(|id| servers.iter().find(|s| s.id.0 == *id))
        .filter(|s| s.status == cloud48_engine::model::ServerStatus::Up)
        .filter_map(|s| s.address.clone())
        .collect();
    Ok(Json(Holders { holders }))
}

/// Options of an image's removal.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct RemoveQuery {
    /// Remove it even though installed container types name it (their new containers then
    /// find no image here until it is imported again).
    #[serde(default)]
    pub force: bool,
}

/// The installed types whose workload names one of `images`, by name or digest.
fn types_naming(core: &Core, images: &[ImageSummary]) -> Vec<String> {
    let types = core.types();
    let mut ids: Vec<String> = types
        .ids()
        .into_iter()
        .filter(|id| {
            let Some(wanted) = types.get(id).and_then(|t| t.workload().image) else {
                return false;
            };
            let name = wanted.reference.parse::<Name>().ok();
            images.iter().any(|i| match &wanted.digest {
                Some(d) => i.digest.as_str() == d,
                None => name.is_some() && i.name == name,
            })
        })
        .collect();
    ids.sort();
    ids
}

#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", params(RemoveQuery,
        ("image" = String, Path, description = "Name ('/' written %2F) or manifest digest")),
    responses((status = 200, description = "The names removed and the blobs freed", body = serde_json::Value), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Installed container types name it (give force=true to remove it all the same)")))]
pub(crate) async fn remove_image(
    State(core): State<Core>,
    Path(image): Path<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Result<Json<Removed>, ApiError> {
    let store = core.images().clone();
    if !q.force {
        let what = image.clone();
        let designated = blocking(move || store.designated(&what)).await?;
        let users = types_naming(&core, &designated);
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "image {image} is the image of container type(s) {}: their new containers, \
                     replacements and moves to servers without it would find none; remove or \
                     upgrade those plugins first, or remove it all the same with \
                     `cloud48 image rm --force` (?force=true)",
                    users.join(", ")
                ),
                None,
            ));
        }
    }
    let store = core.images().clone();
    Ok(Json(blocking(move || store.remove(&image)).await?))
}

/// Options of an import.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportQuery {
    /// Name the imported image takes (`repository[:tag]`); without it each image keeps the
    /// name its archive gives it.
    pub name: Option<String>,
}

#[utoipa::path(post, path = "/v1/images", tag = "images", params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "An OCI archive (`podman save --format oci-archive`), plain or gzip-compressed, streamed"),
    responses((status = 201, description = "The images imported", body = Vec<serde_json::Value>),
              (status = 400, body = ErrorBody), (status = 422, body = ErrorBody, description = "Corrupt, truncated, of another architecture, or not an OCI archive; nothing was kept"),
              (status = 507, body = ErrorBody, description = "The core's disk is full; nothing was kept")))]
pub(crate) async fn import_image(
    State(core): State<Core>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    body: Body,
) -> Result<(StatusCode, Json<Vec<ImageSummary>>), ApiError> {
    let name: Option<Name> = q
        .name
        .map(|n| n.parse())
        .transpose()
        .map_err(|e: ImageError| ApiError::bad_request(e.to_string(), Some("name")))?;
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(format!("the upload broke off: {e}")));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let store = core.images().clone();
    let images =
        blocking(move || store.import_archive(reader, "the uploaded archive", name.as_ref()))
            .await?;
    Ok((StatusCode::CREATED, Json(images)))
}

#[utoipa::path(get, path = "/v1/images/blobs/{digest}", tag = "images",
    params(("digest" = String, Path, description = "`sha256:` and 64 hex digits")),
    responses((status = 200, description = "The blob's bytes (a `Range` header gets part of it: 206)", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 206, description = "The requested range"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, description = "The range starts past the end")))]
pub(crate) async fn get_blob(
    State(core): State<Core>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest: Digest = digest
        .parse()
        .map_err(|e: ImageError| ApiError::bad_request(e.to_string(), Some("digest")))?;
    let store = core.images().clone();
    let file = blocking(move || store.open_blob(&digest)).await?;
    let len = file
        .metadata()
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                None,
            )
        })?
        .len();
    let file = tokio::fs::File::from_std(file);
    Ok(cloud48_engine::agent::ranged::serve(file, len, &headers, "application/octet-stream").await)
}
