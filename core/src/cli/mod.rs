//! The `cloud48` command line: `serve` runs a core; the other commands talk to one over HTTP.

pub mod client;
pub mod output;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::core::{Core, CoreConfig};
use crate::managers::{AddContainer, ContainerCommand, CreateContainer};
use crate::model::{Accepted, Command, CommandStatus, Container, Environment, Requirements, Resources, Server};
pub use client::Client;

/// Cloud48: a control plane for fleets of virtualization servers.
#[derive(Debug, Parser)]
#[command(name = "cloud48", version, about, long_about = None)]
pub struct Cli {
    /// URL of the core to talk to.
    #[arg(long, global = true, env = "CLOUD48_SERVER", default_value = "http://127.0.0.1:4848")]
    pub server: String,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Top,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Top {
    /// Run a cloud core (REST API + command queue).
    Serve(ServeArgs),
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
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CLOUD48_LISTEN", default_value = "127.0.0.1:4848")]
    pub listen: SocketAddr,
    /// Directory for the SQLite database and local state.
    #[arg(long, env = "CLOUD48_DATA_DIR", default_value = "./cloud48-data")]
    pub data_dir: PathBuf,
    /// Database URL (`postgres://...`); default: SQLite in the data directory.
    #[arg(long, env = "CLOUD48_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Commands executing at once.
    #[arg(long, env = "CLOUD48_WORKERS", default_value_t = 8)]
    pub workers: usize,
    /// Simulated servers to create when none is registered (0 = none).
    #[arg(long, env = "CLOUD48_SIM_SERVERS", default_value_t = 4)]
    pub sim_servers: u32,
    /// Latency of every simulated server operation, in milliseconds.
    #[arg(long, env = "CLOUD48_SIM_LATENCY_MS", default_value_t = 0)]
    pub sim_latency_ms: u64,
    /// First retry delay after a transient driver error, in milliseconds (doubles per attempt).
    #[arg(long, env = "CLOUD48_RETRY_BASE_MS", default_value_t = 200)]
    pub retry_base_ms: u64,
    /// Attempts before a transient driver error fails a command.
    #[arg(long, env = "CLOUD48_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
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
    #[arg(long)]
    pub cpu_millis: Option<u64>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Disk in MiB.
    #[arg(long)]
    pub disk_mb: Option<u64>,
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
    /// Resources (default: the type's).
    #[command(flatten)]
    pub resources: ResourceArgs,
}

impl NewContainerArgs {
    fn requirements(&self) -> Result<Option<Requirements>> {
        if !self.resources.any() && self.labels.is_empty() {
            return Ok(None);
        }
        if !(self.resources.cpu_millis.is_some() && self.resources.memory_mb.is_some() && self.resources.disk_mb.is_some()) {
            bail!("give all of --cpu-millis, --memory-mb and --disk-mb, or none to use the type's defaults");
        }
        Ok(Some(Requirements {
            resources: self.resources.over(Resources::default()),
            labels: self.labels.clone(),
        }))
    }
}

/// `env` subcommands.
#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// Create an empty environment.
    Create { /// Name: 1-63 of a-z, 0-9, '-'.
        name: String, #[command(flatten)] wait: WaitArg },
    /// Add a new container of a type to an environment.
    Add { /// Environment name or id.
        env: String, #[command(flatten)] new: NewContainerArgs, #[command(flatten)] wait: WaitArg },
    /// Remove (and destroy) a member.
    Remove { /// Environment name or id.
        env: String, /// Container id.
        container: i64, #[command(flatten)] wait: WaitArg },
    /// Start every member (ascending priority).
    Start { /// Environment name or id.
        env: String, #[command(flatten)] wait: WaitArg },
    /// Stop every member (descending priority).
    Stop { /// Environment name or id.
        env: String, #[command(flatten)] wait: WaitArg },
    /// Suspend every member (descending priority).
    Suspend { /// Environment name or id.
        env: String, #[command(flatten)] wait: WaitArg },
    /// Resume every member (ascending priority).
    Resume { /// Environment name or id.
        env: String, #[command(flatten)] wait: WaitArg },
    /// Destroy every member, then the environment.
    Destroy { /// Environment name or id.
        env: String, #[command(flatten)] wait: WaitArg },
    /// List environments.
    List { /// Include destroyed ones.
        #[arg(long)] all: bool },
    /// Show an environment and its members.
    Show { /// Environment name or id.
        env: String },
}

/// `container` subcommands.
#[derive(Debug, Subcommand)]
pub enum ContainerCmd {
    /// Create a standalone container (outside any environment).
    Create { #[command(flatten)] new: NewContainerArgs, #[command(flatten)] wait: WaitArg },
    /// Start a stopped container.
    Start { /// Container id.
        id: i64, #[command(flatten)] wait: WaitArg },
    /// Stop a running or suspended container.
    Stop { /// Container id.
        id: i64, #[command(flatten)] wait: WaitArg },
    /// Freeze a running container.
    Suspend { /// Container id.
        id: i64, #[command(flatten)] wait: WaitArg },
    /// Thaw a suspended container.
    Resume { /// Container id.
        id: i64, #[command(flatten)] wait: WaitArg },
    /// Restart a running container.
    Reboot { /// Container id.
        id: i64, #[command(flatten)] wait: WaitArg },
    /// Change the resources of a container (unnamed figures stay).
    Update { /// Container id.
        id: i64, #[command(flatten)] resources: ResourceArgs, #[command(flatten)] wait: WaitArg },
    /// Destroy a container.
    Destroy { /// Container id.
        id: i64, #[command(flatten)] wait: WaitArg },
    /// Copy a container (cold); the copy gets a new id and IP.
    Clone { /// Container id.
        id: i64, /// Server for the copy (default: the source's).
        #[arg(long = "on", value_name = "SERVER")] on: Option<String>, #[command(flatten)] wait: WaitArg },
    /// Move a container to another server (cold).
    Migrate { /// Container id.
        id: i64, /// Target server.
        #[arg(long)] to: String, #[command(flatten)] wait: WaitArg },
    /// List containers.
    List {
        /// Only members of this environment.
        #[arg(long)] env: Option<String>,
        /// Only this status.
        #[arg(long)] status: Option<String>,
        /// Only on this server.
        #[arg(long = "on", value_name = "SERVER")] on: Option<String>,
        /// Only this type.
        #[arg(long = "type")] type_id: Option<String>,
        /// Include destroyed and failed containers.
        #[arg(long)] all: bool,
    },
    /// Show a container.
    Show { /// Container id.
        id: i64 },
}

/// `server` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// List servers with their load.
    List,
    /// Show a server.
    Show { /// Server name or id.
        server: String },
}

/// `command` subcommands.
#[derive(Debug, Subcommand)]
pub enum CommandCmd {
    /// List commands, newest first.
    List {
        /// Only this status (queued, running, waiting, succeeded, failed, cancelled).
        #[arg(long)] status: Option<String>,
        /// Only children of this command.
        #[arg(long)] parent: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 50)] limit: u64,
    },
    /// Show a command.
    Show { /// Command id.
        id: i64 },
    /// Wait until a command finishes; exits non-zero if it failed.
    Wait { /// Command id.
        id: i64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)] timeout: u64 },
    /// Cancel a queued command that has not started.
    Cancel { /// Command id.
        id: i64 },
}

/// `bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Durable no-op command throughput of the queue, on SQLite and (if reachable) PostgreSQL.
    Queue(crate::bench::QueueBenchArgs),
}

/// Runs the CLI.
pub async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.server);
    let out = Out { json: cli.json };
    match cli.command {
        Top::Serve(args) => serve(args).await,
        Top::Bench(BenchCmd::Queue(args)) => crate::bench::queue(args).await,
        Top::Env(cmd) => env(&client, out, cmd).await,
        Top::Container(cmd) => container(&client, out, cmd).await,
        Top::Server(cmd) => match cmd {
            ServerCmd::List => {
                let list: Vec<Server> = client.get("/v1/servers").await?;
                out.show(&list, || output::servers(&list));
                Ok(())
            }
            ServerCmd::Show { server } => {
                let s: Server = client.get(&format!("/v1/servers/{}", enc(&server))).await?;
                out.show(&s, || output::servers(std::slice::from_ref(&s)));
                Ok(())
            }
        },
        Top::Command(cmd) => command(&client, out, cmd).await,
    }
}

#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn show<T: serde::Serialize>(&self, v: &T, human: impl FnOnce() -> String) {
        if self.json {
            output::json(v);
        } else {
            println!("{}", human());
        }
    }

    /// Reports a submitted command; with `wait`, follows it to its end.
    async fn accepted(&self, client: &Client, a: Accepted, wait: WaitArg, what: &str) -> Result<()> {
        if !wait.wait {
            self.show(&a, || format!("{what}: command {} queued (watch it with `cloud48 command wait {}`)", a.command_id, a.command_id));
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
async fn follow(client: &Client, id: i64, spinner: bool) -> Result<Command> {
    let bar = if spinner { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    let cmd = client
        .wait(id, |c| {
            let detail = c.waiting_on.as_deref().map(|w| format!(" ({w})")).unwrap_or_default();
            bar.set_message(format!("command {} {} {}: step {}{detail}", c.id, c.kind, c.status, c.step));
        })
        .await;
    bar.finish_and_clear();
    cmd
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn env(client: &Client, out: Out, cmd: EnvCmd) -> Result<()> {
    match cmd {
        EnvCmd::Create { name, wait } => {
            let a = client.submit("/v1/environments", Some(&json!({ "name": name }))).await?;
            out.accepted(client, a, wait, &format!("creating environment {name}")).await
        }
        EnvCmd::Add { env, new, wait } => {
            let req = AddContainer { type_id: new.type_id.clone(), requirements: new.requirements()?, server: new.on.clone() };
            let a = client.submit(&format!("/v1/environments/{}/containers", enc(&env)), Some(&req)).await?;
            out.accepted(client, a, wait, &format!("adding a {} container to {env}", new.type_id)).await
        }
        EnvCmd::Remove { env, container, wait } => {
            let a = client.submit::<()>(&format!("/v1/environments/{}/containers/{container}", enc(&env)), None).await?;
            out.accepted(client, a, wait, &format!("removing container {container} from {env}")).await
        }
        EnvCmd::Start { env, wait } => env_op(client, out, "start", &env, wait).await,
        EnvCmd::Stop { env, wait } => env_op(client, out, "stop", &env, wait).await,
        EnvCmd::Suspend { env, wait } => env_op(client, out, "suspend", &env, wait).await,
        EnvCmd::Resume { env, wait } => env_op(client, out, "resume", &env, wait).await,
        EnvCmd::Destroy { env, wait } => env_op(client, out, "destroy", &env, wait).await,
        EnvCmd::List { all } => {
            let list: Vec<Environment> = client.get(&format!("/v1/environments?all={all}")).await?;
            out.show(&list, || output::environments(&list));
            Ok(())
        }
        EnvCmd::Show { env } => {
            let e: Environment = client.get(&format!("/v1/environments/{}", enc(&env))).await?;
            out.show(&e, || output::environment(&e));
            Ok(())
        }
    }
}

async fn env_op(client: &Client, out: Out, op: &str, env: &str, wait: WaitArg) -> Result<()> {
    let a = client
        .post(&format!("/v1/environments/{}/{op}", enc(env)), &json!({}))
        .await?;
    out.accepted(client, a, wait, &format!("{op} of environment {env}")).await
}

async fn container(client: &Client, out: Out, cmd: ContainerCmd) -> Result<()> {
    let action = |id: i64, op: &ContainerCommand| {
        let path = format!("/v1/containers/{id}/actions");
        let body = serde_json::to_value(op).expect("serializable");
        (path, body)
    };
    let (id, op, wait) = match cmd {
        ContainerCmd::Create { new, wait } => {
            let req = CreateContainer { type_id: new.type_id.clone(), server: new.on.clone(), requirements: new.requirements()? };
            let a = client.submit("/v1/containers", Some(&req)).await?;
            let what = format!("creating container {}", a.object_id.unwrap_or_default());
            return out.accepted(client, a, wait, &what).await;
        }
        ContainerCmd::Start { id, wait } => (id, ContainerCommand::Start, wait),
        ContainerCmd::Stop { id, wait } => (id, ContainerCommand::Stop, wait),
        ContainerCmd::Suspend { id, wait } => (id, ContainerCommand::Suspend, wait),
        ContainerCmd::Resume { id, wait } => (id, ContainerCommand::Resume, wait),
        ContainerCmd::Reboot { id, wait } => (id, ContainerCommand::Reboot, wait),
        ContainerCmd::Destroy { id, wait } => (id, ContainerCommand::Destroy, wait),
        ContainerCmd::Update { id, resources, wait } => {
            if !resources.any() {
                bail!("name at least one of --cpu-millis, --memory-mb, --disk-mb");
            }
            let current: Container = client.get(&format!("/v1/containers/{id}")).await?;
            let resources = resources.over(current.requirements.resources);
            (id, ContainerCommand::Update { resources }, wait)
        }
        ContainerCmd::Clone { id, on, wait } => (id, ContainerCommand::Clone { server: on }, wait),
        ContainerCmd::Migrate { id, to, wait } => (id, ContainerCommand::Migrate { to }, wait),
        ContainerCmd::List { env, status, on, type_id, all } => {
            let mut q = vec![format!("all={all}")];
            for (k, v) in [("environment", env), ("status", status), ("server", on), ("type", type_id)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(&v)));
                }
            }
            let list: Vec<Container> = client.get(&format!("/v1/containers?{}", q.join("&"))).await?;
            out.show(&list, || output::containers(&list));
            return Ok(());
        }
        ContainerCmd::Show { id } => {
            let c: Container = client.get(&format!("/v1/containers/{id}")).await?;
            out.show(&c, || output::container(&c));
            return Ok(());
        }
    };
    let (path, body) = action(id, &op);
    let a = client.submit(&path, Some(&body)).await?;
    out.accepted(client, a, wait, &format!("{} of container {id}", op.kind())).await
}

async fn command(client: &Client, out: Out, cmd: CommandCmd) -> Result<()> {
    match cmd {
        CommandCmd::List { status, parent, limit } => {
            let mut q = vec![format!("limit={limit}")];
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
            let c = tokio::time::timeout(Duration::from_secs(timeout), follow(client, id, !out.json))
                .await
                .with_context(|| format!("command {id} did not finish within {timeout} s"))??;
            out.show(&c, || output::command(&c));
            finished_ok(&c)
        }
        CommandCmd::Cancel { id } => {
            let c: Command = client.post(&format!("/v1/commands/{id}/cancel"), &json!({})).await?;
            out.show(&c, || format!("command {id} cancelled"));
            Ok(())
        }
    }
}

/// Runs a core until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = CoreConfig::new(&args.data_dir);
    config.database_url = args.database_url.clone();
    config.queue.workers = args.workers.max(1);
    config.queue.backoff_base = Duration::from_millis(args.retry_base_ms);
    config.queue.max_attempts = args.max_attempts.max(1);
    config.sim_servers = args.sim_servers;
    config.sim_latency = Duration::from_millis(args.sim_latency_ms);
    let core = Core::open(config).await?;
    core.start().await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, data_dir = %args.data_dir.display(), platform = core.platform_name(), "cloud48 core serving");
    let app = crate::api::router(core.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("HTTP server failed")?;
    tracing::info!("stopping: letting running steps finish");
    core.stop(Duration::from_secs(10)).await;
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
