//! Every container command on the sim driver, retries and failures.

use cloud48_engine::driver::{DriverError, GuestState};
use cloud48_engine::managers::{ContainerCommand, CreateContainer};
use cloud48_engine::model::{
    Accepted, CommandId, Container, ContainerId, ContainerStatus, Requirements, Resources,
};
use serde_json::json;

use crate::common::{Opts, TestCore};

mod creates;

async fn create(t: &TestCore, server: Option<&str>) -> ContainerId {
    let a: Accepted = t
        .client
        .post("/v1/containers", &crate::common::plain(server))
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

/// The error of `op` on container `id`, refused at submission.
async fn refused(t: &TestCore, id: ContainerId, op: ContainerCommand) -> String {
    t.client
        .post::<_, Accepted>(&format!("/v1/containers/{id}/actions"), &op)
        .await
        .unwrap_err()
        .to_string()
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
    // More than its server has in all is refused at once, saying how much there is.
    let server = t.core.servers().get("sim-1").await.unwrap();
    let absurd = Resources {
        memory_mb: 1 << 30,
        ..bigger
    };
    let e = refused(&t, id, ContainerCommand::Update { resources: absurd }).await;
    assert!(
        e.contains(&format!(
            "cannot have memory_mb 1073741824: its server sim-1 has {} in all",
            server.capacity.memory_mb
        )) && e.contains("container migrate"),
        "{e}"
    );
    assert_eq!(show(&t, id).await.requirements.resources, bigger);

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
        .post("/v1/containers", &crate::common::plain(Some("sim-2")))
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

/// Regression (review): an update submitted behind a migration (as the refusal of one too large
/// for the container's server advises) was refused against the server the container was
/// leaving; it is checked when it runs, where the container then is (here too large there as
/// well: the simulated servers are alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_behind_a_queued_migration_is_judged_where_the_container_will_be() {
    let t = TestCore::start(Opts {
        latency: std::time::Duration::from_millis(100),
        ..Opts::default()
    })
    .await
    .unwrap();
    let id = create(&t, Some("sim-1")).await;
    let had = show(&t, id).await.requirements.resources;
    let absurd = Resources {
        memory_mb: 1 << 30,
        ..had
    };
    // Behind a command that does not move it, it is refused at once as ever.
    let stop = act(&t, id, ContainerCommand::Stop {}).await;
    let e = refused(&t, id, ContainerCommand::Update { resources: absurd }).await;
    assert!(e.contains("its server sim-1 has"), "{e}");
    t.ok(stop).await;
    let migrate = act(
        &t,
        id,
        ContainerCommand::Migrate {
            to: Some("sim-2".into()),
            live: false,
        },
    )
    .await;
    let update = act(&t, id, ContainerCommand::Update { resources: absurd }).await;
    t.ok(migrate).await;
    let failed = t.wait(update).await;
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("memory_mb")),
        "{failed:?}"
    );
    let c = show(&t, id).await;
    assert_eq!(c.server.as_deref(), Some("sim-2"));
    assert_eq!(c.requirements.resources, had, "unchanged");
}

/// A cold migration that fails after its switch (the container is on the target, its source
/// copy gone) cannot be undone: the container stays on the target, stopped, saying where it is
/// and how to start it, and `start` runs it there (an operator's trial killed the target agent
/// as the migration started the container: it was left stopped on the target with nothing said).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_cannot_start_its_container_on_the_target_says_where_it_is() {
    let t = TestCore::start(Opts {
        max_attempts: 2,
        ..Opts::default()
    })
    .await
    .unwrap();
    let id = create(&t, Some("sim-1")).await;
    // Every start on the target fails: the migration's, its retry's, and the undo's.
    t.sim("sim-2").await.fail_next(
        "start",
        3,
        DriverError::Transient("connection refused".into()),
    );
    let cmd = act(
        &t,
        id,
        ContainerCommand::Migrate {
            to: Some("sim-2".into()),
            live: false,
        },
    )
    .await;
    let failed = t.wait(cmd).await;
    assert_eq!(failed.status, cloud48_engine::model::CommandStatus::Failed);
    let c = show(&t, id).await;
    assert_eq!(c.server.as_deref(), Some("sim-2"));
    assert_eq!(c.status, ContainerStatus::Stopped);
    let reason = c.status_reason.unwrap_or_default();
    assert!(
        reason.contains("moved to server sim-2")
            && reason.contains(&format!("cloud48 container start {id}")),
        "{reason}"
    );
    t.ok(act(&t, id, ContainerCommand::Start {}).await).await;
    let c = show(&t, id).await;
    assert_eq!(
        (c.status, c.server.as_deref()),
        (ContainerStatus::Running, Some("sim-2"))
    );
    assert_eq!(c.status_reason, None);
}
