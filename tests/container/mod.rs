//! Every container command on the sim driver, retries and failures.

use cloud48_engine::driver::{DriverError, GuestState};
use cloud48_engine::managers::{ContainerCommand, CreateContainer};
use cloud48_engine::model::{
    Accepted, CommandId, Container, ContainerId, ContainerStatus, Requirements, Resources,
};
use serde_json::json;

use crate::common::{Opts, TestCore};

async fn create(t: &TestCore, server: Option<&str>) -> ContainerId {
    let a: Accepted = t
        .client
        .post(
            "/v1/containers",
            &CreateContainer {
                project: None,
                type_id: "plain".into(),
                server: server.map(Into::into),
                requirements: None,
                count: None,
            },
        )
        .await
        .unwrap();
    t.created(a.command_id).await
}

pub(crate) async fn act(t: &TestCore, id: ContainerId, op: ContainerCommand) -> CommandId {
    let a: Accepted = t
        .client
        .post(&format!("/v1/containers/{id}/actions"), &op)
        .await
        .unwrap();
    a.command_id
}

async fn show(t: &TestCore, id: ContainerId) -> Container {
    t.client.get(&format!("/v1/containers/{id}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_command_works_on_the_sim_driver() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, Some("sim-1")).await;
    let c = show(&t, id).await;
    assert_eq!(c.status, ContainerStatus::Running);
    assert_eq!(c.server.as_deref(), Some("sim-1"));
    assert!(c.ip.is_some());
    let sim1 = t.sim("sim-1").await;
    let guest_state =
        |sim: &cloud48_engine::driver::sim::SimServer| sim.guest(&c.guest_id).map(|g| g.info.state);
    assert_eq!(guest_state(&sim1), Some(GuestState::Running));

    for (op, status, guest) in [
        (
            ContainerCommand::Stop {},
            ContainerStatus::Stopped,
            GuestState::Stopped,
        ),
        (
            ContainerCommand::Start {},
            ContainerStatus::Running,
            GuestState::Running,
        ),
        (
            ContainerCommand::Suspend {},
            ContainerStatus::Suspended,
            GuestState::Suspended,
        ),
        (
            ContainerCommand::Resume {},
            ContainerStatus::Running,
            GuestState::Running,
        ),
        (
            ContainerCommand::Reboot {},
            ContainerStatus::Running,
            GuestState::Running,
        ),
    ] {
        let cmd = act(&t, id, op.clone()).await;
        t.ok(cmd).await;
        assert_eq!(show(&t, id).await.status, status, "after {op:?}");
        assert_eq!(guest_state(&sim1), Some(guest), "guest after {op:?}");
    }
    assert_eq!(
        sim1.guest(&c.guest_id).unwrap().operations,
        [
            "create", "start", "stop", "start", "suspend", "resume", "reboot"
        ]
    );

    let bigger = Resources {
        cpu_millis: 1500,
        memory_mb: 1024,
        disk_mb: 2048,
    };
    t.ok(act(&t, id, ContainerCommand::Update { resources: bigger }).await)
        .await;
    assert_eq!(show(&t, id).await.requirements.resources, bigger);
    assert_eq!(sim1.guest(&c.guest_id).unwrap().info.resources, bigger);

    let cmd = t
        .ok(act(
            &t,
            id,
            ContainerCommand::Clone {
                server: Some("sim-2".into()),
            },
        )
        .await)
        .await;
    let copy_id = ContainerId(cmd.result.unwrap()["container_id"].as_i64().unwrap());
    let copy = show(&t, copy_id).await;
    assert_ne!(copy_id, id);
    assert_eq!(copy.status, ContainerStatus::Running);
    assert_eq!(copy.server.as_deref(), Some("sim-2"));
    assert_ne!(copy.ip, c.ip);
    assert_eq!(
        show(&t, id).await.status,
        ContainerStatus::Running,
        "the source runs again after a cold clone"
    );

    t.ok(act(
        &t,
        id,
        ContainerCommand::Migrate {
            to: Some("sim-3".into()),
            live: false,
        },
    )
    .await)
        .await;
    let moved = show(&t, id).await;
    assert_eq!(moved.server.as_deref(), Some("sim-3"));
    assert_eq!(moved.status, ContainerStatus::Running);
    assert!(
        sim1.guest(&c.guest_id).is_none(),
        "the source server no longer has the guest"
    );
    assert_eq!(
        t.sim("sim-3").await.guest(&c.guest_id).unwrap().info.state,
        GuestState::Running
    );

    t.ok(act(&t, id, ContainerCommand::Destroy {}).await).await;
    assert_eq!(show(&t, id).await.status, ContainerStatus::Destroyed);
    assert!(t.sim("sim-3").await.guest(&c.guest_id).is_none());
    let live: Vec<Container> = t.client.get("/v1/containers").await.unwrap();
    assert_eq!(live.iter().map(|c| c.id).collect::<Vec<_>>(), vec![copy_id]);
    let all: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(all.len(), 2, "destroyed containers stay as history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_driver_errors_are_retried_with_backoff() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, Some("sim-1")).await;
    t.sim("sim-1").await.fail_next(
        "reboot",
        2,
        DriverError::Transient("connection reset".into()),
    );
    let cmd = t.ok(act(&t, id, ContainerCommand::Reboot {}).await).await;
    assert_eq!(cmd.attempts, 2, "two failed attempts were retried");
}

/// A resize whose reserved growth went (its deadline passed and the collector took it) while
/// the guest was being resized, on a server that has no room left: the guest gets its old size
/// back and the command fails saying so; the core's record and the ledger are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_whose_growth_expired_on_a_full_server_gives_the_guest_its_old_size_back() {
    let clock = crate::common::ManualClock::at(1_000_000);
    let t = TestCore::start(Opts {
        sim_servers: 1,
        clock: Some(clock.clone()),
        capacity: Some(Resources {
            cpu_millis: 4000,
            memory_mb: 4096,
            disk_mb: 100_000,
        }),
        ..Opts::default()
    })
    .await
    .unwrap();
    let id = create(&t, Some("sim-1")).await;
    let before = show(&t, id).await;
    let old = before.requirements.resources;
    let bigger = Resources {
        memory_mb: old.memory_mb + 1024,
        ..old
    };
    // The resize fails once, transiently: the command waits for its retry, which the manual
    // clock holds back, with its growth reserved.
    let sim = t.sim("sim-1").await;
    sim.fail_next(
        "update",
        1,
        DriverError::Transient("connection reset".into()),
    );
    let update = act(&t, id, ContainerCommand::Update { resources: bigger }).await;
    crate::common::eventually("the resize waits for its retry", || async {
        let c = t.core.queue().get(update).await.unwrap();
        (c.attempts == 1 && c.status == cloud48_engine::model::CommandStatus::Queued).then_some(())
    })
    .await;
    let dummies = cloud48_engine::placement::dummies_of(t.core.db(), update.0)
        .await
        .unwrap();
    assert_eq!(dummies.len(), 1, "the growth is reserved: {dummies:?}");
    let dummy = dummies[0].id;
    // The growth goes, as the collector takes an expired dummy, and another reservation takes
    // every MB of memory left.
    assert!(
        cloud48_engine::placement::drop_dummy(t.core.db(), dummy)
            .await
            .unwrap()
    );
    let free = t.core.servers().get("sim-1").await.unwrap();
    let rest = Requirements {
        resources: Resources {
            cpu_millis: 1,
            memory_mb: free.capacity.memory_mb - free.allocated.memory_mb,
            disk_mb: 1,
        },
        ..Default::default()
    };
    {
        use sea_orm::TransactionTrait;
        let txn = t.core.db().begin().await.unwrap();
        let request = cloud48_engine::placement::PlaceRequest {
            requirements: &rest,
            image: None,
            container_id: 0,
            command_id: None,
            avoid: Default::default(),
            server: Some(free.id.0),
            deadline: t.core.queue().now_ms() + 3_600_000,
        };
        cloud48_engine::placement::place(&txn, t.core.placement(), request)
            .await
            .unwrap();
        txn.commit().await.unwrap();
    }
    clock.advance(60_000);
    let cmd = t.wait(update).await;
    assert_eq!(cmd.status, cloud48_engine::model::CommandStatus::Failed);
    let err = cmd.error.unwrap();
    assert!(
        err.contains("expired and the server has no room any more; its size is unchanged"),
        "{err}"
    );
    assert_eq!(show(&t, id).await.requirements.resources, old);
    let guest = sim.guest(&before.guest_id).unwrap();
    assert_eq!(guest.info.resources, old, "the guest has its old size back");
    assert_eq!(
        guest.operations.iter().filter(|o| *o == "update").count(),
        2,
        "resized, then given its old size back: {:?}",
        guest.operations
    );
    let audit = cloud48_engine::placement::audit(t.core.db()).await.unwrap();
    assert!(audit.is_empty(), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_past_the_attempt_limit_fail_the_command() {
    let t = TestCore::start(Opts {
        max_attempts: 3,
        ..Opts::default()
    })
    .await
    .unwrap();
    let id = create(&t, Some("sim-1")).await;
    t.sim("sim-1").await.crash();
    let cmd = t.wait(act(&t, id, ContainerCommand::Stop {}).await).await;
    let err = cmd.error.unwrap();
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(err.contains("sim-1 is unreachable"), "{err}");
    assert_eq!(
        show(&t, id).await.status,
        ContainerStatus::Running,
        "a failed stop changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_driver_errors_fail_at_once_with_the_drivers_message() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, Some("sim-1")).await;
    t.sim("sim-1").await.fail_next(
        "suspend",
        1,
        DriverError::Permanent("cgroup freezer missing".into()),
    );
    let cmd = t
        .wait(act(&t, id, ContainerCommand::Suspend {}).await)
        .await;
    assert_eq!(cmd.attempts, 0);
    assert!(cmd.error.unwrap().contains("cgroup freezer missing"));
    assert_eq!(show(&t, id).await.status, ContainerStatus::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_leaves_a_failed_container_and_no_guest() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    t.sim("sim-2")
        .await
        .fail_next("start", 1, DriverError::Permanent("image broken".into()));
    let a: Accepted = t
        .client
        .post(
            "/v1/containers",
            &CreateContainer {
                project: None,
                type_id: "plain".into(),
                server: Some("sim-2".into()),
                requirements: None,
                count: None,
            },
        )
        .await
        .unwrap();
    let cmd = t.wait(a.command_id).await;
    assert!(cmd.error.unwrap().contains("image broken"));
    let c = show(&t, ContainerId(a.object_id.unwrap())).await;
    assert_eq!(c.status, ContainerStatus::Failed);
    assert!(
        t.sim("sim-2").await.guests().is_empty(),
        "the half-created guest was destroyed"
    );
    let live: Vec<Container> = t.client.get("/v1/containers").await.unwrap();
    assert!(live.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_spreads_containers_and_says_which_requirement_failed() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let id = create(&t, None).await;
        servers.push(show(&t, id).await.server.unwrap());
    }
    servers.sort();
    assert_eq!(
        servers,
        ["sim-1", "sim-2", "sim-3"],
        "each new container goes to the emptiest server"
    );

    let huge = Requirements {
        resources: Resources {
            cpu_millis: 1000,
            memory_mb: 10_000_000,
            disk_mb: 10,
        },
        ..Default::default()
    };
    let a: Accepted = t
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "requirements": huge }),
        )
        .await
        .unwrap();
    let err = t.wait(a.command_id).await.error.unwrap();
    assert!(err.contains("memory_mb 10000000 needed"), "{err}");

    let labelled = Requirements {
        resources: Resources {
            cpu_millis: 1,
            memory_mb: 1,
            disk_mb: 1,
        },
        labels: vec!["ssd".into()],
        spread: false,
    };
    let a: Accepted = t
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "requirements": labelled }),
        )
        .await
        .unwrap();
    let err = t.wait(a.command_id).await.error.unwrap();
    assert!(err.contains("labels [ssd]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_fails_late_releases_the_copy_and_restarts_the_source() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, Some("sim-1")).await;
    let source = show(&t, id).await;
    t.sim("sim-2")
        .await
        .fail_next("start", 1, DriverError::Permanent("no init process".into()));
    let cmd = t
        .wait(
            act(
                &t,
                id,
                ContainerCommand::Clone {
                    server: Some("sim-2".into()),
                },
            )
            .await,
        )
        .await;
    assert!(cmd.error.unwrap().contains("no init process"));
    let all: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    let copy = all
        .iter()
        .find(|c| c.id != id)
        .expect("the copy row exists");
    assert_eq!(copy.locked_by, None, "the failed clone released the copy");
    t.ok(act(&t, copy.id, ContainerCommand::Destroy {}).await)
        .await;
    assert_eq!(
        t.sim("sim-1")
            .await
            .guest(&source.guest_id)
            .unwrap()
            .info
            .state,
        GuestState::Running,
        "the source runs again"
    );
}

/// A container status this core does not know (written by a newer core, or damaged) is an
/// error that names the container, in reads and in commands: never shown or treated as
/// `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_container_status_is_an_error_that_names_the_container() {
    use sea_orm::ConnectionTrait;
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, None).await;
    let sql = format!("UPDATE containers SET status = 'hibernating' WHERE id = {id}");
    t.core.db().execute_unprepared(&sql).await.unwrap();
    let expected = format!("container {id}: unknown status 'hibernating'");

    let resp = reqwest::get(format!("{}/v1/containers/{id}", t.url))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    let body = resp.text().await.unwrap();
    assert!(body.contains(&expected), "{body}");
    let listed = t.core.containers().find(&Default::default(), None).await;
    assert!(
        listed
            .as_ref()
            .is_err_and(|e| e.to_string().contains(&expected)),
        "{:?}",
        listed.map(|l| l.len())
    );

    // Refused at submission, saying why.
    let refused = t
        .client
        .post::<_, Accepted>(
            &format!("/v1/containers/{id}/actions"),
            &ContainerCommand::Stop {},
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains(&expected), "{refused}");
    // A command already queued (submitted before the status changed) fails, saying why.
    let sql = format!(
        "INSERT INTO commands (id, kind, status, target_type, target_id, params, progress, step, attempts, run_after, requested_by, created_at) \
         VALUES (900, 'container.stop', 'queued', 'container', {id}, '{{}}', '{{}}', 0, 0, 0, 'test', 0)"
    );
    t.core.db().execute_unprepared(&sql).await.unwrap();
    t.core.queue().wake();
    let c = t.wait(900).await;
    assert_eq!(c.status, cloud48_engine::model::CommandStatus::Failed);
    assert!(c.error.as_deref().unwrap().contains(&expected), "{c:?}");
    // Nothing was done to the guest.
    let guests: Vec<_> = t
        .core
        .fleet()
        .sims()
        .into_iter()
        .flat_map(|(_, sim)| sim.guests())
        .collect();
    assert_eq!(guests.len(), 1);
    assert_eq!(guests[0].info.state, GuestState::Running);
    assert!(
        !guests[0].operations.iter().any(|o| o == "stop"),
        "{guests:?}"
    );
}

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
    assert_eq!(show(&t, second).await.status, ContainerStatus::Failed);
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
    assert_eq!(show(&t, *id).await.status, ContainerStatus::Failed);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_on_a_simulated_server_says_nothing_runs_there() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = create(&t, Some("sim-1")).await;
    let err = t
        .client
        .post::<_, serde_json::Value>(
            &format!("/v1/containers/{id}/exec"),
            &json!({ "command": ["cat", "/etc/hostname"] }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("simulated server sim-1") && err.contains("HTTP 409"),
        "{err}"
    );
}
