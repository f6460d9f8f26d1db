//! `bench cluster`: several `cloud48 serve` processes on one PostgreSQL database.
//! - takeover: `count` single creates in flight on core a (slow simulated servers keep them
//!   there), then `kill -9` of core a: the time until every one of them runs again on core b;
//! - throughput: single creates submitted round-robin through 1, 2 and 3 cores, until every
//!   one has succeeded, on simulated servers behind agents (`cloud48 agent --driver sim`)
//!   that every core reaches.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::json;

use super::Scratch;
use crate::cli::Client;
use crate::serving::ServeProcess;
use cloud48_engine::model::Accepted;

/// Options of `bench cluster`.
#[derive(Debug, Args)]
pub struct ClusterBenchArgs {
    /// Commands in flight on the core that is killed.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Lease of a claimed command, ms (`queue.lease_ms` of every core).
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Single creates per throughput run.
    #[arg(long, default_value_t = 6000)]
    pub creates: usize,
    /// Servers whose heartbeats one core shares per heartbeat period in the sharing run.
    #[arg(long, default_value_t = 10_000)]
    pub servers: u32,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// An existing PostgreSQL database; a scratch database is made next to it for each run.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres: String,
}

fn spawn(data: &Path, url: &str, extra: &[&str]) -> Result<ServeProcess> {
    std::fs::create_dir_all(data)?;
    let exe = std::env::current_exe().context("cannot find the cloud48 binary")?;
    let mut args = vec!["--anonymous", "full", "--database-url", url];
    args.extend(extra);
    ServeProcess::spawn(&exe, data, &args)
}

async fn count(db: &DatabaseConnection, sql: &str) -> Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .context("a count answers one row")?;
    Ok(row.try_get_by_index(0)?)
}

/// Submits `n` single creates through `urls`, round-robin, from 16 clients.
async fn submit(urls: &[String], n: usize) -> Result<()> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..16 {
        let client = Client::new(&urls[c % urls.len()]);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({ "type": "plain", "requirements": { "cpu_millis": 1, "memory_mb": 1, "disk_mb": 1 } });
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let _: Accepted = client.post("/v1/containers", &body).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a client panicked")??;
    }
    Ok(())
}

async fn until(
    what: &str,
    limit: Duration,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done().await? {
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// `bench cluster`.
pub async fn cluster(args: ClusterBenchArgs) -> Result<()> {
    for _ in 0..args.runs {
        let scratch = Scratch::create(&args.postgres).await?;
        let result = sharing(&args, &scratch.url).await;
        scratch.drop().await?;
        result?;
    }
    for _ in 0..args.runs {
        let scratch = Scratch::create(&args.postgres).await?;
        let result = takeover(&args, &scratch.url).await;
        scratch.drop().await?;
        result?;
    }
    for cores in 1..=3 {
        for _ in 0..args.runs {
            let scratch = Scratch::create(&args.postgres).await?;
            let result = throughput(&args, &scratch.url, cores).await;
            scratch.drop().await?;
            result?;
        }
    }
    Ok(())
}

/// One core with `servers` servers, every one of which beat since the last sync: the time of
/// one heartbeat sync (`Core::sync_cluster`: write this core's beats in one statement, read
/// everyone's, read the servers, record the core), what a core spends per heartbeat period.
async fn sharing(args: &ClusterBenchArgs, url: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = cloud48_engine::CoreConfig::new(dir.path());
    config.database_url = Some(url.to_string());
    config.sim_servers = args.servers;
    config.sim_persist = false;
    config.health.background = false;
    let core = cloud48_engine::Core::open(config).await?;
    let sims = core.fleet().sims();
    let beat_all = || {
        for (id, sim) in &sims {
            core.health().heartbeat(*id, sim.heartbeat());
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = |mut t: Vec<Duration>| {
        t.sort();
        ms(t[t.len() / 2])
    };
    // The parts, then the whole.
    let (mut write, mut read, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..20 {
        beat_all();
        let mine = core.health().take_unwritten();
        let began = Instant::now();
        core.cluster().write_beats(&mine).await?;
        write.push(began.elapsed());
        let began = Instant::now();
        core.cluster().read_beats().await?;
        read.push(began.elapsed());
        beat_all();
        let began = Instant::now();
        core.sync_cluster().await?;
        whole.push(began.elapsed());
    }
    println!(
        "bench cluster sharing: {} servers, every one beat since the last sync: p50 of 20: write the beats {:.1} ms, read everyone's {:.1} ms, one whole sync {:.1} ms",
        sims.len(),
        p50(write),
        p50(read),
        p50(whole),
    );
    Ok(())
}

async fn takeover(args: &ClusterBenchArgs, url: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let servers = args.count.div_ceil(1000).max(4).to_string();
    let (workers, lease) = (args.count.to_string(), args.lease_ms.to_string());
    // Creates take ten minutes on these servers: they stay in flight.
    let flags = [
        "--sim-servers",
        servers.as_str(),
        "--sim-latency-ms",
        "600000",
        "--workers",
        workers.as_str(),
        "--lease-ms",
        lease.as_str(),
    ];
    let mut a = spawn(&dir.path().join("a"), url, &flags)?;
    a.health(true).await?;
    submit(std::slice::from_ref(&a.url), args.count).await?;
    let db = Database::connect(url).await?;
    let n = args.count as i64;
    let node = |n: &str| std::fs::read_to_string(dir.path().join(n).join("node-id"));
    let running_on = |node: String| {
        format!(
            "SELECT count(*) FROM commands WHERE status = 'running' AND lease_owner = '{}'",
            node.trim()
        )
    };
    let on_a = running_on(node("a")?);
    until(
        "every create running on core a",
        Duration::from_secs(600),
        async || Ok(count(&db, &on_a).await? == n),
    )
    .await?;
    // The other core joins once core a runs them all.
    let mut b = spawn(&dir.path().join("b"), url, &flags)?;
    b.health(true).await?;
    let on_b = running_on(node("b")?);
    let before_kill = count(&db, &on_a).await?;
    a.kill9();
    let killed = Instant::now();
    until(
        "core b runs what core a held",
        Duration::from_secs(600),
        async || Ok(count(&db, &on_b).await? == n),
    )
    .await?;
    let taken = killed.elapsed();
    println!(
        "bench cluster takeover: kill -9 of a core running {before_kill} commands (lease {} ms): all {n} running on the other core after {:.0} ms",
        args.lease_ms,
        taken.as_secs_f64() * 1e3
    );
    b.kill9();
    Ok(())
}

async fn throughput(args: &ClusterBenchArgs, url: &str, cores: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The servers are simulated behind agents every core reaches, as real servers are.
    let token = format!("bench-{:016x}", rand::random::<u64>());
    let config = dir.path().join("cloud48.toml");
    std::fs::write(&config, format!("[agents]\ntoken = \"{token}\"\n"))?;
    let config = config.to_str().context("a temporary path is UTF-8")?;
    let flags = ["--sim-servers", "0", "--config", config];
    let mut procs = Vec::new();
    for i in 0..cores {
        let mut p = spawn(&dir.path().join(format!("core-{i}")), url, &flags)?;
        p.health(true).await?;
        procs.push(p);
    }
    let urls: Vec<String> = procs.iter().map(|p| p.url.clone()).collect();
    let agents = sim_agents(dir.path(), &urls, &token, args.creates.div_ceil(1000) + 1)?;
    let db = Database::connect(url).await?;
    let n = args.creates as i64;
    let up = "SELECT count(*) FROM servers WHERE status = 'up' AND driver = 'remote'";
    until(
        "every agent's server up",
        Duration::from_secs(60),
        async || Ok(count(&db, up).await? == agents.len() as i64),
    )
    .await?;
    let began = Instant::now();
    submit(&urls, args.creates).await?;
    let submitted = began.elapsed();
    until("every create finished", Duration::from_secs(600), async || {
        Ok(count(
            &db,
            "SELECT count(*) FROM commands WHERE kind = 'container.create' AND status IN ('succeeded', 'failed')",
        )
        .await?
            >= n)
    })
    .await?;
    let finished = began.elapsed();
    let failed = count(
        &db,
        "SELECT count(*) FROM commands WHERE kind = 'container.create' AND status = 'failed'",
    )
    .await?;
    if failed > 0 {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT error, count(*) AS n FROM commands WHERE status = 'failed' GROUP BY error ORDER BY n DESC LIMIT 1",
            ))
            .await?
            .context("a failed command has an error")?;
        let (error, times): (Option<String>, i64) =
            (row.try_get("", "error")?, row.try_get("", "n")?);
        println!(
            "  most common error ({times} times): {}",
            error.unwrap_or_default()
        );
    }
    // How evenly the cores together spread the containers over the (equal) servers.
    let fewest = count(
        &db,
        "SELECT coalesce(min(alloc_containers), 0) FROM servers WHERE driver = 'remote'",
    )
    .await?;
    let most = count(
        &db,
        "SELECT coalesce(max(alloc_containers), 0) FROM servers WHERE driver = 'remote'",
    )
    .await?;
    println!(
        "bench cluster throughput: {cores} core(s), {n} single creates round-robin: submitted in {:.2} s, finished in {:.2} s: {:.0} creates/s ({failed} failed); containers per server {fewest}..{most}",
        submitted.as_secs_f64(),
        finished.as_secs_f64(),
        n as f64 / finished.as_secs_f64()
    );
    for mut p in procs {
        p.kill9();
    }
    for mut agent in agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    Ok(())
}

/// `count` sim agents (`cloud48 agent --driver sim`) beating to `cores`, each with a /22 of
/// its own (1,021 addresses) and room for thousands of small containers.
fn sim_agents(
    dir: &Path,
    cores: &[String],
    token: &str,
    count: usize,
) -> Result<Vec<std::process::Child>> {
    let exe = std::env::current_exe().context("cannot find the cloud48 binary")?;
    let mut agents = Vec::new();
    for i in 0..count {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = dir.join(format!("agent-{i}"));
        std::fs::create_dir_all(&data)?;
        let subnet = format!("10.{}.{}.0/22", 64 + i * 4 / 256, (i * 4) % 256);
        let child = std::process::Command::new(&exe)
            .args(["agent", "--driver", "sim", "--heartbeat-ms", "500"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--core", &cores.join(",")])
            .args(["--name", &format!("sim-agent-{i}"), "--subnet", &subnet])
            .args(["--capacity", "64000,1048576,10485760"])
            .arg("--data-dir")
            .arg(&data)
            .env("CLOUD48_AGENT_TOKEN", token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start a sim agent")?;
        agents.push(child);
    }
    Ok(agents)
}
