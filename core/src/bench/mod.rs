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
mod failover;
pub mod images;
mod linux;
pub mod load;
mod place;
pub mod vm;
pub use api::ApiBenchArgs;
pub use failover::{FailoverBenchArgs, FailoverRealBenchArgs, failover, failover_real};
pub use linux::{LinuxBenchArgs, linux};
pub use place::{PlaceBenchArgs, place};

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
