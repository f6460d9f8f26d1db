//! `cloud48 container ...`: its subcommands and what each asks the core.

use super::*;

/// `container` subcommands.
#[derive(Debug, Subcommand)]
pub enum ContainerCmd {
    /// Create a standalone container (outside any environment).
    Create {
        #[command(flatten)]
        new: NewContainerArgs,
        /// How many such containers (1-10,000), made by one batched command.
        #[arg(long)]
        count: Option<u32>,
        /// Project (name or id) it belongs to; default: `default`.
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Start a stopped container.
    Start {
        /// Container id.
        id: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Stop a running or suspended container.
    Stop {
        /// Container id.
        id: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Freeze a running container.
    Suspend {
        /// Container id.
        id: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Thaw a suspended container.
    Resume {
        /// Container id.
        id: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Restart a running container.
    Reboot {
        /// Container id.
        id: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Change the resources of a container (unnamed figures stay).
    Update {
        /// Container id.
        id: i64,
        #[command(flatten)]
        resources: ResourceArgs,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Destroy a container.
    Destroy {
        /// Container id.
        id: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Copy a container (cold); the copy gets a new id and IP.
    Clone {
        /// Container id.
        id: i64,
        /// Server for the copy (default: placement chooses).
        #[arg(long = "on", value_name = "SERVER")]
        on: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Move a container to another server (cold).
    Migrate {
        /// Container id.
        id: i64,
        /// Target server (default: placement chooses, never the current server).
        #[arg(long)]
        to: Option<String>,
        /// Without stopping the container (refused with the reason where its server cannot).
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Write a stopped container (type, state, requirements, disk) to a file for another
    /// platform's `container import`.
    Export {
        /// Container id.
        id: i64,
        /// Output file (`-` for standard output).
        #[arg(long, short = 'o', default_value = "-")]
        output: String,
    },
    /// Create a container from another platform's export; it records its origin.
    Import {
        /// File written by `container export`.
        file: std::path::PathBuf,
        /// Project (name or id) it belongs to; default: `default`.
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Delete failed containers (creates that did not complete); their guests are destroyed
    /// first where they reached a server.
    Purge,
    /// List containers.
    List {
        /// Only members of this environment.
        #[arg(long)]
        env: Option<String>,
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Only on this server.
        #[arg(long = "on", value_name = "SERVER")]
        on: Option<String>,
        /// Only this type.
        #[arg(long = "type")]
        type_id: Option<String>,
        /// Only in this project (name or id).
        #[arg(long)]
        project: Option<String>,
        /// Include destroyed and failed containers.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show a container.
    Show {
        /// Container id.
        id: i64,
    },
    /// Print the recent output (stdout and stderr) of a container's main process.
    Logs {
        /// Container id.
        id: i64,
    },
    /// Print a secret the container receives, e.g. `secret 7 mysql`: the password of the
    /// mysql type's database user (shared by the members of its environment). Needs the
    /// operator role; the read is in the audit trail.
    Secret {
        /// Container id.
        id: i64,
        /// Secret name, as `${secret:NAME}` in its type's workload (`plugin show TYPE`).
        name: String,
    },
    /// Run a command inside a running container and print its output; exits with its code.
    Exec {
        /// Container id.
        id: i64,
        /// Program and arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

pub(super) async fn container(client: &Client, out: Out, cmd: ContainerCmd) -> Result<()> {
    let action = |id: i64, op: &ContainerCommand| {
        let path = format!("/v1/containers/{id}/actions");
        let body = serde_json::to_value(op).expect("serializable");
        (path, body)
    };
    let (id, op, wait) = match cmd {
        ContainerCmd::Create {
            new,
            count,
            project,
            wait,
        } => {
            let req = CreateContainer {
                type_id: new.type_id.clone(),
                server: new.on.clone(),
                requirements: new.requirements(client).await?,
                count,
                project,
            };
            let a = client.submit("/v1/containers", Some(&req)).await?;
            let what = match a.object_id {
                Some(id) => format!("creating container {id}"),
                None => format!("creating {} containers", count.unwrap_or(1)),
            };
            return out.accepted(client, a, wait, &what).await;
        }
        ContainerCmd::Start { id, wait } => (id, ContainerCommand::Start {}, wait),
        ContainerCmd::Stop { id, wait } => (id, ContainerCommand::Stop {}, wait),
        ContainerCmd::Suspend { id, wait } => (id, ContainerCommand::Suspend {}, wait),
        ContainerCmd::Resume { id, wait } => (id, ContainerCommand::Resume {}, wait),
        ContainerCmd::Reboot { id, wait } => (id, ContainerCommand::Reboot {}, wait),
        ContainerCmd::Destroy { id, wait } => (id, ContainerCommand::Destroy {}, wait),
        ContainerCmd::Update {
            id,
            resources,
            wait,
        } => {
            if !resources.any() {
                bail!("name at least one of --cpu-millis, --memory-mb, --disk-mb");
            }
            let current: Container = client.get(&format!("/v1/containers/{id}")).await?;
            let resources = resources.over(current.requirements.resources);
            (id, ContainerCommand::Update { resources }, wait)
        }
        ContainerCmd::Clone { id, on, wait } => (id, ContainerCommand::Clone { server: on }, wait),
        ContainerCmd::Migrate { id, to, live, wait } => {
            (id, ContainerCommand::Migrate { to, live }, wait)
        }
        ContainerCmd::List {
            env,
            status,
            on,
            type_id,
            project,
            all,
            page,
        } => {
            let mut q = vec![format!("all={all}")];
            for (k, v) in [
                ("environment", env),
                ("status", status),
                ("server", on),
                ("type", type_id),
                ("project", project),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(&v)));
                }
            }
            let path = format!("/v1/containers?{}", q.join("&"));
            return out.list(client, &path, page, output::containers).await;
        }
        ContainerCmd::Purge => {
            let r: cloud48_engine::managers::PurgeReport = client
                .post("/v1/containers/purge", &serde_json::json!({}))
                .await?;
            out.show(&r, || {
                let mut lines = vec![format!("purged {} failed containers", r.purged)];
                lines.extend(r.kept.iter().map(|k| format!("kept {k}")));
                lines.join("\n")
            });
            return Ok(());
        }
        ContainerCmd::Show { id } => {
            let c: Container = client.get(&format!("/v1/containers/{id}")).await?;
            out.show(&c, || output::container(&c));
            return Ok(());
        }
        ContainerCmd::Logs { id } => {
            let l: cloud48_api::ContainerLogs =
                client.get(&format!("/v1/containers/{id}/logs")).await?;
            out.show(&l, || l.logs.clone());
            return Ok(());
        }
        ContainerCmd::Secret { id, name } => {
            cloud48_engine::model::validate_name(&name)
                .map_err(|m| anyhow::anyhow!("secret name '{name}': {m}"))?;
            let s: cloud48_api::ContainerSecret = client
                .get(&format!("/v1/containers/{id}/secrets/{name}"))
                .await?;
            out.show(&s, || s.value.clone());
            return Ok(());
        }
        ContainerCmd::Exec { id, command } => {
            let r: cloud48_engine::driver::ExecOutput = client
                .post(
                    &format!("/v1/containers/{id}/exec"),
                    &json!({ "command": command }),
                )
                .await?;
            if out.json {
                out.show(&r, String::new);
            } else {
                print!("{}", r.stdout);
                eprint!("{}", r.stderr);
            }
            if r.exit_code != 0 {
                std::process::exit(r.exit_code.clamp(1, 255));
            }
            return Ok(());
        }
        ContainerCmd::Export { id, output } => {
            // A tar archive, streamed from the container's server to the file.
            let path = format!("/v1/containers/{id}/export");
            if output == "-" {
                client.download(&path, None).await?;
            } else {
                let bytes = client
                    .download(&path, Some(std::path::Path::new(&output)))
                    .await?;
                eprintln!(
                    "container {id} exported to {output} ({} MiB); import it on the other platform with `cloud48 container import {output}`",
                    bytes >> 20
                );
            }
            return Ok(());
        }
        ContainerCmd::Import {
            file,
            project,
            wait,
        } => {
            let not_export = || {
                format!(
                    "{} is not a container export (write one with `cloud48 container export ID -o FILE`)",
                    file.display()
                )
            };
            let mut first = [0u8; 1];
            std::io::Read::read_exact(
                &mut std::fs::File::open(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
                &mut first,
            )
            .with_context(not_export)?;
            let path = match project {
                Some(p) => format!("/v1/containers/import?project={}", enc(&p)),
                None => "/v1/containers/import".into(),
            };
            let (export, a) = if first[0] == b'{' {
                // A format 1 export: one JSON document.
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let export: cloud48_engine::managers::ContainerExport =
                    serde_json::from_str(&text).with_context(not_export)?;
                let a = client.submit(&path, Some(&export)).await?;
                (export, a)
            } else {
                // An archive: streamed to the core as it is.
                let export = cloud48_engine::export_archive::describe(
                    std::fs::File::open(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?,
                )
                .map_err(|e| anyhow::anyhow!("{}: {e}", not_export()))?;
                let a: Accepted = client.post_file(&path, &file, "application/x-tar").await?;
                (export, a)
            };
            let what = format!(
                "importing container {} from {} as container {}",
                export.container_id,
                export.platform,
                a.object_id.unwrap_or_default()
            );
            return out.accepted(client, a, wait, &what).await;
        }
    };
    let (path, body) = action(id, &op);
    let a = client.submit(&path, Some(&body)).await?;
    out.accepted(client, a, wait, &format!("{} of container {id}", op.kind()))
        .await
}
