//! Chaos, bounded for CI: mixed commands (environment adds and removes, balancer stops and
//! starts, standalone creates, stops, starts and destroys, and a batch of 1,000) submitted
//! through the API while the core is killed with `kill -9` at random points and restarted.
//! At the end: nothing lost, nothing duplicated, no leaked dummy, counters consistent, and every
//! balancer's nginx configuration equal to its running tomcats.
//!
//! The kill points come from a seed printed in every failure; `CLOUD48_CHAOS_SEED` replays one.

use std::collections::{BTreeMap, BTreeSet};

use cloud48_core::cli::Client;
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{
    Accepted, Command, CommandId, CommandStatus, Container, ContainerStatus, Resources,
};
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::{Value, json};

use crate::common::eventually;

const FLAGS: [&str; 6] = [
    "--sim-latency-ms",
    "5",
    "--sim-servers",
    "4",
    "--anonymous",
    "full",
];
const ENVIRONMENTS: [&str; 3] = ["e1", "e2", "e3"];
pub(crate) const ROUNDS: usize = 5;
const PER_ROUND: usize = 60;
pub(crate) const BATCH: u32 = 1000;

/// A uniform draw from `0..n` (0 when `n` is 0).
pub(crate) fn below(rng: &mut TestRng, n: usize) -> usize {
    rng.random_range(0..n.max(1))
}

fn small() -> Value {
    json!({ "cpu_millis": 5, "memory_mb": 8, "disk_mb": 8 })
}

/// What one round submits; `must_succeed` are the commands that cannot fail for any reason
/// the history gives them (creates with room to spare).
#[derive(Default)]
pub(crate) struct Submitted {
    pub all: Vec<CommandId>,
    pub must_succeed: Vec<CommandId>,
}

/// Creates the environments the rounds work in, through `client`.
pub(crate) async fn create_environments(client: &Client) {
    for env in ENVIRONMENTS {
        let a: Accepted = client
            .post("/v1/environments", &json!({ "name": env }))
            .await
            .unwrap();
        let c = client.command(a.command_id, 60).await.unwrap();
        assert_eq!(c.status, CommandStatus::Succeeded, "{c:?}");
    }
}

/// Submits one round of mixed commands, each through the next of `clients` in turn.
pub(crate) async fn submit_round(
    clients: &[Client],
    rng: &mut TestRng,
    out: &mut Submitted,
) -> Vec<CommandId> {
    let live: Vec<Container> = clients[0].get_all("/v1/containers").await.unwrap();
    let of = |pred: &dyn Fn(&Container) -> bool| -> Vec<ContainerId> {
        live.iter().filter(|c| pred(c)).map(|c| c.id).collect()
    };
    let tomcats = of(&|c| c.type_id.starts_with("tomcat"));
    let balancers = of(&|c| c.type_id.starts_with("balancer"));
    let plain = of(&|c| c.type_id.starts_with("plain") && c.environment.is_none());
    let pick = |rng: &mut TestRng, ids: &[ContainerId]| ids.get(below(rng, ids.len())).copied();
    let mut round = Vec::new();
    for n in 0..PER_ROUND {
        let client = &clients[n % clients.len()];
        let env = ENVIRONMENTS[below(rng, ENVIRONMENTS.len())];
        let (path, body, certain): (String, Value, bool) = match below(rng, 10) {
            0..=2 => (
                format!("/v1/environments/{env}/containers"),
                json!({ "type": "tomcat", "requirements": small() }),
                true,
            ),
            3 => match pick(rng, &tomcats) {
                Some(id) => {
                    let c = live.iter().find(|c| c.id == id).unwrap();
                    let env = c.environment.clone().unwrap();
                    // Refused at submission if it is gone by now: never accepted, not lost.
                    if let Ok(a) = client
                        .delete::<Accepted>(&format!("/v1/environments/{env}/containers/{id}"))
                        .await
                    {
                        round.push(a.command_id);
                    }
                    continue;
                }
                None => continue,
            },
            4 | 5 => match pick(rng, &balancers) {
                Some(id) => (
                    format!("/v1/containers/{id}/actions"),
                    json!({ "op": if below(rng, 2) == 0 { "stop" } else { "start" } }),
                    false,
                ),
                None => continue,
            },
            6 | 7 => (
                "/v1/containers".into(),
                json!({ "type": "plain", "requirements": small() }),
                true,
            ),
            _ => match pick(rng, &plain) {
                Some(id) => (
                    format!("/v1/containers/{id}/actions"),
                    json!({ "op": (["stop", "start", "destroy"][below(rng, 3)]) }),
                    false,
                ),
                None => continue,
            },
        };
        match client.post::<_, Accepted>(&path, &body).await {
            Ok(a) => {
                round.push(a.command_id);
                if certain {
                    out.must_succeed.push(a.command_id);
                }
            }
            // An action on a container destroyed since the snapshot can never run: refused
            // at submission with the reason, which is not a loss.
            Err(e) if !certain && e.to_string().contains("HTTP 409") => {}
            Err(e) => panic!("{path} {body}: {e:#}"),
        }
    }
    out.all.extend(&round);
    round
}

pub(crate) async fn active(client: &Client) -> usize {
    let mut n = 0;
    for status in ["queued", "running", "waiting"] {
        let cmds: Vec<Command> = client
            .get_all(&format!("/v1/commands?status={status}"))
            .await
            .unwrap();
        n += cmds.len();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_duplicates_nothing_and_balancers_converge() {
    let seed: u64 = std::env::var("CLOUD48_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed.to_le_bytes(); 4].concat());
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let mut serve = crate::common::serve(&data, &FLAGS).await;
    let mut client = Client::new(&serve.url);
    create_environments(&client).await;

    let mut submitted = Submitted::default();
    let mut kills = 0;
    let mut batch = None;
    for round in 0..ROUNDS {
        let mut ids = submit_round(std::slice::from_ref(&client), &mut rng, &mut submitted).await;
        if round == 1 {
            let id = submit_batch(&client, &mut submitted).await;
            ids.push(id);
            batch = Some(id);
        }
        if round + 1 == ROUNDS {
            break;
        }
        // Kill once a random share of this round has finished, while the rest is in flight.
        let finished_before_kill = 1 + below(&mut rng, ids.len() / 2);
        let killed_early = eventually("a random point in the round", || async {
            let mut done = 0;
            for id in &ids {
                let c: Command = client.get(&format!("/v1/commands/{id}")).await.unwrap();
                done += c.status.is_terminal() as usize;
            }
            (done >= finished_before_kill).then_some(done < ids.len())
        })
        .await;
        serve.kill9();
        kills += killed_early as usize;
        serve = crate::common::serve(&data, &FLAGS).await;
        client = Client::new(&serve.url);
    }
    assert!(kills > 0, "seed {seed}: no kill landed while commands ran");
    eprintln!(
        "chaos seed {seed}: {} commands, {kills} of {} kills while commands ran",
        submitted.all.len(),
        ROUNDS - 1
    );

    let batch = batch.expect("the batch was submitted");
    verify(
        &client,
        &submitted,
        batch,
        &|| crate::crash::sim_state(&data),
        seed,
    )
    .await;
}

/// Submits a create of `BATCH` plain containers through `client`.
pub(crate) async fn submit_batch(client: &Client, submitted: &mut Submitted) -> CommandId {
    let a: Accepted = client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "count": BATCH, "requirements": small() }),
        )
        .await
        .unwrap();
    submitted.all.push(a.command_id);
    submitted.must_succeed.push(a.command_id);
    a.command_id
}

/// Once everything submitted has finished, through `client`: nothing lost, nothing duplicated
/// (`guests` reads every server's guests), no leaked dummy or lock, counters consistent, and
/// every balancer's nginx configuration equal to its running tomcats.
pub(crate) async fn verify(
    client: &Client,
    submitted: &Submitted,
    batch: CommandId,
    guests: &dyn Fn() -> Vec<cloud48_engine::driver::sim::SimGuest>,
    seed: u64,
) {
    // Nothing lost: every accepted command finishes; creates with room to spare succeed.
    let mut outcome = BTreeMap::new();
    for id in &submitted.all {
        let c = client.command(*id, 300).await.unwrap();
        assert!(c.status.is_terminal(), "seed {seed}: lost {c:?}");
        outcome.insert(*id, c);
    }
    for id in &submitted.must_succeed {
        let c = &outcome[id];
        assert_eq!(c.status, CommandStatus::Succeeded, "seed {seed}: {c:?}");
    }
    let batch = &outcome[&batch];
    assert_eq!(
        batch.result.as_ref().map(|r| r["created"].clone()),
        Some(json!(BATCH)),
        "seed {seed}: {batch:?}"
    );

    // Balancers left stopped run again: what changed meanwhile reaches their nginx.
    let live: Vec<Container> = client.get_all("/v1/containers").await.unwrap();
    for lb in live.iter().filter(|c| c.type_id.starts_with("balancer")) {
        if lb.status == ContainerStatus::Stopped {
            let a: Accepted = client
                .post(
                    &format!("/v1/containers/{}/actions", lb.id),
                    &json!({ "op": "start" }),
                )
                .await
                .unwrap();
            let c = client.command(a.command_id, 120).await.unwrap();
            assert_eq!(c.status, CommandStatus::Succeeded, "seed {seed}: {c:?}");
        }
    }
    eventually("nothing in flight", || async {
        (active(client).await == 0).then_some(())
    })
    .await;

    let all: Vec<Container> = client.get_all("/v1/containers?all=true").await.unwrap();
    let live: Vec<&Container> = all.iter().filter(|c| !c.status.is_gone()).collect();
    assert!(
        live.iter().all(|c| c.locked_by.is_none()),
        "seed {seed}: a lock outlived its command"
    );

    // Nothing duplicated: one guest per live container, created once; no guest without one.
    let on_servers = guests();
    let mut by_id: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &on_servers {
        *by_id.entry(g.info.guest_id.as_str()).or_default() += 1;
        let creates = g.operations.iter().filter(|o| *o == "create").count();
        assert_eq!(
            creates, 1,
            "seed {seed}: guest {} {:?}",
            g.info.guest_id, g.operations
        );
    }
    assert!(
        by_id.values().all(|n| *n == 1),
        "seed {seed}: a guest twice"
    );
    let want: BTreeSet<&str> = live.iter().map(|c| c.guest_id.as_str()).collect();
    let have: BTreeSet<&str> = by_id.keys().copied().collect();
    assert_eq!(
        have, want,
        "seed {seed}: guests on the servers against live containers"
    );

    // Counters: no dummy; each server's count and allocation are its live containers'.
    let servers: Vec<Value> = client.get("/v1/servers").await.unwrap();
    for s in &servers {
        let name = s["name"].as_str().unwrap();
        assert_eq!(
            s["dummies"], 0,
            "seed {seed}: a dummy outlived its command on {name}"
        );
        let here: Vec<&&Container> = live
            .iter()
            .filter(|c| c.server.as_deref() == Some(name))
            .collect();
        assert_eq!(s["containers"], here.len() as u64, "seed {seed}: {name}");
        let mut sum = Resources::default();
        for c in &here {
            sum.cpu_millis += c.requirements.resources.cpu_millis;
            sum.memory_mb += c.requirements.resources.memory_mb;
            sum.disk_mb += c.requirements.resources.disk_mb;
        }
        let allocated: Resources = serde_json::from_value(s["allocated"].clone()).unwrap();
        assert_eq!(allocated, sum, "seed {seed}: allocation on {name}");
    }

    // Every balancer's nginx routes to exactly its environment's running tomcats.
    for lb in live.iter().filter(|c| c.type_id.starts_with("balancer")) {
        assert_eq!(lb.status, ContainerStatus::Running, "seed {seed}: {lb:?}");
        let mut want: Vec<String> = live
            .iter()
            .filter(|c| {
                c.type_id.starts_with("tomcat")
                    && c.environment == lb.environment
                    && c.status == ContainerStatus::Running
            })
            .map(|c| format!("{}:8080", c.ip.as_deref().unwrap()))
            .collect();
        want.sort();
        let guest = on_servers
            .iter()
            .find(|g| g.info.guest_id == lb.guest_id)
            .unwrap();
        let mut got = guest.execs.last().expect("nginx configured").args.clone();
        got.sort();
        assert_eq!(
            got, want,
            "seed {seed}: balancer {} of {:?}",
            lb.id, lb.environment
        );
    }
}
