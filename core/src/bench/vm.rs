//! `bench vm` (needs root, QEMU, debootstrap): virtual machines on the qemu driver.
//!
//! The reference nginx image's VM variant is built by its recipe (cached); two qemu drivers on
//! one network boot VMs of it one at a time until nginx answers (create, which makes the VM's
//! overlay disk, and start to ready: median and p95), move a VM serving HTTP live between them
//! while a client keeps asking it (total time, QEMU's downtime, the longest gap between two
//! answers the client saw, failed requests), and move a VM whose disk holds `--disk-mb` of
//! its own data cold (stop, export, import, start); clones of a stopped VM are timed too. Says
//! which accelerator ran the VMs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;

use cloud48_engine::driver::{Driver, ExecOutput, GuestSpec, GuestState};
use cloud48_engine::images::{Builder, DEFAULT_MIRROR, Store};
use cloud48_engine::model::{Check, Endpoint, ImageRef, Protocol, Readiness, Resources, Workload};
use cloud48_qemu::machine::AccelChoice;
use cloud48_qemu::{QemuConfig, QemuDriver};

/// Options of `bench vm`.
#[derive(Debug, Args)]
pub struct VmBenchArgs {
    /// VMs to create and start one at a time.
    #[arg(long, default_value_t = 5)]
    pub vms: usize,
    /// Live migrations of the VM serving HTTP (back and forth).
    #[arg(long, default_value_t = 6)]
    pub migrations: usize,
    /// Memory of the migrated VM, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mb: u64,
    /// The VM's own data moved by the cold migration, MiB.
    #[arg(long, default_value_t = 2048)]
    pub disk_mb: u64,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Memory each of the two servers offers, MiB (how far a VM may grow while it runs);
    /// default: this machine's.
    #[arg(long)]
    pub server_memory_mb: Option<u64>,
    /// CPU each of the two servers offers, millis (how many vCPUs a VM may grow to while it
    /// runs); default: this machine's.
    #[arg(long)]
    pub server_cpu_millis: Option<u64>,
    /// VMs boot with room to grow while they run (the agent's `--vm-grow-live`).
    #[arg(long)]
    pub grow_live: bool,
    /// Directory of the recipes (`nginx.toml`).
    #[arg(long, default_value = "images")]
    pub recipes: PathBuf,
    /// Build cache.
    #[arg(long, env = "CLOUD48_CACHE_DIR", default_value = "/var/cache/cloud48")]
    pub cache_dir: PathBuf,
}

fn nginx() -> Workload {
    Workload {
        image: Some(ImageRef {
            reference: "cloud48/nginx".into(),
            digest: None,
        }),
        endpoints: vec![Endpoint {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        readiness: Some(Readiness {
            check: Check::Http {
                endpoint: "http".into(),
                path: "/".into(),
            },
            interval_ms: 50,
            retries: 2400,
        }),
        ..Workload::default()
    }
}

/// A VM of one vCPU (half a CPU, so that two fit a server offering one: `--server-cpu-millis
/// 1000` boots VMs without room for more vCPUs).
fn spec(id: &str, memory_mb: u64, disk_mb: u64) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: id.into(),
        type_id: "bench".into(),
        resources: Resources {
            cpu_millis: 500,
            memory_mb,
            disk_mb,
        },
        ip: None,
        workload: nginx(),
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn summary(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{label}: median {:.0} ms, p95 {:.0} ms, min {:.0} ms, max {:.0} ms (n={})",
        quantile(&ms, 0.5),
        quantile(&ms, 0.95),
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    );
}

/// One HTTP GET of `/` at `ip`: whether nginx answered 200.
async fn get(ip: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, 80)).await else {
        return false;
    };
    if s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut text = Vec::new();
    s.read_to_end(&mut text).await.is_ok() && text.starts_with(b"HTTP/1.1 200")
}

/// Asks `ip` back to back until `stop`: (answers, failures, longest gap between answers).
fn client(ip: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64, Duration)> {
    tokio::spawn(async move {
        let (mut ok, mut failed, mut gap) = (0, 0, Duration::ZERO);
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_secs(10), get(&ip)).await {
                Ok(true) => {
                    ok += 1;
                    gap = gap.max(last.elapsed());
                    last = Instant::now();
                }
                _ => failed += 1,
            }
        }
        (ok, failed, gap)
    })
}

/// Writes `mb` MiB of random data to `/srv/data` in `guest`: its checksum, as `md5sum` prints it.
async fn write_data(d: &QemuDriver, guest: &str, mb: u64) -> Result<ExecOutput> {
    let out = d
        .exec(
            guest,
            &format!("head -c {mb}M /dev/urandom > /srv/data && md5sum /srv/data && sync"),
            &[],
        )
        .await?;
    ensure!(
        out.exit_code == 0,
        "writing the data failed: {}",
        out.stderr
    );
    Ok(out)
}

/// Clones of a stopped VM with data of its own, as `container clone` makes them on one server:
/// its overlay exported, then imported as a new VM (the overlay rebased on the image's disk the
/// server already holds). The first clone is started and must hold the original's data.
async fn clones(args: &VmBenchArgs, d: &QemuDriver) -> Result<()> {
    const OWN_MB: u64 = 64;
    d.create(&spec("bench-orig", 256, 2048)).await?;
    d.start("bench-orig").await?;
    let out = write_data(d, "bench-orig", OWN_MB).await?;
    d.stop("bench-orig").await?;
    let (mut times, mut size) = (Vec::new(), 0);
    for i in 0..args.vms {
        let id = format!("bench-clone-{i}");
        let file = tempfile::NamedTempFile::new()?;
        let t = Instant::now();
        size = d.export_to("bench-orig", file.path()).await?;
        d.import_from(&spec(&id, 256, 2048), file.path()).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if i == 0 {
            d.start(&id).await?;
            let copy = d.exec(&id, "md5sum /srv/data", &[]).await?;
            ensure!(
                copy.stdout == out.stdout,
                "the clone does not hold the original's data: {} against {}",
                copy.stdout.trim(),
                out.stdout.trim()
            );
        }
        d.destroy(&id).await?;
    }
    summary(
        &format!(
            "clone of a stopped VM with {OWN_MB} MiB of its own data ({:.0} MB moved)",
            size as f64 / 1e6
        ),
        times,
    );
    d.destroy("bench-orig").await?;
    Ok(())
}

/// Runs the benchmark; prints one line per figure.
pub async fn vm(args: VmBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path().join("store"))?);
    let path = args.recipes.join("nginx.toml");
    let t = Instant::now();
    let (image, cached) = tokio::task::block_in_place(|| {
        Builder::new(&args.cache_dir, DEFAULT_MIRROR)
            .vm(true)
            .build(&path, &store, &mut |_| {})
    })
    .with_context(|| format!("building the VM variant of {}", path.display()))?;
    println!(
        "image {}: {:.1} MB, {} in {:.1} s",
        image.name.map(|n| n.to_string()).unwrap_or_default(),
        image.size as f64 / 1e6,
        if cached {
            "from the build cache"
        } else {
            "built"
        },
        t.elapsed().as_secs_f64()
    );
    let accel: AccelChoice = args.accel.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let prefix = "b48v";
    let cfg = |n: u32| QemuConfig {
        name: format!("bench-{n}"),
        data_dir: dir.path().join(format!("s{n}")),
        bridge: format!("{prefix}br"),
        subnet: "10.250.0.0/24".parse().expect("a subnet"),
        // One network (a VM moving live keeps its address), a range of it each.
        addresses: Some(
            [("10.250.0.2-10.250.0.127"), ("10.250.0.128-10.250.0.254")][n as usize]
                .parse()
                .expect("a range"),
        ),
        prefix: format!("{prefix}{n}"),
        image_cache_bytes: None,
        capacity: (args.server_memory_mb.is_some() || args.server_cpu_millis.is_some()).then(
            || {
                let machine = cloud48_engine::driver::linux::machine_capacity(dir.path());
                Resources {
                    memory_mb: args.server_memory_mb.unwrap_or(machine.memory_mb),
                    cpu_millis: args.server_cpu_millis.unwrap_or(machine.cpu_millis),
                    ..machine
                }
            },
        ),
        stop_grace: Duration::from_secs(30),
        boot_timeout: Duration::from_secs(300),
        accel,
        source: Some(store.clone() as cloud48_engine::driver::linux::images::ImageSource),
        peers: None,
        migration_host: "127.0.0.1".into(),
        grow_live: args.grow_live,
    };
    let d0 = QemuDriver::open(cfg(0))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let d1 = QemuDriver::open(cfg(1))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!("accelerator: {}", d0.accel());
    let result = run(&args, &d0, &d1).await;
    d0.teardown().await;
    d1.teardown().await;
    result
}

async fn run(args: &VmBenchArgs, d0: &QemuDriver, d1: &QemuDriver) -> Result<()> {
    // Create (the overlay disk of the image's base) and start until nginx answers; the first
    // one also unpacks the image's base on the server.
    let (mut creates, mut readies) = (Vec::new(), Vec::new());
    for i in 0..args.vms + 1 {
        let id = format!("bench-vm-{i}");
        let t = Instant::now();
        d0.create(&spec(&id, 256, 2048)).await?;
        let created = t.elapsed();
        let t = Instant::now();
        d0.start(&id).await?;
        let ready = t.elapsed();
        if i == 0 {
            println!(
                "first VM (the image's base unpacked): create {:.0} ms, start to ready {:.1} s",
                created.as_secs_f64() * 1e3,
                ready.as_secs_f64()
            );
        } else {
            creates.push(created.as_secs_f64() * 1e3);
            readies.push(ready.as_secs_f64() * 1e3);
        }
        d0.destroy(&id).await?;
    }
    summary("create (a qcow2 overlay of the image's disk)", creates);
    summary("start to ready (boot, guest agent, nginx answers)", readies);
    clones(args, d0).await?;

    // Live migration of a VM serving HTTP under a client's load.
    let info = d0.create(&spec("bench-live", args.memory_mb, 2048)).await?;
    let ip = info.ip.context("an address")?;
    d0.start("bench-live").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = client(ip.clone(), stop.clone());
    let (mut totals, mut downtimes) = (Vec::new(), Vec::new());
    let drivers: [&QemuDriver; 2] = [d0, d1];
    for i in 0..args.migrations {
        let (src, dst) = (drivers[i % 2], drivers[(i + 1) % 2]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let moved = async {
            let offer = src.live_offer("bench-live").await?;
            let keep = GuestSpec {
                ip: Some(ip.clone()),
                ..spec("bench-live", args.memory_mb, 2048)
            };
            let target = dst.live_receive(&keep, &offer).await?;
            let report = src.live_send("bench-live", &target).await?;
            dst.live_finish("bench-live").await?;
            Ok::<_, cloud48_engine::driver::DriverError>(report)
        }
        .await;
        let report = match moved {
            Ok(report) => report,
            Err(e) => {
                // What the guest's console said last, on both sides.
                let tail = |log: String| {
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(15)..].join("\n")
                };
                let (from, to) = (
                    src.logs("bench-live").await.unwrap_or_default(),
                    dst.logs("bench-live").await.unwrap_or_default(),
                );
                anyhow::bail!(
                    "live migration {} of {}: {e}\nsource console:\n{}\ntarget console:\n{}",
                    i + 1,
                    args.migrations,
                    tail(from),
                    tail(to)
                );
            }
        };
        totals.push(t.elapsed().as_secs_f64() * 1e3);
        downtimes.push(report.downtime_ms as f64);
        src.destroy("bench-live").await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, gap) = load.await?;
    summary(
        &format!(
            "live migration of a {} MiB VM serving HTTP (offer to running on the target)",
            args.memory_mb
        ),
        totals,
    );
    summary("downtime (QEMU's last pass)", downtimes);
    println!(
        "client during the migrations: {ok} answers, {failed} failed, longest gap between answers {:.0} ms",
        gap.as_secs_f64() * 1e3
    );
    let owner = drivers[args.migrations % 2];
    owner.destroy("bench-live").await?;

    // Cold migration of a VM with a large disk of its own.
    d0.create(&spec("bench-cold", 256, args.disk_mb + 1024))
        .await?;
    d0.start("bench-cold").await?;
    let t = Instant::now();
    write_data(d0, "bench-cold", args.disk_mb).await?;
    println!(
        "wrote {} MiB of random data inside the VM in {:.1} s",
        args.disk_mb,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    d0.stop("bench-cold").await?;
    let stopped = t.elapsed();
    let file = tempfile::NamedTempFile::new()?;
    let t = Instant::now();
    let bytes = d0.export_to("bench-cold", file.path()).await?;
    let exported = t.elapsed();
    let t = Instant::now();
    d1.import_from(&spec("bench-cold", 256, args.disk_mb + 1024), file.path())
        .await?;
    let imported = t.elapsed();
    let t = Instant::now();
    d1.start("bench-cold").await?;
    let started = t.elapsed();
    ensure!(
        d1.status("bench-cold").await?.map(|g| g.state) == Some(GuestState::Running),
        "the moved VM does not run"
    );
    println!(
        "cold migration of {} MiB of own data: stop {:.1} s, export {:.1} s ({:.0} MB), import {:.1} s, start {:.1} s",
        args.disk_mb,
        stopped.as_secs_f64(),
        exported.as_secs_f64(),
        bytes as f64 / 1e6,
        imported.as_secs_f64(),
        started.as_secs_f64()
    );
    d0.destroy("bench-cold").await?;
    d1.destroy("bench-cold").await?;
    Ok(())
}
