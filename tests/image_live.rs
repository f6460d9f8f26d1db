//! Containers that run their image moving live between linux servers through CRIU: what only
//! their memory held comes along with their files and address, a move that cannot finish
//! leaves the container running where it was (also when its agent stopped in the middle), and
//! a server on another network says why it cannot take one. Needs root, runc and CRIU 4.2.1 or later (`.ci/run` builds it).

use std::sync::Arc;

use cloud48_engine::driver::{Driver, GuestSpec, GuestState, LiveTarget};

use crate::image_guests::{answer, mounted, on_network, runc_knows, sh, source, spec, web};
use crate::linux::{Sweep, unique_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn keeping(guest: &str, ip: &str) -> GuestSpec {
    GuestSpec {
        ip: Some(ip.to_string()),
        ..spec(guest, web())
    }
}

#[tokio::test]
async fn a_running_container_moves_live_with_its_memory_files_and_address() {
    let source = source().await;
    let prefix = unique_prefix('v');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br90"), format!("{prefix}br91")],
    };
    let dir = crate::common::tempdir();
    let d0 = on_network(dir.path(), &prefix, 90, 0, source.clone()).await;
    let d1 = on_network(dir.path(), &prefix, 90, 1, source.clone()).await;
    assert!(
        d0.capabilities().live_migrate,
        "this server cannot move containers live: CRIU 4.2.1 or later must be installed (.ci/run builds it)"
    );
    let ip = d0.create(&spec("web-l", web())).await.unwrap().ip.unwrap();
    // From server 0's range of the shared subnet (server 1 gives another).
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!((10..=29).contains(&last), "{ip}");
    d0.start("web-l").await.unwrap();
    // What only its memory holds: a file on a tmpfs and a process started after it.
    let (code, pid) = sh(
        &d0,
        "web-l",
        "echo in-memory > /dev/shm/mark; echo on-disk > /srv/disk; sleep 4321 >/dev/null 2>&1 & echo $!",
    )
    .await;
    assert_eq!(code, 0, "{pid}");

    // A connection open when it moves (a client inside holds one its server has answered and
    // closed): the move does not fail on it (CRIU restores it closed).
    let (code, out) = sh(
        &d0,
        "web-l",
        "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(q(127.0.0.1:8080)) or die; sleep 4000' >/dev/null 2>&1 & until grep -q ' 08 ' /proc/net/tcp /proc/net/tcp6; do sleep 0.05; done",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let offer = d0.live_offer("web-l").await.unwrap();
    let target = d1
        .live_receive(&keeping("web-l", &ip), &offer)
        .await
        .unwrap();
    assert_eq!(
        d1.status("web-l").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped),
        "the target's copy runs before it arrived"
    );
    let report = d0.live_send("web-l", &target).await.unwrap();
    d1.live_finish("web-l").await.unwrap();
    assert!(
        report.memory_bytes > 0 && report.disk_bytes > 0,
        "{report:?}"
    );
    assert_eq!(
        d0.status("web-l").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
    assert!(!runc_knows(&format!("{prefix}0"), "web-l"));
    assert!(!mounted(&dir.path().join("server-0/guests/web-l/merged")));
    assert_eq!(
        d1.status("web-l").await.unwrap().map(|g| g.state),
        Some(GuestState::Running)
    );
    // Same address, same processes, same memory: not a new start.
    assert_eq!(answer(&ip).await, "page=from-the-image uid=0 host=web-l");
    let (code, out) = sh(
        &d1,
        "web-l",
        &format!("cat /dev/shm/mark /srv/disk; tr '\\0' ' ' < /proc/{pid}/cmdline"),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["in-memory", "on-disk", "sleep", "4321"]
    );
    d0.destroy("web-l").await.unwrap();

    // A target lost before the send: the move fails and the container runs on where it was,
    // from its memory (restored, not started again).
    let offer = d1.live_offer("web-l").await.unwrap();
    let to = d0
        .live_receive(&keeping("web-l", &ip), &offer)
        .await
        .unwrap();
    d0.destroy("web-l").await.unwrap();
    let failed = d1.live_send("web-l", &to).await.unwrap_err().to_string();
    assert!(failed.contains("runs on here"), "{failed}");
    assert_eq!(
        d1.status("web-l").await.unwrap().map(|g| g.state),
        Some(GuestState::Running)
    );
    let (_, out) = sh(&d1, "web-l", "cat /dev/shm/mark").await;
    assert_eq!(out, "in-memory");
    assert_eq!(answer(&ip).await, "page=from-the-image uid=0 host=web-l");

    // A send cut short (its agent stopped once the container was checkpointed, sending what
    // changed since its files went): the driver, opened again, restores it from its
    // checkpoint.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let nowhere = LiveTarget {
        host: "127.0.0.1".into(),
        disk_port: port,
        memory_port: port,
        token: "t".into(),
    };
    let stall = async {
        // Its files, whole, while it runs: taken and answered.
        let (mut files, _) = listener.accept().await.unwrap();
        files.read_to_end(&mut Vec::new()).await.unwrap();
        files.write_all(b"ok\n").await.unwrap();
        // What changed since, after the checkpoint: never answered.
        listener.accept().await.unwrap()
    };
    let _stalled = tokio::select! {
        sent = d1.live_send("web-l", &nowhere) => panic!("a send to a silent target ended: {sent:?}"),
        conn = stall => conn,
    };
    assert_eq!(
        d1.status("web-l").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
    drop(d1);
    let d1 = on_network(dir.path(), &prefix, 90, 1, source.clone()).await;
    assert_eq!(
        d1.status("web-l").await.unwrap().map(|g| g.state),
        Some(GuestState::Running)
    );
    let (_, out) = sh(&d1, "web-l", "cat /dev/shm/mark").await;
    assert_eq!(out, "in-memory");
    assert_eq!(answer(&ip).await, "page=from-the-image uid=0 host=web-l");

    // A restored container is an ordinary one: it stops and starts (its files kept).
    d1.stop("web-l").await.unwrap();
    assert!(!runc_knows(&format!("{prefix}1"), "web-l"));
    d1.start("web-l").await.unwrap();
    let (_, out) = sh(&d1, "web-l", "cat /srv/disk").await;
    assert_eq!(out, "on-disk");

    // A server on another network cannot take it and says why; nothing is left there.
    let far = on_network(dir.path(), &prefix, 91, 2, source.clone()).await;
    let offer = d1.live_offer("web-l").await.unwrap();
    let refused = far
        .live_receive(&keeping("web-l", &ip), &offer)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("another network"), "{refused}");
    assert!(far.status("web-l").await.unwrap().is_none());
    // Nor can a stopped container move live.
    d1.stop("web-l").await.unwrap();
    assert!(d1.live_offer("web-l").await.is_err());
    d1.destroy("web-l").await.unwrap();
}

/// A container type whose containers run the test image's web server.
struct ImageWeb;

impl cloud48_engine::types::ContainerType for ImageWeb {
    fn type_id(&self) -> &str {
        "imgweb"
    }
    fn priority(&self) -> i32 {
        10
    }
    fn default_requirements(&self) -> cloud48_engine::model::Requirements {
        cloud48_engine::model::Requirements {
            resources: spec("x", web()).resources,
            labels: Vec::new(),
            spread: false,
        }
    }
    fn workload(&self) -> cloud48_engine::model::Workload {
        web()
    }
    fn handle(
        &self,
        _hook: &cloud48_engine::types::Hook,
        _ctx: &cloud48_engine::types::HookContext<'_>,
    ) -> Result<cloud48_engine::types::HookOutcome, cloud48_engine::types::TypeError> {
        Ok(cloud48_engine::types::HookOutcome::allow())
    }
}

#[tokio::test]
async fn container_migrate_live_and_a_live_drain_move_an_image_container_through_the_core() {
    use crate::common::{Opts, TestCore};
    use serde_json::json;

    let source = source().await;
    let prefix = unique_prefix('w');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br92"), format!("{prefix}br93")],
    };
    let dir = crate::common::tempdir();
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        agent_token: Some(crate::agent::TOKEN.into()),
        types: vec![Arc::new(ImageWeb)],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut names = Vec::new();
    for n in 0..2 {
        let d = on_network(dir.path(), &prefix, 92, n, source.clone()).await;
        let name = format!("{prefix}-{n}");
        let net = Some(d.network());
        let (_, url) = crate::agent::serve_agent_on(&name, Arc::new(d), net).await;
        tc.core.agents().add(&url).await.unwrap();
        names.push(name);
    }
    let cmd: serde_json::Value = tc
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "imgweb", "server": names[0] }),
        )
        .await
        .unwrap();
    let id = tc.created(cmd["command_id"].as_i64().unwrap()).await;
    let c = tc.core.containers().get_by_id(id).await.unwrap();
    let ip = c.ip.clone().unwrap();
    let exec = async |script: &str| {
        let out: serde_json::Value = tc
            .client
            .post(
                &format!("/v1/containers/{id}/exec"),
                &json!({ "command": ["sh", "-c", script] }),
            )
            .await
            .unwrap();
        out["stdout"].as_str().unwrap().trim().to_string()
    };
    exec("echo in-memory > /dev/shm/mark").await;

    let a: serde_json::Value = tc
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "live": true, "to": names[1] }),
        )
        .await
        .unwrap();
    let done = tc.ok(a["command_id"].as_i64().unwrap()).await;
    let result = done.result.expect("the command's result");
    assert!(result["live"]["downtime_ms"].as_u64().is_some(), "{result}");
    assert!(
        result["live"]["memory_bytes"].as_u64().unwrap() > 0,
        "{result}"
    );
    // Same address, new server, running, its memory along; nothing left on the source.
    let moved = tc.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(moved.server.as_deref(), Some(names[1].as_str()));
    assert_eq!(moved.ip.as_deref(), Some(ip.as_str()));
    assert_eq!(
        moved.status,
        cloud48_engine::model::ContainerStatus::Running
    );
    assert_eq!(exec("cat /dev/shm/mark").await, "in-memory");
    assert_eq!(
        answer(&ip).await,
        format!("page=from-the-image uid=0 host={}", c.guest_id)
    );
    let servers = tc.core.servers().list().await.unwrap();
    let from = servers.iter().find(|s| s.name == names[0]).unwrap();
    assert_eq!((from.containers, from.dummies), (0, 0));
    assert!(
        !dir.path()
            .join(format!("server-0/guests/{}", c.guest_id))
            .exists()
    );

    // A live-capable server on another network cannot take it (it keeps its address): the
    // refusal names both servers, and placement passes over that server in the drain below.
    let d = on_network(dir.path(), &prefix, 93, 2, source.clone()).await;
    let other = format!("{prefix}-2");
    let net = Some(d.network());
    let (_, url) = crate::agent::serve_agent_on(&other, Arc::new(d), net).await;
    tc.core.agents().add(&url).await.unwrap();
    let err = tc
        .client
        .post::<_, serde_json::Value>(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "live": true, "to": other }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "server {other} is not on the network of server {}",
            names[1]
        )) && err.contains("without --live"),
        "{err}"
    );
    let err = tc
        .client
        .post::<_, serde_json::Value>(
            &format!("/v1/servers/{other}/drain"),
            &json!({ "live": true }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shares its network with no other server"),
        "{err}"
    );

    // Draining its server live sends it back, past the simulated server (which cannot take a
    // running container).
    let report: serde_json::Value = tc
        .client
        .post(
            &format!("/v1/servers/{}/drain", names[1]),
            &json!({ "live": true }),
        )
        .await
        .unwrap();
    let drained = report["commands"].as_array().unwrap();
    assert_eq!(drained.len(), 1, "{report}");
    tc.ok(drained[0].as_i64().unwrap()).await;
    let back = tc.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(back.server.as_deref(), Some(names[0].as_str()));
    assert_eq!(back.ip.as_deref(), Some(ip.as_str()));
    assert_eq!(exec("cat /dev/shm/mark").await, "in-memory");
}

/// An operator loads a server with images before containers need them: from another server's
/// agent (this server has no core to pull from), or from an OCI layout on the server; a
/// container of the image then starts there. A wrong request says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_fetches_images_ahead_of_need_from_a_peer_or_a_file() {
    use crate::common::{Opts, TestCore};
    use cloud48_engine::agent::images::CoreImages;
    use cloud48_engine::driver::linux::images::ImageSource;
    use cloud48_engine::driver::linux::{ImagesConfig, LinuxDriver};
    use serde_json::json;

    let source = source().await;
    let prefix = unique_prefix('f');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0"), format!("{prefix}br1")],
    };
    let dir = crate::common::tempdir();
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        agent_token: Some(crate::agent::TOKEN.into()),
        types: vec![Arc::new(ImageWeb)],
        ..Default::default()
    })
    .await
    .unwrap();
    // The holder pulls from the test's store; the other has no core, only its peers.
    let holder = crate::image_guests::open(dir.path(), &prefix, 94, 0, source.clone()).await;
    let held = holder.image_store().unwrap();
    held.pull(
        &*source,
        "test/web",
        Some(&"test/web".parse().unwrap()),
        &mut |_| {},
    )
    .unwrap();
    let (agent, url) = crate::agent::serve_agent(&format!("{prefix}-0"), Arc::new(holder)).await;
    agent.serve_images(held);
    tc.core.agents().add(&url).await.unwrap();
    let mut cfg = crate::linux::config(dir.path(), &prefix, 94, 1);
    let runtime = tokio::runtime::Handle::current();
    cfg.images = Some(ImagesConfig {
        source: None,
        peers: Some(Arc::new(move |peer: &str| {
            Arc::new(CoreImages::new(peer, crate::agent::TOKEN, runtime.clone())) as ImageSource
        })),
        cache_bytes: None,
        migration_host: None,
    });
    let bare = Arc::new(LinuxDriver::open(cfg).await.unwrap());
    let store = bare.image_store().unwrap();
    let (_, url) = crate::agent::serve_agent(&format!("{prefix}-1"), bare.clone()).await;
    tc.core.agents().add(&url).await.unwrap();
    let (from, to) = (format!("{prefix}-0"), format!("{prefix}-1"));
    let fetch = |server: String, body: serde_json::Value| {
        let tc = &tc;
        async move {
            tc.client
                .post::<_, serde_json::Value>(&format!("/v1/servers/{server}/images"), &body)
                .await
        }
    };

    // From the peer, by name: whole and verified; a container of it then runs there.
    let got = fetch(
        to.clone(),
        json!({ "image": "test/web", "from_server": from }),
    )
    .await
    .unwrap();
    let digest = store.show("test/web").unwrap().summary.digest;
    assert_eq!(
        got["images"],
        json!([format!("test/web:latest@{digest}")]),
        "{got}"
    );
    let cmd: serde_json::Value = tc
        .client
        .post("/v1/containers", &json!({ "type": "imgweb", "server": to }))
        .await
        .unwrap();
    let id = tc.created(cmd["command_id"].as_i64().unwrap()).await;
    let c = tc.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(c.server.as_deref(), Some(to.as_str()));
    assert!(
        answer(c.ip.as_deref().unwrap())
            .await
            .contains("from-the-image")
    );

    // From an OCI layout on the server: every image in it.
    let (_, small) = crate::images::layout(dir.path(), "test/small:1", 2);
    let layout = dir.path().join("layout");
    let got = fetch(to.clone(), json!({ "file": layout })).await.unwrap();
    assert_eq!(
        got["images"],
        json!([format!("test/small:1@{}", small.digest)])
    );
    assert_eq!(
        store.show("test/small:1").unwrap().summary.digest,
        small.digest
    );

    // Wrong requests, each with what is wrong.
    for (server, body, says) in [
        (
            to.clone(),
            json!({ "image": "test/web", "from_server": from, "file": "/x" }),
            "not both",
        ),
        (
            to.clone(),
            json!({ "from_server": from }),
            "name the image to fetch",
        ),
        (
            to.clone(),
            json!({ "image": "test/web", "from_server": "sim-1" }),
            "not run by a node agent",
        ),
        (
            to.clone(),
            json!({ "image": "test/web", "from_server": to }),
            "from itself",
        ),
        (
            to.clone(),
            json!({ "file": "layout" }),
            "not an absolute path",
        ),
        (
            to.clone(),
            json!({ "file": "/nowhere/at-all.tar" }),
            "cannot import /nowhere/at-all.tar",
        ),
        (
            to.clone(),
            json!({ "image": "test/none:1" }),
            "no core to pull it from",
        ),
        (
            "sim-1".to_string(),
            json!({ "image": "test/web" }),
            "runs no images",
        ),
    ] {
        let e = fetch(server, body.clone()).await.unwrap_err().to_string();
        assert!(e.contains(says), "{body}: {e}");
    }
    bare.destroy(&c.guest_id).await.unwrap();
}
