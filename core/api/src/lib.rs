//! The REST API (axum, JSON, versioned under `/v1`), with its OpenAPI document generated from
//! the handlers at `/v1/openapi.json`.
//!
//! Invariant: handlers only translate between HTTP and the managers; every rule lives in the
//! core. A mutation answers `202 Accepted` with the id of the command that carries it out.

mod access;
mod audit;
pub mod cluster;
mod console;
mod error;
mod events;
mod images;
mod openapi;
mod projects;
mod transfer;

use openapi::DigestScheme;

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ApiJson, ApiQuery, ErrorBody, ErrorDetail, OptionalApiJson, parse_id};

use cloud48_engine::auth::{Principal, Scope};
use cloud48_engine::core::Core;
use cloud48_engine::managers::{
    AddContainer, ContainerCommand, ContainerQuery, CreateContainer, DrainReport, EnvironmentOp,
    PurgeReport, page_size,
};
use cloud48_engine::model::*;
use cloud48_engine::queue::CommandFilter;

#[derive(OpenApi)]
#[openapi(
    info(title = "Cloud48 API", description = "Control plane for fleets of virtualization servers. Every mutation is a persisted command: the answer is 202 with the command id; watch it at /v1/commands/{id}."),
    components(schemas(ServerOp, EnvironmentOp, TargetKind)),
    modifiers(&DigestScheme),
    security((), ("digest" = [])),
    tags(
        (name = "environments", description = "Groups of related containers"),
        (name = "containers", description = "Containers and their lifecycle"),
        (name = "servers", description = "Virtualization servers"),
        (name = "commands", description = "The persisted command queue"),
        (name = "plugins", description = "Container types as WASM components"),
        (name = "images", description = "The core's image store (OCI images by digest)"),
        (name = "events", description = "Status changes as a stream of Server-Sent Events"),
        (name = "audit", description = "Who changed what, when, and how it went (admins)"),
        (name = "access", description = "Who the caller is, and signing in (the web console's)"),
        (name = "projects", description = "Projects: who may act on which environments and containers, and their quotas"),
    )
)]
struct ApiDoc;

/// The API router for `core`.
pub fn router(core: Core) -> Router {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_environments, create_environment))
        .routes(routes!(show_environment, destroy_environment))
        .routes(routes!(environment_action))
        .routes(routes!(add_container))
        .routes(routes!(remove_container))
        .routes(routes!(list_containers, create_container))
        .routes(routes!(show_container, destroy_container))
        .routes(routes!(container_action))
        .routes(routes!(clone_environment))
        .routes(routes!(transfer::export_container))
        .routes(routes!(transfer::import_container))
        .routes(routes!(transfer::get_upload))
        .routes(routes!(purge_containers))
        .routes(routes!(list_servers, add_server))
        .routes(routes!(cluster::show_cluster))
        .routes(routes!(container_logs))
        .routes(routes!(container_secret))
        .routes(routes!(container_exec))
        .routes(routes!(show_server))
        .routes(routes!(server_action))
        .routes(routes!(server_fetch_image))
        .routes(routes!(list_commands))
        .routes(routes!(show_command))
        .routes(routes!(cancel_command))
        .routes(routes!(list_plugins, install_plugin))
        .routes(routes!(show_plugin, upgrade_plugin, remove_plugin))
        .routes(routes!(images::list_images, images::import_image))
        .routes(routes!(images::show_image, images::remove_image))
        .routes(routes!(images::get_blob))
        .routes(routes!(images::image_holders))
        .routes(routes!(events::stream_events))
        .routes(routes!(audit::list_audit))
        .routes(routes!(console::whoami))
        .routes(routes!(console::sign_in))
        .routes(routes!(projects::list_projects, projects::create_project))
        .routes(routes!(projects::show_project, projects::remove_project))
        .routes(routes!(projects::set_quota))
        .routes(routes!(projects::grant, projects::revoke))
        .with_state(core.clone())
        .split_for_parts();
    let mut api = api;
    // After the routes joined: every response gets a description.
    utoipa::Modify::modify(&openapi::Described, &mut api);
    let doc = api.clone();
    router
        .route("/v1/openapi.json", get(move || async move { Json(doc) }))
        .route("/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .route("/v1/health", {
            let core = core.clone();
            get(move || health(core))
        })
        .route("/metrics", {
            let core = core.clone();
            get(move |scope: Option<Extension<Scope>>| metrics(core, scope.map(|s| s.0)))
        })
        .route(
            "/v1/agents/heartbeat",
            axum::routing::post({
                let core = core.clone();
                move |headers, body| agent_heartbeat(core, headers, body)
            }),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see /v1/openapi.json",
                None,
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            core.clone(),
            access::check,
        ))
        .layer(axum::middleware::from_fn_with_state(core, audit::trail))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .layer(axum::middleware::from_fn(error::json_errors))
}

type Accept = (StatusCode, Json<Accepted>);

fn accepted(command_id: CommandId, object_id: Option<i64>) -> Accept {
    (
        StatusCode::ACCEPTED,
        Json(Accepted {
            command_id,
            object_id,
        }),
    )
}

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

/// Listing options.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListAll {
    /// Include destroyed objects.
    #[serde(default)]
    pub all: bool,
    /// At most this many, by ascending id (1-1000; default 1000).
    #[serde(default, deserialize_with = "cloud48_engine::managers::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only objects with a greater id (the next page; see the `Link` header).
    pub after: Option<i64>,
    /// Only in this project (name or id).
    pub project: Option<String>,
}

/// A page of a list: the items as a JSON array and, when the page is full (more may follow),
/// a `Link: <URI>; rel="next"` header whose URI is `uri` with `cursor` set to `next`.
fn page<T: Serialize>(
    items: Vec<T>,
    limit: Option<u32>,
    uri: &axum::http::Uri,
    cursor: &str,
    next: impl Fn(&T) -> i64,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let full = items.len() as u64 >= page_size(limit);
    let link = items.last().filter(|_| full).map(|last| {
        let kept: Vec<&str> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with(&format!("{cursor}=")))
            .collect();
        let mut query = kept.join("&");
        if !query.is_empty() {
            query.push('&');
        }
        format!(
            "<{}?{query}{cursor}={}>; rel=\"next\"",
            uri.path(),
            next(last)
        )
    });
    let mut resp = Json(items).into_response();
    if let Some(link) = link
        && let Ok(v) = axum::http::HeaderValue::from_str(&link)
    {
        resp.headers_mut().insert(axum::http::header::LINK, v);
    }
    resp
}

/// The core's metrics in the Prometheus text format (viewers; anonymous callers when
/// `auth.anonymous_read` names `metrics`; or with the `metrics.token` bearer token). A caller
/// limited to some projects gets their containers and quotas only.
async fn metrics(core: Core, scope: Option<Scope>) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let only = scope.and_then(|s| s.readable());
    let text = cloud48_engine::metrics::render(&core, only.as_deref()).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            cloud48_engine::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// Readiness: 200 `{"status": "ready"}` once the core runs commands and has reconciled its
/// servers, 503 `{"status": "starting"}` before (the API already accepts requests then); with
/// `node`, the name of the core that answered (behind a load balancer, or to tell that an
/// address is this core's and not another's).
async fn health(core: Core) -> axum::response::Response {
    use axum::response::IntoResponse;
    let node = core.queue().node_id();
    if core.is_ready() {
        Json(serde_json::json!({ "status": "ready", "node": node })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "starting", "node": node })),
        )
            .into_response()
    }
}

#[utoipa::path(get, path = "/v1/environments", tag = "environments", params(ListAll),
    responses((status = 200, body = Vec<Environment>, description = "One page; a `Link` header with rel=\"next\" points to the next one")))]
async fn list_environments(
    State(core): State<Core>,
    uri: axum::http::Uri,
    Extension(scope): Extension<Scope>,
    ApiQuery(q): ApiQuery<ListAll>,
) -> Result<axum::response::Response, ApiError> {
    let after = q.after.map(cloud48_engine::model::EnvironmentId);
    let only = scope.readable();
    let items = core
        .environments()
        .find(q.all, after, q.limit, q.project.as_deref(), only.as_deref())
        .await?;
    Ok(page(items, q.limit, &uri, "after", |e| e.id.0))
}

#[utoipa::path(post, path = "/v1/environments", tag = "environments", request_body = CreateEnvironment,
    responses((status = 202, body = Accepted), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_environment(
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
async fn show_environment(
    State(core): State<Core>,
    Path(env): Path<String>,
) -> Result<Json<Environment>, ApiError> {
    Ok(Json(core.environments().get_by_id(&env).await?))
}

#[utoipa::path(delete, path = "/v1/environments/{env}", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The environment is destroyed")))]
async fn destroy_environment(
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

#[utoipa::path(post, path = "/v1/environments/{env}/{op}", tag = "environments",
    params(("env" = String, Path, description = "Environment id or name"),
           ("op" = EnvironmentOp, Path, description = "start, stop, suspend, resume or destroy")),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The environment is destroyed"),
              (status = 422, body = ErrorBody)))]
async fn environment_action(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path((env, op)): Path<(String, String)>,
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
async fn add_container(
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
async fn remove_container(
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

#[utoipa::path(get, path = "/v1/containers", tag = "containers", params(ContainerQuery),
    responses((status = 200, body = Vec<Container>, description = "One page; a `Link` header with rel=\"next\" points to the next one"), (status = 422, body = ErrorBody)))]
async fn list_containers(
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
async fn create_container(
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
async fn show_container(
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
async fn destroy_container(
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
async fn container_action(
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
async fn clone_environment(
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

#[utoipa::path(post, path = "/v1/containers/purge", tag = "containers",
    responses((status = 200, body = PurgeReport, description = "Failed containers deleted, and those kept with the reason")))]
async fn purge_containers(State(core): State<Core>) -> Result<Json<PurgeReport>, ApiError> {
    Ok(Json(core.containers().purge().await?))
}

/// An operation on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServerOp {
    /// Take no new containers and migrate every container away.
    Drain,
    /// Take containers again.
    Undrain,
    /// Simulated servers: crash (stop answering and sending heartbeats).
    Fail,
    /// Simulated servers: come back after `fail`.
    Recover,
}

/// Options of a server operation (the body may be left out).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerAction {
    /// drain only: running containers move while they run (virtual machines, to servers that
    /// can receive them live); stopped ones move cold. Refused when the server cannot migrate
    /// live.
    #[serde(default)]
    pub live: bool,
}

#[utoipa::path(post, path = "/v1/servers/{server}/{op}", tag = "servers",
    params(("server" = String, Path, description = "Server name"),
           ("op" = ServerOp, Path, description = "drain, undrain, fail or recover")),
    request_body = Option<ServerAction>,
    responses((status = 200, body = DrainReport, description = "For drain: the migrations submitted"),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn server_action(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    Path((server, op)): Path<(String, String)>,
    OptionalApiJson(body): OptionalApiJson<ServerAction>,
) -> Result<Json<DrainReport>, ApiError> {
    let op: ServerOp =
        serde_json::from_value(serde_json::Value::String(op.clone())).map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("op: '{op}' is not a server operation (drain, undrain, fail, recover)"),
                Some("op"),
            )
        })?;
    if body.live && op != ServerOp::Drain {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "live: only drain takes it (it moves running virtual machines while they run)",
            Some("live"),
        ));
    }
    let servers = core.servers();
    let empty = |server: String| DrainReport {
        server,
        commands: Vec::new(),
        skipped: Vec::new(),
    };
    Ok(Json(match op {
        ServerOp::Drain => servers.drain(&server, body.live, who.audit_name()).await?,
        ServerOp::Undrain => servers.undrain(&server).await.map(|()| empty(server))?,
        ServerOp::Fail => servers.fail(&server).await.map(|()| empty(server))?,
        ServerOp::Recover => servers.recover(&server).await.map(|()| empty(server))?,
    }))
}

/// Images to make present on a server before containers need them.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchImage {
    /// The image: a name (`cloud48/nginx`) or a `sha256:` digest. Required unless `file` is
    /// given (then every image of the file is taken, and this one must be among them).
    #[serde(default)]
    pub image: Option<String>,
    /// Pull it from this server's agent instead of the core (a server that already holds it).
    #[serde(default)]
    pub from_server: Option<String>,
    /// Import it from this OCI archive or layout directory on the server itself.
    #[serde(default)]
    pub file: Option<String>,
}

/// What a server holds of the images fetched.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct FetchedImages {
    /// The server.
    pub server: String,
    /// The images, as `name@digest`.
    pub images: Vec<String>,
}

#[utoipa::path(post, path = "/v1/servers/{server}/images", tag = "servers",
    description = "Makes images present on a server ahead of need (placement prefers servers that hold a container's image): from the core, from another server's agent, or from a file on the server. Admins.",
    params(("server" = String, Path, description = "Server name")),
    request_body = FetchImage,
    responses((status = 200, body = FetchedImages), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn server_fetch_image(
    State(core): State<Core>,
    Path(server): Path<String>,
    ApiJson(req): ApiJson<FetchImage>,
) -> Result<Json<FetchedImages>, ApiError> {
    let images = core
        .servers()
        .fetch_image(
            &server,
            req.image.as_deref(),
            req.from_server.as_deref(),
            req.file.as_deref(),
        )
        .await?;
    Ok(Json(FetchedImages { server, images }))
}

/// Request to register a server run by a node agent.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddServer {
    /// The agent's address, e.g. `http://10.0.0.7:7048`.
    pub url: String,
}

#[utoipa::path(post, path = "/v1/servers", tag = "servers", request_body = AddServer,
    responses((status = 200, body = Server), (status = 409, body = ErrorBody, description = "The agent cannot be reached or refused"), (status = 422, body = ErrorBody)))]
async fn add_server(
    State(core): State<Core>,
    ApiJson(req): ApiJson<AddServer>,
) -> Result<Json<Server>, ApiError> {
    let id = core.agents().add(&req.url).await?;
    Ok(Json(core.servers().get(&id.to_string()).await?))
}

/// A heartbeat from a node agent, authenticated by the shared agent token instead of a user
/// (the agent protocol, see ARCHITECTURE.md); the first one registers the agent's server.
async fn agent_heartbeat(
    core: Core,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let expected = core.agents().token()?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_none_or(|g| !cloud48_engine::auth::constant_eq(g.as_bytes(), expected.as_bytes())) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "heartbeats need 'Authorization: Bearer TOKEN' with the core's agents.token",
            None,
        ));
    }
    let beat: cloud48_engine::agent::protocol::Heartbeat =
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("malformed heartbeat: {e}"),
                None,
            )
        })?;
    let id = core.agents().heartbeat(beat).await?;
    // The cluster's cores, so that the agent can fail over when this one dies.
    Ok(Json(
        serde_json::json!({ "server_id": id, "cores": core.cluster().urls() }),
    ))
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
async fn container_logs(
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
async fn container_secret(
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
async fn container_exec(
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

#[utoipa::path(get, path = "/v1/servers", tag = "servers", params(Page),
    responses((status = 200, body = Vec<Server>, description = "One page; a `Link` header with rel=\"next\" points to the next one")))]
async fn list_servers(
    State(core): State<Core>,
    uri: axum::http::Uri,
    ApiQuery(q): ApiQuery<Page>,
) -> Result<axum::response::Response, ApiError> {
    let limit = page_size(q.limit) as usize;
    let mut all = core.servers().list().await?;
    all.sort_by_key(|s| s.id);
    let items: Vec<Server> = all
        .into_iter()
        .filter(|s| q.after.is_none_or(|a| s.id.0 > a))
        .take(limit)
        .collect();
    Ok(page(items, q.limit, &uri, "after", |s| s.id.0))
}

/// Paging of a list by ascending id.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// At most this many (1-1000; default 1000).
    #[serde(default, deserialize_with = "cloud48_engine::managers::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only objects with a greater id (the next page; see the `Link` header).
    pub after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path, description = "Server name or id")),
    responses((status = 200, body = Server), (status = 404, body = ErrorBody)))]
async fn show_server(
    State(core): State<Core>,
    Path(server): Path<String>,
) -> Result<Json<Server>, ApiError> {
    Ok(Json(core.servers().get(&server).await?))
}

/// Which commands to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandQuery {
    /// Only this status.
    pub status: Option<CommandStatus>,
    /// Only children of this command.
    pub parent: Option<i64>,
    /// Only commands on `container` or `environment` ...
    pub target_type: Option<TargetKind>,
    /// ... with this id.
    pub target_id: Option<i64>,
    /// At most this many, newest first (1-1000; default 100).
    #[serde(default, deserialize_with = "cloud48_engine::managers::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only commands older than this one (the next page; see the `Link` header).
    pub before: Option<i64>,
    /// Only commands in this project (name or id).
    pub project: Option<String>,
}

#[utoipa::path(get, path = "/v1/commands", tag = "commands", params(CommandQuery),
    responses((status = 200, body = Vec<Command>, description = "One page; a `Link` header with rel=\"next\" points to the next one"), (status = 422, body = ErrorBody)))]
async fn list_commands(
    State(core): State<Core>,
    uri: axum::http::Uri,
    Extension(scope): Extension<Scope>,
    ApiQuery(q): ApiQuery<CommandQuery>,
) -> Result<axum::response::Response, ApiError> {
    let filter = CommandFilter {
        status: q.status,
        parent: q.parent,
        target_type: q.target_type.map(|t| {
            match t {
                TargetKind::Container => "container",
                TargetKind::Environment => "environment",
            }
            .to_string()
        }),
        target_id: q.target_id,
        limit: Some(page_size(Some(q.limit.unwrap_or(100)))),
        before: q.before,
        projects: match &q.project {
            Some(p) => {
                let id = cloud48_engine::projects::filter(core.db(), p).await?;
                Some(match scope.readable() {
                    Some(r) if !r.contains(&id) => Vec::new(),
                    _ => vec![id],
                })
            }
            None => scope.readable(),
        },
    };
    let items = core.queue().list(&filter).await?;
    Ok(page(items, q.limit.or(Some(100)), &uri, "before", |c| {
        c.id.0
    }))
}

/// The kinds of objects commands act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// A container.
    Container,
    /// An environment.
    Environment,
}

/// Reads `wait`: 0 to 300 seconds, as its schema says.
fn wait_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    match Option::<u64>::deserialize(d)? {
        Some(n) if n > 300 => Err(D::Error::custom(format!(
            "wait {n} is more than 300 seconds; wait again after it answers"
        ))),
        n => Ok(n.map(|n| n as u32)),
    }
}

/// Options of showing a command.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Block up to this many seconds (at most 300) until the command finishes.
    #[param(minimum = 0, maximum = 300)]
    #[serde(default, deserialize_with = "wait_secs")]
    pub wait: Option<u32>,
}

#[utoipa::path(get, path = "/v1/commands/{id}", tag = "commands",
    params(("id" = i64, Path, description = "Command id"), WaitQuery),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody)))]
async fn show_command(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
    addr: Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<Command>, ApiError> {
    let id: CommandId = parse_id("id", &id)?;
    let cmd = match q.wait {
        Some(secs) if secs > 0 => {
            // Long-polls are capped per client: a user by name, anonymous ones by address.
            let client = match (&who, addr) {
                (Principal::User { name, .. }, _) => format!("user '{name}'"),
                (Principal::Anonymous, Some(a)) => format!("address {}", a.0.0.ip()),
                (Principal::Anonymous, None) => "anonymous".to_string(),
            };
            core.queue()
                .wait_as(id, Duration::from_secs(secs.min(300).into()), Some(&client))
                .await?
        }
        _ => core.queue().get(id).await?,
    };
    Ok(Json(cmd))
}

#[utoipa::path(post, path = "/v1/commands/{id}/cancel", tag = "commands",
    params(("id" = i64, Path, description = "Command id")),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The command has started")))]
async fn cancel_command(
    State(core): State<Core>,
    Path(id): Path<String>,
) -> Result<Json<Command>, ApiError> {
    Ok(Json(core.queue().cancel(parse_id("id", &id)?).await?))
}

fn wasm_body(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<(), ApiError> {
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
            "plugin: the body is empty",
            Some("plugin"),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/plugins", tag = "plugins", responses((status = 200, body = Vec<cloud48_engine::plugins::PluginInfo>)))]
async fn list_plugins(
    State(core): State<Core>,
) -> Result<Json<Vec<cloud48_engine::plugins::PluginInfo>>, ApiError> {
    Ok(Json(core.plugins().list().await?))
}

#[utoipa::path(post, path = "/v1/plugins", tag = "plugins",
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The WASM component"),
    responses((status = 201, body = cloud48_engine::plugins::PluginInfo), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody, description = "Not a valid plugin, or an incompatible WIT version")))]
async fn install_plugin(
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
async fn show_plugin(
    State(core): State<Core>,
    Path(name): Path<String>,
) -> Result<Json<cloud48_engine::plugins::PluginInfo>, ApiError> {
    Ok(Json(core.plugins().show(&name).await?))
}

#[utoipa::path(put, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The newer WASM component"),
    responses((status = 202, body = Accepted, description = "A plugin.upgrade command moves the containers; it fails, naming the container, when the new version's migrate-state refuses one"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn upgrade_plugin(
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
async fn remove_plugin(
    State(core): State<Core>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    core.plugins().remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
