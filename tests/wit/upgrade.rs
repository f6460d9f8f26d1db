//! Plugin upgrades across WIT versions: one refused for a container changes nothing; one waits
//! for the commands on its containers and survives a `kill -9` of the core.

use super::*;

/// An upgrade whose `migrate-state` refuses one container fails naming it and the reason,
/// and leaves every container, the installed version and the registry as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refused_for_one_container_changes_nothing() {
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
    let mut ids = Vec::new();
    for env in ["calm", "keep"] {
        new_env(&t, env).await;
        ids.push(
            t.created(add(&t, env, json!({ "type": "hostile" })).await.command_id)
                .await,
        );
    }
    let a: Accepted = t
        .client
        .send_wasm(
            reqwest::Method::PUT,
            "/v1/plugins/hostile",
            hostile(cloud48_engine::plugins::TEST_PLUGINS_NEWER),
        )
        .await
        .unwrap();
    let cmd = t.wait(a.command_id).await;
    let error = cmd.error.unwrap_or_default();
    assert!(
        error.contains(&format!("container {}", ids[1]))
            && error.contains("keep their version")
            && error.contains("nothing was changed"),
        "{error}"
    );
    for id in &ids {
        let c = show(&t, *id).await;
        assert_eq!(c.type_id, "hostile@0.1.0");
        use sea_orm::EntityTrait;
        let row = cloud48_engine::entities::container::Entity::find_by_id(id.0)
            .one(t.core.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.state, b"v0", "state untouched");
    }
    let info: cloud48_engine::plugins::PluginInfo =
        t.client.get("/v1/plugins/hostile").await.unwrap();
    assert_eq!(info.type_id, "hostile@0.1.0");
    assert!(t.core.types().get("hostile@0.1.1").is_none());
    // The core still adds containers of the old version.
    t.created(
        add(&t, "calm", json!({ "type": "hostile" }))
            .await
            .command_id,
    )
    .await;
}

/// An upgrade waits for the commands on its containers, and one interrupted by `kill -9`
/// finishes after the restart: every container on the new version, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_waits_for_commands_on_its_containers_and_survives_kill_9() {
    use cloud48_core::cli::Client;
    use cloud48_engine::model::{Command, CommandStatus};
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    // Slow enough that the upgrade is seen waiting even when the machine is busy (the
    // window is the stop's time after the upgrade is claimed).
    let flags = [
        "--sim-latency-ms",
        "1500",
        "--sim-servers",
        "2",
        "--anonymous",
        "full",
    ];
    let mut serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let _: cloud48_engine::plugins::PluginInfo = client
        .send_wasm(
            reqwest::Method::POST,
            "/v1/plugins",
            hostile(cloud48_engine::plugins::TEST_PLUGINS),
        )
        .await
        .unwrap();
    let a: Accepted = client
        .post("/v1/environments", &json!({ "name": "calm" }))
        .await
        .unwrap();
    client.command(a.command_id, 60).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let a: Accepted = client
            .post(
                "/v1/environments/calm/containers",
                &json!({ "type": "hostile" }),
            )
            .await
            .unwrap();
        let done = client.command(a.command_id, 60).await.unwrap();
        assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
        ids.push(done.result.unwrap()["container_id"].as_i64().unwrap());
    }
    // A stop holds the first container (each simulated operation takes 1.5 s) while the
    // upgrade is submitted: the upgrade waits for it.
    let stop: Accepted = client
        .post(
            &format!("/v1/containers/{}/actions", ids[0]),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    let upgrade: Accepted = client
        .send_wasm(
            reqwest::Method::PUT,
            "/v1/plugins/hostile",
            hostile(cloud48_engine::plugins::TEST_PLUGINS_NEWER),
        )
        .await
        .unwrap();
    crate::common::eventually("the upgrade waits for the stop", || async {
        let c: Command = client
            .get(&format!("/v1/commands/{}", upgrade.command_id))
            .await
            .ok()?;
        (c.attempts > 0 && !c.status.is_terminal()).then_some(())
    })
    .await;
    serve.kill9();
    drop(serve);
    let serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let done = client.command(upgrade.command_id, 120).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    let stopped = client.command(stop.command_id, 120).await.unwrap();
    assert_eq!(stopped.status, CommandStatus::Succeeded, "{stopped:?}");
    for id in &ids {
        let c: Container = client.get(&format!("/v1/containers/{id}")).await.unwrap();
        assert_eq!(c.type_id, "hostile@0.1.1");
    }
    let plugins: Vec<cloud48_engine::plugins::PluginInfo> =
        client.get("/v1/plugins").await.unwrap();
    let hostile: Vec<&str> = plugins
        .iter()
        .filter(|p| p.meta.name == "hostile")
        .map(|p| p.type_id.as_str())
        .collect();
    assert_eq!(hostile, ["hostile@0.1.1"], "exactly one version installed");
    // Containers of the new version take new commands.
    let a: Accepted = client
        .post(
            &format!("/v1/containers/{}/actions", ids[0]),
            &json!({ "op": "start" }),
        )
        .await
        .unwrap();
    let started = client.command(a.command_id, 60).await.unwrap();
    assert_eq!(started.status, CommandStatus::Succeeded, "{started:?}");
}
