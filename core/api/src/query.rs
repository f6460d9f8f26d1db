//! Query parameters an operation does not take are refused, on every route, before its handler
//! runs: a parameter the caller meant (`POST /v1/containers?project=shop`) is never silently
//! ignored.
//!
//! What each operation takes is read from the OpenAPI document (its `in: query` parameters),
//! once, when the router is built; the check is a route layer, so it knows the route a request
//! matched and covers every handler, including ones added later: a handler whose query
//! parameters the document does not declare gets them refused in its first test.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::ApiError;

/// What one operation takes.
#[derive(Debug, Default)]
struct Takes {
    /// Its query parameters.
    query: Vec<String>,
    /// The fields of its JSON body, if it has one (for the hint that a parameter belongs there).
    body: BTreeSet<String>,
}

/// The query parameters of every operation, by route template and method.
#[derive(Debug, Default)]
pub(crate) struct Parameters {
    paths: HashMap<String, HashMap<Method, Takes>>,
}

impl Parameters {
    /// Reads what every operation of `doc` takes.
    pub(crate) fn of(doc: &utoipa::openapi::OpenApi) -> Arc<Self> {
        let doc = serde_json::to_value(doc).unwrap_or_default();
        let mut out = Parameters::default();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            let ops = out.paths.entry(path.clone()).or_default();
            for (method, op) in item.as_object().into_iter().flatten() {
                let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else {
                    continue;
                };
                let query = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect();
                let mut body = BTreeSet::new();
                fields(
                    &doc,
                    &op["requestBody"]["content"]["application/json"]["schema"],
                    &mut body,
                    0,
                );
                ops.insert(method, Takes { query, body });
            }
        }
        Arc::new(out)
    }
}

/// The property names of `schema` (through `$ref`s, `allOf`, `oneOf` and `anyOf`).
fn fields(doc: &Value, schema: &Value, out: &mut BTreeSet<String>, depth: u8) {
    if depth > 8 {
        return;
    }
    if let Some(name) = schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        fields(doc, &doc["components"]["schemas"][name], out, depth + 1);
    }
    if let Some(props) = schema["properties"].as_object() {
        out.extend(props.keys().cloned());
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for s in schema[key].as_array().into_iter().flatten() {
            fields(doc, s, out, depth + 1);
        }
    }
}

/// Refuses (422, naming it) the first query parameter the matched operation does not take.
pub(crate) async fn refuse_unknown(
    State(params): State<Arc<Parameters>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(query) = req.uri().query().filter(|q| !q.is_empty()) else {
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |m| m.as_str().to_string());
    // The console's pages are not API operations; a link to them may carry anything.
    if crate::console::is_console(req.uri().path()) {
        return next.run(req).await;
    }
    let method = if req.method() == Method::HEAD {
        Method::GET
    } else {
        req.method().clone()
    };
    let none = Takes::default();
    let takes = match params.paths.get(&route) {
        // A route outside the document (the agents' heartbeat, the document itself) takes none.
        None => &none,
        Some(ops) => match ops.get(&method) {
            Some(t) => t,
            // A method the route does not take: the router answers 405.
            None => return next.run(req).await,
        },
    };
    let unknown = form_urlencoded::parse(query.as_bytes())
        .map(|(k, _)| k.into_owned())
        .find(|k| !takes.query.iter().any(|q| q == k));
    match unknown {
        None => next.run(req).await,
        Some(name) => refusal(&method, &route, takes, &name).into_response(),
    }
}

/// The refusal of `name`, saying what the operation takes instead.
fn refusal(method: &Method, route: &str, takes: &Takes, name: &str) -> ApiError {
    let takes_what = if takes.query.is_empty() {
        format!("{method} {route} takes no query parameters")
    } else {
        format!("{method} {route} takes only {}", takes.query.join(", "))
    };
    let hint = if takes.body.contains(name) {
        format!("; {name} belongs in the JSON body: {{\"{name}\": ...}}")
    } else {
        String::new()
    };
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        format!("unknown query parameter '{name}': {takes_what}{hint}"),
        Some(name),
    )
}
