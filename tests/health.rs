//! Fleet health: heartbeats and the grace period, failover by replacement end to end on sim,
//! the collector on rejoin, and the core's start and stop hooks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{
    Accepted, Command, Container, ContainerStatus, Environment, Requirements, Resources, Server,
    ServerStatus,
};
use cloud48_engine::queue::CommandFilter;
use cloud48_engine::types::{ContainerType, Hook, HookContext, HookOutcome, TypeError};
use serde_json::{Value, json};

use crate::common::{ManualClock, Opts, TestCore, eventually};

/// A type that records `id:hook` for every hook call.
struct Watched(Arc<Mutex<Vec<String>>>);

/// What the test types here ask for: a hundredth of a CPU, `memory_mb`, 16 MB of disk.
fn small(memory_mb: u64) -> Requirements {
    Requirements {
        resources: Resources {
            cpu_millis: 10,
            memory_mb,
            disk_mb: 16,
        },
        ..Default::default()
    }
}

/// A type that asks for its own replacement when it goes down.
struct Phoenix;

impl ContainerType for Phoenix {
    fn type_id(&self) -> &str {
        "phoenix"
    }
    fn priority(&self) -> i32 {
        40
    }
    fn default_requirements(&self) -> Requirements {
        small(1000)
    }
    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        let mut out = HookOutcome::allow();
        if matches!(hook, Hook::IsDown(_)) {
            out.actions
                .push(cloud48_engine::types::HookAction::ReplaceContainer(
                    ctx.container.id,
                ));
        }
        Ok(out)
    }
}

impl ContainerType for Watched {
    fn type_id(&self) -> &str {
        "watched"
    }
    fn priority(&self) -> i32 {
        30
    }
    fn default_requirements(&self) -> Requirements {
        small(16)
    }
    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        self.0
            .lock()
            .unwrap()
            .push(format!("{}:{}", ctx.container.id, hook.name()));
        Ok(HookOutcome::allow())
    }
}

/// A core on `dir` (and on the PostgreSQL database at `url`) as the tests here start one again:
/// three simulated servers, no health monitoring in the background.
fn core_config(dir: &std::path::Path, url: Option<&str>) -> cloud48_engine::CoreConfig {
    let mut config = cloud48_engine::CoreConfig::new(dir);
    config.database_url = url.map(str::to_string);
    config.sim_servers = 3;
    config.health.background = false;
    config.plugin_cache = Some(std::env::temp_dir().join("cloud48-test-plugin-cache"));
    config
}

async fn show(t: &TestCore, id: ContainerId) -> Container {
    t.client.get(&format!("/v1/containers/{id}")).await.unwrap()
}

async fn env_with_watched(t: &TestCore, server: &str) -> cloud48_engine::model::ContainerId {
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "watch" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let a: Accepted = t
        .client
        .post(
            "/v1/environments/watch/containers",
            &json!({ "type": "watched", "server": server }),
        )
        .await
        .unwrap();
    t.created(a.command_id).await
}

async fn commands_of(t: &TestCore, kind: &str) -> Vec<Command> {
    let all = t
        .core
        .queue()
        .list(&CommandFilter {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    all.into_iter().filter(|c| c.kind == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_gap_shorter_than_the_grace_period_changes_nothing() {
    let clock = ManualClock::at(1_000_000);
    let log = Arc::new(Mutex::new(Vec::new()));
    let opts = Opts {
        clock: Some(clock.clone()),
        types: vec![Arc::new(Watched(log.clone()))],
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    let grace = t.core.config().health.grace.as_millis() as i64;
    let id = env_with_watched(&t, "sim-1").await;
    let servers = t.core.servers().list().await.unwrap();
    let beat_all_but = |skip: Option<i64>| {
        for s in &servers {
            if Some(s.id.0) != skip {
                t.core.health().heartbeat(s.id.0, None);
            }
        }
    };
    beat_all_but(None);
    clock.advance(grace - 100);
    assert_eq!(
        t.core.monitor().check().await.unwrap(),
        Default::default(),
        "a blip shorter than the grace period"
    );
    beat_all_but(None);
    clock.advance(grace - 100);
    beat_all_but(Some(servers[0].id.0));
    assert_eq!(
        t.core.monitor().check().await.unwrap(),
        Default::default(),
        "still within the grace period"
    );
    assert_eq!(show(&t, id).await.status, ContainerStatus::Running);
    assert!(commands_of(&t, "environment.failover").await.is_empty());

    // Past the grace period: down, the member is down and its environment hears it.
    clock.advance(200);
    let report = t.core.monitor().check().await.unwrap();
    assert_eq!(report.down, vec![servers[0].id.0]);
    assert_eq!(show(&t, id).await.status, ContainerStatus::Down);
    let failover = commands_of(&t, "environment.failover").await;
    assert_eq!(failover.len(), 1);
    t.ok(failover[0].id).await;
    assert!(log.lock().unwrap().contains(&format!("{id}:is-down")));
    let env: Environment = t.client.get("/v1/environments/watch").await.unwrap();
    assert_eq!(
        env.members[0].status,
        ContainerStatus::Down,
        "env show marks the member down"
    );
    let (ok, out, _) = crate::common::cli(&t.url, &["env", "show", "watch"]);
    assert!(ok && out.contains("DOWN"), "{out}");
    let s1 = t.core.servers().get("sim-1").await.unwrap();
    assert_eq!(s1.status, ServerStatus::Down);

    // Heartbeats resume: up again, the member takes the status its server reports, is-up runs.
    t.core.health().heartbeat(servers[0].id.0, None);
    let report = t.core.monitor().check().await.unwrap();
    assert_eq!(report.up, vec![servers[0].id.0]);
    assert_eq!(show(&t, id).await.status, ContainerStatus::Running);
    let recover = commands_of(&t, "environment.recover").await;
    assert_eq!(recover.len(), 1);
    t.ok(recover[0].id).await;
    assert!(log.lock().unwrap().contains(&format!("{id}:is-up")));
}

/// The arguments of the last nginx rewrite exec'd in a container, sorted.
async fn last_rewrite(t: &TestCore, c: &Container) -> Option<Vec<String>> {
    let guest = t.sim(c.server.as_deref()?).await.guest(&c.guest_id)?;
    let mut args = guest.execs.last()?.args.clone();
    args.sort();
    Some(args)
}

/// The running member of a type other than `not`, once there is one.
async fn running_other(t: &TestCore, type_name: &str, not: &[ContainerId]) -> Option<Container> {
    let env: Environment = t.client.get("/v1/environments/shop").await.ok()?;
    env.members.into_iter().find(|m| {
        m.type_id.starts_with(type_name)
            && m.status == ContainerStatus::Running
            && !not.contains(&m.id)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_replaces_the_balancer_and_a_tomcat_and_the_collector_removes_the_old_ones() {
    let opts = Opts {
        sim_servers: 4,
        health: crate::common::fast_health(),
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut tomcats = Vec::new();
    for server in ["sim-3", "sim-4"] {
        let a: Accepted = t
            .client
            .post(
                "/v1/environments/shop/containers",
                &json!({ "type": "tomcat", "server": server }),
            )
            .await
            .unwrap();
        tomcats.push(t.created(a.command_id).await);
    }
    let balancer = running_other(&t, "balancer", &[]).await.unwrap();
    let lb_server = balancer.server.clone().unwrap();
    assert!(
        lb_server != "sim-3" && lb_server != "sim-4",
        "placement put the balancer on an empty server"
    );
    let tomcat_ops: Vec<Vec<String>> = {
        let mut v = Vec::new();
        for id in &tomcats {
            let c = show(&t, *id).await;
            v.push(
                t.sim(c.server.as_deref().unwrap())
                    .await
                    .guest(&c.guest_id)
                    .unwrap()
                    .operations,
            );
        }
        v
    };

    // Crash the balancer's server: a new balancer elsewhere registers every tomcat.
    let (ok, _, err) = crate::common::cli(&t.url, &["server", "fail", &lb_server]);
    assert!(ok, "{err}");
    let want = t.addresses(&tomcats).await;
    let replacement = eventually(
        "a replacement balancer with every tomcat registered",
        || async {
            let r = running_other(&t, "balancer", &[balancer.id]).await?;
            (last_rewrite(&t, &r).await? == want).then_some(r)
        },
    )
    .await;
    assert_ne!(replacement.server, balancer.server);
    assert_eq!(show(&t, balancer.id).await.status, ContainerStatus::Illegal);
    let (_, out, _) = crate::common::cli(&t.url, &["env", "show", "shop"]);
    assert!(
        out.contains("ILLEGAL"),
        "env show marks the replaced balancer: {out}"
    );
    let failover = commands_of(&t, "environment.failover").await;
    assert_eq!(failover.len(), 1);
    assert_eq!(t.ok(failover[0].id).await.requested_by, "health-monitor");

    // The server rejoins: the collector destroys the old balancer there and touches nothing else.
    let (ok, _, err) = crate::common::cli(&t.url, &["server", "recover", &lb_server]);
    assert!(ok, "{err}");
    eventually("the old balancer is collected", || async {
        (show(&t, balancer.id).await.status == ContainerStatus::Destroyed).then_some(())
    })
    .await;
    assert!(t.sim(&lb_server).await.guest(&balancer.guest_id).is_none());
    for (id, ops) in tomcats.iter().zip(&tomcat_ops) {
        let c = show(&t, *id).await;
        assert_eq!(c.status, ContainerStatus::Running);
        assert_eq!(
            &t.sim(c.server.as_deref().unwrap())
                .await
                .guest(&c.guest_id)
                .unwrap()
                .operations,
            ops
        );
    }
    let server: Value = t
        .client
        .get(&format!("/v1/servers/{lb_server}"))
        .await
        .unwrap();
    assert_eq!(server["status"], "up");

    // Now a tomcat's server: the tomcat asks for its own replacement; the balancer follows.
    let (ok, _, err) = crate::common::cli(&t.url, &["server", "fail", "sim-3"]);
    assert!(ok, "{err}");
    let new_tomcat = eventually("a replacement tomcat", || async {
        running_other(&t, "tomcat", &tomcats).await
    })
    .await;
    assert_ne!(new_tomcat.server.as_deref(), Some("sim-3"));
    let want = t.addresses(&[tomcats[1], new_tomcat.id]).await;
    eventually("the balancer points at the live tomcats", || async {
        (last_rewrite(&t, &show(&t, replacement.id).await).await? == want).then_some(())
    })
    .await;
    assert_eq!(show(&t, tomcats[0]).await.status, ContainerStatus::Illegal);
    let (ok, out, _) = crate::common::cli(&t.url, &["server", "recover", "sim-3"]);
    assert!(ok && out.contains("recovered: heartbeats resume"), "{out}");
    let (ok, out, _) = crate::common::cli(&t.url, &["server", "recover", "sim-3"]);
    assert!(
        ok && out.contains("was not failed on command: nothing to recover"),
        "{out}"
    );
    eventually("the old tomcat is collected", || async {
        (show(&t, tomcats[0]).await.status == ContainerStatus::Destroyed).then_some(())
    })
    .await;
    assert!(
        cloud48_engine::placement::audit(t.core.db())
            .await
            .unwrap()
            .is_empty()
    );
    let (ok, out, _) = crate::common::cli(&t.url, &["server", "list"]);
    assert!(
        ok && out.contains("LAST HEARTBEAT") && out.contains(" s ago"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_a_server_that_is_not_simulated_or_unknown_is_refused() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let err = t
        .client
        .post::<_, Value>("/v1/servers/nope/fail", &json!({}))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("server 'nope' does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_hears_after_cc_start_and_before_cc_stop() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let opts = Opts {
        types: vec![Arc::new(Watched(log.clone()))],
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    let id = env_with_watched(&t, "sim-2").await;
    t.core.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(
        log.lock()
            .unwrap()
            .contains(&format!("{id}:before-cc-stop"))
    );

    // A new core on the same data: every member hears that the core started.
    let again = cloud48_engine::Core::open(core_config(t._dir.path(), None))
        .await
        .unwrap();
    again.types().register(Arc::new(Watched(log.clone())));
    log.lock().unwrap().clear();
    again.start().await.unwrap();
    let notify = again
        .queue()
        .list(&CommandFilter {
            limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    let notify = notify
        .iter()
        .find(|c| c.kind == "environment.notify" && c.params["hook"] == "after-cc-start")
        .unwrap();
    let done = again
        .queue()
        .wait(notify.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(done.error.is_none(), "{done:?}");
    assert_eq!(*log.lock().unwrap(), vec![format!("{id}:after-cc-start")]);
    again.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_finds_no_room_leaves_the_container_down_not_illegal() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let opts = Opts {
        sim_servers: 2,
        types: vec![Arc::new(Phoenix), Arc::new(Watched(log.clone()))],
        capacity: Some(Resources {
            cpu_millis: 10_000,
            memory_mb: 1500,
            disk_mb: 10_000,
        }),
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "nest" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut ids = Vec::new();
    for server in ["sim-1", "sim-2"] {
        let a: Accepted = t
            .client
            .post(
                "/v1/environments/nest/containers",
                &json!({ "type": "phoenix", "server": server }),
            )
            .await
            .unwrap();
        ids.push(t.created(a.command_id).await);
    }
    // A member that hears the others come and go.
    let a: Accepted = t
        .client
        .post(
            "/v1/environments/nest/containers",
            &json!({ "type": "watched", "server": "sim-2" }),
        )
        .await
        .unwrap();
    let watcher = t.created(a.command_id).await;
    log.lock().unwrap().clear();
    let sim1 = t.core.servers().get("sim-1").await.unwrap();
    assert!(t.core.monitor().mark_down(sim1.id.0, "test").await.unwrap());
    let failover = commands_of(&t, "environment.failover").await;
    let failed = t.wait(failover[0].id).await;
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("stays down"),
        "{failed:?}"
    );
    assert!(
        failed.error.unwrap().contains("memory_mb 1000 needed"),
        "the reason names the missing memory"
    );
    assert_eq!(show(&t, ids[0]).await.status, ContainerStatus::Down);
    // The others heard it leave, then, with no replacement, come back in: it is still theirs.
    let heard: Vec<String> = log.lock().unwrap().clone();
    let at = |hook: &str| heard.iter().position(|h| *h == format!("{watcher}:{hook}"));
    let (left, back) = (at("after-other-is-removed"), at("after-other-is-added"));
    assert!(left.is_some() && back > left, "{heard:?}");

    // Back up: the only copy is kept, not collected.
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    assert_eq!(show(&t, ids[0]).await.status, ContainerStatus::Running);
    assert!(
        t.sim("sim-1")
            .await
            .guest(&show(&t, ids[0]).await.guest_id)
            .is_some()
    );

    // Destroying a down container gives it up at once; the collector removes its guest later.
    assert!(t.core.monitor().mark_down(sim1.id.0, "test").await.unwrap());
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", ids[0]),
            &json!({ "op": "destroy" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    assert_eq!(show(&t, ids[0]).await.status, ContainerStatus::Illegal);
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    let gone = show(&t, ids[0]).await;
    assert_eq!(gone.status, ContainerStatus::Destroyed);
    assert!(t.sim("sim-1").await.guest(&gone.guest_id).is_none());
    assert_eq!(
        show(&t, ids[1]).await.status,
        ContainerStatus::Running,
        "the other member is untouched"
    );
    assert!(
        cloud48_engine::placement::audit(t.core.db())
            .await
            .unwrap()
            .is_empty()
    );
}

/// A member retired for a replacement is illegal only until the replacement is made: when its
/// server comes back while the replacement still runs, the collector leaves it (had the
/// replacement failed, it would be the only copy, down again); once the replacement is made,
/// the collector destroys it. An operator's trial lost a healthy Tomcat that way: its
/// replacement failed after the collector had destroyed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_being_replaced_is_not_collected_until_its_replacement_is_made() {
    let t = TestCore::start(Opts {
        sim_servers: 2,
        // Creates take seconds: the replacement is still being made when sim-1 comes back.
        latency: Duration::from_millis(1500),
        types: vec![Arc::new(Phoenix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "slow" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let a: Accepted = t
        .client
        .post(
            "/v1/environments/slow/containers",
            &json!({ "type": "phoenix", "server": "sim-1" }),
        )
        .await
        .unwrap();
    let old = t.created(a.command_id).await;
    let guest = show(&t, old).await.guest_id;
    let sim1 = t.core.servers().get("sim-1").await.unwrap();
    assert!(t.core.monitor().mark_down(sim1.id.0, "test").await.unwrap());
    crate::common::eventually("the member is retired for its replacement", || async {
        (show(&t, old).await.status == ContainerStatus::Illegal).then_some(())
    })
    .await;
    let failover = commands_of(&t, "environment.failover").await;
    assert!(
        !t.core
            .queue()
            .get(failover[0].id)
            .await
            .unwrap()
            .status
            .is_terminal()
    );
    // Back while the replacement is made: collected (mark_up runs the collector) it is not.
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    assert!(
        t.sim("sim-1").await.guest(&guest).is_some(),
        "the retired member's guest was destroyed while its replacement was being made"
    );
    assert_eq!(show(&t, old).await.status, ContainerStatus::Illegal);
    t.ok(failover[0].id).await;
    let report = t.core.collector().collect(None).await.unwrap();
    assert_eq!(report.illegal, 1, "{report:?}");
    assert!(t.sim("sim-1").await.guest(&guest).is_none());
    assert_eq!(show(&t, old).await.status, ContainerStatus::Destroyed);
}

/// A container whose processes exited on their own (its server reports its guest stopped) is
/// not shown running for ever: the collector's pass makes it stopped, saying why, and `start`
/// runs it again (an operator's trial saw an out-of-memory kill leave a container "running",
/// with `start` refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_whose_processes_exited_becomes_stopped_and_starts_again() {
    use cloud48_engine::driver::Driver;
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: Accepted = t
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "server": "sim-1" }),
        )
        .await
        .unwrap();
    let id = t.created(a.command_id).await;
    let a: Accepted = t
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "server": "sim-1" }),
        )
        .await
        .unwrap();
    let other = t.created(a.command_id).await;
    let guest = show(&t, id).await.guest_id;
    // Behind the core's back, as a crash would.
    t.sim("sim-1").await.stop(&guest).await.unwrap();
    let report = t.core.collector().collect(None).await.unwrap();
    assert_eq!(report.exited, 1, "{report:?}");
    let c = show(&t, id).await;
    assert_eq!(c.status, ContainerStatus::Stopped);
    assert!(
        c.status_reason
            .as_deref()
            .unwrap_or_default()
            .contains("exited on their own"),
        "{c:?}"
    );
    assert_eq!(show(&t, other).await.status, ContainerStatus::Running);
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "start" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let c = show(&t, id).await;
    assert_eq!(c.status, ContainerStatus::Running);
    assert_eq!(c.status_reason, None, "the reason went with the status");
    let again = t.core.collector().collect(None).await.unwrap();
    assert_eq!(again.exited, 0, "{again:?}");
}

/// Regression (hardening): while one big batch starved the runtime, heartbeats were not
/// processed and the monitor, running late, took its own stall for the servers' silence and
/// marked a healthy server down. A pass that runs a quarter of the grace period late or more
/// counts nobody's silence from before it; a server silent for the grace period while the
/// monitor runs on time is still marked down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_never_marks_a_server_down_on_silence_gathered_while_it_was_stalled() {
    let clock = ManualClock::at(1_000_000);
    let t = TestCore::start(Opts {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let grace = t.core.config().health.grace.as_millis() as i64;
    let servers = t.core.servers().list().await.unwrap();
    let beat_all_but = |skip: Option<i64>| {
        for s in &servers {
            if Some(s.id.0) != skip {
                t.core.health().heartbeat(s.id.0, None);
            }
        }
    };
    beat_all_but(None);
    // The monitor's runtime is paused for five grace periods: nothing ran, no heartbeat was
    // processed. Its next pass runs that late.
    clock.advance(5 * grace);
    let late = Duration::from_millis(5 * grace as u64);
    assert_eq!(
        t.core.monitor().tick(late).await.unwrap(),
        Default::default(),
        "no server is down on the monitor's own stall"
    );
    assert_eq!(t.core.monitor().stalls(), 1);
    assert!(
        t.core
            .servers()
            .list()
            .await
            .unwrap()
            .iter()
            .all(|s| s.status == ServerStatus::Up)
    );
    // Running on time again: sim-1 stays silent for the grace period, the others beat.
    clock.advance(grace - 100);
    beat_all_but(Some(servers[0].id.0));
    assert_eq!(
        t.core.monitor().tick(Duration::ZERO).await.unwrap(),
        Default::default()
    );
    clock.advance(200);
    beat_all_but(Some(servers[0].id.0));
    let report = t.core.monitor().tick(Duration::ZERO).await.unwrap();
    assert_eq!(report.down, vec![servers[0].id.0]);
    assert_eq!(t.core.monitor().stalls(), 1);
    // Another stall counts every silence afresh, which must not bring the dead server back:
    // it is marked up only on a heartbeat of its own.
    clock.advance(5 * grace);
    beat_all_but(Some(servers[0].id.0));
    let report = t.core.monitor().tick(late).await.unwrap();
    assert_eq!(
        report,
        Default::default(),
        "a stall brings no dead server back"
    );
    assert_eq!(t.core.monitor().stalls(), 2);
    t.core.health().heartbeat(servers[0].id.0, None);
    let report = t.core.monitor().tick(Duration::ZERO).await.unwrap();
    assert_eq!(report.up, vec![servers[0].id.0]);
}

/// A core with a container on sim-1, and sim-1 marked down: (the core, the container, sim-1).
async fn a_container_on_sim_1_marked_down() -> (TestCore, ContainerId, Server) {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let id = t.plain_on("sim-1").await;
    let sim1 = t.core.servers().get("sim-1").await.unwrap();
    assert!(t.core.monitor().mark_down(sim1.id.0, "test").await.unwrap());
    (t, id, sim1)
}

/// A container whose guest is gone when its server comes back is failed, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_whose_guest_was_lost_in_an_outage_says_why_it_failed() {
    let (t, id, sim1) = a_container_on_sim_1_marked_down().await;
    let guest = show(&t, id).await.guest_id;
    use cloud48_engine::driver::Driver;
    t.sim("sim-1").await.destroy(&guest).await.unwrap();
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    let c = show(&t, id).await;
    assert_eq!(c.status, ContainerStatus::Failed);
    let why = c.status_reason.unwrap_or_default();
    assert!(
        why.contains(&guest) && why.contains("was gone from its server"),
        "{why}"
    );
    let (ok, out, _) = crate::common::cli(&t.url, &["container", "show", &id.to_string()]);
    assert!(ok && out.contains("failed (its guest"), "{out}");
}

/// A container whose status its server did not give when the server came back (it answered
/// its heartbeats, not for the container: a core with another agents token) stayed down for
/// good on a server that was up; the collector's pass reads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_left_down_on_a_server_that_is_up_is_read_again() {
    let (t, id, sim1) = a_container_on_sim_1_marked_down().await;
    let sim = t.sim("sim-1").await;
    sim.fail_next(
        "status",
        1,
        cloud48_engine::driver::DriverError::Unreachable {
            server: "sim-1".into(),
            message: "401 wrong agent token".into(),
        },
    );
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    assert_eq!(show(&t, id).await.status, ContainerStatus::Down);
    assert_eq!(t.core.monitor().recheck_down().await.unwrap(), 1);
    assert_eq!(show(&t, id).await.status, ContainerStatus::Running);
    assert_eq!(t.core.monitor().recheck_down().await.unwrap(), 0, "once");
}

/// A member that keeps in its state that it heard another leave; at `after-other-is-removed`
/// and `before-other-is-added` it first runs what the test set (something that happens between
/// a step's hooks and its commit, or while its command holds the environment).
struct Listener(Arc<std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>>);

impl ContainerType for Listener {
    fn type_id(&self) -> &str {
        "listener"
    }
    fn priority(&self) -> i32 {
        30
    }
    fn default_requirements(&self) -> Requirements {
        small(16)
    }
    fn handle(&self, hook: &Hook, _: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        if !matches!(
            hook,
            Hook::AfterOtherIsRemoved(_) | Hook::BeforeOtherIsAdded(_)
        ) {
            return Ok(HookOutcome::allow());
        }
        if let Some(meanwhile) = self.0.get() {
            meanwhile();
        }
        if !matches!(hook, Hook::AfterOtherIsRemoved(_)) {
            return Ok(HookOutcome::allow());
        }
        Ok(HookOutcome {
            new_state: Some(b"heard it leave".to_vec()),
            ..HookOutcome::allow()
        })
    }
}

/// Regression (review): a replacement whose member's server came back between its hooks and
/// its commit retired nothing, yet saved the others' states of "it left": they kept believing
/// a running member was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_whose_member_came_back_meanwhile_leaves_the_others_states_alone() {
    let meanwhile = Arc::new(std::sync::OnceLock::new());
    let t = TestCore::start(Opts {
        sim_servers: 2,
        types: vec![Arc::new(Phoenix), Arc::new(Listener(meanwhile.clone()))],
        ..Default::default()
    })
    .await
    .unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "nest" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut ids = Vec::new();
    for (ty, server) in [("phoenix", "sim-1"), ("listener", "sim-2")] {
        let a: Accepted = t
            .client
            .post(
                "/v1/environments/nest/containers",
                &json!({ "type": ty, "server": server }),
            )
            .await
            .unwrap();
        ids.push(t.created(a.command_id).await);
    }
    let (phoenix, listener) = (ids[0], ids[1]);
    let before = show(&t, listener).await.state_bytes;
    let sim1 = t.core.servers().get("sim-1").await.unwrap().id.0;
    let (core, runtime) = (t.core.clone(), tokio::runtime::Handle::current());
    let set = meanwhile.set(Box::new(move || {
        tokio::task::block_in_place(|| {
            runtime.block_on(async { assert!(core.monitor().mark_up(sim1).await.unwrap()) })
        })
    }));
    assert!(set.is_ok());
    assert!(t.core.monitor().mark_down(sim1, "test").await.unwrap());
    let replace = eventually("the replacement", || async {
        commands_of(&t, "environment.replace").await.pop()
    })
    .await;
    let done = t.ok(replace.id).await;
    let result = done.result.unwrap_or_default();
    assert_eq!(result["replaced"], json!(false), "{result}");
    assert_eq!(result["container_id"], json!(phoenix.0), "{result}");
    assert_eq!(show(&t, phoenix).await.status, ContainerStatus::Running);
    assert_eq!(
        show(&t, listener).await.state_bytes,
        before,
        "the listener's state says the member left"
    );
}

/// Regression (review): one guest its server could not say anything of (an error about it
/// alone, not the server's silence) left every container read after it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_guest_does_not_leave_the_others_of_its_server_down() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(t.plain_on("sim-1").await);
    }
    let sim1 = t.core.servers().get("sim-1").await.unwrap();
    assert!(t.core.monitor().mark_down(sim1.id.0, "test").await.unwrap());
    // The server cannot list its guests (neither for the collector's pass nor for the
    // containers' statuses): they are read one by one, and one of them fails.
    let sim = t.sim("sim-1").await;
    sim.fail_next(
        "list",
        2,
        cloud48_engine::driver::DriverError::Permanent("its guest list is being rebuilt".into()),
    );
    sim.fail_next(
        "status",
        1,
        cloud48_engine::driver::DriverError::Permanent("its files cannot be read now".into()),
    );
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(show(&t, *id).await.status);
    }
    statuses.sort_by_key(|s| s.to_string());
    assert_eq!(
        statuses,
        [ContainerStatus::Down, ContainerStatus::Running],
        "the readable one is back"
    );
    assert_eq!(t.core.monitor().recheck_down().await.unwrap(), 1);
    for id in &ids {
        assert_eq!(show(&t, *id).await.status, ContainerStatus::Running);
    }
}

/// A server back with many containers is asked for its guests once, not once per container
/// (which held the monitor up for minutes on a slow server while others went silent
/// unnoticed): with every single-guest read failing, all of them are still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_back_is_asked_for_all_its_guests_at_once() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    for _ in 0..5 {
        t.plain_on("sim-1").await;
    }
    let sim1 = t.core.servers().get("sim-1").await.unwrap();
    assert!(t.core.monitor().mark_down(sim1.id.0, "test").await.unwrap());
    let stopped = t.sim("sim-1").await.guests()[0].info.guest_id.clone();
    cloud48_engine::driver::Driver::stop(&*t.sim("sim-1").await, &stopped)
        .await
        .unwrap();
    t.sim("sim-1").await.fail_next(
        "status",
        100,
        cloud48_engine::driver::DriverError::Permanent("no guest can be read alone".into()),
    );
    assert!(t.core.monitor().mark_up(sim1.id.0).await.unwrap());
    let list: Vec<cloud48_engine::model::Container> =
        t.client.get("/v1/containers?server=sim-1").await.unwrap();
    assert_eq!(list.len(), 5);
    for c in &list {
        let want = if c.guest_id == stopped {
            ContainerStatus::Stopped
        } else {
            ContainerStatus::Running
        };
        assert_eq!(c.status, want, "{}", c.id);
    }
}

/// A core on a scratch PostgreSQL database with the `watched` type, its log, and the id of the
/// member of the environment `watch` (on sim-2); `None` without PostgreSQL.
async fn watched_on_postgres() -> Option<(TestCore, Arc<Mutex<Vec<String>>>, ContainerId)> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        postgres: true,
        types: vec![Arc::new(Watched(log.clone()))],
        ..Default::default()
    })
    .await?;
    let id = env_with_watched(&t, "sim-2").await;
    Some((t, log, id))
}

/// Another core (not started) on database `url`, with the `watched` type writing to `log`.
async fn another_core(
    dir: &std::path::Path,
    url: &str,
    log: &Arc<Mutex<Vec<String>>>,
) -> cloud48_engine::Core {
    let core = cloud48_engine::Core::open(core_config(dir, Some(url)))
        .await
        .unwrap();
    core.types().register(Arc::new(Watched(log.clone())));
    core
}

/// The `after-cc-start` notices queued so far (of the first hundred commands).
async fn start_notices(core: &cloud48_engine::Core) -> Vec<Command> {
    let all = core
        .queue()
        .list(&CommandFilter {
            limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    all.into_iter()
        .filter(|c| c.kind == "environment.notify" && c.params["hook"] == "after-cc-start")
        .collect()
}

/// Regression (review): cores starting together after every core stopped each saw the other
/// (announced while starting) or the one that stopped, and none told the environments that
/// the control plane started; exactly one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_cores_started_together_after_all_stopped_one_tells_the_environments() {
    let Some((t, log, id)) = watched_on_postgres().await else {
        return;
    };
    t.core.shutdown(Duration::from_secs(10)).await.unwrap();
    let url = t._pg.as_ref().unwrap().url.clone();
    let dirs = [crate::common::tempdir(), crate::common::tempdir()];
    let mut cores = Vec::new();
    for dir in &dirs {
        cores.push(another_core(dir.path(), &url, &log).await);
    }
    log.lock().unwrap().clear();
    let (a, b) = tokio::join!(cores[0].start(), cores[1].start());
    a.unwrap();
    b.unwrap();
    let told = start_notices(&cores[0]).await;
    assert_eq!(told.len(), 1, "{told:?}");
    let done = cores[0]
        .queue()
        .wait(told[0].id, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(done.error.is_none(), "{done:?}");
    assert_eq!(*log.lock().unwrap(), vec![format!("{id}:after-cc-start")]);
    for core in &cores {
        core.stop(Duration::from_secs(5)).await;
    }
}

/// Regression (review): a core that started finding no other core running, while another core
/// (which had seen it, so not alone) held the monitor duty, told nobody that the control plane
/// started. The notice it owes is sent by the core holding the monitor, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_notice_owed_by_a_core_without_the_monitor_is_sent_by_the_one_holding_it() {
    use sea_orm::ConnectionTrait;
    let Some((t, log, id)) = watched_on_postgres().await else {
        return;
    };
    // This core's own start found no environment to tell.
    assert!(start_notices(&t.core).await.is_empty());
    let url = t._pg.as_ref().unwrap().url.clone();
    let dir = crate::common::tempdir();
    let other = another_core(dir.path(), &url, &log).await;
    log.lock().unwrap().clear();
    // The running core keeps the monitor, but looks silent to the next core's start.
    t.core.claim_duties().await.unwrap();
    t.core
        .db()
        .execute_unprepared(&format!(
            "UPDATE cores SET seen_at = 0 WHERE node = '{}'",
            t.core.cluster().node()
        ))
        .await
        .unwrap();
    other.start().await.unwrap();
    assert!(
        !other
            .cluster()
            .holds(cloud48_engine::cluster::Duty::Monitor),
        "the test needs the monitor held by the first core"
    );
    assert!(
        start_notices(&t.core).await.is_empty(),
        "told before the monitor renewed"
    );
    // The monitor's holder sends what is owed at its next renewal; later renewals, of either
    // core, send nothing more.
    t.core.claim_duties().await.unwrap();
    t.core.claim_duties().await.unwrap();
    other.claim_duties().await.unwrap();
    let told = start_notices(&t.core).await;
    assert_eq!(told.len(), 1, "{told:?}");
    let done = t
        .core
        .queue()
        .wait(told[0].id, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(done.error.is_none(), "{done:?}");
    assert_eq!(*log.lock().unwrap(), vec![format!("{id}:after-cc-start")]);
    other.stop(Duration::from_secs(5)).await;
}

/// An environment clone checks its members again when it runs: one that went down after the
/// clone was accepted (while an earlier command held the environment) makes it refuse, with no
/// partial copy wired to the source, and the copy's name is free for the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_whose_member_went_down_after_it_was_accepted_is_refused_when_it_runs() {
    let meanwhile = Arc::new(std::sync::OnceLock::new());
    let t = TestCore::start(Opts {
        types: vec![
            Arc::new(Listener(meanwhile.clone())),
            Arc::new(Watched(Arc::new(Mutex::new(Vec::new())))),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "nest" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let add = |ty: &'static str, server: &'static str| {
        let client = t.client.clone();
        async move {
            client
                .post::<_, Accepted>(
                    "/v1/environments/nest/containers",
                    &json!({ "type": ty, "server": server }),
                )
                .await
                .unwrap()
        }
    };
    let listener = t.created(add("listener", "sim-1").await.command_id).await;
    // The listener's hook of the next add holds that add (and so the environment) until the
    // clone is accepted, then takes the listener's server down.
    let sim1 = t.core.servers().get("sim-1").await.unwrap().id.0;
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let wait = Mutex::new(Some(wait));
    let (core, runtime) = (t.core.clone(), tokio::runtime::Handle::current());
    let set = meanwhile.set(Box::new(move || {
        let Some(wait) = wait.lock().unwrap().take() else {
            return;
        };
        tokio::task::block_in_place(|| {
            wait.recv().unwrap();
            runtime
                .block_on(async { assert!(core.monitor().mark_down(sim1, "test").await.unwrap()) })
        })
    }));
    assert!(set.is_ok());
    let second = add("watched", "sim-2").await;
    let clone: Accepted = t
        .client
        .post(
            "/v1/environments/nest/clone",
            &json!({ "name": "nest-copy" }),
        )
        .await
        .unwrap();
    go.send(()).unwrap();
    t.wait(second.command_id).await;
    let refused = t.wait(clone.command_id).await;
    let why = refused.error.clone().unwrap_or_default();
    assert!(
        why.contains("environment 'nest' cannot be cloned now")
            && why.contains(&format!("container {listener} (listener) is down")),
        "{refused:?}"
    );
    let envs: Vec<Value> = t.client.get("/v1/environments").await.unwrap();
    assert!(
        envs.iter().all(|e| e["name"] != "nest-copy"),
        "a copy is left: {envs:?}"
    );
    // Back up, the same name clones.
    assert!(t.core.monitor().mark_up(sim1).await.unwrap());
    let again: Accepted = t
        .client
        .post(
            "/v1/environments/nest/clone",
            &json!({ "name": "nest-copy" }),
        )
        .await
        .unwrap();
    t.ok(again.command_id).await;
}
