//! `bench failover` and `bench failover-real`: from a crash of the balancer's server to a
//! replacement balancer serving with every tomcat registered, on simulated and on real servers.

use super::*;

/// Options of `bench failover`.
#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Crashes to measure.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Tomcats in the environment.
    #[arg(long, default_value_t = 4)]
    pub tomcats: usize,
}

/// Measures failover under the default health settings: the time from a crash of the
/// balancer's server to a replacement balancer that is running with every tomcat registered
/// (its nginx rewrite exec'd).
pub async fn failover(args: FailoverBenchArgs) -> Result<()> {
    use cloud48_engine::managers::AddContainer;
    use cloud48_engine::model::ContainerStatus;

    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = (args.trials + args.tomcats + 2) as u32;
    config.sim_persist = false;
    let core = Core::open(config).await?;
    core.start().await?;
    let (cmd, _) = core.environments().create("bench", "bench").await?;
    core.queue().wait(cmd, Duration::from_secs(30)).await?;
    for _ in 0..args.tomcats {
        let add = AddContainer {
            type_id: "tomcat".into(),
            requirements: None,
            server: None,
            params: Default::default(),
        };
        let cmd = core.environments().add("bench", &add, "bench").await?;
        let done = core.queue().wait(cmd, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            done.status.is_terminal() && done.error.is_none(),
            "adding a tomcat failed: {:?}",
            done.error
        );
    }
    let mut times = Vec::new();
    for trial in 0..args.trials {
        let env = core.environments().get_by_id("bench").await?;
        let balancer = env
            .members
            .iter()
            .find(|m| m.type_id.starts_with("balancer") && m.status == ContainerStatus::Running)
            .context("the environment has a running balancer")?
            .clone();
        let sim = core
            .fleet()
            .sim(balancer.server_id.context("placed")?.0)
            .context("simulated")?;
        let crashed = Instant::now();
        sim.crash();
        let took = loop {
            let env = core.environments().get_by_id("bench").await?;
            let tomcats: Vec<String> = env
                .members
                .iter()
                .filter(|m| m.type_id.starts_with("tomcat") && m.status == ContainerStatus::Running)
                .filter_map(|m| m.ip.as_ref().map(|ip| format!("{ip}:8080")))
                .collect();
            let replacement = env.members.iter().find(|m| {
                m.type_id.starts_with("balancer")
                    && m.status == ContainerStatus::Running
                    && m.id != balancer.id
            });
            if let Some(r) = replacement
                && let Some(s) = r.server_id.and_then(|s| core.fleet().sim(s.0))
                && let Some(g) = s.guest(&r.guest_id)
                && g.execs.last().is_some_and(|e| {
                    let mut have = e.args.clone();
                    let mut want = tomcats.clone();
                    have.sort();
                    want.sort();
                    have == want && !want.is_empty()
                })
            {
                break crashed.elapsed();
            }
            anyhow::ensure!(
                crashed.elapsed() < Duration::from_secs(60),
                "no replacement balancer within 60 s (trial {trial})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        times.push(took.as_secs_f64());
        sim.recover();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover (heartbeat {} ms, grace {} ms, check {} ms): crash of the balancer's server to a replacement balancer with all {} upstreams: median {:.2} s, max {:.2} s over {} crashes",
        core.config().health.heartbeat.as_millis(),
        core.config().health.grace.as_millis(),
        core.config().health.check.as_millis(),
        args.tomcats,
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    core.stop(Duration::from_secs(5)).await;
    Ok(())
}

/// Options of `bench failover-real`.
#[derive(Debug, Args)]
pub struct FailoverRealBenchArgs {
    /// Agent kills to measure.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
}

/// Failover on real servers (needs root, nginx): a core and four agents in network namespaces,
/// two tomcats and a real nginx balancer; the time from `kill -9` of the balancer host's agent
/// to a replacement balancer that answers HTTP from both tomcats. Default health settings.
pub async fn failover_real(args: FailoverRealBenchArgs) -> Result<()> {
    use crate::lab::{CORE_IP, Lab, serves_all};
    use cloud48_engine::managers::AddContainer;
    use cloud48_engine::model::{Container, ContainerStatus};
    let token = hex::encode(rand::random::<[u8; 24]>());
    let mut lab =
        Lab::new("bfov", 4, std::env::current_exe()?, &token).map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = 0;
    config.agent_token = Some(token.clone());
    let core = Core::open(config).await?;
    core.start().await?;
    let listener = tokio::net::TcpListener::bind(std::net::SocketAddr::from((CORE_IP, 0))).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = cloud48_api::router(core.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await;
    });
    let wait_for = |what: &'static str, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        move || -> Result<()> {
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            Ok(())
        }
    };
    lab.start_agents_for_the_seed(&core, &url)
        .await
        .map_err(anyhow::Error::msg)?;
    let (cmd, _) = core.environments().create("bench", "bench").await?;
    core.queue().wait(cmd, Duration::from_secs(30)).await?;
    for host in ["h1", "h2"] {
        let add = AddContainer {
            type_id: "tomcat".into(),
            requirements: None,
            server: Some(host.into()),
            params: Default::default(),
        };
        let cmd = core.environments().add("bench", &add, "bench").await?;
        let done = core.queue().wait(cmd, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            done.error.is_none(),
            "adding a tomcat failed: {:?}",
            done.error
        );
    }
    let members = || async { anyhow::Ok(core.environments().get_by_id("bench").await?.members) };
    let running = |m: &Vec<Container>, kind: &str, not: &[ContainerId]| {
        m.iter()
            .find(|c| {
                c.type_id.starts_with(kind)
                    && c.status == ContainerStatus::Running
                    && !not.contains(&c.id)
            })
            .cloned()
    };
    let guests: Vec<String> = members()
        .await?
        .iter()
        .filter(|c| c.type_id.starts_with("tomcat"))
        .map(|c| c.guest_id.clone())
        .collect();
    let mut times = Vec::new();
    let mut old = Vec::new();
    for _ in 0..args.trials {
        let check = wait_for("a serving balancer", 60);
        let lb = loop {
            if let Some(lb) = running(&members().await?, "balancer", &old)
                && serves_all(lb.ip.as_deref().unwrap_or_default(), &guests).await
            {
                break lb;
            }
            check()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        old.push(lb.id);
        let host: u32 = lb
            .server
            .as_deref()
            .and_then(|s| s.strip_prefix('h'))
            .and_then(|s| s.parse().ok())
            .context("balancer host")?;
        anyhow::ensure!(
            host >= 3,
            "the balancer shares h{host} with a tomcat; the measurement needs it alone"
        );
        let killed = Instant::now();
        lab.kill_agent(host).await;
        let check = wait_for("a replacement balancer serving both tomcats", 60);
        loop {
            if let Some(r) = running(&members().await?, "balancer", &old)
                && serves_all(r.ip.as_deref().unwrap_or_default(), &guests).await
            {
                break;
            }
            check()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(killed.elapsed().as_secs_f64());
        lab.start_agent(host, &url).map_err(anyhow::Error::msg)?;
        let check = wait_for("the collector to remove the illegal balancer", 60);
        while core.containers().get_by_id(lb.id).await?.status != ContainerStatus::Destroyed {
            check()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover on real agents (agent heartbeat {} ms, grace {} ms, check {} ms): kill -9 of the balancer host's agent to a replacement nginx serving both tomcats over HTTP: median {:.2} s, max {:.2} s over {} kills",
        lab.heartbeat_ms,
        core.config().health.grace.as_millis(),
        core.config().health.check.as_millis(),
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    core.stop(Duration::from_secs(5)).await;
    server.abort();
    drop(lab);
    Ok(())
}
