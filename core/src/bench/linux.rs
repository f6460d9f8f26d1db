//! `bench linux`: create, start and cold migration of OS containers on the Linux driver.

use super::*;

/// Options of `bench linux`.
#[derive(Debug, Args)]
pub struct LinuxBenchArgs {
    /// Containers to create and start (tomcat template: a real HTTP server, ready when it answers).
    #[arg(long, default_value_t = 40)]
    pub containers: usize,
    /// Creates in flight at once for the throughput run.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Size of the directory moved by the cold-migration case, MiB.
    #[arg(long, default_value_t = 100)]
    pub migrate_mb: u64,
}

/// The linux driver on this machine (needs root): create + start latency one at a time,
/// containers per second with several in flight, and a cold migration of a container with a
/// large directory to a second driver (export, transfer as one archive, import, start).
pub async fn linux(args: LinuxBenchArgs) -> Result<()> {
    use cloud48_engine::driver::Driver;
    use cloud48_engine::driver::linux::{LinuxConfig, LinuxDriver, sweep};
    let dir = tempfile::tempdir()?;
    let prefix = "b48";
    let config = |n: u32| LinuxConfig {
        name: format!("bench-{n}"),
        data_dir: dir.path().join(format!("s{n}")),
        bridge: format!("{prefix}br{n}"),
        subnet: format!("10.249.{}.0/22", n * 4)
            .parse()
            .expect("valid subnet"),
        addresses: None,
        prefix: format!("{prefix}{n}"),
        capacity: Some(cloud48_engine::model::Resources {
            cpu_millis: 1_000_000,
            memory_mb: 1_000_000,
            disk_mb: 1_000_000,
        }),
        stop_grace: Duration::from_secs(2),
        exe: std::env::current_exe().expect("own path"),
        images: None,
    };
    let result = async {
        let d = std::sync::Arc::new(LinuxDriver::open(config(0)).await.map_err(anyhow::Error::msg)?);
        // A workload whose image this server cannot fetch: the driver runs its stand-in on the
        // declared endpoint, as for the bundled tomcat.
        let workload = cloud48_engine::model::Workload {
            image: Some(cloud48_engine::model::ImageRef { reference: "cloud48/tomcat".into(), digest: None }),
            command: vec!["catalina.sh".into(), "run".into()],
            endpoints: vec![cloud48_engine::model::Endpoint { name: "http".into(), port: 8080, protocol: cloud48_engine::model::Protocol::Http }],
            ..Default::default()
        };
        let spec = |id: String| cloud48_engine::driver::GuestSpec {
            avoid: Vec::new(),
            guest_id: id,
            type_id: "tomcat".into(),
            resources: cloud48_engine::model::Resources { cpu_millis: 100, memory_mb: 64, disk_mb: 64 },
            ip: None,
            workload: workload.clone(),
        };
        let mut times = Vec::new();
        for i in 0..args.containers {
            let t = Instant::now();
            d.create(&spec(format!("seq-{i}"))).await?;
            d.start(&format!("seq-{i}")).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
        println!("linux create+start (tomcat template, ready when HTTP answers): {} containers one at a time: median {:.1} ms, p95 {:.1} ms", times.len(), at(0.5), at(0.95));
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(args.parallel.max(1)));
        for i in 0..args.containers {
            let (d, gate, s) = (d.clone(), gate.clone(), spec(format!("par-{i}")));
            set.spawn(async move {
                let _p = gate.acquire().await;
                d.create(&s).await?;
                d.start(&s.guest_id).await
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        let secs = t.elapsed().as_secs_f64();
        println!("linux create+start, {} in flight: {} containers in {:.2} s: {:.1} containers/s", args.parallel, args.containers, secs, args.containers as f64 / secs);

        // Cold migration between two agents, as the core drives it: the source agent snapshots
        // the directory, the target agent pulls it over HTTP, imports and starts it.
        let target = std::sync::Arc::new(LinuxDriver::open(config(1)).await.map_err(anyhow::Error::msg)?);
        let token = hex::encode(rand::random::<[u8; 24]>());
        let mut remotes = Vec::new();
        for (n, driver) in [(0, d.clone() as std::sync::Arc<dyn Driver>), (1, target.clone() as std::sync::Arc<dyn Driver>)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let info = cloud48_engine::agent::protocol::AgentInfo { name: format!("bench-{n}"), url: url.clone(), driver: "linux".into(), capabilities: driver.capabilities(), labels: vec![], subnet: None, addresses: None, heartbeats: None, id: None, take_over: false };
            let router = cloud48_engine::agent::AgentService::new(driver, token.clone(), info, &dir.path().join(format!("spool{n}")))?.router();
            tokio::spawn(async move { axum::serve(listener, router).await });
            remotes.push(cloud48_engine::driver::remote::RemoteDriver::new(&format!("bench-{n}"), &url, &token, Default::default()));
        }
        let (source, dest) = (&remotes[0], &remotes[1]);
        source.create(&spec("big".into())).await?;
        let blob = vec![7u8; (args.migrate_mb as usize) << 20];
        std::fs::write(dir.path().join("s0/guests/big/fs/etc/cloud48/blob"), &blob)?;
        let t = Instant::now();
        let image = source.export("big").await?;
        let exported = t.elapsed();
        let moved = dest.import(&spec("big".into()), &image).await?;
        dest.start("big").await?;
        source.destroy("big").await?;
        let total = t.elapsed();
        anyhow::ensure!(
            std::fs::metadata(dir.path().join("s1/guests/big/fs/etc/cloud48/blob"))?.len() == blob.len() as u64,
            "the directory did not arrive whole"
        );
        println!(
            "linux cold migration of a {} MiB directory between two agents: {:.2} s (export {:.2} s, pull + import + start {:.2} s); answers at {}",
            args.migrate_mb,
            total.as_secs_f64(),
            exported.as_secs_f64(),
            (total - exported).as_secs_f64(),
            moved.ip.unwrap_or_default()
        );
        d.teardown().await;
        target.teardown().await;
        anyhow::Ok(())
    }
    .await;
    sweep(&format!("{prefix}0"), &[&format!("{prefix}br0")]);
    sweep(&format!("{prefix}1"), &[&format!("{prefix}br1")]);
    result
}
