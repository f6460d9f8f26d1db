//! End to end on real servers: a core and four node agents (linux driver), each agent in its
//! own network namespace as a separate host; real nginx balances real HTTP between two
//! tomcats; agent crash and network cut fail the balancer over to another host, and the
//! collector removes the illegal balancer when the host comes back. Needs root and nginx.

use std::time::{Duration, Instant};

use cloud48_engine::core::HealthConfig;
use cloud48_engine::model::Accepted;
use cloud48_engine::model::ContainerId;
use cloud48_engine::model::{Container, ContainerStatus, Environment};
use serde_json::json;

use crate::agent::TOKEN;
use crate::common::{Opts, TestCore, eventually};
use cloud48_core::lab::{self, CORE_IP, Lab};

use crate::linux::unique_prefix;

async fn members(t: &TestCore) -> Vec<Container> {
    let env: Environment = t.client.get("/v1/environments/shop").await.unwrap();
    env.members
}

pub(crate) async fn running(
    t: &TestCore,
    type_name: &str,
    not: &[ContainerId],
) -> Option<Container> {
    members(t).await.into_iter().find(|m| {
        m.type_id.starts_with(type_name)
            && m.status == ContainerStatus::Running
            && !not.contains(&m.id)
    })
}

pub(crate) async fn container(t: &TestCore, id: ContainerId) -> Container {
    t.client.get(&format!("/v1/containers/{id}")).await.unwrap()
}

/// Waits until the balancer at `ip` serves every one of `guests` (and nothing else).
async fn serves_all(ip: &str, guests: &[String]) {
    eventually(
        &format!("the balancer at {ip} serves {guests:?}"),
        || async { lab::serves_all(ip, guests).await.then_some(()) },
    )
    .await;
}

/// Waits for a replacement balancer (not one of `old`) on a host other than `not_on`, serving
/// both tomcats; returns it and the time it took.
async fn replacement(
    t: &TestCore,
    old: &[ContainerId],
    not_on: &str,
    tomcats: &[String],
    since: Instant,
) -> (Container, Duration) {
    let lb = eventually("a replacement balancer", || async {
        running(t, "balancer", old).await
    })
    .await;
    assert_ne!(
        lb.server.as_deref(),
        Some(not_on),
        "the replacement is on another host"
    );
    serves_all(lb.ip.as_deref().unwrap(), tomcats).await;
    (lb, since.elapsed())
}

/// A core for a lab: on the lab's LAN address, no simulated servers, the lab's agent token.
pub async fn lab_core() -> TestCore {
    let opts = Opts {
        sim_servers: 0,
        agent_token: Some(TOKEN.into()),
        listen: Some((CORE_IP, 0).into()),
        ..Default::default()
    };
    TestCore::start(opts).await.unwrap()
}

/// Waits until `n` servers are up (the lab's agents have registered).
pub async fn all_up(t: &TestCore, n: usize) {
    eventually(&format!("{n} agents up"), || async {
        let servers = t.core.servers().list().await.unwrap();
        (servers
            .iter()
            .filter(|s| s.status == cloud48_engine::model::ServerStatus::Up)
            .count()
            == n)
            .then_some(())
    })
    .await;
}

async fn collected(t: &TestCore, id: ContainerId) {
    eventually(
        &format!("the illegal balancer {id} is collected"),
        || async { (container(t, id).await.status == ContainerStatus::Destroyed).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nginx_balances_real_traffic_and_fails_over_between_hosts() {
    let _heavy = crate::common::HEAVY.lock().await;
    let prefix = unique_prefix('e');
    let mut lab = Lab::new(&prefix, 4, env!("CARGO_BIN_EXE_cloud48").into(), TOKEN)
        .expect("the lab builds (run as root)");
    lab.heartbeat_ms = 200;
    let health = HealthConfig {
        background: true,
        collector: Duration::from_secs(3600),
        ..Default::default()
    };
    let opts = Opts {
        sim_servers: 0,
        agent_token: Some(TOKEN.into()),
        health,
        listen: Some((CORE_IP, 0).into()),
        ..Default::default()
    };
    let t = TestCore::start(opts).await.unwrap();
    lab.start_agents_for_the_seed(&t.core, &t.url)
        .await
        .unwrap();

    // The seed environment: two tomcats on h1 and h2; the second asks for a balancer.
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut tomcats = Vec::new();
    for host in ["h1", "h2"] {
        let a: Accepted = t
            .client
            .post(
                "/v1/environments/shop/containers",
                &json!({ "type": "tomcat", "server": host }),
            )
            .await
            .unwrap();
        tomcats.push(t.created(a.command_id).await);
    }
    let guests: Vec<String> = {
        let mut g = Vec::new();
        for id in &tomcats {
            g.push(container(&t, *id).await.guest_id);
        }
        g
    };
    let lb = eventually("a running balancer", || async {
        running(&t, "balancer", &[]).await
    })
    .await;
    let lb_host = lb.server.clone().unwrap();
    assert!(
        lb_host == "h3" || lb_host == "h4",
        "placement put the balancer on an empty host, not {lb_host}"
    );
    serves_all(lb.ip.as_deref().unwrap(), &guests).await;

    // One tomcat stops: all traffic goes to the other.
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", tomcats[0]),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    // A request may fail while nginx finds the stopped upstream dead (under load its 1 s
    // connect timeout can pass); the stopped tomcat never answers, and traffic settles on the other.
    let seen = std::sync::Mutex::new(Vec::new());
    let got = eventually(
        "six requests in a row answered by the running tomcat",
        || async {
            let got = lab::answers(lb.ip.as_deref().unwrap(), 6).await;
            seen.lock().unwrap().extend(got.clone());
            got.iter()
                .all(|g| g.as_deref() == Some(guests[1].as_str()))
                .then_some(got)
        },
    )
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(
        got.iter().all(|g| g.as_deref() == Some(guests[1].as_str())),
        "only the running tomcat answers: {got:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|g| g.as_deref() == Some(guests[0].as_str())),
        "the stopped tomcat answered: {seen:?}"
    );
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", tomcats[0]),
            &json!({ "op": "start" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    serves_all(lb.ip.as_deref().unwrap(), &guests).await;

    // kill -9 of the balancer host's agent: a new balancer on another host serves both.
    let lb_index: u32 = lb_host[1..].parse().unwrap();
    let killed = Instant::now();
    lab.kill_agent(lb_index).await;
    let (lb2, took) = replacement(&t, &[lb.id], &lb_host, &guests, killed).await;
    eprintln!("failover after agent kill: {} ms", took.as_millis());
    assert_eq!(container(&t, lb.id).await.status, ContainerStatus::Illegal);

    // The host comes back: the collector destroys the illegal balancer there, nothing else.
    lab.start_agent(lb_index, &t.url).unwrap();
    collected(&t, lb.id).await;
    for id in &tomcats {
        assert_eq!(container(&t, *id).await.status, ContainerStatus::Running);
    }
    serves_all(lb2.ip.as_deref().unwrap(), &guests).await;

    // The new balancer's host loses its network: failover again, to the empty host.
    let lb2_host = lb2.server.clone().unwrap();
    let lb2_index: u32 = lb2_host[1..].parse().unwrap();
    let cut = Instant::now();
    lab.cable(lb2_index, false).unwrap();
    let (lb3, took) = replacement(&t, &[lb.id, lb2.id], &lb2_host, &guests, cut).await;
    eprintln!("failover after network cut: {} ms", took.as_millis());
    lab.cable(lb2_index, true).unwrap();
    collected(&t, lb2.id).await;
    serves_all(lb3.ip.as_deref().unwrap(), &guests).await;

    // Operator views: logs and exec through the CLI.
    let (ok, out, err) = crate::common::cli(
        &t.url,
        &[
            "container",
            "exec",
            &lb3.id.to_string(),
            "--",
            "cat",
            "/etc/nginx/conf.d/cloud48-upstreams.conf",
        ],
    );
    assert!(ok, "{err}");
    let tomcat_ips: Vec<String> = {
        let mut v = Vec::new();
        for id in &tomcats {
            v.push(container(&t, *id).await.ip.unwrap());
        }
        v
    };
    assert!(
        tomcat_ips
            .iter()
            .all(|ip| out.contains(&format!("server {ip}:8080;"))),
        "nginx has both upstreams: {out}"
    );
    let (ok, out, err) =
        crate::common::cli(&t.url, &["container", "logs", &tomcats[0].to_string()]);
    assert!(ok && out.contains("guest-http: answering"), "{out} {err}");
    let (ok, out, _) = crate::common::cli(&t.url, &["server", "list"]);
    assert!(ok && out.contains("h4") && out.contains("remote"), "{out}");

    // Changes made while the balancer is stopped converge on real nginx when it runs again:
    // a tomcat added and another removed meanwhile; afterwards nginx routes to exactly the
    // tomcats that are there.
    t.ok(crate::container::act(
        &t,
        lb3.id,
        cloud48_engine::managers::ContainerCommand::Stop {},
    )
    .await)
        .await;
    let a: Accepted = t
        .client
        .post(
            "/v1/environments/shop/containers",
            &json!({ "type": "tomcat" }),
        )
        .await
        .unwrap();
    let third = t.created(a.command_id).await;
    let a: Accepted = t
        .client
        .delete(&format!("/v1/environments/shop/containers/{}", tomcats[0]))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    t.ok(crate::container::act(
        &t,
        lb3.id,
        cloud48_engine::managers::ContainerCommand::Start {},
    )
    .await)
        .await;
    let now = vec![guests[1].clone(), container(&t, third).await.guest_id];
    serves_all(lb3.ip.as_deref().unwrap(), &now).await;
}

/// Builds the image of `recipe` (under `images/`) into the core's store.
async fn build_into_core(t: &TestCore, recipe: &str) {
    let store = t.core.images().clone();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../images")
        .join(recipe);
    tokio::task::spawn_blocking(move || {
        let cache = std::env::var_os("CLOUD48_CACHE_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/var/cache/cloud48".into());
        cloud48_engine::images::Builder::new(cache, cloud48_engine::images::DEFAULT_MIRROR)
            .build(&path, &store, &mut |_| {})
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
    .await
    .unwrap();
}

/// True when 8 requests through the balancer at `ip` are all answered by the application of
/// one of `guests` with `row` (the database's greeting), and each of them answers.
pub(crate) async fn apps_serve_the_row(ip: &str, guests: &[String], row: &str) -> bool {
    let want: Vec<String> = guests
        .iter()
        .map(|g| format!("tomcat {g}: {row}"))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(match client.get(format!("http://{ip}/")).send().await {
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                status
                    .is_success()
                    .then(|| text.trim().to_string())
                    .ok_or(format!("{status}: {text}"))
            }
            Err(e) => Err(e.to_string()),
        });
    }
    let ok = got
        .iter()
        .all(|g| g.as_ref().is_ok_and(|g| want.contains(g)))
        && want
            .iter()
            .all(|w| got.iter().any(|a| a.as_ref().ok() == Some(w)));
    if !ok {
        eprintln!("the balancer at {ip} answered {got:?}");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_runs_real_nginx_tomcat_and_mariadb_from_images() {
    let _heavy = crate::common::HEAVY.lock().await;
    let prefix = unique_prefix('s');
    let mut lab = Lab::new(&prefix, 2, env!("CARGO_BIN_EXE_cloud48").into(), TOKEN)
        .expect("the lab builds (run as root)");
    lab.images = true;
    let t = lab_core().await;
    for recipe in ["nginx.toml", "tomcat.toml", "mariadb.toml"] {
        build_into_core(&t, recipe).await;
    }
    for i in [1, 2] {
        lab.start_agent(i, &t.url).unwrap();
    }
    all_up(&t, 2).await;

    // The database first, then two tomcats (the second asks for a balancer); each agent pulls
    // the images it needs from the core.
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut tomcats = Vec::new();
    let mut db = None;
    for (kind, host) in [("mysql", "h1"), ("tomcat", "h1"), ("tomcat", "h2")] {
        let a: Accepted = t
            .client
            .post(
                "/v1/environments/shop/containers",
                &json!({ "type": kind, "server": host }),
            )
            .await
            .unwrap();
        let id = t.created(a.command_id).await;
        if kind == "tomcat" {
            tomcats.push(id);
        } else {
            db = Some(id);
        }
    }
    let mut guests = Vec::new();
    for id in &tomcats {
        guests.push(container(&t, *id).await.guest_id);
    }
    let lb = eventually("a running balancer", || async {
        running(&t, "balancer", &[]).await
    })
    .await;
    let lb_ip = lb.ip.clone().unwrap();
    eventually(
        "nginx balances both tomcats, each reading MariaDB",
        || async {
            apps_serve_the_row(&lb_ip, &guests, "hello from mariadb")
                .await
                .then_some(())
        },
    )
    .await;

    // Inside, it is the image's software on the container's own root, as an unprivileged user
    // of the server.
    let out: cloud48_engine::driver::ExecOutput = t
        .client
        .post(
            &format!("/v1/containers/{}/exec", tomcats[0]),
            &json!({ "command": ["sh", "-c", "cat /proc/self/uid_map; test -x /usr/share/tomcat10/bin/catalina.sh && echo tomcat-here"] }),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(
        out.stdout.contains("100000") && out.stdout.contains("tomcat-here"),
        "{out:?}"
    );

    // The database's user needs the environment's secret `mysql`, which the tomcats were given
    // too: the operator reads it (a read on the audit trail), and it shows nowhere else.
    let db_id = db.unwrap();
    let secret = |id: ContainerId, name: &'static str| {
        let t = &t;
        async move {
            t.client
                .get::<cloud48_api::ContainerSecret>(&format!("/v1/containers/{id}/secrets/{name}"))
                .await
        }
    };
    let password = secret(db_id, "mysql").await.unwrap().value;
    assert_eq!(password.len(), 32, "{password}");
    assert_eq!(secret(tomcats[1], "mysql").await.unwrap().value, password);
    let e = secret(db_id, "redis").await.unwrap_err().to_string();
    assert!(
        e.contains("receives no secret 'redis'") && e.contains("mysql"),
        "{e}"
    );
    let login = |password: Option<String>| {
        let t = &t;
        let mut command = vec!["mariadb", "-h", "127.0.0.1", "-u", "app", "app"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        command.extend(password.map(|p| format!("--password={p}")));
        command.extend(["-e".into(), "SELECT text FROM greetings".into()]);
        async move {
            t.client
                .post::<_, cloud48_engine::driver::ExecOutput>(
                    &format!("/v1/containers/{db_id}/exec"),
                    &json!({ "command": command }),
                )
                .await
                .unwrap()
        }
    };
    let refused = login(None).await;
    assert!(
        refused.exit_code != 0 && refused.stderr.contains("Access denied"),
        "{refused:?}"
    );
    let admitted = login(Some(password.clone())).await;
    assert!(
        admitted.exit_code == 0 && admitted.stdout.contains("hello from mariadb"),
        "{admitted:?}"
    );
    let shown: serde_json::Value = t
        .client
        .get(&format!("/v1/containers/{db_id}"))
        .await
        .unwrap();
    assert!(!shown.to_string().contains(&password), "{shown}");
    let trail: serde_json::Value = t
        .client
        .get(&format!("/v1/audit?object=/v1/containers/{db_id}/secrets"))
        .await
        .unwrap();
    assert!(!trail.to_string().contains(&password), "{trail}");
    assert!(
        trail
            .to_string()
            .contains(&format!("/v1/containers/{db_id}/secrets/mysql")),
        "{trail}"
    );

    // A tomcat moves cold to the other host with its own files (the datasource its hook
    // wrote): the balancer serves it there, reading the same row.
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", tomcats[1]),
            &json!({ "op": "migrate", "to": "h1" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    assert_eq!(
        container(&t, tomcats[1]).await.server.as_deref(),
        Some("h1")
    );
    eventually("both tomcats serve the row after the migration", || async {
        apps_serve_the_row(&lb_ip, &guests, "hello from mariadb")
            .await
            .then_some(())
    })
    .await;

    // One tomcat stops: every request goes to the other.
    let stop = |id: ContainerId, op: &'static str| {
        let t = &t;
        async move {
            let a: Accepted = t
                .client
                .post(
                    &format!("/v1/containers/{id}/actions"),
                    &json!({ "op": op }),
                )
                .await
                .unwrap();
            t.ok(a.command_id).await;
        }
    };
    stop(tomcats[0], "stop").await;
    eventually("only the running tomcat answers", || async {
        apps_serve_the_row(&lb_ip, &guests[1..], "hello from mariadb")
            .await
            .then_some(())
    })
    .await;
    stop(tomcats[0], "start").await;

    // The database changes its row, then moves cold to the other host: its data goes with it,
    // and the tomcats follow it to its new address.
    let db = db_id;
    let out: cloud48_engine::driver::ExecOutput = t
        .client
        .post(
            &format!("/v1/containers/{db}/exec"),
            &json!({ "command": ["mariadb", "-e", "UPDATE app.greetings SET text = 'kept across the move' WHERE id = 1"] }),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let before = container(&t, db).await.ip;
    let a: Accepted = t
        .client
        .post(
            &format!("/v1/containers/{db}/actions"),
            &json!({ "op": "migrate", "to": "h2" }),
        )
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let moved = container(&t, db).await;
    assert_eq!(moved.server.as_deref(), Some("h2"));
    assert_ne!(moved.ip, before, "another host's subnet, another address");
    eventually("both tomcats read the moved database", || async {
        apps_serve_the_row(&lb_ip, &guests, "kept across the move")
            .await
            .then_some(())
    })
    .await;
}
