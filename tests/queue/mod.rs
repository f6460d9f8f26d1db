//! The persisted queue on SQLite and PostgreSQL: locks, parents and children, cancellation,
//! several cores sharing one queue on PostgreSQL (`postgres.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud48_engine::entities::command;
use cloud48_engine::managers::ContainerCommand;
use cloud48_engine::model::{CommandId, CommandStatus, ContainerStatus};
use cloud48_engine::queue::{
    NewCommand, Next, Queue, QueueConfig, Runner, StepError, SystemClock, Transition,
};
use serde_json::Value;

use crate::common::{Opts, PgDb, TestCore};
use crate::on_both_databases;

mod postgres;

async fn running_container(t: &TestCore) -> (cloud48_engine::model::ContainerId, String) {
    let (cmd, id) = t
        .core
        .containers()
        .create(&crate::common::plain(Some("sim-1")), "test")
        .await
        .unwrap();
    t.ok(cmd).await;
    let guest = t.core.containers().get_by_id(id).await.unwrap().guest_id;
    (id, guest)
}

on_both_databases!(
    two_commands_on_one_container_never_overlap,
    lock_serialization
);
async fn lock_serialization(pg: bool) {
    let Some(t) = TestCore::start(Opts {
        postgres: pg,
        latency: Duration::from_millis(20),
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    let (id, guest) = running_container(&t).await;
    let mut cmds = Vec::new();
    for _ in 0..6 {
        cmds.push(
            t.core
                .containers()
                .run(ContainerCommand::Reboot {}, id, "test")
                .await
                .unwrap(),
        );
    }
    for c in cmds {
        t.ok(c).await;
    }
    let sim = t.sim("sim-1").await;
    assert_eq!(
        sim.overlapping_operations(),
        0,
        "two commands acted on the guest at once"
    );
    let reboots = sim
        .guest(&guest)
        .unwrap()
        .operations
        .iter()
        .filter(|o| *o == "reboot")
        .count();
    assert_eq!(
        reboots, 6,
        "every queued command ran, none failed for the lock"
    );
    assert_eq!(
        t.core.containers().get_by_id(id).await.unwrap().locked_by,
        None,
        "the lock was released"
    );
}

on_both_databases!(a_parent_waits_for_all_its_children, parent_child);
async fn parent_child(pg: bool) {
    let Some(t) = TestCore::start(Opts {
        postgres: pg,
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    let (env_cmd, _) = t.core.environments().create("fam", "test").await.unwrap();
    t.ok(env_cmd).await;
    for _ in 0..3 {
        let add = t
            .core
            .environments()
            .add(
                "fam",
                &cloud48_engine::managers::AddContainer {
                    type_id: "plain".into(),
                    requirements: None,
                    server: None,
                    params: Default::default(),
                },
                "test",
            )
            .await
            .unwrap();
        t.ok(add).await;
    }
    let stop = t
        .core
        .environments()
        .run(cloud48_engine::managers::EnvironmentOp::Stop, "fam", "test")
        .await
        .unwrap();
    let parent = t.ok(stop).await;
    let children = t
        .core
        .queue()
        .list(&cloud48_engine::queue::CommandFilter {
            parent: Some(stop.0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(children.len(), 3);
    for c in &children {
        assert_eq!(c.status, CommandStatus::Succeeded);
        assert_eq!(c.kind, "container.stop");
        assert!(
            c.finished_at.unwrap() <= parent.finished_at.unwrap(),
            "the parent finished after its children"
        );
    }
    let env = t.core.environments().get_by_id("fam").await.unwrap();
    assert!(
        env.members
            .iter()
            .all(|m| m.status == ContainerStatus::Stopped)
    );
}

on_both_databases!(
    a_queued_command_can_be_cancelled_and_never_runs,
    cancellation
);
async fn cancellation(pg: bool) {
    let Some(t) = TestCore::start(Opts {
        postgres: pg,
        latency: Duration::from_millis(300),
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    let (id, guest) = running_container(&t).await;
    let slow = t
        .core
        .containers()
        .run(ContainerCommand::Reboot {}, id, "test")
        .await
        .unwrap();
    // Once the slow command holds the lock, the next one waits in the queue without running.
    while t.core.containers().get_by_id(id).await.unwrap().locked_by != Some(slow) {
        tokio::task::yield_now().await;
    }
    let queued = t
        .core
        .containers()
        .run(ContainerCommand::Stop {}, id, "test")
        .await
        .unwrap();
    let cancelled = t.core.queue().cancel(queued).await.unwrap();
    assert_eq!(cancelled.status, CommandStatus::Cancelled);
    t.ok(slow).await;
    let again = t.core.queue().get(queued).await.unwrap();
    assert_eq!(again.status, CommandStatus::Cancelled);
    assert_eq!(
        t.core.containers().get_by_id(id).await.unwrap().status,
        ContainerStatus::Running
    );
    assert!(
        !t.sim("sim-1")
            .await
            .guest(&guest)
            .unwrap()
            .operations
            .contains(&"stop".to_string())
    );
    let err = t.core.queue().cancel(slow).await.unwrap_err();
    assert!(err.to_string().contains("only queued commands"), "{err}");
    let err = t.core.queue().cancel(CommandId(999_999)).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// A stored command this core cannot read (written by a newer core, or damaged) fails with a
/// message naming the command and what was wrong; it is never run with `null` parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_command_fails_with_an_error_that_names_it() {
    use sea_orm::ConnectionTrait;
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: cloud48_engine::model::Accepted = t
        .client
        .post("/v1/containers", &serde_json::json!({ "type": "plain" }))
        .await
        .unwrap();
    let container = t.created(a.command_id).await;
    let rows = [
        (
            "container.teleport",
            "{}".to_string(),
            "unknown CommandKind 'container.teleport'",
        ),
        (
            "container.update",
            "{\"resources\": 12".to_string(),
            "unreadable parameters",
        ),
        (
            "container.create_many",
            "{\"type\": \"plain\", \"count\": 1, \"requirements\": {\"cpu_millis\": 1, \"memory_mb\": 1, \"disk_mb\": 1}}".to_string(),
            "at step 1: unreadable progress: failed",
        ),
        (
            "container.update",
            "{\"resources\": {\"cpu\": 1}}".to_string(),
            "unreadable parameters: unknown field `cpu`",
        ),
    ];
    for (kind, params, expected) in rows {
        let sql = format!(
            "INSERT INTO commands (kind, status, target_type, target_id, params, progress, step, attempts, run_after, requested_by, created_at) \
             VALUES ('{kind}', 'queued', 'container', {container}, '{params}', '{{}}', 0, 0, 0, 'test', 0)"
        );
        let sql = if kind == "container.create_many" {
            // Resumed at step 1 with progress that lacks what step 0 writes.
            format!(
                "INSERT INTO commands (kind, status, params, progress, step, attempts, run_after, requested_by, created_at) \
                 VALUES ('{kind}', 'queued', '{params}', '{{\"placed\": []}}', 1, 0, 0, 'test', 0)"
            )
        } else {
            sql
        };
        t.core.db().execute_unprepared(&sql).await.unwrap();
        let id: CommandId = t
            .core
            .queue()
            .list(&Default::default())
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .max()
            .unwrap();
        t.core.queue().wake();
        let c = t.wait(id).await;
        assert_eq!(c.status, CommandStatus::Failed);
        let error = c.error.unwrap();
        assert!(
            error.contains(&format!("command {id}")) && error.contains(expected),
            "{error}"
        );
    }
    // A fan-out resumed past the end of its plan fails, naming it, instead of finishing.
    let (created, env) = t.core.environments().create("plan", "test").await.unwrap();
    t.wait(created).await;
    let sql = format!(
        "INSERT INTO commands (id, kind, status, target_type, target_id, params, progress, step, attempts, run_after, requested_by, created_at) \
         VALUES (990, 'environment.stop', 'queued', 'environment', {env}, '{{}}', '{{\"groups\": [[1]]}}', 5, 0, 0, 'test', 0)"
    );
    t.core.db().execute_unprepared(&sql).await.unwrap();
    t.core.queue().wake();
    let c = t.wait(990).await;
    assert_eq!(c.status, CommandStatus::Failed);
    assert_eq!(
        c.error.as_deref(),
        Some("command 990 (environment.stop): step 5 is past the end of its plan of 1 items")
    );

    // A status this core does not know is an error naming the command, not `failed`.
    let id = 1000;
    let sql = format!(
        "INSERT INTO commands (id, kind, status, params, progress, step, attempts, run_after, requested_by, created_at) \
         VALUES ({id}, 'noop', 'paused', '{{}}', '{{}}', 0, 0, 0, 'test', 0)"
    );
    t.core.db().execute_unprepared(&sql).await.unwrap();
    let listed = t.core.queue().list(&Default::default()).await.unwrap_err();
    assert!(
        listed
            .to_string()
            .starts_with(&format!("command {id} (noop)")),
        "{listed}"
    );
    let e = t
        .core
        .queue()
        .get(CommandId(id))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "command {id} (noop): unreadable status: unknown CommandStatus 'paused' (expected one of: queued, running, waiting, succeeded, failed, cancelled)"
        )
    );
    let resp = reqwest::get(format!("{}/v1/commands/{id}", t.url))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("unknown CommandStatus 'paused'")
    );

    // The container was not touched.
    let c = t.core.containers().get_by_id(container).await.unwrap();
    assert_eq!(c.status, cloud48_engine::model::ContainerStatus::Running);
}

on_both_databases!(
    commands_on_one_container_run_in_submission_order,
    submission_order
);
async fn submission_order(pg: bool) {
    let Some(t) = TestCore::start(Opts {
        postgres: pg,
        latency: Duration::from_millis(10),
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    let (id, _) = running_container(&t).await;
    let mut last = CommandId(0);
    for mem in 300..308 {
        let resources = cloud48_engine::model::Resources {
            cpu_millis: 500,
            memory_mb: mem,
            disk_mb: 1024,
        };
        last = t
            .core
            .containers()
            .run(ContainerCommand::Update { resources }, id, "test")
            .await
            .unwrap();
    }
    t.ok(last).await;
    let c = t.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(
        c.requirements.resources.memory_mb, 307,
        "the last submitted update wins"
    );
    let cmds = t
        .core
        .queue()
        .list(&cloud48_engine::queue::CommandFilter {
            target_id: Some(id.0),
            target_type: Some("container".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut finished: Vec<(i64, CommandId)> = cmds
        .iter()
        .filter(|c| c.kind == "container.update")
        .map(|c| (c.finished_at.unwrap(), c.id))
        .collect();
    finished.sort();
    let ids: Vec<CommandId> = finished.iter().map(|(_, id)| *id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        ids, sorted,
        "updates finished in the order they were submitted"
    );
}

/// Regression (hardening): 300 idle anonymous `?wait=` long-polls cost 38-61 % of a core, each
/// re-reading its command every 100 ms, with no cap. Waits are capped per client (429 past 64)
/// and woken by their command's end; each gives its place back when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_are_capped_per_client_and_woken_by_their_commands_end() {
    let t = TestCore::start(Opts {
        paused: true,
        ..Opts::default()
    })
    .await
    .unwrap();
    // Queued and never run: the core's queue is not started.
    let a: cloud48_engine::model::Accepted = t
        .client
        .post("/v1/environments", &serde_json::json!({ "name": "idle" }))
        .await
        .unwrap();
    let id = a.command_id;
    let url = format!("{}/v1/commands/{id}?wait=300", t.url);
    let http = reqwest::Client::new();
    let waits: Vec<_> = (0..64)
        .map(|_| {
            let req = http.get(&url).send();
            tokio::spawn(async move { req.await.unwrap().json::<Value>().await.unwrap() })
        })
        .collect();
    crate::common::eventually("64 requests waiting", || async {
        (t.core.queue().waiting() == 64).then_some(())
    })
    .await;
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("address 127.0.0.1 already has 64 requests waiting on commands (at most 64)"),
        "{body}"
    );
    // The command ends: every wait returns with it, and gives its place back.
    t.core.queue().cancel(id).await.unwrap();
    for w in waits {
        assert_eq!(w.await.unwrap()["status"], "cancelled");
    }
    assert_eq!(t.core.queue().waiting(), 0);
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "a terminal command answers at once"
    );
}

/// A runner whose step hands the queue writes to a scratch table: they fail with a permanent
/// error when the command's parameters say so, after writing.
struct Writer;

#[async_trait::async_trait]
impl Runner for Writer {
    async fn step(&self, cmd: &command::Model) -> Result<Transition, StepError> {
        let fail = cmd.params.contains("fail");
        let id = cmd.id;
        Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                use sea_orm::ConnectionTrait;
                txn.execute_unprepared(&format!("INSERT INTO probe (n) VALUES ({id})"))
                    .await?;
                if fail {
                    return Err(StepError::Permanent("the writes refused".into()));
                }
                Ok(Next::Done(Value::Null))
            })
        }))
    }
}

on_both_databases!(
    a_steps_writes_commit_with_its_decision_and_failed_writes_leave_nothing,
    writes_commit_with_the_step
);
async fn writes_commit_with_the_step(pg: bool) {
    use sea_orm::ConnectionTrait;
    let Some(scratch) = crate::common::ScratchDb::create(pg).await else {
        return;
    };
    let db = scratch.db.clone();
    db.execute_unprepared("CREATE TABLE probe (n BIGINT NOT NULL)")
        .await
        .unwrap();
    let q = Queue::new(
        db.clone(),
        "core".into(),
        QueueConfig::default(),
        Arc::new(SystemClock),
    );
    q.start(Arc::new(Writer), false).await.unwrap();
    let mut ids = Vec::new();
    for params in [Value::Null, serde_json::json!("fail")] {
        let id = q
            .enqueue(NewCommand {
                project: None,
                kind: cloud48_engine::model::CommandKind::Noop,
                target: None,
                params,
                requested_by: "test".into(),
            })
            .await
            .unwrap();
        ids.push(id);
    }
    let ok = q.wait(ids[0], Duration::from_secs(60)).await.unwrap();
    assert_eq!(ok.status, CommandStatus::Succeeded);
    let failed = q.wait(ids[1], Duration::from_secs(60)).await.unwrap();
    assert_eq!(failed.status, CommandStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("the writes refused"));
    let rows: Vec<i64> = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT n FROM probe ORDER BY n",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get_by_index(0).unwrap())
        .collect();
    assert_eq!(
        rows,
        vec![ids[0].0],
        "only the succeeding step's writes stay"
    );
    q.stop(Duration::from_secs(5)).await;
}

on_both_databases!(the_lease_keeper_ends_when_stop_returns, keeper_ends);
/// `stop` returns once the lease keeper has ended (on SQLite a task beside the commands, on
/// PostgreSQL a thread with its own connection): a stopped queue renews and sweeps nothing
/// more, so its database may go at once (a benchmark drops its scratch database right after).
async fn keeper_ends(pg: bool) {
    let Some(scratch) = crate::common::ScratchDb::create(pg).await else {
        return;
    };
    // A long lease: the keeper sleeps 20 s between its rounds, so only `stop` can end it soon.
    let config = QueueConfig {
        lease: Duration::from_secs(60),
        ..QueueConfig::default()
    };
    let q = Queue::new(
        scratch.db.clone(),
        "core".into(),
        config,
        Arc::new(SystemClock),
    );
    if let Some(pg) = &scratch.pg {
        q.connect_apart(sea_orm::ConnectOptions::new(pg.url.clone()));
    }
    assert!(!q.keeper_running());
    q.start(Arc::new(Writer), false).await.unwrap();
    crate::common::eventually("the lease keeper runs", || async {
        q.keeper_running().then_some(())
    })
    .await;
    q.stop(Duration::ZERO).await;
    assert!(
        !q.keeper_running(),
        "the lease keeper still runs after stop"
    );
}

/// A runner whose step logs a line and fails (a retry) once a permit is given.
struct LogsThenFails {
    entered: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Runner for LogsThenFails {
    async fn step(&self, _: &command::Model) -> Result<Transition, StepError> {
        self.entered.notify_one();
        // One step per permit: a permit given back would let the next step through.
        self.gate.acquire().await.unwrap().forget();
        let line = cloud48_engine::types::LogLine {
            level: cloud48_engine::types::LogLevel::Info,
            message: "logged before failing".into(),
        };
        Err(StepError::Transient("the step failed".into()).logged(vec![(0, line)]))
    }
}

on_both_databases!(
    a_failed_steps_lines_are_kept_only_under_its_lease,
    failed_step_lines
);
/// What a failed step logged is kept while its core holds the command's lease, and not once
/// another core has taken the command over (it runs the step again and logs its own lines).
async fn failed_step_lines(pg: bool) {
    use sea_orm::ConnectionTrait;
    let Some(scratch) = crate::common::ScratchDb::create(pg).await else {
        return;
    };
    let db = scratch.db.clone();
    let q = Queue::new(
        db.clone(),
        "core-a".into(),
        QueueConfig {
            poll: Duration::from_millis(10),
            max_attempts: 1,
            ..QueueConfig::default()
        },
        Arc::new(SystemClock),
    );
    let entered = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    q.start(
        Arc::new(LogsThenFails {
            entered: entered.clone(),
            gate: gate.clone(),
        }),
        false,
    )
    .await
    .unwrap();
    let lines = |id: CommandId| {
        let q = &q;
        async move { q.get(id).await.unwrap().log.len() }
    };

    // Held: the line is kept with the failure.
    let kept = q.enqueue(crate::common::noop()).await.unwrap();
    entered.notified().await;
    gate.add_permits(1);
    let done = q.wait(kept, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, CommandStatus::Failed);
    assert_eq!(lines(kept).await, 1, "the failed step's line is kept");

    // Taken over while the step ran (another core's lease, far from running out).
    let taken = q.enqueue(crate::common::noop()).await.unwrap();
    entered.notified().await;
    db.execute_unprepared(&format!(
        "UPDATE commands SET lease_owner = 'core-b', lease_until = 99999999999999 WHERE id = {}",
        taken.0
    ))
    .await
    .unwrap();
    gate.add_permits(1);
    // Waits for the step to end.
    q.stop(Duration::from_secs(30)).await;
    assert_eq!(lines(taken).await, 0, "a step taken over logs nothing here");
    let row = q.get(taken).await.unwrap();
    assert_eq!(
        row.status,
        CommandStatus::Running,
        "the other core's command is left to it"
    );
}
