//! The audit layer: records every request that changes something, or tries to, and every read
//! of a container's secret, once it is answered (`cloud48_engine::audit`), and `GET /v1/audit` lists the trail (admins).

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::{ApiError, ApiQuery, ErrorBody, page, page_size};
use cloud48_engine::audit::AuditFilter;
use cloud48_engine::core::Core;
use cloud48_engine::model::AuditEntry;

/// Who made a request, as the access layer found out (the name tried, when sign-in failed).
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub String);

/// Bodies read for the command id or the error message (answers to mutations are small JSON).
const READ_AT_MOST: u64 = 64 << 10;

/// What an answer says: the command accepted, or what went wrong.
fn outcome(body: &[u8]) -> (Option<i64>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    (
        v.get("command_id").and_then(serde_json::Value::as_i64),
        v.pointer("/error/message")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
    )
}

/// Most characters of a request's JSON an audit entry keeps.
const KEEP_AT_MOST: usize = 4096;

/// The request with its body, and what it asked for when the body is small JSON: the JSON
/// with secrets masked (see `mask_secrets`; all of it on a secret's path), cut at
/// `KEEP_AT_MOST` characters. A body that breaks off while read is answered 400 here.
async fn asked(req: Request, secret: bool) -> Result<(Request, Option<String>), Response> {
    use axum::body::{Body, HttpBody};
    let json = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let small = req
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n > 0 && n <= READ_AT_MOST);
    if !json || !small {
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, READ_AT_MOST as usize)
        .await
        .map_err(|e| {
            axum::response::IntoResponse::into_response(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request body broke off: {e}"),
                None,
            ))
        })?;
    let said = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .map(|mut v| {
            if secret {
                v = serde_json::Value::String(MASK.into());
            } else {
                mask_secrets(&mut v);
            }
            let text = v.to_string();
            match text.char_indices().nth(KEEP_AT_MOST) {
                Some((at, _)) => format!("{}…", &text[..at]),
                None => text,
            }
        });
    Ok((Request::from_parts(parts, Body::from(bytes)), said))
}

/// What a masked value reads as.
const MASK: &str = "****";

/// Key parts naming something secret: its value is masked.
const SECRET_KEYS: [&str; 9] = [
    "pass", "pwd", "secret", "token", "key", "cred", "auth", "ha1", "private",
];

/// Masks what may be secret: every value under a key naming a password, secret, token, key
/// or credentials; every environment or container parameter (`params`: a type's parameters
/// may be passwords); a command run in a container (`command`: its arguments may be); and a
/// state or disk carried inline (`state_hex`, `disk_hex`: kept as their length).
fn mask_secrets(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                let key = key.to_ascii_lowercase();
                if key.ends_with("_hex") {
                    let len = value.as_str().map_or(0, str::len);
                    *value = Value::String(format!("({len} hex digits)"));
                } else if key == "params" && value.is_object() {
                    for p in value
                        .as_object_mut()
                        .into_iter()
                        .flat_map(|m| m.values_mut())
                    {
                        *p = Value::String(MASK.into());
                    }
                } else if key == "command" && value.is_array()
                    || SECRET_KEYS.iter().any(|k| key.contains(k))
                {
                    *value = Value::String(MASK.into());
                } else {
                    mask_secrets(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

pub(crate) async fn trail(State(core): State<Core>, req: Request, next: Next) -> Response {
    use axum::body::{Body, HttpBody};
    let reads = [Method::GET, Method::HEAD, Method::OPTIONS];
    // Heartbeats are the agents' reports, not changes anyone asked for.
    // Reads change nothing, but who read a secret is on record.
    let secret = req.uri().path().contains("/secrets/");
    if reads.contains(req.method()) && !secret || req.uri().path() == "/v1/agents/heartbeat" {
        return next.run(req).await;
    }
    // A request without credentials answered with a challenge is the start of Digest's
    // exchange, not an attempt as anyone: the signed request that follows is recorded.
    let signed = req
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION);
    let action = req.method().to_string();
    let object = req.uri().path().to_string();
    let address = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let (req, request) = match asked(req, secret).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let resp = next.run(req).await;
    let who = resp
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "anonymous".to_string(), |c| c.0.clone());
    let status = resp.status().as_u16();
    if status == 401 && !signed {
        return resp;
    }
    // What a caller who could not sign in sent, or an anonymous one refused, is not kept:
    // anyone who reaches the port could fill the append-only trail with it.
    let request = request.filter(|_| status != 401 && (status < 400 || who != "anonymous"));
    let (parts, body) = resp.into_parts();
    let small = body.size_hint().exact().is_some_and(|n| n <= READ_AT_MOST);
    let (body, (command_id, message)) = if small {
        match axum::body::to_bytes(body, READ_AT_MOST as usize).await {
            Ok(bytes) => {
                let said = outcome(&bytes);
                (Body::from(bytes), said)
            }
            Err(e) => (
                Body::empty(),
                (None, Some(format!("the answer broke: {e}"))),
            ),
        }
    } else {
        (body, (None, None))
    };
    let entry = AuditEntry {
        id: 0,
        at: 0,
        who,
        address,
        action,
        object,
        status,
        command_id,
        message,
        request,
    };
    if let Err(e) = cloud48_engine::audit::record(core.db(), &entry).await {
        tracing::error!(target: "cloud48::audit", error = %e, ?entry, "could not record an audit entry");
    }
    Response::from_parts(parts, body)
}

/// Which audit entries to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this user's.
    pub who: Option<String>,
    /// Only changes of paths starting with this (`/v1/servers`).
    pub object: Option<String>,
    /// At most this many, newest first (1-1000; default 100).
    #[serde(default, deserialize_with = "cloud48_engine::managers::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only entries older than this one (the next page; see the `Link` header).
    pub before: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Vec<AuditEntry>, description = "One page, newest first; a `Link` header with rel=\"next\" points to the next one"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn list_audit(
    State(core): State<Core>,
    uri: axum::http::Uri,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<axum::response::Response, ApiError> {
    let filter = AuditFilter {
        who: q.who,
        object: q.object,
        before: q.before,
        limit: page_size(Some(q.limit.unwrap_or(100))),
    };
    let items = cloud48_engine::audit::list(core.db(), &filter)
        .await
        .map_err(cloud48_engine::core::CoreError::from)?;
    Ok(page(items, q.limit.or(Some(100)), &uri, "before", |e| e.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_secrets_tokens_parameters_and_commands_are_masked_at_any_depth() {
        let mut v = serde_json::json!({
            "name": "shop",
            "password": "hunter2",
            "quota": { "containers": 5 },
            "users": [{ "name": "ada", "ha1_md5": "abc", "api_token": "t", "api_key": "k" }],
            "params": { "dbpass": "s", "heap-mb": "512" },
            "command": ["mysql", "-phunter2"],
            "state_hex": "00ff",
            "op": "stop",
        });
        mask_secrets(&mut v);
        assert_eq!(
            v,
            serde_json::json!({
                "name": "shop",
                "password": MASK,
                "quota": { "containers": 5 },
                "users": [{ "name": "ada", "ha1_md5": MASK, "api_token": MASK, "api_key": MASK }],
                "params": { "dbpass": MASK, "heap-mb": MASK },
                "command": MASK,
                "state_hex": "(4 hex digits)",
                "op": "stop",
            })
        );
    }
}
