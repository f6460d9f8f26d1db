//! The `cloud48` command line: `serve` runs a core; the other commands talk to one over HTTP.

mod audit;
pub mod client;
mod cluster;
mod containers;
mod envs;
mod events;
mod image;
pub mod output;
mod plugins;
mod project;

pub use containers::ContainerCmd;
use containers::container;
pub use envs::EnvCmd;
use envs::env;
pub use plugins::PluginCmd;
use plugins::plugin;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

pub use client::{Client, Credentials};
use cloud48_engine::config::Settings;
use cloud48_engine::core::Core;
use cloud48_engine::managers::{AddContainer, ContainerCommand, CreateContainer};
use cloud48_engine::model::{
    Accepted, Command, CommandStatus, Container, Environment, Requirements, Resources, Server,
};

/// Cloud48: a control plane for fleets of virtualization servers.
#[derive(Debug, Parser)]
#[command(name = "cloud48", version, about, long_about = None)]
pub struct Cli {
    /// URL of the core to talk to.
    #[arg(
        long,
        global = true,
        env = "CLOUD48_SERVER",
        default_value = "http://127.0.0.1:4848"
    )]
    pub server: String,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// Sign in as this user (HTTP Digest). The password comes from CLOUD48_PASSWORD,
    /// --credentials FILE or a prompt; never from a flag.
    #[arg(long, global = true, env = "CLOUD48_USER")]
    pub user: Option<String>,
    /// TOML file with `user` and `password` (keep it private: chmod 600).
    #[arg(long, global = true, env = "CLOUD48_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Top,
}

impl Cli {
    /// Whether this runs a long-lived server (core, agent, guest-http) rather than one command
    /// whose output may go into a pipe that closes early.
    pub fn is_server(&self) -> bool {
        matches!(
            self.command,
            Top::Serve(_) | Top::Agent(_) | Top::GuestHttp(_)
        )
    }
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Top {
    /// Run a cloud core (REST API + command queue).
    Serve(CoreArgs),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Users of the API (stored in the core's database).
    #[command(subcommand)]
    User(UserCmd),
    /// Environments: groups of related containers.
    #[command(subcommand)]
    Env(EnvCmd),
    /// Containers.
    #[command(subcommand)]
    Container(ContainerCmd),
    /// Servers (virtualization servers).
    #[command(subcommand)]
    Server(ServerCmd),
    /// The persisted command queue.
    #[command(subcommand)]
    Command(CommandCmd),
    /// Container types (WASM plugins).
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Projects: who may act on which environments and containers, and their quotas.
    #[command(subcommand)]
    Project(project::ProjectCmd),
    /// Images: the core's store of OCI images, and `image build` from a recipe.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Follow status changes of commands, containers, servers and environments as they happen.
    Events(events::EventsArgs),
    /// The audit trail: who changed what, when, and how it went (admins).
    Audit(audit::AuditArgs),
    /// The cores sharing this database (several cores on PostgreSQL) and which one holds each
    /// duty: the health monitor and the collector.
    Cluster,
    /// Print a shell completion script: `source <(cloud48 completions bash)`, or save it where
    /// your shell loads completions (zsh: a directory on $fpath as `_cloud48`; fish:
    /// ~/.config/fish/completions/cloud48.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Live views, redrawn as what they show changes.
    #[command(subcommand)]
    Watch(events::WatchCmd),
    /// Run the seed scenario (tomcats, a balancer) on an embedded core and print what happened.
    #[cfg(feature = "dev")]
    Demo,
    /// Benchmarks.
    #[cfg(feature = "dev")]
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run the node agent of this server: it drives its containers for the core.
    Agent(cloud48_agent::cli::AgentArgs),
    /// A small HTTP server answering every request with one line (run inside containers).
    #[command(hide = true)]
    GuestHttp(cloud48_agent::cli::GuestHttpArgs),
}

/// Where the core's configuration comes from: a TOML file, the environment and these flags
/// (flag > env > file > default; see `cloud48 config show`).
#[derive(Debug, Args, Default, Clone)]
pub struct CoreArgs {
    /// Config file (TOML); default: ./cloud48.toml if it exists.
    #[arg(long, env = "CLOUD48_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default 127.0.0.1:4848].
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory for the SQLite database and local state [default ./cloud48-data].
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Database URL (`postgres://...`) [default: SQLite in the data directory].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Connections to PostgreSQL [default 5].
    #[arg(long)]
    pub db_connections: Option<u64>,
    /// Commands executing at once [default 8].
    #[arg(long)]
    pub workers: Option<u64>,
    /// First retry delay after a transient driver error, ms; doubles per attempt [default 200].
    #[arg(long)]
    pub retry_base_ms: Option<u64>,
    /// Attempts before a transient driver error fails a command [default 5].
    #[arg(long)]
    pub max_attempts: Option<u64>,
    /// Lease of a claimed command, ms: another core resumes the commands of a core that died
    /// this long after its last renewal [default 2000].
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Lease of a cluster duty (health monitor, collector) held by one core of several on one
    /// PostgreSQL database, ms; another core takes it over this long after its holder dies
    /// [default 3000].
    #[arg(long)]
    pub duty_lease_ms: Option<u64>,
    /// URL node agents reach this core at, told to agents so that they can fail over to it
    /// when the core they talk to dies (several cores on one PostgreSQL database).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Simulated servers created when none is registered [default 4].
    #[arg(long)]
    pub sim_servers: Option<u64>,
    /// Latency of every simulated server operation, ms [default 0].
    #[arg(long)]
    pub sim_latency_ms: Option<u64>,
    /// Deadline of one plugin hook call, ms [default 100].
    #[arg(long)]
    pub plugin_deadline_ms: Option<u64>,
    /// Memory cap of one plugin instance, MiB [default 64].
    #[arg(long)]
    pub plugin_memory_mb: Option<u64>,
    /// What anonymous requests may do: none, read or full (full: local development only) [default read].
    #[arg(long)]
    pub anonymous: Option<String>,
    /// Endpoint families anonymous requests may read when --anonymous is read: some of fleet,
    /// environments, containers, commands, plugins; empty for none [default fleet,environments].
    #[arg(long)]
    pub anonymous_read: Option<String>,
    /// HTTP Digest realm; part of stored password hashes [default cloud48].
    #[arg(long)]
    pub realm: Option<String>,
    /// Lifetime of a Digest nonce, seconds [default 300].
    #[arg(long)]
    pub nonce_ttl_secs: Option<u64>,
    /// Interval of the simulated servers' heartbeats, ms [default 500].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a server is marked down, ms [default 2000].
    #[arg(long)]
    pub grace_ms: Option<u64>,
    /// Interval of the health monitor's checks, ms [default 250].
    #[arg(long)]
    pub health_check_ms: Option<u64>,
    /// Interval of the collector (and rebalancer), seconds [default 30].
    #[arg(long)]
    pub collector_secs: Option<u64>,
    /// How long the event log keeps events, seconds [default 86400].
    #[arg(long)]
    pub events_retention_secs: Option<u64>,
    /// Memory-utilisation spread (percentage points) above which the rebalancer migrates; 0 off [default 0].
    #[arg(long)]
    pub rebalance_spread: Option<u64>,
    /// Most migrations the rebalancer has in flight [default 2].
    #[arg(long)]
    pub rebalance_batch: Option<u64>,
    /// Placement weight of free cpu, a decimal such as 0.5 [default 1].
    #[arg(long)]
    pub weight_cpu: Option<f64>,
    /// Placement weight of free memory [default 1].
    #[arg(long)]
    pub weight_memory: Option<f64>,
    /// Placement weight of free disk [default 0.5].
    #[arg(long)]
    pub weight_disk: Option<f64>,
    /// Placement score added for a server that already holds the container's image, so it
    /// need not pull it [default 0.25].
    #[arg(long)]
    pub weight_image: Option<f64>,
    /// Lifetime of a capacity reservation whose command did not finish, seconds [default 600].
    #[arg(long)]
    pub dummy_ttl_secs: Option<u64>,
}

impl CoreArgs {
    fn flags(&self) -> std::collections::BTreeMap<&'static str, String> {
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k, v);
            }
        };
        put("server.listen", self.listen.clone());
        put("server.data_dir", self.data_dir.clone());
        put("database.url", self.database_url.clone());
        put(
            "database.connections",
            self.db_connections.map(|v| v.to_string()),
        );
        put("queue.workers", self.workers.map(|v| v.to_string()));
        put(
            "queue.retry_base_ms",
            self.retry_base_ms.map(|v| v.to_string()),
        );
        put(
            "queue.max_attempts",
            self.max_attempts.map(|v| v.to_string()),
        );
        put("queue.lease_ms", self.lease_ms.map(|v| v.to_string()));
        put(
            "cluster.duty_lease_ms",
            self.duty_lease_ms.map(|v| v.to_string()),
        );
        put("cluster.advertise_url", self.advertise_url.clone());
        put(
            "drivers.sim.servers",
            self.sim_servers.map(|v| v.to_string()),
        );
        put(
            "drivers.sim.latency_ms",
            self.sim_latency_ms.map(|v| v.to_string()),
        );
        put(
            "plugins.deadline_ms",
            self.plugin_deadline_ms.map(|v| v.to_string()),
        );
        put(
            "plugins.memory_mb",
            self.plugin_memory_mb.map(|v| v.to_string()),
        );
        put("auth.anonymous", self.anonymous.clone());
        put("auth.anonymous_read", self.anonymous_read.clone());
        put("auth.realm", self.realm.clone());
        put(
            "auth.nonce_ttl_secs",
            self.nonce_ttl_secs.map(|v| v.to_string()),
        );
        for (key, value) in [
            ("health.heartbeat_ms", self.heartbeat_ms),
            ("health.grace_ms", self.grace_ms),
            ("health.check_ms", self.health_check_ms),
            ("collector.interval_secs", self.collector_secs),
            ("events.retention_secs", self.events_retention_secs),
            ("rebalancer.spread_percent", self.rebalance_spread),
            ("rebalancer.batch", self.rebalance_batch),
            ("placement.dummy_ttl_secs", self.dummy_ttl_secs),
        ] {
            put(key, value.map(|v| v.to_string()));
        }
        for (key, value) in [
            ("placement.weight_cpu", self.weight_cpu),
            ("placement.weight_memory", self.weight_memory),
            ("placement.weight_disk", self.weight_disk),
            ("placement.weight_image", self.weight_image),
        ] {
            put(key, value.map(|v| v.to_string()));
        }
        m
    }

    /// The effective settings.
    pub fn settings(&self) -> Result<Settings> {
        let default_file = PathBuf::from("cloud48.toml");
        let file = self
            .config
            .clone()
            .or_else(|| default_file.exists().then_some(default_file));
        Ok(Settings::load(
            file.as_deref(),
            &cloud48_engine::config::process_env,
            &self.flags(),
        )?)
    }
}

/// Wait options of mutations.
#[derive(Debug, Args, Clone, Copy)]
pub struct WaitArg {
    /// Wait until the command finishes, showing progress.
    #[arg(long)]
    pub wait: bool,
}

/// Resource flags.
#[derive(Debug, Args, Clone, Default)]
pub struct ResourceArgs {
    /// CPU in thousandths of a core (1000 = one core).
    #[arg(long, allow_negative_numbers = true, value_parser = positive)]
    pub cpu_millis: Option<u64>,
    /// Memory in MiB.
    #[arg(long, allow_negative_numbers = true, value_parser = positive)]
    pub memory_mb: Option<u64>,
    /// Disk in MiB.
    #[arg(long, allow_negative_numbers = true, value_parser = positive)]
    pub disk_mb: Option<u64>,
}

/// A resource amount: a whole number above zero.
fn positive(s: &str) -> Result<u64, String> {
    match s.parse::<i128>() {
        Ok(n) if n > 0 && n <= u64::MAX as i128 => Ok(n as u64),
        Ok(_) => Err(format!(
            "{s} is not above zero; give a whole number such as 500"
        )),
        Err(_) => Err(format!("{s} is not a whole number; give one such as 500")),
    }
}

impl ResourceArgs {
    fn any(&self) -> bool {
        self.cpu_millis.is_some() || self.memory_mb.is_some() || self.disk_mb.is_some()
    }
    fn over(&self, base: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.unwrap_or(base.cpu_millis),
            memory_mb: self.memory_mb.unwrap_or(base.memory_mb),
            disk_mb: self.disk_mb.unwrap_or(base.disk_mb),
        }
    }
}

/// Placement flags of new containers.
#[derive(Debug, Args, Clone, Default)]
pub struct NewContainerArgs {
    /// Container type.
    #[arg(long = "type", value_name = "TYPE")]
    pub type_id: String,
    /// Server to place it on (default: chosen by placement).
    #[arg(long = "on", value_name = "SERVER")]
    pub on: Option<String>,
    /// Label the server must carry (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Never on a server that already runs a container of this type in the same environment.
    #[arg(long)]
    pub spread: bool,
    /// Resources (default: the type's).
    #[command(flatten)]
    pub resources: ResourceArgs,
}

impl NewContainerArgs {
    /// The requirements to send: none when no flag asks for any, else the flags over the
    /// type's default resources (asked from the core for the ones not given).
    async fn requirements(&self, client: &Client) -> Result<Option<Requirements>> {
        if !self.resources.any() && self.labels.is_empty() && !self.spread {
            return Ok(None);
        }
        let r = &self.resources;
        let base = if r.cpu_millis.is_some() && r.memory_mb.is_some() && r.disk_mb.is_some() {
            Resources::default()
        } else {
            let info: cloud48_engine::plugins::PluginInfo = client
                .get(&format!("/v1/plugins/{}", enc(&self.type_id)))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the default resources of type '{}' are unknown ({e}); give all of --cpu-millis, --memory-mb and --disk-mb",
                        self.type_id
                    )
                })?;
            info.meta.requirements.resources
        };
        Ok(Some(Requirements {
            resources: self.resources.over(base),
            labels: self.labels.clone(),
            spread: self.spread,
        }))
    }
}

/// `server` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// List servers with their load.
    List,
    /// Register the server whose node agent listens at URL (the core must share its token).
    Add {
        /// The agent's address, e.g. http://10.0.0.7:7048.
        url: String,
    },
    /// Show a server.
    Show {
        /// Server name or id.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Take no new containers and migrate every container away.
    Drain {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
        /// Move running virtual machines while they run, to servers that can receive them
        /// live (stopped containers move cold). Refused when the server cannot migrate live.
        #[arg(long)]
        live: bool,
    },
    /// Make images present on a server before containers need them (placement prefers servers
    /// that hold a container's image): IMAGE from the core, from another server's agent
    /// (--from-server), or every image of an OCI archive or layout on the server (--file).
    FetchImage {
        /// Server name.
        name: String,
        /// Image name (cloud48/nginx) or sha256: digest; optional with --file.
        image: Option<String>,
        /// Pull it from this server's agent (one that holds it) instead of the core.
        #[arg(long, conflicts_with = "file")]
        from_server: Option<String>,
        /// Import from this OCI archive or layout directory on the server itself.
        #[arg(long, value_name = "PATH")]
        file: Option<String>,
    },
    /// Take new containers again after a drain.
    Undrain {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Simulated servers: inject a crash (no answers, no heartbeats).
    Fail {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Simulated servers: end an injected crash (the server rejoins).
    Recover {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
    },
}

/// `command` subcommands.
#[derive(Debug, Subcommand)]
pub enum CommandCmd {
    /// List commands, newest first.
    List {
        /// Only this status (queued, running, waiting, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only children of this command.
        #[arg(long)]
        parent: Option<i64>,
        /// Only commands in this project (name or id).
        #[arg(long)]
        project: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
    },
    /// Show a command.
    Show {
        /// Command id.
        id: i64,
    },
    /// Wait until a command finishes; exits non-zero if it failed.
    Wait {
        /// Command id.
        id: i64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel a queued command that has not started.
    Cancel {
        /// Command id.
        id: i64,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration, secrets masked, with where each value came from.
    Show(CoreArgs),
}

/// `user` subcommands: they act on the database named by the configuration.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user; the password comes from CLOUD48_NEW_PASSWORD or a prompt.
    Add {
        /// User name.
        name: String,
        /// admin, operator or viewer (each over every project), or member (only the roles
        /// `cloud48 project grant` gives it).
        #[arg(long)]
        role: String,
        #[command(flatten)]
        core: CoreArgs,
    },
    /// List users.
    List {
        #[command(flatten)]
        core: CoreArgs,
    },
    /// Remove a user.
    Remove {
        /// User name.
        name: String,
        #[command(flatten)]
        core: CoreArgs,
    },
    /// Change a user's password (from CLOUD48_NEW_PASSWORD or a prompt).
    Passwd {
        /// User name.
        name: String,
        #[command(flatten)]
        core: CoreArgs,
    },
}

/// `bench` subcommands.
#[cfg(feature = "dev")]
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Durable no-op command throughput of the queue, on SQLite and (if reachable) PostgreSQL.
    Queue(crate::bench::QueueBenchArgs),
    /// Hook dispatch of the bundled balancer plugin (instantiate + call + state in/out).
    Hooks(crate::bench::HooksBenchArgs),
    /// Placement: container creates through the full durable path on many simulated servers.
    Place(crate::bench::PlaceBenchArgs),
    /// Failover: crash of the balancer's server to a replacement balancer with all upstreams.
    Failover(crate::bench::FailoverBenchArgs),
    /// The linux driver (root): create+start latency and rate, cold migration of a large directory.
    Linux(crate::bench::LinuxBenchArgs),
    /// Failover on real agents in network namespaces with real nginx (root).
    FailoverReal(crate::bench::FailoverRealBenchArgs),
    /// Containers of images (root, runc): pull rate from the core, create+start to ready of
    /// nginx and Tomcat, cold migration of a large upper directory, live moves through CRIU.
    Images(crate::bench::images::ImagesBenchArgs),
    /// Virtual machines (root, QEMU): create and start to ready, live migration of a VM
    /// serving HTTP under load (downtime, failed requests), cold migration of a large disk.
    Vm(crate::bench::vm::VmBenchArgs),
    /// Single creates through the REST API over real HTTP with Digest sign-in: accepted/s and
    /// enqueue->start latency.
    Api(crate::bench::ApiBenchArgs),
    /// Event fan-out: subscribers of /v1/events receiving every event of a burst of commands.
    Events(crate::bench::console::EventsBenchArgs),
    /// /metrics and a first page of containers with a million containers.
    Scrape(crate::bench::console::ScrapeBenchArgs),
    /// API reads while one batch creates 10,000 containers, on `cloud48 serve` with its
    /// defaults: read latency, and whether a healthy server was ever seen down.
    Reads(crate::bench::load::ReadsBenchArgs),
    /// `kill -9` of `cloud48 serve` with 10,000 commands in flight: time to listen and to be
    /// ready again.
    Restart(crate::bench::load::RestartBenchArgs),
    /// Several cores on one PostgreSQL database: time from `kill -9` of a core to all its
    /// in-flight commands running on another, and create throughput of 1, 2 and 3 cores.
    Cluster(crate::bench::cluster::ClusterBenchArgs),
}

#[cfg(feature = "dev")]
async fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Queue(args) => crate::bench::queue(args).await,
        BenchCmd::Place(args) => crate::bench::place(args).await,
        BenchCmd::Failover(args) => crate::bench::failover(args).await,
        BenchCmd::Linux(args) => crate::bench::linux(args).await,
        BenchCmd::FailoverReal(args) => crate::bench::failover_real(args).await,
        BenchCmd::Images(args) => crate::bench::images::images(args).await,
        BenchCmd::Vm(args) => crate::bench::vm::vm(args).await,
        BenchCmd::Api(args) => crate::bench::api::api(args).await,
        BenchCmd::Cluster(args) => crate::bench::cluster::cluster(args).await,
        BenchCmd::Events(args) => crate::bench::console::events(args).await,
        BenchCmd::Scrape(args) => crate::bench::console::scrape(args).await,
        BenchCmd::Reads(args) => crate::bench::load::reads(args).await,
        BenchCmd::Restart(args) => crate::bench::load::restart(args).await,
        // Outside the async runtime, to measure the dispatch itself.
        BenchCmd::Hooks(args) => std::thread::spawn(move || crate::bench::hooks(args))
            .join()
            .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?,
    }
}

/// Records a change made with the command line on the core's machine in the audit trail, as
/// the operating-system user who ran it.
async fn local_audit<T, E: std::fmt::Display>(
    db: &sea_orm::DatabaseConnection,
    what: String,
    outcome: &std::result::Result<T, E>,
) -> Result<()> {
    let who = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        // SAFETY: getuid has no preconditions.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }));
    let entry = cloud48_engine::model::AuditEntry {
        id: 0,
        at: 0,
        who: format!("{who} (local)"),
        address: None,
        action: "cli".into(),
        object: what,
        status: 0,
        command_id: None,
        message: outcome.as_ref().err().map(ToString::to_string),
    };
    cloud48_engine::audit::record(db, &entry)
        .await
        .context("the change was made, but recording it in the audit trail failed")
}

/// Runs the CLI.
pub async fn run(cli: Cli) -> Result<()> {
    let mut client = Client::new(&cli.server);
    if let Some(c) = credentials(&cli)? {
        client = client.with_credentials(c);
    }
    let out = Out { json: cli.json };
    match cli.command {
        Top::Serve(args) => serve(args).await,
        Top::Config(ConfigCmd::Show(args)) => {
            let settings = args.settings()?;
            out.show(&settings.show_json(), || settings.show());
            Ok(())
        }
        Top::User(cmd) => users(out, cmd).await,
        #[cfg(feature = "dev")]
        Top::Bench(cmd) => bench(cmd).await,
        Top::Env(cmd) => env(&client, out, cmd).await,
        Top::Container(cmd) => container(&client, out, cmd).await,
        Top::Server(cmd) => match cmd {
            ServerCmd::List => {
                let list: Vec<Server> = client.get_all("/v1/servers").await?;
                out.show(&list, || output::servers(&list));
                Ok(())
            }
            ServerCmd::Add { url } => {
                let s: Server = client.post("/v1/servers", &json!({ "url": url })).await?;
                out.show(&s, || output::servers(std::slice::from_ref(&s)));
                Ok(())
            }
            ServerCmd::Show { name: server } => {
                let s: Server = client.get(&format!("/v1/servers/{}", enc(&server))).await?;
                out.show(&s, || output::servers(std::slice::from_ref(&s)));
                Ok(())
            }
            ServerCmd::Drain { name: server, live } => {
                let r: cloud48_engine::managers::DrainReport = client.post(&format!("/v1/servers/{}/drain", enc(&server)), &json!({ "live": live })).await?;
                out.show(&r, || {
                    let mut text = format!("server {} is draining: {} migrations submitted (commands {:?})", r.server, r.commands.len(), r.commands);
                    for s in &r.skipped {
                        text.push_str(&format!("\nskipped: {s}"));
                    }
                    text
                });
                Ok(())
            }
            ServerCmd::FetchImage { name, image, from_server, file } => {
                let r: cloud48_api::FetchedImages = client
                    .post(
                        &format!("/v1/servers/{}/images", enc(&name)),
                        &json!({ "image": image, "from_server": from_server, "file": file }),
                    )
                    .await?;
                out.show(&r, || format!("server {} holds {}", r.server, r.images.join(", ")));
                Ok(())
            }
            ServerCmd::Undrain { name: server } => server_op(&client, out, &server, "undrain", "takes containers again").await,
            ServerCmd::Fail { name: server } => {
                server_op(&client, out, &server, "fail", "crashed: it stops answering; the health monitor marks it down after the grace period").await
            }
            ServerCmd::Recover { name: server } => {
                server_op(&client, out, &server, "recover", "recovered: heartbeats resume and the server rejoins").await
            }
        },
        Top::Command(cmd) => command(&client, out, cmd).await,
        Top::Plugin(cmd) => plugin(&client, out, cmd).await,
        Top::Image(cmd) => image::image(&client, out, cmd).await,
        Top::Project(cmd) => project::project(&client, out, cmd).await,
        Top::Events(args) => events::follow(&client, out, args).await,
        Top::Watch(cmd) => events::watch(&client, out, cmd).await,
        Top::Audit(args) => audit::list(&client, out, args).await,
        Top::Cluster => cluster::show(&client, out).await,
        Top::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "cloud48", &mut std::io::stdout());
            Ok(())
        }
        #[cfg(feature = "dev")]
        Top::Demo => crate::demo::run().await,
        Top::Agent(args) => cloud48_agent::cli::run(args).await,
        Top::GuestHttp(args) => cloud48_agent::cli::guest_http(args).await,
    }
}

#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints a list as it arrives, page by page, so that a list of any length takes the
    /// memory of one page: JSON as one array, written item by item; for people, a table per
    /// page.
    async fn list<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        client: &Client,
        path: &str,
        table: fn(&[T]) -> String,
    ) -> Result<()> {
        use std::io::Write;
        let mut first = true;
        client
            .pages::<T>(path, |page| {
                let mut out = std::io::stdout().lock();
                if self.json {
                    for item in &page {
                        let text = serde_json::to_string_pretty(item)?;
                        let sep = if first { "[\n" } else { ",\n" };
                        first = false;
                        write!(out, "{sep}{text}")?;
                    }
                } else {
                    writeln!(out, "{}", table(&page))?;
                    first = false;
                }
                Ok(())
            })
            .await?;
        if self.json {
            println!("{}", if first { "[]" } else { "\n]" });
        } else if first {
            println!("{}", table(&[]));
        }
        Ok(())
    }

    fn show<T: serde::Serialize>(&self, v: &T, human: impl FnOnce() -> String) {
        if self.json {
            output::json(v);
        } else {
            println!("{}", human());
        }
    }

    /// Reports a submitted command; with `wait`, follows it to its end.
    async fn accepted(
        &self,
        client: &Client,
        a: Accepted,
        wait: WaitArg,
        what: &str,
    ) -> Result<()> {
        if !wait.wait {
            self.show(&a, || {
                format!(
                    "{what}: command {} queued (watch it with `cloud48 command wait {}`)",
                    a.command_id, a.command_id
                )
            });
            return Ok(());
        }
        let cmd = follow(client, a.command_id, !self.json).await?;
        self.show(&cmd, || output::command(&cmd));
        finished_ok(&cmd)
    }
}

fn finished_ok(cmd: &Command) -> Result<()> {
    match cmd.status {
        CommandStatus::Succeeded => Ok(()),
        status => bail!(
            "command {} {}: {}",
            cmd.id,
            status,
            cmd.error.as_deref().unwrap_or("no error message")
        ),
    }
}

/// Follows a command to its end with a spinner on stderr.
async fn follow(
    client: &Client,
    id: cloud48_engine::model::CommandId,
    spinner: bool,
) -> Result<Command> {
    let bar = if spinner {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let cmd = client
        .wait(id, |c| {
            let detail = c
                .waiting_on
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            bar.set_message(format!(
                "command {} {} {}: step {}{detail}",
                c.id, c.kind, c.status, c.step
            ));
        })
        .await;
    bar.finish_and_clear();
    cmd
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn server_op(client: &Client, out: Out, server: &str, op: &str, done: &str) -> Result<()> {
    let r: cloud48_engine::managers::DrainReport = client
        .post(&format!("/v1/servers/{}/{op}", enc(server)), &json!({}))
        .await?;
    out.show(&r, || format!("server {} {done}", r.server));
    Ok(())
}

async fn env_op(client: &Client, out: Out, op: &str, env: &str, wait: WaitArg) -> Result<()> {
    let a = client
        .post(&format!("/v1/environments/{}/{op}", enc(env)), &json!({}))
        .await?;
    out.accepted(client, a, wait, &format!("{op} of environment {env}"))
        .await
}

async fn command(client: &Client, out: Out, cmd: CommandCmd) -> Result<()> {
    match cmd {
        CommandCmd::List {
            status,
            parent,
            project,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(p) = project {
                q.push(format!("project={}", enc(&p)));
            }
            if let Some(s) = status {
                q.push(format!("status={}", enc(&s)));
            }
            if let Some(p) = parent {
                q.push(format!("parent={p}"));
            }
            let list: Vec<Command> = client.get(&format!("/v1/commands?{}", q.join("&"))).await?;
            out.show(&list, || output::commands(&list));
            Ok(())
        }
        CommandCmd::Show { id } => {
            let c: Command = client.get(&format!("/v1/commands/{id}")).await?;
            out.show(&c, || output::command(&c));
            Ok(())
        }
        CommandCmd::Wait { id, timeout } => {
            let c = tokio::time::timeout(
                Duration::from_secs(timeout),
                follow(client, cloud48_engine::model::CommandId(id), !out.json),
            )
            .await
            .with_context(|| format!("command {id} did not finish within {timeout} s"))??;
            out.show(&c, || output::command(&c));
            finished_ok(&c)
        }
        CommandCmd::Cancel { id } => {
            let c: Command = client
                .post(&format!("/v1/commands/{id}/cancel"), &json!({}))
                .await?;
            out.show(&c, || format!("command {id} cancelled"));
            Ok(())
        }
    }
}

/// The credentials of the CLI user, if `--user` or a credentials file names one.
fn credentials(cli: &Cli) -> Result<Option<Credentials>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        user: Option<String>,
        password: String,
    }
    if let Some(path) = &cli.credentials {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read credentials file {}", path.display()))?;
        let file: File = toml_edit::de::from_str(&text).with_context(|| {
            format!(
                "credentials file {} must hold `user = \"...\"` and `password = \"...\"`",
                path.display()
            )
        })?;
        let user = cli
            .user
            .clone()
            .or(file.user)
            .context("no user: pass --user NAME or put `user = ...` in the credentials file")?;
        return Ok(Some(Credentials {
            user,
            password: file.password,
        }));
    }
    let Some(user) = cli.user.clone() else {
        return Ok(None);
    };
    let password = match std::env::var("CLOUD48_PASSWORD") {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password(format!("password for {user}: "))
            .context("no password: set CLOUD48_PASSWORD, use --credentials FILE, or run in a terminal to be prompted")?,
    };
    Ok(Some(Credentials { user, password }))
}

fn new_password(name: &str) -> Result<String> {
    if let Ok(p) = std::env::var("CLOUD48_NEW_PASSWORD") {
        return Ok(p);
    }
    let first = rpassword::prompt_password(format!("new password for {name}: "))
        .context("no password: set CLOUD48_NEW_PASSWORD or run in a terminal to be prompted")?;
    let second = rpassword::prompt_password("repeat it: ")?;
    if first != second {
        bail!("the two passwords differ");
    }
    Ok(first)
}

async fn users(out: Out, cmd: UserCmd) -> Result<()> {
    let core_args = match &cmd {
        UserCmd::Add { core, .. }
        | UserCmd::List { core }
        | UserCmd::Remove { core, .. }
        | UserCmd::Passwd { core, .. } => core.clone(),
    };
    let settings = core_args.settings()?;
    let config = settings.core();
    let sqlite = config.data_dir.join("cloud48.db");
    if config.database_url.is_none() && !sqlite.exists() {
        let hint = "run this in the directory where `cloud48 serve` runs, or give its --data-dir or --database-url";
        if matches!(cmd, UserCmd::Add { .. }) {
            eprintln!(
                "note: there is no core database at {} yet; creating it ({hint})",
                sqlite.display()
            );
        } else {
            bail!("there is no core database at {}: {hint}", sqlite.display());
        }
    }
    let db = cloud48_engine::core::connect(&config).await?;
    let store = cloud48_engine::auth::UserStore::new(&db, &config.auth.realm);
    match cmd {
        UserCmd::Add { name, role, .. } => {
            let role: cloud48_engine::auth::Role = role.parse().map_err(anyhow::Error::msg)?;
            cloud48_engine::auth::validate_user_name(&name).map_err(anyhow::Error::msg)?;
            let password = new_password(&name)?;
            let done = store.add(&name, role, &password).await;
            local_audit(&db, format!("user add {name} {role}"), &done).await?;
            done.map_err(anyhow::Error::msg)?;
            println!("user {name} added with role {role}");
        }
        UserCmd::Passwd { name, .. } => {
            let password = new_password(&name)?;
            let done = store.passwd(&name, &password).await;
            local_audit(&db, format!("user passwd {name}"), &done).await?;
            done.map_err(anyhow::Error::msg)?;
            println!("password of {name} changed");
        }
        UserCmd::Remove { name, .. } => {
            let done = store.remove(&name).await;
            local_audit(&db, format!("user remove {name}"), &done).await?;
            done.map_err(anyhow::Error::msg)?;
            println!("user {name} removed");
        }
        UserCmd::List { .. } => {
            let list = store.list().await.map_err(anyhow::Error::msg)?;
            out.show(&list, || {
                let mut t = comfy_table::Table::new();
                t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
                    .set_header(vec!["NAME", "ROLE"]);
                for u in &list {
                    t.add_row(vec![u.name.clone(), u.role.to_string()]);
                }
                for u in &config.auth.users {
                    t.add_row(vec![u.name.clone(), format!("{} (config file)", u.role)]);
                }
                t.to_string()
            });
        }
    }
    Ok(())
}

/// Runs a core until Ctrl-C or SIGTERM.
pub async fn serve(args: CoreArgs) -> Result<()> {
    let settings = args.settings()?;
    let config = settings.core();
    let listen = settings.listen();
    let data_dir = config.data_dir.clone();
    if config.auth.anonymous == cloud48_engine::auth::Anonymous::Full {
        tracing::warn!(
            "anonymous requests have FULL access (auth.anonymous = full): for local development only"
        );
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "anonymous full access on a non-loopback address: anyone who can reach it controls the cloud");
        }
    }
    let core = Core::open(config).await?;
    // Listen at once; resume commands and reconcile servers meanwhile (`GET /v1/health` says
    // `starting` until then; requests are accepted and their commands wait their turn).
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(%listen, data_dir = %data_dir.display(), platform = core.platform_name(), "cloud48 core serving");
    let app =
        cloud48_api::router(core.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal());
    let starting = core.clone();
    let started = async move {
        starting.start().await?;
        tracing::info!("cloud48 core ready");
        std::future::pending::<Result<(), cloud48_engine::core::CoreError>>().await
    };
    tokio::select! {
        served = served => served.context("HTTP server failed")?,
        failed = started => failed.context("the core could not start")?,
    }
    tracing::info!("stopping: before-cc-stop hooks, then letting running steps finish");
    if let Err(e) = core.shutdown(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "before-cc-stop did not finish");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// A `--param NAME=VALUE`.
fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "'{s}' is not NAME=VALUE (e.g. --param heap-mb=1024)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Top};
    use cloud48_engine::config::{Source, declared};

    /// Every declared setting has a flag that `serve` accepts and that sets that setting.
    #[test]
    fn every_declared_setting_has_a_serve_flag_that_sets_it() {
        for (key, flag, default) in declared() {
            if flag.is_empty() {
                // A secret: environment or file only.
                continue;
            }
            let value = match key {
                "auth.anonymous_read" => "fleet,commands",
                _ if default.is_empty() => "x",
                _ => default,
            };
            let cli = Cli::try_parse_from(["cloud48", "serve", flag, value])
                .unwrap_or_else(|e| panic!("serve refuses {flag} (setting {key}): {e}"));
            let Top::Serve(args) = cli.command else {
                panic!("not serve")
            };
            let settings = args.settings().unwrap();
            assert_eq!(settings.get(key), value, "{flag} does not set {key}");
            let source = &settings
                .entries()
                .find(|(k, _)| *k == key)
                .unwrap()
                .1
                .source;
            assert!(
                matches!(source, Source::Flag(f) if f == flag),
                "{key}: {source:?}"
            );
        }
    }
}
