//! Agents over the Linux driver: the conformance suite through them, progress of a long
//! operation, moves between an agent and a local server, exports streamed between agents, and
//! placement that prefers a server holding the image.

use super::*;

struct RemoteLinuxFactory {
    dir: tempfile::TempDir,
    prefix: String,
}

impl DriverFactory for RemoteLinuxFactory {
    type Driver = RemoteDriver;
    async fn make(&self, n: u32) -> RemoteDriver {
        let cfg = crate::linux::config(self.dir.path(), &self.prefix, 40, n);
        let name = cfg.name.clone();
        let linux = cloud48_engine::driver::linux::LinuxDriver::open(cfg)
            .await
            .expect("the linux driver opens (run the tests as root)");
        let (_, url) = serve_agent(&name, Arc::new(linux)).await;
        RemoteDriver::new(&name, &url, TOKEN, RemoteTimeouts::default())
    }
}

#[tokio::test]
async fn remote_driver_over_linux_agents_passes_the_conformance_suite() {
    let prefix = crate::linux::unique_prefix('a');
    let _sweep = crate::linux::Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0"), format!("{prefix}br1")],
    };
    let failures = conformance::run(&RemoteLinuxFactory {
        dir: crate::common::tempdir(),
        prefix,
    })
    .await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

#[tokio::test]
async fn a_long_operation_reports_progress() {
    let s = sim("slowish", Duration::from_millis(400));
    let (_, url) = serve_agent("slowish", s.clone()).await;
    let remote = RemoteDriver::new("slowish", &url, TOKEN, RemoteTimeouts::default());
    assert_eq!(
        remote.progress("never-sent").await.unwrap(),
        None,
        "an unknown id"
    );
    let body = json!({ "id": "long-1", "op": "create", "spec": { "guest_id": "g", "type_id": "plain", "resources": { "cpu_millis": 1, "memory_mb": 1, "disk_mb": 1 } } });
    let running = tokio::spawn(async move { post_op(&url, Some(TOKEN), body).await });
    let during = eventually("the agent knows the operation", || async {
        remote.progress("long-1").await.unwrap()
    })
    .await;
    assert!(!during.done, "reported while running: {during:?}");
    assert_eq!(during.progress, "started");
    let (status, _) = running.await.unwrap();
    assert_eq!(status, 200);
    let after = remote.progress("long-1").await.unwrap().unwrap();
    assert!(
        after.done && after.progress == "done" && after.elapsed_ms >= 400,
        "{after:?}"
    );
}

#[tokio::test]
async fn a_container_moves_between_an_agent_and_a_local_server() {
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        ..agent_opts()
    })
    .await
    .unwrap();
    let remote = sim("node-1", Duration::ZERO);
    let (_, url) = serve_agent("node-1", remote.clone()).await;
    tc.core.agents().add(&url).await.unwrap();
    let id = tc.plain_on("node-1").await;
    let guest = tc.core.containers().get_by_id(id).await.unwrap().guest_id;
    let disk = remote.guest(&guest).unwrap().disk;
    // The agent's export is a reference; the local server cannot pull it, so the core does.
    let a: serde_json::Value = tc
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "to": "sim-1" }),
        )
        .await
        .unwrap();
    tc.ok(a["command_id"].as_i64().unwrap()).await;
    assert_eq!(
        tc.sim("sim-1")
            .await
            .guest(&guest)
            .expect("moved to sim-1")
            .disk,
        disk,
        "the disk came along"
    );
    assert!(remote.guest(&guest).is_none(), "the agent's copy is gone");
}

/// A container moves between platforms whose servers are agents, as a stream: the export comes
/// from the source agent through core A as an archive, the import's disk waits in core B's
/// uploads, and the target agent pulls it from core B; the upload is gone once imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_streams_from_an_agent_and_the_target_agent_pulls_the_import_from_its_core() {
    let a = TestCore::start(Opts {
        sim_servers: 0,
        ..agent_opts()
    })
    .await
    .unwrap();
    let b = TestCore::start(Opts {
        sim_servers: 0,
        ..agent_opts()
    })
    .await
    .unwrap();
    let source = sim("ex-a", Duration::ZERO);
    let (_, url) = serve_agent("ex-a", source.clone()).await;
    a.core.agents().add(&url).await.unwrap();
    let target = sim("ex-b", Duration::ZERO);
    let (agent, url) = serve_agent("ex-b", target.clone()).await;
    agent.know_cores(Arc::new(std::sync::Mutex::new(
        cloud48_engine::agent::CoreList::new(vec![b.url.clone()]),
    )));
    b.core.agents().add(&url).await.unwrap();
    let cmd: serde_json::Value = a
        .client
        .post("/v1/containers", &json!({ "type": "plain" }))
        .await
        .unwrap();
    let id = a.created(cmd["command_id"].as_i64().unwrap()).await;
    let stop: serde_json::Value = a
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    a.ok(stop["command_id"].as_i64().unwrap()).await;
    let guest = a.core.containers().get_by_id(id).await.unwrap().guest_id;
    let disk = source.guest(&guest).unwrap().disk;

    let file = a._dir.path().join("moving.tar");
    let new_id = crate::common::export_then_import(&a.url, &b.url, id, &file);
    let c = b.core.containers().get_by_id(new_id).await.unwrap();
    assert_eq!(c.server.as_deref(), Some("ex-b"));
    assert_eq!(target.guest(&c.guest_id).expect("on the agent").disk, disk);
    assert_eq!(
        std::fs::read_dir(b._dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
}

/// Placement prefers a server whose agent reports it holds the container's image (heartbeats
/// carry the images each agent holds), and goes by free capacity otherwise.
#[tokio::test]
async fn placement_prefers_a_server_that_holds_the_image() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let mut agents = Vec::new();
    for (index, name) in [(1, "node-1"), (2, "node-2")] {
        // Each its own address pool, as agents with their own --subnet.
        let driver = Arc::new(SimServer::new(
            name,
            index,
            Resources {
                cpu_millis: 4000,
                memory_mb: 4096,
                disk_mb: 10_000,
            },
            SimLatency::uniform(Duration::ZERO),
        ));
        let (agent, url) = serve_agent(name, driver).await;
        tc.core.agents().add(&url).await.unwrap();
        agents.push(agent);
    }
    let create = |body: serde_json::Value| {
        let tc = &tc;
        async move {
            let cmd: serde_json::Value = tc.client.post("/v1/containers", &body).await.unwrap();
            let id = tc.created(cmd["command_id"].as_i64().unwrap()).await;
            tc.core.containers().get_by_id(id).await.unwrap().server
        }
    };
    // node-2 is a little fuller: the first tomcat goes to node-1.
    create(json!({ "type": "plain", "server": "node-2" })).await;
    let image = tc
        .core
        .types()
        .get("tomcat")
        .unwrap()
        .workload()
        .image
        .expect("the tomcat type declares its image");
    assert_eq!(
        create(json!({ "type": "tomcat" })).await.as_deref(),
        Some("node-1"),
        "no server holds the image: the emptier one"
    );
    // Now node-2 is emptier, but node-1's agent reports it holds tomcat's image (as it does
    // once it has pulled it).
    let digest = format!("sha256:{}", "c".repeat(64));
    let mut stats = agents[0].driver().stats().await.unwrap();
    // As agents report them: name:tag@digest.
    stats.images = vec![format!("{}:latest@{digest}", image.reference)];
    let beat = cloud48_engine::agent::protocol::Heartbeat {
        agent: agents[0].info().clone(),
        stats,
        period_ms: None,
    };
    tc.core.agents().heartbeat(beat).await.unwrap();
    assert_eq!(
        create(json!({ "type": "tomcat" })).await.as_deref(),
        Some("node-1"),
        "the server holding the image wins over a somewhat emptier one"
    );
    // A type without an image goes by free capacity.
    assert_eq!(
        create(json!({ "type": "plain" })).await.as_deref(),
        Some("node-2")
    );
}
