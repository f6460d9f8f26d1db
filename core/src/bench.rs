//! `cloud48 bench ...`: measured performance of the core, printed one line per case.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
use serde_json::Value;

use crate::core::{Core, CoreConfig};
use crate::queue::NewCommand;

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
    let admin = match Database::connect(&args.postgres).await {
        Ok(db) => db,
        Err(e) => {
            println!("postgresql: skipped, cannot connect to {}: {e}", args.postgres);
            return Ok(());
        }
    };
    let name = format!("cloud48_bench_{:08x}", rand::random::<u32>());
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = match args.postgres.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => anyhow::bail!("--postgres must end with /DATABASE"),
    };
    let result = queue_case(dir.path(), Some(url), &args).await;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
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
    let data = dir.join(if database_url.is_some() { "pg" } else { "sqlite" });
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
        kind: "noop".into(),
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
    tracing::info!(enqueue_secs = enqueued, total_secs = secs, "queue benchmark case done");
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
}

/// Runs the hook dispatch benchmark: the bundled balancer's `after-other-is-added` (fresh
/// instance + call + state in and out, as the core does for every hook).
pub fn hooks(args: HooksBenchArgs) -> Result<()> {
    use crate::model::ContainerStatus;
    use crate::plugins::{Limits, PluginHost};
    use crate::types::{ContainerType, EnvironmentView, Hook, HookContext, MemberView};

    let host = PluginHost::new(None, Limits::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let wasm = crate::plugins::BUNDLED.iter().find(|(n, _)| *n == "balancer").context("balancer is bundled")?.1;
    let plugin = std::sync::Arc::new(host.load(wasm).map_err(|e| anyhow::anyhow!("{e}"))?);
    let member = |id: i64, type_id: &str| MemberView {
        id,
        type_id: type_id.into(),
        priority: 50,
        status: ContainerStatus::Running,
        server: Some(format!("sim-{}", id % 4 + 1)),
        ip: Some(format!("10.0.0.{id}")),
    };
    let members: Vec<MemberView> = (1..=args.members as i64).map(|i| member(i, "tomcat@0.1.0")).collect();
    let state = serde_json::to_vec(&serde_json::json!({
        "upstreams": members.iter().map(|m| format!("{}:8080", m.ip.as_ref().unwrap())).collect::<Vec<_>>(),
        "reloads": 3,
    }))?;
    let env = EnvironmentView { id: 1, name: "bench".into(), members };
    let me = member(1000, "balancer@0.1.0");
    let other = member(2000, "tomcat@0.1.0");
    let run = |calls: usize, timings: bool| -> Result<Vec<u64>> {
        let mut samples = Vec::with_capacity(if timings { calls } else { 0 });
        let hook = Hook::AfterOtherIsAdded(other.clone());
        for _ in 0..calls {
            let ctx = HookContext { container: &me, environment: &env, state: &state };
            let t = Instant::now();
            let out = plugin.handle(&hook, &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
            if timings {
                samples.push(t.elapsed().as_nanos() as u64);
            }
            anyhow::ensure!(out.new_state.is_some() && out.actions.len() == 1, "unexpected outcome");
        }
        Ok(samples)
    };
    run(1000, false)?;
    let mut samples = run(args.calls, true)?;
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0;
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..args.threads.max(1)).map(|_| s.spawn(|| run(args.calls, false))).collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        }
        Ok(())
    })?;
    let total = args.calls * args.threads.max(1);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "balancer after-other-is-added ({} members): one thread median {:.1} µs, p99 {:.1} µs; {} threads: {} hooks in {:.2} s: {:.0} hooks/s",
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
