//! `/v1/containers`: containers, their lifecycle, logs, secrets and `exec`.

use super::*;

#[utoipa::path(get, path = "/v1/containers", tag = "containers", params(ContainerQuery),
    responses((status = 200, body = Vec<Container>, description = "One page; a `Link` header with rel=\"next\" points to the next one"), (status = 422, body = ErrorBody)))]
pub(super) async fn list_containers(
    State(core): State<Core>,
    uri: axum::http::Uri,
    Extension(scope): Extension<Scope>,
    ApiQuery(q): ApiQuery<ContainerQuery>,
) -> Result<axum::response::Response, ApiError> {
    let only = scope.readable();
    let items = core.containers().find(&q, only.as_deref()).await?;
    Ok(page(items, q.limit, &uri, "after", |c| c.id.0))
}

#[utoipa::path(post, path = "/v1/containers", tag = "containers", request_body = CreateContainer,
    responses((status = 202, body = Accepted), (status = 409, body = ErrorBody, description = "Over the project's quota"), (status = 422, body = ErrorBody)))]
pub(super) async fn create_container(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Extension(scope): Extension<Scope>,
    ApiJson(req): ApiJson<CreateContainer>,
) -> Result<Accept, ApiError> {
    projects::act_in(&core, &scope, req.project.as_deref()).await?;
    if let Some(n) = req.count.filter(|n| *n != 1) {
        let cmd = core
            .containers()
            .create_many(&req, n, who.audit_name())
            .await?;
        return Ok(accepted(cmd, None));
    }
    let (cmd, id) = core.containers().create(&req, who.audit_name()).await?;
    Ok(accepted(cmd, Some(id.0)))
}

#[utoipa::path(get, path = "/v1/containers/{id}", tag = "containers",
    params(("id" = i64, Path, description = "Container id")),
    responses((status = 200, body = Container), (status = 404, body = ErrorBody)))]
pub(super) async fn show_container(
    State(core): State<Core>,
    Path(id): Path<String>,
) -> Result<Json<Container>, ApiError> {
    Ok(Json(
        core.containers().get_by_id(parse_id("id", &id)?).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/containers/{id}", tag = "containers",
    params(("id" = i64, Path, description = "Container id")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn destroy_container(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Accept, ApiError> {
    let id = parse_id("id", &id)?;
    Ok(accepted(
        core.containers()
            .run(ContainerCommand::Destroy {}, id, who.audit_name())
            .await?,
        None,
    ))
}

#[utoipa::path(post, path = "/v1/containers/{id}/actions", tag = "containers",
    params(("id" = i64, Path, description = "Container id")),
    request_body = ContainerCommand,
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The container's status does not allow the operation"),
              (status = 422, body = ErrorBody)))]
pub(super) async fn container_action(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(cmd): ApiJson<ContainerCommand>,
) -> Result<Accept, ApiError> {
    let id = parse_id("id", &id)?;
    Ok(accepted(
        core.containers().run(cmd, id, who.audit_name()).await?,
        None,
    ))
}

#[utoipa::path(post, path = "/v1/containers/purge", tag = "containers",
    responses((status = 200, body = PurgeReport, description = "Failed containers deleted, and those kept with the reason")))]
pub(super) async fn purge_containers(
    State(core): State<Core>,
) -> Result<Json<PurgeReport>, ApiError> {
    Ok(Json(core.containers().purge().await?))
}

/// Output of a container's main process.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct ContainerLogs {
    /// The last 64 KiB of standard output and error.
    pub logs: String,
}

#[utoipa::path(get, path = "/v1/containers/{id}/logs", tag = "containers",
    params(("id" = i64, Path, description = "Container id")),
    responses((status = 200, body = ContainerLogs), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn container_logs(
    State(core): State<Core>,
    Path(id): Path<String>,
) -> Result<Json<ContainerLogs>, ApiError> {
    Ok(Json(ContainerLogs {
        logs: core.containers().logs(parse_id("id", &id)?).await?,
    }))
}

/// A secret a container receives (its type's workload names `${secret:NAME}`).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct ContainerSecret {
    /// The secret's name.
    pub name: String,
    /// Its value: shared by the members of the container's environment.
    pub value: String,
}

#[utoipa::path(get, path = "/v1/containers/{id}/secrets/{name}", tag = "containers",
    description = "A secret the container receives, e.g. the password of the mysql type's database user (`mysql`). Needs the operator role; every read is in the audit trail.",
    params(("id" = i64, Path, description = "Container id"), ("name" = String, Path, description = "Secret name, as in `${secret:NAME}` in its type's workload")),
    responses((status = 200, body = ContainerSecret), (status = 404, body = ErrorBody)))]
pub(super) async fn container_secret(
    State(core): State<Core>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<ContainerSecret>, ApiError> {
    let value = core
        .containers()
        .secret(parse_id("id", &id)?, &name)
        .await?;
    Ok(Json(ContainerSecret { name, value }))
}

/// A command to run inside a container.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments, e.g. `["cat", "/etc/hostname"]`.
    pub command: Vec<String>,
}

#[utoipa::path(post, path = "/v1/containers/{id}/exec", tag = "containers", request_body = ExecRequest,
    params(("id" = i64, Path, description = "Container id (running)")),
    responses((status = 200, body = cloud48_engine::driver::ExecOutput), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn container_exec(
    State(core): State<Core>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<cloud48_engine::driver::ExecOutput>, ApiError> {
    Ok(Json(
        core.containers()
            .exec(parse_id("id", &id)?, &req.command)
            .await?,
    ))
}
