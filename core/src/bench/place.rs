//! `bench place`: container creates through the full durable path, one command per container
//! or many containers per command, on SQLite or PostgreSQL.

use super::*;

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
                    ty.as_ref(),
                    &requirements,
                    None,
                    cloud48_engine::projects::DEFAULT,
                )
            })
            .collect::<Result<_, _>>()?;
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
