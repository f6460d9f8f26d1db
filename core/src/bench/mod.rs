//! `cloud48 bench ...`: measured performance of the core, printed one line per case.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
use serde_json::Value;

use cloud48_engine::core::{Core, CoreConfig};
use cloud48_engine::model::ContainerId;
use cloud48_engine::queue::NewCommand;

pub mod api;
pub mod cluster;
pub mod console;
pub mod images;
pub mod load;
pub mod vm;
pub use api::ApiBenchArgs;

/// A scratch PostgreSQL database next to the one an admin URL names, for one run.
pub(crate) struct Scratch {
    admin: sea_orm::DatabaseConnection,
    name: String,
    /// Its URL.
    pub url: String,
}

impl Scratch {
    /// Connects to `admin_url` (ending in `/DATABASE`) and creates the scratch database.
    pub(crate) async fn create(admin_url: &str) -> Result<Scratch> {
        let (base, _) = admin_url
            .rsplit_once('/')
            .context("--postgres must end with /DATABASE")?;
        let admin = Database::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to {admin_url}"))?;
        let name = format!("cloud48_bench_{:08x}", rand::random::<u32>());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(Scratch {
            url: format!("{base}/{name}"),
            admin,
            name,
        })
    }

    /// Drops it.
    pub(crate) async fn drop(self) -> Result<()> {
        self.admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

/// Options of `bench queue`.
#[derive(Debug, Args)]
pub struct QueueBenchArgs {
    /// Commands to run per database.
    #[arg(long, default_value_t = 100_000)]
    pub commands: usize,
    /// Commands executing at once (no-op commands are cheap tasks, so many slots pay off).
    #[arg(long, default_value_t = 256)]
    pub workers: usize,
    /// PostgreSQL server to measure on (a scratch database is created and dropped there).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres: String,
    /// Measure SQLite only.
    #[arg(long)]
    pub sqlite_only: bool,
}

/// Runs the queue benchmark.
pub async fn queue(args: QueueBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let rate = queue_case(dir.path(), None, &args).await?;
    println!(
        "sqlite (WAL, synchronous=NORMAL): {} commands in {:.2} s: {:.0} commands/s",
        args.commands, rate.0, rate.1
    );
    if args.sqlite_only {
        return Ok(());
    }
    let scratch = match Scratch::create(&args.postgres).await {
        Ok(s) => s,
        Err(e) => {
            println!("postgresql: skipped: {e:#}");
            return Ok(());
        }
    };
    let result = queue_case(dir.path(), Some(scratch.url.clone()), &args).await;
    scratch.drop().await?;
    let rate = result?;
    println!(
        "postgresql (synchronous_commit=on): {} commands in {:.2} s: {:.0} commands/s",
        args.commands, rate.0, rate.1
    );
    Ok(())
}

async fn queue_case(
    dir: &std::path::Path,
    database_url: Option<String>,
    args: &QueueBenchArgs,
) -> Result<(f64, f64)> {
    let data = dir.join(if database_url.is_some() {
        "pg"
    } else {
        "sqlite"
    });
    let mut config = CoreConfig::new(&data);
    config.database_url = database_url;
    config.sim_servers = 0;
    config.sim_persist = false;
    config.queue.workers = args.workers.max(1);
    config.queue.claim_batch = 512;
    config.db_connections = 8;
    let core = Core::open(config).await?;
    core.start().await?;
    let started = Instant::now();
    let noop = NewCommand {
        project: None,
        kind: cloud48_engine::model::CommandKind::Noop,
        target: None,
        params: Value::Null,
        requested_by: "bench".into(),
    };
    for chunk in (0..args.commands).collect::<Vec<_>>().chunks(5000) {
        let txn = core.db().begin().await?;
        core.queue()
            .enqueue_in(&txn, vec![noop.clone(); chunk.len()], None)
            .await?;
        txn.commit().await?;
        core.queue().wake();
    }
    let db = core.db();
    let enqueued = started.elapsed().as_secs_f64();
    // Cheap on the (status, id) index, unlike a COUNT over all finished commands.
    let unfinished = Statement::from_string(
        db.get_database_backend(),
        "SELECT id FROM commands WHERE status IN ('queued', 'running') LIMIT 1",
    );
    while db.query_one_raw(unfinished.clone()).await?.is_some() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        enqueue_secs = enqueued,
        total_secs = secs,
        "queue benchmark case done"
    );
    core.stop(Duration::from_secs(5)).await;
    Ok((secs, args.commands as f64 / secs))
}

/// Options of `bench hooks`.
#[derive(Debug, Args)]
pub struct HooksBenchArgs {
    /// Hook calls per thread.
    #[arg(long, default_value_t = 50_000)]
    pub calls: usize,
    /// Threads calling hooks at once.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Tomcats in the environment the balancer sees.
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// WIT version of the balancer: `0.2.0` (the bundled one) or `0.1.0` (the released 0.1.0
    /// component, run through the host's conversion).
    #[arg(long, default_value = "0.2.0", value_parser = ["0.2.0", "0.1.0"])]
    pub wit: String,
    /// Another build of the balancer (a WASM component of either WIT version) instead of the
    /// bundled one, to compare builds of a plugin.
    #[arg(long, value_name = "FILE", conflicts_with = "wit")]
    pub plugin: Option<std::path::PathBuf>,
}

/// The balancer as released for WIT 0.1.0 (`tests/fixtures/wit-0.1.0`), for `bench hooks`.
const BALANCER_0_1_0: &[u8] = include_bytes!("../../../tests/fixtures/wit-0.1.0/balancer.wasm");

/// Runs the hook dispatch benchmark: the bundled balancer's `after-other-is-added` (fresh
/// instance + call + state in and out, as the core does for every hook).
pub fn hooks(args: HooksBenchArgs) -> Result<()> {
    use cloud48_engine::model::ContainerStatus;
    use cloud48_engine::plugins::{Limits, PluginHost};
    use cloud48_engine::types::{ContainerType, EnvironmentView, Hook, HookContext, MemberView};

    let host = PluginHost::new(None, Limits::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let file = match &args.plugin {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        }
        None => None,
    };
    let wasm = match (&file, args.wit.as_str()) {
        (Some(bytes), _) => bytes.as_slice(),
        (None, "0.1.0") => BALANCER_0_1_0,
        (None, _) => {
            cloud48_engine::plugins::BUNDLED
                .iter()
                .find(|(n, _)| *n == "balancer")
                .context("balancer is bundled")?
                .1
        }
    };
    let plugin = std::sync::Arc::new(host.load(wasm).map_err(|e| anyhow::anyhow!("{e}"))?);
    let wit = plugin.wit_version();
    let member = |id: i64, type_id: &str| MemberView {
        id: ContainerId(id),
        type_id: type_id.into(),
        priority: 50,
        status: ContainerStatus::Running,
        server: Some(format!("sim-{}", id % 4 + 1)),
        ip: Some(format!("10.0.0.{id}")),
        resources: cloud48_engine::model::Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
            disk_mb: 2048,
        },
        endpoints: vec![cloud48_engine::model::Endpoint {
            name: "http".into(),
            port: 8080,
            protocol: cloud48_engine::model::Protocol::Http,
        }],
        params: [("algorithm".to_string(), "round-robin".to_string())].into(),
    };
    let members: Vec<MemberView> = (1..=args.members as i64)
        .map(|i| member(i, "tomcat@1.0.0"))
        .collect();
    let state = serde_json::to_vec(&serde_json::json!({
        "upstreams": members.iter().map(|m| format!("{}:8080", m.ip.as_ref().unwrap())).collect::<Vec<_>>(),
        "reloads": 3,
    }))?;
    let env = EnvironmentView {
        id: 1,
        name: "bench".into(),
        members,
        params: Default::default(),
    };
    let me = member(1000, "balancer@1.0.0");
    let other = member(2000, "tomcat@1.0.0");
    let run = |calls: usize, timings: bool| -> Result<Vec<u64>> {
        let mut samples = Vec::with_capacity(if timings { calls } else { 0 });
        let hook = Hook::AfterOtherIsAdded(other.clone());
        for _ in 0..calls {
            let ctx = HookContext {
                container: &me,
                environment: &env,
                state: &state,
            };
            let t = Instant::now();
            let out = plugin
                .handle(&hook, &ctx)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if timings {
                samples.push(t.elapsed().as_nanos() as u64);
            }
            anyhow::ensure!(
                out.new_state.is_some() && out.actions.len() == 1,
                "unexpected outcome"
            );
        }
        Ok(samples)
    };
    run(1000, false)?;
    let mut samples = run(args.calls, true)?;
    samples.sort_unstable();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0
    };
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..args.threads.max(1))
            .map(|_| s.spawn(|| run(args.calls, false)))
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        }
        Ok(())
    })?;
    let total = args.calls * args.threads.max(1);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "balancer (WIT {}) after-other-is-added ({} members): one thread median {:.1} µs, p99 {:.1} µs; {} threads: {} hooks in {:.2} s: {:.0} hooks/s",
        wit,
        args.members,
        pct(0.5),
        pct(0.99),
        args.threads.max(1),
        total,
        secs,
        total as f64 / secs
    );
    Ok(())
}

/// Options of `bench place`.
#[derive(Debug, Args)]
pub struct PlaceBenchArgs {
    /// Simulated servers.
    #[arg(long, default_value_t = 10_000)]
    pub servers: u32,
    /// Containers to create.
    #[arg(long, default_value_t = 100_000)]
    pub creates: usize,
    /// Commands executing at once.
    #[arg(long, default_value_t = 1024)]
    pub workers: usize,
    /// Most commands claimed at once (`queue.claim_batch`); commands claimed together run as
    /// groups.
    #[arg(long, default_value_t = 1024)]
    pub claim_batch: usize,
    /// Run on PostgreSQL at this admin URL (a scratch database is created and dropped there)
    /// instead of SQLite.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Database connections (PostgreSQL).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Containers per command: 1 (the default) submits one `container.create` command per
    /// container; more submits `container.create_many` commands of this many.
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
}

/// Runs the placement benchmark: container creates through the full durable path (command
/// persisted, placement decision, dummy, sim create and start, status committed).
pub async fn place(args: PlaceBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = args.servers;
    config.sim_persist = false;
    config.queue.workers = args.workers.max(1);
    config.queue.claim_batch = args.claim_batch.max(1);
    config.health.background = false;
    config.db_connections = args.connections;
    let scratch = match &args.postgres {
        Some(admin_url) => Some(Scratch::create(admin_url).await?),
        None => None,
    };
    config.database_url = scratch.as_ref().map(|s| s.url.clone());
    let result = place_case(config, &args).await;
    if let Some(scratch) = scratch {
        scratch.drop().await?;
    }
    result
}

async fn place_case(config: CoreConfig, args: &PlaceBenchArgs) -> Result<()> {
    use cloud48_engine::model::{Requirements, Resources};

    let database = if config.database_url.is_some() {
        "postgresql"
    } else {
        "sqlite"
    };
    let opened = Instant::now();
    let core = Core::open(config).await?;
    core.start().await?;
    println!(
        "{} simulated servers registered in {:.1} s",
        args.servers,
        opened.elapsed().as_secs_f64()
    );
    core.placement().record_timings(true);
    let req = Requirements {
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 256,
            disk_mb: 1024,
        },
        ..Default::default()
    };
    let started = Instant::now();
    // A bulk submitter: rows and commands in batches of 500 per transaction (guest ids set by
    // one statement per batch, in the format of `managers::guest_id_for`).
    let ty = core
        .types()
        .require("tomcat")
        .map_err(|e| anyhow::anyhow!(e))?;
    let requirements = serde_json::to_string(&req)?;
    let mut left = if args.batch > 1 { 0 } else { args.creates };
    if args.batch > 1 {
        let create = cloud48_engine::managers::CreateContainer {
            project: None,
            type_id: "tomcat".into(),
            server: None,
            requirements: Some(req.clone()),
            count: None,
        };
        let mut rest = args.creates;
        while rest > 0 {
            let n = rest.min(args.batch as usize);
            rest -= n;
            core.containers()
                .create_many(&create, n as u32, "bench")
                .await?;
        }
    }
    // The next batch's rows are made while the previous batch is written, as concurrent
    // clients would.
    let mut writing: Option<tokio::task::JoinHandle<Result<()>>> = None;
    while left > 0 {
        let n = left.min(500);
        left -= n;
        // Rows (each with its plugin's initial state) are made before the transaction, which
        // holds SQLite's only connection.
        let rows: Vec<_> = (0..n)
            .map(|_| {
                cloud48_engine::managers::creating_row(
                    core.services(),
                    ty.type_id(),
                    ty.as_ref(),
                    &requirements,
                    None,
                    cloud48_engine::projects::DEFAULT,
                )
            })
            .collect();
        if let Some(previous) = writing.take() {
            previous.await??;
        }
        writing = Some(tokio::spawn(submit_creates(core.clone(), rows)));
    }
    if let Some(last) = writing {
        last.await??;
    }
    let submitted = started.elapsed().as_secs_f64();
    let db = core.db();
    let unfinished = Statement::from_string(
        db.get_database_backend(),
        "SELECT id FROM commands WHERE status IN ('queued', 'running') LIMIT 1",
    );
    while db.query_one_raw(unfinished.clone()).await?.is_some() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let failed = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM containers WHERE status <> 'running'",
        ))
        .await?
        .and_then(|r| r.try_get::<i64>("", "n").ok())
        .unwrap_or(-1);
    let mut samples = core.placement().take_timings();
    samples.sort_unstable();
    anyhow::ensure!(!samples.is_empty(), "no placement decision was recorded");
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0
    };
    let spread = core.placement().snapshot();
    let (min, max) = spread.iter().fold((u64::MAX, 0), |(lo, hi), c| {
        (lo.min(c.containers), hi.max(c.containers))
    });
    let audit = cloud48_engine::placement::audit(db).await?;
    let grouped = core.queue().grouped_steps();
    println!(
        "{database}: {} placements/s: {} creates ({}) on {} servers in {:.2} s (submission {:.2} s), {} not running; decision p50 {:.1} µs, p99 {:.1} µs; containers per server {}..{}; {} steps ran in groups; ledger {}",
        (args.creates as f64 / secs).round(),
        args.creates,
        if args.batch > 1 {
            format!("{} per command", args.batch)
        } else {
            "one command each".to_string()
        },
        args.servers,
        secs,
        submitted,
        failed,
        pct(0.5),
        pct(0.99),
        min,
        max,
        grouped,
        if audit.is_empty() {
            "consistent".to_string()
        } else {
            format!("INCONSISTENT: {}", audit.join("; "))
        }
    );
    core.stop(Duration::from_secs(5)).await;
    anyhow::ensure!(failed == 0, "{failed} containers are not running");
    anyhow::ensure!(
        audit.is_empty(),
        "the placement ledger is inconsistent: {}",
        audit.join("; ")
    );
    Ok(())
}

/// Writes a batch of new container rows with one `container.create` command each, in one
/// transaction: the bench's bulk submitter.
async fn submit_creates(
    core: Core,
    rows: Vec<cloud48_engine::entities::container::ActiveModel>,
) -> Result<()> {
    use cloud48_engine::queue::Target;
    let txn = core.db().begin().await?;
    // Each container is named and locked by its create from the start (a create made by the
    // manager takes its lock when it first runs).
    cloud48_engine::managers::insert_creates(
        &txn,
        core.queue(),
        core.platform_name(),
        rows,
        |_, id| NewCommand {
            project: None,
            kind: cloud48_engine::model::CommandKind::ContainerCreate,
            target: Some(Target::Container(id)),
            params: cloud48_engine::commands::params::to_value(
                cloud48_engine::commands::params::Create::on(None),
            ),
            requested_by: "bench".into(),
        },
        true,
    )
    .await?;
    txn.commit().await?;
    core.queue().wake();
    Ok(())
}

/// Options of `bench failover`.
#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Crashes to measure.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Tomcats in the environment.
    #[arg(long, default_value_t = 4)]
    pub tomcats: usize,
}

/// Measures failover under the default health settings: the time from a crash of the
/// balancer's server to a replacement balancer that is running with every tomcat registered
/// (its nginx rewrite exec'd).
pub async fn failover(args: FailoverBenchArgs) -> Result<()> {
    use cloud48_engine::managers::AddContainer;
    use cloud48_engine::model::ContainerStatus;

    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = (args.trials + args.tomcats + 2) as u32;
    config.sim_persist = false;
    let core = Core::open(config).await?;
    core.start().await?;
    let (cmd, _) = core.environments().create("bench", "bench").await?;
    core.queue().wait(cmd, Duration::from_secs(30)).await?;
    for _ in 0..args.tomcats {
        let add = AddContainer {
            type_id: "tomcat".into(),
            requirements: None,
            server: None,
            params: Default::default(),
        };
        let cmd = core.environments().add("bench", &add, "bench").await?;
        let done = core.queue().wait(cmd, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            done.status.is_terminal() && done.error.is_none(),
            "adding a tomcat failed: {:?}",
            done.error
        );
    }
    let mut times = Vec::new();
    for trial in 0..args.trials {
        let env = core.environments().get_by_id("bench").await?;
        let balancer = env
            .members
            .iter()
            .find(|m| m.type_id.starts_with("balancer") && m.status == ContainerStatus::Running)
            .context("the environment has a running balancer")?
            .clone();
        let sim = core
            .fleet()
            .sim(balancer.server_id.context("placed")?.0)
            .context("simulated")?;
        let crashed = Instant::now();
        sim.crash();
        let took = loop {
            let env = core.environments().get_by_id("bench").await?;
            let tomcats: Vec<String> = env
                .members
                .iter()
                .filter(|m| m.type_id.starts_with("tomcat") && m.status == ContainerStatus::Running)
                .filter_map(|m| m.ip.as_ref().map(|ip| format!("{ip}:8080")))
                .collect();
            let replacement = env.members.iter().find(|m| {
                m.type_id.starts_with("balancer")
                    && m.status == ContainerStatus::Running
                    && m.id != balancer.id
            });
            if let Some(r) = replacement
                && let Some(s) = r.server_id.and_then(|s| core.fleet().sim(s.0))
                && let Some(g) = s.guest(&r.guest_id)
                && g.execs.last().is_some_and(|e| {
                    let mut have = e.args.clone();
                    let mut want = tomcats.clone();
                    have.sort();
                    want.sort();
                    have == want && !want.is_empty()
                })
            {
                break crashed.elapsed();
            }
            anyhow::ensure!(
                crashed.elapsed() < Duration::from_secs(60),
                "no replacement balancer within 60 s (trial {trial})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        times.push(took.as_secs_f64());
        sim.recover();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover (heartbeat {} ms, grace {} ms, check {} ms): crash of the balancer's server to a replacement balancer with all {} upstreams: median {:.2} s, max {:.2} s over {} crashes",
        core.config().health.heartbeat.as_millis(),
        core.config().health.grace.as_millis(),
        core.config().health.check.as_millis(),
        args.tomcats,
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    core.stop(Duration::from_secs(5)).await;
    Ok(())
}

/// Options of `bench linux`.
#[derive(Debug, Args)]
pub struct LinuxBenchArgs {
    /// Containers to create and start (tomcat template: a real HTTP server, ready when it answers).
    #[arg(long, default_value_t = 40)]
    pub containers: usize,
    /// Creates in flight at once for the throughput run.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Size of the directory moved by the cold-migration case, MiB.
    #[arg(long, default_value_t = 100)]
    pub migrate_mb: u64,
}

/// The linux driver on this machine (needs root): create + start latency one at a time,
/// containers per second with several in flight, and a cold migration of a container with a
/// large directory to a second driver (export, transfer as one archive, import, start).
pub async fn linux(args: LinuxBenchArgs) -> Result<()> {
    use cloud48_engine::driver::Driver;
    use cloud48_engine::driver::linux::{LinuxConfig, LinuxDriver, sweep};
    let dir = tempfile::tempdir()?;
    let prefix = "b48";
    let config = |n: u32| LinuxConfig {
        name: format!("bench-{n}"),
        data_dir: dir.path().join(format!("s{n}")),
        bridge: format!("{prefix}br{n}"),
        subnet: format!("10.249.{}.0/22", n * 4)
            .parse()
            .expect("valid subnet"),
        addresses: None,
        prefix: format!("{prefix}{n}"),
        capacity: Some(cloud48_engine::model::Resources {
            cpu_millis: 1_000_000,
            memory_mb: 1_000_000,
            disk_mb: 1_000_000,
        }),
        stop_grace: Duration::from_secs(2),
        exe: std::env::current_exe().expect("own path"),
        images: None,
    };
    let result = async {
        let d = std::sync::Arc::new(LinuxDriver::open(config(0)).await.map_err(anyhow::Error::msg)?);
        // A workload whose image this server cannot fetch: the driver runs its stand-in on the
        // declared endpoint, as for the bundled tomcat.
        let workload = cloud48_engine::model::Workload {
            image: Some(cloud48_engine::model::ImageRef { reference: "cloud48/tomcat".into(), digest: None }),
            command: vec!["catalina.sh".into(), "run".into()],
            endpoints: vec![cloud48_engine::model::Endpoint { name: "http".into(), port: 8080, protocol: cloud48_engine::model::Protocol::Http }],
            ..Default::default()
        };
        let spec = |id: String| cloud48_engine::driver::GuestSpec {
            avoid: Vec::new(),
            guest_id: id,
            type_id: "tomcat".into(),
            resources: cloud48_engine::model::Resources { cpu_millis: 100, memory_mb: 64, disk_mb: 64 },
            ip: None,
            workload: workload.clone(),
        };
        let mut times = Vec::new();
        for i in 0..args.containers {
            let t = Instant::now();
            d.create(&spec(format!("seq-{i}"))).await?;
            d.start(&format!("seq-{i}")).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
        println!("linux create+start (tomcat template, ready when HTTP answers): {} containers one at a time: median {:.1} ms, p95 {:.1} ms", times.len(), at(0.5), at(0.95));
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(args.parallel.max(1)));
        for i in 0..args.containers {
            let (d, gate, s) = (d.clone(), gate.clone(), spec(format!("par-{i}")));
            set.spawn(async move {
                let _p = gate.acquire().await;
                d.create(&s).await?;
                d.start(&s.guest_id).await
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        let secs = t.elapsed().as_secs_f64();
        println!("linux create+start, {} in flight: {} containers in {:.2} s: {:.1} containers/s", args.parallel, args.containers, secs, args.containers as f64 / secs);

        // Cold migration between two agents, as the core drives it: the source agent snapshots
        // the directory, the target agent pulls it over HTTP, imports and starts it.
        let target = std::sync::Arc::new(LinuxDriver::open(config(1)).await.map_err(anyhow::Error::msg)?);
        let token = hex::encode(rand::random::<[u8; 24]>());
        let mut remotes = Vec::new();
        for (n, driver) in [(0, d.clone() as std::sync::Arc<dyn Driver>), (1, target.clone() as std::sync::Arc<dyn Driver>)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let info = cloud48_engine::agent::protocol::AgentInfo { name: format!("bench-{n}"), url: url.clone(), driver: "linux".into(), capabilities: driver.capabilities(), labels: vec![], subnet: None, addresses: None };
            let router = cloud48_engine::agent::AgentService::new(driver, token.clone(), info, &dir.path().join(format!("spool{n}")))?.router();
            tokio::spawn(async move { axum::serve(listener, router).await });
            remotes.push(cloud48_engine::driver::remote::RemoteDriver::new(&format!("bench-{n}"), &url, &token, Default::default()));
        }
        let (source, dest) = (&remotes[0], &remotes[1]);
        source.create(&spec("big".into())).await?;
        let blob = vec![7u8; (args.migrate_mb as usize) << 20];
        std::fs::write(dir.path().join("s0/guests/big/fs/etc/cloud48/blob"), &blob)?;
        let t = Instant::now();
        let image = source.export("big").await?;
        let exported = t.elapsed();
        let moved = dest.import(&spec("big".into()), &image).await?;
        dest.start("big").await?;
        source.destroy("big").await?;
        let total = t.elapsed();
        anyhow::ensure!(
            std::fs::metadata(dir.path().join("s1/guests/big/fs/etc/cloud48/blob"))?.len() == blob.len() as u64,
            "the directory did not arrive whole"
        );
        println!(
            "linux cold migration of a {} MiB directory between two agents: {:.2} s (export {:.2} s, pull + import + start {:.2} s); answers at {}",
            args.migrate_mb,
            total.as_secs_f64(),
            exported.as_secs_f64(),
            (total - exported).as_secs_f64(),
            moved.ip.unwrap_or_default()
        );
        d.teardown().await;
        target.teardown().await;
        anyhow::Ok(())
    }
    .await;
    sweep(&format!("{prefix}0"), &[&format!("{prefix}br0")]);
    sweep(&format!("{prefix}1"), &[&format!("{prefix}br1")]);
    result
}

/// Options of `bench failover-real`.
#[derive(Debug, Args)]
pub struct FailoverRealBenchArgs {
    /// Agent kills to measure.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
}

/// Failover on real servers (needs root, nginx): a core and four agents in network namespaces,
/// two tomcats and a real nginx balancer; the time from `kill -9` of the balancer host's agent
/// to a replacement balancer that answers HTTP from both tomcats. Default health settings.
pub async fn failover_real(args: FailoverRealBenchArgs) -> Result<()> {
    use crate::lab::{CORE_IP, Lab, serves_all};
    use cloud48_engine::managers::AddContainer;
    use cloud48_engine::model::{Container, ContainerStatus};
    let token = hex::encode(rand::random::<[u8; 24]>());
    let mut lab =
        Lab::new("bfov", 4, std::env::current_exe()?, &token).map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = 0;
    config.agent_token = Some(token.clone());
    let core = Core::open(config).await?;
    core.start().await?;
    let listener = tokio::net::TcpListener::bind(std::net::SocketAddr::from((CORE_IP, 0))).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = cloud48_api::router(core.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await;
    });
    let wait_for = |what: &'static str, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        move || -> Result<()> {
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            Ok(())
        }
    };
    lab.start_agents_for_the_seed(&core, &url)
        .await
        .map_err(anyhow::Error::msg)?;
    let (cmd, _) = core.environments().create("bench", "bench").await?;
    core.queue().wait(cmd, Duration::from_secs(30)).await?;
    for host in ["h1", "h2"] {
        let add = AddContainer {
            type_id: "tomcat".into(),
            requirements: None,
            server: Some(host.into()),
            params: Default::default(),
        };
        let cmd = core.environments().add("bench", &add, "bench").await?;
        let done = core.queue().wait(cmd, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            done.error.is_none(),
            "adding a tomcat failed: {:?}",
            done.error
        );
    }
    let members = || async { anyhow::Ok(core.environments().get_by_id("bench").await?.members) };
    let running = |m: &Vec<Container>, kind: &str, not: &[ContainerId]| {
        m.iter()
            .find(|c| {
                c.type_id.starts_with(kind)
                    && c.status == ContainerStatus::Running
                    && !not.contains(&c.id)
            })
            .cloned()
    };
    let guests: Vec<String> = members()
        .await?
        .iter()
        .filter(|c| c.type_id.starts_with("tomcat"))
        .map(|c| c.guest_id.clone())
        .collect();
    let mut times = Vec::new();
    let mut old = Vec::new();
    for _ in 0..args.trials {
        let check = wait_for("a serving balancer", 60);
        let lb = loop {
            if let Some(lb) = running(&members().await?, "balancer", &old)
                && serves_all(lb.ip.as_deref().unwrap_or_default(), &guests).await
            {
                break lb;
            }
            check()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        old.push(lb.id);
        let host: u32 = lb
            .server
            .as_deref()
            .and_then(|s| s.strip_prefix('h'))
            .and_then(|s| s.parse().ok())
            .context("balancer host")?;
        anyhow::ensure!(
            host >= 3,
            "the balancer shares h{host} with a tomcat; the measurement needs it alone"
        );
        let killed = Instant::now();
        lab.kill_agent(host).await;
        let check = wait_for("a replacement balancer serving both tomcats", 60);
        loop {
            if let Some(r) = running(&members().await?, "balancer", &old)
                && serves_all(r.ip.as_deref().unwrap_or_default(), &guests).await
            {
                break;
            }
            check()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(killed.elapsed().as_secs_f64());
        lab.start_agent(host, &url).map_err(anyhow::Error::msg)?;
        let check = wait_for("the collector to remove the illegal balancer", 60);
        while core.containers().get_by_id(lb.id).await?.status != ContainerStatus::Destroyed {
            check()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover on real agents (agent heartbeat {} ms, grace {} ms, check {} ms): kill -9 of the balancer host's agent to a replacement nginx serving both tomcats over HTTP: median {:.2} s, max {:.2} s over {} kills",
        lab.heartbeat_ms,
        core.config().health.grace.as_millis(),
        core.config().health.check.as_millis(),
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    core.stop(Duration::from_secs(5)).await;
    server.abort();
    drop(lab);
    Ok(())
}
