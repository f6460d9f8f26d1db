//! `server remove`: a server whose agent is gone for good leaves the database and every core,
//! and its name and subnet serve a new agent.

use cloud48_engine::agents::RemovedServer;
use cloud48_engine::driver::address::Subnet;
use cloud48_engine::model::{Container, ContainerStatus, Topic};

use super::*;
use crate::common::ManualClock;

async fn remove(tc: &TestCore, key: &str) -> anyhow::Result<RemovedServer> {
    tc.client.delete(&format!("/v1/servers/{key}")).await
}

async fn refusal(tc: &TestCore, key: &str) -> String {
    format!("{:#}", remove(tc, key).await.unwrap_err())
}

/// Refused while the server is up, simulated, unknown or holding containers, each saying what
/// to do; once its agent is silent and its containers given up, removed (they are destroyed,
/// the stream says so), and an agent under its name and subnet is a new server.
#[tokio::test]
async fn a_server_gone_for_good_is_removed_and_its_name_and_subnet_are_free_again() {
    let clock = ManualClock::at(1_000_000);
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        clock: Some(clock.clone()),
        ..agent_opts()
    })
    .await
    .unwrap();
    let grace = tc.core.config().health.grace.as_millis() as i64;
    let net: Subnet = "10.64.0.0/24".parse().unwrap();
    let (_agent, url) = serve_agent_on("node-r", node("node-r", net), Some((net, None))).await;
    let id = tc.core.agents().add(&url).await.unwrap();
    let kept = tc.plain_on("node-r").await;
    let given_up = tc.plain_on("node-r").await;
    let e = refusal(&tc, "node-r").await;
    assert!(
        e.contains("server node-r is up") && e.contains("cloud48 server drain node-r"),
        "{e}"
    );
    let e = refusal(&tc, "sim-1").await;
    assert!(
        e.contains("simulated") && e.contains("--sim-servers"),
        "{e}"
    );
    let e = refusal(&tc, "nowhere").await;
    assert!(e.contains("server 'nowhere' does not exist"), "{e}");

    // Its agent gone: silent past the grace period, then marked down with its containers.
    clock.advance(grace + 1);
    assert!(tc.core.monitor().mark_down(id, "test").await.unwrap());
    let e = refusal(&tc, "node-r").await;
    assert!(
        e.contains(&format!("{kept} (down), {given_up} (down)"))
            && e.contains("cloud48 container destroy"),
        "{e}"
    );
    // Its subnet is still its own: an agent of another name there is told how to free it.
    let (_other, other) = serve_agent_on("node-z", node("node-z", net), Some((net, None))).await;
    let e = tc.core.agents().add(&other).await.unwrap_err().to_string();
    assert!(
        e.contains("remove it (`cloud48 server remove node-r`)"),
        "{e}"
    );
    // Given up (a container down with its server is destroyed at once, its guest later).
    for c in [kept, given_up] {
        let a: cloud48_engine::model::Accepted = tc
            .client
            .submit::<()>(&format!("/v1/containers/{c}"), None)
            .await
            .unwrap();
        tc.ok(a.command_id).await;
    }
    let (mut servers, _) = crate::events::open(&tc.client, "/v1/events?topic=server").await;
    let removed = remove(&tc, &id.to_string()).await.unwrap();
    assert_eq!((removed.server.as_str(), removed.id), ("node-r", id));
    assert_eq!(removed.destroyed, vec![kept.0, given_up.0]);
    // The stream tells it (it may first catch up with the server's going down).
    let told = crate::events::until(&mut servers, |e| e.action == "removed").await;
    let last = told.last().unwrap();
    assert_eq!((last.topic, last.object_id), (Topic::Server, id));
    for c in [kept, given_up] {
        let row: Container = tc.client.get(&format!("/v1/containers/{c}")).await.unwrap();
        assert_eq!(row.status, ContainerStatus::Destroyed, "container {c}");
    }
    assert!(tc.core.servers().get("node-r").await.is_err());
    assert!(tc.core.fleet().driver(id).is_none());
    assert!(tc.core.placement().snapshot().iter().all(|s| s.id != id));
    let e = refusal(&tc, "node-r").await;
    assert!(e.contains("does not exist"), "{e}");

    // A new agent under the name and subnet: a new server, which takes containers.
    let (_agent, url) = serve_agent_on("node-r", node("node-r", net), Some((net, None))).await;
    let again = tc.core.agents().add(&url).await.unwrap();
    assert_ne!(again, id);
    let c = tc.plain_on("node-r").await;
    let row: Container = tc.client.get(&format!("/v1/containers/{c}")).await.unwrap();
    assert!(
        row.ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.64.0.")),
        "{row:?}"
    );
}

/// A server removed through one core is forgotten by the others when they next read the
/// servers: the agent that ran it, coming back as it was (same name, address and subnet),
/// registers a new server there instead of being taken for the removed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_removed_through_one_core_is_forgotten_by_the_others() {
    let Some(pg) = crate::common::PgDb::create().await else {
        return;
    };
    let (_dirs, cores) = crate::cluster::agent_cores(&pg, 2).await;
    let (a, b) = (&cores[0], &cores[1]);
    let info = AgentInfo {
        subnet: Some("10.65.0.0/24".into()),
        ..sim_agent("node-q", 20_999)
    };
    let id = a.agents().register(&info, &idle_stats()).await.unwrap();
    b.sync_cluster().await.unwrap();
    assert!(b.fleet().driver(id).is_some(), "the other core attached it");
    assert!(a.monitor().mark_down(id, "test").await.unwrap());
    // Core b never heard the agent itself: the monitor's verdict (down) is what it goes by.
    let removed = b.agents().remove("node-q").await.unwrap();
    assert_eq!(removed.id, id);
    a.sync_cluster().await.unwrap();
    assert!(a.fleet().driver(id).is_none(), "core a forgot its driver");
    assert!(a.placement().snapshot().iter().all(|s| s.id != id));
    let again = a.agents().register(&info, &idle_stats()).await.unwrap();
    assert_ne!(again, id, "a new server, not the removed one");
    let servers = b.servers().list().await.unwrap();
    assert_eq!(
        servers
            .iter()
            .map(|s| (s.id.0, s.name.as_str()))
            .collect::<Vec<_>>(),
        [(again, "node-q")]
    );
}
