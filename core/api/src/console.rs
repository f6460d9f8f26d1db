//! The web console: static pages embedded in the binary (`core/api/console/`), served at `/`,
//! that read and change everything through the same REST API and event stream as the CLI, and
//! the two endpoints it signs in with.
//!
//! Invariant: the console's files carry no data and need no sign-in; every fact it shows comes
//! from an API request the access layer authorized, so it can show nothing the caller could not
//! read with the CLI.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiError;
use cloud48_engine::auth::{Anonymous, Principal, Role};
use cloud48_engine::core::Core;

/// The console's files: name, content type, contents.
const FILES: [(&str, &str, &str); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../console/console.css"),
    ),
];

/// An entity tag for the embedded files: they change only with the binary.
fn etag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (name, _, body) in FILES {
            name.hash(&mut h);
            body.hash(&mut h);
        }
        format!("\"{:016x}\"", h.finish())
    })
}

/// Whether `path` is one of the console's public files (`/` or `/console/...`).
pub(crate) fn is_console(path: &str) -> bool {
    path == "/" || path.starts_with("/console/")
}

fn file(name: &str, headers: &HeaderMap) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the console has no file '{name}'"),
            None,
        )
        .into_response();
    };
    let tag = etag();
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::ETAG, HeaderValue::from_static(tag)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
            ),
        ],
        *body,
    )
        .into_response()
}

/// `GET /`: the console's page.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    file("index.html", &headers)
}

/// `GET /console/{file}`: its script and style sheet.
pub(crate) async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    file(&name, &headers)
}

/// Who the caller is, as the core sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Identity {
    /// The signed-in user; none for anonymous requests.
    pub user: Option<String>,
    /// The user's role; for anonymous requests `admin` when `auth.anonymous = "full"`, else none.
    pub role: Option<Role>,
    /// The endpoint families anonymous requests may read (`auth.anonymous_read`).
    pub anonymous_read: Vec<String>,
}

fn identity(core: &Core, who: &Principal) -> Identity {
    let config = core.auth().config();
    let (user, role) = match who {
        Principal::User { name, role } => (Some(name.clone()), Some(*role)),
        Principal::Anonymous => (
            None,
            (config.anonymous == Anonymous::Full).then_some(Role::Admin),
        ),
    };
    Identity {
        user,
        role,
        anonymous_read: config
            .anonymous_read
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

/// Who the caller is: the user its Digest credentials name, or anonymous without any (wrong
/// credentials are refused as everywhere). Needs no role.
#[utoipa::path(get, path = "/v1/whoami", tag = "access",
    responses((status = 200, body = Identity), (status = 401), (status = 429)))]
pub(crate) async fn whoami(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
) -> Json<Identity> {
    Json(identity(&core, &who))
}

/// Signs in: answers 401 with the Digest challenge until the request carries a user's
/// credentials (a browser then asks for them and keeps them for the rest of the API), then
/// tells who signed in.
#[utoipa::path(get, path = "/v1/sign-in", tag = "access",
    responses((status = 200, body = Identity), (status = 401), (status = 429)))]
pub(crate) async fn sign_in(
    State(core): State<Core>,
    Extension(who): Extension<Principal>,
) -> Json<Identity> {
    Json(identity(&core, &who))
}
