//! End to end on real servers: a core and four node agents (linux driver), each agent in its
//! own network namespace as a separate host; real nginx balances real HTTP between two
//! tomcats; agent crash and network cut fail the balancer over to another host, and the
//! collector removes the illegal balancer when the host comes back. Needs root and nginx.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cloud48_core::model::Accepted;
use cloud48_core::core::HealthConfig;
use cloud48_core::model::{Container, ContainerStatus, Environment};
use serde_json::json;

use crate::agent::TOKEN;
use crate::common::{Opts, TestCore, eventually};
use crate::linux::{Sweep, unique_prefix};

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("iproute2 is installed");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The lab: a LAN bridge in this namespace and one namespace per host, each with its own
/// container subnet routed through its LAN address.
struct Lab {
    prefix: String,
    hosts: u32,
    dir: tempfile::TempDir,
    agents: Vec<Option<tokio::process::Child>>,
    core_url: String,
}

fn lan_ip(i: u32) -> String {
    format!("10.242.0.{}", 10 + i)
}

fn subnet(i: u32) -> String {
    format!("10.243.{i}.0/24")
}

impl Lab {
    fn new(prefix: &str, hosts: u32) -> Lab {
        let lan = format!("{prefix}lan");
        ip(&["link", "add", &lan, "type", "bridge"]);
        ip(&["addr", "add", "10.242.0.1/24", "dev", &lan]);
        ip(&["link", "set", &lan, "up"]);
        for i in 1..=hosts {
            let ns = format!("{prefix}-h{i}");
            let (outer, inner) = (format!("{prefix}h{i}a"), format!("{prefix}h{i}b"));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &outer, "master", &lan, "up"]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", lan_ip(i)), "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["route", "add", &subnet(i), "via", &lan_ip(i)]);
            for j in (1..=hosts).filter(|j| *j != i) {
                ip(&["-n", &ns, "route", "add", &subnet(j), "via", &lan_ip(j)]);
            }
        }
        Lab { prefix: prefix.into(), hosts, dir: tempfile::tempdir().unwrap(), agents: (0..hosts).map(|_| None).collect(), core_url: String::new() }
    }

    /// Starts (or restarts) the agent of host `i`.
    fn start_agent(&mut self, i: u32) {
        let ns = format!("{}-h{i}", self.prefix);
        let data = self.dir.path().join(format!("h{i}"));
        // nsenter, not `ip netns exec`, which would remount /sys without the cgroup trees.
        let child = tokio::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["--", env!("CARGO_BIN_EXE_cloud48"), "agent", "--driver", "linux"])
            .args(["--listen", &format!("{}:7048", lan_ip(i)), "--core", &self.core_url, "--name", &format!("h{i}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--subnet", &subnet(i), "--bridge", "c48br", "--prefix", &format!("{}{i}", self.prefix), "--heartbeat-ms", "200"])
            .args(["--capacity", "8000,8192,20000", "--stop-grace-ms", "2000"])
            .env("CLOUD48_AGENT_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the agent starts");
        self.agents[(i - 1) as usize] = Some(child);
    }

    /// kill -9 of host `i`'s agent (its containers keep running).
    async fn kill_agent(&mut self, i: u32) {
        let mut child = self.agents[(i - 1) as usize].take().expect("the agent runs");
        child.kill().await.unwrap();
    }

    fn cable(&self, i: u32, up: bool) {
        ip(&["link", "set", &format!("{}h{i}a", self.prefix), if up { "up" } else { "down" }]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.agents.clear();
        let lan = format!("{}lan", self.prefix);
        let _sweep = Sweep { prefix: self.prefix.clone(), bridges: vec![lan] };
        for i in 1..=self.hosts {
            let _ = std::process::Command::new("ip").args(["route", "del", &subnet(i)]).output();
            let _ = std::process::Command::new("ip").args(["netns", "del", &format!("{}-h{i}", self.prefix)]).output();
        }
    }
}

async fn members(t: &TestCore) -> Vec<Container> {
    let env: Environment = t.client.get("/v1/environments/shop").await.unwrap();
    env.members
}

async fn running(t: &TestCore, type_name: &str, not: &[i64]) -> Option<Container> {
    members(t).await.into_iter().find(|m| m.type_id.starts_with(type_name) && m.status == ContainerStatus::Running && !not.contains(&m.id))
}

async fn container(t: &TestCore, id: i64) -> Container {
    t.client.get(&format!("/v1/containers/{id}")).await.unwrap()
}

/// Which tomcats answer through the balancer at `ip`, in `n` requests (failed requests count
/// as `None`).
async fn answers(ip: &str, n: usize) -> Vec<Option<String>> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = client.get(format!("http://{ip}/")).send().await;
        out.push(match r {
            Ok(resp) if resp.status().is_success() => resp.text().await.ok().map(|s| s.trim().to_string()),
            _ => None,
        });
    }
    out
}

/// Waits until the balancer at `ip` serves every one of `guests` (and nothing else).
async fn serves_all(ip: &str, guests: &[String]) {
    eventually(&format!("the balancer at {ip} serves {guests:?}"), || async {
        let got = answers(ip, 8).await;
        let all_ok = got.iter().all(|g| g.as_ref().is_some_and(|g| guests.contains(g)));
        let every = guests.iter().all(|g| got.iter().any(|a| a.as_ref() == Some(g)));
        (all_ok && every).then_some(())
    })
    .await;
}

/// Waits for a replacement balancer (not one of `old`) on a host other than `not_on`, serving
/// both tomcats; returns it and the time it took.
async fn replacement(t: &TestCore, old: &[i64], not_on: &str, tomcats: &[String], since: Instant) -> (Container, Duration) {
    let lb = eventually("a replacement balancer", || async { running(t, "balancer", old).await }).await;
    assert_ne!(lb.server.as_deref(), Some(not_on), "the replacement is on another host");
    serves_all(lb.ip.as_deref().unwrap(), tomcats).await;
    (lb, since.elapsed())
}

async fn collected(t: &TestCore, id: i64) {
    eventually(&format!("the illegal balancer {id} is collected"), || async {
        (container(t, id).await.status == ContainerStatus::Destroyed).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nginx_balances_real_traffic_and_fails_over_between_hosts() {
    let prefix = unique_prefix('e');
    let mut lab = Lab::new(&prefix, 4);
    let health = HealthConfig { background: true, collector: Duration::from_secs(3600), ..Default::default() };
    let opts = Opts { sim_servers: 0, agent_token: Some(TOKEN.into()), health, listen: Some(([10, 242, 0, 1], 0).into()), ..Default::default() };
    let t = TestCore::start(opts).await.unwrap();
    lab.core_url = t.url.clone();
    // h3 and h4 register first: with lower ids they win ties, so the balancer, which its
    // tomcat may ask for before that tomcat's own reservation counts, lands on a host of its own.
    for (hosts, total) in [([3, 4], 2), ([1, 2], 4)] {
        for i in hosts {
            lab.start_agent(i);
        }
        eventually("the agents register and are up", || async {
            let servers = t.core.servers().list().await.unwrap();
            (servers.iter().filter(|s| s.status == cloud48_core::model::ServerStatus::Up).count() == total).then_some(())
        })
        .await;
    }

    // The seed environment: two tomcats on h1 and h2; the second asks for a balancer.
    let a: Accepted = t.client.post("/v1/environments", &json!({ "name": "shop" })).await.unwrap();
    t.ok(a.command_id).await;
    let mut tomcats = Vec::new();
    for host in ["h1", "h2"] {
        let a: Accepted = t.client.post("/v1/environments/shop/containers", &json!({ "type": "tomcat", "server": host })).await.unwrap();
        tomcats.push(t.created(a.command_id).await);
    }
    let guests: Vec<String> = {
        let mut g = Vec::new();
        for id in &tomcats {
            g.push(container(&t, *id).await.guest_id);
        }
        g
    };
    let lb = eventually("a running balancer", || async { running(&t, "balancer", &[]).await }).await;
    let lb_host = lb.server.clone().unwrap();
    assert!(lb_host == "h3" || lb_host == "h4", "placement put the balancer on an empty host, not {lb_host}");
    serves_all(lb.ip.as_deref().unwrap(), &guests).await;

    // One tomcat stops: all traffic goes to the other.
    let a: Accepted = t.client.post(&format!("/v1/containers/{}/actions", tomcats[0]), &json!({ "op": "stop" })).await.unwrap();
    t.ok(a.command_id).await;
    let got = answers(lb.ip.as_deref().unwrap(), 6).await;
    assert!(got.iter().all(|g| g.as_deref() == Some(guests[1].as_str())), "only the running tomcat answers: {got:?}");
    let a: Accepted = t.client.post(&format!("/v1/containers/{}/actions", tomcats[0]), &json!({ "op": "start" })).await.unwrap();
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
    lab.start_agent(lb_index);
    collected(&t, lb.id).await;
    for id in &tomcats {
        assert_eq!(container(&t, *id).await.status, ContainerStatus::Running);
    }
    serves_all(lb2.ip.as_deref().unwrap(), &guests).await;

    // The new balancer's host loses its network: failover again, to the empty host.
    let lb2_host = lb2.server.clone().unwrap();
    let lb2_index: u32 = lb2_host[1..].parse().unwrap();
    let cut = Instant::now();
    lab.cable(lb2_index, false);
    let (lb3, took) = replacement(&t, &[lb.id, lb2.id], &lb2_host, &guests, cut).await;
    eprintln!("failover after network cut: {} ms", took.as_millis());
    lab.cable(lb2_index, true);
    collected(&t, lb2.id).await;
    serves_all(lb3.ip.as_deref().unwrap(), &guests).await;

    // Operator views: logs and exec through the CLI.
    let (ok, out, err) = crate::common::cli(&t.url, &["container", "exec", &lb3.id.to_string(), "--", "cat", "/etc/nginx/conf.d/cloud48-upstreams.conf"]);
    assert!(ok, "{err}");
    let tomcat_ips: Vec<String> = {
        let mut v = Vec::new();
        for id in &tomcats {
            v.push(container(&t, *id).await.ip.unwrap());
        }
        v
    };
    assert!(tomcat_ips.iter().all(|ip| out.contains(&format!("server {ip}:8080;"))), "nginx has both upstreams: {out}");
    let (ok, out, err) = crate::common::cli(&t.url, &["container", "logs", &tomcats[0].to_string()]);
    assert!(ok && out.contains("guest-http: answering"), "{out} {err}");
    let (ok, out, _) = crate::common::cli(&t.url, &["server", "list"]);
    assert!(ok && out.contains("h4") && out.contains("remote"), "{out}");
}
