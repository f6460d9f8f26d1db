//! A lab of real servers on one machine, for end-to-end tests and benchmarks (needs root): a
//! LAN bridge in the current network namespace and one namespace per host, each running a node
//! agent with the linux driver and its own container subnet, routed through its LAN address.
//!
//! Invariants: dropping the lab kills its agents and removes every process, cgroup, namespace,
//! interface, route, mount and file it made, even after a failure; one lab exists on a machine at a time
//! (they share the LAN's addresses and routes): `Lab::new` waits for an exclusive lock on a
//! file that the lab holds until it is gone.

use std::path::PathBuf;
use std::process::Stdio;

/// Address of the core on the lab's LAN.
pub const CORE_IP: [u8; 4] = [10, 242, 0, 1];

/// The lab.
pub struct Lab {
    prefix: String,
    hosts: u32,
    dir: tempfile::TempDir,
    exe: PathBuf,
    token: String,
    agents: Vec<Option<tokio::process::Child>>,
    /// Held (locked) while the lab exists; released after `drop` cleaned up.
    _exclusive: std::fs::File,
    /// Heartbeat period of the agents, ms.
    pub heartbeat_ms: u64,
    /// Whether the agents run their containers' images (pulled from the core) rather than
    /// stand-ins on the host's files.
    pub images: bool,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (apt-get install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The LAN address of host `i` (1-based).
pub fn lan_ip(i: u32) -> String {
    format!("10.242.0.{}", 10 + i)
}

/// The container subnet of host `i`.
pub fn subnet(i: u32) -> String {
    format!("10.243.{i}.0/24")
}

impl Lab {
    /// Builds the network of `hosts` hosts; `prefix` (4 characters of a-z0-9) names everything
    /// the lab makes; agents run `exe` and present `token`.
    pub fn new(prefix: &str, hosts: u32, exe: PathBuf, token: &str) -> Result<Lab, String> {
        let path = std::env::temp_dir().join("cloud48-lab.lock");
        let exclusive = std::fs::File::create(&path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        let lab = Lab {
            _exclusive: exclusive,
            prefix: prefix.into(),
            hosts,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            exe,
            token: token.into(),
            agents: (0..hosts).map(|_| None).collect(),
            heartbeat_ms: 500,
            images: false,
        };
        let lan = format!("{prefix}lan");
        // Leftovers of a run that was killed before it could clean up.
        for i in 1..=hosts {
            cloud48_engine::driver::linux::sweep(&format!("{prefix}{i}"), &[]);
            let _ = ip(&["netns", "del", &lab.netns(i)]);
        }
        let _ = ip(&["link", "del", &lan]);
        ip(&["link", "add", &lan, "type", "bridge"])?;
        ip(&["addr", "add", "10.242.0.1/24", "dev", &lan])?;
        ip(&["link", "set", &lan, "up"])?;
        for i in 1..=hosts {
            let ns = lab.netns(i);
            let (outer, inner) = (format!("{prefix}h{i}a"), format!("{prefix}h{i}b"));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &outer, "master", &lan, "up"])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lan_ip(i)),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["route", "replace", &subnet(i), "via", &lan_ip(i)])?;
            for j in (1..=hosts).filter(|j| *j != i) {
                ip(&["-n", &ns, "route", "replace", &subnet(j), "via", &lan_ip(j)])?;
            }
        }
        Ok(lab)
    }

    fn netns(&self, i: u32) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// Starts (or restarts) the agent of host `i`, named `h{i}`, reporting to `core_url`.
    pub fn start_agent(&mut self, i: u32, core_url: &str) -> Result<(), String> {
        let data = self.agent_dir(i);
        // nsenter, not `ip netns exec`, which would remount /sys without the cgroup trees.
        let child = tokio::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns(i)))
            .arg("--")
            .arg(&self.exe)
            .args(["agent", "--driver", "linux"])
            .args(["--images", if self.images { "on" } else { "off" }])
            .args([
                "--listen",
                &format!("{}:7048", lan_ip(i)),
                "--core",
                core_url,
                "--name",
                &format!("h{i}"),
            ])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--subnet",
                &subnet(i),
                "--bridge",
                "c48br",
                "--prefix",
                &format!("{}{i}", self.prefix),
            ])
            .args([
                "--heartbeat-ms",
                &self.heartbeat_ms.to_string(),
                "--capacity",
                "8000,8192,20000",
                "--stop-grace-ms",
                "2000",
            ])
            .env("CLOUD48_AGENT_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("cannot start the agent of h{i} (nsenter is in util-linux): {e}")
            })?;
        self.agents[(i - 1) as usize] = Some(child);
        Ok(())
    }

    /// Starts the agents of hosts 3 and 4, waits until `core` has them up, then those of hosts 1
    /// and 2. Registered first, h3 and h4 get the lower ids and win ties, so a balancer that a
    /// tomcat on h1 or h2 asks for (before that tomcat's own reservation counts) lands on a
    /// host of its own.
    pub async fn start_agents_for_the_seed(
        &mut self,
        core: &cloud48_engine::Core,
        core_url: &str,
    ) -> Result<(), String> {
        for (hosts, total) in [([3, 4], 2), ([1, 2], 4)] {
            for i in hosts {
                self.start_agent(i, core_url)?;
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let servers = core.servers().list().await.map_err(|e| e.to_string())?;
                if servers
                    .iter()
                    .filter(|s| s.status == cloud48_engine::model::ServerStatus::Up)
                    .count()
                    >= total
                {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "the agents of hosts {hosts:?} did not register within 30 s"
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// The process id of host `i`'s agent, while it runs (nsenter executes the agent in its
    /// own process).
    pub fn agent_pid(&self, i: u32) -> Option<u32> {
        self.agents[(i - 1) as usize].as_ref()?.id()
    }

    /// The data directory of host `i`'s agent.
    pub fn agent_dir(&self, i: u32) -> PathBuf {
        self.dir.path().join(format!("h{i}"))
    }

    /// kill -9 of host `i`'s agent (its containers keep running, as on a real server).
    pub async fn kill_agent(&mut self, i: u32) {
        if let Some(mut child) = self.agents[(i - 1) as usize].take() {
            let _ = child.kill().await;
        }
    }

    /// Plugs or unplugs host `i`'s network cable.
    pub fn cable(&self, i: u32, up: bool) -> Result<(), String> {
        ip(&[
            "link",
            "set",
            &format!("{}h{i}a", self.prefix),
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Kill the agents and wait for them, so none starts a process after the sweep.
        for mut child in self.agents.drain(..).flatten() {
            let _ = child.start_kill();
            for _ in 0..200 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        for i in 1..=self.hosts {
            cloud48_engine::driver::linux::sweep(&format!("{}{i}", self.prefix), &[]);
            let _ = ip(&["route", "del", &subnet(i)]);
            let _ = ip(&["netns", "del", &self.netns(i)]);
        }
        let _ = ip(&["link", "del", &format!("{}lan", self.prefix)]);
        // The agents' guests' roots stay mounted when the agents are killed; unmounted, the
        // lab's directory can be removed as it drops.
        if let Err(e) = cloud48_engine::driver::linux::unmount_under(self.dir.path()) {
            eprintln!("lab: {e}");
        }
    }
}

/// What `n` HTTP requests to `http://{ip}/` answered (`None` for a failed request).
pub async fn answers(ip: &str, n: usize) -> Vec<Option<String>> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .expect("an HTTP client builds");
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(match client.get(format!("http://{ip}/")).send().await {
            Ok(resp) if resp.status().is_success() => {
                resp.text().await.ok().map(|s| s.trim().to_string())
            }
            _ => None,
        });
    }
    out
}

/// True when 8 requests through the balancer at `ip` all succeed, only `guests` answer, and
/// every one of them does.
pub async fn serves_all(ip: &str, guests: &[String]) -> bool {
    let got = answers(ip, 8).await;
    got.iter()
        .all(|g| g.as_ref().is_some_and(|g| guests.contains(g)))
        && guests
            .iter()
            .all(|g| got.iter().any(|a| a.as_ref() == Some(g)))
}
