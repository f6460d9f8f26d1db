//! WASM container types: the seed scenario through the CLI, hostile plugins, plugin lifecycle,
//! a crash in the middle of a hook's actions.

use std::time::Duration;

use cloud48_core::cli::Client;
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{Accepted, Command, CommandStatus, Container, Environment};
use cloud48_engine::plugins::PluginInfo;
use serde_json::{Value, json};

use crate::common::{Opts, TestCore, cli};

mod tools;

fn test_plugin(dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(dir).join(format!("cloud48_plugin_{name}.wasm")))
        .expect("test plugin built by core/build.rs")
}

fn hostile() -> Vec<u8> {
    test_plugin(cloud48_engine::plugins::TEST_PLUGINS, "hostile")
}

/// Creates environment `env` and submits the add of a hostile container to it.
async fn add_hostile(t: &TestCore, env: &str) -> Accepted {
    let (c, _) = t.core.environments().create(env, "test").await.unwrap();
    t.ok(c).await;
    t.client
        .post(
            &format!("/v1/environments/{env}/containers"),
            &json!({ "type": "hostile" }),
        )
        .await
        .unwrap()
}

/// A core with the hostile plugin installed and one of its containers in environment `calm`.
async fn hostile_in_calm() -> (TestCore, ContainerId) {
    let t = TestCore::start(Opts::default()).await.unwrap();
    install(&t, hostile()).await.unwrap();
    let a = add_hostile(&t, "calm").await;
    let id = t.created(a.command_id).await;
    (t, id)
}

/// The versions of plugin `name` installed, as type ids.
async fn installed(t: &TestCore, name: &str) -> Vec<String> {
    let all: Vec<PluginInfo> = t.client.get("/v1/plugins").await.unwrap();
    all.into_iter()
        .filter(|p| p.meta.name == name)
        .map(|p| p.type_id)
        .collect()
}

async fn install(t: &TestCore, wasm: Vec<u8>) -> anyhow::Result<PluginInfo> {
    t.client
        .send_wasm(reqwest::Method::POST, "/v1/plugins", wasm)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_through_the_cli() {
    let dir = crate::common::tempdir();
    let serve = crate::common::serve(
        &dir.path().join("data"),
        &["--sim-servers", "3", "--anonymous", "full"],
    )
    .await;
    let url = serve.url.clone();
    let run = move |args: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                cli(&url, &refs)
            })
            .await
            .unwrap()
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let json =
        |out: &str| serde_json::from_str::<Value>(out).unwrap_or_else(|e| panic!("{e}: {out}"));

    let (ok, out, _) = run(s(&["--json", "plugin", "list"])).await;
    assert!(ok);
    let types: Vec<String> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "balancer@1.0.0",
            "mysql@1.0.0",
            "redis@1.0.0",
            "tomcat@1.0.0"
        ],
        "bundled plugins are installed on first start"
    );

    assert!(run(s(&["env", "create", "shop", "--wait"])).await.0);
    let (ok, out, err) = run(s(&[
        "--json", "env", "add", "shop", "--type", "tomcat", "--wait",
    ]))
    .await;
    assert!(ok, "{err}");
    let t1 = ContainerId(json(&out)["result"]["container_id"].as_i64().unwrap());
    let (_, out, _) = run(s(&["--json", "env", "show", "shop"])).await;
    assert_eq!(
        json(&out)["members"].as_array().unwrap().len(),
        1,
        "one tomcat needs no balancer"
    );

    let (ok, out, err) = run(s(&[
        "--json", "env", "add", "shop", "--type", "tomcat", "--wait",
    ]))
    .await;
    assert!(ok, "{err}");
    let t2 = ContainerId(json(&out)["result"]["container_id"].as_i64().unwrap());
    let (_, out, _) = run(s(&["--json", "env", "show", "shop"])).await;
    let env: Environment = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = env.members.iter().map(|m| m.type_id.as_str()).collect();
    assert_eq!(kinds, ["balancer@1.0.0", "tomcat@1.0.0", "tomcat@1.0.0"]);
    let lb = env.members[0].id;
    assert!(lb < t2, "the balancer was created before the second tomcat");
    let ip = |id: ContainerId| {
        env.members
            .iter()
            .find(|m| m.id == id)
            .unwrap()
            .ip
            .clone()
            .unwrap()
    };

    let (_, out, _) = run(s(&["--json", "container", "show", &lb.to_string()])).await;
    let shown: Container = serde_json::from_str(&out).unwrap();
    let inspect = shown.inspect.unwrap();
    assert_eq!(
        inspect["upstreams"],
        json!([format!("{}:8080", ip(t1)), format!("{}:8080", ip(t2))])
    );
    assert_eq!(inspect["reloads"], 2);
    assert_eq!(shown.execs.len(), 2, "two nginx reloads ran");
    assert_eq!(
        shown.execs[0].args,
        vec![format!("{}:8080", ip(t1))],
        "first the one bound tomcat"
    );
    assert_eq!(shown.execs[1].args.len(), 2, "then both");
    assert!(shown.execs[0].script.contains("nginx"));
    let (_, human, _) = run(s(&["container", "show", &lb.to_string()])).await;
    assert!(
        human.contains("upstreams") && human.contains("scripts run: 2"),
        "{human}"
    );

    let (ok, _, err) = run(s(&["env", "remove", "shop", &t1.to_string(), "--wait"])).await;
    assert!(ok, "{err}");
    let (_, out, _) = run(s(&["--json", "container", "show", &lb.to_string()])).await;
    let shown: Container = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shown.inspect.unwrap()["upstreams"],
        json!([format!("{}:8080", ip(t2))]),
        "the removed tomcat was deregistered"
    );
    assert_eq!(shown.execs.len(), 3);

    // Denial with the plugin's reason, nothing created.
    assert!(
        run(s(&["env", "add", "shop", "--type", "mysql", "--wait"]))
            .await
            .0
    );
    let (ok, _, err) = run(s(&["env", "add", "shop", "--type", "mysql", "--wait"])).await;
    assert!(
        !ok && err.contains("this environment already has a mysql database"),
        "{err}"
    );
    let (_, out, _) = run(s(&["--json", "env", "show", "shop"])).await;
    assert_eq!(json(&out)["members"].as_array().unwrap().len(), 3);
    // The remaining tomcat was configured with the database's address.
    let (_, out, _) = run(s(&["--json", "container", "show", &t2.to_string()])).await;
    assert!(json(&out)["inspect"]["database"].is_string(), "{out}");

    let (ok, _, err) = run(s(&["plugin", "remove", "tomcat"])).await;
    assert!(
        !ok && err.contains("destroy them before removing the plugin"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_command_runs_the_seed_scenario() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(crate::common::binary())
            .arg("demo")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("asked for a balancer first"), "{text}");
    assert!(text.contains("\"reloads\":3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_fail_their_command_with_a_clear_error_and_the_core_keeps_working() {
    // A deadline the memory bomb cannot reach before its memory limit, even on a loaded
    // machine (with the default 100 ms it sometimes did).
    let opts = Opts {
        plugin_deadline: Some(Duration::from_secs(2)),
        ..Opts::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    let info = install(&t, hostile()).await.unwrap();
    assert_eq!(info.type_id, "hostile@0.1.0");
    let cases: [(&str, &[&str]); 6] = [
        ("loop", &["exceeded its deadline of 2000 ms"]),
        ("fail", &["failed: hostile plugin refuses to work"]),
        ("bomb", &["exceeded its memory limit of 64 MiB"]),
        // With the panic's message, which the plugin wrote to its standard error before the trap.
        (
            "trap",
            &["trapped: wasm trap", "hostile plugin panics on purpose"],
        ),
        ("huge", &["oversized output"]),
        ("spam", &["10000 actions (limit 64)"]),
    ];
    for (env, causes) in cases {
        let a = add_hostile(&t, env).await;
        let cmd = t.wait(a.command_id).await;
        assert_eq!(cmd.status, CommandStatus::Failed);
        let err = cmd.error.unwrap();
        assert!(
            err.contains("hostile@0.1.0")
                && err.contains("before-it-is-added")
                && causes.iter().all(|c| err.contains(c)),
            "{env}: {err}"
        );
        // What the hook logged before it failed is kept with the command.
        let logged = match env {
            "trap" => vec![("warn", "about to panic")],
            "fail" => vec![("error", "no licence key")],
            _ => vec![],
        };
        let cmd: Command = t
            .client
            .get(&format!("/v1/commands/{}", a.command_id))
            .await
            .unwrap();
        let log: Vec<(&str, &str)> = cmd
            .log
            .iter()
            .map(|l| (l.level.as_str(), l.message.as_str()))
            .collect();
        assert_eq!(log, logged, "{env}");
    }
    let hostile_rows: Vec<Container> = t
        .client
        .get("/v1/containers?all=true&type=hostile")
        .await
        .unwrap();
    assert!(
        hostile_rows.is_empty(),
        "no failed hook left a container behind"
    );
    // An action the core refuses fails the add, saying who asked and what the add left.
    let a = add_hostile(&t, "stray").await;
    let cmd = t.wait(a.command_id).await;
    let err = cmd.error.unwrap_or_default();
    let env: Environment = t.client.get("/v1/environments/stray").await.unwrap();
    let added = env
        .members
        .first()
        .map(|m| m.id.0)
        .unwrap_or_else(|| panic!("the added container stays: {err}; {env:?}"));
    assert!(
        err.contains("a hook asked to remove container 999999, which is not a member of 'stray'")
            && err.contains(&format!(
                "(asked by a hook of container {added}, hostile@0.1.0)"
            ))
            && err.contains(&format!("stay in 'stray': {added}")),
        "{err}"
    );
    // The core still serves, and the same plugin still works where it behaves.
    let a = add_hostile(&t, "calm").await;
    t.ok(a.command_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_bad_components_and_incompatible_wit_versions() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let err = install(
        &t,
        test_plugin(cloud48_engine::plugins::TEST_PLUGINS_FUTURE, "hostile"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("targets WIT version 9.0.0")
            && err.contains("supported: 0.2.0, 0.1.0")
            && err.contains("HTTP 422"),
        "{err}"
    );
    let err = install(
        &t,
        test_plugin(cloud48_engine::plugins::TEST_PLUGINS, "hostile_import"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("needs something the host does not give plugins")
            && err.contains("cloud48-test:evil/net"),
        "{err}"
    );
    // Each kind of wrong upload gets one line saying what it is and how to make a component.
    for (bytes, says) in [
        (b"hello, world".to_vec(), "not WebAssembly"),
        (
            b"\0asm\x01\0\0\0garbage".to_vec(),
            "core WebAssembly module, not a component",
        ),
        (
            b"\0asm\x0d\0\x01\0garbage".to_vec(),
            "not a valid WASM component",
        ),
    ] {
        let err = install(&t, bytes).await.unwrap_err().to_string();
        assert!(err.contains(says) && !err.contains('\n'), "{err}");
    }
    // The very component installed (the bundled tomcat).
    let bundled = cloud48_engine::plugins::BUNDLED
        .iter()
        .find(|(name, _)| *name == "tomcat")
        .unwrap()
        .1;
    let err = install(&t, bundled.to_vec()).await.unwrap_err().to_string();
    assert!(
        err.contains("tomcat@1.0.0 is already installed: nothing to do")
            && err.contains("HTTP 409"),
        "{err}"
    );
    // An older version: neither install nor upgrade takes it, and both say how to go back.
    let older = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/wit-0.1.0/tomcat.wasm"),
    )
    .unwrap();
    let err = install(&t, older.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("installed in version 1.0.0, newer than 0.2.0")
            && err.contains("`cloud48 plugin remove tomcat`")
            && !err.contains("plugin upgrade"),
        "{err}"
    );
    let err = t
        .client
        .send_wasm::<serde_json::Value>(reqwest::Method::PUT, "/v1/plugins/tomcat", older)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tomcat@0.2.0 is not newer than the installed 1.0.0")
            && err.contains("`cloud48 plugin remove tomcat`"),
        "{err}"
    );
    // The installed version as an upgrade, an upgrade of a plugin not installed, another
    // build under an installed version: each says what to do.
    let tomcat = test_plugin(cloud48_engine::plugins::TEST_PLUGINS, "tomcat");
    let put = |path: &'static str, wasm: Vec<u8>| {
        let client = &t.client;
        async move {
            client
                .send_wasm::<serde_json::Value>(reqwest::Method::PUT, path, wasm)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let err = put("/v1/plugins/tomcat", tomcat.clone()).await;
    assert!(
        err.contains("tomcat@1.0.0 is the version installed") && err.contains("higher version"),
        "{err}"
    );
    let err = put("/v1/plugins/nosuch", tomcat).await;
    assert!(
        err.contains("plugin 'nosuch' is not installed") && err.contains("HTTP 404"),
        "{err}"
    );
    install(&t, hostile()).await.unwrap();
    let rebuilt = test_plugin(
        cloud48_engine::plugins::TEST_PLUGINS_INITIAL_TRAP,
        "hostile",
    );
    let err = install(&t, rebuilt).await.unwrap_err().to_string();
    assert!(
        err.contains("hostile@0.1.0 is installed from another build")
            && err.contains("higher version"),
        "{err}"
    );
    // Removal by name@version, as `plugin show` takes it; a built-in type is not a plugin.
    for (path, says) in [
        (
            "/v1/plugins/plain",
            "'plain' is a built-in type, not a plugin",
        ),
        (
            "/v1/plugins/hostile@9.9.9",
            "installed in version 0.1.0, not 9.9.9",
        ),
    ] {
        let err = t.client.delete_empty(path).await.unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
    t.client
        .delete_empty("/v1/plugins/hostile@0.1.0")
        .await
        .unwrap();
    let list: Vec<PluginInfo> = t.client.get("/v1/plugins").await.unwrap();
    assert_eq!(list.len(), 4, "nothing was installed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_moves_containers_and_migrates_their_state_and_remove_needs_none_left() {
    let (t, id) = hostile_in_calm().await;
    // A standalone container asked for by the type's bare name is of the installed version.
    let a: Accepted = t
        .client
        .post("/v1/containers", &json!({ "type": "hostile" }))
        .await
        .unwrap();
    let alone = t.created(a.command_id).await;
    let c: Container = t
        .client
        .get(&format!("/v1/containers/{alone}"))
        .await
        .unwrap();
    assert_eq!(c.type_id, "hostile@0.1.0");
    let newer = test_plugin(cloud48_engine::plugins::TEST_PLUGINS_NEWER, "hostile");
    let err = t
        .client
        .send_wasm::<Accepted>(reqwest::Method::PUT, "/v1/plugins/tomcat", newer.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the component is plugin 'hostile', not 'tomcat'"),
        "{err}"
    );
    let a: Accepted = t
        .client
        .send_wasm(reqwest::Method::PUT, "/v1/plugins/hostile", newer)
        .await
        .unwrap();
    let done = t.ok(a.command_id).await;
    assert_eq!(done.kind, "plugin.upgrade");
    let info: PluginInfo = t.client.get("/v1/plugins/hostile").await.unwrap();
    assert_eq!(info.type_id, "hostile@0.1.1");
    assert_eq!(
        info.containers, 2,
        "the member and the standalone one moved"
    );
    for c in [id, alone] {
        let c: Container = t.client.get(&format!("/v1/containers/{c}")).await.unwrap();
        assert_eq!(c.type_id, "hostile@0.1.1");
        assert_eq!(
            c.params.get("size").map(String::as_str),
            Some("64"),
            "the new version's parameter, with its default"
        );
    }
    use sea_orm::EntityTrait;
    let row = cloud48_engine::entities::container::Entity::find_by_id(id.0)
        .one(t.core.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.state, b"0.1.0->0.1.1:v0",
        "migrate-state of the new version converted the blob"
    );
    let err = t
        .client
        .delete_empty("/v1/plugins/hostile")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 container(s) of type hostile@0.1.1 exist"),
        "{err}"
    );
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{alone}/actions"),
            &json!({ "op": "destroy" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let a: Accepted = t
        .client
        .submit::<()>(&format!("/v1/environments/calm/containers/{id}"), None)
        .await
        .unwrap();
    t.ok(a.command_id).await;
    t.client.delete_empty("/v1/plugins/hostile").await.unwrap();
    let err = t
        .client
        .get::<PluginInfo>("/v1/plugins/hostile")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not installed"), "{err}");
}

/// An upgrade whose new version requires a parameter existing containers lack is refused,
/// naming it; two upgrades submitted from one version leave one version installed (the second
/// says another came first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_adding_a_required_parameter_or_racing_another_changes_nothing() {
    let (t, id) = hostile_in_calm().await;
    let required = test_plugin(cloud48_engine::plugins::TEST_PLUGINS_REQUIRED, "hostile");
    let a: Accepted = t
        .client
        .send_wasm(reqwest::Method::PUT, "/v1/plugins/hostile", required)
        .await
        .unwrap();
    let cmd = t.wait(a.command_id).await;
    let error = cmd.error.unwrap_or_default();
    assert!(
        error.contains(&format!("container {id} (hostile@0.1.0)"))
            && error.contains("requires parameter 'needed'")
            && error.contains("nothing was changed"),
        "{error}"
    );
    let c: Container = t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    assert_eq!(c.type_id, "hostile@0.1.0");

    // Two upgrades from 0.1.0, claimed together.
    let t = TestCore::start(Opts {
        paused: true,
        ..Opts::default()
    })
    .await
    .unwrap();
    install(&t, hostile()).await.unwrap();
    let newer = test_plugin(cloud48_engine::plugins::TEST_PLUGINS_NEWER, "hostile");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let a: Accepted = t
            .client
            .send_wasm(reqwest::Method::PUT, "/v1/plugins/hostile", newer.clone())
            .await
            .unwrap();
        ids.push(a.command_id);
    }
    t.core.start().await.unwrap();
    let mut errors = Vec::new();
    for id in ids {
        let cmd = t.wait(id).await;
        if cmd.status != CommandStatus::Succeeded {
            errors.push(cmd.error.unwrap_or_default());
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("plugin hostile is no longer at 0.1.0")
            && errors[0].contains("at 0.1.1 now")
            && errors[0].contains("nothing was changed"),
        "{}",
        errors[0]
    );
    assert_eq!(installed(&t, "hostile").await, ["hostile@0.1.1"]);
}

/// Installs of three versions of a plugin not yet installed, sent together, leave one version
/// installed and refuse the others, saying which is installed (the check and the insert were
/// apart, and all three went in).
async fn installs_racing(postgres: bool) {
    let Some(t) = TestCore::start(Opts {
        postgres,
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    use cloud48_engine::plugins::{TEST_PLUGINS_NEWER, TEST_PLUGINS_REQUIRED};
    let (a, b, c) = tokio::join!(
        install(&t, hostile()),
        install(&t, test_plugin(TEST_PLUGINS_NEWER, "hostile")),
        install(&t, test_plugin(TEST_PLUGINS_REQUIRED, "hostile")),
    );
    let versions = installed(&t, "hostile").await;
    assert_eq!(versions.len(), 1, "{versions:?}");
    let results = [a, b, c];
    let installed: Vec<&PluginInfo> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(installed.len(), 1, "{results:?}");
    assert_eq!(installed[0].type_id, versions[0]);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        let e = e.to_string();
        assert!(e.contains("plugin hostile is installed in version"), "{e}");
    }
}
crate::on_both_databases!(
    installs_of_versions_sent_together_leave_one,
    installs_racing
);

/// A type whose `initial-state` traps or returns more than the state limit makes no container:
/// the add fails and a standalone create is refused, each saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_state_that_traps_or_is_too_big_makes_no_container() {
    for (dir, why) in [
        (
            cloud48_engine::plugins::TEST_PLUGINS_INITIAL_TRAP,
            "hook initial-state: trapped",
        ),
        (
            cloud48_engine::plugins::TEST_PLUGINS_INITIAL_HUGE,
            "a state blob of 2097152 bytes (limit 1048576 bytes)",
        ),
    ] {
        let t = TestCore::start(Opts::default()).await.unwrap();
        install(&t, test_plugin(dir, "hostile")).await.unwrap();
        let a = add_hostile(&t, "calm").await;
        let cmd = t.wait(a.command_id).await;
        assert_eq!(cmd.status, CommandStatus::Failed);
        let error = cmd.error.unwrap_or_default();
        assert!(error.contains(why), "{error}");
        let err = t
            .client
            .post::<_, Accepted>("/v1/containers", &json!({ "type": "hostile" }))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{err}");
        let left: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
        assert!(
            left.iter().all(|c| !c.type_id.starts_with("hostile")),
            "{left:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_hooks_action_and_its_completion_resumes_without_duplicates() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let flags = [
        "--sim-latency-ms",
        "150",
        "--sim-servers",
        "3",
        "--anonymous",
        "full",
    ];
    let mut serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let a: Accepted = client
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    client.command(a.command_id, 60).await.unwrap();
    let a: Accepted = client
        .post(
            "/v1/environments/shop/containers",
            &json!({ "type": "tomcat" }),
        )
        .await
        .unwrap();
    assert_eq!(
        client.command(a.command_id, 60).await.unwrap().status,
        CommandStatus::Succeeded
    );
    let second: Accepted = client
        .post(
            "/v1/environments/shop/containers",
            &json!({ "type": "tomcat" }),
        )
        .await
        .unwrap();
    // Kill while the balancer the hook asked for is being created (a child of a child).
    crate::common::eventually("the hook's balancer is being created", || async {
        let cmds: Vec<Command> = client.get("/v1/commands?limit=100").await.unwrap();
        cmds.iter()
            .any(|c| {
                c.kind == "container.create"
                    && c.parent.is_some_and(|p| p != second.command_id)
                    && !c.status.is_terminal()
            })
            .then_some(())
    })
    .await;
    serve.kill9();
    drop(serve);
    let serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let done = client.command(second.command_id, 120).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    let env: Environment = client.get("/v1/environments/shop").await.unwrap();
    let kinds: Vec<&str> = env.members.iter().map(|m| m.type_id.as_str()).collect();
    assert_eq!(
        kinds,
        ["balancer@1.0.0", "tomcat@1.0.0", "tomcat@1.0.0"],
        "exactly one balancer"
    );
    let lb: Container = client
        .get(&format!("/v1/containers/{}", env.members[0].id))
        .await
        .unwrap();
    assert_eq!(
        lb.inspect.unwrap()["upstreams"].as_array().unwrap().len(),
        2
    );
    let all: Vec<Container> = client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(all.len(), 3, "no duplicate container");
    // The restarted core's own `after-cc-start` notification may still be running: every
    // command ends, and none failed.
    let cmds = crate::common::eventually("every command ends", || async {
        let cmds: Vec<Command> = client.get("/v1/commands?limit=100").await.unwrap();
        cmds.iter().all(|c| c.status.is_terminal()).then_some(cmds)
    })
    .await;
    assert!(
        cmds.iter().all(|c| c.status == CommandStatus::Succeeded),
        "{cmds:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_plugins_are_cached_and_a_corrupt_cache_entry_is_rebuilt() {
    let dir = crate::common::tempdir();
    let cache = dir.path().join("cache");
    let host =
        cloud48_engine::plugins::PluginHost::new(Some(cache.clone()), Default::default()).unwrap();
    let wasm = test_plugin(cloud48_engine::plugins::TEST_PLUGINS, "mysql");
    host.load(&wasm).unwrap();
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one artefact per content hash and engine: {entries:?}"
    );
    let name = entries[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        name.starts_with(&hex_sha256(&wasm)) && name.ends_with(".cwasm"),
        "{name}"
    );
    std::fs::write(&entries[0], b"not an artefact").unwrap();
    let again = host
        .load(&wasm)
        .expect("a corrupt cache entry is recompiled, not fatal");
    assert_eq!(again.meta().name, "mysql");
    assert_ne!(
        std::fs::read(&entries[0]).unwrap(),
        b"not an artefact",
        "the entry was rewritten"
    );
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_plugins_are_installed_on_the_first_start_only() {
    let dir = crate::common::tempdir();
    let open = || {
        let mut c = cloud48_engine::CoreConfig::new(dir.path());
        c.plugin_cache = Some(std::env::temp_dir().join("cloud48-test-plugin-cache"));
        cloud48_engine::Core::open(c)
    };
    let core = open().await.unwrap();
    // One core per data directory (SQLite): a second one is refused while the first runs.
    let second = open()
        .await
        .err()
        .expect("a second core on the same files is refused");
    assert!(
        second.to_string().contains("another core is running on"),
        "{second}"
    );
    assert_eq!(core.plugins().list().await.unwrap().len(), 4);
    core.plugins().remove("mysql").await.unwrap();
    drop(core);
    let core = open().await.unwrap();
    let names: Vec<String> = core
        .plugins()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.meta.name)
        .collect();
    assert_eq!(
        names,
        ["balancer", "redis", "tomcat"],
        "a removed bundled plugin stays removed after a restart"
    );
    assert!(core.types().get("balancer").is_some() && core.types().get("mysql").is_none());
}
