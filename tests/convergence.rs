//! The convergence property (hardening): after any sequence of adds, removes, stops, starts,
//! suspends, resumes, server crashes and failovers, each balancer's nginx configuration (the
//! arguments of the last upstream rewrite exec'd in it, recorded by the simulated driver)
//! equals its environment's running tomcats, whenever the balancer runs and nothing is in
//! flight.

use std::time::Duration;

use cloud48_engine::core::HealthConfig;
use cloud48_engine::managers::ContainerCommand;
use cloud48_engine::model::{Accepted, CommandStatus, Container, ContainerStatus, Environment};
use cloud48_engine::queue::CommandFilter;
use proptest::prelude::*;
use serde_json::Value;

use crate::common::{Opts, TestCore, eventually};

const SERVERS: usize = 4;

/// One step of a random history.
#[derive(Debug, Clone)]
enum Op {
    AddTomcat,
    /// Remove the n-th tomcat (modulo how many there are).
    RemoveTomcat(usize),
    /// A lifecycle command on the balancer, whatever its state: one that does not apply fails
    /// when it runs, which is part of the history too.
    Balancer(Lifecycle),
    /// The server of the n-th member (modulo how many there are) crashes; once failover has
    /// settled, it comes back.
    Crash(usize),
}

#[derive(Debug, Clone, Copy)]
enum Lifecycle {
    Stop,
    Start,
    Suspend,
    Resume,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::AddTomcat),
        2 => (0..8usize).prop_map(Op::RemoveTomcat),
        1 => Just(Op::Balancer(Lifecycle::Stop)),
        1 => Just(Op::Balancer(Lifecycle::Start)),
        1 => Just(Op::Balancer(Lifecycle::Suspend)),
        1 => Just(Op::Balancer(Lifecycle::Resume)),
        1 => (0..8usize).prop_map(Op::Crash),
    ]
}

async fn members(t: &TestCore) -> Vec<Container> {
    let env: Environment = t.client.get("/v1/environments/web").await.unwrap();
    env.members
}

fn of_type<'a>(members: &'a [Container], name: &str) -> Vec<&'a Container> {
    members
        .iter()
        .filter(|m| m.type_id.starts_with(name) && m.status.is_member())
        .collect()
}

/// Waits until nothing is queued, running or waiting, and no member is down.
async fn settled(t: &TestCore) {
    eventually("the platform settles", || async {
        for status in [
            CommandStatus::Queued,
            CommandStatus::Running,
            CommandStatus::Waiting,
        ] {
            let active = t
                .core
                .queue()
                .list(&CommandFilter {
                    status: Some(status),
                    limit: Some(1),
                    ..Default::default()
                })
                .await
                .unwrap();
            if !active.is_empty() {
                return None;
            }
        }
        let down = members(t)
            .await
            .iter()
            .any(|m| m.status == ContainerStatus::Down);
        (!down).then_some(())
    })
    .await;
}

async fn server_status(t: &TestCore, name: &str) -> String {
    let s: Value = t.client.get(&format!("/v1/servers/{name}")).await.unwrap();
    s["status"].as_str().unwrap().to_string()
}

/// The property, checked when the balancer runs: its last rewrite names exactly the running
/// tomcats. `history` is printed on failure.
async fn check(t: &TestCore, history: &[Op]) {
    let members = members(t).await;
    let balancers = of_type(&members, "balancer");
    assert!(balancers.len() <= 1, "one balancer at most: {members:?}");
    let Some(lb) = balancers.first() else {
        return;
    };
    if lb.status != ContainerStatus::Running {
        return;
    }
    let mut want: Vec<String> = of_type(&members, "tomcat")
        .iter()
        .filter(|m| m.status == ContainerStatus::Running)
        .map(|m| format!("{}:8080", m.ip.as_deref().unwrap()))
        .collect();
    want.sort();
    let guest = t
        .sim(lb.server.as_deref().unwrap())
        .await
        .guest(&lb.guest_id)
        .expect("the balancer's guest exists");
    let mut got = guest
        .execs
        .last()
        .expect("nginx was configured")
        .args
        .clone();
    got.sort();
    assert_eq!(
        got, want,
        "balancer {} routes to other tomcats than the running ones after {history:?}",
        lb.id
    );
}

async fn apply(t: &TestCore, op: &Op) {
    match op {
        Op::AddTomcat => {
            let c = crate::environment::add(t, "web", "tomcat").await;
            assert_eq!(c.status, CommandStatus::Succeeded, "{c:?}");
        }
        Op::RemoveTomcat(n) => {
            let members = members(t).await;
            let tomcats = of_type(&members, "tomcat");
            if tomcats.is_empty() {
                return;
            }
            let id = tomcats[n % tomcats.len()].id;
            let a: Accepted = t
                .client
                .delete(&format!("/v1/environments/web/containers/{id}"))
                .await
                .unwrap();
            let c = t.wait(a.command_id).await;
            assert_eq!(c.status, CommandStatus::Succeeded, "{c:?}");
        }
        Op::Balancer(l) => {
            let members = members(t).await;
            let Some(lb) = of_type(&members, "balancer").first().map(|m| m.id) else {
                return;
            };
            let command = match l {
                Lifecycle::Stop => ContainerCommand::Stop {},
                Lifecycle::Start => ContainerCommand::Start {},
                Lifecycle::Suspend => ContainerCommand::Suspend {},
                Lifecycle::Resume => ContainerCommand::Resume {},
            };
            t.wait(crate::container::act(t, lb, command).await).await;
        }
        Op::Crash(n) => {
            let members = members(t).await;
            let live: Vec<&Container> = members.iter().filter(|m| m.status.is_member()).collect();
            if live.is_empty() {
                return;
            }
            let name = live[n % live.len()].server.clone().unwrap();
            let (ok, _, err) = crate::common::cli(&t.url, &["server", "fail", &name]);
            assert!(ok, "{err}");
            eventually(&format!("{name} is down"), || async {
                (server_status(t, &name).await == "down").then_some(())
            })
            .await;
            settled(t).await;
            let (ok, _, err) = crate::common::cli(&t.url, &["server", "recover", &name]);
            assert!(ok, "{err}");
            eventually(&format!("{name} is up"), || async {
                (server_status(t, &name).await == "up").then_some(())
            })
            .await;
        }
    }
}

async fn run(history: Vec<Op>) {
    let opts = Opts {
        sim_servers: SERVERS as u32,
        health: HealthConfig {
            background: true,
            heartbeat: Duration::from_millis(50),
            grace: Duration::from_millis(500),
            check: Duration::from_millis(50),
            collector: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    crate::environment::env(&t, "web").await;
    // Two tomcats to begin with: the second brings the balancer.
    let history: Vec<Op> = [Op::AddTomcat, Op::AddTomcat]
        .into_iter()
        .chain(history)
        .collect();
    for (i, op) in history.iter().enumerate() {
        apply(&t, op).await;
        settled(&t).await;
        check(&t, &history[..=i]).await;
    }
    // Bring the balancer back to running, whatever the history left it in: it catches up.
    let members = members(&t).await;
    if let Some(lb) = of_type(&members, "balancer").first() {
        let command = match lb.status {
            ContainerStatus::Stopped => Some(ContainerCommand::Start {}),
            ContainerStatus::Suspended => Some(ContainerCommand::Resume {}),
            _ => None,
        };
        if let Some(command) = command {
            t.ok(crate::container::act(&t, lb.id, command).await).await;
        }
        settled(&t).await;
        let lb: Container = t
            .client
            .get(&format!("/v1/containers/{}", lb.id))
            .await
            .unwrap();
        assert_eq!(lb.status, ContainerStatus::Running, "after {history:?}");
        check(&t, &history).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_balancer_routes_to_its_running_tomcats_after_any_history(
        history in prop::collection::vec(op(), 6..18)
    ) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(history));
    }
}
