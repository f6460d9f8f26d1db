//! WIT 0.2.0 in the core: parameters, the new hooks and actions (after-other-is-down, tagged
//! exec and after-exec, set-params, hook errors), redis failover end to end on simulated
//! servers, and a component released for WIT 0.1.0 beside 0.2.0 ones in one environment.

use std::sync::{Arc, Mutex};

use cloud48_engine::model::{
    Accepted, Container, ContainerId, ContainerStatus, Environment, ParamKind, ParamSpec, Params,
    Requirements, Resources,
};
use cloud48_engine::types::{
    AddRequest, ContainerType, Hook, HookAction, HookContext, HookOutcome, TypeError,
};
use serde_json::json;

use crate::common::{Opts, TestCore, eventually};

mod upgrade;

async fn show(t: &TestCore, id: ContainerId) -> Container {
    t.client.get(&format!("/v1/containers/{id}")).await.unwrap()
}

async fn members(t: &TestCore, env: &str) -> Vec<Container> {
    let e: Environment = t
        .client
        .get(&format!("/v1/environments/{env}"))
        .await
        .unwrap();
    e.members
}

async fn new_env(t: &TestCore, name: &str) {
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": name }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
}

async fn add(t: &TestCore, env: &str, body: serde_json::Value) -> Accepted {
    t.client
        .post(&format!("/v1/environments/{env}/containers"), &body)
        .await
        .unwrap()
}

/// Scripts exec'd in a container on its simulated server: (script, args).
async fn execs(t: &TestCore, c: &Container) -> Vec<(String, Vec<String>)> {
    let Some(server) = c.server.as_deref() else {
        return Vec::new();
    };
    t.sim(server)
        .await
        .guest(&c.guest_id)
        .map(|g| g.execs.into_iter().map(|e| (e.script, e.args)).collect())
        .unwrap_or_default()
}

fn role(c: &Container) -> &str {
    c.params.get("role").map_or("", String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fails_over_to_a_replica_and_the_tomcats_follow_when_the_primary_s_server_fails() {
    let t = TestCore::start(Opts {
        sim_servers: 4,
        health: crate::common::fast_health(),
        ..Default::default()
    })
    .await
    .unwrap();
    new_env(&t, "cache").await;
    let a = add(&t, "cache", json!({ "type": "redis", "server": "sim-1" })).await;
    let primary_add = a.command_id;
    let primary = t.created(a.command_id).await;
    let redis = members(&t, "cache").await;
    let replicas: Vec<&Container> = redis.iter().filter(|c| c.id != primary).collect();
    assert_eq!(replicas.len(), 2, "the primary asked for two replicas");
    let mut servers: Vec<&str> = redis.iter().filter_map(|c| c.server.as_deref()).collect();
    servers.sort();
    servers.dedup();
    assert_eq!(servers.len(), 3, "spread: each redis on its own server");
    let p = show(&t, primary).await;
    let primary_ip = p.ip.clone().unwrap();
    for r in &replicas {
        assert_eq!(role(r), "replica");
        let last = execs(&t, r).await.pop().unwrap();
        assert_eq!(last.1, vec![primary_ip.clone(), "6379".to_string()]);
        // The tagged attach's result reached the replica's after-exec, which recorded it.
        let shown = show(&t, r.id).await;
        assert_eq!(
            shown.inspect.unwrap()["follows"],
            format!("{primary_ip}:6379")
        );
    }
    // A tomcat on the fourth server keeps its sessions on the primary.
    let a = add(
        &t,
        "cache",
        json!({ "type": "tomcat", "server": "sim-4", "params": { "heap-mb": "256" } }),
    )
    .await;
    let web = t.created(a.command_id).await;
    let w = show(&t, web).await;
    assert_eq!(w.params["heap-mb"], "256");
    assert_eq!(w.params["context-path"], "/", "defaults are filled in");
    // The server got the workload the type declares, with the parameters put in.
    let guest = t.sim("sim-4").await.guest(&w.guest_id).unwrap();
    assert_eq!(guest.workload.command, ["catalina.sh", "run"]);
    assert!(
        guest
            .workload
            .env
            .contains(&("CATALINA_OPTS".to_string(), "-Xmx256m".to_string())),
        "{:?}",
        guest.workload.env
    );
    assert_eq!(guest.workload.endpoints[0].port, 8080);
    assert_eq!(
        w.inspect.as_ref().unwrap()["sessions"],
        format!("{primary_ip}:6379")
    );

    // The primary's server fails: the replica with the lowest id takes over.
    let (ok, _, err) = crate::common::cli(&t.url, &["server", "fail", "sim-1"]);
    assert!(ok, "{err}");
    // Each replica's after-exec logged that it follows the primary, into the record of the
    // command that added it.
    let children: Vec<cloud48_engine::model::Command> = t
        .client
        .get(&format!("/v1/commands?parent={primary_add}"))
        .await
        .unwrap();
    let mut logged = Vec::new();
    for c in children.iter().filter(|c| c.kind == "environment.add") {
        let c: cloud48_engine::model::Command = t
            .client
            .get(&format!("/v1/commands/{}", c.id))
            .await
            .unwrap();
        logged.extend(c.log.into_iter().map(|l| (l.container, l.level, l.message)));
    }
    for r in &replicas {
        assert!(
            logged.contains(&(
                Some(r.id),
                "info".to_string(),
                format!("replica {} follows {primary_ip}:6379", r.id)
            )),
            "{logged:?}"
        );
    }
    let heir = replicas.iter().map(|r| r.id).min().unwrap();
    let new_primary = eventually("a replica promoted and a new replica attached", || async {
        let all = members(&t, "cache").await;
        let h = all.iter().find(|c| c.id == heir)?;
        let fresh = all.iter().find(|c| {
            c.type_id.starts_with("redis")
                && c.status == ContainerStatus::Running
                && c.id != primary
                && !replicas.iter().any(|r| r.id == c.id)
        })?;
        let follows = show(&t, fresh.id).await.inspect?["follows"].clone();
        (role(h) == "primary" && follows == format!("{}:6379", h.ip.as_ref()?)).then(|| h.clone())
    })
    .await;
    let new_ip = new_primary.ip.clone().unwrap();
    assert_eq!(show(&t, primary).await.status, ContainerStatus::Illegal);
    assert_eq!(role(&show(&t, primary).await), "replica");
    // Every script ran once: one promotion, one re-attach of the other replica, one re-point
    // of the tomcat's sessions.
    let promoted = execs(&t, &new_primary).await;
    assert_eq!(
        promoted
            .iter()
            .filter(|(s, _)| s.contains("replicaof no one"))
            .count(),
        1
    );
    let other = replicas.iter().find(|r| r.id != heir).unwrap();
    let other_execs = execs(&t, other).await;
    assert_eq!(other_execs.len(), 2, "{other_execs:?}");
    assert_eq!(other_execs[1].1, vec![new_ip.clone(), "6379".to_string()]);
    let web_execs = execs(&t, &show(&t, web).await).await;
    let sessions: Vec<_> = web_execs
        .iter()
        .filter(|(s, _)| s.contains("keep sessions in redis"))
        .map(|(_, a)| a.clone())
        .collect();
    assert_eq!(
        sessions,
        vec![
            vec![format!("{primary_ip}:6379")],
            vec![format!("{new_ip}:6379")]
        ]
    );
}

/// `cfg` takes parameters `level` (settable) and `name` (not); `setter` sets them on every
/// `cfg` that joins, as its environment's `mode` parameter says; `failing` returns a hook
/// error from `before-it-is-added`, retryable or not.
struct Native {
    name: &'static str,
    calls: Arc<Mutex<Vec<String>>>,
}

impl ContainerType for Native {
    fn type_id(&self) -> &str {
        self.name
    }
    fn priority(&self) -> i32 {
        match self.name {
            "cfg" => 10,
            _ => 20,
        }
    }
    fn default_requirements(&self) -> Requirements {
        Requirements {
            resources: Resources {
                cpu_millis: 100,
                memory_mb: 64,
                disk_mb: 64,
            },
            labels: Vec::new(),
            spread: false,
        }
    }
    fn param_specs(&self) -> Vec<ParamSpec> {
        if self.name != "cfg" {
            return Vec::new();
        }
        vec![
            ParamSpec {
                name: "level".into(),
                kind: ParamKind::Integer,
                default: Some("1".into()),
                description: "a level".into(),
                settable: true,
            },
            ParamSpec {
                name: "name".into(),
                kind: ParamKind::Text,
                default: None,
                description: "a name".into(),
                settable: false,
            },
        ]
    }
    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{}:{}", self.name, hook.name()));
        match (self.name, hook) {
            ("setter", Hook::AfterOtherIsAdded(o)) if o.type_id == "cfg" => {
                let change: Params = match ctx.environment.params.get("mode").map(String::as_str) {
                    Some("bad") => [("name".to_string(), "x".to_string())].into(),
                    _ => [("level".to_string(), "7".to_string())].into(),
                };
                Ok(HookOutcome {
                    actions: vec![HookAction::SetParams {
                        container: o.id,
                        params: change,
                    }],
                    ..HookOutcome::allow()
                })
            }
            ("failing", Hook::BeforeItIsAdded) => Err(TypeError {
                retryable: ctx.environment.name == "flaky",
                ..TypeError::new("failing", "before-it-is-added", "failed: no licence key")
            }),
            ("setter", Hook::AfterItIsAdded) if ctx.environment.name == "spawn" => {
                Ok(HookOutcome {
                    actions: vec![HookAction::AddContainer(AddRequest {
                        params: [("name".to_string(), "child".to_string())].into(),
                        ..AddRequest::of_type("cfg")
                    })],
                    ..HookOutcome::allow()
                })
            }
            _ => Ok(HookOutcome::allow()),
        }
    }
}

fn natives(calls: &Arc<Mutex<Vec<String>>>) -> Vec<Arc<dyn ContainerType>> {
    ["cfg", "setter", "failing"]
        .into_iter()
        .map(|name| {
            Arc::new(Native {
                name,
                calls: calls.clone(),
            }) as Arc<dyn ContainerType>
        })
        .collect()
}

/// A redis asking for more replicas than there are servers to spread them over: its add fails
/// at the first replica that fits nowhere, and says which containers it added before, as they
/// stay (the primary and the replicas placed), and how to remove them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_action_names_the_containers_added_before_it() {
    let t = TestCore::start(Opts {
        sim_servers: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    new_env(&t, "r1").await;
    let a = add(
        &t,
        "r1",
        json!({ "type": "redis", "params": { "replicas": "5" } }),
    )
    .await;
    let done = t.wait(a.command_id).await;
    assert_eq!(done.status, cloud48_engine::model::CommandStatus::Failed);
    let error = done.error.unwrap_or_default();
    let mut kept: Vec<ContainerId> = members(&t, "r1").await.iter().map(|c| c.id).collect();
    kept.sort();
    assert_eq!(
        kept.len(),
        4,
        "the primary and a replica on each other server"
    );
    let listed = kept
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    assert!(error.contains("(spread)"), "{error}");
    assert!(
        error.contains(&format!(
            "the containers added before it stay in 'r1': {listed}"
        )) && error.contains("cloud48 env remove r1 ID"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_checked_filled_in_and_set_only_where_the_type_allows() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: natives(&calls),
        max_attempts: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    new_env(&t, "conf").await;
    // Bad parameters are refused at the API, before any hook runs, saying what is wrong.
    for (params, want) in [
        (json!({}), "'name' is required"),
        (
            json!({ "name": "a", "colour": "red" }),
            "unknown parameter 'colour'",
        ),
        (
            json!({ "name": "a", "level": "high" }),
            "must be a decimal integer",
        ),
    ] {
        let err = t
            .client
            .post::<_, Accepted>(
                "/v1/environments/conf/containers",
                &json!({ "type": "cfg", "params": params }),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want) && err.contains("HTTP 4"), "{err}");
    }
    assert!(
        calls.lock().unwrap().is_empty(),
        "no hook ran for a bad request"
    );
    // `setter` raises the level of a cfg that joins (settable).
    t.created(
        add(&t, "conf", json!({ "type": "setter" }))
            .await
            .command_id,
    )
    .await;
    let a = add(
        &t,
        "conf",
        json!({ "type": "cfg", "params": { "name": "a" } }),
    )
    .await;
    let cfg = t.created(a.command_id).await;
    let c = show(&t, cfg).await;
    assert_eq!(c.params["level"], "7", "set by the setter's hook");
    assert_eq!(c.params["name"], "a");
    let (_, out, _) = crate::common::cli(&t.url, &["container", "show", &cfg.to_string()]);
    assert!(out.contains("level=7") && out.contains("name=a"), "{out}");

    // A hook-added container gets the parameters the hook gave.
    new_env(&t, "spawn").await;
    t.created(
        add(&t, "spawn", json!({ "type": "setter" }))
            .await
            .command_id,
    )
    .await;
    let child = members(&t, "spawn")
        .await
        .into_iter()
        .find(|c| c.type_id == "cfg")
        .unwrap();
    assert_eq!(child.params["name"], "child");
    assert_eq!(child.params["level"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_error_fails_its_command_with_the_plugin_s_message_and_a_retryable_one_is_retried() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: natives(&calls),
        max_attempts: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    for env in ["firm", "flaky"] {
        new_env(&t, env).await;
        let a = add(&t, env, json!({ "type": "failing" })).await;
        let cmd = t.wait(a.command_id).await;
        let error = cmd.error.unwrap_or_default();
        assert!(error.contains("no licence key"), "{error}");
        assert!(members(&t, env).await.is_empty(), "nothing was created");
    }
    let tries = |env_calls: &[String]| {
        env_calls
            .iter()
            .filter(|c| *c == "failing:before-it-is-added")
            .count()
    };
    // One call for the firm refusal, then three attempts for the retryable one.
    assert_eq!(tries(&calls.lock().unwrap()), 1 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_params_on_a_parameter_the_type_keeps_fails_the_command_and_changes_nothing() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: natives(&calls),
        ..Default::default()
    })
    .await
    .unwrap();
    let a: Accepted = t
        .client
        .post(
            "/v1/environments",
            &json!({ "name": "strict", "params": { "mode": "bad" } }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    t.created(
        add(&t, "strict", json!({ "type": "setter" }))
            .await
            .command_id,
    )
    .await;
    let a = add(
        &t,
        "strict",
        json!({ "type": "cfg", "params": { "name": "a" } }),
    )
    .await;
    let cmd = t.wait(a.command_id).await;
    let error = cmd.error.unwrap_or_default();
    assert!(
        error.contains("parameter 'name' is not settable"),
        "{error}"
    );
    let cfg = members(&t, "strict")
        .await
        .into_iter()
        .find(|c| c.type_id == "cfg")
        .unwrap();
    assert_eq!(cfg.params["name"], "a", "unchanged");
}

/// The released 0.1.0 mysql and the bundled 0.2.0 tomcat work together: the tomcat reads the
/// old database's address (with the defaults it ran with) and the old component's deny still
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wit_0_1_0_component_and_0_2_0_ones_share_an_environment() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    t.client.delete_empty("/v1/plugins/mysql").await.unwrap();
    let wasm = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/wit-0.1.0/mysql.wasm"),
    )
    .unwrap();
    let info: cloud48_engine::plugins::PluginInfo = t
        .client
        .send_wasm(reqwest::Method::POST, "/v1/plugins", wasm)
        .await
        .unwrap();
    assert_eq!(info.meta.wit_version, "0.1.0");
    assert!(info.meta.params.is_empty() && info.meta.workload.is_empty());
    new_env(&t, "mixed").await;
    let db = t
        .created(
            add(&t, "mixed", json!({ "type": "mysql" }))
                .await
                .command_id,
        )
        .await;
    let db_ip = show(&t, db).await.ip.unwrap();
    let web = t
        .created(
            add(&t, "mixed", json!({ "type": "tomcat" }))
                .await
                .command_id,
        )
        .await;
    let w = show(&t, web).await;
    assert_eq!(
        w.inspect.as_ref().unwrap()["database"],
        format!("jdbc:mysql://{db_ip}:3306/app")
    );
    assert_eq!(
        execs(&t, &w).await.last().unwrap().1,
        vec![format!("jdbc:mysql://{db_ip}:3306/app")]
    );
    // The 0.1.0 database still denies its removal while a tomcat uses it.
    let a: Accepted = t
        .client
        .delete(&format!("/v1/environments/mixed/containers/{db}"))
        .await
        .unwrap();
    let cmd = t.wait(a.command_id).await;
    assert!(
        cmd.error.unwrap_or_default().contains("use this database"),
        "the 0.1.0 hook still denies"
    );
    // Removing the tomcat runs the 0.1.0 mysql's after-other-is-removed and the tomcat's new
    // after-it-is-removed; the database stays.
    let a: Accepted = t
        .client
        .delete(&format!("/v1/environments/mixed/containers/{web}"))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let left: Vec<ContainerId> = members(&t, "mixed").await.iter().map(|c| c.id).collect();
    assert_eq!(left, vec![db]);
}

/// What a plugin logs lands in its command's record, bounded per hook call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_s_log_is_kept_with_its_command_and_bounded() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let _: cloud48_engine::plugins::PluginInfo = t
        .client
        .send_wasm(
            reqwest::Method::POST,
            "/v1/plugins",
            hostile(cloud48_engine::plugins::TEST_PLUGINS),
        )
        .await
        .unwrap();
    new_env(&t, "chatty").await;
    let a = add(&t, "chatty", json!({ "type": "hostile" })).await;
    t.created(a.command_id).await;
    let cmd: cloud48_engine::model::Command = t
        .client
        .get(&format!("/v1/commands/{}", a.command_id))
        .await
        .unwrap();
    assert_eq!(cmd.log.len(), 101, "100 lines and a note of the rest");
    assert_eq!(cmd.log[0].message, "line 0");
    assert_eq!(
        cmd.log[0].container, None,
        "the new container had no id yet"
    );
    assert!(
        cmd.log[100].message.contains("900 more lines dropped"),
        "{:?}",
        cmd.log[100]
    );
    let (_, out, _) = crate::common::cli(&t.url, &["command", "show", &a.command_id.to_string()]);
    assert!(out.contains("new container info: line 99"), "{out}");
}

fn hostile(dir: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(dir).join("cloud48_plugin_hostile.wasm"))
        .expect("test plugin built by core/engine/build.rs")
}
