//! `bench images` (needs root, runc, debootstrap): containers that run their image.
//!
//! The reference nginx and Tomcat images are built by their recipes (cached), served by a real
//! `cloud48 serve`; a linux driver pulls them over HTTP as an agent does (pull rate), then
//! creates and starts containers of each one at a time until they answer on their port
//! (median and p95, the first one — unpack included — apart), moves a container with a large
//! upper directory to a second driver (export, import, start), and moves running nginx and
//! Tomcat containers live through CRIU (downtime).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;

use cloud48_engine::driver::linux::{ImagesConfig, LinuxConfig, LinuxDriver, sweep};
use cloud48_engine::driver::{Driver, GuestSpec};
use cloud48_engine::images::{Builder, DEFAULT_MIRROR, Store};
use cloud48_engine::model::{Check, Endpoint, ImageRef, Protocol, Readiness, Resources, Workload};

/// Options of `bench images`.
#[derive(Debug, Args)]
pub struct ImagesBenchArgs {
    /// Containers of each image to create and start one at a time.
    #[arg(long, default_value_t = 10)]
    pub containers: usize,
    /// Directory of the recipes (`nginx.toml`, `tomcat.toml`).
    #[arg(long, default_value = "images")]
    pub recipes: PathBuf,
    /// Build cache.
    #[arg(long, env = "CLOUD48_CACHE_DIR", default_value = "/var/cache/cloud48")]
    pub cache_dir: PathBuf,
    /// Size of the upper directory moved by the cold-migration case, MiB.
    #[arg(long, default_value_t = 1024)]
    pub migrate_mb: u64,
    /// Live migrations (through CRIU) of a running container of each image, back and forth
    /// between two servers on one network (0: none; needs CRIU 4.2.1 or later).
    #[arg(long, default_value_t = 10)]
    pub live_moves: usize,
    /// Data an nginx container writes into its own files before it moves live too (sent while
    /// it runs; only what changes after the checkpoint counts in the downtime), MiB.
    #[arg(long, default_value_t = 256)]
    pub live_data_mb: u64,
}

/// A workload of `image` listening on `port`, ready when it accepts connections.
fn workload(image: &str, port: u16) -> Workload {
    Workload {
        image: Some(ImageRef {
            reference: image.into(),
            digest: None,
        }),
        endpoints: vec![Endpoint {
            name: "main".into(),
            port,
            protocol: Protocol::Tcp,
        }],
        readiness: Some(Readiness {
            check: Check::Tcp {
                endpoint: "main".into(),
            },
            interval_ms: 200,
            retries: 300,
        }),
        ..Workload::default()
    }
}

fn spec(id: String, workload: &Workload) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: id,
        type_id: "bench".into(),
        resources: Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
            disk_mb: 4096,
        },
        ip: None,
        workload: workload.clone(),
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Runs the benchmark; prints one line per figure.
pub async fn images(args: ImagesBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = hex::encode(rand::random::<[u8; 24]>());
    // The core's store, filled by the recipes before the core starts.
    let data = dir.path().join("core");
    let store = Store::open(data.join("images"))?;
    for recipe in ["nginx.toml", "tomcat.toml"] {
        let path = args.recipes.join(recipe);
        let t = Instant::now();
        let (summary, cached) = tokio::task::block_in_place(|| {
            Builder::new(&args.cache_dir, DEFAULT_MIRROR).build(&path, &store, &mut |_| {})
        })
        .with_context(|| format!("building {}", path.display()))?;
        println!(
            "image {}: {:.1} MB, {} in {:.1} s",
            summary.name.map(|n| n.to_string()).unwrap_or_default(),
            summary.size as f64 / 1e6,
            if cached {
                "from the build cache"
            } else {
                "built"
            },
            t.elapsed().as_secs_f64()
        );
    }
    let config = data.with_extension("toml");
    std::fs::write(&config, format!("[agents]\ntoken = \"{token}\"\n"))?;
    let mut serve = crate::serving::ServeProcess::spawn(
        &std::env::current_exe()?,
        &data,
        &["--config", config.to_str().context("a UTF-8 path")?],
    )?;
    serve.health(true).await?;
    let source = Arc::new(cloud48_engine::agent::images::CoreImages::new(
        &serve.url,
        &token,
        tokio::runtime::Handle::current(),
    ));

    // Pull rate: the agent's store from the core over HTTP, blobs verified as they arrive.
    let pulled = Store::open(dir.path().join("pull-test"))?;
    let t = Instant::now();
    let (bytes, source, pulled, digests) = tokio::task::spawn_blocking(move || {
        let mut bytes = 0;
        let mut digests = Vec::new();
        for image in ["cloud48/nginx", "cloud48/tomcat"] {
            let summary = pulled.pull(source.as_ref(), image, None, &mut |_| {})?;
            bytes += summary.size;
            digests.push(summary.digest.to_string());
        }
        anyhow::Ok((bytes, source, pulled, digests))
    })
    .await??;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "pull from the core over HTTP (streamed, verified): {:.1} MB in {:.2} s: {:.0} MB/s",
        bytes as f64 / 1e6,
        secs,
        bytes as f64 / 1e6 / secs
    );

    // The same images from a peer agent that holds them (agents serve their stores as the
    // core serves its own).
    let peer = Arc::new(cloud48_engine::driver::sim::SimServer::new(
        "bench-peer",
        1,
        Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
            disk_mb: 1024,
        },
        cloud48_engine::driver::sim::SimLatency::uniform(std::time::Duration::ZERO),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let peer_url = format!("http://{}", listener.local_addr()?);
    let info = cloud48_engine::agent::protocol::AgentInfo {
        name: "bench-peer".into(),
        url: peer_url.clone(),
        driver: "sim".into(),
        capabilities: peer.capabilities(),
        labels: vec![],
        subnet: None,
        addresses: None,
        heartbeats: None,
        id: None,
        take_over: false,
    };
    let agent = cloud48_engine::agent::AgentService::new(
        peer,
        token.clone(),
        info,
        &dir.path().join("peer-spool"),
    )?;
    agent.serve_images(Arc::new(pulled));
    let router = agent.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let from_peer = cloud48_engine::agent::images::CoreImages::new(
        &peer_url,
        &token,
        tokio::runtime::Handle::current(),
    );
    let fresh = Store::open(dir.path().join("peer-pull-test"))?;
    let t = Instant::now();
    let bytes = tokio::task::spawn_blocking(move || {
        let mut bytes = 0;
        for digest in &digests {
            bytes += fresh.pull(&from_peer, digest, None, &mut |_| {})?.size;
        }
        anyhow::Ok(bytes)
    })
    .await??;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "pull from a peer agent over HTTP (streamed, verified): {:.1} MB in {:.2} s: {:.0} MB/s",
        bytes as f64 / 1e6,
        secs,
        bytes as f64 / 1e6 / secs
    );

    let prefix = "b48i";
    let cfg = |n: u32| LinuxConfig {
        name: format!("bench-{n}"),
        data_dir: dir.path().join(format!("s{n}")),
        bridge: format!("{prefix}br{n}"),
        subnet: format!("10.249.{}.0/22", 16 + n * 4)
            .parse()
            .expect("a valid subnet"),
        addresses: None,
        prefix: format!("{prefix}{n}"),
        capacity: Some(Resources {
            cpu_millis: 1_000_000,
            memory_mb: 1_000_000,
            disk_mb: 1_000_000,
        }),
        stop_grace: Duration::from_secs(2),
        exe: std::env::current_exe().expect("own path"),
        images: Some(ImagesConfig {
            source: Some(source.clone()),
            peers: None,
            cache_bytes: None,
            migration_host: Some("127.0.0.1".into()),
        }),
    };
    let result = async {
        let d = LinuxDriver::open(cfg(0)).await.map_err(anyhow::Error::msg)?;
        for (image, port) in [("cloud48/nginx", 80), ("cloud48/tomcat", 8080)] {
            let w = workload(image, port);
            let name = image.trim_start_matches("cloud48/");
            let t = Instant::now();
            d.create(&spec(format!("{name}-first"), &w)).await?;
            d.start(&format!("{name}-first")).await?;
            println!(
                "{image}: first container on a server without the image (pull + unpack + create + start + ready): {:.2} s",
                t.elapsed().as_secs_f64()
            );
            let mut times = Vec::new();
            for i in 0..args.containers {
                let id = format!("{name}-{i}");
                let t = Instant::now();
                d.create(&spec(id.clone(), &w)).await?;
                d.start(&id).await?;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                // One at a time: what runs does not slow the next.
                d.destroy(&id).await?;
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{image}: create + start until it accepts connections on {port}, one at a time, image cached: {} containers: median {:.0} ms, p95 {:.0} ms",
                times.len(),
                quantile(&times, 0.5),
                quantile(&times, 0.95)
            );
        }

        // Cold migration of a container with a large upper directory to another server.
        let target = LinuxDriver::open(cfg(1)).await.map_err(anyhow::Error::msg)?;
        let w = workload("cloud48/nginx", 80);
        d.create(&spec("big".into(), &w)).await?;
        let blob = dir.path().join("s0/guests/big/fs/srv");
        std::fs::create_dir_all(&blob)?;
        // Data that does not compress, as most files worth moving.
        let mut chunk = vec![0u8; 1 << 20];
        {
            use rand::RngCore;
            use std::io::Write;
            let mut f = std::fs::File::create(blob.join("data"))?;
            for _ in 0..args.migrate_mb {
                rand::rng().fill_bytes(&mut chunk);
                f.write_all(&chunk)?;
            }
        }
        let rss_before = peak_rss();
        let file = dir.path().join("big.tar.gz");
        let t = Instant::now();
        let size = d.export_to("big", &file).await?;
        let exported = t.elapsed();
        target.import_from(&spec("big".into(), &w), &file).await?;
        target.start("big").await?;
        let total = t.elapsed();
        ensure!(
            std::fs::metadata(dir.path().join("s1/guests/big/fs/srv/data"))?.len()
                == args.migrate_mb << 20,
            "the upper directory did not arrive whole"
        );
        println!(
            "cold migration of a container with a {} MiB upper directory (streamed through a {} MiB file): {:.2} s (export {:.2} s, import + start {:.2} s); peak memory grew by {} MiB",
            args.migrate_mb,
            size >> 20,
            total.as_secs_f64(),
            exported.as_secs_f64(),
            (total - exported).as_secs_f64(),
            peak_rss().saturating_sub(rss_before) >> 20
        );
        target.teardown().await;
        if args.live_moves > 0 {
            // A second server on the first one's network: what moves live keeps its address.
            let peer = LinuxDriver::open(LinuxConfig {
                bridge: format!("{prefix}br0"),
                subnet: cfg(0).subnet,
                ..cfg(2)
            })
            .await
            .map_err(anyhow::Error::msg)?;
            ensure!(
                d.capabilities().live_migrate,
                "containers cannot move live on this machine (CRIU 4.2.1 or later is needed; the log says why), or run with --live-moves 0"
            );
            for (image, port) in [("cloud48/nginx", 80), ("cloud48/tomcat", 8080)] {
                live_moves(&d, &peer, image, port, args.live_moves, 0).await?;
            }
            if args.live_data_mb > 0 {
                let mb = args.live_data_mb;
                live_moves(&d, &peer, "cloud48/nginx", 80, args.live_moves, mb).await?;
            }
            peer.teardown().await;
        }
        d.teardown().await;
        anyhow::Ok(())
    }
    .await;
    sweep(&format!("{prefix}0"), &[&format!("{prefix}br0")]);
    sweep(&format!("{prefix}1"), &[&format!("{prefix}br1")]);
    sweep(&format!("{prefix}2"), &[]);
    result
}

/// Moves a running container of `image` live `moves` times between `a` and `b`, after it
/// wrote `data_mb` MiB of its own; prints the downtime (checkpoint, what changed since its
/// files went, its memory, restore and network), the whole move, and what was sent.
async fn live_moves(
    a: &LinuxDriver,
    b: &LinuxDriver,
    image: &str,
    port: u16,
    moves: usize,
    data_mb: u64,
) -> Result<()> {
    let w = workload(image, port);
    let id = format!("live-{}-{data_mb}", image.trim_start_matches("cloud48/"));
    let ip = a
        .create(&spec(id.clone(), &w))
        .await?
        .ip
        .context("an address")?;
    a.start(&id).await?;
    if data_mb > 0 {
        let out = a
            .exec(
                &id,
                &format!("head -c {} /dev/urandom > /srv/data", data_mb << 20),
                &[],
            )
            .await?;
        ensure!(out.exit_code == 0, "writing data failed: {}", out.stderr);
    }
    let (mut down, mut total, mut sent) = (Vec::new(), Vec::new(), Vec::new());
    let mut from = (a, b);
    for _ in 0..moves {
        let (src, dst) = from;
        let offer = src.live_offer(&id).await?;
        let keep = GuestSpec {
            ip: Some(ip.clone()),
            ..spec(id.clone(), &w)
        };
        let target = dst.live_receive(&keep, &offer).await?;
        let report = src.live_send(&id, &target).await?;
        dst.live_finish(&id).await?;
        tokio::net::TcpStream::connect((ip.as_str(), port))
            .await
            .with_context(|| format!("{image} does not answer after a live move"))?;
        src.destroy(&id).await?;
        down.push(report.downtime_ms as f64);
        total.push(report.total_ms as f64);
        sent.push((report.memory_bytes + report.disk_bytes) as f64);
        from = (dst, src);
    }
    from.0.destroy(&id).await?;
    for v in [&mut down, &mut total, &mut sent] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{image} with {data_mb} MiB of its own data: live migration through CRIU, {moves} moves between two servers on one network: downtime (checkpoint + changed files + memory + restore + network) median {:.0} ms, p95 {:.0} ms; whole move median {:.0} ms; median {:.1} MB sent",
        quantile(&down, 0.5),
        quantile(&down, 0.95),
        quantile(&total, 0.5),
        quantile(&sent, 0.5) / 1e6
    );
    Ok(())
}

/// The peak resident memory of this process so far, bytes (`VmHWM`).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}
