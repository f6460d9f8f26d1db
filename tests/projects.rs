//! Projects and quotas: a user with roles only in some projects reads and acts only there
//! (lists, objects, commands, events); a quota refuses what would pass it when a command is
//! submitted and again when it runs; what existed before belongs to `default`.

use cloud48_core::cli::{Client, Credentials};
use cloud48_engine::auth::{Anonymous, AuthConfig, Role, UserRecord};
use cloud48_engine::model::{Accepted, CommandStatus, Container, Environment, Project, Topic};
use serde_json::json;
use std::time::Duration;

use crate::common::{Opts, TestCore};
use crate::events::{open, until};

const REALM: &str = "cloud48";

fn user(t: &TestCore, name: &str) -> Client {
    Client::new(&t.url).with_credentials(Credentials {
        user: name.into(),
        password: format!("{name}-password"),
    })
}

async fn core(paused: bool) -> TestCore {
    core_with(paused, Anonymous::None).await
}

async fn core_with(paused: bool, anonymous: Anonymous) -> TestCore {
    core_on(paused, anonymous, false, Duration::ZERO)
        .await
        .unwrap()
}

/// `core_with`, on PostgreSQL when `pg` (`None` when it is unreachable and not required),
/// with simulated servers taking `latency` per operation.
async fn core_on(
    paused: bool,
    anonymous: Anonymous,
    pg: bool,
    latency: Duration,
) -> Option<TestCore> {
    let record = |name: &str, role| {
        UserRecord::with_password(name, role, REALM, &format!("{name}-password"))
    };
    TestCore::start(Opts {
        auth: AuthConfig {
            realm: REALM.into(),
            anonymous,
            users: vec![
                record("ada", Role::Admin),
                record("mo", Role::Member),
                record("vic", Role::Member),
                record("vera", Role::Viewer),
            ],
            ..AuthConfig::default()
        },
        paused,
        postgres: pg,
        latency,
        ..Opts::default()
    })
    .await
}

/// Project `shop`, made by admin `ada`, where `mo` is an operator.
async fn shop_with_operator_mo(ada: &Client) {
    let _: Project = ada
        .post("/v1/projects", &json!({ "name": "shop" }))
        .await
        .unwrap();
    let _: Project = ada
        .put(
            "/v1/projects/shop/members/mo",
            &json!({ "role": "operator" }),
        )
        .await
        .unwrap();
}

/// The error text of a request that must fail.
fn refused<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("refused"))
}

/// Where anonymous callers may read environments (the default), a signed-in member still sees
/// only its projects: the client signs every request, not only those refused to anonymous.
#[tokio::test]
async fn a_signed_in_member_gets_its_own_view_where_anonymous_callers_may_read() {
    let t = core_with(false, Anonymous::Read).await;
    let (ada, mo) = (user(&t, "ada"), user(&t, "mo"));
    shop_with_operator_mo(&ada).await;
    let a: Accepted = ada
        .post("/v1/environments", &json!({ "name": "flap" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let anonymous: Vec<Environment> = Client::new(&t.url).get("/v1/environments").await.unwrap();
    assert_eq!(
        anonymous.len(),
        1,
        "anonymous callers read environments here"
    );
    let seen: Vec<Environment> = mo.get("/v1/environments").await.unwrap();
    assert!(seen.is_empty(), "mo sees only shop's: {seen:?}");
    // Nor can it follow one it may not read: a stream that would never tell anything.
    let err = mo
        .events("/v1/events?environment=flap")
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("does not exist in the projects you may read"),
        "{err}"
    );
    // What a project holds is for its members: anonymous callers read `default` only.
    let a: Accepted = mo
        .post(
            "/v1/environments",
            &json!({ "name": "shop-db", "project": "shop", "params": { "dbpass": "hunter2" } }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let anonymous = Client::new(&t.url);
    let listed: Vec<Environment> = anonymous.get("/v1/environments").await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["flap"]
    );
    let err = refused(
        anonymous
            .get::<Environment>("/v1/environments/shop-db")
            .await,
    );
    assert!(
        err.contains("project anonymous callers may read") && !err.contains("hunter2"),
        "{err}"
    );
    let mine: Environment = mo.get("/v1/environments/shop-db").await.unwrap();
    assert_eq!(mine.project, "shop");
    // In `default`, anonymous callers read a summary: parameter values are for users.
    let a: Accepted = ada
        .post(
            "/v1/environments",
            &json!({ "name": "pub", "params": { "db-password": "hunter2" } }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let shown: Environment = anonymous.get("/v1/environments/pub").await.unwrap();
    assert_eq!(shown.params["db-password"], "****");
    let listed: Vec<Environment> = anonymous.get("/v1/environments").await.unwrap();
    let text = serde_json::to_string(&listed).unwrap();
    assert!(
        text.contains("db-password") && !text.contains("hunter2"),
        "{text}"
    );
    let signed: Environment = ada.get("/v1/environments/pub").await.unwrap();
    assert_eq!(signed.params["db-password"], "hunter2");
}

#[tokio::test]
async fn a_member_reads_and_acts_only_in_its_projects() {
    let t = core(false).await;
    let (ada, mo, vic, vera) = (
        user(&t, "ada"),
        user(&t, "mo"),
        user(&t, "vic"),
        user(&t, "vera"),
    );
    // Before any grant a member reads nothing, and is told how to get a role.
    let err = refused(mo.get::<serde_json::Value>("/v1/servers").await);
    assert!(
        err.contains("user 'mo' has role member and no role in any project")
            && err.contains("`cloud48 project grant PROJECT mo viewer`"),
        "{err}"
    );
    for name in ["shop", "lab"] {
        let p: Project = ada
            .post("/v1/projects", &json!({ "name": name }))
            .await
            .unwrap();
        assert_eq!(p.name, name);
    }
    let _: Project = ada
        .put(
            "/v1/projects/shop/members/mo",
            &json!({ "role": "operator" }),
        )
        .await
        .unwrap();
    let shop: Project = ada
        .put(
            "/v1/projects/shop/members/vic",
            &json!({ "role": "viewer" }),
        )
        .await
        .unwrap();
    assert_eq!(shop.members.len(), 2);
    // Project roles stop at operator: admins are global.
    let why = refused(
        ada.put::<_, Project>("/v1/projects/shop/members/vic", &json!({ "role": "admin" }))
            .await,
    );
    assert!(
        why.contains("HTTP 422") && why.contains("viewer or operator"),
        "{why}"
    );
    let why = refused(
        ada.put::<_, Project>(
            "/v1/projects/shop/members/nobody",
            &json!({ "role": "viewer" }),
        )
        .await,
    );
    assert!(why.contains("user 'nobody' does not exist"), "{why}");
    // A project role at or below a user's global role would change nothing.
    let why = refused(
        ada.put::<_, Project>(
            "/v1/projects/shop/members/ada",
            &json!({ "role": "viewer" }),
        )
        .await,
    );
    assert!(
        why.contains("HTTP 422") && why.contains("has the global role admin"),
        "{why}"
    );
    // Projects are made by admins only.
    let why = refused(
        mo.post::<_, Project>("/v1/projects", &json!({ "name": "mine" }))
            .await,
    );
    assert!(why.contains("HTTP 403"), "{why}");

    let (mut mo_events, _) = open(&mo, "/v1/events").await;
    let lab: Accepted = ada
        .post(
            "/v1/environments",
            &json!({ "name": "lab-env", "project": "lab" }),
        )
        .await
        .unwrap();
    t.ok(lab.command_id).await;
    let a: Accepted = mo
        .post(
            "/v1/environments",
            &json!({ "name": "shop-env", "project": "shop" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    // Not in a project it has no role in, nor in `default` by leaving the project out.
    for body in [
        json!({ "name": "sneaky", "project": "lab" }),
        json!({ "name": "sneaky" }),
    ] {
        let why = refused(mo.post::<_, Accepted>("/v1/environments", &body).await);
        assert!(
            why.contains("HTTP 422") && why.contains("not one of the projects"),
            "{why}"
        );
    }
    let why = refused(
        vic.post::<_, Accepted>(
            "/v1/environments",
            &json!({ "name": "v", "project": "shop" }),
        )
        .await,
    );
    assert!(
        why.contains("HTTP 403") && why.contains("only viewer in project 'shop'"),
        "{why}"
    );

    // An operator elsewhere is still only a viewer in shop.
    let _: Project = ada
        .put(
            "/v1/projects/lab/members/vic",
            &json!({ "role": "operator" }),
        )
        .await
        .unwrap();
    let add: Accepted = mo
        .post(
            "/v1/environments/shop-env/containers",
            &json!({ "type": "tomcat" }),
        )
        .await
        .unwrap();
    t.ok(add.command_id).await;
    let lab_add: Accepted = ada
        .post(
            "/v1/environments/lab-env/containers",
            &json!({ "type": "tomcat" }),
        )
        .await
        .unwrap();
    t.ok(lab_add.command_id).await;

    // Lists hold only the member's projects; a global viewer sees every project.
    let envs: Vec<Environment> = mo.get("/v1/environments").await.unwrap();
    assert_eq!(
        envs.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["shop-env"]
    );
    assert_eq!(envs[0].project, "shop");
    let all: Vec<Environment> = vera.get("/v1/environments").await.unwrap();
    assert_eq!(all.len(), 2);
    let mine: Vec<Container> = mo.get("/v1/containers").await.unwrap();
    assert!(
        !mine.is_empty() && mine.iter().all(|c| c.project == "shop"),
        "{mine:?}"
    );
    let lab_only: Vec<Container> = ada.get("/v1/containers?project=lab").await.unwrap();
    assert!(!lab_only.is_empty() && lab_only.iter().all(|c| c.project == "lab"));
    // A filter on a project the caller may not read is refused as one that does not exist:
    // no list, command list or event stream tells which projects exist beyond the caller's.
    for path in [
        "/v1/containers?project=",
        "/v1/environments?project=",
        "/v1/commands?project=",
    ] {
        let said = |project: &'static str| {
            let mo = &mo;
            let url = format!("{path}{project}");
            async move {
                let why = refused(mo.get::<serde_json::Value>(&url).await);
                why.replace(project, "P")
            }
        };
        let (hidden, missing) = (said("lab").await, said("nowhere").await);
        assert!(hidden.contains("HTTP 422"), "{hidden}");
        assert_eq!(hidden, missing, "{path}");
    }
    let stream_refusal = |query: &str| {
        let mo = &mo;
        let url = format!("/v1/events?{query}");
        async move { mo.events(&url).await.err().expect("refused").to_string() }
    };
    assert_eq!(
        stream_refusal("project=lab").await.replace("lab", "P"),
        stream_refusal("project=nowhere")
            .await
            .replace("nowhere", "P")
    );
    assert_eq!(
        stream_refusal("environment=lab-env")
            .await
            .replace("lab-env", "E"),
        stream_refusal("environment=nowhere")
            .await
            .replace("nowhere", "E")
    );
    let commands: Vec<cloud48_engine::model::Command> = mo.get("/v1/commands").await.unwrap();
    assert!(!commands.is_empty());
    assert!(
        commands
            .iter()
            .all(|c| c.id != lab.command_id && c.id != lab_add.command_id),
        "mo sees no command of lab: {commands:?}"
    );
    let projects: Vec<Project> = mo.get("/v1/projects").await.unwrap();
    assert_eq!(
        projects.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["shop"]
    );

    // Another project's objects answer as missing; a viewer may read but not act.
    let why = refused(mo.get::<Environment>("/v1/environments/lab-env").await);
    assert!(
        why.contains("HTTP 404") && why.contains("may read"),
        "{why}"
    );
    let lab_container = lab_only[0].id;
    let why = refused(
        mo.get::<Container>(&format!("/v1/containers/{lab_container}"))
            .await,
    );
    assert!(why.contains("HTTP 404"), "{why}");
    let why = refused(
        mo.get::<cloud48_engine::model::Command>(&format!("/v1/commands/{}", lab.command_id))
            .await,
    );
    assert!(why.contains("HTTP 404"), "{why}");
    let shop_container = mine[0].id;
    let _: Container = vic
        .get(&format!("/v1/containers/{shop_container}"))
        .await
        .unwrap();
    let why = refused(
        vic.post::<_, Accepted>(
            &format!("/v1/containers/{shop_container}/actions"),
            &json!({ "op": "stop" }),
        )
        .await,
    );
    assert!(
        why.contains("HTTP 403") && why.contains("has role viewer there"),
        "{why}"
    );
    let stop: Accepted = mo
        .post(
            &format!("/v1/containers/{shop_container}/actions"),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    t.ok(stop.command_id).await;
    // The fleet may be read, not changed; fleet-wide actions need a global role.
    let servers: Vec<serde_json::Value> = mo.get("/v1/servers").await.unwrap();
    assert!(!servers.is_empty());
    let why = refused(
        mo.post::<_, serde_json::Value>("/v1/containers/purge", &json!({}))
            .await,
    );
    assert!(
        why.contains("HTTP 403") && why.contains("outside projects"),
        "{why}"
    );
    // The metrics a member reads are its projects' containers (and quotas), nothing of the
    // fleet or of other projects.
    let metrics = mo.get_text("/metrics").await.unwrap();
    assert!(metrics.contains("project=\"shop\""), "{metrics}");
    assert!(!metrics.contains("project=\"lab\""), "{metrics}");
    assert!(!metrics.contains("cloud48_servers"), "{metrics}");
    let all = ada.get_text("/metrics").await.unwrap();
    assert!(all.contains("project=\"lab\"") && all.contains("cloud48_servers"));

    // The member's stream told of its project's objects, never of lab's.
    let stopped = |e: &cloud48_engine::model::Event| {
        e.topic == Topic::Container && e.object_id == shop_container.0 && e.action == "stopped"
    };
    let seen = until(&mut mo_events, stopped).await;
    assert!(
        seen.iter().any(|e| e.topic == Topic::Environment),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|e| e.topic == Topic::Server || e.project_id == Some(shop.id)),
        "only shop's events: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| e.object_id == lab_container.0 && e.topic == Topic::Container)
    );

    // A project with objects cannot be removed; `default` never.
    let why = refused(ada.delete_empty("/v1/projects/shop").await);
    assert!(
        why.contains("HTTP 409") && why.contains("destroy them first"),
        "{why}"
    );
    let why = refused(ada.delete_empty("/v1/projects/default").await);
    assert!(why.contains("HTTP 409"), "{why}");
}

#[tokio::test]
async fn a_quota_refuses_at_submission_and_again_when_the_command_runs() {
    // Paused: what is submitted runs only once the test starts the core.
    let t = core(true).await;
    let ada = user(&t, "ada");
    let p: Project = ada
        .post(
            "/v1/projects",
            &json!({ "name": "small", "quota": { "containers": 2, "memory_mb": 1024 } }),
        )
        .await
        .unwrap();
    assert_eq!((p.quota.containers, p.quota.cpu_millis), (Some(2), None));
    let create = |count: u32, memory: u64| {
        json!({
            "type": "tomcat", "project": "small", "count": count,
            "requirements": { "cpu_millis": 100, "memory_mb": memory, "disk_mb": 100 }
        })
    };
    let why = refused(
        ada.post::<_, Accepted>("/v1/containers", &create(3, 100))
            .await,
    );
    assert!(why.contains("HTTP 409"), "{why}");
    assert!(
        why.contains("containers: 0 used + 3 asked > 2 allowed"),
        "{why}"
    );
    let why = refused(
        ada.post::<_, Accepted>("/v1/containers", &create(1, 2048))
            .await,
    );
    assert!(
        why.contains("memory_mb: 0 used + 2048 asked > 1024 allowed"),
        "{why}"
    );
    // Two that fit, submitted before either runs; then the quota shrinks to one.
    let first: Accepted = ada.post("/v1/containers", &create(1, 256)).await.unwrap();
    let second: Accepted = ada.post("/v1/containers", &create(1, 256)).await.unwrap();
    let why = refused(
        ada.post::<_, Accepted>("/v1/containers", &create(1, 256))
            .await,
    );
    assert!(
        why.contains("containers: 2 used + 1 asked > 2 allowed"),
        "{why}"
    );
    let small: Project = ada
        .put("/v1/projects/small/quota", &json!({ "containers": 1 }))
        .await
        .unwrap();
    assert_eq!(small.usage.containers, 2, "both are counted while creating");
    t.core.start().await.unwrap();
    // The first asked keeps its place; the second fails when it runs.
    t.ok(first.command_id).await;
    let failed = t.wait(second.command_id).await;
    assert_eq!(failed.status, CommandStatus::Failed);
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("would take project 'small' over its quota"),
        "{error}"
    );
    let small: Project = ada.get("/v1/projects/small").await.unwrap();
    assert_eq!(small.usage.containers, 1, "the failed one no longer counts");
    // A project with a quota shows it, and what it uses, in the metrics.
    let metrics = ada.get_text("/metrics").await.unwrap();
    assert!(
        metrics.contains("cloud48_project_quota{project=\"small\",resource=\"containers\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloud48_project_usage{project=\"small\",resource=\"memory_mb\"} 256"),
        "{metrics}"
    );
    // A member's update beyond the quota is refused too.
    let id = first.object_id.unwrap();
    let _: Project = ada
        .put(
            "/v1/projects/small/quota",
            &json!({ "containers": 1, "memory_mb": 512 }),
        )
        .await
        .unwrap();
    let why = refused(
        ada.post::<_, Accepted>(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "update", "resources": { "cpu_millis": 100, "memory_mb": 1024, "disk_mb": 100 } }),
        )
        .await,
    );
    assert!(
        why.contains("memory_mb: 256 used + 768 asked > 512 allowed"),
        "{why}"
    );
    // Objects made without naming a project are in `default`, which has no quota.
    let d: Accepted = ada
        .post("/v1/containers", &json!({ "type": "tomcat" }))
        .await
        .unwrap();
    t.ok(d.command_id).await;
    let c: Container = ada
        .get(&format!("/v1/containers/{}", d.object_id.unwrap()))
        .await
        .unwrap();
    assert_eq!(c.project, "default");
}

crate::on_both_databases!(
    two_updates_running_at_once_do_not_both_fit_in_what_is_left_of_a_quota,
    racing_updates
);
/// Two updates that each fit in what is left of a project's memory quota, but not together,
/// both pass their submission and run at once: the growth the first reserved is counted by
/// the second, which fails; the project stays within its quota.
async fn racing_updates(pg: bool) {
    let Some(t) = core_on(false, Anonymous::None, pg, Duration::from_millis(1500)).await else {
        return;
    };
    let ada = user(&t, "ada");
    let _: Project = ada
        .post(
            "/v1/projects",
            &json!({ "name": "race", "quota": { "memory_mb": 1024 } }),
        )
        .await
        .unwrap();
    let size = |memory: u64| json!({ "cpu_millis": 100, "memory_mb": memory, "disk_mb": 100 });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let a: Accepted = ada
            .post(
                "/v1/containers",
                &json!({ "type": "plain", "project": "race", "requirements": size(256) }),
            )
            .await
            .unwrap();
        ids.push((a.command_id, a.object_id.unwrap()));
    }
    for (cmd, _) in &ids {
        t.ok(*cmd).await;
    }
    // Reboots (1.5 s each on these servers) hold both containers while the updates are
    // submitted: both pass their submission, and run once the reboots end.
    let act = |id: i64, op: serde_json::Value| {
        let ada = &ada;
        async move {
            let a: Accepted = ada
                .post(&format!("/v1/containers/{id}/actions"), &op)
                .await
                .unwrap();
            a.command_id
        }
    };
    let mut reboots = Vec::new();
    for (_, id) in &ids {
        reboots.push(act(*id, json!({ "op": "reboot" })).await);
    }
    // Each asks 512 more: 512 used + 512 fits, 512 + 1024 does not.
    let mut updates = Vec::new();
    for (_, id) in &ids {
        updates.push(act(*id, json!({ "op": "update", "resources": size(768) })).await);
    }
    for cmd in reboots {
        t.ok(cmd).await;
    }
    let mut outcomes = Vec::new();
    for cmd in updates {
        outcomes.push(t.wait(cmd).await);
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|c| c.status == CommandStatus::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{outcomes:?}");
    let error = failed[0].error.clone().unwrap_or_default();
    assert!(error.contains("over its quota"), "{error}");
    let race: Project = ada.get("/v1/projects/race").await.unwrap();
    assert_eq!(race.usage.resources.memory_mb, 1024, "{race:?}");
}

/// An open event stream stops once its reader's rights change: a member whose project role
/// is revoked hears nothing more of the project, but an error saying to open it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_when_its_reader_loses_the_project() {
    use futures::StreamExt;
    let t = core(false).await;
    let (ada, mo) = (user(&t, "ada"), user(&t, "mo"));
    shop_with_operator_mo(&ada).await;
    let (mut stream, _) = open(&mo, "/v1/events?project=shop&topic=environment").await;
    let _: Project = ada.delete("/v1/projects/shop/members/mo").await.unwrap();
    // Events of the project go on; the stream ends with the reason instead of telling them.
    let mut made = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let ended = loop {
        let a: Accepted = ada
            .post(
                "/v1/environments",
                &json!({ "name": format!("e{made}"), "project": "shop" }),
            )
            .await
            .unwrap();
        t.ok(a.command_id).await;
        made += 1;
        match tokio::time::timeout(std::time::Duration::from_secs(1), stream.next()).await {
            Ok(Some(Err(e))) => break e.to_string(),
            Ok(None) => panic!("the stream ended without saying why"),
            Ok(Some(Ok(_))) | Err(_) => assert!(
                std::time::Instant::now() < deadline,
                "the stream went on for a minute"
            ),
        }
    };
    assert!(
        ended.contains("may no longer read all this stream shows"),
        "{ended}"
    );
}
