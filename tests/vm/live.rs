//! VMs moving live: a running VM with its disk and address under a client's load, and through
//! the core (`container migrate --live`, a live drain) with no failed request.

use super::*;

#[tokio::test]
async fn a_running_vm_moves_live_with_its_disk_and_address_and_no_failed_request() {
    let _one = crate::common::HEAVY.lock().await;
    let (f, _sweep) = factory('l', 50, source().await);
    // Two servers on one network (the VM keeps its address): one bridge, one subnet.
    let same_net = |n: u32| same_network(&f, 50, n);
    let d0 = QemuDriver::open(same_net(0)).await.unwrap();
    let d1 = QemuDriver::open(same_net(1)).await.unwrap();
    let info = d0.create(&spec("vm-m", web_vm())).await.unwrap();
    let ip = info.ip.unwrap();
    d0.start("vm-m").await.unwrap();
    d0.exec("vm-m", "echo before > /srv/mine; sync", &[])
        .await
        .unwrap();

    move_live(&d0, &d1, "vm-m", &ip).await;
    // Its disk came along, and it goes on writing there.
    let out = d1
        .exec("vm-m", "cat /srv/mine; echo after >> /srv/mine", &[])
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "before");
    d0.destroy("vm-m").await.unwrap();

    // And back, through the servers' agents.
    let r0 = remote(&f, Arc::new(d0), 0).await;
    let r1 = remote(&f, Arc::new(d1), 1).await;
    assert!(r0.capabilities().live_migrate);
    move_live(&r1, &r0, "vm-m", &ip).await;
    let out = r0.exec("vm-m", "cat /srv/mine", &[]).await.unwrap();
    assert_eq!(
        out.stdout.split_whitespace().collect::<Vec<_>>(),
        ["before", "after"]
    );

    // A target that is lost after the send: the source goes on from its memory (not a new
    // boot: what only its memory held is there), so exactly one VM runs.
    r0.exec("vm-m", "echo in-memory > /run/mark", &[])
        .await
        .unwrap();
    let offer = r0.live_offer("vm-m").await.unwrap();
    let to = r1
        .live_receive(
            &GuestSpec {
                ip: Some(ip.clone()),
                ..spec("vm-m", web_vm())
            },
            &offer,
        )
        .await
        .unwrap();
    r0.live_send("vm-m", &to).await.unwrap();
    assert_eq!(
        r0.status("vm-m").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
    r1.destroy("vm-m").await.unwrap();
    r0.start("vm-m").await.unwrap();
    let out = r0.exec("vm-m", "cat /run/mark", &[]).await.unwrap();
    assert_eq!(out.stdout.trim(), "in-memory");
    assert_eq!(answer(&ip).await, "page=from-the-image host=vm-m");

    // A server on another network cannot take it live, and says why; the VM runs on.
    let other = f.make(2).await;
    let offer = r0.live_offer("vm-m").await.unwrap();
    // Nor can one whose QEMU lacks the VM's machine type, or whose CPU differs; the offer
    // names the versioned machine type the VM was started on.
    let machine = offer
        .machine
        .clone()
        .expect("the offer says the VM's machine");
    assert!(machine.machine_type.starts_with("pc-q35-"), "{machine:?}");
    for (changed, why) in [
        (
            MachineModel {
                machine_type: "pc-q35-99.0".into(),
                ..machine.clone()
            },
            "machine type pc-q35-99.0 is unknown",
        ),
        (
            MachineModel {
                accel: cloud48_engine::driver::Accel::Kvm,
                cpu: "host (another CPU)".into(),
                ..machine.clone()
            },
            "runs under kvm",
        ),
    ] {
        let err = r1
            .live_receive(
                &GuestSpec {
                    ip: Some(ip.clone()),
                    ..spec("vm-m", web_vm())
                },
                &LiveOffer {
                    machine: Some(changed),
                    ..offer.clone()
                },
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(why) && err.contains("without --live"), "{err}");
        assert!(r1.status("vm-m").await.unwrap().is_none());
    }
    let err = other
        .live_receive(
            &GuestSpec {
                ip: Some(ip.clone()),
                ..spec("vm-m", web_vm())
            },
            &offer,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("without --live"), "{err}");
    assert!(other.status("vm-m").await.unwrap().is_none());
    assert_eq!(answer(&ip).await, "page=from-the-image host=vm-m");
}

#[tokio::test]
async fn container_migrate_live_and_a_live_drain_move_a_vm_through_the_core_with_no_failed_request()
{
    let _one = crate::common::HEAVY.lock().await;
    use crate::common::{Opts, TestCore};
    use serde_json::json;

    let (f, _sweep) = factory('c', 60, source().await);
    let same_net = |n: u32| same_network(&f, 60, n);
    let tc = TestCore::start(Opts {
        sim_servers: 1,
        agent_token: Some(crate::agent::TOKEN.into()),
        types: vec![Arc::new(VmWeb)],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut names = Vec::new();
    for n in 0..2 {
        let d = QemuDriver::open(same_net(n)).await.unwrap();
        let name = format!("{}-{n}", f.prefix);
        let net = Some(d.network());
        let (_, url) = crate::agent::serve_agent_on(&name, Arc::new(d), net).await;
        tc.core.agents().add(&url).await.unwrap();
        names.push(name);
    }
    let cmd: serde_json::Value = tc
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "vmweb", "server": names[0] }),
        )
        .await
        .unwrap();
    let id = tc.created(cmd["command_id"].as_i64().unwrap()).await;
    let c = tc.core.containers().get_by_id(id).await.unwrap();
    let ip = c.ip.clone().unwrap();
    assert_eq!(
        answer(&ip).await,
        format!("page=from-the-image host={}", c.guest_id)
    );
    // Another vCPU for the running VM, which booted without room to grow (the server's
    // default): refused with the reason, and the guest keeps its one.
    let nproc = async || {
        let out: serde_json::Value = tc
            .client
            .post(
                &format!("/v1/containers/{id}/exec"),
                &json!({ "command": ["nproc"] }),
            )
            .await
            .unwrap();
        out["stdout"].as_str().unwrap().trim().to_string()
    };
    let u: serde_json::Value = tc
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "update",
                     "resources": { "cpu_millis": 2000, "memory_mb": 256, "disk_mb": 2048 } }),
        )
        .await
        .unwrap();
    let refused = tc.wait(u["command_id"].as_i64().unwrap()).await;
    assert_eq!(refused.status, cloud48_engine::model::CommandStatus::Failed);
    let why = refused.error.unwrap_or_default();
    assert!(
        why.contains("it may have 1 at most") && why.contains("stop and start it"),
        "{why}"
    );
    assert_eq!(nproc().await, "1");

    // A simulated server cannot take a running container; the refusal says why.
    let err = tc
        .client
        .post::<_, serde_json::Value>(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "live": true, "to": "sim-1" }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server sim-1 reports no live migration"),
        "{err}"
    );

    let client = Load::start(ip.clone());
    client.answers(5).await;
    let a: serde_json::Value = tc
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "live": true, "to": names[1] }),
        )
        .await
        .unwrap();
    let done = tc.ok(a["command_id"].as_i64().unwrap()).await;
    // It answers from its new place too.
    client.answers(5).await;
    let (ok, failed) = client.finish().await;
    assert!(
        failed.is_empty(),
        "requests failed during the migration: {failed:?}"
    );
    assert!(ok > 10, "too few answers to judge: {ok}");

    // Same address, new server, running all along; the command tells how the move went.
    let moved = tc.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(moved.server.as_deref(), Some(names[1].as_str()));
    assert_eq!(moved.ip.as_deref(), Some(ip.as_str()));
    assert_eq!(
        moved.status,
        cloud48_engine::model::ContainerStatus::Running
    );
    let result = done.result.expect("the command's result");
    assert!(result["live"]["downtime_ms"].as_u64().is_some(), "{result}");
    assert!(
        result["live"]["memory_bytes"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert_eq!(nproc().await, "1");
    // Nothing is left on the source, and the dummy that held the target's room is gone.
    let servers = tc.core.servers().list().await.unwrap();
    let source = servers.iter().find(|s| s.name == names[0]).unwrap();
    assert_eq!((source.containers, source.dummies), (0, 0));
    let target = servers.iter().find(|s| s.name == names[1]).unwrap();
    assert_eq!((target.containers, target.dummies), (1, 0));
    assert!(
        !f.dir
            .path()
            .join(format!("server-0/guests/{}", c.guest_id))
            .exists()
    );

    // A server that cannot migrate live refuses a live drain, and stays as it was.
    let err = tc
        .client
        .post::<_, serde_json::Value>("/v1/servers/sim-1/drain", &json!({ "live": true }))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("server sim-1 cannot drain live"), "{err}");
    let sim = tc.core.servers().get("sim-1").await.unwrap();
    assert!(!sim.draining);

    // Draining the VM's server live sends it back while it serves: placement passes over the
    // simulated server (roomier, but it cannot receive a running VM).
    let client = Load::start(ip.clone());
    client.answers(5).await;
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
    let done = tc.ok(drained[0].as_i64().unwrap()).await;
    assert!(done.result.unwrap()["live"]["downtime_ms"].is_u64());
    client.answers(5).await;
    let (_, failed) = client.finish().await;
    assert!(
        failed.is_empty(),
        "requests failed during the drain: {failed:?}"
    );
    let back = tc.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(back.server.as_deref(), Some(names[0].as_str()));
    assert_eq!(back.ip.as_deref(), Some(ip.as_str()));
    let drained = tc.core.servers().get(&names[1]).await.unwrap();
    assert!(drained.draining);
    assert_eq!((drained.containers, drained.dummies), (0, 0));
}
