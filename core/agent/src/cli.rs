//! `cloud48-agent` (alias `cloud48 agent`: the node agent of one server) and `guest-http` (the small HTTP
//! server that stands in for workloads whose image a server cannot run).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use cloud48_driver::Driver;
use cloud48_driver::sim::{SimLatency, SimServer};
use cloud48_linux::network::{TakenBridge, take_bridge};
use cloud48_linux::{ImagesConfig, LinuxConfig, LinuxDriver};
use cloud48_model::Resources;

use crate::AgentService;
use crate::images::CoreImages;
use crate::protocol::AgentInfo;

/// Which driver the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentDriver {
    /// OS containers: namespaces, cgroups, a veth on the agent's bridge (needs root).
    Linux,
    /// Virtual machines: QEMU with KVM or TCG, a tap on the agent's bridge (needs root).
    Qemu,
    /// Simulated containers (no privileges needed).
    Sim,
}

/// Whether a linux agent runs its containers' images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImagesMode {
    /// When runc is installed.
    Auto,
    /// Always (refuses to start without runc).
    On,
    /// Never: every workload runs on the server's own files.
    Off,
}

/// Options of `cloud48 agent`.
#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// Driver of this server.
    #[arg(long, value_enum, default_value = "linux")]
    pub driver: AgentDriver,
    /// Address to listen on for the core.
    #[arg(long, default_value = "127.0.0.1:7048")]
    pub listen: String,
    /// URL of the core, for registration and heartbeats (e.g. http://10.0.0.1:4848); several
    /// cores on one database: their URLs, comma-separated or the flag repeated. Heartbeats go
    /// to the first that answers, and the agent learns the cluster's other cores from them.
    #[arg(long, value_delimiter = ',')]
    pub core: Vec<String>,
    /// Token shared with the core (the core's agents.token).
    #[arg(long, env = "CLOUD48_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Server name [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// This agent replaces the one the server of --name was run by (another data directory):
    /// that agent's guests are gone, and the core fails and replaces the containers it held.
    /// Without it, the core refuses an agent whose data directory is not the server's.
    #[arg(long)]
    pub take_over: bool,
    /// URL the core reaches this agent at [default: http://LISTEN].
    #[arg(long)]
    pub url: Option<String>,
    /// Label of this server for placement (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Directory for the containers' directories and records.
    #[arg(long, default_value = "./cloud48-agent")]
    pub data_dir: PathBuf,
    /// Subnet of the containers (linux: the bridge takes its first address; sim: the addresses
    /// its simulated guests get).
    #[arg(long, default_value = "10.48.0.0/24")]
    pub subnet: String,
    /// Qemu and linux drivers: the range of --subnet this server gives its guests, as
    /// FIRST-LAST (e.g. 10.48.0.10-10.48.0.99) [default: all of it]. Servers sharing a network
    /// (one --subnet and bridge on one layer-2 segment, so that a VM or container moving live
    /// between them keeps its address) each give a range no other gives; the core refuses
    /// overlapping ones.
    #[arg(long, value_name = "FIRST-LAST")]
    pub addresses: Option<String>,
    /// Linux driver: bridge the containers join.
    #[arg(long, default_value = "c48br0")]
    pub bridge: String,
    /// Linux driver: prefix (1-5 of a-z0-9) of namespaces, interfaces and the parent cgroup;
    /// distinct for every agent on one machine.
    #[arg(long, default_value = "c48")]
    pub prefix: String,
    /// Capacity offered, as CPU_MILLIS,MEMORY_MB,DISK_MB [default: the machine's; sim
    /// driver: 16 cores, 64 GiB, 1 TB].
    #[arg(long, value_name = "CPU,MEM,DISK")]
    pub capacity: Option<String>,
    /// Linux driver: how long a stop waits after SIGTERM before SIGKILL, ms (qemu driver: how
    /// long a VM may take to power off before QEMU is ended; at least 15 s).
    #[arg(long, default_value_t = 5000)]
    pub stop_grace_ms: u64,
    /// Period of heartbeats to the core, ms (at most half the cores' grace period,
    /// health.grace_ms: the core refuses an agent that beats less often).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub heartbeat_ms: u64,
    /// Linux driver: whether containers run their type's image on their own root (under
    /// runc, pulled from the core) or on this server's files.
    #[arg(long, value_enum, default_value = "auto")]
    pub images: ImagesMode,
    /// Most MiB the server's images may take (as stored plus unpacked); the least recently
    /// used ones no container runs (qemu: no VM is made of) are removed beyond it (0: no
    /// bound).
    #[arg(long, default_value_t = 20480)]
    pub image_cache_mb: u64,
    /// An OCI archive (`podman save`, `skopeo copy … oci-archive:FILE`) or OCI layout
    /// directory whose images this server holds from the start, without pulling them from the
    /// core or a peer (repeatable). The heartbeats say so, placement prefers this server for
    /// them, and peers may pull them from it. Kept like pulled images: beyond
    /// --image-cache-mb the least recently used that nothing runs may be removed.
    #[arg(long = "import-image", value_name = "PATH")]
    pub import_images: Vec<PathBuf>,
    /// Qemu driver: the accelerator (auto: KVM where the CPU has hardware virtualization,
    /// else TCG; kvm: refuse to start without it).
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// Qemu driver: VMs boot with room to grow while they run (memory and vCPUs up to the
    /// server's), so that `container update` gives a running VM more at once. Experimental:
    /// under TCG with QEMU 10.0 about one live migration in fifty of such a VM corrupted its
    /// memory. Without it, more for a running VM is refused; less is always given back.
    #[arg(long)]
    pub vm_grow_live: bool,
    /// The address other servers reach this one at for live migrations (qemu: VMs; linux:
    /// containers that run their image, where CRIU works) [default: the host of --url].
    #[arg(long)]
    pub migration_address: Option<String>,
    /// Qemu driver: how long a VM may take to boot until its guest agent answers, seconds.
    #[arg(long, default_value_t = 180)]
    pub boot_timeout_secs: u64,
    /// Sim driver: latency of every operation, ms (to rehearse slow servers).
    #[arg(long, default_value_t = 0)]
    pub sim_latency_ms: u64,
}

fn parse_capacity(s: &str) -> Result<Resources> {
    let parts: Vec<u64> = s
        .split(',')
        .map(|p| p.trim().parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| {
            format!("--capacity '{s}' must be three numbers: CPU_MILLIS,MEMORY_MB,DISK_MB")
        })?;
    let [cpu_millis, memory_mb, disk_mb] = parts[..] else {
        bail!("--capacity '{s}' must be three numbers: CPU_MILLIS,MEMORY_MB,DISK_MB");
    };
    if parts.contains(&0) {
        bail!(
            "--capacity '{s}': a server offers some of each (CPU_MILLIS,MEMORY_MB,DISK_MB all above 0)"
        );
    }
    Ok(Resources {
        cpu_millis,
        memory_mb,
        disk_mb,
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "agent".into())
}

/// Runs the agent until interrupted. A run that ends in an error before a core accepted it
/// gives back what it changed on the bridge.
pub async fn run(args: AgentArgs) -> Result<()> {
    let bridge = std::sync::OnceLock::new();
    let accepted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ran = run_agent(args, &bridge, &accepted).await;
    if ran.is_err()
        && !accepted.load(std::sync::atomic::Ordering::SeqCst)
        && let Some(bridge) = bridge.get()
    {
        bridge.give_back().await;
    }
    ran
}

/// `run`: the bridge it took in `bridge`; `accepted` once a core accepted it (or at once when
/// it serves without cores).
async fn run_agent(
    args: AgentArgs,
    bridge: &std::sync::OnceLock<Arc<TakenBridge>>,
    accepted: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    if args.token.chars().count() < cloud48_model::MIN_AGENT_TOKEN {
        bail!(
            "the agent token must have at least {} characters (set CLOUD48_AGENT_TOKEN to the core's agents.token)",
            cloud48_model::MIN_AGENT_TOKEN
        );
    }
    let listen: std::net::SocketAddr = args.listen.parse().with_context(|| {
        format!(
            "--listen '{}' is not an address like 10.0.0.7:7048",
            args.listen
        )
    })?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let core_urls = args
        .core
        .iter()
        .map(|c| cloud48_model::base_url(c).map_err(|e| anyhow::anyhow!("--core {e}")))
        .collect::<Result<Vec<_>>>()?;
    let url = match &args.url {
        Some(u) => cloud48_model::base_url(u).map_err(|e| anyhow::anyhow!("--url {e}"))?,
        None if listen.ip().is_unspecified() => bail!(
            "--listen {listen} does not say how the core reaches this agent; give --url http://ADDRESS:{}",
            listen.port()
        ),
        None => format!("http://{listen}"),
    };
    let capacity = args.capacity.as_deref().map(parse_capacity).transpose()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let runc = ["/usr/sbin/runc", "/usr/bin/runc", "/sbin/runc"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if !args.import_images.is_empty() {
        let no_images = match (args.driver, args.images, runc) {
            (AgentDriver::Qemu, ..) => None,
            (AgentDriver::Sim, ..) => Some("the sim driver runs no images"),
            (AgentDriver::Linux, ImagesMode::Off, _) => Some("it runs with --images off"),
            (AgentDriver::Linux, _, false) => Some("runc is not installed"),
            (AgentDriver::Linux, _, true) => None,
        };
        if let Some(why) = no_images {
            bail!("--import-image: this server runs no images ({why}); leave the option out");
        }
    }
    // The images this server holds, served to peer agents.
    let mut image_store = None;
    let subnet: cloud48_driver::address::Subnet = args
        .subnet
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--subnet: {e}"))?;
    let addresses: Option<cloud48_driver::address::AddressRange> = args
        .addresses
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| anyhow::anyhow!("--addresses: {e}"))?;
    if let Some(range) = &addresses {
        range
            .check_within(&subnet)
            .map_err(|e| anyhow::anyhow!("--addresses: {e}"))?;
        if matches!(args.driver, AgentDriver::Sim) {
            bail!(
                "--addresses is for qemu and linux servers sharing a network (their guests move live); give this simulated server a --subnet of its own"
            );
        }
    }
    // The cores this agent knows: its heartbeats learn the cluster's others, and its image
    // pulls ask them in the same order.
    let cores: Option<crate::SharedCores> = (!core_urls.is_empty())
        .then(|| Arc::new(std::sync::Mutex::new(crate::CoreList::new(core_urls))));
    let core_images = || {
        cores.clone().map(|cores| {
            Arc::new(
                CoreImages::over_cores(cores, &args.token, tokio::runtime::Handle::current())
                    .for_agent(&url),
            ) as cloud48_linux::images::ImageSource
        })
    };
    // The store of a peer agent (`fetch_image` from it): the same HTTP API as the core's.
    let peer_images: cloud48_linux::images::PeerSources = {
        let (token, me, runtime) = (
            args.token.clone(),
            url.clone(),
            tokio::runtime::Handle::current(),
        );
        Arc::new(move |peer: &str| {
            Arc::new(CoreImages::new(peer, &token, runtime.clone()).for_agent(&me))
                as cloud48_linux::images::ImageSource
        })
    };
    let migration_host = match &args.migration_address {
        Some(a) => a.clone(),
        None => reqwest::Url::parse(&url)
            .ok()
            .and_then(|u| u.host_str().map(String::from))
            .unwrap_or_else(|| "127.0.0.1".into()),
    };
    // The bridge the guests join, taken before the driver opens (which finds it ready).
    if matches!(args.driver, AgentDriver::Linux | AgentDriver::Qemu) {
        let taken = take_bridge(&args.data_dir, &args.bridge, &subnet, &args.prefix)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let _ = bridge.set(Arc::new(taken));
    }
    let driver: Arc<dyn Driver> = match args.driver {
        AgentDriver::Qemu => {
            let cfg = cloud48_qemu::QemuConfig {
                name: name.clone(),
                data_dir: std::fs::canonicalize(&args.data_dir)?,
                bridge: args.bridge.clone(),
                subnet,
                addresses,
                image_cache_bytes: (args.image_cache_mb > 0).then_some(args.image_cache_mb << 20),
                grow_live: args.vm_grow_live,
                prefix: args.prefix.clone(),
                capacity,
                stop_grace: Duration::from_millis(args.stop_grace_ms.max(15_000)),
                boot_timeout: Duration::from_secs(args.boot_timeout_secs),
                accel: args
                    .accel
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("--accel: {e}"))?,
                source: core_images(),
                peers: Some(peer_images.clone()),
                migration_host: migration_host.clone(),
            };
            let qemu = cloud48_qemu::QemuDriver::open(cfg)
                .await
                .map_err(|e| anyhow::anyhow!("the qemu driver cannot start: {e}"))?;
            eprintln!("cloud48 agent: virtual machines run under {}", qemu.accel());
            image_store = Some(qemu.image_store());
            Arc::new(qemu)
        }
        AgentDriver::Linux => {
            let images = match (args.images, runc) {
                (ImagesMode::Off, _) => None,
                (ImagesMode::On, false) => bail!(
                    "--images on needs runc (Debian: apt-get install runc), or run with --images off"
                ),
                (ImagesMode::Auto, false) => {
                    eprintln!(
                        "cloud48 agent: runc is not installed: containers run on this server's files (apt-get install runc to run their images)"
                    );
                    None
                }
                (_, true) => Some(ImagesConfig {
                    cache_bytes: (args.image_cache_mb > 0).then_some(args.image_cache_mb << 20),
                    source: core_images(),
                    peers: Some(peer_images.clone()),
                    migration_host: Some(migration_host.clone()),
                }),
            };
            let cfg = LinuxConfig {
                name: name.clone(),
                data_dir: std::fs::canonicalize(&args.data_dir)?,
                bridge: args.bridge.clone(),
                subnet,
                addresses,
                prefix: args.prefix.clone(),
                capacity,
                stop_grace: Duration::from_millis(args.stop_grace_ms),
                exe: std::env::current_exe().context("cannot find this program's path")?,
                images,
            };
            let linux = LinuxDriver::open(cfg)
                .await
                .map_err(|e| anyhow::anyhow!("the linux driver cannot start: {e}"))?;
            image_store = linux.image_store();
            Arc::new(linux)
        }
        AgentDriver::Sim => {
            let capacity = capacity.unwrap_or(Resources {
                cpu_millis: 16_000,
                memory_mb: 65_536,
                disk_mb: 1_000_000,
            });
            let sim = SimServer::new(
                &name,
                1,
                capacity,
                SimLatency::uniform(Duration::from_millis(args.sim_latency_ms)),
            )
            .with_state_file(args.data_dir.join("sim.json"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            // Its guests take addresses of its own subnet, as a linux agent's do.
            Arc::new(sim.with_subnet(subnet))
        }
    };
    // Images from files on this server (`--import-image`), through the driver as any fetch.
    for path in &args.import_images {
        let from = cloud48_driver::ImageOrigin::File { path: path.clone() };
        let held = driver
            .fetch_image(&from, None)
            .await
            .map_err(|e| anyhow::anyhow!("--import-image {}: {e}", path.display()))?;
        for image in held {
            eprintln!("cloud48 agent: imported {image} from {}", path.display());
        }
    }
    let info = AgentInfo {
        name: name.clone(),
        url: url.clone(),
        driver: driver.kind().to_string(),
        capabilities: driver.capabilities(),
        labels: args.labels.clone(),
        subnet: Some(subnet.to_string()),
        addresses: addresses.map(|r| r.to_string()),
        heartbeats: Some(cores.is_some()),
        id: Some(agent_id(&args.data_dir)?),
        take_over: args.take_over,
    };
    let spool = args.data_dir.join("spool");
    let agent = AgentService::new(driver, args.token.clone(), info, &spool)
        .with_context(|| format!("cannot prepare {}", spool.display()))?;
    if let Some(store) = image_store {
        agent.serve_images(store);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "cloud48 agent {name}: {} driver, listening on {url}",
        agent.info().driver
    );
    if let Some(cores) = &cores {
        agent.know_cores(cores.clone());
    }
    // Once a core accepts this run (without cores, at once: nothing can refuse it), the
    // addresses the agent put on bridges in runs with another --subnet or --bridge go.
    match (bridge.get(), &cores) {
        (Some(bridge), Some(_)) => {
            let mut heard = agent.accepted();
            let (bridge, accepted) = (bridge.clone(), accepted.clone());
            tokio::spawn(async move {
                if heard.wait_for(|a| *a).await.is_ok() {
                    accepted.store(true, std::sync::atomic::Ordering::SeqCst);
                    bridge.drop_stale().await;
                }
            });
        }
        (Some(bridge), None) => {
            accepted.store(true, std::sync::atomic::Ordering::SeqCst);
            bridge.drop_stale().await;
        }
        (None, _) => {}
    }
    // A core that refuses the agent before registering it ends the agent with its reason.
    let (refused_tx, refused) = tokio::sync::watch::channel::<Option<crate::Refused>>(None);
    let beats = cores.map(|cores| {
        let beats = crate::heartbeats_over(
            agent.clone(),
            cores,
            args.token.clone(),
            Duration::from_millis(args.heartbeat_ms),
        );
        tokio::spawn(async move {
            let _ = refused_tx.send(Some(beats.await));
        })
    });
    let mut heard = refused.clone();
    let served = axum::serve(listener, agent.router()).with_graceful_shutdown(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            // Without cores (`server add` reaches it) nothing sends: the agent serves on.
            Ok(_) = heard.wait_for(Option::is_some) => {}
        }
    });
    let result = served.await.context("the agent's HTTP server failed");
    if let Some(b) = beats {
        b.abort();
    }
    if let Some(r) = refused.borrow().clone() {
        anyhow::bail!("{r}; this run of the agent was not accepted, so it stops");
    }
    result
}

/// The id of the agent of `data_dir` (`DATA/agent-id`), made at its first start: the core
/// knows by it which agent, so which guests, a server's name stands for.
fn agent_id(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("agent-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_string());
    }
    let id = format!("agent-{:016x}", rand::random::<u64>());
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Options of `cloud48 guest-http`.
#[derive(Debug, Args, Clone)]
pub struct GuestHttpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// What every request is answered with (a line).
    #[arg(long)]
    pub answer: String,
}

/// Answers every HTTP request with `answer` until terminated.
pub async fn guest_http(args: GuestHttpArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let answer = format!("{}\n", args.answer);
    let app = axum::Router::new().fallback(move || {
        let a = answer.clone();
        async move { a }
    });
    eprintln!("guest-http: answering on {}", args.listen);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            term.recv().await;
        })
        .await
        .context("guest-http failed")
}
