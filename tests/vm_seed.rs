//! The seed scenario with its tomcats in virtual machines: MariaDB in an OS container on a
//! linux server, two Tomcats as VMs on two qemu servers of one network, the balancer wherever
//! placement puts it (an OS container, or a VM: every image is in the core's store). Real
//! HTTP through nginx reaches both Tomcats, each reading the database; the hooks' scripts
//! (datasource, upstreams) run unchanged through the guest agent. A Tomcat VM then moves live
//! while a client keeps asking through the balancer: no request fails.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use cloud48_engine::driver::linux::{ImagesConfig, LinuxDriver};
use cloud48_engine::model::{Accepted, ContainerId, ContainerStatus, Resources};
use cloud48_qemu::QemuDriver;
use serde_json::json;

use crate::agent::{TOKEN, serve_agent, serve_agent_on};
use crate::common::{Opts, TestCore, eventually_within};
use crate::real::{apps_serve_the_row, container, running};
use crate::vm::VmSweep;

/// Builds `recipe` (under `images/`) into the core's store, as a VM image when `vm`.
async fn build(t: &TestCore, recipe: &str, vm: bool) {
    let store = t.core.images().clone();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../images")
        .join(recipe);
    tokio::task::spawn_blocking(move || {
        cloud48_engine::images::Builder::new(
            crate::vm::cache_dir(),
            cloud48_engine::images::DEFAULT_MIRROR,
        )
        .vm(vm)
        .build(&path, &store, &mut |_| {})
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
    .await
    .unwrap();
}

/// Asks the balancer at `ip` back to back until stopped; counts answers that come from a
/// tomcat, and keeps every other outcome.
struct Client {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Client {
    fn start(ip: String) -> Client {
        let (stop, answered) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU32::new(0)),
        );
        let (s, a) = (stop.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let mut failed = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match http.get(format!("http://{ip}/")).send().await {
                    Ok(r) if r.status().is_success() => {
                        let text = r.text().await.unwrap_or_default();
                        if text.starts_with("tomcat ") {
                            a.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.push(text);
                        }
                    }
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            failed
        });
        Client {
            stop,
            answered,
            task,
        }
    }

    async fn answers(&self, more: u32) {
        let goal = self.answered.load(Ordering::Relaxed) + more;
        eventually_within(
            "the client's requests are answered",
            Duration::from_secs(60),
            || async { (self.answered.load(Ordering::Relaxed) >= goal).then_some(()) },
        )
        .await;
    }

    async fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failed = self.task.await.unwrap();
        (self.answered.load(Ordering::Relaxed), failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_runs_its_tomcats_in_vms_and_one_moves_live_under_load() {
    let _one = crate::common::HEAVY.lock().await;
    let t = TestCore::start(Opts {
        sim_servers: 0,
        agent_token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    for (recipe, vm) in [
        ("mariadb.toml", false),
        ("nginx.toml", false),
        ("nginx.toml", true),
        ("tomcat.toml", true),
    ] {
        build(&t, recipe, vm).await;
    }
    let dir = crate::common::tempdir();
    let (lp, vp) = (
        crate::linux::unique_prefix('w'),
        crate::linux::unique_prefix('v'),
    );
    let _linux_sweep = crate::linux::Sweep {
        prefix: lp.clone(),
        bridges: vec![format!("{lp}br0")],
    };
    let _vm_sweep = VmSweep::new(dir.path(), &vp);

    // A linux server running images, and two qemu servers on one network (a VM moving live
    // keeps its address); each pulls the images it needs from the core's store.
    let mut linux = crate::linux::config(&dir.path().join("linux"), &lp, 72, 0);
    linux.capacity = Some(Resources {
        cpu_millis: 8000,
        memory_mb: 8192,
        disk_mb: 40_000,
    });
    linux.images = Some(ImagesConfig {
        source: Some(t.core.images().clone()),
        peers: None,
        cache_bytes: None,
        migration_host: None,
    });
    let linux = LinuxDriver::open(linux)
        .await
        .expect("the linux driver opens (root)");
    let (_, url) = serve_agent(&format!("{lp}-0"), Arc::new(linux)).await;
    t.core.agents().add(&url).await.unwrap();
    let mut vms = Vec::new();
    for n in 0..2 {
        let mut c = crate::vm::config(dir.path(), &vp, 73, n, t.core.images().clone());
        c.bridge = format!("{vp}br0");
        c.subnet = "10.242.73.0/24".parse().unwrap();
        // One network, a range of it each.
        c.addresses = Some(
            format!("10.242.73.{}-10.242.73.{}", 10 + 100 * n, 99 + 100 * n)
                .parse()
                .unwrap(),
        );
        c.capacity = Some(Resources {
            cpu_millis: 8000,
            memory_mb: 8192,
            disk_mb: 40_000,
        });
        let d = QemuDriver::open(c).await.expect("the qemu driver opens");
        let name = format!("{vp}-{n}");
        let net = Some(d.network());
        let (_, url) = serve_agent_on(&name, Arc::new(d), net).await;
        t.core.agents().add(&url).await.unwrap();
        vms.push(name);
    }

    // The database on the linux server, a tomcat on each qemu server (the second asks for a
    // balancer).
    let a: Accepted = t
        .client
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let mut tomcats: Vec<ContainerId> = Vec::new();
    let slow = Duration::from_secs(600);
    for (kind, server) in [
        ("mysql", format!("{lp}-0")),
        ("tomcat", vms[0].clone()),
        ("tomcat", vms[1].clone()),
    ] {
        let a: Accepted = t
            .client
            .post(
                "/v1/environments/shop/containers",
                &json!({ "type": kind, "server": server }),
            )
            .await
            .unwrap();
        // A Tomcat VM boots and starts its JVM under TCG here.
        let done = t.core.queue().wait(a.command_id, slow).await.unwrap();
        assert_eq!(
            done.status,
            cloud48_engine::model::CommandStatus::Succeeded,
            "{done:?}"
        );
        if kind == "tomcat" {
            tomcats.push(ContainerId(
                done.result.unwrap()["container_id"].as_i64().unwrap(),
            ));
        }
    }
    let mut guests = Vec::new();
    for id in &tomcats {
        guests.push(container(&t, *id).await.guest_id);
    }
    let lb = eventually_within("a running balancer", slow, || async {
        running(&t, "balancer", &[]).await
    })
    .await;
    let lb_ip = lb.ip.clone().unwrap();
    eventually_within(
        "nginx balances both Tomcat VMs, each reading MariaDB",
        slow,
        || async {
            apps_serve_the_row(&lb_ip, &guests, "hello from mariadb")
                .await
                .then_some(())
        },
    )
    .await;

    // The first Tomcat moves live to the other qemu server while the client asks on.
    let client = Client::start(lb_ip.clone());
    client.answers(5).await;
    let before = container(&t, tomcats[0]).await;
    let a: serde_json::Value = t
        .client
        .post(
            &format!("/v1/containers/{}/actions", tomcats[0]),
            &json!({ "op": "migrate", "live": true, "to": vms[1] }),
        )
        .await
        .unwrap();
    let id = cloud48_engine::model::CommandId(a["command_id"].as_i64().unwrap());
    let done = t.core.queue().wait(id, slow).await.unwrap();
    assert_eq!(
        done.status,
        cloud48_engine::model::CommandStatus::Succeeded,
        "{done:?}"
    );
    client.answers(5).await;
    let (ok, failed) = client.finish().await;
    assert!(
        failed.is_empty(),
        "requests through the balancer failed during the move: {failed:?}"
    );
    assert!(ok > 10, "too few answers to judge: {ok}");
    let after = container(&t, tomcats[0]).await;
    assert_eq!(after.server.as_deref(), Some(vms[1].as_str()));
    assert_eq!(after.ip, before.ip);
    assert_eq!(after.status, ContainerStatus::Running);
    // Both serve the database's row through the balancer again (nginx takes an upstream that
    // was slow to answer during the switch back after its fail timeout).
    eventually_within("both Tomcat VMs serve the row again", slow, || async {
        apps_serve_the_row(&lb_ip, &guests, "hello from mariadb")
            .await
            .then_some(())
    })
    .await;
}
