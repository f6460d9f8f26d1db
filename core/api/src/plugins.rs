//! `/v1/plugins`: container types as WASM components: install, upgrade, remove.

use super::*;

pub(super) fn wasm_body(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let ok_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/wasm") || v.starts_with("application/octet-stream")
        });
    if !ok_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
            "send the component as the body with 'Content-Type: application/wasm'",
            None,
        ));
    }
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "component: the body is empty; send the plugin's .wasm file",
            Some("component"),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/plugins", tag = "plugins", responses((status = 200, body = Vec<cloud48_engine::plugins::PluginInfo>)))]
pub(super) async fn list_plugins(
    State(core): State<Core>,
) -> Result<Json<Vec<cloud48_engine::plugins::PluginInfo>>, ApiError> {
    Ok(Json(core.plugins().list().await?))
}

#[utoipa::path(post, path = "/v1/plugins", tag = "plugins",
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The WASM component"),
    responses((status = 201, body = cloud48_engine::plugins::PluginInfo), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody, description = "Not a valid plugin, or an incompatible WIT version")))]
pub(super) async fn install_plugin(
    State(core): State<Core>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<cloud48_engine::plugins::PluginInfo>), ApiError> {
    wasm_body(&headers, &body)?;
    Ok((
        StatusCode::CREATED,
        Json(core.plugins().install(&body).await?),
    ))
}

#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "Plugin name or name@version")),
    responses((status = 200, body = cloud48_engine::plugins::PluginInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn show_plugin(
    State(core): State<Core>,
    Path(name): Path<String>,
) -> Result<Json<cloud48_engine::plugins::PluginInfo>, ApiError> {
    Ok(Json(core.plugins().show(&name).await?))
}

#[utoipa::path(put, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The newer WASM component"),
    responses((status = 202, body = Accepted, description = "A plugin.upgrade command moves the containers; it fails, naming the container, when the new version's migrate-state refuses one"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn upgrade_plugin(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Accept, ApiError> {
    wasm_body(&headers, &body)?;
    let cmd = core
        .plugins()
        .submit_upgrade(core.queue(), &name, &body, who.audit_name())
        .await?;
    Ok(accepted(cmd, None))
}

#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Containers still use it")))]
pub(super) async fn remove_plugin(
    State(core): State<Core>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    core.plugins().remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
