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
