//! `/v1/servers`: the fleet, its operations (drain, fail, recover), images fetched to a server,
//! removal of a server gone for good, and agents' heartbeats.

use super::*;

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
pub(super) async fn server_action(
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
    let done = |server: String, changed: bool, unchanged: &str| DrainReport {
        server,
        commands: Vec::new(),
        skipped: Vec::new(),
        unchanged: (!changed).then(|| unchanged.to_string()),
    };
    Ok(Json(match op {
        ServerOp::Drain => servers.drain(&server, body.live, who.audit_name()).await?,
        ServerOp::Undrain => {
            let changed = servers.undrain(&server).await?;
            done(server, changed, "was not draining: nothing to undo")
        }
        ServerOp::Fail => {
            let changed = servers.fail(&server).await?;
            done(
                server,
                changed,
                "has failed already (`server recover` ends it)",
            )
        }
        ServerOp::Recover => {
            let changed = servers.recover(&server).await?;
            done(
                server,
                changed,
                "was not failed on command: nothing to recover (a server down on its own comes \
                 back when its heartbeats do)",
            )
        }
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
pub(super) async fn server_fetch_image(
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
    responses((status = 200, body = Server), (status = 409, body = ErrorBody, description = "The agent clashes with a server (name, subnet)"), (status = 422, body = ErrorBody, description = "Not a URL, or an agent that sends no heartbeats"), (status = 502, body = ErrorBody, description = "The agent cannot be reached, refused, or does not speak the protocol"), (status = 503, body = ErrorBody, description = "Other cores kept registering the same agent meanwhile; try again")))]
pub(super) async fn add_server(
    State(core): State<Core>,
    ApiJson(req): ApiJson<AddServer>,
) -> Result<Json<Server>, ApiError> {
    let id = core.agents().add(&req.url).await?;
    Ok(Json(core.servers().get(&id.to_string()).await?))
}

/// A heartbeat from a node agent, authenticated by the shared agent token instead of a user
/// (the agent protocol, see ARCHITECTURE.md); the first one registers the agent's server.
pub(super) async fn agent_heartbeat(
    core: Core,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let expected = core.agents().token()?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let refused = match given {
        None => Some(
            "heartbeats need 'Authorization: Bearer TOKEN' with the core's agents.token (the \
             agent's --token)",
        ),
        Some(g) if !cloud48_engine::auth::constant_eq(g.as_bytes(), expected.as_bytes()) => Some(
            "the agent's token is not this core's agents.token: start the agent with the \
             core's token (--token, or CLOUD48_AGENT_TOKEN)",
        ),
        Some(_) => None,
    };
    if let Some(message) = refused {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            message,
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

#[utoipa::path(get, path = "/v1/servers", tag = "servers", params(Page),
    responses((status = 200, body = Vec<Server>, description = "One page; a `Link` header with rel=\"next\" points to the next one")))]
pub(super) async fn list_servers(
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

#[utoipa::path(get, path = "/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path, description = "Server name or id")),
    responses((status = 200, body = Server), (status = 404, body = ErrorBody)))]
pub(super) async fn show_server(
    State(core): State<Core>,
    Path(server): Path<String>,
) -> Result<Json<Server>, ApiError> {
    Ok(Json(core.servers().get(&server).await?))
}

#[utoipa::path(delete, path = "/v1/servers/{server}", tag = "servers",
    description = "Removes a server whose agent is gone for good, so that its name and subnet are free again: refused while the server is up, holds containers other than destroyed ones, or has placements under way; containers destroyed while it was down are marked destroyed (their guests went with it). Admins.",
    params(("server" = String, Path, description = "Server name or id")),
    responses((status = 200, body = RemovedServer), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Up, simulated, or still holding containers or placements"),
              (status = 503, body = ErrorBody, description = "Another core kept registering or removing a server; try again")))]
pub(super) async fn remove_server(
    State(core): State<Core>,
    Path(server): Path<String>,
) -> Result<Json<RemovedServer>, ApiError> {
    Ok(Json(core.agents().remove(&server).await?))
}
