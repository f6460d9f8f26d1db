//! `/v1/projects`: projects, their quotas and who has a role in them (changes: admins), and
//! the check every submission that makes objects in a project goes through.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use cloud48_engine::auth::{Role, Scope, ScopeRefusal};
use cloud48_engine::core::Core;
use cloud48_engine::model::{Project, Quota};

use crate::{ApiError, ApiJson, ErrorBody};

/// The project (name or id; none: `default`) a submission makes objects in, when the caller
/// may act there: one it may not read is answered as missing, one where it lacks the role as
/// forbidden.
pub(crate) async fn act_in(core: &Core, scope: &Scope, key: Option<&str>) -> Result<(), ApiError> {
    let project = cloud48_engine::projects::named(core.db(), key).await?;
    match scope.check(project.id) {
        Ok(()) => Ok(()),
        Err(ScopeRefusal::Forbidden(m)) => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", m, None))
        }
        Err(ScopeRefusal::Hidden) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!(
                "project: '{}' is not one of the projects you may act in: name one in \"project\" (the CLI's --project)",
                key.unwrap_or("default")
            ),
            Some("project"),
        )),
    }
}

/// Request to create a project.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// Unique name: 1-63 of a-z, 0-9, '-'.
    pub name: String,
    /// Its limits; default: none.
    #[serde(default)]
    pub quota: Quota,
}

/// Request to give a user a role in a project.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// `viewer` or `operator`.
    pub role: Role,
}

/// The list of projects takes no parameters (there are few): one sent is refused, not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoQuery {}

#[utoipa::path(get, path = "/v1/projects", tag = "projects",
    responses((status = 200, body = Vec<Project>, description = "The projects the caller may read")))]
pub(crate) async fn list_projects(
    State(core): State<Core>,
    Extension(scope): Extension<Scope>,
    crate::ApiQuery(NoQuery {}): crate::ApiQuery<NoQuery>,
) -> Result<Json<Vec<Project>>, ApiError> {
    let only = scope.readable();
    Ok(Json(core.projects().list(only.as_deref()).await?))
}

#[utoipa::path(post, path = "/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, body = Project), (status = 409, body = ErrorBody)))]
pub(crate) async fn create_project(
    State(core): State<Core>,
    ApiJson(req): ApiJson<CreateProject>,
) -> Result<(StatusCode, Json<Project>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(core.projects().create(&req.name, &req.quota).await?),
    ))
}

#[utoipa::path(get, path = "/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    responses((status = 200, body = Project)))]
pub(crate) async fn show_project(
    State(core): State<Core>,
    Path(key): Path<String>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(core.projects().get(&key).await?))
}

#[utoipa::path(delete, path = "/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    responses((status = 204, description = "Removed"), (status = 409, body = ErrorBody)))]
pub(crate) async fn remove_project(
    State(core): State<Core>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    core.projects().remove(&key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/projects/{project}/quota", tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    request_body = Quota,
    responses((status = 200, body = Project, description = "The project with its new quota (figures left out are unlimited)")))]
pub(crate) async fn set_quota(
    State(core): State<Core>,
    Path(key): Path<String>,
    ApiJson(quota): ApiJson<Quota>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(core.projects().set_quota(&key, &quota).await?))
}

#[utoipa::path(put, path = "/v1/projects/{project}/members/{user}", tag = "projects",
    params(("project" = String, Path, description = "Project name or id"),
           ("user" = String, Path, description = "User name")),
    request_body = Grant,
    responses((status = 200, body = Project)))]
pub(crate) async fn grant(
    State(core): State<Core>,
    Path((key, user)): Path<(String, String)>,
    ApiJson(req): ApiJson<Grant>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(core.projects().grant(&key, &user, req.role).await?))
}

#[utoipa::path(delete, path = "/v1/projects/{project}/members/{user}", tag = "projects",
    params(("project" = String, Path, description = "Project name or id"),
           ("user" = String, Path, description = "User name")),
    responses((status = 200, body = Project)))]
pub(crate) async fn revoke(
    State(core): State<Core>,
    Path((key, user)): Path<(String, String)>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(core.projects().revoke(&key, &user).await?))
}
