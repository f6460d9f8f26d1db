//! What the OpenAPI document says beyond what the handlers' annotations give: the Digest
//! security scheme, and the answers every operation may give (errors of the access layer, of
//! the extractors and of the body limit), so that the document lists every status the API can
//! answer with (checked by schemathesis in the tests).

use axum::http::StatusCode;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, ResponseBuilder};

/// HTTP Digest (RFC 7616), the API's sign-in; anonymous requests may read what
/// `auth.anonymous_read` allows.
pub(crate) struct DigestScheme;

impl utoipa::Modify for DigestScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut digest = Http::new(HttpAuthScheme::Digest);
        digest.description = Some(
            "HTTP Digest (RFC 7616), SHA-256 or MD5, qop=auth; users are managed with `cloud48 user`"
                .into(),
        );
        components.add_security_scheme("digest", SecurityScheme::Http(digest));
        let mut token = Http::new(HttpAuthScheme::Bearer);
        token.description = Some(
            "`/metrics` only: the core's `metrics.token`, for scrapers that cannot do Digest"
                .into(),
        );
        components.add_security_scheme("metrics_token", SecurityScheme::Http(token));
    }
}

/// Adds to every operation the error answers it can give whatever its handler does, and gives
/// every answer without a description its status's reason phrase (OpenAPI requires one; an
/// error's body is always an `ErrorBody` that says what was wrong).
pub(crate) struct Described;

/// The statuses an operation can answer with before or around its handler.
fn standard_errors(path: &str, op: &Operation) -> Vec<StatusCode> {
    let mut codes = Vec::new();
    if path != "/v1/health" {
        // The access layer: no or wrong credentials, a role too low, too many failed sign-ins.
        codes.extend([
            StatusCode::UNAUTHORIZED,
            StatusCode::FORBIDDEN,
            StatusCode::TOO_MANY_REQUESTS,
        ]);
    }
    // A parameter or a body that does not parse or breaks a rule, or a query parameter the
    // operation does not take (refused on every route).
    codes.push(StatusCode::UNPROCESSABLE_ENTITY);
    if path.contains('{') {
        codes.push(StatusCode::NOT_FOUND);
    }
    if op.request_body.is_some() {
        // A body that is not JSON at all, of another media type, or too large.
        codes.extend([
            StatusCode::BAD_REQUEST,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            StatusCode::PAYLOAD_TOO_LARGE,
        ]);
    }
    codes
}

/// Bytes (an archive, a disk, a WASM component) as OpenAPI describes them: a binary string.
/// The handlers' annotations say `Vec<u8>`, which would read as an array of integers.
fn binary((media_type, content): (&String, &mut RefOr<Content>)) {
    let json = media_type.starts_with("application/json") || media_type.starts_with("text/");
    if let RefOr::T(content) = content
        && !json
        && matches!(content.schema, Some(RefOr::T(Schema::Array(_))))
    {
        content.schema = Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
                .into(),
        );
    }
}

impl utoipa::Modify for Described {
    fn modify(&self, openapi: &mut OpenApi) {
        let error = || {
            Content::new(Some(RefOr::<Schema>::from(Ref::from_schema_name(
                "ErrorBody",
            ))))
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
            ];
            for op in ops.into_iter().flatten() {
                for code in standard_errors(path, op) {
                    op.responses
                        .responses
                        .entry(code.as_u16().to_string())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .content("application/json", error())
                                    .build(),
                            )
                        });
                }
                if let Some(RefOr::T(body)) = &mut op.request_body {
                    body.content.iter_mut().for_each(binary);
                }
                for (code, resp) in op.responses.responses.iter_mut() {
                    if let RefOr::T(r) = resp {
                        r.content.iter_mut().for_each(binary);
                    }
                    if let RefOr::T(r) = resp
                        && r.description.is_empty()
                    {
                        r.description = code
                            .parse::<u16>()
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .and_then(|c| c.canonical_reason())
                            .unwrap_or("Answer")
                            .to_string();
                    }
                }
            }
        }
        // `Requirements` flattens `Resources` (an `allOf`): a `Resources` that forbids other
        // properties would forbid the requirements' labels. The API still refuses unknown fields.
        if let Some(RefOr::T(Schema::Object(o))) = openapi
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut("Resources"))
        {
            o.additional_properties = None;
        }
    }
}
