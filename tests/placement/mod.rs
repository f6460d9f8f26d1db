//! Placement (the ContainerFactory): requirements and balance (property tests), reservations
//! under concurrency, dummies and the collector, and migrate, clone, drain and environment
//! clone through placement (`moves.rs`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cloud48_engine::managers::{ContainerCommand, CreateContainer};
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{
    Accepted, CommandStatus, Container, ContainerStatus, Environment, Requirements, Resources,
    Server,
};
use cloud48_engine::placement::{self, Candidate, PlaceRequest, Weights, decide, score};
use proptest::prelude::*;
use sea_orm::{EntityTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::common::{Opts, TestCore};

mod moves;

const LABELS: [&str; 3] = ["ssd", "gpu", "eu"];

fn candidate() -> impl Strategy<Value = Candidate> {
    (
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.1),
        prop::collection::vec(prop::sample::select(LABELS.to_vec()), 0..3),
        (1_000..32_000u64, 1_024..131_072u64, 1_024..1_000_000u64),
        (0..=100u64, 0..=100u64, 0..=100u64),
        0..50u64,
    )
        .prop_map(
            |(up, draining, labels, (cpu, mem, disk), (pc, pm, pd), containers)| Candidate {
                id: 0,
                up,
                draining,
                labels: labels.into_iter().map(String::from).collect(),
                capacity: Resources {
                    cpu_millis: cpu,
                    memory_mb: mem,
                    disk_mb: disk,
                },
                allocated: Resources {
                    cpu_millis: cpu * pc / 100,
                    memory_mb: mem * pm / 100,
                    disk_mb: disk * pd / 100,
                },
                containers,
                slots: None,
            },
        )
}

fn eligible(c: &Candidate, req: &Requirements, avoid: &HashSet<i64>) -> bool {
    c.up && !c.draining
        && !avoid.contains(&c.id)
        && req.labels.iter().all(|l| c.labels.contains(l))
        && req.resources.fits_in(&c.free())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_decision_meets_every_requirement_and_takes_the_best_score(
        fleet in prop::collection::vec(candidate(), 0..40),
        need in (1..8_000u64, 1..32_768u64, 1..200_000u64),
        labels in prop::collection::vec(prop::sample::select(LABELS.to_vec()), 0..2),
        avoid_mask in any::<u64>(),
        weights in (0..=200u32, 0..=200u32, 0..=200u32),
    ) {
        let servers: Vec<Candidate> = fleet.into_iter().enumerate().map(|(i, mut c)| { c.id = i as i64 + 1; c }).collect();
        let avoid: HashSet<i64> = servers.iter().filter(|c| avoid_mask >> (c.id % 64) & 1 == 1 && c.id % 4 == 0).map(|c| c.id).collect();
        let req = Requirements {
            resources: Resources { cpu_millis: need.0, memory_mb: need.1, disk_mb: need.2 },
            labels: labels.into_iter().map(String::from).collect(),
            spread: false,
        };
        let w = Weights { cpu: weights.0 as f64 / 100.0, memory: weights.1 as f64 / 100.0, disk: weights.2 as f64 / 100.0, ..Weights::default() };
        match decide(&servers, &req, &avoid, &w) {
            Ok(id) => {
                let chosen = servers.iter().find(|c| c.id == id).unwrap();
                prop_assert!(eligible(chosen, &req, &avoid), "chose an ineligible server {chosen:?}");
                for other in servers.iter().filter(|c| eligible(c, &req, &avoid)) {
                    prop_assert!(score(chosen, &req.resources, &w) >= score(other, &req.resources, &w),
                        "server {} scores better than the chosen {}", other.id, chosen.id);
                }
            }
            Err(reason) => {
                prop_assert!(servers.iter().all(|c| !eligible(c, &req, &avoid)), "refused although a server fits: {reason}");
                let placeable = servers.iter().any(|c| c.up && !c.draining && !avoid.contains(&c.id)
                    && req.labels.iter().all(|l| c.labels.contains(l)));
                if placeable {
                    prop_assert!(reason.contains("needed") || reason.contains("together"), "the reason should name a resource: {reason}");
                }
            }
        }
    }

    #[test]
    fn batch_decisions_equal_one_decision_after_another(
        fleet in prop::collection::vec(candidate(), 0..40),
        need in (1..4_000u64, 1..16_384u64, 1..100_000u64),
        labels in prop::collection::vec(prop::sample::select(LABELS.to_vec()), 0..2),
        count in 0..60usize,
    ) {
        let mut servers: Vec<Candidate> = fleet.into_iter().enumerate().map(|(i, mut c)| { c.id = i as i64 + 1; c }).collect();
        let req = Requirements {
            resources: Resources { cpu_millis: need.0, memory_mb: need.1, disk_mb: need.2 },
            labels: labels.into_iter().map(String::from).collect(),
            spread: false,
        };
        let w = Weights::default();
        let cache = placement::PlacementCache::with_servers(w, servers.clone());
        let batch = cache.decide_many(placement::Holder::Command(1), &req, None, count);
        for (i, got) in batch.iter().enumerate() {
            let want = decide(&servers, &req, &HashSet::new(), &w);
            prop_assert_eq!(got.is_ok(), want.is_ok(), "decision {} differs", i);
            if let (Ok(g), Ok(s)) = (got, &want) {
                prop_assert_eq!(g, s, "decision {} chose another server", i);
                let c = servers.iter_mut().find(|c| c.id == *s).unwrap();
                c.allocated = c.allocated.plus(&req.resources);
                c.containers += 1;
            }
        }
        prop_assert_eq!(cache.snapshot(), servers, "the cache counts every decision");
    }

    #[test]
    fn equal_containers_on_equal_servers_end_up_balanced(servers in 1..30usize, containers in 0..300usize) {
        let capacity = Resources { cpu_millis: 64_000, memory_mb: 262_144, disk_mb: 4_000_000 };
        let mut fleet: Vec<Candidate> = (1..=servers as i64)
            .map(|id| Candidate { id, up: true, draining: false, labels: vec![], capacity, allocated: Resources::default(), containers: 0, slots: None })
            .collect();
        let req = Requirements { resources: Resources { cpu_millis: 100, memory_mb: 256, disk_mb: 1_000 }, ..Default::default() };
        for _ in 0..containers {
            let id = decide(&fleet, &req, &HashSet::new(), &Weights::default()).unwrap();
            let c = fleet.iter_mut().find(|c| c.id == id).unwrap();
            c.allocated = c.allocated.plus(&req.resources);
            c.containers += 1;
        }
        let most = fleet.iter().map(|c| c.containers).max().unwrap();
        let least = fleet.iter().map(|c| c.containers).min().unwrap();
        prop_assert!(most - least <= 1, "unbalanced: {least}..{most}");
    }
}

async fn create(t: &TestCore, req: &CreateContainer) -> Accepted {
    t.client.post("/v1/containers", req).await.unwrap()
}

async fn show(t: &TestCore, id: ContainerId) -> Container {
    t.client.get(&format!("/v1/containers/{id}")).await.unwrap()
}

async fn servers(t: &TestCore) -> Vec<Server> {
    t.client.get("/v1/servers").await.unwrap()
}

/// The id of server `name`.
async fn server_named(t: &TestCore, name: &str) -> i64 {
    let all = servers(t).await;
    all.iter()
        .find(|s| s.name == name)
        .expect("a server of that name")
        .id
        .0
}

/// The container of create `a`.
async fn created(t: &TestCore, a: &Accepted) -> Container {
    show(t, ContainerId(a.object_id.unwrap())).await
}

/// Places container `c` of create `a` on server `server` in `txn`, as its placing step would.
async fn place_on(
    t: &TestCore,
    txn: &sea_orm::DatabaseTransaction,
    (a, c): (&Accepted, &Container),
    server: i64,
) {
    let request = PlaceRequest {
        requirements: &c.requirements,
        image: None,
        container_id: c.id.0,
        command_id: Some(a.command_id.0),
        avoid: HashSet::new(),
        server: Some(server),
        deadline: t.core.queue().now_ms() + 3_600_000,
    };
    placement::place(txn, t.core.placement(), request)
        .await
        .unwrap();
}

/// The ledger matches the containers and dummies, no dummy is left, and placement's view
/// counts exactly what the ledger holds (nothing counted twice, nothing left unsettled).
async fn assert_ledger_clean(t: &TestCore) {
    let audit = placement::audit(t.core.db()).await.unwrap();
    assert!(audit.is_empty(), "allocation counters drifted: {audit:?}");
    for s in servers(t).await {
        assert_eq!(s.dummies, 0, "server {} keeps a dummy", s.name);
    }
    assert_view_is_the_database(t).await;
}

use crate::common::plain;

/// Three servers with room for 50 plain containers (256 MB) each.
/// A core with room for 150 plain containers whose queue waits for `start`.
async fn paused_with_room_for_150(postgres: bool) -> Option<TestCore> {
    let opts = Opts {
        paused: true,
        ..room_for_150(postgres)
    };
    TestCore::start(opts).await
}

fn room_for_150(postgres: bool) -> Opts {
    Opts {
        postgres,
        workers: 16,
        capacity: Some(Resources {
            cpu_millis: 1_000_000,
            memory_mb: 256 * 50,
            disk_mb: 10_000_000,
        }),
        ..Default::default()
    }
}

async fn two_hundred_concurrent_creates_never_overcommit(postgres: bool) {
    // 150 fit, 50 do not.
    let Some(t) = TestCore::start(room_for_150(postgres)).await else {
        return;
    };
    let mut accepted = Vec::new();
    for _ in 0..200 {
        accepted.push(create(&t, &plain(None)).await);
    }
    let mut failures = Vec::new();
    for a in &accepted {
        let cmd = t.wait(a.command_id).await;
        if cmd.status != CommandStatus::Succeeded {
            failures.push(cmd.error.unwrap_or_default());
        }
    }
    assert_eq!(
        failures.len(),
        50,
        "exactly the creates that do not fit fail"
    );
    for f in &failures {
        assert!(
            f.contains("memory_mb 256 needed") || f.contains("filled up"),
            "unclear failure: {f}"
        );
    }
    for s in servers(&t).await {
        assert!(
            s.allocated.memory_mb <= s.capacity.memory_mb,
            "server {} is over-committed: {s:?}",
            s.name
        );
        assert_eq!(s.containers, 50, "server {} is not full", s.name);
        let guests = t.sim(&s.name).await.guests().len();
        assert_eq!(guests, 50, "server {} runs {guests} guests", s.name);
    }
    assert_ledger_clean(&t).await;
}
crate::on_both_databases!(
    concurrent_creates,
    two_hundred_concurrent_creates_never_overcommit
);

async fn a_batch_onto_a_nearly_full_platform_never_overcommits(postgres: bool) {
    // One batch of 160 and 40 single creates compete for room for 150.
    let Some(t) = TestCore::start(room_for_150(postgres)).await else {
        return;
    };
    let batch = create(
        &t,
        &CreateContainer {
            project: None,
            count: Some(160),
            ..plain(None)
        },
    )
    .await;
    assert_eq!(batch.object_id, None);
    let mut singles = Vec::new();
    for _ in 0..40 {
        singles.push(create(&t, &plain(None)).await);
    }
    // Fewer than asked were placed: the batch fails, says so in one line and keeps its result.
    let done = t.wait(batch.command_id).await;
    assert_eq!(done.status, CommandStatus::Failed, "{done:?}");
    let error = done.error.clone().unwrap();
    let result = done.result.unwrap();
    let mut single_ok = 0;
    for a in &singles {
        single_ok += (t.wait(a.command_id).await.status == CommandStatus::Succeeded) as u64;
    }
    let created = result["created"].as_u64().unwrap();
    assert_eq!(
        created + single_ok,
        150,
        "exactly what fits was created: {result}"
    );
    let failed = result["failed"].as_array().unwrap();
    assert_eq!(failed.len() as u64, 160 - created);
    assert!(
        error.starts_with(&format!("placed {created} of 160: ")),
        "{error}"
    );
    assert!(
        !error.contains('\n') && error.len() < 300,
        "one short line: {error}"
    );
    assert!(
        failed
            .iter()
            .all(|f| f[1].as_str().unwrap().contains("memory_mb 256 needed")
                || f[1].as_str().unwrap().contains("room")),
        "{result}"
    );
    let list: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    let running = list
        .iter()
        .filter(|c| c.status == ContainerStatus::Running)
        .count();
    let failed_rows = list
        .iter()
        .filter(|c| c.status == ContainerStatus::Failed)
        .count();
    assert_eq!(
        (running, failed_rows),
        (150, 50),
        "every container ended running or failed"
    );
    for s in servers(&t).await {
        assert!(
            s.allocated.memory_mb <= s.capacity.memory_mb,
            "server {} is over-committed",
            s.name
        );
        assert_eq!(
            t.sim(&s.name).await.guests().len(),
            50,
            "server {} runs one guest per container",
            s.name
        );
    }
    // The batch's containers are unlocked: a command on one of them runs.
    let one = list
        .iter()
        .find(|c| c.status == ContainerStatus::Running)
        .unwrap();
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", one.id),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    assert_ledger_clean(&t).await;
}
crate::on_both_databases!(
    batch_creates,
    a_batch_onto_a_nearly_full_platform_never_overcommits
);

async fn single_creates_claimed_together_run_in_groups_and_end_as_they_would_alone(postgres: bool) {
    // Submitted while the queue is paused, the creates are claimed together, 64 at a time.
    let opts = Opts {
        workers: 64,
        paused: true,
        ..room_for_150(postgres)
    };
    let Some(t) = TestCore::start(opts).await else {
        return;
    };
    let mut pinned = Vec::new();
    for _ in 0..20 {
        pinned.push(create(&t, &plain(Some("sim-2"))).await);
    }
    let mut free = Vec::new();
    for _ in 0..130 {
        free.push(create(&t, &plain(None)).await);
    }
    let huge = Requirements {
        resources: Resources {
            cpu_millis: 10,
            memory_mb: 1_000_000,
            disk_mb: 10,
        },
        ..Default::default()
    };
    let mut too_big = Vec::new();
    for _ in 0..5 {
        too_big.push(
            create(
                &t,
                &CreateContainer {
                    project: None,
                    requirements: Some(huge.clone()),
                    ..plain(None)
                },
            )
            .await,
        );
    }
    // One guest that its server refuses: that create fails alone, with the server's words.
    t.sim("sim-3").await.fail_next(
        "create",
        1,
        cloud48_engine::driver::DriverError::Permanent("disk broken".into()),
    );
    t.core.start().await.unwrap();

    let mut refused = 0;
    for a in pinned.iter().chain(&free) {
        let cmd = t.wait(a.command_id).await;
        if cmd.status == CommandStatus::Succeeded {
            let c = show(&t, ContainerId(a.object_id.unwrap())).await;
            assert_eq!(c.status, ContainerStatus::Running);
            assert!(c.ip.is_some() && c.locked_by.is_none(), "{c:?}");
        } else {
            assert!(
                cmd.error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("disk broken"),
                "{cmd:?}"
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "only the refused guest's create failed");
    for a in &pinned {
        assert_eq!(
            show(&t, ContainerId(a.object_id.unwrap()))
                .await
                .server
                .as_deref(),
            Some("sim-2"),
            "a create that named its server went elsewhere"
        );
    }
    for a in &too_big {
        let cmd = t.wait(a.command_id).await;
        assert_eq!(cmd.status, CommandStatus::Failed);
        assert!(
            cmd.error.unwrap().contains("memory_mb 1000000 needed"),
            "the failure names the unmet requirement"
        );
    }
    let grouped = t.core.queue().grouped_steps();
    assert!(
        grouped >= 200,
        "most create steps ran in groups, only {grouped} did"
    );
    let mut guests = 0;
    for s in servers(&t).await {
        assert!(
            s.allocated.memory_mb <= s.capacity.memory_mb,
            "server {} is over-committed",
            s.name
        );
        let n = t.sim(&s.name).await.guests().len();
        assert_eq!(
            n as u64, s.containers,
            "server {} runs one guest per container",
            s.name
        );
        assert!(n >= 49, "placement did not balance: {} holds {n}", s.name);
        guests += n;
    }
    assert_eq!(guests, 149);
    assert_ledger_clean(&t).await;
}
crate::on_both_databases!(
    grouped_creates,
    single_creates_claimed_together_run_in_groups_and_end_as_they_would_alone
);

/// A create placed by an earlier run of its group, which committed the dummy but not the
/// command's step (the group carries it; a crash or a retry then runs step 0 again), is made
/// from that dummy: not placed a second time, nothing left reserved.
async fn a_create_placed_before_its_step_was_written_is_made_from_its_dummy(postgres: bool) {
    let Some(t) = paused_with_room_for_150(postgres).await else {
        return;
    };
    let mut accepted = Vec::new();
    for _ in 0..8 {
        accepted.push(create(&t, &plain(None)).await);
    }
    // Three of them already hold a dummy on sim-3, as a committed step 0 leaves it.
    let sim3 = server_named(&t, "sim-3").await;
    for a in &accepted[..3] {
        let c = created(&t, a).await;
        let txn = t.core.db().begin().await.unwrap();
        place_on(&t, &txn, (a, &c), sim3).await;
        txn.commit().await.unwrap();
        // Placed outside the command's run: its count in the view is settled here.
        let holder = placement::Holder::Command(a.command_id.0);
        t.core.placement().settle(holder, true);
    }
    t.core.start().await.unwrap();
    for (i, a) in accepted.iter().enumerate() {
        t.ok(a.command_id).await;
        let c = show(&t, ContainerId(a.object_id.unwrap())).await;
        assert_eq!(c.status, ContainerStatus::Running);
        if i < 3 {
            assert_eq!(
                c.server.as_deref(),
                Some("sim-3"),
                "a create placed again instead of taking its dummy"
            );
        }
    }
    let mut guests = 0;
    for s in servers(&t).await {
        let n = t.sim(&s.name).await.guests().len();
        assert_eq!(n as u64, s.containers, "server {}", s.name);
        guests += n;
    }
    assert_eq!(guests, 8, "one guest per create");
    assert_ledger_clean(&t).await;
}
crate::on_both_databases!(
    placed_before,
    a_create_placed_before_its_step_was_written_is_made_from_its_dummy
);

/// Placement's view equals the servers' rows: every server's counters and containers.
async fn assert_view_is_the_database(t: &TestCore) {
    let view: HashMap<i64, Candidate> = t
        .core
        .placement()
        .snapshot()
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    for s in servers(t).await {
        let c = &view[&s.id.0];
        assert_eq!(
            (c.allocated, c.containers),
            (s.allocated, s.containers),
            "placement's view of {} differs from the database",
            s.name
        );
    }
}

/// A view of the servers read before creates committed (as a reload racing them reads it) is
/// taken in with them still counted; and once every command has ended nothing this core
/// counted is left unsettled, so a reload shows exactly what the database holds.
async fn a_view_read_while_creates_commit_still_counts_them(postgres: bool) {
    let opts = Opts {
        workers: 64,
        paused: true,
        ..room_for_150(postgres)
    };
    let Some(t) = TestCore::start(opts).await else {
        return;
    };
    // Creates in groups (some naming their server), alone in a batch, and one that fits nowhere.
    let mut accepted = Vec::new();
    for _ in 0..10 {
        accepted.push(create(&t, &plain(Some("sim-2"))).await);
    }
    for _ in 0..60 {
        accepted.push(create(&t, &plain(None)).await);
    }
    let batch = CreateContainer {
        count: Some(40),
        ..plain(None)
    };
    accepted.push(create(&t, &batch).await);
    let placement = t.core.placement();
    let read = placement.reading();
    let before = cloud48_engine::entities::server::Entity::find()
        .all(t.core.db())
        .await
        .unwrap();
    assert!(before.iter().all(|s| s.alloc_containers == 0));
    t.core.start().await.unwrap();
    for a in &accepted {
        t.ok(a.command_id).await;
    }
    placement.load(read, &before);
    assert_ledger_clean(&t).await;
    placement.refresh_all(t.core.db()).await.unwrap();
    assert_view_is_the_database(&t).await;
}
crate::on_both_databases!(
    view_read_meanwhile,
    a_view_read_while_creates_commit_still_counts_them
);

/// A server read again through the transaction that holds a command's claim on it (as a
/// placement does after another claim there failed) counts that claim once, not twice.
async fn a_server_read_in_the_transaction_holding_a_claim_counts_it_once(postgres: bool) {
    let Some(t) = paused_with_room_for_150(postgres).await else {
        return;
    };
    let a = create(&t, &plain(Some("sim-1"))).await;
    let sim1 = server_named(&t, "sim-1").await;
    let cache = t.core.placement();
    let c = created(&t, &a).await;
    let txn = t.core.db().begin().await.unwrap();
    place_on(&t, &txn, (&a, &c), sim1).await;
    let holder = placement::Holder::Command(a.command_id.0);
    cache
        .refresh_within(&txn, sim1, Some(holder))
        .await
        .unwrap();
    let counted = |id| cache.snapshot().into_iter().find(|c| c.id == id).unwrap();
    assert_eq!(counted(sim1).containers, 1, "the claim counted twice");
    txn.commit().await.unwrap();
    cache.settle(holder, true);
    assert_view_is_the_database(&t).await;
}
crate::on_both_databases!(
    read_within_claim,
    a_server_read_in_the_transaction_holding_a_claim_counts_it_once
);

async fn the_placement_bench_runs_pre_locked_creates_to_a_consistent_ledger(postgres: bool) {
    // Its submitter locks each new container for its create, so the claim finds them held;
    // the bench fails if a container is not running or the ledger disagrees. On PostgreSQL it
    // makes its own scratch database through the test's.
    let pg = match postgres {
        true => match crate::common::PgDb::create().await {
            Some(db) => Some(db),
            None => return,
        },
        false => None,
    };
    let args = cloud48_core::bench::PlaceBenchArgs {
        servers: 200,
        creates: 2_000,
        workers: 256,
        claim_batch: 256,
        postgres: pg.as_ref().map(|db| db.url.clone()),
        connections: 4,
        batch: 1,
    };
    cloud48_core::bench::place(args).await.unwrap();
}
crate::on_both_databases!(
    placement_bench,
    the_placement_bench_runs_pre_locked_creates_to_a_consistent_ledger
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_its_server_refuses_fails_alone_and_gives_its_reservation_back() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    for name in ["sim-1", "sim-2", "sim-3"] {
        t.sim(name).await.fail_next(
            "create",
            1,
            cloud48_engine::driver::DriverError::Permanent("disk broken".into()),
        );
    }
    let batch = create(
        &t,
        &CreateContainer {
            project: None,
            count: Some(30),
            ..plain(None)
        },
    )
    .await;
    let done = t.wait(batch.command_id).await;
    assert_eq!(
        done.status,
        CommandStatus::Failed,
        "a partial batch is a failure: {done:?}"
    );
    let error = done.error.unwrap();
    assert!(
        error.starts_with("placed 27 of 30: server sim-") && error.contains("disk broken"),
        "{error}"
    );
    let result = done.result.unwrap();
    assert_eq!(result["created"], 27, "{result}");
    let failed = result["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 3);
    assert!(
        failed
            .iter()
            .all(|f| f[1].as_str().unwrap().contains("disk broken")),
        "{result}"
    );
    // The failed containers are hidden from the list unless asked, and can be purged.
    let listed: Vec<Container> = t.client.get("/v1/containers").await.unwrap();
    assert_eq!(listed.len(), 27);
    let all: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(
        all.iter()
            .filter(|c| c.status == ContainerStatus::Failed)
            .count(),
        3
    );
    let purged: Value = t
        .client
        .post("/v1/containers/purge", &json!({}))
        .await
        .unwrap();
    assert_eq!(purged["purged"], 3, "{purged}");
    let all: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(all.len(), 27, "only the running containers are left");
    let mut guests = 0;
    for s in servers(&t).await {
        guests += t.sim(&s.name).await.guests().len();
    }
    assert_eq!(guests, 27, "no guest of a failed container is left behind");
    let err = t
        .client
        .post::<_, Value>("/v1/containers", &json!({ "type": "plain", "count": 0 }))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("count: must be 1-10000"), "{err}");
    assert_ledger_clean(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_keeps_members_of_a_type_on_different_servers() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "spread" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let req = json!({ "type": "plain", "requirements": { "cpu_millis": 10, "memory_mb": 16, "disk_mb": 16, "spread": true } });
    let mut on = HashSet::new();
    for _ in 0..3 {
        let a: Accepted = t
            .client
            .post("/v1/environments/spread/containers", &req)
            .await
            .unwrap();
        let id = t.created(a.command_id).await;
        assert!(
            on.insert(show(&t, id).await.server_id.unwrap()),
            "two members of the type share a server"
        );
    }
    let a: Accepted = t
        .client
        .post("/v1/environments/spread/containers", &req)
        .await
        .unwrap();
    let failed = t.wait(a.command_id).await;
    assert_eq!(failed.status, CommandStatus::Failed);
    assert!(
        failed.error.unwrap().contains("(spread)"),
        "the failure names the spread requirement"
    );
    assert_ledger_clean(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_dummies_and_those_of_finished_commands_are_collected() {
    let dir = crate::common::tempdir();
    let mut config = cloud48_engine::CoreConfig::new(dir.path());
    config.sim_servers = 2;
    config.health.background = false;
    config.plugin_cache = Some(std::env::temp_dir().join("cloud48-test-plugin-cache"));
    // Opened, not started: commands stay queued until `start`.
    let core = cloud48_engine::Core::open(config).await.unwrap();
    let live = core.queue().enqueue(crate::common::noop()).await.unwrap();
    let req = Requirements {
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 100,
            disk_mb: 100,
        },
        ..Default::default()
    };
    let now = core.queue().now_ms();
    for (command_id, deadline) in [(None, now - 1), (Some(live.0), now + 3_600_000)] {
        let txn = core.db().begin().await.unwrap();
        let request = PlaceRequest {
            requirements: &req,
            image: None,
            container_id: 0,
            command_id,
            avoid: HashSet::new(),
            server: None,
            deadline,
        };
        placement::place(&txn, core.placement(), request)
            .await
            .unwrap();
        txn.commit().await.unwrap();
    }
    let reserved: u64 = core
        .servers()
        .list()
        .await
        .unwrap()
        .iter()
        .map(|s| s.dummies)
        .sum();
    assert_eq!(reserved, 2);
    let report = core.collector().collect(None).await.unwrap();
    assert_eq!(
        report.dummies, 1,
        "only the expired dummy without a command goes"
    );
    assert!(placement::audit(core.db()).await.unwrap().is_empty());

    // Once its command finished, the other one goes too (the collector runs at start-up).
    core.start().await.unwrap();
    core.queue()
        .wait(live, Duration::from_secs(30))
        .await
        .unwrap();
    core.collector().collect(None).await.unwrap();
    let reserved: u64 = core
        .servers()
        .list()
        .await
        .unwrap()
        .iter()
        .map(|s| s.dummies)
        .sum();
    assert_eq!(reserved, 0);
    for s in core.servers().list().await.unwrap() {
        assert_eq!(
            s.allocated,
            Resources::default(),
            "server {} still has capacity reserved",
            s.name
        );
    }
    core.stop(Duration::from_secs(5)).await;
}
