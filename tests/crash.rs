//! `kill -9` of the core in the middle of commands: after a restart every command finishes
//! exactly once and no container is duplicated.

use cloud48_core::cli::Client;
use cloud48_engine::model::{Accepted, Command, CommandStatus, Container, Environment};
use serde_json::{Value, json};

use crate::common::eventually;

/// Every guest on the simulated servers of a data directory, read from their files as the
/// servers read them (a state file, or only its journal before the first compaction).
pub(crate) fn sim_state(data: &std::path::Path) -> Vec<cloud48_engine::driver::sim::SimGuest> {
    let mut files = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(data.join("sim")).unwrap() {
        let path = entry.unwrap().path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "journal")
        ) {
            files.insert(path.with_extension("json"));
        }
    }
    files
        .iter()
        .flat_map(|f| cloud48_engine::driver::sim::SimServer::guests_in(f).unwrap())
        .collect()
}

/// Each guest's id and the operations it saw.
pub(crate) fn sim_guests(data: &std::path::Path) -> Vec<(String, Vec<String>)> {
    sim_state(data)
        .into_iter()
        .map(|g| (g.info.guest_id, g.operations))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_resume_after_kill_9_and_finish_exactly_once() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let latency = [
        "--sim-latency-ms",
        "250",
        "--sim-servers",
        "3",
        "--anonymous",
        "full",
    ];
    let mut serve = crate::common::serve(&data, &latency).await;
    let client = Client::new(&serve.url);
    let a: Accepted = client
        .post("/v1/environments", &json!({ "name": "web" }))
        .await
        .unwrap();
    assert_eq!(
        client.command(a.command_id, 30).await.unwrap().status,
        CommandStatus::Succeeded
    );

    let mut top = Vec::new();
    for _ in 0..3 {
        let a: Accepted = client
            .post(
                "/v1/environments/web/containers",
                &json!({ "type": "plain" }),
            )
            .await
            .unwrap();
        top.push(a.command_id);
        let a: Accepted = client
            .post("/v1/containers", &json!({ "type": "plain" }))
            .await
            .unwrap();
        top.push(a.command_id);
    }
    // Kill as soon as some creation is mid-way (its placement persisted: a create run alone
    // writes its step, one run in a group only its dummy).
    eventually("a creation is mid-way", || async {
        let cmds: Vec<Command> = client.get("/v1/commands?limit=1000").await.unwrap();
        let creating = cmds
            .iter()
            .filter(|c| c.kind == "container.create" && !c.status.is_terminal());
        (creating.clone().any(|c| c.step >= 1)
            || creating.count() > 0 && reservations(&client).await > 0)
            .then_some(())
    })
    .await;
    serve.kill9();
    drop(serve);

    let serve = crate::common::serve(&data, &latency).await;
    let client = Client::new(&serve.url);
    let mut unfinished_at_restart = 0;
    for id in &top {
        let before: Command = client.get(&format!("/v1/commands/{id}")).await.unwrap();
        if !before.status.is_terminal() {
            unfinished_at_restart += 1;
        }
        let c = client.command(*id, 120).await.unwrap();
        assert_eq!(
            c.status,
            CommandStatus::Succeeded,
            "command {id} after restart: {c:?}"
        );
    }
    assert!(
        unfinished_at_restart > 0,
        "the kill came too late to test anything"
    );

    let env: Environment = client.get("/v1/environments/web").await.unwrap();
    assert_eq!(env.members.len(), 3, "three adds, three members");
    let live: Vec<Container> = client.get("/v1/containers").await.unwrap();
    assert_eq!(live.len(), 6);
    assert!(
        live.iter()
            .all(|c| c.status.as_str() == "running" && c.locked_by.is_none())
    );
    let all: Vec<Container> = client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(all.len(), 6, "no duplicate container rows");

    let guests = sim_guests(&data);
    assert_eq!(
        guests.len(),
        6,
        "no duplicate guests on the servers: {guests:?}"
    );
    for (id, ops) in guests {
        assert_eq!(
            ops,
            ["create", "start"],
            "guest {id} saw its operations more than once"
        );
    }
    let cmds: Vec<Command> = client.get("/v1/commands?limit=1000").await.unwrap();
    assert!(
        cmds.iter().all(|c| c.status == CommandStatus::Succeeded),
        "{cmds:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_interrupted_by_kill_9_finishes_after_restart_without_leaking_a_dummy() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let flags = [
        "--sim-latency-ms",
        "300",
        "--sim-servers",
        "3",
        "--anonymous",
        "full",
    ];
    let mut serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let a: Accepted = client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "server": "sim-1" }),
        )
        .await
        .unwrap();
    let id = client
        .command(a.command_id, 60)
        .await
        .unwrap()
        .result
        .unwrap()["container_id"]
        .as_i64()
        .unwrap();
    let a: Accepted = client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate" }),
        )
        .await
        .unwrap();
    // Kill once the target is reserved (step 1 persisted) and before the switch.
    eventually("the target is reserved", || async {
        (unfinished(&client, a.command_id, "the migration")
            .await
            .step
            >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(
        reservations(&client).await,
        1,
        "the target is reserved by a dummy"
    );
    serve.kill9();
    drop(serve);

    let serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let done = client.command(a.command_id, 120).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    let c: Container = client.get(&format!("/v1/containers/{id}")).await.unwrap();
    assert_ne!(c.server.as_deref(), Some("sim-1"));
    assert_eq!(c.status.as_str(), "running");
    assert_eq!(
        reservations(&client).await,
        0,
        "no dummy outlives its command"
    );
    let servers: Vec<Value> = client.get("/v1/servers").await.unwrap();
    assert_eq!(
        servers
            .iter()
            .map(|s| s["containers"].as_u64().unwrap())
            .sum::<u64>(),
        1,
        "{servers:#?}"
    );
    let guests = sim_guests(&data);
    assert_eq!(
        guests.len(),
        1,
        "exactly one copy of the container exists: {guests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_create_interrupted_by_kill_9_finishes_after_restart_exactly_once() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let flags = [
        "--sim-latency-ms",
        "20",
        "--sim-servers",
        "3",
        "--anonymous",
        "full",
    ];
    let mut serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let a: Accepted = client
        .post("/v1/containers", &json!({ "type": "plain", "count": 40 }))
        .await
        .unwrap();
    // Kill once the reservations are persisted (step 1) and some guests exist.
    eventually(
        "the reservations are persisted and some guests exist",
        || async {
            let c = unfinished(&client, a.command_id, "the batch").await;
            (c.step >= 1 && !sim_guests(&data).is_empty()).then_some(())
        },
    )
    .await;
    serve.kill9();
    drop(serve);

    let serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let done = client.command(a.command_id, 120).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap()["created"], 40);
    assert_created_once(&client, &data, 40).await;
}

/// After a restart: no dummy left, `n` containers counted on the servers and one guest each,
/// created and started once.
/// Dummies on every server: capacity reserved by commands that have not finished.
async fn reservations(client: &Client) -> u64 {
    let servers: Vec<Value> = client.get("/v1/servers").await.unwrap();
    servers.iter().map(|s| s["dummies"].as_u64().unwrap()).sum()
}

async fn assert_created_once(client: &Client, data: &std::path::Path, n: u64) {
    assert_eq!(
        reservations(client).await,
        0,
        "no dummy outlives its command"
    );
    let servers: Vec<Value> = client.get("/v1/servers").await.unwrap();
    assert_eq!(
        servers
            .iter()
            .map(|s| s["containers"].as_u64().unwrap())
            .sum::<u64>(),
        n,
        "{servers:#?}"
    );
    let guests = sim_guests(data);
    assert_eq!(
        guests.len() as u64,
        n,
        "one guest per container: {guests:?}"
    );
    for (id, ops) in guests {
        assert_eq!(
            ops,
            ["create", "start"],
            "guest {id} saw its operations more than once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_creates_running_as_a_group_interrupted_by_kill_9_finish_after_restart_exactly_once()
{
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    // Enough workers that the creates are claimed, and run, together.
    let flags = [
        "--sim-latency-ms",
        "250",
        "--sim-servers",
        "3",
        "--workers",
        "64",
        "--anonymous",
        "full",
    ];
    let mut serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    let mut ids = Vec::new();
    for _ in 0..60 {
        let a: Accepted = client
            .post("/v1/containers", &json!({ "type": "plain" }))
            .await
            .unwrap();
        ids.push(a.command_id);
    }
    // Kill once reservations are persisted (dummies: the group does not write the commands'
    // step) and some guests exist.
    eventually(
        "a create past its reservation, with guests made",
        || async {
            let cmds: Vec<Command> = client.get("/v1/commands?limit=1000").await.unwrap();
            assert!(
                cmds.iter().any(|c| !c.status.is_terminal()),
                "every create finished before the kill"
            );
            (reservations(&client).await > 0 && !sim_guests(&data).is_empty()).then_some(())
        },
    )
    .await;
    serve.kill9();
    drop(serve);

    let serve = crate::common::serve(&data, &flags).await;
    let client = Client::new(&serve.url);
    for id in &ids {
        let c = client.command(*id, 120).await.unwrap();
        assert_eq!(
            c.status,
            CommandStatus::Succeeded,
            "command {id} after restart: {c:?}"
        );
    }
    let all: Vec<Container> = client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(all.len(), 60, "no duplicate container rows");
    assert!(
        all.iter()
            .all(|c| c.status.as_str() == "running" && c.locked_by.is_none()),
        "{all:#?}"
    );
    assert_created_once(&client, &data, 60).await;
}

/// Command `id`, which must not have ended yet (the test kills the core before `what` ends).
async fn unfinished(client: &Client, id: cloud48_engine::model::CommandId, what: &str) -> Command {
    let c: Command = client.get(&format!("/v1/commands/{id}")).await.unwrap();
    assert!(
        !c.status.is_terminal(),
        "{what} finished before the kill: {c:?}"
    );
    c
}
