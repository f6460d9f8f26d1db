//! The REST API (axum, JSON, versioned under `/v1`), with its OpenAPI document generated from
//! the handlers at `/v1/openapi.json`.
//!
//! Invariant: handlers only translate between HTTP and the managers; every rule lives in the
//! core. A mutation answers `202 Accepted` with the id of the command that carries it out.

mod access;
mod audit;
pub mod cluster;
mod commands;
mod console;
mod containers;
mod environments;
mod error;
mod events;
mod images;
mod openapi;
mod plugins;
mod projects;
mod query;
mod servers;
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

pub use commands::{CommandQuery, TargetKind, WaitQuery};
pub use containers::{ContainerLogs, ContainerSecret, ExecRequest};
pub use environments::{CloneEnvironment, CreateEnvironment};
pub use error::{ApiError, ApiJson, ApiQuery, ErrorBody, ErrorDetail, OptionalApiJson, parse_id};
pub use servers::{AddServer, FetchImage, FetchedImages, ServerAction, ServerOp};

use cloud48_engine::agents::RemovedServer;
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
        (name = "monitoring", description = "Readiness and metrics, for load balancers, supervisors and scrapers"),
    )
)]
struct ApiDoc;

/// The API router for `core`.
pub fn router(core: Core) -> Router {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(
            environments::list_environments,
            environments::create_environment
        ))
        .routes(routes!(
            environments::show_environment,
            environments::destroy_environment
        ))
        .routes(routes!(environments::environment_action))
        .routes(routes!(environments::add_container))
        .routes(routes!(environments::remove_container))
        .routes(routes!(
            containers::list_containers,
            containers::create_container
        ))
        .routes(routes!(
            containers::show_container,
            containers::destroy_container
        ))
        .routes(routes!(containers::container_action))
        .routes(routes!(environments::clone_environment))
        .routes(routes!(transfer::export_container))
        .routes(routes!(transfer::import_container))
        .routes(routes!(transfer::get_upload))
        .routes(routes!(containers::purge_containers))
        .routes(routes!(servers::list_servers, servers::add_server))
        .routes(routes!(cluster::show_cluster))
        .routes(routes!(containers::container_logs))
        .routes(routes!(containers::container_secret))
        .routes(routes!(containers::container_exec))
        .routes(routes!(servers::show_server, servers::remove_server))
        .routes(routes!(servers::server_action))
        .routes(routes!(servers::server_fetch_image))
        .routes(routes!(commands::list_commands))
        .routes(routes!(commands::show_command))
        .routes(routes!(commands::cancel_command))
        .routes(routes!(plugins::list_plugins, plugins::install_plugin))
        .routes(routes!(
            plugins::show_plugin,
            plugins::upgrade_plugin,
            plugins::remove_plugin
        ))
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
        .routes(routes!(health))
        .routes(routes!(metrics))
        .with_state(core.clone())
        .split_for_parts();
    let mut api = api;
    // After the routes joined: every response gets a description.
    utoipa::Modify::modify(&openapi::Described, &mut api);
    let parameters = query::Parameters::of(&api);
    let doc = api.clone();
    router
        .route("/v1/openapi.json", get(move || async move { Json(doc) }))
        .route("/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .route(
            "/v1/agents/heartbeat",
            axum::routing::post({
                let core = core.clone();
                move |headers, body| servers::agent_heartbeat(core, headers, body)
            }),
        )
        // Every route, whatever its handler: a query parameter it does not take is refused.
        .route_layer(axum::middleware::from_fn_with_state(
            parameters,
            query::refuse_unknown,
        ))
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

/// Listing options.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListAll {
    /// Include destroyed objects.
    #[serde(default)]
    pub all: bool,
    /// At most this many, by ascending id (1-1000; default 1000).
    #[serde(default, deserialize_with = "cloud48_engine::managers::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only objects with a greater id (the next page; see the `Link` header).
    #[serde(default, deserialize_with = "cloud48_engine::managers::cursor")]
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

#[utoipa::path(get, path = "/metrics", tag = "monitoring",
    description = "The core's metrics in the Prometheus text format: queue depth and wait by command kind, commands, containers (by status, type and project), quotas and usage, servers, heartbeat age, placement decisions, hook and database statement times, event listeners. Viewers; anonymous callers when `auth.anonymous_read` names `metrics`; or scrapers with `Authorization: Bearer TOKEN`, the core's `metrics.token`. A caller limited to some projects gets their containers and quotas only.",
    security((), ("digest" = []), ("metrics_token" = [])),
    responses((status = 200, description = "The metrics (`text/plain; version=0.0.4`)", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(
    State(core): State<Core>,
    scope: Option<Extension<Scope>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let only = scope.and_then(|s| s.0.readable());
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

/// Whether a core is ready.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ready` once the core runs commands and has reconciled its servers, `starting` before.
    pub status: String,
    /// The node id of the core that answered.
    pub node: String,
}

#[utoipa::path(get, path = "/v1/health", tag = "monitoring",
    description = "Readiness, without credentials: 200 once the core runs commands and has reconciled its servers, 503 before (the API already accepts requests then). `node` names the core that answered (behind a load balancer, or to tell that an address is this core's and not another's).",
    security(()),
    responses((status = 200, body = Health, description = "Ready"),
              (status = 503, body = Health, description = "Starting")))]
pub(crate) async fn health(State(core): State<Core>) -> (StatusCode, Json<Health>) {
    let node = core.queue().node_id().to_string();
    if core.is_ready() {
        (
            StatusCode::OK,
            Json(Health {
                status: "ready".into(),
                node,
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "starting".into(),
                node,
            }),
        )
    }
}

/// Paging of a list by ascending id.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// At most this many (1-1000; default 1000).
    #[serde(default, deserialize_with = "cloud48_engine::managers::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only objects with a greater id (the next page; see the `Link` header).
    #[serde(default, deserialize_with = "cloud48_engine::managers::cursor")]
    pub after: Option<i64>,
}
