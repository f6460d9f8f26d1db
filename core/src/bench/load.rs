//! Benchmarks of the core under load, on the real `cloud48 serve` process with its default
//! settings (SQLite, simulated servers that keep their state on disk), but enough servers for
//! the containers' addresses (each simulated server has 1,021):
//! - `bench reads`: API reads while one batch creates 10,000 containers — read latency, and
//!   whether a healthy server was ever seen down;
//! - `bench restart`: `kill -9` with 10,000 commands in flight, then how long the new process
//!   takes to listen and to be ready.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::cli::Client;
use crate::serving::ServeProcess;
use cloud48_engine::model::{Accepted, Command};

/// Requirements small enough that every container of a large run fits the default servers.
fn tiny() -> Value {
    json!({ "cpu_millis": 1, "memory_mb": 1, "disk_mb": 1 })
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the cloud48 binary")
}

/// A `cloud48 serve` of this binary, local development access (`--anonymous full`).
fn spawn_serve(data: &Path, extra: &[&str]) -> Result<ServeProcess> {
    let args: Vec<&str> = ["--anonymous", "full"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    ServeProcess::spawn(&exe()?, data, &args)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Simulated servers enough for `count` containers' addresses.
fn servers_for(count: usize) -> String {
    count.div_ceil(1000).max(4).to_string()
}

/// Options of `bench reads`.
#[derive(Debug, Clone, Args)]
pub struct ReadsBenchArgs {
    /// Containers the batch creates.
    #[arg(long, default_value_t = 10_000)]
    pub count: u32,
    /// Runs, each in a fresh data directory.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
}

/// `bench reads`: one reader times `GET /v1/servers` and `GET /v1/containers?limit=100`, one
/// after the other, for as long as one batch of `count` creates runs.
pub async fn reads(args: ReadsBenchArgs) -> Result<()> {
    for _ in 0..args.runs {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let servers = servers_for(args.count as usize);
        let mut serve = spawn_serve(&data, &["--sim-servers", &servers])?;
        serve.health(true).await?;
        let client = Client::new(&serve.url);
        let a: Accepted = client
            .post(
                "/v1/containers",
                &json!({ "type": "plain", "count": args.count, "requirements": tiny() }),
            )
            .await?;
        let began = Instant::now();
        let reader = {
            let client = Client::new(&serve.url);
            async move {
                let mut took = Vec::new();
                let mut down_seen = 0u32;
                loop {
                    let t = Instant::now();
                    let servers: Vec<Value> = client.get("/v1/servers").await?;
                    took.push(t.elapsed());
                    down_seen += servers.iter().filter(|s| s["status"] != "up").count() as u32;
                    let t = Instant::now();
                    let _: Vec<Value> = client.get("/v1/containers?limit=100").await?;
                    took.push(t.elapsed());
                    let c: Command = client
                        .get(&format!("/v1/commands/{}", a.command_id))
                        .await?;
                    if c.status.is_terminal() {
                        return anyhow::Ok((took, down_seen, c));
                    }
                }
            }
        };
        let (mut took, down_seen, batch) = reader.await?;
        let elapsed = began.elapsed();
        let created = batch.result.as_ref().and_then(|r| r["created"].as_u64());
        if created != Some(args.count as u64) {
            bail!(
                "the batch did not create every container: {}",
                batch.error.as_deref().unwrap_or("no error")
            );
        }
        took.sort();
        println!(
            "bench reads: batch of {} creates in {:.1} s; {} reads meanwhile: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; servers seen down: {}",
            args.count,
            elapsed.as_secs_f64(),
            took.len(),
            percentile(&took, 0.50).as_secs_f64() * 1e3,
            percentile(&took, 0.99).as_secs_f64() * 1e3,
            took.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            down_seen
        );
        serve.kill9();
    }
    Ok(())
}

/// Options of `bench restart`.
#[derive(Debug, Clone, Args)]
pub struct RestartBenchArgs {
    /// Single creates in flight when the core is killed.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Runs, each in a fresh data directory.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
}

/// `bench restart`: `count` single creates submitted on slow simulated servers (so they stay
/// in flight), `kill -9`, a new process on the same data: time to listen, time to be ready.
pub async fn restart(args: RestartBenchArgs) -> Result<()> {
    // Slow servers keep the commands in flight; the same flags after the restart.
    let servers = servers_for(args.count);
    let flags = ["--sim-latency-ms", "500", "--sim-servers", &servers];
    for _ in 0..args.runs {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let mut serve = spawn_serve(&data, &flags)?;
        serve.health(true).await?;
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let client = Client::new(&serve.url);
            let (next, count) = (next.clone(), args.count);
            tasks.push(tokio::spawn(async move {
                let body = json!({ "type": "plain", "requirements": tiny() });
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    let _: Accepted = client.post("/v1/containers", &body).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await.context("a client panicked")??;
        }
        serve.kill9();

        let began = Instant::now();
        let mut serve = spawn_serve(&data, &flags)?;
        serve.health(false).await?;
        let listening = began.elapsed();
        serve.health(true).await?;
        let ready = began.elapsed();
        let client = Client::new(&serve.url);
        let mut in_flight = 0;
        for status in ["queued", "running", "waiting"] {
            let cmds: Vec<Command> = client
                .get_all(&format!("/v1/commands?status={status}"))
                .await?;
            in_flight += cmds.len();
        }
        println!(
            "bench restart: kill -9 with {} creates submitted; listening after {:.0} ms, ready after {:.0} ms; {} commands still in flight once ready",
            args.count,
            listening.as_secs_f64() * 1e3,
            ready.as_secs_f64() * 1e3,
            in_flight
        );
        serve.kill9();
    }
    Ok(())
}
