//! A data directory written by the previous release (0.1) and killed with commands in flight
//! (`fixtures/make-v0.1-killed.sh` made it: a batch create, a migration, a create and an
//! environment add waiting for its children were running) resumes under this core: every
//! command finishes, exactly once.

use std::collections::HashMap;
use std::path::Path;

use cloud48_core::cli::Client;
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{Command, CommandStatus, Container, ContainerStatus, Environment};

use crate::common::eventually;
use crate::crash::sim_guests;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_flight_in_a_database_of_the_previous_release_resume_and_finish_once() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v0.1-killed/data"),
        &data,
    );
    let before: HashMap<String, Vec<String>> = sim_guests(&data).into_iter().collect();
    let serve = crate::common::serve(&data, &["--sim-servers", "2", "--anonymous", "full"]).await;
    let client = Client::new(&serve.url);

    let commands: Vec<Command> = eventually("every command of the old core finishes", || async {
        let list: Vec<Command> = client.get("/v1/commands?limit=1000").await.ok()?;
        list.iter().all(|c| c.status.is_terminal()).then_some(list)
    })
    .await;
    assert!(
        commands.len() >= 16,
        "the fixture's commands are all there: {commands:?}"
    );
    for c in &commands {
        assert_eq!(c.status, CommandStatus::Succeeded, "{c:?}");
    }

    let containers: Vec<Container> = client.get("/v1/containers?all=true").await.unwrap();
    for c in &containers {
        assert_eq!(c.status, ContainerStatus::Running, "{c:?}");
    }
    // The batch of three, the single create and the second tomcat with its balancer were in
    // flight: all made, none twice.
    assert_eq!(containers.len(), 9, "{containers:?}");
    let web: Environment = client.get("/v1/environments/web").await.unwrap();
    // What the old release made belongs to the project `default`, commands included.
    assert_eq!(web.project, "default");
    assert!(
        containers.iter().all(|c| c.project == "default"),
        "{containers:?}"
    );
    let in_default: Vec<Command> = client
        .get("/v1/commands?limit=1000&project=default")
        .await
        .unwrap();
    assert_eq!(in_default.len(), commands.len());
    let types: Vec<&str> = web
        .members
        .iter()
        .map(|m| m.type_id.split('@').next().unwrap())
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "tomcat").count(),
        2,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "balancer").count(),
        1,
        "{types:?}"
    );
    let one: Container = client.get("/v1/containers/1").await.unwrap();
    assert_eq!(
        one.requirements.resources.memory_mb, 1024,
        "the update committed before the kill stays"
    );

    // Every container has exactly one guest, on the server the core says; the migrated one
    // moved and its guest was copied once.
    let after = sim_guests(&data);
    for c in &containers {
        let holders: Vec<_> = after.iter().filter(|(g, _)| *g == c.guest_id).collect();
        assert_eq!(
            holders.len(),
            1,
            "container {} has one guest: {after:?}",
            c.id
        );
    }
    let migrated = containers.iter().find(|c| c.id == ContainerId(3)).unwrap();
    let ops = &after
        .iter()
        .find(|(g, _)| *g == migrated.guest_id)
        .unwrap()
        .1;
    assert_eq!(
        ops.iter().filter(|o| o.as_str() == "import").count(),
        1,
        "{ops:?}"
    );
    assert!(
        before.contains_key(&migrated.guest_id),
        "container 3 existed before the kill"
    );
}
