//! `/v1/environments`: environments, their members, and their clones.

use super::*;

/// Request to create an environment.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    /// Unique name: 1-63 of a-z, 0-9, '-'.
    pub name: String,
    /// Parameters its members' container types may read (name: 1-63 of a-z, 0-9, '-').
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub params: cloud48_engine::model::Params,
    /// Project (name or id) it belongs to, with its members; default: `default`.
    #[serde(default)]
    pub project: Option<String>,
}

#[utoipa::path(get, path = "/v1/environments", tag = "environments", params(ListAll),
    responses((status = 200, body = Vec<Environment>, description = "One page; a `Link` header with rel=\"next\" points to the next one")))]
pub(super) async fn list_environments(
    State(core): State<Core>,
    uri: axum::http::Uri,
    Extension(who): Extension<Principal>,
    Extension(scope): Extension<Scope>,
    ApiQuery(q): ApiQuery<ListAll>,
) -> Result<axum::response::Response, ApiError> {
    let after = q.after.map(cloud48_engine::model::EnvironmentId);
    let only = scope.readable();
    let items = core
        .environments()
        .find(q.all, after, q.limit, q.project.as_deref(), only.as_deref())
        .await?
        .into_iter()
        .map(|e| for_caller(&core, &who, e))
        .collect();
    Ok(page(items, q.limit, &uri, "after", |e| e.id.0))
}

/// An environment as `who` reads it: an anonymous caller reads a summary, the values of its
/// and its members' parameters masked (they may hold what only users should read; the audit
/// trail masks them too), unless anonymous callers have full access (local development).
fn for_caller(core: &Core, who: &Principal, mut env: Environment) -> Environment {
    let full = core.auth().config().anonymous == cloud48_engine::auth::Anonymous::Full;
    if matches!(who, Principal::Anonymous) && !full {
        let mask = |params: &mut cloud48_engine::model::Params| {
            params.values_mut().for_each(|v| *v = "****".into());
        };
        mask(&mut env.params);
        env.members.iter_mut().for_each(|m| mask(&mut m.params));
    }
    env
}

#[utoipa::path(post, path = "/v1/environments", tag = "environments", request_body = CreateEnvironment,
    responses((status = 202, body = Accepted), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_environment(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Extension(scope): Extension<Scope>,
    ApiJson(req): ApiJson<CreateEnvironment>,
) -> Result<Accept, ApiError> {
    projects::act_in(&core, &scope, req.project.as_deref()).await?;
    let (cmd, id) = core
        .environments()
        .create_with(
            &req.name,
            &req.params,
            req.project.as_deref(),
            who.audit_name(),
        )
        .await?;
    Ok(accepted(cmd, Some(id.0)))
}

#[utoipa::path(get, path = "/v1/environments/{env}", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name")),
    responses((status = 200, body = Environment), (status = 404, body = ErrorBody)))]
pub(super) async fn show_environment(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(env): Path<String>,
) -> Result<Json<Environment>, ApiError> {
    let env = core.environments().get_by_id(&env).await?;
    Ok(Json(for_caller(&core, &who, env)))
}

#[utoipa::path(delete, path = "/v1/environments/{env}", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The environment is destroyed")))]
pub(super) async fn destroy_environment(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(env): Path<String>,
) -> Result<Accept, ApiError> {
    Ok(accepted(
        core.environments()
            .run(EnvironmentOp::Destroy, &env, who.audit_name())
            .await?,
        None,
    ))
}

/// The body of an environment operation: none, `null` or `{}` (it takes no options).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoOptions {}

#[utoipa::path(post, path = "/v1/environments/{env}/{op}", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name"),
           ("op" = EnvironmentOp, Path, description = "start, stop, suspend, resume or destroy")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The environment is destroyed"),
              (status = 422, body = ErrorBody)))]
pub(super) async fn environment_action(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path((env, op)): Path<(String, String)>,
    OptionalApiJson(NoOptions {}): OptionalApiJson<NoOptions>,
) -> Result<Accept, ApiError> {
    let op: EnvironmentOp = serde_json::from_value(serde_json::Value::String(op.clone())).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("op: '{op}' is not an environment operation (start, stop, suspend, resume, destroy)"),
            Some("op"),
        )
    })?;
    Ok(accepted(
        core.environments().run(op, &env, who.audit_name()).await?,
        None,
    ))
}

#[utoipa::path(post, path = "/v1/environments/{env}/containers", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name")),
    request_body = AddContainer,
    responses((status = 202, body = Accepted, description = "The command's result holds the new container id"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Over the project's quota"), (status = 422, body = ErrorBody)))]
pub(super) async fn add_container(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(env): Path<String>,
    ApiJson(req): ApiJson<AddContainer>,
) -> Result<Accept, ApiError> {
    Ok(accepted(
        core.environments()
            .add(&env, &req, who.audit_name())
            .await?,
        None,
    ))
}

#[utoipa::path(delete, path = "/v1/environments/{env}/containers/{id}", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name"), ("id" = i64, Path, description = "Container id")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody)))]
pub(super) async fn remove_container(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path((env, id)): Path<(String, String)>,
) -> Result<Accept, ApiError> {
    let id = parse_id("id", &id)?;
    Ok(accepted(
        core.environments()
            .remove(&env, id, who.audit_name())
            .await?,
        None,
    ))
}

/// Request to clone an environment.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneEnvironment {
    /// Name of the copy: 1-63 of a-z, 0-9, '-'.
    pub name: String,
}

#[utoipa::path(post, path = "/v1/environments/{env}/clone", tag = "environments",
    params(("env" = String, Path, description = "Source environment id or name")),
    request_body = CloneEnvironment,
    responses((status = 202, body = Accepted, description = "object_id is the new environment"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn clone_environment(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path(env): Path<String>,
    ApiJson(req): ApiJson<CloneEnvironment>,
) -> Result<Accept, ApiError> {
    let (cmd, id) = core
        .environments()
        .clone(&env, &req.name, who.audit_name())
        .await?;
    Ok(accepted(cmd, Some(id.0)))
}
