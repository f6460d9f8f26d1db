//! The Linux driver (needs root): conformance, namespaces, limits, freezer, exec, logs,
//! directory copy between servers, and recovery of guests by a restarted agent. Every test
//! sweeps what its driver made, even when it fails.

use std::path::Path;
use std::time::Duration;

use cloud48_engine::driver::conformance::{self, DriverFactory};
use cloud48_engine::driver::linux::{self, LinuxConfig, LinuxDriver};
use cloud48_engine::driver::{Driver, DriverError, GuestSpec, GuestState};
use cloud48_engine::model::{
    Check, Endpoint, ImageRef, Protocol, Readiness, Resources, Volume, Workload,
};

/// Removes every process, cgroup, namespace and bridge of the drivers `{prefix}{n}` (n < 10)
/// when dropped.
pub struct Sweep {
    pub prefix: String,
    pub bridges: Vec<String>,
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let bridges: Vec<&str> = self.bridges.iter().map(String::as_str).collect();
        for n in 0..10 {
            linux::sweep(&format!("{}{n}", self.prefix), &[]);
        }
        linux::sweep(&self.prefix, &bridges);
    }
}

/// A 4-character prefix no other test run uses; driver `n` of a test uses `{prefix}{n}`, as
/// two drivers on one machine must (they share the machine's cgroups).
pub fn unique_prefix(tag: char) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let tail: String = (0..3)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect();
    format!("{tag}{tail}")
}

/// Server `n` of a test; `net` keeps the subnets of tests running at once apart.
pub fn config(dir: &Path, prefix: &str, net: u32, n: u32) -> LinuxConfig {
    LinuxConfig {
        name: format!("{prefix}-{n}"),
        data_dir: dir.join(format!("server-{n}")),
        bridge: format!("{prefix}br{n}"),
        subnet: format!("10.241.{}.0/24", net + n).parse().unwrap(),
        addresses: None,
        prefix: format!("{prefix}{n}"),
        capacity: Some(Resources {
            cpu_millis: 4000,
            memory_mb: 4096,
            disk_mb: 10_000,
        }),
        stop_grace: Duration::from_secs(3),
        exe: env!("CARGO_BIN_EXE_cloud48").into(),
        images: None,
    }
}

struct LinuxFactory {
    dir: tempfile::TempDir,
    prefix: String,
}

impl DriverFactory for LinuxFactory {
    type Driver = LinuxDriver;
    async fn make(&self, n: u32) -> LinuxDriver {
        LinuxDriver::open(config(self.dir.path(), &self.prefix, 10, n))
            .await
            .expect("the linux driver opens (run the tests as root)")
    }
}

/// What the bundled tomcat declares, in short: an image this driver cannot run and a program
/// the server does not have, an `http` endpoint on 8080, its config volume.
fn tomcat() -> Workload {
    Workload {
        image: Some(ImageRef {
            reference: "cloud48/tomcat".into(),
            digest: None,
        }),
        command: vec!["catalina.sh".into(), "run".into()],
        endpoints: vec![Endpoint {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Http,
        }],
        readiness: Some(Readiness {
            check: Check::Tcp {
                endpoint: "http".into(),
            },
            interval_ms: 100,
            retries: 50,
        }),
        volumes: vec![Volume {
            name: "config".into(),
            path: "/etc/cloud48".into(),
        }],
        ..Workload::default()
    }
}

/// A workload that runs `script` with `sh` on the server's files.
fn shell(script: &str) -> Workload {
    Workload {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Workload::default()
    }
}

fn with(spec: GuestSpec, workload: Workload) -> GuestSpec {
    GuestSpec { workload, ..spec }
}

fn spec(id: &str, type_id: &str) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: id.into(),
        type_id: type_id.into(),
        resources: Resources {
            cpu_millis: 500,
            memory_mb: 128,
            disk_mb: 64,
        },
        ip: None,
        workload: Default::default(),
    }
}

#[tokio::test]
async fn linux_driver_passes_the_conformance_suite() {
    let prefix = unique_prefix('c');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0"), format!("{prefix}br1")],
    };
    let factory = LinuxFactory {
        dir: crate::common::tempdir(),
        prefix,
    };
    let failures = conformance::run(&factory).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

async fn exec(d: &LinuxDriver, guest: &str, script: &str) -> String {
    let out = d.exec(guest, script, &[]).await.unwrap();
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    out.stdout.trim().to_string()
}

#[tokio::test]
async fn a_linux_container_is_isolated_limited_and_serves_http() {
    let prefix = unique_prefix('l');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0"), format!("{prefix}br1")],
    };
    let dir = crate::common::tempdir();
    let d = LinuxDriver::open(config(dir.path(), &prefix, 20, 0))
        .await
        .unwrap();
    let info = d
        .create(&with(spec("web-1", "tomcat@1.0.0"), tomcat()))
        .await
        .unwrap();
    let ip = info.ip.clone().unwrap();
    assert!(
        ip.starts_with("10.241.20."),
        "address from the driver's subnet: {ip}"
    );
    d.start("web-1").await.unwrap();

    // Real HTTP from the host to the container's own address.
    let body = reqwest::get(format!("http://{ip}:8080/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        body.trim(),
        "web-1",
        "the stand-in for the tomcat image answers with its container id"
    );

    // Namespaces: own hostname, own PID 1, only its own eth0 address, private /tmp.
    assert_eq!(exec(&d, "web-1", "hostname").await, "web-1");
    assert_eq!(
        exec(&d, "web-1", "cat /proc/1/comm").await,
        "sh",
        "PID 1 is the guest's init"
    );
    let addrs = exec(&d, "web-1", "ip -4 -o addr show").await;
    assert!(
        addrs.contains(&ip) && !addrs.contains("10.241.20.1/"),
        "{addrs}"
    );
    exec(&d, "web-1", "echo secret > /tmp/private").await;
    assert!(
        !Path::new("/tmp/private").exists()
            || std::fs::read_to_string("/tmp/private").unwrap().trim() != "secret",
        "/tmp is private"
    );

    // Private directory: a script writes /etc/cloud48 inside, the file lands in the guest's dir.
    let out = d
        .exec(
            "web-1",
            "mkdir -p /etc/cloud48 && echo \"$1\" > /etc/cloud48/datasource",
            &["jdbc:mysql://db".into()],
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let copy = dir
        .path()
        .join("server-0/guests/web-1/fs/etc/cloud48/datasource");
    assert_eq!(
        std::fs::read_to_string(&copy).unwrap().trim(),
        "jdbc:mysql://db"
    );

    // Exit codes and stderr come back.
    let failed = d.exec("web-1", "echo oops >&2; exit 3", &[]).await.unwrap();
    assert_eq!((failed.exit_code, failed.stderr.trim()), (3, "oops"));

    // Limits through cgroups.
    let mem = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .find_map(|root| {
            let base = Path::new(root).join(format!("{prefix}0")).join("web-1");
            std::fs::read_to_string(base.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(base.join("memory.max")))
                .ok()
        })
        .expect("a memory limit file");
    assert_eq!(mem.trim().parse::<u64>().unwrap(), 128 << 20);

    // The freezer suspends: no answer while frozen, answers again after resume.
    d.suspend("web-1").await.unwrap();
    assert_eq!(
        d.status("web-1").await.unwrap().unwrap().state,
        GuestState::Suspended
    );
    let frozen = reqwest::Client::new()
        .get(format!("http://{ip}:8080/"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(frozen.is_err(), "a frozen container does not answer");
    d.resume("web-1").await.unwrap();
    let body = reqwest::get(format!("http://{ip}:8080/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.trim(), "web-1");

    // Logs of the main process.
    assert!(
        d.logs("web-1")
            .await
            .unwrap()
            .contains("guest-http: answering on 0.0.0.0:8080")
    );

    // Real load figures.
    let stats = d.stats().await.unwrap();
    let used = stats.used.expect("the linux driver measures");
    assert!(used.memory_mb > 0 || stats.guests == 1, "{stats:?}");
    assert_eq!(stats.allocated.memory_mb, 128);

    // A restarted agent finds its guest running.
    let again = LinuxDriver::open(config(dir.path(), &prefix, 20, 0))
        .await
        .unwrap();
    assert_eq!(
        again.status("web-1").await.unwrap().unwrap().state,
        GuestState::Running
    );

    // Stop ends every process of the container, also those its scripts left behind.
    exec(
        &d,
        "web-1",
        "nohup sh -c 'trap \"\" TERM; while :; do sleep 1; done' >/dev/null 2>&1 &",
    )
    .await;
    assert!(
        exec(&d, "web-1", "ps -e -o comm=")
            .await
            .lines()
            .filter(|l| *l == "sh")
            .count()
            >= 2,
        "the stubborn shell runs"
    );
    d.stop("web-1").await.unwrap();
    assert_eq!(
        d.status("web-1").await.unwrap().unwrap().state,
        GuestState::Stopped
    );
    assert!(
        procs(&format!("{prefix}0"), "web-1").is_empty(),
        "no process of the container is left"
    );

    // Cold migration: the directory moves to another server and the container runs there.
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&format!("{prefix}0-")),
        "stop removes the namespace"
    );
    let image = d.export("web-1").await.unwrap();
    let target = LinuxDriver::open(config(dir.path(), &prefix, 20, 1))
        .await
        .unwrap();
    let moved = target
        .import(&with(spec("web-1", "tomcat@1.0.0"), tomcat()), &image)
        .await
        .unwrap();
    target.start("web-1").await.unwrap();
    let moved_ip = moved.ip.unwrap();
    assert!(
        moved_ip.starts_with("10.241.21."),
        "an address of the target's subnet: {moved_ip}"
    );
    assert_eq!(
        exec(&target, "web-1", "cat /etc/cloud48/datasource").await,
        "jdbc:mysql://db",
        "the private directory came along"
    );
    d.destroy("web-1").await.unwrap();
    assert!(
        !dir.path().join("server-0/guests/web-1").exists(),
        "destroy removes the directory"
    );
    target.teardown().await;
    d.teardown().await;
}

fn procs(group: &str, guest: &str) -> String {
    std::fs::read_to_string(format!("/sys/fs/cgroup/pids/{group}/{guest}/cgroup.procs"))
        .or_else(|_| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{group}/{guest}/cgroup.procs"))
        })
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test]
async fn stop_is_graceful_then_forced() {
    let prefix = unique_prefix('s');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    let cfg = config(dir.path(), &prefix, 50, 0);
    // One main process leaves a mark when SIGTERM reaches it; the other ignores SIGTERM. Each
    // says when its trap is set, so the test does not stop it before.
    let workloads = [
        (
            "polite",
            shell("trap 'echo got-term; exit 0' TERM; echo trapped; while :; do sleep 0.1; done"),
        ),
        (
            "stubborn",
            shell("trap '' TERM; echo trapped; while :; do sleep 0.1; done"),
        ),
    ];
    let d = LinuxDriver::open(cfg).await.unwrap();
    for (id, workload) in workloads {
        d.create(&with(spec(id, id), workload)).await.unwrap();
        d.start(id).await.unwrap();
        crate::common::eventually("the trap is set", || async {
            d.logs(id).await.unwrap().contains("trapped").then_some(())
        })
        .await;
    }
    d.stop("polite").await.unwrap();
    assert!(
        d.logs("polite").await.unwrap().contains("got-term"),
        "the main process was asked to stop"
    );
    d.stop("stubborn").await.unwrap();
    for id in ["polite", "stubborn"] {
        assert_eq!(
            d.status(id).await.unwrap().unwrap().state,
            GuestState::Stopped
        );
        assert!(
            procs(&format!("{prefix}0"), id).is_empty(),
            "{id}: no process is left"
        );
    }
    d.teardown().await;
}

/// A guest a start launched but did not see ready (the agent restarted while it waited) is
/// started, when asked again, only once its workload is ready, as a launch is: the second
/// start returned at once, and a create was reported done seconds before Tomcat answered.
#[tokio::test]
async fn starting_a_guest_that_runs_but_is_not_ready_waits_for_its_readiness() {
    let prefix = unique_prefix('r');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    let d = std::sync::Arc::new(
        LinuxDriver::open(config(dir.path(), &prefix, 60, 0))
            .await
            .unwrap(),
    );
    let script = format!(
        "sleep 4; exec {} guest-http --listen 0.0.0.0:8080 --answer late",
        env!("CARGO_BIN_EXE_cloud48")
    );
    let workload = Workload {
        endpoints: vec![Endpoint {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Http,
        }],
        readiness: Some(Readiness {
            check: Check::Tcp {
                endpoint: "http".into(),
            },
            interval_ms: 100,
            retries: 200,
        }),
        ..shell(&script)
    };
    let info = d
        .create(&with(spec("late", "late"), workload))
        .await
        .unwrap();
    let ip = info.ip.unwrap();
    // The first start is cut off once its guest runs, while it waits for readiness.
    let first = tokio::spawn({
        let d = d.clone();
        async move { d.start("late").await }
    });
    crate::common::eventually("the guest runs", || async {
        (d.status("late").await.unwrap()?.state == GuestState::Running).then_some(())
    })
    .await;
    first.abort();
    d.start("late").await.unwrap();
    let body = reqwest::get(format!("http://{ip}:8080/"))
        .await
        .expect("ready once start returned")
        .text()
        .await
        .unwrap();
    assert_eq!(body.trim(), "late");
    d.teardown().await;
}

/// A started guest has its private directories mounted: nothing run in it right after start
/// writes to the server's own `/etc` (an exec that joined before the init's mounts wrote to the
/// server's /etc/cloud48, then found its file hidden by the guest's directory).
#[tokio::test]
async fn exec_right_after_start_sees_the_guest_s_own_directories() {
    let prefix = unique_prefix('m');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    let d = LinuxDriver::open(config(dir.path(), &prefix, 60, 0))
        .await
        .unwrap();
    for i in 0..6 {
        let id = format!("m-{i}");
        d.create(&with(spec(&id, "plain"), shell("exec sleep 1000")))
            .await
            .unwrap();
        d.start(&id).await.unwrap();
        let mounted = exec(
            &d,
            &id,
            "grep -c ' /etc/cloud48 ' /proc/self/mountinfo; echo mine > /etc/cloud48/whose",
        )
        .await;
        assert_eq!(mounted, "1", "{id}: its /etc/cloud48 is its own at once");
        let own = dir
            .path()
            .join(format!("server-0/guests/{id}/fs/etc/cloud48/whose"));
        assert_eq!(std::fs::read_to_string(own).unwrap(), "mine\n", "{id}");
    }
    d.teardown().await;
}

#[tokio::test]
async fn linux_driver_refuses_what_it_cannot_do() {
    let prefix = unique_prefix('r');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    let cfg = config(dir.path(), &prefix, 30, 0);
    let d = LinuxDriver::open(cfg).await.unwrap();
    // A workload with no image whose program the server lacks does not start.
    let missing = Workload {
        command: vec!["c48-missing-program".into()],
        ..Workload::default()
    };
    d.create(&with(spec("ghost-1", "ghost"), missing))
        .await
        .unwrap();
    let err = d.start("ghost-1").await.unwrap_err().to_string();
    assert!(
        err.contains("c48-missing-program is not installed on server"),
        "a missing package is named: {err}"
    );
    // Concurrent creates never share an address.
    let d = std::sync::Arc::new(d);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let d = d.clone();
        let small = GuestSpec {
            resources: Resources {
                cpu_millis: 10,
                memory_mb: 8,
                disk_mb: 8,
            },
            ..spec(&format!("par-{i}"), "plain")
        };
        set.spawn(async move { d.create(&small).await.unwrap().ip.unwrap() });
    }
    let mut ips = Vec::new();
    while let Some(ip) = set.join_next().await {
        ips.push(ip.unwrap());
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "eight creates, eight addresses");
    let bad = d.create(&spec("../etc", "plain")).await.unwrap_err();
    assert!(
        bad.to_string().contains("must be 1-128 characters"),
        "{bad}"
    );
    d.create(&spec("idle", "plain")).await.unwrap();
    let err = d.exec("idle", "true", &[]).await.unwrap_err();
    assert!(
        matches!(err, DriverError::InvalidState { .. }),
        "exec in a stopped guest: {err:?}"
    );
    assert!(matches!(
        d.logs("ghost").await,
        Err(DriverError::NotFound(_))
    ));
    let mut cfg = config(dir.path(), &prefix, 30, 0);
    cfg.prefix = "Bad P".into();
    assert!(
        LinuxDriver::open(cfg)
            .await
            .err()
            .unwrap()
            .contains("prefix")
    );
    d.teardown().await;
}

/// What `ip -j` says about interface `name`: its MAC address and its IPv4 addresses (`A/P`);
/// `None` when there is no such interface.
pub fn interface(name: &str) -> Option<(String, Vec<String>)> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-4", "addr", "show", "dev", name])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = &shown[0];
    let addrs = link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
                .collect()
        })
        .unwrap_or_default();
    let mac = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", name])
        .output()
        .unwrap();
    let mac: serde_json::Value = serde_json::from_slice(&mac.stdout).unwrap();
    Some((mac[0]["address"].as_str().unwrap().to_string(), addrs))
}

/// Regression (an operator's trial): an agent given an existing interface that is not a
/// bridge (a veth; the host's eth0) as its bridge gave it the bridge's MAC address and the
/// gateway address of its subnet. The driver, and the agent's taking of its bridge, refuse
/// it naming its kind, and change nothing.
#[tokio::test]
async fn an_interface_that_is_not_a_bridge_is_refused_unchanged() {
    let prefix = unique_prefix('v');
    let veth = format!("{prefix}v0");
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![veth.clone()],
    };
    let made = std::process::Command::new("ip")
        .args(["link", "add", &veth, "type", "veth", "peer", "name"])
        .arg(format!("{prefix}v1"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let before = interface(&veth).expect("the veth exists");
    let dir = crate::common::tempdir();
    let mut cfg = config(dir.path(), &prefix, 204, 0);
    cfg.bridge = veth.clone();
    let said = format!(
        "--bridge {veth} is an existing interface that is not a bridge (veth); give the name of a bridge for the agent to own, or a new name and the agent creates it"
    );
    let err = LinuxDriver::open(cfg.clone()).await.err().expect("refused");
    assert!(err.contains(&said), "{err}");
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let err = linux::network::take_bridge(&cfg.data_dir, &veth, &cfg.subnet, &cfg.prefix)
        .await
        .expect_err("refused");
    assert_eq!(err, said);
    assert_eq!(interface(&veth), Some(before), "the veth is as it was");
    assert!(
        !cfg.data_dir.join(linux::network::BRIDGES_RECORD).exists(),
        "nothing recorded"
    );
}
