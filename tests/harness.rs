//! The SDK's test harness and the core agree: the same scenario, run on the same compiled
//! plugins through the core (persisted commands, simulated servers) and through the SDK's
//! `Platform` (what `cloud48 plugin test` and vendors' own tests use), makes the same hook calls,
//! in the same order, with the same containers and the same members in view.

use std::sync::{Arc, Mutex};

use cloud48_engine::managers::AddContainer;
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::Requirements;
use cloud48_engine::plugins::harness::WasmHooks;
use cloud48_engine::plugins::{BUNDLED, PluginHost, WasmPlugin};
use cloud48_engine::types::{ContainerType, Hook, HookContext, HookOutcome, TypeError};
use cloud48_sdk::testing::Platform;

use crate::common::{Opts, TestCore};

/// A container type that records each hook call, then lets the plugin handle it.
struct Recorded {
    plugin: Arc<WasmPlugin>,
    log: Arc<Mutex<Vec<String>>>,
}

impl ContainerType for Recorded {
    fn type_id(&self) -> &str {
        self.plugin.type_id()
    }
    fn priority(&self) -> i32 {
        self.plugin.priority()
    }
    fn default_requirements(&self) -> Requirements {
        self.plugin.default_requirements()
    }
    fn initial_state(&self) -> Result<Vec<u8>, TypeError> {
        self.plugin.initial_state()
    }
    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        let other = match hook {
            Hook::BeforeOtherIsAdded(o)
            | Hook::AfterOtherIsAdded(o)
            | Hook::BeforeOtherIsRemoved(o)
            | Hook::AfterOtherIsRemoved(o)
            | Hook::AfterOtherIsDown(o, _)
            | Hook::AfterOtherIsUp(o) => {
                format!("({}#{} {:?})", o.type_id, o.id, o.params)
            }
            _ => String::new(),
        };
        let mut members: Vec<String> = ctx
            .environment
            .members
            .iter()
            .map(|m| format!("{}#{}", m.type_id, m.id))
            .collect();
        members.sort();
        self.log.lock().unwrap().push(format!(
            "{}#{} {}{other} sees [{}]",
            ctx.container.type_id,
            ctx.container.id,
            hook.name(),
            members.join(", ")
        ));
        self.plugin.handle(hook, ctx)
    }
    fn inspect(&self, state: &[u8]) -> Result<serde_json::Value, TypeError> {
        self.plugin.inspect(state)
    }
    fn workload(&self) -> cloud48_engine::model::Workload {
        self.plugin.workload()
    }
    fn endpoints(&self) -> Vec<cloud48_engine::model::Endpoint> {
        self.plugin.endpoints()
    }
    fn param_specs(&self) -> Vec<cloud48_engine::model::ParamSpec> {
        self.plugin.param_specs()
    }
}

/// The bundled tomcat, balancer and redis, each wrapped to record into `log`.
fn recorded(log: &Arc<Mutex<Vec<String>>>) -> Vec<(Arc<WasmPlugin>, Arc<dyn ContainerType>)> {
    let host = PluginHost::new(None, Default::default()).unwrap();
    BUNDLED
        .iter()
        .filter(|(name, _)| ["tomcat", "balancer", "redis"].contains(name))
        .map(|(_, wasm)| {
            let plugin = Arc::new(host.load(wasm).unwrap());
            let t: Arc<dyn ContainerType> = Arc::new(Recorded {
                plugin: plugin.clone(),
                log: log.clone(),
            });
            (plugin, t)
        })
        .collect()
}

/// The scenario: three tomcats with their own heap sizes (the second brings a balancer), then
/// the first one leaves (before-it-is-removed, before-other-is-removed, after-it-is-removed,
/// after-other-is-removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_harness_makes_the_same_hook_calls_as_the_core() {
    // Through the core.
    let core_log = Arc::new(Mutex::new(Vec::new()));
    let types = recorded(&core_log).into_iter().map(|(_, t)| t).collect();
    let t = TestCore::start(Opts {
        types,
        ..Opts::default()
    })
    .await
    .unwrap();
    let envs = t.core.environments();
    let (cmd, _) = envs.create("shop", "test").await.unwrap();
    t.ok(cmd).await;
    let tomcat = AddContainer {
        type_id: "tomcat".into(),
        requirements: None,
        server: None,
        params: Default::default(),
    };
    let mut tomcats = Vec::new();
    for heap in ["256", "512", "768"] {
        let tomcat = AddContainer {
            params: [("heap-mb".to_string(), heap.to_string())].into(),
            ..tomcat.clone()
        };
        tomcats.push(
            t.created(envs.add("shop", &tomcat, "test").await.unwrap())
                .await,
        );
    }
    t.ok(envs.remove("shop", tomcats[0], "test").await.unwrap())
        .await;

    // Through the SDK's Platform, on the same plugins.
    let sdk_log = Arc::new(Mutex::new(Vec::new()));
    let hooks = recorded(&sdk_log)
        .into_iter()
        .fold(WasmHooks::default(), |h, (plugin, t)| {
            h.with_type(plugin.meta().clone(), t)
        });
    let mut p = Platform::new(hooks);
    let mut ids = Vec::new();
    for heap in [256, 512, 768] {
        ids.push(
            p.add_request(cloud48_sdk::AddRequest::of("tomcat").param("heap-mb", heap))
                .unwrap(),
        );
    }
    p.remove(ids[0]).unwrap();

    // Ids are given in the same order on both (the new container is #0 before it exists).
    assert_eq!(
        tomcats,
        ids.iter().map(|i| ContainerId(*i)).collect::<Vec<_>>(),
        "containers numbered alike"
    );
    let core_log = core_log.lock().unwrap().clone();
    let sdk_log = sdk_log.lock().unwrap().clone();
    assert!(core_log.len() > 10, "{core_log:#?}");
    for hook in ["before-other-is-removed", "after-it-is-removed"] {
        assert!(
            core_log.iter().any(|l| l.contains(hook)),
            "{hook} ran: {core_log:#?}"
        );
    }
    assert_eq!(
        sdk_log, core_log,
        "the SDK harness (left) and the core (right) disagree"
    );
}

/// A failover: a redis primary with one replica and a tomcat; the primary's server fails. The
/// core (health monitor, `environment.failover`, the replacement) and the SDK's `Platform`
/// make the same hook calls: `is-down`, every `after-other-is-down`, the promotion's actions,
/// the replacement's add hooks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_harness_and_the_core_agree_on_a_failover() {
    let core_log = Arc::new(Mutex::new(Vec::new()));
    let types = recorded(&core_log).into_iter().map(|(_, t)| t).collect();
    let t = TestCore::start(Opts {
        types,
        health: crate::common::fast_health(),
        ..Opts::default()
    })
    .await
    .unwrap();
    let envs = t.core.environments();
    let (cmd, _) = envs.create("shop", "test").await.unwrap();
    t.ok(cmd).await;
    let add = |type_id: &str, server: &str, params: &[(&str, &str)]| AddContainer {
        type_id: type_id.into(),
        requirements: None,
        server: Some(server.into()),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    // The Platform places round robin by id: the primary (1) on s1, its replica (2) on s2, the
    // tomcat (3) on s3; the core is told the same servers (the replica by spread: not sim-1).
    let primary = t
        .created(
            envs.add("shop", &add("redis", "sim-1", &[("replicas", "1")]), "test")
                .await
                .unwrap(),
        )
        .await;
    t.created(
        envs.add("shop", &add("tomcat", "sim-3", &[]), "test")
            .await
            .unwrap(),
    )
    .await;
    let (ok, _, err) = crate::common::cli(&t.url, &["server", "fail", "sim-1"]);
    assert!(ok, "{err}");
    crate::common::eventually("the failover and the replacement end", || async {
        let cmds: Vec<cloud48_engine::model::Command> =
            t.client.get("/v1/commands?limit=100").await.ok()?;
        let failover = cmds.iter().any(|c| c.kind == "environment.failover");
        (failover && cmds.iter().all(|c| c.status.is_terminal())).then_some(())
    })
    .await;

    let sdk_log = Arc::new(Mutex::new(Vec::new()));
    let hooks = recorded(&sdk_log)
        .into_iter()
        .fold(WasmHooks::default(), |h, (plugin, t)| {
            h.with_type(plugin.meta().clone(), t)
        });
    let mut p = Platform::new(hooks);
    let first = p
        .add_request(cloud48_sdk::AddRequest::of("redis").param("replicas", 1))
        .unwrap();
    assert_eq!(ContainerId(first), primary);
    p.add("tomcat").unwrap();
    p.crash_server("s1").unwrap();

    let core_log = core_log.lock().unwrap().clone();
    let sdk_log = sdk_log.lock().unwrap().clone();
    assert!(
        core_log.iter().any(|l| l.contains("after-other-is-down")),
        "{core_log:#?}"
    );
    assert_eq!(
        sdk_log, core_log,
        "the SDK harness (left) and the core (right) disagree"
    );
}
