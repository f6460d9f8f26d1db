//! The `cloud48` command line: `serve` runs a core; the other commands talk to one over HTTP.

mod audit;
pub mod client;
mod cluster;
mod commands;
mod containers;
mod envs;
mod events;
mod image;
pub mod output;
mod plugins;
mod project;
mod serve;
mod servers;
mod users;

pub use commands::CommandCmd;
use commands::command;
pub use containers::ContainerCmd;
use containers::container;
pub use envs::EnvCmd;
use envs::env;
pub use plugins::PluginCmd;
use plugins::plugin;
pub use serve::{CoreArgs, DatabaseArgs, serve};
pub use servers::ServerCmd;
use servers::server;
pub use users::UserCmd;
use users::users;

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

/// The global flags only the client commands use: the servers' help leaves them out, and a
/// server refuses them on its command line (from the environment they are left alone).
const CLIENT_FLAGS: [&str; 4] = ["server", "json", "user", "credentials"];

/// The commands that run a long-lived server.
const SERVERS: [&str; 3] = ["serve", "agent", "guest-http"];

impl Cli {
    /// The command line's definition: `Cli`'s, with the client-only flags hidden from the
    /// servers' help.
    pub fn definition() -> clap::Command {
        let command = <Cli as clap::CommandFactory>::command();
        // A subcommand's own argument of a global one's id keeps the global one out of it.
        let hidden: Vec<clap::Arg> = command
            .get_arguments()
            .filter(|a| CLIENT_FLAGS.contains(&a.get_id().as_str()))
            .map(|a| a.clone().global(false).hide(true))
            .collect();
        SERVERS.iter().fold(command, |command, name| {
            command.mut_subcommand(name, |sub| sub.args(hidden.clone()))
        })
    }

    /// Parses the process's arguments as `Parser::parse` does (clap's message and exit on an
    /// error), and refuses a client-only flag given to a server on its command line.
    pub fn from_args() -> Cli {
        Self::from_args_of(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// `from_args` for the arguments `args` (the first is the program's name).
    pub fn from_args_of(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Cli, clap::Error> {
        use clap::FromArgMatches;
        let mut command = Self::definition();
        let matches = command.try_get_matches_from_mut(args)?;
        if let Some((name, sub)) = matches.subcommand()
            && SERVERS.contains(&name)
        {
            let given = |m: &clap::ArgMatches, flag: &str| {
                m.value_source(flag) == Some(clap::parser::ValueSource::CommandLine)
            };
            if let Some(flag) = CLIENT_FLAGS
                .iter()
                .find(|f| given(&matches, f) || given(sub, f))
            {
                let server = command.find_subcommand_mut(name).expect("a server command");
                return Err(server.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--{flag} is a flag of the client commands (which core they talk to, \
                         how they print, who signs in); `cloud48 {name}` does not take it: \
                         see `cloud48 {name} --help`"
                    ),
                ));
            }
        }
        Cli::from_arg_matches(&matches)
    }

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
        } else if self.type_id == "plain" {
            // The built-in type: no plugin to ask.
            use cloud48_engine::types::ContainerType;
            cloud48_engine::types::PlainType
                .default_requirements()
                .resources
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

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration, secrets masked, with where each value came from.
    Show(CoreArgs),
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
        Top::Server(cmd) => server(&client, out, cmd).await,
        Top::Command(cmd) => command(&client, out, cmd).await,
        Top::Plugin(cmd) => plugin(&client, out, cmd).await,
        Top::Image(cmd) => image::image(&client, out, cmd).await,
        Top::Project(cmd) => project::project(&client, out, cmd).await,
        Top::Events(args) => events::follow(&client, out, args).await,
        Top::Watch(cmd) => events::watch(&client, out, cmd).await,
        Top::Audit(args) => audit::list(&client, out, args).await,
        Top::Cluster => cluster::show(&client, out).await,
        Top::Completions { shell } => {
            let mut command = Cli::definition();
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

/// One page of a list instead of all of it.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct PageArgs {
    /// List one page of at most this many (1-1000) instead of the whole list; the next
    /// page's `--after` (or `--before`) is said on standard error.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub limit: Option<u64>,
    /// List from after this id (ascending lists: containers, environments, servers).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    pub after: Option<i64>,
}

impl PageArgs {
    /// `path` with the page's parameters.
    fn query(&self, path: &str) -> String {
        let mut q = Vec::new();
        if let Some(l) = self.limit {
            q.push(format!("limit={l}"));
        }
        if let Some(a) = self.after {
            q.push(format!("after={a}"));
        }
        if q.is_empty() {
            return path.to_string();
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}{}", q.join("&"))
    }

    fn one_page(&self) -> bool {
        self.limit.is_some() || self.after.is_some()
    }
}

/// Tells on standard error how to ask for the page after this one, if there is one.
fn say_next_page(next: Option<&str>) {
    let Some(next) = next else { return };
    let cursor = next.split(['?', '&']).find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "after" | "before").then(|| format!("--{k} {v}"))
    });
    if let Some(cursor) = cursor {
        eprintln!("more: list the next page with {cursor}");
    }
}

impl Out {
    /// Prints a list as it arrives, page by page, so that a list of any length takes the
    /// memory of one page: JSON as one array, written item by item; for people, a table per
    /// page.
    async fn list<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        client: &Client,
        path: &str,
        page: PageArgs,
        table: fn(&[T]) -> String,
    ) -> Result<()> {
        use std::io::Write;
        if page.one_page() {
            let (items, next) = client.page::<T>(&page.query(path)).await?;
            self.show(&items, || table(&items));
            say_next_page(next.as_deref());
            return Ok(());
        }
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
                    writeln!(out, "{}", output::printable(&table(&page)))?;
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
            println!("{}", output::printable(&human()));
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

async fn env_op(client: &Client, out: Out, op: &str, env: &str, wait: WaitArg) -> Result<()> {
    let a = client
        .post(&format!("/v1/environments/{}/{op}", enc(env)), &json!({}))
        .await?;
    out.accepted(client, a, wait, &format!("{op} of environment {env}"))
        .await
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
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
            if mode & 0o077 != 0 {
                eprintln!(
                    "warning: credentials file {} may be read by other users (mode {:o}); make it private: chmod 600 {}",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
        }
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

    /// The servers' help leaves out the client-only flags and their command lines refuse
    /// them, naming the flag; a client command still shows and takes them.
    #[test]
    fn servers_neither_show_nor_take_the_client_flags() {
        let mut definition = Cli::definition();
        // As parsing does: global flags reach the subcommands.
        definition.build();
        for server in super::SERVERS {
            let help = definition
                .find_subcommand_mut(server)
                .unwrap()
                .render_long_help()
                .to_string();
            for flag in super::CLIENT_FLAGS {
                assert!(
                    !help.contains(&format!("--{flag} ")),
                    "{server}: --{flag} in\n{help}"
                );
            }
        }
        let help = definition
            .find_subcommand_mut("cluster")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--server <SERVER>"), "{help}");
        for args in [
            &["cloud48", "serve", "--server", "http://x"][..],
            &["cloud48", "--json", "agent", "--token", "t"],
            &["cloud48", "guest-http", "--user", "ada", "--answer", "hi"],
        ] {
            let e = Cli::from_args_of(args).unwrap_err();
            let e = format!("{:?} {e}", e.kind());
            assert!(
                e.contains("is a flag of the client commands"),
                "{args:?}: {e}"
            );
        }
        assert!(Cli::from_args_of(["cloud48", "serve", "--listen", "127.0.0.1:1"]).is_ok());
        assert!(Cli::from_args_of(["cloud48", "--json", "cluster"]).is_ok());
    }

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
                "cluster.advertise_url" => "http://10.0.0.1:4848",
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
