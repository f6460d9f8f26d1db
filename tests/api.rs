//! The REST API: OpenAPI document, JSON errors naming the field, nothing half-applied.

use cloud48_engine::model::{Accepted, Command, CommandStatus, ContainerStatus};
use serde_json::{Value, json};

use crate::common::{Opts, TestCore};
use crate::container::act;
use cloud48_engine::managers::ContainerCommand;

async fn raw(t: &TestCore, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut req = http.request(method.parse().unwrap(), format!("{}{path}", t.url));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `POST /v1/containers/{id}/actions` with `body`, raw.
async fn action(t: &TestCore, id: cloud48_engine::model::ContainerId, body: &str) -> (u16, Value) {
    raw(
        t,
        "POST",
        &format!("/v1/containers/{id}/actions"),
        Some(body),
    )
    .await
}

async fn command_count(t: &TestCore) -> usize {
    let list: Vec<Command> = t.client.get("/v1/commands?limit=1000").await.unwrap();
    list.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_generated_from_the_handlers() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let (status, doc) = raw(&t, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    for path in [
        "/v1/environments",
        "/v1/environments/{env}",
        "/v1/environments/{env}/containers",
        "/v1/containers",
        "/v1/containers/{id}/actions",
        "/v1/servers",
        "/v1/commands/{id}",
        "/v1/commands/{id}/cancel",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(
        doc["components"]["schemas"]
            .get("ContainerCommand")
            .is_some()
    );
    // Typed ids stay bare integers for clients.
    for (schema, field) in [("Command", "id"), ("Environment", "id")] {
        let mut prop = &doc["components"]["schemas"][schema]["properties"][field];
        if let Some(target) = prop["$ref"].as_str() {
            let name = target.rsplit('/').next().unwrap();
            prop = &doc["components"]["schemas"][name];
        }
        assert_eq!(prop["type"], "integer", "{schema}.{field}: {prop}");
    }
}

/// Issue 19: the document misled client generators (dangling `$ref`s, query parameters declared
/// as path parameters, PascalCase status enums, responses without the description OpenAPI
/// requires, no security scheme). It now passes an OpenAPI 3.1 validator
/// (`openapi-spec-validator`, which `.ci/run` installs) and these checks of what it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_says_what_the_api_does() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let (status, doc) = raw(&t, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut refs = Vec::new();
    fn walk<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r);
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&doc, &mut refs);
    for r in refs {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(r);
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let template: std::collections::BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in ops.as_object().unwrap() {
            let declared: std::collections::BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(declared, template, "{method} {path}: path parameters");
        }
    }
    let list = &doc["paths"]["/v1/containers"]["get"]["parameters"];
    let status = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "status")
        .expect("containers are listed by status");
    assert_eq!(status["in"], "query");
    assert_eq!(status["required"], false);
    assert_eq!(
        schemas["ContainerStatus"]["enum"][0], "creating",
        "enums as the API writes them"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["digest"]["scheme"],
        "digest"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(open(sys.argv[1])))",
        ])
        .arg(file.path())
        .output()
        .expect("python3 runs (the validator is a Python package)");
    assert!(
        out.status.success(),
        "the OpenAPI document is invalid (or the validator is missing: pip install \
         openapi-spec-validator):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_naming_the_field_and_changes_nothing() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "web" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let before = command_count(&t).await;

    // (method, path, body, status, field named, message contains)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        u16,
        Option<&'a str>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/environments",
            Some("{\"name\": "),
            400,
            None,
            "invalid JSON",
        ),
        (
            "POST",
            "/v1/environments",
            Some("{}"),
            422,
            Some("name"),
            "name: required, but missing",
        ),
        // An array is not an object, in the schema's terms (not serde's Rust names).
        (
            "POST",
            "/v1/environments",
            Some("[1, 2]"),
            422,
            None,
            "the body must be a JSON object, not an array",
        ),
        (
            "POST",
            "/v1/containers/1/actions",
            Some("[\"start\"]"),
            422,
            None,
            "the body must be a JSON object, not an array",
        ),
        // A figure left out of an update: named where it belongs, though the operation's
        // fields are read from a copy (an internally tagged enum).
        (
            "POST",
            "/v1/containers/1/actions",
            Some("{\"op\": \"update\", \"resources\": {}}"),
            422,
            Some("resources.cpu_millis"),
            "resources.cpu_millis: required, but missing (all three figures are required: cpu_millis, memory_mb and disk_mb)",
        ),
        (
            "POST",
            "/v1/containers/1/actions",
            Some("{\"op\": \"update\"}"),
            422,
            Some("resources"),
            "resources: required, but missing",
        ),
        // serde would read a struct from an array of its fields; the schema says object.
        (
            "PUT",
            "/v1/projects/default/quota",
            Some("[]"),
            422,
            None,
            "the body must be a JSON object, not an array",
        ),
        (
            "POST",
            "/v1/projects",
            Some("{\"name\": \"p\", \"quota\": [5]}"),
            422,
            Some("quota"),
            "quota: must be a JSON object, not an array",
        ),
        (
            "POST",
            "/v1/environments",
            Some("{\"name\": 5}"),
            422,
            Some("name"),
            "name",
        ),
        (
            "POST",
            "/v1/environments",
            Some("{\"name\": \"Bad Name\"}"),
            422,
            Some("name"),
            "not a valid name",
        ),
        (
            "POST",
            "/v1/environments",
            Some("{\"name\": \"web\"}"),
            409,
            None,
            "already exists",
        ),
        (
            "POST",
            "/v1/environments",
            Some("{\"name\": \"x\", \"colour\": 1}"),
            422,
            None,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/v1/environments/web/containers",
            Some("{\"type\": \"nosuch\"}"),
            422,
            Some("type"),
            "unknown container type 'nosuch'",
        ),
        (
            "POST",
            "/v1/environments/web/containers",
            Some(
                "{\"type\": \"plain\", \"requirements\": {\"cpu_millis\": 0, \"memory_mb\": 1, \"disk_mb\": 1}}",
            ),
            422,
            Some("requirements"),
            "cpu_millis must be greater than 0",
        ),
        // Figures the ledger's signed counters would wrap on are refused, on a named server
        // too (it skips placement's check).
        (
            "POST",
            "/v1/containers",
            Some(
                "{\"type\": \"plain\", \"server\": \"sim-1\", \"requirements\": {\"cpu_millis\": 100, \"memory_mb\": 18446744073709551615, \"disk_mb\": 64}}",
            ),
            422,
            Some("requirements"),
            "memory_mb 18446744073709551615 is more than Cloud48 counts for one container or server (at most 1099511627776)",
        ),
        (
            "POST",
            "/v1/containers",
            Some(
                "{\"type\": \"plain\", \"requirements\": {\"cpu_millis\": 100, \"memory_mb\": 64, \"disk_mb\": 64, \"labels\": [\"\"]}}",
            ),
            422,
            Some("requirements"),
            "label '' is empty or has spaces",
        ),
        (
            "POST",
            "/v1/environments/nosuch/containers",
            Some("{\"type\": \"plain\"}"),
            404,
            None,
            "environment 'nosuch' does not exist",
        ),
        (
            "POST",
            "/v1/environments/web/explode",
            Some("{}"),
            422,
            Some("op"),
            "not an environment operation",
        ),
        (
            "DELETE",
            "/v1/environments/web/containers/77",
            None,
            404,
            None,
            "container 77 does not exist",
        ),
        (
            "GET",
            "/v1/containers/abc",
            None,
            422,
            Some("id"),
            "not a numeric id",
        ),
        // A misspelt filter is refused, not ignored (which would list everything).
        (
            "GET",
            "/v1/containers?enviroment=web",
            None,
            422,
            None,
            "unknown query parameter 'enviroment': GET /v1/containers takes only ",
        ),
        (
            "GET",
            "/v1/commands?stauts=failed",
            None,
            422,
            None,
            "unknown query parameter 'stauts'",
        ),
        (
            "GET",
            "/v1/commands?limit=-1",
            None,
            422,
            Some("limit"),
            "limit='-1': expected a whole number, 0 or more",
        ),
        (
            "GET",
            "/v1/containers?after=-5",
            None,
            422,
            Some("after"),
            "after -5 is not an id",
        ),
        (
            "GET",
            "/v1/projects?limit=1",
            None,
            422,
            None,
            "unknown query parameter 'limit': GET /v1/projects takes no query parameters",
        ),
        // An operation takes no options: one sent is refused, not ignored.
        (
            "POST",
            "/v1/environments/web/stop",
            Some("{\"force\": true}"),
            422,
            None,
            "unknown field `force`",
        ),
        (
            "GET",
            "/v1/containers/424242",
            None,
            404,
            None,
            "container 424242 does not exist",
        ),
        (
            "POST",
            "/v1/containers/424242/actions",
            Some("{\"op\": \"start\"}"),
            404,
            None,
            "does not exist",
        ),
        (
            "POST",
            "/v1/containers/1/actions",
            Some("{\"op\": \"fly\"}"),
            422,
            None,
            "unknown variant `fly`",
        ),
        (
            "GET",
            "/v1/containers?status=sleeping",
            None,
            422,
            Some("status"),
            "unknown variant `sleeping`",
        ),
        (
            "GET",
            "/v1/commands/999999",
            None,
            404,
            None,
            "command 999999 does not exist",
        ),
        (
            "GET",
            "/v1/commands?target_type=server",
            None,
            422,
            Some("target_type"),
            "unknown variant `server`, expected `container` or `environment`",
        ),
        (
            "POST",
            "/v1/commands/999999/cancel",
            Some("{}"),
            404,
            None,
            "does not exist",
        ),
        ("GET", "/v1/nowhere", None, 404, None, "no such endpoint"),
    ];
    for (method, path, body, want, field, text) in cases {
        let (status, err) = raw(&t, method, path, body).await;
        assert_eq!(status, want, "{method} {path} {body:?}: {err}");
        let message = err["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no JSON error: {err}"));
        assert!(
            message.contains(text),
            "{method} {path}: '{message}' lacks '{text}'"
        );
        // Errors speak the API's terms, not the Rust types' behind it.
        assert!(
            !message.contains("struct ") && !message.contains("enum "),
            "{method} {path}: '{message}' names a Rust type"
        );
        if let Some(f) = field {
            assert_eq!(
                err["error"]["field"].as_str(),
                Some(f),
                "{method} {path}: {err}"
            );
        }
    }
    assert_eq!(
        command_count(&t).await,
        before,
        "no rejected request created a command"
    );
}

/// A command's precondition is checked when it runs, after the commands queued before it on
/// the same object: one the status does not allow then fails with a message naming what the
/// container must be. Only what can never run (a destroyed container) is refused at submission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_the_status_does_not_allow_fails_when_it_runs() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/containers", &json!({ "type": "plain" }))
        .await
        .unwrap();
    let id = t.created(a.command_id).await;
    for (op, needs) in [("start", "stopped"), ("resume", "suspended")] {
        let (status, body) = raw(
            &t,
            "POST",
            &format!("/v1/containers/{id}/actions"),
            Some(&format!("{{\"op\": \"{op}\"}}")),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let done = t.wait(body["command_id"].as_i64().unwrap()).await;
        assert_eq!(done.status, CommandStatus::Failed);
        let m = done.error.unwrap_or_default();
        assert!(
            m.contains(&format!("container {id} is running")) && m.contains(needs),
            "{m}"
        );
    }
    let before = command_count(&t).await;
    let (status, err) = action(&t, id, "{\"op\": \"migrate\", \"to\": \"sim-404\"}").await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "to");
    assert_eq!(command_count(&t).await, before);
    // No server can move a running container: live migration is refused, never faked.
    let (status, err) = action(&t, id, "{\"op\": \"migrate\", \"live\": true}").await;
    assert_eq!(status, 409, "{err}");
    let m = err["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("cannot migrate live") && m.contains("migrate without --live"),
        "{m}"
    );
    assert_eq!(command_count(&t).await, before);

    let (_, body) = action(&t, id, "{\"op\": \"destroy\"}").await;
    t.ok(body["command_id"].as_i64().unwrap()).await;
    let before = command_count(&t).await;
    let (status, err) = action(&t, id, "{\"op\": \"start\"}").await;
    assert_eq!(status, 409);
    let m = err["error"]["message"].as_str().unwrap();
    assert!(m.contains(&format!("container {id} is destroyed")), "{m}");
    assert_eq!(
        command_count(&t).await,
        before,
        "a refused request makes no command"
    );
}

/// Stop then start, submitted back to back without waiting: the start waits for the stop, then
/// finds the container stopped and starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_submitted_back_to_back_ends_running() {
    let t = TestCore::start(Opts {
        latency: std::time::Duration::from_millis(50),
        ..Opts::default()
    })
    .await
    .unwrap();
    let a: Accepted = t
        .client
        .post("/v1/containers", &json!({ "type": "plain" }))
        .await
        .unwrap();
    let id = t.created(a.command_id).await;
    let stop = act(&t, id, ContainerCommand::Stop {}).await;
    let start = act(&t, id, ContainerCommand::Start {}).await;
    t.ok(stop).await;
    t.ok(start).await;
    let c = t.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(c.status, ContainerStatus::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_answers_202_at_once_and_the_wait_option_blocks_until_done() {
    let t = TestCore::start(Opts {
        latency: std::time::Duration::from_millis(100),
        ..Opts::default()
    })
    .await
    .unwrap();
    let (status, body) = raw(&t, "POST", "/v1/containers", Some("{\"type\": \"plain\"}")).await;
    assert_eq!(status, 202);
    let id = body["command_id"].as_i64().unwrap();
    let (_, now) = raw(&t, "GET", &format!("/v1/commands/{id}"), None).await;
    assert_ne!(
        now["status"], "succeeded",
        "the answer came before the work was done"
    );
    let (_, done) = raw(&t, "GET", &format!("/v1/commands/{id}?wait=30"), None).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["kind"], "container.create");
    assert!(done.get("parent").is_some() && done.get("error").is_some());
}

/// Regression (hardening): the core listened only after resuming its commands and reconciling
/// every server. It answers at once; `GET /v1/health` (public) says `starting` until it is
/// ready, then `ready`, and names the core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_readiness_and_needs_no_credentials() {
    let t = TestCore::start(Opts {
        paused: true,
        auth: cloud48_engine::auth::AuthConfig {
            anonymous: cloud48_engine::auth::Anonymous::None,
            ..Default::default()
        },
        ..Opts::default()
    })
    .await
    .unwrap();
    let health = || async {
        let resp = reqwest::get(format!("{}/v1/health", t.url)).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<serde_json::Value>().await.unwrap())
    };
    // It names the core that answered.
    let node = t.core.queue().node_id().to_string();
    assert_eq!(
        health().await,
        (
            503,
            serde_json::json!({ "status": "starting", "node": node })
        )
    );
    let (status, _) = {
        let resp = reqwest::get(format!("{}/v1/servers", t.url)).await.unwrap();
        (resp.status().as_u16(), ())
    };
    assert_eq!(status, 403, "everything else still needs credentials");
    t.core.start().await.unwrap();
    assert_eq!(
        health().await,
        (200, serde_json::json!({ "status": "ready", "node": node }))
    );
}

/// `bench api` end to end, small: signed creates over real HTTP all succeed, and the report's
/// figures come from the commands' own times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_api_submits_signed_creates_that_all_succeed() {
    let report = cloud48_core::bench::api::run(&cloud48_core::bench::ApiBenchArgs {
        count: 300,
        clients: 4,
        rate: 0,
        servers: 4,
        postgres: None,
    })
    .await
    .unwrap();
    assert_eq!(report.succeeded, 300);
    assert!(report.accepted_per_sec > 0.0);
    assert!(
        report.p50_ms >= 0 && report.p99_ms >= report.p50_ms,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_axum_answers_itself_are_json_too() {
    let t = TestCore::start(Opts {
        paused: true,
        ..Opts::default()
    })
    .await
    .unwrap();
    // A method an endpoint does not take: 405 in JSON, naming it.
    let (status, body) = raw(&t, "PATCH", "/v1/environments", Some("{}")).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("PATCH is not allowed"), "{message}");
    // A body over the limit: 413 in JSON, saying what to do.
    let big = vec![0u8; (64 << 20) + 1];
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/plugins", t.url))
        .header("content-type", "application/wasm")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("64 MiB")
    );
}

/// An API client's trial: list endpoints refused an unknown query parameter, every other
/// endpoint ignored it. `POST /v1/containers?project=shop&count=3` created one container in
/// project default (the caller meant shop). Every operation of the document now refuses one it
/// does not take, before its handler runs (ids that do not exist: the refusal comes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_refuses_a_query_parameter_it_does_not_take() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "web" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let before = command_count(&t).await;
    let containers = t.core.containers().find(&Default::default(), None).await;
    let containers = containers.unwrap().len();

    let (_, doc) = raw(&t, "GET", "/v1/openapi.json", None).await;
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete: String = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    "nosuch-424242"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in ops.as_object().unwrap() {
            let method = method.to_uppercase();
            let body = (method == "POST" || method == "PUT").then_some("{}");
            let (status, err) = raw(&t, &method, &format!("{concrete}?bogus_param=1"), body).await;
            assert_eq!(status, 422, "{method} {path}: {err}");
            assert_eq!(err["error"]["code"], "invalid", "{method} {path}: {err}");
            assert_eq!(
                err["error"]["field"], "bogus_param",
                "{method} {path}: {err}"
            );
            let message = err["error"]["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!(
                    "unknown query parameter 'bogus_param': {method} {path} takes "
                )),
                "{method} {path}: {message}"
            );
            // The document says so.
            assert!(
                op["responses"].get("422").is_some(),
                "{method} {path}: 422 is not in the document"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked} operations");

    // The trial's requests: refused, saying where the parameter belongs.
    let (status, err) = raw(
        &t,
        "POST",
        "/v1/containers?project=shop&count=3",
        Some("{\"type\": \"plain\"}"),
    )
    .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["field"], "project", "{err}");
    assert_eq!(
        err["error"]["message"],
        "unknown query parameter 'project': POST /v1/containers takes no query parameters; \
         project belongs in the JSON body: {\"project\": ...}"
    );
    let (status, err) = raw(
        &t,
        "POST",
        "/v1/environments?project=shop",
        Some("{\"name\": \"shop-web\"}"),
    )
    .await;
    assert_eq!(status, 422, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("project belongs in the JSON body"),
        "{err}"
    );
    for path in [
        "/v1/environments/web?foo=1",
        "/v1/servers/sim-1?x=1",
        "/v1/health?x=1",
        "/metrics?x=1",
        "/v1/openapi.json?x=1",
        // Taken parameters, and one that is not.
        "/v1/containers?limit=5&foo=1",
        "/v1/commands/1?wait=0&foo=1",
    ] {
        let (status, err) = raw(&t, "GET", path, None).await;
        assert_eq!(status, 422, "{path}: {err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("unknown query parameter '"),
            "{path}: {err}"
        );
    }
    // What an operation takes still works; HEAD reads as GET; the console's pages are no
    // operation.
    for path in [
        "/v1/containers?limit=5&all=true",
        "/v1/environments/web",
        "/v1/servers/sim-1",
        "/?utm_source=mail",
    ] {
        let (status, err) = raw(&t, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {err}");
    }
    let head = reqwest::Client::new()
        .head(format!("{}/v1/environments/web?foo=1", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 422);
    // A method a path does not take is still a 405, whatever its query.
    let (status, _) = raw(&t, "PATCH", "/v1/environments?foo=1", Some("{}")).await;
    assert_eq!(status, 405);

    assert_eq!(
        command_count(&t).await,
        before,
        "nothing refused was submitted"
    );
    let now = t.core.containers().find(&Default::default(), None).await;
    assert_eq!(now.unwrap().len(), containers);
    assert!(
        t.core.environments().get_by_id("shop-web").await.is_err(),
        "no environment was made"
    );
}

/// A JSON body over the limit was answered 400 ("cannot read the body: ... length limit
/// exceeded"): the documented 413, with the JSON error saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_json_body_gets_413() {
    let t = TestCore::start(Opts {
        paused: true,
        ..Opts::default()
    })
    .await
    .unwrap();
    let mut big = String::from("{\"name\": \"");
    big.push_str(&"a".repeat((64 << 20) + 1));
    big.push_str("\"}");
    for path in ["/v1/environments", "/v1/containers"] {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", t.url))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "too_large", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("64 MiB"),
            "{body}"
        );
    }
}

/// The document against the real answers: an export answers a tar archive (binary, not an
/// array of integers) or, with `format=1`, JSON; `/v1/health` and `/metrics`, served and in
/// the README's table, are operations of the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_binary_bodies_exports_health_and_metrics() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let (_, doc) = raw(&t, "GET", "/v1/openapi.json", None).await;
    let binary = json!({ "type": "string", "format": "binary" });
    let export = &doc["paths"]["/v1/containers/{id}/export"]["get"]["responses"]["200"]["content"];
    assert_eq!(export["application/x-tar"]["schema"], binary, "{export}");
    assert_eq!(
        export["application/json"]["schema"]["$ref"], "#/components/schemas/ContainerExport",
        "{export}"
    );
    // No bytes anywhere described as numbers.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let bodies = op["responses"]
                .as_object()
                .unwrap()
                .values()
                .chain(op.get("requestBody"))
                .filter_map(|r| r["content"].as_object())
                .flatten();
            for (media, content) in bodies {
                if !media.contains("json") && !media.starts_with("text/") {
                    assert_eq!(content["schema"], binary, "{method} {path} {media}");
                }
            }
        }
    }
    let health = &doc["paths"]["/v1/health"]["get"];
    assert_eq!(health["security"], json!([{}]), "needs no credentials");
    for status in ["200", "503"] {
        assert_eq!(
            health["responses"][status]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Health"
        );
    }
    assert!(health["responses"].get("401").is_none());
    let metrics = &doc["paths"]["/metrics"]["get"];
    assert_eq!(
        metrics["responses"]["200"]["content"]["text/plain"]["schema"]["type"],
        "string"
    );
    assert_eq!(
        metrics["security"],
        json!([{}, { "digest": [] }, { "metrics_token": [] }])
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["metrics_token"]["scheme"],
        "bearer"
    );

    // What they answer is what the document says.
    let resp = reqwest::get(format!("{}/metrics", t.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain"), "{kind}");
    let (status, health) = raw(&t, "GET", "/v1/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ready");
    let a: Accepted = t
        .client
        .post("/v1/containers", &crate::common::plain(None))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let id = a.object_id.unwrap();
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    for (query, kind) in [("", "application/x-tar"), ("?format=1", "application/json")] {
        let resp = reqwest::get(format!("{}/v1/containers/{id}/export{query}", t.url))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        assert_eq!(resp.headers()["content-type"], kind, "{query}");
    }
}
