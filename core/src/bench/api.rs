//! `cloud48 bench api`: single container creates submitted through the REST API over real HTTP,
//! each request signed with HTTP Digest, against an embedded core on the default settings
//! (SQLite, simulated servers). Reports accepted requests per second and the time from
//! enqueue (the command row committed) to start (claimed by the queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use sea_orm::{ConnectionTrait, Statement};

use crate::cli::{Client, Credentials};
use cloud48_engine::auth::{Anonymous, AuthConfig, Role, UserRecord};
use cloud48_engine::core::{Core, CoreConfig};
use cloud48_engine::model::{Accepted, Resources};

/// Options of `bench api`.
#[derive(Debug, Clone, Args)]
pub struct ApiBenchArgs {
    /// Creates to submit.
    #[arg(long, default_value_t = 20_000)]
    pub count: usize,
    /// Clients submitting at once, each on its own connection and Digest session.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Target rate in requests per second over all clients; 0 submits as fast as the core
    /// accepts.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Simulated servers.
    #[arg(long, default_value_t = 200)]
    pub servers: u32,
    /// Run on PostgreSQL: an existing database URL, next to which a scratch database is made
    /// for the run (default: SQLite).
    #[arg(long)]
    pub postgres: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct ApiBenchReport {
    /// Requests accepted per second.
    pub accepted_per_sec: f64,
    /// Creates finished per second, from the first request to the last create's end.
    pub finished_per_sec: f64,
    /// Enqueue to start, 50th percentile, milliseconds.
    pub p50_ms: i64,
    /// Enqueue to start, 99th percentile, milliseconds.
    pub p99_ms: i64,
    /// Commands that succeeded.
    pub succeeded: usize,
}

/// Runs the API benchmark and prints one line.
pub async fn api(args: ApiBenchArgs) -> Result<()> {
    let r = run(&args).await?;
    println!(
        "bench api ({}): {} creates by {} clients{}: {:.0} accepted/s, {:.0} finished/s; enqueue->start p50 {} ms, p99 {} ms; {} succeeded",
        if args.postgres.is_some() {
            "postgresql"
        } else {
            "sqlite"
        },
        args.count,
        args.clients,
        if args.rate > 0 {
            format!(" at {} req/s", args.rate)
        } else {
            String::new()
        },
        r.accepted_per_sec,
        r.finished_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.succeeded
    );
    Ok(())
}

/// Runs the API benchmark; fails if a create does not succeed.
pub async fn run(args: &ApiBenchArgs) -> Result<ApiBenchReport> {
    let Some(admin_url) = &args.postgres else {
        return run_on(args, None).await;
    };
    let scratch = super::Scratch::create(admin_url).await?;
    let report = run_on(args, Some(scratch.url.clone())).await;
    scratch.drop().await?;
    report
}

async fn run_on(args: &ApiBenchArgs, database_url: Option<String>) -> Result<ApiBenchReport> {
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = args.servers;
    config.database_url = database_url;
    config.sim_capacity = Resources {
        cpu_millis: 1 << 40,
        memory_mb: 1 << 40,
        disk_mb: 1 << 40,
    };
    config.sim_persist = false;
    let password = "bench-password";
    config.auth = AuthConfig {
        anonymous: Anonymous::None,
        users: vec![UserRecord::with_password(
            "bench",
            Role::Operator,
            "cloud48",
            password,
        )],
        ..AuthConfig::default()
    };
    let core = Core::open(config).await?;
    core.start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = cloud48_api::router(core.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await;
    });

    let clients = args.clients.max(1);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for client_no in 0..clients {
        let client = Client::new(&url).with_credentials(Credentials {
            user: "bench".into(),
            password: password.into(),
        });
        let next = next.clone();
        let (count, rate) = (args.count, args.rate);
        tasks.push(tokio::spawn(async move {
            // Client k sends at k/rate, then every clients/rate: together one request every
            // 1/rate, a steady stream rather than all clients at once.
            let mut pace = (rate > 0).then(|| {
                let every = Duration::from_secs_f64(clients as f64 / rate as f64);
                let first = Duration::from_secs_f64(client_no as f64 / rate as f64);
                let mut i = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            let body = serde_json::json!({ "type": "plain" });
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                let _: Accepted = client.post("/v1/containers", &body).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a client panicked")??;
    }
    let submitted = began.elapsed();
    // Every create finishes; then the latencies come from the commands' own times.
    let db = core.db().clone();
    loop {
        let left = count(&db, "SELECT COUNT(*) FROM commands WHERE status NOT IN ('succeeded', 'failed', 'cancelled')").await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let finished = began.elapsed();
    let succeeded = count(
        &db,
        "SELECT COUNT(*) FROM commands WHERE kind = 'container.create' AND status = 'succeeded'",
    )
    .await? as usize;
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT started_at - created_at FROM commands WHERE kind = 'container.create' AND started_at IS NOT NULL ORDER BY 1",
        ))
        .await?;
    let waits: Vec<i64> = rows
        .iter()
        .map(|r| r.try_get_by_index::<i64>(0))
        .collect::<Result<_, _>>()?;
    let pct = |p: f64| {
        waits
            .get(((waits.len() as f64 * p) as usize).min(waits.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    server.abort();
    core.stop(Duration::from_secs(5)).await;
    anyhow::ensure!(
        succeeded == args.count,
        "only {succeeded} of {} creates succeeded",
        args.count
    );
    Ok(ApiBenchReport {
        accepted_per_sec: args.count as f64 / submitted.as_secs_f64(),
        finished_per_sec: args.count as f64 / finished.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        succeeded,
    })
}

async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .context("COUNT returns a row")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}
