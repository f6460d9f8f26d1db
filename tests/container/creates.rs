//! Creates in numbers: an address never given twice (alone or in groups), lists read in pages,
//! concurrent single creates sharing transactions and keeping their own rows.

use super::*;

/// Regression (hardening): addresses repeated across the platform (a simulated server's pool
/// wrapped; a container that migrated away kept an address its old server handed out again),
/// and nothing checked. A create whose server gives it an address another live container
/// holds fails, saying so, and leaves no guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_another_live_container_holds_is_never_given_twice() {
    use sea_orm::ConnectionTrait;
    let t = TestCore::start(Opts {
        sim_servers: 1,
        ..Opts::default()
    })
    .await
    .unwrap();
    let first = create(&t, None).await;
    assert_eq!(show(&t, first).await.ip.as_deref(), Some("10.0.4.2"));
    // Another live container holds the address sim-1 hands out next (as one that migrated
    // away from sim-1 would).
    let sql = format!("UPDATE containers SET ip = '10.0.4.3' WHERE id = {first}");
    t.core.db().execute_unprepared(&sql).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/containers", &serde_json::json!({ "type": "plain" }))
        .await
        .unwrap();
    let c = t.wait(a.command_id).await;
    assert_eq!(c.status, cloud48_engine::model::CommandStatus::Failed);
    assert!(
        c.error.as_deref().unwrap().contains(&format!(
            "address 10.0.4.3, which container {first} already holds"
        )),
        "{c:?}"
    );
    let second = ContainerId(a.object_id.unwrap());
    let failed = show(&t, second).await;
    assert_eq!(failed.status, ContainerStatus::Failed);
    // The container says why, naming the command that failed.
    let why = failed.status_reason.unwrap_or_default();
    assert!(
        why.contains(&format!(
            "container.create (command {}) failed",
            a.command_id
        )) && why.contains("already holds"),
        "{why}"
    );
    // Its guest is gone; the next create gets a free address.
    let guests: Vec<_> = t
        .core
        .fleet()
        .sims()
        .into_iter()
        .flat_map(|(_, s)| s.guests())
        .collect();
    assert_eq!(guests.len(), 1, "{guests:?}");
    let third = create(&t, None).await;
    assert_eq!(show(&t, third).await.ip.as_deref(), Some("10.0.4.4"));
}

/// The same, for creates claimed together and recorded in one statement per wave: the one
/// given an address a live container outside the group holds fails, the others are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_run_as_a_group_never_take_an_address_a_live_container_holds() {
    use sea_orm::ConnectionTrait;
    let t = TestCore::start(Opts {
        sim_servers: 1,
        paused: true,
        ..Opts::default()
    })
    .await
    .unwrap();
    let mut submitted = Vec::new();
    for _ in 0..4 {
        let a: Accepted = t
            .client
            .post("/v1/containers", &serde_json::json!({ "type": "plain" }))
            .await
            .unwrap();
        submitted.push((a.command_id, ContainerId(a.object_id.unwrap())));
    }
    // The last becomes a stopped container holding the address sim-1 hands out second.
    let (cmd, holder) = submitted.pop().unwrap();
    t.core.queue().cancel(cmd).await.unwrap();
    let sql = format!(
        "UPDATE containers SET status = 'stopped', ip = '10.0.4.3', locked_by = NULL WHERE id = {holder}"
    );
    t.core.db().execute_unprepared(&sql).await.unwrap();
    t.core.start().await.unwrap();

    let mut failed = Vec::new();
    for (cmd, id) in &submitted {
        let c = t.wait(*cmd).await;
        if c.status == cloud48_engine::model::CommandStatus::Failed {
            failed.push((*id, c.error.unwrap()));
        } else {
            assert_eq!(c.status, cloud48_engine::model::CommandStatus::Succeeded);
            let ip = show(&t, *id).await.ip.unwrap();
            assert!(ip == "10.0.4.2" || ip == "10.0.4.4", "{ip}");
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (id, error) = &failed[0];
    assert!(
        error.contains(&format!(
            "address 10.0.4.3, which container {holder} already holds"
        )),
        "{error}"
    );
    let failed = show(&t, *id).await;
    assert_eq!(failed.status, ContainerStatus::Failed);
    assert!(
        failed
            .status_reason
            .as_deref()
            .is_some_and(|why| why.contains("already holds")),
        "{failed:?}"
    );
    assert!(
        t.core.queue().grouped_steps() > 0,
        "the creates ran as a group"
    );
    assert_eq!(show(&t, holder).await.ip.as_deref(), Some("10.0.4.3"));
    let guests = t.sim("sim-1").await.guests();
    assert_eq!(guests.len(), 2, "the refused guest is gone: {guests:?}");
}

/// Regression (hardening): `GET /v1/containers` had no pagination (3.6 MB at 10,000
/// containers). Every list is read in pages of at most 1,000, linked by `Link: rel="next"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_read_in_bounded_pages_linked_by_their_link_header() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(&t, None).await);
    }
    let http = reqwest::Client::new();
    let mut path = "/v1/containers?limit=2&all=true".to_string();
    let mut pages = Vec::new();
    loop {
        let resp = http.get(format!("{}{path}", t.url)).send().await.unwrap();
        let link = resp
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<Container> = resp.json().await.unwrap();
        pages.push(page.iter().map(|c| c.id).collect::<Vec<_>>());
        let Some(link) = link else { break };
        let next = link.split_once('<').unwrap().1.split_once('>').unwrap().0;
        assert!(
            next.contains("all=true") && next.contains("limit=2"),
            "{link}"
        );
        path = next.to_string();
    }
    assert_eq!(
        pages,
        vec![ids[0..2].to_vec(), ids[2..4].to_vec(), ids[4..].to_vec()]
    );
    // The server caps a page however large the ask; the CLI's client follows every page.
    let all: Vec<Container> = t.client.get_all("/v1/containers?limit=2").await.unwrap();
    assert_eq!(all.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
    // A limit outside 1-1000 is refused with the range, as the document declares it.
    let resp = http
        .get(format!("{}/v1/containers?limit=0", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422, "limit=0 is refused");
    let body = resp.text().await.unwrap();
    assert!(body.contains("limit 0 is not 1-1000"), "{body}");
    // Commands page newest first, with `before`.
    let resp = http
        .get(format!("{}/v1/commands?limit=3", t.url))
        .send()
        .await
        .unwrap();
    let link = resp
        .headers()
        .get("link")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let newest: Vec<cloud48_engine::model::Command> = resp.json().await.unwrap();
    assert_eq!(newest.len(), 3);
    assert!(link.contains(&format!("before={}", newest[2].id)), "{link}");
    let servers: Vec<cloud48_engine::model::Server> =
        t.client.get_all("/v1/servers?limit=1").await.unwrap();
    assert_eq!(servers.len(), 3);
}

/// A list filtered by a type nothing is installed as (a typo) is refused with the installed
/// types, not answered with an empty page; an installed type with no containers lists none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_by_a_type_that_is_not_installed_says_which_are() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, None).await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/v1/containers?type=plian", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("unknown container type 'plian'") && body.contains("plain"),
        "{body}"
    );
    let listed: Vec<Container> = t.client.get("/v1/containers?type=plain").await.unwrap();
    assert_eq!(listed.iter().map(|c| c.id).collect::<Vec<_>>(), [id]);
    let other = t
        .core
        .types()
        .ids()
        .into_iter()
        .find(|ty| ty != "plain")
        .expect("the bundled types are installed");
    let none: Vec<Container> = t
        .client
        .get(&format!("/v1/containers?type={other}"))
        .await
        .unwrap();
    assert!(none.is_empty(), "{other}");
}

/// Concurrent single creates are written together (a group commit): each request still gets
/// its own container, with its own requirements and server, its own guest id and its own
/// `container.create` command acting on it.
async fn concurrent_single_creates_share_transactions_and_keep_their_own_rows(postgres: bool) {
    use cloud48_engine::model::CommandKind;
    let Some(t) = TestCore::start(Opts {
        sim_servers: 2,
        paused: true,
        postgres,
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    let requests: Vec<CreateContainer> = (0..60)
        .map(|i| CreateContainer {
            project: None,
            type_id: "plain".into(),
            server: (i % 3 == 0).then(|| format!("sim-{}", 1 + i % 2)),
            requirements: Some(Requirements {
                resources: Resources {
                    cpu_millis: 100,
                    memory_mb: 64 + i,
                    disk_mb: 100,
                },
                ..Requirements::default()
            }),
            count: None,
        })
        .collect();
    let handles: Vec<_> = requests
        .iter()
        .map(|r| {
            let (core, r) = (t.core.clone(), r.clone());
            tokio::spawn(async move { core.containers().create(&r, "tester").await.unwrap() })
        })
        .collect();
    let mut submitted = Vec::new();
    for h in handles {
        submitted.push(h.await.unwrap());
    }
    let (creates, transactions) = t.core.services().creates_written();
    assert_eq!(creates, 60);
    assert!(
        transactions < 60,
        "{transactions} transactions for 60 creates"
    );

    t.core.start().await.unwrap();
    let platform = t.core.platform_name().to_string();
    for (req, (cmd, id)) in requests.iter().zip(&submitted) {
        let c = t.ok(*cmd).await;
        assert_eq!(c.kind, CommandKind::ContainerCreate.as_str());
        assert_eq!(
            c.target_id,
            Some(id.0),
            "command {cmd} acts on its own container"
        );
        let view = show(&t, *id).await;
        assert_eq!(view.status, ContainerStatus::Running);
        assert_eq!(view.guest_id, format!("{platform}-c{id}"));
        assert_eq!(
            view.requirements.resources,
            req.requirements.as_ref().unwrap().resources
        );
        if let Some(server) = &req.server {
            assert_eq!(view.server.as_ref(), Some(server));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_creates_share_transactions_on_sqlite() {
    concurrent_single_creates_share_transactions_and_keep_their_own_rows(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_creates_share_transactions_on_postgres() {
    concurrent_single_creates_share_transactions_and_keep_their_own_rows(true).await;
}
