//! `cloud48 demo`: the seed scenario of the design notes on an embedded core (SQLite in a
//! scratch directory, simulated servers, the bundled plugins).

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cli::output;
use cloud48_engine::core::{Core, CoreConfig};
use cloud48_engine::managers::AddContainer;
use cloud48_engine::model::{CommandId, CommandStatus, ContainerId};

async fn finish(core: &Core, id: CommandId, what: &str) -> Result<serde_json::Value> {
    let cmd = core.queue().wait(id, Duration::from_secs(60)).await?;
    if cmd.status != CommandStatus::Succeeded {
        bail!("{what} failed: {}", cmd.error.unwrap_or_default());
    }
    println!("  ✓ {what} (command {})", cmd.id);
    Ok(cmd.result.unwrap_or_default())
}

/// Runs the seed scenario and prints each step.
pub async fn run() -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut config = CoreConfig::new(dir.path());
    config.sim_servers = 3;
    let core = Core::open(config).await?;
    core.start().await?;
    let envs = core.environments();
    let by = "demo";
    println!("Seed scenario on an embedded core with 3 simulated servers:\n");
    let (cmd, _) = envs.create("shop", by).await?;
    finish(&core, cmd, "created the empty environment 'shop'").await?;
    let tomcat = AddContainer {
        type_id: "tomcat".into(),
        requirements: None,
        server: None,
        params: Default::default(),
    };
    let first = finish(
        &core,
        envs.add("shop", &tomcat, by).await?,
        "added the first tomcat: allowed, no balancer needed",
    )
    .await?;
    finish(
        &core,
        envs.add("shop", &tomcat, by).await?,
        "added the second tomcat: it asked for a balancer first",
    )
    .await?;
    let env = envs.get_by_id("shop").await?;
    println!("\n{}", output::environment(&env));
    let balancer = env
        .members
        .iter()
        .find(|m| m.type_id.starts_with("balancer@"))
        .context("no balancer was added")?;
    let shown = core.containers().get_by_id(balancer.id).await?;
    println!("{}\n", output::container(&shown));
    let first_id = ContainerId(first["container_id"].as_i64().context("no container id")?);
    finish(
        &core,
        envs.remove("shop", first_id, by).await?,
        &format!("removed tomcat {first_id}: the balancer deregistered it"),
    )
    .await?;
    let shown = core.containers().get_by_id(balancer.id).await?;
    println!("\n{}", output::container(&shown));
    core.stop(Duration::from_secs(5)).await;
    Ok(())
}
