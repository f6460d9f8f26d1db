//! JSON errors and extractors that turn bad input into them.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use cloud48_engine::core::CoreError;
use cloud48_engine::queue::QueueError;

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code: `invalid`, `not_found`, `conflict`, `bad_request`, `internal`.
    pub code: String,
    /// Human-readable explanation with a hint on how to fix it.
    pub message: String,
    /// The request field at fault, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    /// An error with a status, code, message and optional field.
    pub fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        field: Option<&str>,
    ) -> Self {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.into(),
                message: message.into(),
                field: field.map(str::to_string),
            },
        }
    }

    /// 413 for a body over the limit.
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the request body is larger than this endpoint takes (64 MiB; images are uploaded to /v1/images, which streams)",
            None,
        )
    }

    /// 400 for unparsable input.
    pub fn bad_request(message: impl Into<String>, field: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message, field)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorBody { error: self.detail })).into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "not_found", m, None),
            CoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m, None),
            CoreError::Invalid { field, message } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("{field}: {message}"),
                Some(&field),
            ),
            CoreError::Queue(q) => q.into(),
            CoreError::Unreachable(m) => Self::new(StatusCode::BAD_GATEWAY, "unreachable", m, None),
            CoreError::Busy(m) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", m, None),
            other => {
                tracing::error!(error = %other, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    other.to_string(),
                    None,
                )
            }
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound(_) | QueueError::TargetMissing(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string(), None)
            }
            QueueError::NotCancellable { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string(), None)
            }
            QueueError::TooManyWaits(_) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                e.to_string(),
                None,
            ),
            QueueError::Db(_) | QueueError::Unreadable(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                None,
            ),
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        CoreError::Db(e).into()
    }
}

/// A JSON body (an object: every body the API takes is one) whose errors name the offending
/// field.
pub struct ApiJson<T>(pub T);

/// The first place (a JSON path) where `input` has an array and `read`, what was made of it
/// written back, an object: serde reads a struct from an array of its fields in order, which
/// the API's schema does not allow (`[]` is not a quota).
fn array_for_object(
    input: &serde_json::Value,
    read: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (input, read) {
        (Value::Array(_), Value::Object(_)) => Some(if path.is_empty() {
            ".".into()
        } else {
            path.to_string()
        }),
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| {
            let here = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            b.get(k).and_then(|w| array_for_object(v, w, &here))
        }),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| array_for_object(v, w, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Bodies up to this size are checked for arrays given for objects (larger ones are exports,
/// whose size is in one hex string).
const SHAPE_CHECKED: usize = 1 << 20;

impl<T: DeserializeOwned + Serialize, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad_request",
                "send the body as JSON with 'Content-Type: application/json'",
                None,
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large()
                } else {
                    ApiError::bad_request(format!("cannot read the body: {e}"), None)
                }
            })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let value: T =
            serde_path_to_error::deserialize(de).map_err(|e| body_error::<T>(&bytes, e))?;
        if bytes.len() <= SHAPE_CHECKED
            && let Ok(input) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Ok(read) = serde_json::to_value(&value)
            && let Some(at) = array_for_object(&input, &read, "")
        {
            let (message, field) = if at == "." {
                (
                    "the body must be a JSON object, not an array".to_string(),
                    None,
                )
            } else {
                (
                    format!("{at}: must be a JSON object, not an array"),
                    Some(at.as_str()),
                )
            };
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                message,
                field,
            ));
        }
        Ok(ApiJson(value))
    }
}

/// What was wrong with a JSON body that did not read as a `T`: the field at fault where it can
/// be told, in the terms of the API's schema (a JSON object, not a Rust struct).
fn body_error<T: DeserializeOwned>(
    bytes: &[u8],
    e: serde_path_to_error::Error<serde_json::Error>,
) -> ApiError {
    let at = value_path(e.path());
    let path = e.path().to_string();
    let inner = e.into_inner();
    if !inner.is_data() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("invalid JSON body: {inner}"),
            None,
        );
    }
    let invalid = |message: String, field: Option<&str>| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message, field)
    };
    let field = (path != ".").then_some(path);
    let input = (bytes.len() <= SHAPE_CHECKED)
        .then(|| serde_json::from_slice::<serde_json::Value>(bytes).ok())
        .flatten();
    let text = inner.to_string();
    let kind = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::Array(_)) => Some("an array"),
        Some(serde_json::Value::String(_)) => Some("a string"),
        Some(serde_json::Value::Number(_)) => Some("a number"),
        Some(serde_json::Value::Bool(_)) => Some("true or false"),
        Some(serde_json::Value::Null) => Some("null"),
        Some(serde_json::Value::Object(_)) | None => None,
    };
    // Every body the API takes is an object: serde would read a struct from an array of its
    // fields, and say so in Rust's terms (`expected struct CreateEnvironment with 3 elements`).
    if let Some(kind) = kind(input.as_ref()) {
        return invalid(format!("the body must be a JSON object, not {kind}"), None);
    }
    // Within it, serde names the Rust type it expected (`internally tagged enum
    // ContainerCommand`): where an object was expected, say so.
    let rust_named = ["expected struct ", "expected internally tagged enum "]
        .iter()
        .any(|t| text.contains(t));
    let given = input.as_ref().and_then(|v| {
        at.as_ref()
            .and_then(|at| at.iter().try_fold(v, |v, k| k.get(v)))
    });
    if rust_named && let (Some(kind), Some(f)) = (kind(given), &field) {
        return invalid(
            format!("{f}: must be a JSON object, not {kind}"),
            Some(f.as_str()),
        );
    }
    if let Some(missing) = text
        .strip_prefix("missing field `")
        .and_then(|t| t.split_once('`'))
        .map(|(name, _)| name.to_string())
    {
        let place = match &field {
            Some(f) => Some(f.clone()),
            None => input.as_ref().and_then(|v| lacking::<T>(v, &missing)),
        };
        if let Some(place) = place {
            let named = if place.is_empty() {
                missing.clone()
            } else {
                format!("{place}.{missing}")
            };
            let hint = if RESOURCE_FIGURES.contains(&missing.as_str()) {
                " (all three figures are required: cpu_millis, memory_mb and disk_mb)"
            } else {
                ""
            };
            return invalid(
                format!("{named}: required, but missing{hint}"),
                Some(&named),
            );
        }
    }
    match &field {
        Some(f) => invalid(format!("{f}: {inner}"), Some(f.as_str())),
        None => invalid(format!("invalid JSON body: {inner}"), None),
    }
}

/// The figures of `Resources`: an update, and requirements, give all three.
const RESOURCE_FIGURES: [&str; 3] = ["cpu_millis", "memory_mb", "disk_mb"];

/// A step down a JSON value.
enum Step {
    Key(String),
    Index(usize),
}

impl Step {
    fn get<'v>(&self, v: &'v serde_json::Value) -> Option<&'v serde_json::Value> {
        match self {
            Step::Key(k) => v.get(k),
            Step::Index(i) => v.get(i),
        }
    }
}

/// The steps to the value an error path names (none where the path goes through an enum).
fn value_path(path: &serde_path_to_error::Path) -> Option<Vec<Step>> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|s| match s {
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// Objects a missing-field search looks at, at most.
const SEARCHED: usize = 16;

/// Where in `input` the field `name` that `T` missed belongs (`""`: the top), when serde could
/// not say (an internally tagged enum reads its fields from a copy, whose path is lost): the
/// one object lacking `name` where adding it changes the error.
fn lacking<T: DeserializeOwned>(input: &serde_json::Value, name: &str) -> Option<String> {
    fn objects<'v>(
        v: &'v serde_json::Value,
        path: String,
        out: &mut Vec<(String, &'v serde_json::Value)>,
    ) {
        if out.len() >= SEARCHED {
            return;
        }
        if let serde_json::Value::Object(m) = v {
            out.push((path.clone(), v));
            for (k, w) in m {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                objects(w, here, out);
            }
        }
    }
    let mut candidates = Vec::new();
    objects(input, String::new(), &mut candidates);
    let still = format!("missing field `{name}`");
    let unknown = format!("unknown field `{name}`");
    let found: Vec<String> = candidates
        .into_iter()
        .filter(|(_, v)| v.get(name).is_none())
        .filter(|(path, _)| {
            let mut tried = input.clone();
            let target = if path.is_empty() {
                Some(&mut tried)
            } else {
                path.split('.').try_fold(&mut tried, |v, k| v.get_mut(k))
            };
            let Some(serde_json::Value::Object(m)) = target else {
                return false;
            };
            m.insert(name.to_string(), serde_json::Value::Null);
            match serde_json::from_value::<T>(tried) {
                Ok(_) => true,
                Err(e) => {
                    let e = e.to_string();
                    !e.contains(&still) && !e.contains(&unknown)
                }
            }
        })
        .map(|(path, _)| path)
        .collect();
    match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// A JSON body that may be left out: an empty body or `null` reads as `T::default()`; any
/// other body is read as `ApiJson` reads it.
pub struct OptionalApiJson<T>(pub T);

impl<T: DeserializeOwned + Serialize + Default, S: Send + Sync> FromRequest<S>
    for OptionalApiJson<T>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers();
        let empty = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
            || (headers.get(axum::http::header::CONTENT_LENGTH).is_none()
                && headers.get(axum::http::header::TRANSFER_ENCODING).is_none());
        if empty {
            return Ok(OptionalApiJson(T::default()));
        }
        // `null` is no options too.
        ApiJson::<Option<T>>::from_request(req, state)
            .await
            .map(|ApiJson(v)| OptionalApiJson(v.unwrap_or_default()))
    }
}

/// Query parameters whose errors come back as JSON.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let field = (path != ".").then_some(path);
                let message = query_error_message(query, field.as_deref(), e.into_inner());
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    message,
                    field.as_deref(),
                )
            })
    }
}

/// What was wrong with a query: the parameter and its value as sent, and what it should be.
fn query_error_message(
    query: &str,
    field: Option<&str>,
    error: serde_urlencoded::de::Error,
) -> String {
    let raw = field.and_then(|f| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == f)
            .map(|(_, v)| v.into_owned())
    });
    let error = error.to_string();
    let why = if error.contains("invalid digit") || error.contains("number too large") {
        "expected a whole number, 0 or more".to_string()
    } else if error.contains("cannot parse integer from empty string") {
        "expected a whole number, not nothing".to_string()
    } else {
        error
    };
    match (field, raw) {
        (Some(f), Some(v)) => format!("invalid query parameter {f}='{v}': {why}"),
        (Some(f), None) => format!("invalid query parameter {f}: {why}"),
        _ => format!("invalid query parameter: {why}"),
    }
}

/// Parses a numeric id from the path.
pub fn parse_id<T: std::str::FromStr>(field: &str, raw: &str) -> Result<T, ApiError> {
    raw.parse::<T>().map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{field}: '{raw}' is not a numeric id"),
            Some(field),
        )
    })
}

/// Turns an error answer that is not JSON (what axum itself sends: an empty 405, a plain-text
/// 413 from a body limit, a 400 from a path it cannot parse) into the API's JSON error, keeping
/// its status and headers (`Allow` on a 405).
pub(crate) async fn json_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!(
                "{method} is not allowed here{}; see /v1/openapi.json",
                parts
                    .headers
                    .get(axum::http::header::ALLOW)
                    .and_then(|v| v.to_str().ok())
                    .map(|a| format!(" (allowed: {a})"))
                    .unwrap_or_default()
            ),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => return ApiError::too_large().into_response(),
        s if text.is_empty() || text.contains('\n') => (
            if s.is_server_error() {
                "internal"
            } else {
                "bad_request"
            },
            s.canonical_reason().unwrap_or("error").to_string(),
        ),
        s => (
            if s.is_server_error() {
                "internal"
            } else {
                "bad_request"
            },
            text,
        ),
    };
    let mut json = ApiError::new(status, code, message, None).into_response();
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Page {
        limit: Option<u32>,
    }

    fn refusal(query: &str) -> String {
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        let e = serde_path_to_error::deserialize::<_, Page>(de).unwrap_err();
        let path = e.path().to_string();
        query_error_message(query, Some(&path), e.into_inner())
    }

    #[test]
    fn a_bad_number_in_a_query_names_the_parameter_its_value_and_what_it_should_be() {
        assert_eq!(
            refusal("limit=-1"),
            "invalid query parameter limit='-1': expected a whole number, 0 or more"
        );
        assert_eq!(
            refusal("limit=ten"),
            "invalid query parameter limit='ten': expected a whole number, 0 or more"
        );
        assert_eq!(
            refusal("limit="),
            "invalid query parameter limit='': expected a whole number, not nothing"
        );
    }
}
