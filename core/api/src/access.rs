//! The access layer: authenticates every request and checks the role its endpoint needs.
//!
//! Reads need `viewer` (anonymous requests read only the endpoint families of
//! `auth.anonymous_read`: fleet and environments by default; the event stream, those topics whose
//! families they may read); exports and secrets need `operator`; changes to servers, plugins and users, exec
//! in containers and reading the audit trail need `admin`; every other change needs `operator`.
//! `/metrics` may also be read with the `metrics.token` bearer token. The console's files and
//! `/v1/whoami` need no role; `/v1/sign-in` needs a user.
//!
//! A user whose global role does not suffice may still act through its project roles: the
//! request then carries a `Scope` of those projects, the object a path names must be in one of
//! them (else 404, or 403 where the user may only read it), lists and submissions apply it in
//! their handlers, and nothing outside projects may be changed.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use cloud48_engine::auth::{AuthError, Family, Principal, Role, Scope, ScopeRefusal};
use cloud48_engine::core::Core;
use cloud48_engine::projects::Owned;

/// The role a request needs.
pub fn needed_role(method: &Method, path: &str) -> Role {
    if method == Method::GET || method == Method::HEAD {
        // An export carries a container's whole disk: an operator's tool, like import; so
        // does a secret.
        if path.starts_with("/v1/containers/")
            && (path.ends_with("/export") || path.contains("/secrets/"))
        {
            return Role::Operator;
        }
        // The audit trail tells what every user did, an upload is a container's whole disk
        // on its way to an agent: an admin's tools.
        if path == "/v1/audit" || path.starts_with("/v1/exports/") {
            return Role::Admin;
        }
        return Role::Viewer;
    }
    let admin_areas = [
        "/v1/servers",
        "/v1/plugins",
        "/v1/users",
        "/v1/images",
        "/v1/projects",
    ];
    // exec runs as root inside a container, which shares the host's files outside its
    // private directories: an admin's tool.
    let exec = path.starts_with("/v1/containers/") && path.ends_with("/exec");
    if exec
        || admin_areas
            .iter()
            .any(|a| path == *a || path.starts_with(&format!("{a}/")))
    {
        Role::Admin
    } else {
        Role::Operator
    }
}

/// Whether the request carries `Authorization: Bearer TOKEN` with the core's agent token.
fn agent_token_given(core: &Core, headers: &axum::http::HeaderMap) -> bool {
    core.agents()
        .token()
        .is_ok_and(|expected| bearer_is(headers, expected))
}

/// Whether the request carries `Authorization: Bearer EXPECTED`.
fn bearer_is(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|g| cloud48_engine::auth::constant_eq(g.as_bytes(), expected.as_bytes()))
}

pub(super) async fn check(State(core): State<Core>, mut req: Request, next: Next) -> Response {
    // Agents authenticate their heartbeats with the agent token, checked by the handler.
    // Readiness is public: load balancers and supervisors ask it without credentials.
    // The console's files carry no data: its pages sign in through the API. Nor does the
    // API's description, which client generators fetch without credentials.
    if req.uri().path() == "/v1/agents/heartbeat"
        || req.uri().path() == "/v1/health"
        || (req.method() == Method::GET && req.uri().path() == "/v1/openapi.json")
        || super::console::is_console(req.uri().path())
    {
        return next.run(req).await;
    }
    // Agents pull images, and containers uploaded for import, with the agent token (reading
    // only).
    if (req.method() == Method::GET || req.method() == Method::HEAD)
        && (req.uri().path().starts_with("/v1/images")
            || req.uri().path().starts_with("/v1/exports/"))
        && agent_token_given(&core, req.headers())
    {
        return next.run(req).await;
    }
    // Scrapers that cannot do Digest read the metrics with the metrics token.
    if req.method() == Method::GET
        && req.uri().path() == "/metrics"
        && core
            .config()
            .metrics_token
            .as_deref()
            .is_some_and(|t| bearer_is(req.headers(), t))
    {
        return next.run(req).await;
    }
    let needed = needed_role(req.method(), req.uri().path());
    let uri = req.uri().path_and_query().map_or_else(
        || req.uri().path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let auth = core.auth();
    let who = match req.headers().get(header::AUTHORIZATION) {
        None => Ok(Principal::Anonymous),
        Some(h) => match h.to_str() {
            Ok(h) => {
                let addr = req
                    .extensions()
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    .map(|c| c.0.ip());
                auth.authenticate(req.method().as_str(), &uri, h, addr)
                    .await
            }
            Err(_) => Err(AuthError::Unauthorized {
                message: "malformed Authorization header".into(),
                stale: false,
            }),
        },
    };
    let who = match who {
        Ok(w) => w,
        Err(e) => {
            let resp = refuse(&core, e, quiet(req.headers()));
            return with_caller(resp, claimed_user(req.headers()));
        }
    };
    let family = (needed == Role::Viewer)
        .then(|| Family::of(req.uri().path()))
        .flatten();
    let allowed = if req.uri().path() == "/v1/whoami" {
        // Anyone may ask who they are.
        Ok(Scope::All)
    } else if req.uri().path() == "/v1/events" {
        // The stream shows each caller the topics it may read: it needs one.
        super::events::readable(auth, &who).await.map(|r| {
            let scope = r.scope.clone();
            req.extensions_mut().insert(r);
            scope
        })
    } else {
        auth.scope(&who, needed, family).await
    };
    let name = who.audit_name().to_string();
    let scope = match allowed {
        Ok(s) => s,
        Err(e) => return with_caller(refuse(&core, e, quiet(req.headers())), name),
    };
    if let Err(resp) = within(&core, &scope, req.method(), req.uri().path()).await {
        return with_caller(resp, name);
    }
    req.extensions_mut().insert(scope);
    req.extensions_mut().insert(who);
    with_caller(next.run(req).await, name)
}

/// What a path names, for callers limited to some projects.
enum Named {
    /// A list or a submission whose handler applies the caller's projects.
    Scoped,
    /// One object of a project.
    Object(Owned),
    /// Something outside projects (the fleet, plugins, types, images, the core itself).
    Fleet,
}

fn named(method: &Method, path: &str) -> Named {
    let segments: Vec<&str> = path.strip_prefix("/v1/").unwrap_or("").split('/').collect();
    match segments.as_slice() {
        ["environments"] | ["containers"] | ["commands"] | ["projects"] => Named::Scoped,
        ["containers", "import"] if method == Method::POST => Named::Scoped,
        ["containers", "purge"] => Named::Fleet,
        ["environments", key, ..] => Named::Object(Owned::Environment((*key).to_string())),
        ["containers", id, ..] => match id.parse() {
            Ok(id) => Named::Object(Owned::Container(id)),
            Err(_) => Named::Scoped,
        },
        ["commands", id, ..] => match id.parse() {
            Ok(id) => Named::Object(Owned::Command(id)),
            Err(_) => Named::Scoped,
        },
        ["projects", key, ..] => Named::Object(Owned::Project((*key).to_string())),
        _ => Named::Fleet,
    }
}

/// For a caller limited to some projects: whether the request stays within them. An object of
/// a project it may not read answers as missing (404); one it may read without the needed role
/// is forbidden (403); what lies outside projects may be read, not changed.
async fn within(core: &Core, scope: &Scope, method: &Method, path: &str) -> Result<(), Response> {
    let Scope::Projects {
        user,
        grants,
        needed,
        ..
    } = scope
    else {
        return Ok(());
    };
    let forbidden = |message: String| {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message, None).into_response()
    };
    match named(method, path) {
        Named::Scoped => Ok(()),
        Named::Fleet if method == Method::GET || method == Method::HEAD => Ok(()),
        Named::Fleet => {
            let held: Vec<String> = grants
                .values()
                .map(|(p, r)| format!("{r} in '{p}'"))
                .collect();
            Err(forbidden(format!(
                "this acts outside projects and needs the global role {needed}; user '{user}' has roles only in projects ({})",
                held.join(", ")
            )))
        }
        Named::Object(object) => {
            let project = cloud48_engine::projects::project_of(core.db(), &object)
                .await
                .map_err(|e| ApiError::from(e).into_response())?;
            let refusal = match project {
                Some(p) => scope.check(p),
                None => Err(ScopeRefusal::Hidden),
            };
            match refusal {
                Ok(()) => Ok(()),
                Err(ScopeRefusal::Forbidden(m)) => Err(forbidden(m)),
                Err(ScopeRefusal::Hidden) => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    if matches!(scope, Scope::Projects { user, .. } if user == "anonymous") {
                        format!(
                            "{object} does not exist in the project anonymous callers may read \
                             (default); sign in to read the others"
                        )
                    } else {
                        format!("{object} does not exist in the projects user '{user}' may read")
                    },
                    None,
                )
                .into_response()),
            }
        }
    }
}

/// Tells the audit layer who made the request.
fn with_caller(mut resp: Response, name: String) -> Response {
    resp.extensions_mut().insert(super::audit::Caller(name));
    resp
}

/// The user name a Digest `Authorization` header claims (`anonymous` without one).
fn claimed_user(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let at = v.find("username=")? + "username=".len();
            let rest = v[at..].trim_start_matches('"');
            let end = rest.find(['"', ',']).unwrap_or(rest.len());
            Some(rest[..end].to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "anonymous".into())
}

/// Whether the request asks for a 401 without a challenge (`X-Cloud48-No-Challenge: 1`): the
/// web console before its user signs in, so that a browser does not ask for a password on its
/// own.
pub(crate) fn quiet(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get("x-cloud48-no-challenge")
        .is_some_and(|v| v.as_bytes() == b"1")
}

pub(crate) fn refuse(core: &Core, e: AuthError, quiet: bool) -> Response {
    match e {
        AuthError::Unauthorized { message, stale } => {
            let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message, None)
                .into_response();
            let challenges = if quiet {
                Vec::new()
            } else {
                core.auth().challenges(stale)
            };
            for c in challenges {
                if let Ok(v) = HeaderValue::from_str(&c) {
                    resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
            }
            resp
        }
        AuthError::Forbidden(message) => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", message, None).into_response()
        }
        AuthError::Throttled {
            message,
            retry_after_secs,
        } => {
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                message,
                None,
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_exports_need_an_operator_and_exec_or_images_an_admin() {
        let get = |p| needed_role(&Method::GET, p);
        let post = |p| needed_role(&Method::POST, p);
        assert_eq!(get("/v1/containers/3/secrets/mysql"), Role::Operator);
        assert_eq!(get("/v1/containers/3/export"), Role::Operator);
        assert_eq!(get("/v1/containers/3"), Role::Viewer);
        assert_eq!(post("/v1/containers/3/exec"), Role::Admin);
        assert_eq!(post("/v1/servers/h1/images"), Role::Admin);
        assert_eq!(needed_role(&Method::DELETE, "/v1/servers/h1"), Role::Admin);
        assert_eq!(get("/v1/exports/0123"), Role::Admin);
        assert_eq!(Family::of("/v1/exports/0123"), None);
        assert_eq!(post("/v1/containers/3/actions"), Role::Operator);
        // Anonymous readers never read a secret, whatever families they may read.
        assert_eq!(Family::of("/v1/containers/3/secrets/mysql"), None);
        assert_eq!(Family::of("/v1/containers/3"), Some(Family::Containers));
    }
}
