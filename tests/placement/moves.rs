//! Containers and environments that move through placement: migrate without a target, clone,
//! environment clone, drain, export and import between platforms, the rebalancer.

use super::*;

/// The seed environment: two tomcats on sim-1 and sim-2 and the balancer the second asks for.
async fn seed(t: &TestCore, name: &str) -> (Vec<ContainerId>, ContainerId) {
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": name }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut tomcats = Vec::new();
    for server in ["sim-1", "sim-2"] {
        let a: Accepted = t
            .client
            .post(
                &format!("/v1/environments/{name}/containers"),
                &json!({ "type": "tomcat", "server": server }),
            )
            .await
            .unwrap();
        tomcats.push(t.created(a.command_id).await);
    }
    let env: Environment = t
        .client
        .get(&format!("/v1/environments/{name}"))
        .await
        .unwrap();
    let balancer = env
        .members
        .iter()
        .find(|m| m.type_id.starts_with("balancer"))
        .unwrap()
        .id;
    (tomcats, balancer)
}

async fn upstreams(t: &TestCore, balancer: ContainerId) -> Vec<String> {
    let mut list: Vec<String> =
        serde_json::from_value(show(t, balancer).await.inspect.unwrap()["upstreams"].clone())
            .unwrap();
    list.sort();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_without_a_target_lets_placement_choose_and_keeps_the_environment_wired() {
    let t = TestCore::start(Opts {
        sim_servers: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let (tomcats, balancer) = seed(&t, "shop").await;
    let before = show(&t, tomcats[0]).await;
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", tomcats[0]),
            &json!({ "op": "migrate" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let after = show(&t, tomcats[0]).await;
    assert_ne!(
        after.server_id, before.server_id,
        "placement never picks the current server"
    );
    assert_eq!(after.status, ContainerStatus::Running);
    // Each simulated server has a network of its own, as real ones do: moved cold, the
    // container takes an address of its new server's (its old one may be handed out again
    // there), and the environment is wired to it.
    assert_ne!(
        after.ip, before.ip,
        "an address of the new server's network"
    );
    assert_eq!(
        upstreams(&t, balancer).await,
        t.addresses(&tomcats).await,
        "the balancer reaches both tomcats at their addresses now"
    );
    let old = t.sim(before.server.as_deref().unwrap()).await;
    let new = t.sim(after.server.as_deref().unwrap()).await;
    assert!(
        old.guest(&before.guest_id).is_none(),
        "the source copy is gone"
    );
    assert!(new.guest(&before.guest_id).is_some());
    assert_ledger_clean(&t).await;

    // A named target that is the current server is refused up front.
    let here = after.server.clone().unwrap();
    let err = t
        .client
        .post::<_, Accepted>(
            &format!("/v1/containers/{}/actions", tomcats[0]),
            &ContainerCommand::Migrate {
                to: Some(here),
                live: false,
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already on server"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_through_placement_copies_state_and_disk() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a = create(&t, &plain(Some("sim-1"))).await;
    let id = t.created(a.command_id).await;
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "clone" }),
        )
        .await
        .unwrap();
    let copy = t.created(a.command_id).await;
    assert_ne!(copy, id);
    let (src, dst) = (show(&t, id).await, show(&t, copy).await);
    assert_eq!(dst.status, ContainerStatus::Running);
    assert_eq!(
        src.status,
        ContainerStatus::Running,
        "the source runs again"
    );
    assert_ne!(dst.ip, src.ip);
    let src_guest = t
        .sim(src.server.as_deref().unwrap())
        .await
        .guest(&src.guest_id)
        .unwrap();
    let dst_guest = t
        .sim(dst.server.as_deref().unwrap())
        .await
        .guest(&dst.guest_id)
        .unwrap();
    assert_eq!(dst_guest.disk, src_guest.disk);
    assert_eq!(
        dst_guest.operations.first().map(String::as_str),
        Some("import")
    );
    assert_ledger_clean(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_clone_is_wired_to_itself() {
    let t = TestCore::start(Opts {
        sim_servers: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let (tomcats, balancer) = seed(&t, "shop").await;
    let a: Accepted = t
        .client
        .post(
            "/v1/environments/shop/clone",
            &json!({ "name": "shop-copy" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let copy: Environment = t.client.get("/v1/environments/shop-copy").await.unwrap();
    assert_eq!(copy.status.to_string(), "active");
    let kinds: Vec<&str> = copy
        .members
        .iter()
        .map(|m| m.type_id.split('@').next().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["balancer", "tomcat", "tomcat"],
        "every member cloned once, no extra balancer"
    );
    let copy_tomcats: Vec<ContainerId> = copy
        .members
        .iter()
        .filter(|m| m.type_id.starts_with("tomcat"))
        .map(|m| m.id)
        .collect();
    let copy_balancer = copy
        .members
        .iter()
        .find(|m| m.type_id.starts_with("balancer"))
        .unwrap()
        .id;
    assert!(copy_tomcats.iter().all(|id| !tomcats.contains(id)));
    assert_eq!(
        upstreams(&t, copy_balancer).await,
        t.addresses(&copy_tomcats).await,
        "the copy's balancer points at the copy's tomcats"
    );
    assert_eq!(
        upstreams(&t, balancer).await,
        t.addresses(&tomcats).await,
        "the source is untouched"
    );
    for m in &copy.members {
        let guest = t
            .sim(m.server.as_deref().unwrap())
            .await
            .guest(&m.guest_id)
            .unwrap();
        assert_eq!(
            guest.operations.first().map(String::as_str),
            Some("import"),
            "member {} was copied from its source's disk",
            m.id
        );
    }
    let err = t
        .client
        .post::<_, Accepted>(
            "/v1/environments/shop/clone",
            &json!({ "name": "shop-copy" }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    // A member that is neither running nor stopped: no partial copy wired to the source.
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", tomcats[0]),
            &json!({ "op": "suspend" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let err = t
        .client
        .post::<_, Accepted>(
            "/v1/environments/shop/clone",
            &json!({ "name": "shop-partial" }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("container {}", tomcats[0]))
            && err.contains("is suspended")
            && err.contains("HTTP 409"),
        "{err}"
    );
    let nothing = t
        .client
        .get::<Environment>("/v1/environments/shop-partial")
        .await;
    assert!(nothing.is_err(), "no copy was made");
    assert_ledger_clean(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_empties_and_takes_nothing_new() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let a = create(&t, &plain(Some("sim-1"))).await;
        ids.push(t.created(a.command_id).await);
    }
    // A live drain needs a server that migrates live; the refusal changes nothing.
    let err = t
        .client
        .post::<_, Value>("/v1/servers/sim-1/drain", &json!({ "live": true }))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("reports no live migration"), "{err}");
    assert!(!servers(&t).await.iter().any(|s| s.draining));
    // The body may be left out.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/servers/sim-1/drain", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.unwrap();
    let commands: Vec<i64> = serde_json::from_value(report["commands"].clone()).unwrap();
    assert_eq!(commands.len(), 4);
    // Drained again before those ran: its moves run after them (one object's commands run in
    // order) and find the containers gone from sim-1, so they stay where they went.
    let again: Value = t
        .client
        .post("/v1/servers/sim-1/drain", &json!({}))
        .await
        .unwrap();
    let again: Vec<i64> = serde_json::from_value(again["commands"].clone()).unwrap();
    assert_eq!(again.len(), 4);
    for c in commands {
        t.ok(c).await;
    }
    let placed: Vec<_> = futures::future::join_all(ids.iter().map(|id| show(&t, *id))).await;
    for c in again {
        let cmd = t.ok(c).await;
        assert_eq!(cmd.step, 0, "command {c} moved nothing: {cmd:?}");
    }
    for (id, before) in ids.iter().zip(placed) {
        assert_eq!(
            show(&t, *id).await.server,
            before.server,
            "container {id} moved once"
        );
    }
    for id in &ids {
        let c = show(&t, *id).await;
        assert_ne!(c.server.as_deref(), Some("sim-1"));
        assert_eq!(c.status, ContainerStatus::Running);
    }
    for _ in 0..4 {
        let a = create(&t, &plain(None)).await;
        let id = t.created(a.command_id).await;
        assert_ne!(
            show(&t, id).await.server.as_deref(),
            Some("sim-1"),
            "placement skips a draining server"
        );
    }
    let sim1 = servers(&t)
        .await
        .into_iter()
        .find(|s| s.name == "sim-1")
        .unwrap();
    assert!(sim1.draining);
    assert_eq!(sim1.containers, 0);
    assert!(t.sim("sim-1").await.guests().is_empty());
    let a = create(&t, &plain(Some("sim-1"))).await;
    let refused = t.wait(a.command_id).await;
    assert!(
        refused.error.unwrap().contains("draining"),
        "a named draining server is refused with a reason"
    );
    let err = t
        .client
        .post::<_, Value>("/v1/servers/sim-1/undrain", &json!({ "live": true }))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("live: only drain takes it"), "{err}");
    let undone: Value = t
        .client
        .post("/v1/servers/sim-1/undrain", &json!({}))
        .await
        .unwrap();
    assert!(undone.get("unchanged").is_none(), "{undone}");
    // Again: nothing to undo, and it says so.
    let again: Value = t
        .client
        .post("/v1/servers/sim-1/undrain", &json!({}))
        .await
        .unwrap();
    assert_eq!(again["unchanged"], "was not draining: nothing to undo");
    let a = create(&t, &plain(Some("sim-1"))).await;
    t.ok(a.command_id).await;
    let err = t
        .client
        .post::<_, Value>("/v1/servers/sim-1/explode", &json!({}))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("drain, undrain, fail, recover"), "{err}");
    assert_ledger_clean(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_move_a_container_between_platforms_with_its_origin() {
    let a = TestCore::start(Opts::default()).await.unwrap();
    let b = TestCore::start(Opts::default()).await.unwrap();
    let created = create(&a, &plain(None)).await;
    let id = a.created(created.command_id).await;
    let source = show(&a, id).await;
    let err = a
        .client
        .get::<Value>(&format!("/v1/containers/{id}/export"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("stop it first"), "{err}");
    let stop: Accepted = a
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    a.ok(stop.command_id).await;

    // Through the CLI, as an operator would: a tar archive, streamed from the server.
    let file = a._dir.path().join("export.tar");
    let new_id = crate::common::export_then_import(&a.url, &b.url, id, &file);
    let c = show(&b, new_id).await;
    assert_eq!(c.status, ContainerStatus::Stopped);
    let origin = c.origin.expect("the import records its origin");
    assert_eq!(origin.origin_container_id, id.0);
    assert_eq!(origin.guest_id, source.guest_id);
    assert_eq!(origin.origin_platform, a.core.platform_name());
    let (ok, out, _) = crate::common::cli(&b.url, &["container", "show", &new_id.to_string()]);
    assert!(
        ok && out.contains(&format!(
            "origin:      platform {}, container {id}",
            a.core.platform_name()
        )),
        "{out}"
    );
    let src_disk = a
        .sim(source.server.as_deref().unwrap())
        .await
        .guest(&source.guest_id)
        .unwrap()
        .disk;
    let dst_disk = b
        .sim(c.server.as_deref().unwrap())
        .await
        .guest(&c.guest_id)
        .unwrap()
        .disk;
    assert_eq!(src_disk, dst_disk);
    // The upload is gone once imported.
    let uploads = |t: &TestCore| {
        std::fs::read_dir(t._dir.path().join("uploads"))
            .unwrap()
            .count()
    };
    assert_eq!(uploads(&b), 0);
    let names: Vec<String> = tar::Archive::new(std::fs::File::open(&file).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["cloud48-export.json", "disk"]);

    // An archive cut short, or one of another kind, is refused and leaves nothing behind.
    let bytes = std::fs::read(&file).unwrap();
    let cut = a._dir.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() - 1100]).unwrap();
    let other = a._dir.path().join("other.tar");
    let mut foreign = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    h.set_cksum();
    foreign.append_data(&mut h, "etc/motd", &b"hi"[..]).unwrap();
    std::fs::write(&other, foreign.into_inner().unwrap()).unwrap();
    let file_json = a._dir.path().join("export.json");
    std::fs::write(&file_json, "{\"format\": 1}").unwrap();
    for (archive, says) in [
        (&cut, "cut short"),
        (&other, "'etc/motd'"),
        (&file_json, "format 1"),
    ] {
        let err = b
            .client
            .post_file::<Accepted>("/v1/containers/import", archive, "application/x-tar")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a container export archive") && err.contains(says),
            "{err}"
        );
    }
    let err = b
        .client
        .post_file::<Accepted>("/v1/containers/import", &file, "text/plain")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("application/x-tar"), "{err}");
    assert_eq!(uploads(&b), 0);

    // Bad input in the JSON format (1): its own export, an unknown format, a missing type.
    let export: Value = a
        .client
        .get(&format!("/v1/containers/{id}/export?format=1"))
        .await
        .unwrap();
    assert_eq!(export["format"], 1);
    let err = a
        .client
        .post::<_, Accepted>("/v1/containers/import", &export)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("container clone"), "{err}");
    let mut bad = export.clone();
    bad["format"] = json!(99);
    let err = b
        .client
        .post::<_, Accepted>("/v1/containers/import", &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("format 99"), "{err}");
    let mut bad = export;
    bad["type"] = json!("nosuchtype");
    let err = b
        .client
        .post::<_, Accepted>("/v1/containers/import", &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nosuchtype"), "{err}");
    assert_ledger_clean(&b).await;
    let counts: HashMap<String, u64> = servers(&b)
        .await
        .into_iter()
        .map(|s| (s.name, s.containers))
        .collect();
    assert_eq!(counts.values().sum::<u64>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rebalancer_moves_a_bounded_number_of_containers_off_the_fullest_server() {
    let health = cloud48_engine::core::HealthConfig {
        background: false,
        rebalance_spread: 20,
        rebalance_batch: 2,
        ..Default::default()
    };
    let opts = Opts {
        health,
        capacity: Some(Resources {
            cpu_millis: 100_000,
            memory_mb: 256 * 10,
            disk_mb: 1_000_000,
        }),
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    for _ in 0..6 {
        let a = create(&t, &plain(Some("sim-1"))).await;
        t.ok(a.command_id).await;
    }
    // sim-1 is 60 % full, the others empty: a spread of 60 points.
    let mut rounds = 0;
    loop {
        let submitted = t.core.rebalancer().rebalance().await.unwrap();
        if submitted.is_empty() {
            break;
        }
        assert!(submitted.len() <= 2, "at most the batch size at a time");
        assert!(
            t.core.rebalancer().rebalance().await.unwrap().is_empty(),
            "nothing more while migrations are in flight"
        );
        for c in submitted {
            t.ok(c).await;
        }
        rounds += 1;
        assert!(rounds < 10, "the rebalancer does not converge");
    }
    let used: Vec<u64> = servers(&t)
        .await
        .iter()
        .map(|s| s.allocated.memory_mb * 100 / s.capacity.memory_mb)
        .collect();
    let spread = used.iter().max().unwrap() - used.iter().min().unwrap();
    assert!(spread <= 20, "utilisation still spread {used:?}");
    assert!(rounds >= 1);
    assert_ledger_clean(&t).await;
}
