//! `/v1/commands`: the command queue, a command (waiting for its end if asked), cancelling.

use super::*;

/// Which commands to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
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
pub(super) async fn list_commands(
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
                let readable = scope.readable();
                let within = readable.as_deref();
                Some(vec![
                    cloud48_engine::projects::filter_within(core.db(), p, within).await?,
                ])
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
pub(super) fn wait_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
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
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Block up to this many seconds (at most 300) until the command finishes.
    #[param(minimum = 0, maximum = 300)]
    #[serde(default, deserialize_with = "wait_secs")]
    pub wait: Option<u32>,
}

#[utoipa::path(get, path = "/v1/commands/{id}", tag = "commands",
    params(("id" = i64, Path, description = "Command id"), WaitQuery),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody)))]
pub(super) async fn show_command(
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
pub(super) async fn cancel_command(
    State(core): State<Core>,
    Path(id): Path<String>,
) -> Result<Json<Command>, ApiError> {
    Ok(Json(core.queue().cancel(parse_id("id", &id)?).await?))
}
