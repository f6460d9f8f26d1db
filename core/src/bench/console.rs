//! Benchmarks of the operator's tools against an embedded core served on loopback:
//!
//! - `bench events`: subscribers of `GET /v1/events` (on a runtime of their own) receiving
//!   every event of no-op commands submitted at once or at a steady rate (`--rate`); delivery
//!   latency is the time from the event's row being written (its `at`, the database's clock)
//!   to its arrival at a subscriber.
//! - `bench scrape`: `GET /metrics` and `GET /v1/containers?limit=100` with a million containers.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt;
use serde_json::json;

use crate::cli::Client;
use cloud48_engine::auth::{Anonymous, AuthConfig};
use cloud48_engine::core::{Core, CoreConfig};
use cloud48_engine::events::Delivery;
use cloud48_engine::model::Resources;
use cloud48_engine::queue::NewCommand;

/// Options of `bench events`.
#[derive(Debug, Clone, Args)]
pub struct EventsBenchArgs {
    /// Clients following the stream, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// No-op commands submitted (three events each: queued, running, succeeded).
    #[arg(long, default_value_t = 10_000)]
    pub commands: usize,
    /// Commands submitted per second, steadily (0: all at once, as fast as the queue takes
    /// them).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
}

/// Options of `bench scrape`.
#[derive(Debug, Clone, Args)]
pub struct ScrapeBenchArgs {
    /// Containers in the database.
    #[arg(long, default_value_t = 1_000_000)]
    pub containers: u32,
    /// Requests of each kind timed.
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// Fill this data directory (kept afterwards, for further checks) instead of a scratch one.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Seconds the restarted `cloud48 serve` is left idle before its memory is read.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
}

/// An embedded core on the default settings, anonymous access, its API on a loopback port.
async fn serve(dir: &std::path::Path, servers: u32) -> Result<(Core, String)> {
    let mut config = CoreConfig::new(dir);
    config.sim_servers = servers;
    config.sim_persist = false;
    config.sim_capacity = Resources {
        cpu_millis: 1 << 40,
        memory_mb: 1 << 40,
        disk_mb: 1 << 40,
    };
    config.auth = AuthConfig {
        anonymous: Anonymous::Full,
        ..AuthConfig::default()
    };
    let core = Core::open(config).await?;
    core.start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = cloud48_api::router(core.clone());
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await;
    });
    Ok((core, url))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The subscribers' runtime, shut down without waiting when dropped (it is dropped inside the
/// bench's own runtime, where waiting is not allowed).
struct Subscribers(Option<tokio::runtime::Runtime>);

impl Subscribers {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives until dropped")
            .handle()
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// `bench events`.
pub async fn events(args: EventsBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let (core, url) = serve(dir.path(), 4).await?;
    let expected = args.commands;
    // The subscribers stand for clients elsewhere: they run on a runtime of their own, so that
    // their parsing competes with the core for the CPUs, not for the core's own threads.
    let clients = Subscribers(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-subscriber")
            .enable_all()
            .build()
            .context("cannot start the subscribers' runtime")?,
    ));
    let mut subscribers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.subscribers.max(1));
    for _ in 0..args.subscribers {
        let client = Client::new(&url);
        let ready = ready_tx.clone();
        subscribers.push(clients.handle().spawn(async move {
            let mut stream = std::pin::pin!(client.events("/v1/events?topic=command").await?);
            let mut latencies = Vec::with_capacity(expected * 3);
            let mut finished = 0;
            while let Some(item) = stream.next().await {
                match item? {
                    Delivery::Ready(_) => ready.send(()).await?,
                    Delivery::Event(e) => {
                        latencies.push(now_ms() - e.at);
                        if e.action == "succeeded" {
                            finished += 1;
                            if finished == expected {
                                return anyhow::Ok(latencies);
                            }
                        }
                    }
                }
            }
            anyhow::bail!("the stream ended after {finished} of {expected} commands")
        }));
    }
    drop(ready_tx);
    for _ in 0..args.subscribers {
        ready_rx
            .recv()
            .await
            .context("a subscriber failed before it was ready")?;
    }
    let began = Instant::now();
    let noop = NewCommand {
        project: None,
        kind: cloud48_engine::model::CommandKind::Noop,
        target: None,
        params: serde_json::Value::Null,
        requested_by: "bench".into(),
    };
    // A burst in chunks of 500, or a steady rate in chunks of a hundredth of it.
    let (chunk, mut tick) = match args.rate {
        0 => (500, None),
        r => {
            let chunk = (r as usize / 100).max(1);
            let period = Duration::from_secs_f64(chunk as f64 / f64::from(r));
            (chunk, Some(tokio::time::interval(period)))
        }
    };
    let mut left = args.commands;
    while left > 0 {
        if let Some(t) = &mut tick {
            t.tick().await;
        }
        let n = left.min(chunk);
        core.queue()
            .enqueue_in(core.db(), vec![noop.clone(); n], None)
            .await?;
        core.queue().wake();
        left -= n;
    }
    // What was reached: a loaded machine submits slower than asked.
    let submitted = args.commands as f64 / began.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for s in subscribers {
        all.extend(s.await.context("a subscriber panicked")??);
    }
    let took = began.elapsed();
    all.sort_unstable();
    println!(
        "bench events: {} subscribers, {} commands ({}, reached {:.0}/s; {} events each): delivered in {:.1} s; latency p50 {} ms, p99 {} ms, max {} ms",
        args.subscribers,
        args.commands,
        match args.rate {
            0 => "at once".to_string(),
            r => format!("{r}/s asked"),
        },
        submitted,
        all.len() / args.subscribers.max(1),
        took.as_secs_f64(),
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0)
    );
    core.stop(Duration::from_secs(5)).await;
    drop(clients);
    Ok(())
}

/// `bench scrape`.
pub async fn scrape(args: ScrapeBenchArgs) -> Result<()> {
    // A scratch directory unless one to keep is named (removed when dropped).
    let (_scratch, dir) = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::tempdir().context("cannot create a scratch directory")?;
            let path = t.path().to_path_buf();
            (Some(t), path)
        }
    };
    let dir = dir.as_path();
    // A simulated server hands out at most 1,021 addresses (a /22).
    let (core, url) = serve(dir, args.containers / 1000 + 10).await?;
    let client = Client::new(&url);
    let filled = Instant::now();
    let mut left = args.containers;
    while left > 0 {
        let n = left.min(10_000);
        let a: cloud48_engine::model::Accepted = client
            .post(
                "/v1/containers",
                &json!({ "type": "plain", "count": n, "requirements":
                    { "cpu_millis": 1, "memory_mb": 1, "disk_mb": 1 } }),
            )
            .await?;
        let c = client.wait(a.command_id, |_| {}).await?;
        anyhow::ensure!(
            c.status == cloud48_engine::model::CommandStatus::Succeeded,
            "creating containers failed: {:?}",
            c.error
        );
        left -= n;
    }
    let fill = filled.elapsed();
    let time = |path: &'static str| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let body = client.get_text(path).await?;
            anyhow::Ok((t.elapsed(), body.len()))
        }
    };
    let (first, _) = time("/metrics").await?;
    // The first page read after the fill warms what the later ones find cached: told apart.
    let (first_list, _) = time("/v1/containers?limit=100").await?;
    let mut scrapes = Vec::new();
    let mut lists = Vec::new();
    let mut size = 0;
    for _ in 0..args.requests {
        let (t, n) = time("/metrics").await?;
        scrapes.push(t);
        size = n;
        lists.push(time("/v1/containers?limit=100").await?.0);
    }
    scrapes.sort_unstable();
    lists.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "bench scrape: {} containers (made in {:.0} s); /metrics first (census) {:.1} ms, then p50 {:.1} ms, p99 {:.1} ms ({} bytes); container list --limit 100 first {:.1} ms, then p50 {:.1} ms, p99 {:.1} ms",
        args.containers,
        fill.as_secs_f64(),
        ms(first),
        ms(percentile(&scrapes, 0.5)),
        ms(percentile(&scrapes, 0.99)),
        size,
        ms(first_list),
        ms(percentile(&lists, 0.5)),
        ms(percentile(&lists, 0.99)),
    );
    core.stop(Duration::from_secs(5)).await;
    drop(core);
    restart(dir, &args).await
}

/// The second half of `bench scrape`: the real `cloud48 serve` started on the database the
/// first half filled: time until it is ready, its memory when idle, and a whole list read
/// page by page (as `container list` streams it) with the memory that took. The simulated
/// servers start empty (their guests lived in the first process): this measures the core.
async fn restart(dir: &std::path::Path, args: &ScrapeBenchArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let started = Instant::now();
    let mut serve = crate::serving::ServeProcess::spawn(
        &exe,
        dir,
        &["--anonymous", "full", "--sim-servers", "0"],
    )?;
    serve.health(true).await?;
    let ready = started.elapsed();
    let pid = serve.child.id();
    let at_ready = memory(pid)?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle = memory(pid)?;
    let client = Client::new(&serve.url);
    let listed = Instant::now();
    let mut count = 0usize;
    client
        .pages::<serde_json::Value>("/v1/containers?limit=1000", |page| {
            count += page.len();
            Ok(())
        })
        .await?;
    let list = listed.elapsed();
    let after = memory(pid)?;
    anyhow::ensure!(
        count == args.containers as usize,
        "the list had {count} containers, not {}",
        args.containers
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "bench scrape, restart: `cloud48 serve` ready in {:.2} s with {} containers (RSS {:.0} MiB); idle {} s: RSS {:.0} MiB; whole list in pages of 1,000: {:.1} s, RSS {:.0} MiB, peak {:.0} MiB",
        ready.as_secs_f64(),
        args.containers,
        mib(at_ready.0),
        args.idle_secs,
        mib(idle.0),
        list.as_secs_f64(),
        mib(after.0),
        mib(after.1),
    );
    Ok(())
}

/// A process's resident memory now and at its peak (KiB), from `/proc/PID/status`.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the memory of process {pid}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
