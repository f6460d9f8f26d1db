//! Environments: lifecycle, hook order, denials, state blobs, priority order of operations.

use std::sync::{Arc, Mutex};

use cloud48_engine::managers::{AddContainer, ContainerCommand};
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{
    Accepted, Command, Container, ContainerStatus, Environment, Requirements, Resources,
};
use cloud48_engine::queue::CommandFilter;
use cloud48_engine::types::{ContainerType, Hook, HookContext, HookOutcome, TypeError, Verdict};
use serde_json::json;

use crate::common::{Opts, TestCore};

/// A container type that records every hook call as `type#id:hook` (and, for `seeing`, the
/// members each `after-other-is-added` sees, as `seeing sees [ids]`).
struct Recording {
    name: &'static str,
    priority: i32,
    log: Arc<Mutex<Vec<String>>>,
}

impl ContainerType for Recording {
    fn type_id(&self) -> &str {
        self.name
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn default_requirements(&self) -> Requirements {
        Requirements {
            resources: Resources {
                cpu_millis: 100,
                memory_mb: 64,
                disk_mb: 64,
            },
            ..Default::default()
        }
    }
    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        self.log.lock().unwrap().push(format!(
            "{}#{}:{}",
            self.name,
            ctx.container.id,
            hook.name()
        ));
        if self.name == "singleton"
            && *hook == Hook::BeforeItIsAdded
            && ctx
                .environment
                .members
                .iter()
                .any(|m| m.type_id == "singleton")
        {
            return Ok(HookOutcome {
                verdict: Verdict::Deny("only one singleton per environment".into()),
                ..HookOutcome::allow()
            });
        }
        if self.name == "seeing" && matches!(hook, Hook::AfterOtherIsAdded(_)) {
            let mut ids: Vec<i64> = ctx.environment.members.iter().map(|m| m.id.0).collect();
            ids.sort_unstable();
            self.log
                .lock()
                .unwrap()
                .push(format!("seeing sees {ids:?}"));
        }
        if self.name == "counter" && matches!(hook, Hook::AfterOtherIsAdded(_)) {
            let n: u32 = std::str::from_utf8(ctx.state)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok(HookOutcome {
                new_state: Some((n + 1).to_string().into_bytes()),
                ..HookOutcome::allow()
            });
        }
        Ok(HookOutcome::allow())
    }
}

fn recording(log: &Arc<Mutex<Vec<String>>>) -> Vec<Arc<dyn ContainerType>> {
    [
        ("db", 10),
        ("lb", 20),
        ("web", 50),
        ("singleton", 60),
        ("counter", 70),
        ("seeing", 40),
    ]
    .into_iter()
    .map(|(name, priority)| {
        Arc::new(Recording {
            name,
            priority,
            log: log.clone(),
        }) as Arc<dyn ContainerType>
    })
    .collect()
}

pub(crate) async fn env(t: &TestCore, name: &str) {
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": name }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
}

pub(crate) async fn add(t: &TestCore, env: &str, type_id: &str) -> Command {
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/environments/{env}/containers"),
            &AddContainer {
                type_id: type_id.into(),
                requirements: None,
                server: None,
                params: Default::default(),
            },
        )
        .await
        .unwrap();
    t.wait(a.command_id).await
}

fn added(cmd: &Command) -> ContainerId {
    ContainerId(
        cmd.result.as_ref().expect("succeeded")["container_id"]
            .as_i64()
            .unwrap(),
    )
}

async fn op(t: &TestCore, env: &str, op: &str) -> Command {
    let a: Accepted = t
        .client
        .post(&format!("/v1/environments/{env}/{op}"), &json!({}))
        .await
        .unwrap();
    t.ok(a.command_id).await
}

async fn show(t: &TestCore, env: &str) -> Environment {
    t.client
        .get(&format!("/v1/environments/{env}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_for_the_new_container_first_then_members_by_ascending_priority() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: recording(&log),
        ..Opts::default()
    })
    .await
    .unwrap();
    env(&t, "shop").await;
    let web1 = added(&add(&t, "shop", "web").await);
    let db = added(&add(&t, "shop", "db").await);
    let lb = added(&add(&t, "shop", "lb").await);
    log.lock().unwrap().clear();
    let web2 = added(&add(&t, "shop", "web").await);
    let got = log.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            "web#0:before-it-is-added".to_string(),
            format!("db#{db}:before-other-is-added"),
            format!("lb#{lb}:before-other-is-added"),
            format!("web#{web1}:before-other-is-added"),
            format!("web#{web2}:after-it-is-added"),
            format!("db#{db}:after-other-is-added"),
            format!("lb#{lb}:after-other-is-added"),
            format!("web#{web1}:after-other-is-added"),
        ]
    );

    log.lock().unwrap().clear();
    let a: Accepted = t
        .client
        .submit::<()>(&format!("/v1/environments/shop/containers/{lb}"), None)
        .await
        .unwrap();
    t.ok(a.command_id).await;
    assert_eq!(
        log.lock().unwrap().clone(),
        vec![
            format!("lb#{lb}:before-it-is-removed"),
            format!("db#{db}:before-other-is-removed"),
            format!("web#{web1}:before-other-is-removed"),
            format!("web#{web2}:before-other-is-removed"),
            format!("lb#{lb}:after-it-is-removed"),
            format!("db#{db}:after-other-is-removed"),
            format!("web#{web1}:after-other-is-removed"),
            format!("web#{web2}:after-other-is-removed"),
        ]
    );
    let members: Vec<ContainerId> = show(&t, "shop")
        .await
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        members,
        vec![db, web1, web2],
        "members are listed by ascending priority"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_fails_the_add_with_the_reason_and_creates_nothing() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: recording(&log),
        ..Opts::default()
    })
    .await
    .unwrap();
    env(&t, "solo").await;
    added(&add(&t, "solo", "singleton").await);
    let before: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    let cmd = add(&t, "solo", "singleton").await;
    let err = cmd.error.unwrap();
    assert!(
        err.contains("denied by the new singleton container"),
        "{err}"
    );
    assert!(err.contains("only one singleton per environment"), "{err}");
    let after: Vec<Container> = t.client.get("/v1/containers?all=true").await.unwrap();
    assert_eq!(before.len(), after.len(), "no container row was created");
    let guests: usize = [1, 2, 3]
        .iter()
        .map(|i| t.core.fleet().sim(*i).unwrap().guests().len())
        .sum();
    assert_eq!(guests, 1, "no guest was created");
    let children = t
        .core
        .queue()
        .list(&CommandFilter {
            parent: Some(cmd.id.0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(children.is_empty(), "no child command was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_blobs_returned_by_hooks_are_persisted() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: recording(&log),
        ..Opts::default()
    })
    .await
    .unwrap();
    env(&t, "count").await;
    let counter = added(&add(&t, "count", "counter").await);
    add(&t, "count", "web").await;
    add(&t, "count", "web").await;
    let c: Container = t
        .client
        .get(&format!("/v1/containers/{counter}"))
        .await
        .unwrap();
    assert_eq!(c.state_bytes, 1);
    use sea_orm::EntityTrait;
    let row = cloud48_engine::entities::container::Entity::find_by_id(counter.0)
        .one(t.core.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, b"2", "the counter saw two others join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_operations_act_on_members_in_priority_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: recording(&log),
        ..Opts::default()
    })
    .await
    .unwrap();
    env(&t, "app").await;
    let web = added(&add(&t, "app", "web").await);
    let db = added(&add(&t, "app", "db").await);
    let lb = added(&add(&t, "app", "lb").await);

    let order = |cmd: Command| {
        let t = &t;
        async move {
            let mut children = t
                .core
                .queue()
                .list(&CommandFilter {
                    parent: Some(cmd.id.0),
                    ..Default::default()
                })
                .await
                .unwrap();
            children.sort_by_key(|c| c.id);
            children
                .iter()
                .map(|c| ContainerId(c.target_id.unwrap()))
                .collect::<Vec<_>>()
        }
    };
    let stop = op(&t, "app", "stop").await;
    assert_eq!(
        order(stop).await,
        vec![web, lb, db],
        "stop goes by descending priority"
    );
    assert!(
        show(&t, "app")
            .await
            .members
            .iter()
            .all(|m| m.status == ContainerStatus::Stopped)
    );
    let start = op(&t, "app", "start").await;
    assert_eq!(
        order(start).await,
        vec![db, lb, web],
        "start goes by ascending priority"
    );
    op(&t, "app", "suspend").await;
    assert!(
        show(&t, "app")
            .await
            .members
            .iter()
            .all(|m| m.status == ContainerStatus::Suspended)
    );
    op(&t, "app", "resume").await;
    assert!(
        show(&t, "app")
            .await
            .members
            .iter()
            .all(|m| m.status == ContainerStatus::Running)
    );
    let destroy = op(&t, "app", "destroy").await;
    assert_eq!(order(destroy).await, vec![web, lb, db]);
    let e = show(&t, "app").await;
    assert_eq!(e.status.as_str(), "destroyed");
    assert!(e.members.is_empty());
    let guests: usize = [1, 2, 3]
        .iter()
        .map(|i| t.core.fleet().sim(*i).unwrap().guests().len())
        .sum();
    assert_eq!(guests, 0);
    // The name is free again once the environment is destroyed.
    env(&t, "app").await;
    assert_eq!(show(&t, "app").await.status.as_str(), "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_fails_the_environment_operation_with_its_message() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    env(&t, "frail").await;
    let id = added(&add(&t, "frail", "plain").await);
    let c: Container = t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    let server = c.server.unwrap();
    t.sim(&server).await.fail_next(
        "stop",
        1,
        cloud48_engine::driver::DriverError::Permanent("stuck in D state".into()),
    );
    let a: Accepted = t
        .client
        .post("/v1/environments/frail/stop", &json!({}))
        .await
        .unwrap();
    let cmd = t.wait(a.command_id).await;
    let err = cmd.error.unwrap();
    assert!(err.contains("stop of environment 'frail' stopped"), "{err}");
    assert!(err.contains("stuck in D state"), "{err}");
}

/// A member that serves is not destroyed behind its peers' backs: the refusal names the
/// command that tells them; once removed (or its environment destroyed) it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_serving_member_directly_is_refused_naming_env_remove() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    env(&t, "kept").await;
    let id = added(&add(&t, "kept", "plain").await);
    let err = t
        .client
        .post::<_, Accepted>(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "destroy" }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("member of environment 'kept'")
            && err.contains(&format!("cloud48 env remove kept {id}"))
            && err.contains("HTTP 409"),
        "{err}"
    );
    let c: Container = t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    assert_eq!(c.status.as_str(), "running", "nothing happened to it");
    let a: Accepted = t
        .client
        .submit::<()>(&format!("/v1/environments/kept/containers/{id}"), None)
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let c: Container = t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    assert_eq!(c.status.as_str(), "destroyed");
}

/// The sorted arguments of every nginx rewrite exec'd in container `id`, in order.
async fn rewrites(t: &TestCore, id: ContainerId) -> Vec<Vec<String>> {
    let c: cloud48_engine::model::Container =
        t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    let guest = t
        .sim(c.server.as_deref().unwrap())
        .await
        .guest(&c.guest_id)
        .unwrap();
    guest
        .execs
        .into_iter()
        .map(|e| {
            let mut args = e.args;
            args.sort();
            args
        })
        .collect()
}

/// Regression (hardening): `env add` and `env remove` half-applied when the balancer was
/// stopped: the command failed ("container.exec … is stopped") after the tomcat was made or
/// destroyed, and starting the balancer again re-applied nothing, so nginx kept routing to a
/// destroyed tomcat. A script for a stopped or suspended container now waits for it: the
/// change succeeds, and the balancer's nginx catches up when it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_balancer_is_stopped_converge_when_it_runs_again() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    env(&t, "web").await;
    let t1 = added(&add(&t, "web", "tomcat").await);
    let t2 = added(&add(&t, "web", "tomcat").await);
    let members = show(&t, "web").await.members;
    let lb = members
        .iter()
        .find(|m| m.type_id.starts_with("balancer"))
        .unwrap()
        .id;
    let ip = |id: ContainerId, members: &[Container]| {
        format!(
            "{}:8080",
            members
                .iter()
                .find(|m| m.id == id)
                .unwrap()
                .ip
                .clone()
                .unwrap()
        )
    };
    let (ip1, ip2) = (ip(t1, &members), ip(t2, &members));
    t.ok(crate::container::act(&t, lb, ContainerCommand::Stop {}).await)
        .await;
    let before = rewrites(&t, lb).await;

    // While it is stopped: a tomcat added, another removed; both succeed.
    let c = add(&t, "web", "tomcat").await;
    assert_eq!(
        c.status,
        cloud48_engine::model::CommandStatus::Succeeded,
        "{c:?}"
    );
    let t3 = added(&c);
    let a: Accepted = t
        .client
        .delete(&format!("/v1/environments/web/containers/{t1}"))
        .await
        .unwrap();
    let c = t.wait(a.command_id).await;
    assert_eq!(
        c.status,
        cloud48_engine::model::CommandStatus::Succeeded,
        "{c:?}"
    );
    assert_eq!(
        rewrites(&t, lb).await,
        before,
        "nothing ran in the stopped balancer"
    );
    let ip3 = ip(t3, &show(&t, "web").await.members);

    // Running again: the rewrites it missed run in order; nginx routes to t2 and t3 only.
    t.ok(crate::container::act(&t, lb, ContainerCommand::Start {}).await)
        .await;
    let after = rewrites(&t, lb).await;
    assert_eq!(after.len(), before.len() + 2, "{after:?}");
    let mut expected = vec![ip2.clone(), ip3.clone()];
    expected.sort();
    assert_eq!(after.last().unwrap(), &expected);
    assert!(!after.last().unwrap().contains(&ip1));
    // Nothing waits any more: a later start runs nothing again.
    t.ok(crate::container::act(&t, lb, ContainerCommand::Stop {}).await)
        .await;
    t.ok(crate::container::act(&t, lb, ContainerCommand::Start {}).await)
        .await;
    assert_eq!(rewrites(&t, lb).await.len(), after.len());

    // A waiting script that fails at the start stays waiting, and runs before any later one:
    // scripts run in the order the hooks asked for them.
    t.ok(crate::container::act(&t, lb, ContainerCommand::Stop {}).await)
        .await;
    let t4 = added(&add(&t, "web", "tomcat").await);
    let lb_server = show(&t, "web")
        .await
        .members
        .iter()
        .find(|m| m.id == lb)
        .unwrap()
        .server
        .clone()
        .unwrap();
    t.sim(&lb_server).await.fail_next(
        "exec",
        1,
        cloud48_engine::driver::DriverError::Permanent("disk full".into()),
    );
    let start = t
        .wait(crate::container::act(&t, lb, ContainerCommand::Start {}).await)
        .await;
    assert_eq!(start.status, cloud48_engine::model::CommandStatus::Failed);
    let error = start.error.unwrap();
    assert!(
        error.contains("disk full") && error.contains("stays pending"),
        "{error}"
    );
    assert_eq!(
        rewrites(&t, lb).await.len(),
        after.len(),
        "the failed one did not run"
    );
    let t5 = added(&add(&t, "web", "tomcat").await);
    let last = rewrites(&t, lb).await;
    assert_eq!(
        last.len(),
        after.len() + 2,
        "the waiting rewrite, then the new one"
    );
    let members = show(&t, "web").await.members;
    let mut expected = vec![ip2, ip3, ip(t4, &members), ip(t5, &members)];
    expected.sort();
    assert_eq!(last.last().unwrap(), &expected);
    assert_eq!(last[last.len() - 2].len(), 3, "the older rewrite ran first");
}

/// Regression (WIT 0.2.0 issue, harness/core agreement): in `after-other-is-added` the core left
/// the new container out of `ctx.environment.members`, while the SDK's testing `Platform` (and
/// so `cloud48 plugin test`) includes it. The new member has joined: every member sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_other_is_added_sees_the_new_member_among_the_members() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = TestCore::start(Opts {
        types: recording(&log),
        ..Opts::default()
    })
    .await
    .unwrap();
    env(&t, "shop").await;
    let watcher = added(&add(&t, "shop", "seeing").await);
    let web = added(&add(&t, "shop", "web").await);
    let db = added(&add(&t, "shop", "db").await);
    let mut web_and_db = vec![web.0, db.0];
    web_and_db.sort_unstable();
    assert_ne!(watcher, web);
    let seen: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("seeing sees"))
        .cloned()
        .collect();
    assert_eq!(
        seen,
        vec![
            format!("seeing sees {:?}", vec![web.0]),
            format!("seeing sees {web_and_db:?}"),
        ]
    );
}
