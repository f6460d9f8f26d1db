//! The node agent and the remote driver: the protocol, its authentication, idempotent
//! retries, registration with the core and a hanging agent.

use std::sync::Arc;
use std::time::Duration;

use cloud48_engine::agent::AgentService;
use cloud48_engine::agent::protocol::{AgentInfo, Op, OpRequest, OpResponse};
use cloud48_engine::driver::conformance::{self, DriverFactory};
use cloud48_engine::driver::remote::{RemoteDriver, RemoteTimeouts};
use cloud48_engine::driver::sim::{SimLatency, SimServer};
use cloud48_engine::driver::{Driver, DriverError, GuestSpec};
use cloud48_engine::managers::ContainerCommand;
use cloud48_engine::model::{Resources, ServerStatus};
use serde_json::json;

use crate::common::{Opts, TestCore, eventually};

mod bridge;
mod linux;
mod remove;

pub const TOKEN: &str = "test-agent-token-0123456789";

/// An agent on a loopback port serving `driver`; the task ends with the test.
pub async fn serve_agent(name: &str, driver: Arc<dyn Driver>) -> (Arc<AgentService>, String) {
    serve_agent_on(name, driver, None).await
}

/// `serve_agent` for a server that reports its network (subnet, and its range of a shared
/// one), as `cloud48-agent --subnet --addresses` does: the core moves guests live only between
/// servers of one network.
pub async fn serve_agent_on(
    name: &str,
    driver: Arc<dyn Driver>,
    network: Option<(
        cloud48_engine::driver::address::Subnet,
        Option<cloud48_engine::driver::address::AddressRange>,
    )>,
) -> (Arc<AgentService>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (subnet, addresses) = match network {
        Some((s, r)) => (Some(s.to_string()), r.map(|r| r.to_string())),
        None => (None, None),
    };
    let info = AgentInfo {
        name: name.into(),
        url: url.clone(),
        driver: driver.kind().into(),
        capabilities: driver.capabilities(),
        labels: vec![],
        subnet,
        addresses,
        heartbeats: None,
        id: None,
        take_over: false,
    };
    serve_agent_as(info, driver, listener).await
}

/// An agent that says `info` of itself, on `listener`.
async fn serve_agent_as(
    info: AgentInfo,
    driver: Arc<dyn Driver>,
    listener: tokio::net::TcpListener,
) -> (Arc<AgentService>, String) {
    let url = info.url.clone();
    let spool = crate::common::scratch_dir(&format!("spool-{}", info.name));
    let agent = AgentService::new(driver, TOKEN, info, &spool).unwrap();
    let router = agent.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (agent, url)
}

pub fn sim(name: &str, latency: Duration) -> Arc<SimServer> {
    Arc::new(SimServer::new(
        name,
        1,
        Resources {
            cpu_millis: 4000,
            memory_mb: 4096,
            disk_mb: 10_000,
        },
        SimLatency::uniform(latency),
    ))
}

struct RemoteSimFactory;

impl DriverFactory for RemoteSimFactory {
    type Driver = RemoteDriver;
    async fn make(&self, n: u32) -> RemoteDriver {
        let name = format!("remote-{n}");
        let (_, url) = serve_agent(&name, sim(&name, Duration::ZERO)).await;
        RemoteDriver::new(&name, &url, TOKEN, RemoteTimeouts::default())
    }
}

#[tokio::test]
async fn remote_driver_passes_the_conformance_suite() {
    let failures = conformance::run(&RemoteSimFactory).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

#[tokio::test]
async fn cold_migration_pulls_the_disk_from_agent_to_agent() {
    let (a, b) = (sim("a", Duration::ZERO), sim("b", Duration::ZERO));
    let (_, url_a) = serve_agent("a", a.clone()).await;
    let (_, url_b) = serve_agent("b", b.clone()).await;
    let (ra, rb) = (
        RemoteDriver::new("a", &url_a, TOKEN, RemoteTimeouts::default()),
        RemoteDriver::new("b", &url_b, TOKEN, RemoteTimeouts::default()),
    );
    let spec = GuestSpec {
        avoid: Vec::new(),
        guest_id: "m1".into(),
        type_id: "plain".into(),
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 64,
            disk_mb: 64,
        },
        ip: None,
        workload: Default::default(),
    };
    ra.create(&spec).await.unwrap();
    let disk = a.guest("m1").unwrap().disk;
    let image = ra.export("m1").await.unwrap();
    assert!(
        image.data.len() < 200,
        "the core carries a reference, not the disk"
    );
    // As in a clone: the source runs again before the target pulls the snapshot.
    ra.start("m1").await.unwrap();
    rb.import(&spec, &image).await.unwrap();
    assert_eq!(
        b.guest("m1").expect("imported on b").disk,
        disk,
        "b holds a's disk"
    );
    let bogus = cloud48_engine::driver::GuestImage {
        type_id: String::new(),
        data: format!("cloud48-agent-image:[\"{url_a}\",\"no-such-export\"]").into_bytes(),
    };
    let err = rb
        .import(
            &GuestSpec {
                guest_id: "m2".into(),
                ..spec.clone()
            },
            &bogus,
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("could not give export"),
        "a missing export is blamed on the source: {err}"
    );
}

#[tokio::test]
async fn a_platform_import_cannot_smuggle_an_agent_reference() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let forged = hex::encode(br#"cloud48-agent-image:["http://127.0.0.1:9","x"]"#);
    let export = json!({ "format": 1, "platform": "elsewhere", "container_id": 7, "guest_id": "g7", "type": "plain", "requirements": { "cpu_millis": 100, "memory_mb": 64, "disk_mb": 64 }, "state_hex": "", "disk_hex": forged });
    let err = tc
        .client
        .post::<_, serde_json::Value>("/v1/containers/import", &export)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("disk_hex") && err.contains("reference"),
        "{err}"
    );
}

async fn post_op(
    url: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/ops"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn agent_refuses_bad_requests_with_clear_errors() {
    let s = sim("guarded", Duration::ZERO);
    let (_, url) = serve_agent("guarded", s.clone()).await;
    let create = json!({ "id": "op-1", "op": "create", "spec": { "guest_id": "g1", "type_id": "plain", "resources": { "cpu_millis": 1, "memory_mb": 1, "disk_mb": 1 } } });

    let (status, body) = post_op(&url, None, create.clone()).await;
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (status, body) = post_op(&url, Some("wrong-token-wrong-token"), create.clone()).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("wrong agent token"),
        "{body}"
    );
    let resp = reqwest::Client::new()
        .get(format!("{url}/v1/guests"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "reads need the token too");
    assert!(s.guests().is_empty(), "nothing reached the driver");

    let (status, body) = post_op(&url, Some(TOKEN), json!({ "id": "op-2", "op": "explode" })).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("malformed operation"),
        "{body}"
    );
    let (status, _) = post_op(
        &url,
        Some(TOKEN),
        json!({ "id": "", "op": "start", "guest": "g1" }),
    )
    .await;
    assert_eq!(status, 400, "an empty operation id is refused");

    let (status, body) = post_op(
        &url,
        Some(TOKEN),
        json!({ "id": "op-3", "op": "start", "guest": "nobody" }),
    )
    .await;
    assert_eq!(status, 200);
    let answer: OpResponse = serde_json::from_value(body).unwrap();
    assert_eq!(
        answer,
        OpResponse::Err(DriverError::NotFound("nobody".into()))
    );
    let resp = reqwest::Client::new()
        .get(format!("{url}/v1/guests/nobody/logs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404, "logs of an unknown guest");

    let (status, _) = post_op(&url, Some(TOKEN), create.clone()).await;
    assert_eq!(status, 200);
    let (status, body) = post_op(
        &url,
        Some(TOKEN),
        json!({ "id": "op-1", "op": "destroy", "guest": "g1" }),
    )
    .await;
    assert_eq!(
        status, 409,
        "an operation id reused for another operation: {body}"
    );
    assert!(s.guest("g1").is_some(), "the reused id destroyed nothing");
}

#[tokio::test]
async fn a_retried_operation_runs_once() {
    let s = sim("once", Duration::from_millis(200));
    let (agent, url) = serve_agent("once", s.clone()).await;
    let spec = GuestSpec {
        avoid: Vec::new(),
        guest_id: "g".into(),
        type_id: "plain".into(),
        resources: Resources {
            cpu_millis: 1,
            memory_mb: 1,
            disk_mb: 1,
        },
        ip: None,
        workload: Default::default(),
    };
    agent.driver().create(&spec).await.unwrap();
    agent.driver().start("g").await.unwrap();
    let exec = OpRequest {
        id: "exec-1".into(),
        op: Op::Exec {
            guest: "g".into(),
            script: "echo once".into(),
            args: vec![],
        },
    };
    let body = serde_json::to_value(&exec).unwrap();
    // The first request is abandoned by its client mid-operation, as when a connection drops.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        post_op(&url, Some(TOKEN), body.clone()),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the first request was cut off before the answer"
    );
    let (a, b) = tokio::join!(
        post_op(&url, Some(TOKEN), body.clone()),
        post_op(&url, Some(TOKEN), body.clone())
    );
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(a.1, b.1, "every retry gets the first result");
    assert_eq!(
        s.guest("g").unwrap().execs.len(),
        1,
        "the script ran once for three requests"
    );
}

/// What an agent of a simulated server named `name`, listening on loopback port `port`, says
/// of itself (id `agent-NAME`, no network of its own).
pub fn sim_agent(name: &str, port: u16) -> AgentInfo {
    AgentInfo {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}"),
        driver: "sim".into(),
        capabilities: sim(name, Duration::ZERO).capabilities(),
        labels: vec![],
        subnet: None,
        addresses: None,
        heartbeats: Some(true),
        id: Some(format!("agent-{name}")),
        take_over: false,
    }
}

/// A simulated server of 4 CPUs, 4 GiB and 10 GB giving its containers addresses of `net`.
pub fn node(name: &str, net: cloud48_engine::driver::address::Subnet) -> Arc<SimServer> {
    Arc::new(
        SimServer::new(
            name,
            1,
            Resources {
                cpu_millis: 4000,
                memory_mb: 4096,
                disk_mb: 10_000,
            },
            SimLatency::uniform(Duration::ZERO),
        )
        .with_subnet(net),
    )
}

/// What an idle agent with 4 cores, 4 GiB and 10 GB reports.
pub fn idle_stats() -> cloud48_engine::driver::ServerStats {
    cloud48_engine::driver::ServerStats {
        capacity: Resources {
            cpu_millis: 4000,
            memory_mb: 4096,
            disk_mb: 10_000,
        },
        allocated: Resources::default(),
        guests: 0,
        used: None,
        images: Vec::new(),
    }
}

fn agent_opts() -> Opts {
    Opts {
        sim_servers: 0,
        agent_token: Some(TOKEN.into()),
        ..Default::default()
    }
}

/// An agent the core refuses before it was ever registered (a name a live agent elsewhere
/// holds, a wrong token) stops trying and says why: retrying would not change the answer, and
/// an operator who started it must learn at once that it serves nothing.
#[tokio::test]
async fn heartbeats_refused_before_registration_end_with_the_core_s_reason() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let (first, _) = serve_agent("twin", sim("twin", Duration::ZERO)).await;
    let beats = tokio::spawn(cloud48_engine::agent::heartbeats(
        first,
        vec![tc.url.clone()],
        TOKEN.into(),
        Duration::from_millis(20),
    ));
    eventually("the first twin registers", || async {
        tc.core
            .servers()
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.name == "twin")
    })
    .await;
    let (second, _) = serve_agent("twin", sim("twin", Duration::ZERO)).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        cloud48_engine::agent::heartbeats(
            second.clone(),
            vec![tc.url.clone()],
            TOKEN.into(),
            Duration::from_millis(20),
        ),
    )
    .await
    .expect("the second agent stops trying");
    assert_eq!(refused.status, 409, "{refused}");
    assert!(
        refused
            .reason
            .contains("server name twin is taken by the live agent")
            && refused.reason.contains("give this agent another --name"),
        "{refused}"
    );
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        cloud48_engine::agent::heartbeats(
            second,
            vec![tc.url.clone()],
            "not-the-token-of-the-core".into(),
            Duration::from_millis(20),
        ),
    )
    .await
    .expect("an agent with a wrong token stops trying");
    assert_eq!(refused.status, 401, "{refused}");
    assert!(
        refused
            .reason
            .contains("the agent's token is not this core's agents.token"),
        "{refused}"
    );
    assert!(!beats.is_finished(), "the registered agent beats on");
    beats.abort();
}

/// Regression (review): an agent stopped at the first core's refusal, though another core of
/// its list took it (a core started with another token refuses what the others accept).
#[tokio::test]
async fn an_agent_refused_by_one_core_registers_with_another() {
    let odd = TestCore::start(Opts {
        agent_token: Some("another-token".into()),
        ..agent_opts()
    })
    .await
    .unwrap();
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let (agent, _) = serve_agent("node-r", sim("node-r", Duration::ZERO)).await;
    let beats = tokio::spawn(cloud48_engine::agent::heartbeats(
        agent,
        vec![odd.url.clone(), tc.url.clone()],
        TOKEN.into(),
        Duration::from_millis(20),
    ));
    eventually(
        "the agent registers with the core that takes it",
        || async {
            tc.core
                .servers()
                .list()
                .await
                .unwrap()
                .into_iter()
                .find(|s| s.name == "node-r")
        },
    )
    .await;
    assert!(!beats.is_finished(), "the agent beats on");
    beats.abort();
    // Refused by one core and the other unreachable: it stops, saying why.
    let (lone, _) = serve_agent("node-s", sim("node-s", Duration::ZERO)).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        cloud48_engine::agent::heartbeats(
            lone,
            vec![odd.url.clone(), "http://127.0.0.1:1".into()],
            TOKEN.into(),
            Duration::from_millis(20),
        ),
    )
    .await
    .expect("an agent refused where it is heard stops");
    assert_eq!(refused.status, 401, "{refused}");
}

#[tokio::test]
async fn agents_register_by_heartbeat_and_by_server_add() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let s1 = sim("node-1", Duration::ZERO);
    let (agent1, _) = serve_agent("node-1", s1.clone()).await;
    let beats = tokio::spawn(cloud48_engine::agent::heartbeats(
        agent1,
        vec![tc.url.clone()],
        TOKEN.into(),
        Duration::from_millis(20),
    ));
    let server = eventually("node-1 registers by heartbeat", || async {
        tc.core
            .servers()
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.name == "node-1")
    })
    .await;
    assert_eq!(server.driver, "remote");
    assert_eq!(
        server.capacity.memory_mb, 4096,
        "capacity comes from the agent's figures"
    );
    assert_eq!(server.status, ServerStatus::Up);

    let (_, url2) = serve_agent("node-2", sim("node-2", Duration::ZERO)).await;
    let added: serde_json::Value = tc
        .client
        .post("/v1/servers", &json!({ "url": url2 }))
        .await
        .unwrap();
    assert_eq!(added["name"], "node-2");
    assert_eq!(added["address"], url2.as_str());

    // A container placed on a remote server lives on its agent.
    let cmd: serde_json::Value = tc
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "tomcat", "server": "node-1" }),
        )
        .await
        .unwrap();
    let id = tc.created(cmd["command_id"].as_i64().unwrap()).await;
    let c = tc.core.containers().get_by_id(id).await.unwrap();
    assert!(
        s1.guest(&c.guest_id).is_some(),
        "the guest exists on node-1's agent"
    );

    // Bad heartbeats and unreachable agents get clear answers.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/agents/heartbeat", tc.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/agents/heartbeat", tc.url))
        .bearer_auth(TOKEN)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    assert!(resp.text().await.unwrap().contains("malformed heartbeat"));
    // A core without simulated servers has no fault injection.
    let err = tc
        .client
        .post::<_, serde_json::Value>("/v1/servers/node-1/fail", &json!({}))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only on a core that runs simulated servers")
            && err.to_string().contains("404"),
        "{err}"
    );
    let err = tc
        .client
        .post::<_, serde_json::Value>("/v1/servers", &json!({ "url": "http://127.0.0.1:1" }))
        .await
        .unwrap_err();
    // Why, not only that it failed: the refused connection underneath the client's error.
    assert!(
        err.to_string().contains("cannot reach an agent")
            && err
                .to_string()
                .to_lowercase()
                .contains("connection refused")
            && err.to_string().contains("502"),
        "{err}"
    );
    // A core's URL is not an agent's.
    let err = tc
        .client
        .post::<_, serde_json::Value>("/v1/servers", &json!({ "url": tc.url }))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a Cloud48 core, not a node agent") && err.contains("422"),
        "{err}"
    );
    // An agent that sends no heartbeats (started without --core) would be judged down at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url3 = format!("http://{}", listener.local_addr().unwrap());
    let driver = sim("node-3", Duration::ZERO);
    let info = AgentInfo {
        name: "node-3".into(),
        url: url3.clone(),
        driver: "sim".into(),
        capabilities: driver.capabilities(),
        labels: vec![],
        subnet: None,
        addresses: None,
        heartbeats: Some(false),
        id: None,
        take_over: false,
    };
    serve_agent_as(info, driver, listener).await;
    let err = tc
        .client
        .post::<_, serde_json::Value>("/v1/servers", &json!({ "url": url3 }))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sends no heartbeats") && err.contains("--core") && err.contains("422"),
        "{err}"
    );
    assert!(
        tc.core
            .servers()
            .list()
            .await
            .unwrap()
            .iter()
            .all(|s| s.name != "node-3"),
        "nothing registered"
    );
    beats.abort();
}

#[tokio::test]
async fn a_hanging_agent_does_not_block_the_queue_for_other_servers() {
    let mut opts = agent_opts();
    opts.max_attempts = 1;
    let tc = TestCore::start(opts).await.unwrap();
    let (_, slow_url) = serve_agent("slow", sim("slow", Duration::from_secs(600))).await;
    let (_, fast_url) = serve_agent("fast", sim("fast", Duration::ZERO)).await;
    tc.core.agents().add(&fast_url).await.unwrap();
    // The slow agent's stats hang too, so it is registered from known figures.
    let info = AgentInfo {
        name: "slow".into(),
        url: slow_url,
        driver: "sim".into(),
        capabilities: sim("x", Duration::ZERO).capabilities(),
        labels: vec![],
        subnet: None,
        addresses: None,
        heartbeats: None,
        id: None,
        take_over: false,
    };
    let stats = idle_stats();
    tc.core.agents().register(&info, &stats).await.unwrap();

    let slow: serde_json::Value = tc
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "tomcat", "server": "slow" }),
        )
        .await
        .unwrap();
    let fast: serde_json::Value = tc
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "tomcat", "server": "fast" }),
        )
        .await
        .unwrap();
    tc.created(fast["command_id"].as_i64().unwrap()).await;
    let stuck = tc
        .core
        .queue()
        .get(cloud48_engine::model::CommandId(
            slow["command_id"].as_i64().unwrap(),
        ))
        .await
        .unwrap();
    assert!(
        !stuck.status.is_terminal(),
        "the create on the hanging agent is still waiting: {stuck:?}"
    );
}

/// An agent whose `update` hangs (every other operation answers at once) does not hold the
/// database while the core waits for it: other commands run and the API answers reads. On
/// SQLite the core has one connection, so a transaction held across the call would stall both.
#[tokio::test]
async fn an_agent_hanging_in_update_blocks_neither_other_commands_nor_reads() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let latency = SimLatency {
        per_operation: [("update".to_string(), Duration::from_secs(600))].into(),
        ..Default::default()
    };
    let capacity = Resources {
        cpu_millis: 4000,
        memory_mb: 4096,
        disk_mb: 10_000,
    };
    let (_, url) = serve_agent(
        "hangs",
        Arc::new(SimServer::new("hangs", 1, capacity, latency)),
    )
    .await;
    tc.core.agents().add(&url).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let body = json!({ "type": "plain", "server": "hangs" });
        let cmd: serde_json::Value = tc.client.post("/v1/containers", &body).await.unwrap();
        ids.push(tc.created(cmd["command_id"].as_i64().unwrap()).await);
    }
    let (first, second) = (ids[0], ids[1]);

    // Grow the first container: its growth is reserved, then the agent hangs in the resize.
    let body = json!({ "op": "update", "resources": { "cpu_millis": 1000, "memory_mb": 1024, "disk_mb": 2048 } });
    let update: serde_json::Value = tc
        .client
        .post(&format!("/v1/containers/{first}/actions"), &body)
        .await
        .unwrap();
    let update = cloud48_engine::model::CommandId(update["command_id"].as_i64().unwrap());
    eventually("the update reaches the agent", || async {
        let c = tc.core.queue().get(update).await.unwrap();
        (c.step == 1).then_some(())
    })
    .await;

    // Meanwhile another command on the same server runs to its end, and reads answer.
    tc.ok(crate::container::act(&tc, second, ContainerCommand::Stop {}).await)
        .await;
    let listed: serde_json::Value = tc.client.get("/v1/containers").await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let servers: serde_json::Value = tc.client.get("/v1/servers").await.unwrap();
    assert_eq!(servers[0]["name"], "hangs");
    let waiting = tc.core.queue().get(update).await.unwrap();
    assert!(
        !waiting.status.is_terminal(),
        "the update still waits for the agent: {waiting:?}"
    );
    // The growth is held by a dummy while the guest is resized, so the ledger stays exact.
    let audit = cloud48_engine::placement::audit(tc.core.db())
        .await
        .unwrap();
    assert!(audit.is_empty(), "{audit:?}");
}

/// Another agent under a down server's name (another data directory, so none of its guests)
/// was taken for that server: the core found every container gone, failed them and had their
/// guests removed when the real agent came back. It is refused unless it takes the server over.
#[tokio::test]
async fn another_agent_under_a_server_s_name_is_refused_unless_it_takes_the_server_over() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let stats = idle_stats();
    let info = |port: u16, id: &str, take_over: bool| AgentInfo {
        name: "node-x".into(),
        url: format!("http://127.0.0.1:{port}"),
        driver: "sim".into(),
        capabilities: sim("x", Duration::ZERO).capabilities(),
        labels: vec![],
        subnet: Some("10.9.8.0/24".into()),
        addresses: None,
        heartbeats: None,
        id: Some(id.into()),
        take_over,
    };
    let agents = tc.core.agents();
    let server = agents
        .register(&info(1, "agent-a", false), &stats)
        .await
        .unwrap();
    let e = agents
        .register(&info(2, "agent-b", false), &stats)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "server node-x is run by another agent (agent id agent-a, last at http://127.0.0.1:1)"
        ) && e.contains("another --name")
            && e.contains("--take-over"),
        "{e}"
    );
    let row = tc.core.servers().get("node-x").await.unwrap();
    assert_eq!(
        row.address.as_deref(),
        Some("http://127.0.0.1:1"),
        "unchanged"
    );
    // The same agent at another address is the same server.
    let moved = agents.register(&info(3, "agent-a", false), &stats).await;
    assert_eq!(moved.unwrap(), server);
    // Taken over, the server is the new agent's; the old one is now the stranger.
    let taken = agents.register(&info(2, "agent-b", true), &stats).await;
    assert_eq!(taken.unwrap(), server);
    let e = agents
        .register(&info(3, "agent-a", false), &stats)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent id agent-b"), "{e}");
    // While the agent holding the name beats, a take-over waits out its grace: busy (503,
    // which agents retry), not refused (which would stop the new agent).
    agents
        .heartbeat(cloud48_engine::agent::protocol::Heartbeat {
            agent: info(2, "agent-b", false),
            stats: idle_stats(),
            period_ms: None,
        })
        .await
        .unwrap();
    let e = agents
        .register(&info(4, "agent-c", true), &stats)
        .await
        .unwrap_err();
    assert!(
        matches!(e, cloud48_engine::core::CoreError::Busy(_))
            && e.to_string()
                .contains("a take-over waits until it has been silent"),
        "{e}"
    );
}

/// An agent that beats less often than twice in the core's grace period is refused, saying
/// what to start it with: its server was judged down between two beats, over and over, and its
/// containers replaced.
#[tokio::test]
async fn an_agent_beating_too_rarely_for_the_grace_period_is_refused() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let grace = tc.core.config().health.grace.as_millis() as u64;
    let beat = |period: u64| cloud48_engine::agent::protocol::Heartbeat {
        agent: sim_agent("slow", 1),
        stats: idle_stats(),
        period_ms: Some(period),
    };
    let e = tc
        .core
        .agents()
        .heartbeat(beat(grace))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("agent slow beats every {grace} ms"))
            && e.contains(&format!("--heartbeat-ms {}", grace / 2)),
        "{e}"
    );
    assert!(
        tc.core.servers().get("slow").await.is_err(),
        "not registered"
    );
    tc.core.agents().heartbeat(beat(grace / 2)).await.unwrap();
}

/// An agent registering a new server may hold guests of containers destroyed meanwhile (an
/// agent back under the name of a server removed while it was down): they took room the core
/// counted as free, and creates placed there failed until the collector's next pass. They go
/// when the server registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_s_leftover_guests_are_removed_when_it_registers() {
    use cloud48_engine::driver::address::Subnet;
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        ..agent_opts()
    })
    .await
    .unwrap();
    let id = tc.plain_on("sim-1").await;
    let c: cloud48_engine::model::Container = tc
        .client
        .get(&format!("/v1/containers/{id}"))
        .await
        .unwrap();
    let a: cloud48_engine::model::Accepted = tc
        .client
        .submit::<()>(&format!("/v1/containers/{id}"), None)
        .await
        .unwrap();
    tc.ok(a.command_id).await;
    let net: Subnet = "10.64.1.0/24".parse().unwrap();
    let sim = node("node-l", net);
    sim.create(&GuestSpec {
        avoid: Vec::new(),
        guest_id: c.guest_id.clone(),
        type_id: "plain".into(),
        resources: Resources {
            cpu_millis: 500,
            memory_mb: 256,
            disk_mb: 1024,
        },
        ip: None,
        workload: Default::default(),
    })
    .await
    .unwrap();
    let (_agent, url) = serve_agent_on("node-l", sim.clone(), Some((net, None))).await;
    tc.core.agents().add(&url).await.unwrap();
    eventually("the leftover guest removed", || async {
        sim.list().await.unwrap().is_empty().then_some(())
    })
    .await;
}

/// An agent that takes over a server the monitor still holds up (its old agent killed a moment
/// before) holds none of the old one's guests: the server is marked down with the cause, and
/// once the new agent beats its containers are judged by what it holds (the old guest is gone:
/// failed). Its containers had stayed `running` with no guest behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_of_a_server_still_up_judges_its_containers_by_the_new_agent() {
    use cloud48_engine::driver::address::Subnet;
    use cloud48_engine::model::ContainerStatus;
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let net: Subnet = "10.63.0.0/24".parse().unwrap();
    let (old, _) = serve_agent_on("node-t", node("node-t", net), Some((net, None))).await;
    let mut info = old.info().clone();
    info.id = Some("agent-old".into());
    let agents = tc.core.agents();
    let server = agents.register(&info, &idle_stats()).await.unwrap();
    assert_eq!(tc.core.servers().get("node-t").await.unwrap().id.0, server);
    let id = tc.plain_on("node-t").await;
    // Another agent, from an empty data directory, takes it over (by its id: at the same
    // address or another alike).
    let (new, _) = serve_agent_on("node-t", node("node-t", net), Some((net, None))).await;
    let mut taking = new.info().clone();
    taking.id = Some("agent-new".into());
    taking.take_over = true;
    agents
        .heartbeat(cloud48_engine::agent::protocol::Heartbeat {
            agent: taking.clone(),
            stats: idle_stats(),
            period_ms: None,
        })
        .await
        .unwrap();
    let row = tc.core.servers().get("node-t").await.unwrap();
    assert_eq!(row.status, ServerStatus::Down);
    let c: cloud48_engine::model::Container = tc
        .client
        .get(&format!("/v1/containers/{id}"))
        .await
        .unwrap();
    assert_eq!(c.status, ContainerStatus::Down);
    // The same agent again (the flag left on) changes nothing more.
    agents.register(&taking, &idle_stats()).await.unwrap();
    // The monitor sees it beat: up, and the container judged by what the new agent holds.
    let report = tc.core.monitor().check().await.unwrap();
    assert_eq!(report.up, vec![server]);
    let c: cloud48_engine::model::Container = tc
        .client
        .get(&format!("/v1/containers/{id}"))
        .await
        .unwrap();
    assert_eq!(c.status, ContainerStatus::Failed, "{c:?}");
}

/// An agent that comes back with another subnet while containers of its server hold addresses
/// of the old one is refused, naming them: they keep their addresses, which another server
/// could otherwise hand out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_back_with_another_subnet_is_refused_while_its_containers_hold_the_old_one() {
    use cloud48_engine::driver::address::Subnet;
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let old: Subnet = "10.61.0.0/24".parse().unwrap();
    let (agent, url) = serve_agent_on("node-s", node("node-s", old), Some((old, None))).await;
    tc.core.agents().add(&url).await.unwrap();
    let id = tc.plain_on("node-s").await;
    let agents = tc.core.agents();
    let register = |info: AgentInfo| async move { agents.register(&info, &idle_stats()).await };
    let mut info = agent.info().clone();
    info.subnet = Some("10.62.0.0/24".into());
    let e = register(info.clone()).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("container {id} has 10.61.0.")) && e.contains("the --subnet"),
        "{e}"
    );
    let row = tc.core.servers().get("node-s").await.unwrap();
    assert_eq!(row.subnet.as_deref(), Some("10.61.0.0/24"), "unchanged");
    // Its own subnet again is welcome, and so is a range of it that leaves the container's
    // address out (a container moved in live from a peer keeps an address of the peer's).
    info.subnet = Some(old.to_string());
    register(info.clone()).await.unwrap();
    info.addresses = Some("10.61.0.100-10.61.0.120".into());
    register(info.clone()).await.unwrap();
    let row = tc.core.servers().get("node-s").await.unwrap();
    assert_eq!(row.addresses.as_deref(), Some("10.61.0.100-10.61.0.120"));
    // Nor may it stop saying which subnet it uses while its containers hold addresses.
    info.subnet = None;
    info.addresses = None;
    let e = register(info).await.unwrap_err().to_string();
    assert!(
        e.contains("reports no --subnet") && e.contains("(10.61.0.0/24)"),
        "{e}"
    );
}

/// Regression (review): a server registered before agents sent their id (an older release)
/// has none, so another agent at another address under its name was taken for it, and the
/// server's containers judged by a data directory without their guests.
#[tokio::test]
async fn an_agent_elsewhere_is_not_taken_for_a_server_whose_agent_id_is_unknown() {
    use sea_orm::ConnectionTrait;
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        ..agent_opts()
    })
    .await
    .unwrap();
    let stats = idle_stats();
    let info = |port: u16, id: Option<&str>, take_over: bool| AgentInfo {
        name: "node-y".into(),
        url: format!("http://127.0.0.1:{port}"),
        driver: "sim".into(),
        capabilities: sim("y", Duration::ZERO).capabilities(),
        labels: vec![],
        subnet: Some("10.9.7.0/24".into()),
        addresses: None,
        heartbeats: None,
        id: id.map(str::to_string),
        take_over,
    };
    let agents = tc.core.agents();
    // An agent of the older release: no id.
    let server = agents
        .register(&info(1, None, false), &stats)
        .await
        .unwrap();
    let c = tc.plain_on("sim-1").await;
    tc.core
        .db()
        .execute_unprepared(&format!(
            "UPDATE containers SET server_id = {server} WHERE id = {c}"
        ))
        .await
        .unwrap();
    let e = agents
        .register(&info(2, Some("agent-new"), false), &stats)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "server node-y has containers and was last run by the agent at http://127.0.0.1:1"
        ) && e.contains("--take-over"),
        "{e}"
    );
    // Nor an agent of that release elsewhere (no id of its own).
    let e = agents
        .register(&info(2, None, false), &stats)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("upgrade it"), "{e}");
    let agent_id = || async {
        use sea_orm::EntityTrait;
        cloud48_engine::entities::server::Entity::find_by_id(server)
            .one(tc.core.db())
            .await
            .unwrap()
            .unwrap()
            .agent_id
    };
    assert_eq!(agent_id().await, None, "unchanged");
    // Its own agent, upgraded, at its address: its id is recorded.
    agents
        .register(&info(1, Some("agent-old"), false), &stats)
        .await
        .unwrap();
    assert_eq!(agent_id().await.as_deref(), Some("agent-old"));
}

/// Issue 19: two agents handing addresses from overlapping subnets could give two containers
/// one address; the core refuses the second with what to do, and says which server it clashes
/// with. An agent keeps its own subnet across heartbeats and restarts.
#[tokio::test]
async fn an_agent_whose_subnet_overlaps_another_s_is_refused() {
    let tc = TestCore::start(agent_opts()).await.unwrap();
    let stats = idle_stats();
    let info = |name: &str, port: u16, subnet: &str| AgentInfo {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}"),
        driver: "sim".into(),
        capabilities: sim("x", Duration::ZERO).capabilities(),
        labels: vec![],
        subnet: Some(subnet.into()),
        addresses: None,
        heartbeats: None,
        id: None,
        take_over: false,
    };
    let agents = tc.core.agents();
    agents
        .register(&info("h1", 1, "10.9.4.0/24"), &stats)
        .await
        .unwrap();
    let e = agents
        .register(&info("h2", 2, "10.9.0.0/16"), &stats)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("agent h2 clashes with server h1: the subnet 10.9.0.0/16 overlaps 10.9.4.0/24")
            && e.contains("--subnet"),
        "{e}"
    );
    agents
        .register(&info("h2", 2, "10.9.5.0/24"), &stats)
        .await
        .unwrap();
    // h1 again, and h1 back at another address: its own subnet is no clash.
    agents
        .register(&info("h1", 1, "10.9.4.0/24"), &stats)
        .await
        .unwrap();
    agents
        .register(&info("h1", 3, "10.9.4.0/24"), &stats)
        .await
        .unwrap();
    // Servers sharing one network (VMs move live between them keeping their address) each
    // hand out a range of it of their own.
    let shared = |name: &str, port: u16, range: Option<&str>| AgentInfo {
        addresses: range.map(String::from),
        ..info(name, port, "10.9.6.0/24")
    };
    agents
        .register(&shared("v1", 5, Some("10.9.6.10-10.9.6.99")), &stats)
        .await
        .unwrap();
    agents
        .register(&shared("v2", 6, Some("10.9.6.100-10.9.6.199")), &stats)
        .await
        .unwrap();
    for (range, why) in [
        (
            Some("10.9.6.150-10.9.6.160"),
            "10.9.6.150-10.9.6.160 overlaps",
        ),
        (None, "--addresses"),
        (Some("10.9.6.1-10.9.6.5"), "not within the guest addresses"),
    ] {
        let e = agents
            .register(&shared("v3", 7, range), &stats)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    }
    let e = agents
        .register(&info("h3", 4, "banana"), &stats)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("'banana' is not an IPv4 subnet"), "{e}");
    let servers: Vec<cloud48_engine::model::Server> = tc.client.get("/v1/servers").await.unwrap();
    assert!(!servers.iter().any(|s| s.name == "h3"));
}

/// A core opened without the agents' token over servers agents run refuses to start, naming
/// a server and the setting: it would refuse their heartbeats and judge every one down.
#[tokio::test]
async fn a_core_without_the_agents_token_refuses_to_start_over_their_servers() {
    use cloud48_engine::core::{Core, CoreConfig};
    let dir = crate::common::tempdir();
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = 0;
    config.agent_token = Some(TOKEN.into());
    config.plugin_cache = Some(std::env::temp_dir().join("cloud48-test-plugin-cache"));
    let core = Core::open(config.clone()).await.unwrap();
    let info = AgentInfo {
        name: "h7".into(),
        url: "http://127.0.0.1:9".into(),
        driver: "sim".into(),
        capabilities: sim("x", Duration::ZERO).capabilities(),
        labels: vec![],
        subnet: None,
        addresses: None,
        heartbeats: None,
        id: None,
        take_over: false,
    };
    core.agents().register(&info, &idle_stats()).await.unwrap();
    core.stop(Duration::ZERO).await;
    drop(core);
    config.agent_token = None;
    let err = Core::open(config.clone()).await.err().expect("refused");
    let err = err.to_string();
    assert!(
        err.contains("server h7") && err.contains("CLOUD48_AGENT_TOKEN"),
        "{err}"
    );
    // With the token it opens again, nothing lost.
    config.agent_token = Some(TOKEN.into());
    let core = Core::open(config).await.unwrap();
    assert!(
        core.servers()
            .list()
            .await
            .unwrap()
            .iter()
            .any(|s| s.name == "h7")
    );
    core.stop(Duration::ZERO).await;
}
