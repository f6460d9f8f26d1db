//! `cloud48 server ...`: its subcommands and what each asks the core.

use super::*;

/// `server` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// List servers with their load.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Register the server whose node agent listens at URL (the core must share its token).
    Add {
        /// The agent's address, e.g. http://10.0.0.7:7048.
        url: String,
    },
    /// Show a server.
    Show {
        /// Server name or id.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Take no new containers and migrate every container away.
    Drain {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
        /// Move running virtual machines while they run, to servers that can receive them
        /// live (stopped containers move cold). Refused when the server cannot migrate live.
        #[arg(long)]
        live: bool,
    },
    /// Make images present on a server before containers need them (placement prefers servers
    /// that hold a container's image): IMAGE from the core, from another server's agent
    /// (--from-server), or every image of an OCI archive or layout on the server (--file).
    FetchImage {
        /// Server name.
        name: String,
        /// Image name (cloud48/nginx) or sha256: digest; optional with --file.
        image: Option<String>,
        /// Pull it from this server's agent (one that holds it) instead of the core.
        #[arg(long, conflicts_with = "file")]
        from_server: Option<String>,
        /// Import from this OCI archive or layout directory on the server itself.
        #[arg(long, value_name = "PATH")]
        file: Option<String>,
    },
    /// Take new containers again after a drain.
    Undrain {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Remove a server whose agent is gone for good: its name and subnet are free again.
    /// Refused while it is up (drain it, stop its agent, wait until it is down) and while
    /// containers other than destroyed ones are on it (destroy them first; a container down
    /// with its server is given up at once). If its agent ever starts again, it registers as
    /// a new server and the guests it still holds are destroyed as leftovers.
    Remove {
        /// Server name or id.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Simulated servers: inject a crash (no answers, no heartbeats).
    Fail {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
    },
    /// Simulated servers: end an injected crash (the server rejoins).
    Recover {
        /// Server name.
        #[arg(value_name = "SERVER")]
        name: String,
    },
}

async fn server_op(client: &Client, out: Out, server: &str, op: &str, done: &str) -> Result<()> {
    let r: cloud48_engine::managers::DrainReport = client
        .post(&format!("/v1/servers/{}/{op}", enc(server)), &json!({}))
        .await?;
    out.show(&r, || {
        format!(
            "server {} {}",
            r.server,
            r.unchanged.as_deref().unwrap_or(done)
        )
    });
    Ok(())
}

/// Runs a `server` subcommand.
pub(super) async fn server(client: &Client, out: Out, cmd: ServerCmd) -> Result<()> {
    match cmd {
        ServerCmd::List { page } => {
            out.list::<Server>(client, "/v1/servers", page, output::servers)
                .await
        }
        ServerCmd::Add { url } => {
            let s: Server = client.post("/v1/servers", &json!({ "url": url })).await?;
            out.show(&s, || output::servers(std::slice::from_ref(&s)));
            Ok(())
        }
        ServerCmd::Show { name: server } => {
            let s: Server = client.get(&format!("/v1/servers/{}", enc(&server))).await?;
            out.show(&s, || output::servers(std::slice::from_ref(&s)));
            Ok(())
        }
        ServerCmd::Drain { name: server, live } => {
            let r: cloud48_engine::managers::DrainReport = client
                .post(
                    &format!("/v1/servers/{}/drain", enc(&server)),
                    &json!({ "live": live }),
                )
                .await?;
            out.show(&r, || {
                let ids: Vec<String> = r.commands.iter().map(|c| c.0.to_string()).collect();
                let mut text = format!(
                    "server {} is draining: {} migrations submitted (commands {})",
                    r.server,
                    r.commands.len(),
                    if ids.is_empty() {
                        "none".into()
                    } else {
                        ids.join(", ")
                    }
                );
                for s in &r.skipped {
                    text.push_str(&format!("\nskipped: {s}"));
                }
                text
            });
            Ok(())
        }
        ServerCmd::FetchImage {
            name,
            image,
            from_server,
            file,
        } => {
            let r: cloud48_api::FetchedImages = client
                .post(
                    &format!("/v1/servers/{}/images", enc(&name)),
                    &json!({ "image": image, "from_server": from_server, "file": file }),
                )
                .await?;
            out.show(&r, || {
                format!("server {} holds {}", r.server, r.images.join(", "))
            });
            Ok(())
        }
        ServerCmd::Undrain { name: server } => {
            server_op(client, out, &server, "undrain", "takes containers again").await
        }
        ServerCmd::Remove { name: server } => {
            let r: cloud48_engine::agents::RemovedServer = client
                .delete(&format!("/v1/servers/{}", enc(&server)))
                .await?;
            out.show(&r, || {
                let mut text = format!("server {} (id {}) removed", r.server, r.id);
                if !r.destroyed.is_empty() {
                    let ids: Vec<String> = r.destroyed.iter().map(i64::to_string).collect();
                    text.push_str(&format!(
                        "; containers {} were given up while it was down and are destroyed",
                        ids.join(", ")
                    ));
                }
                text
            });
            Ok(())
        }
        ServerCmd::Fail { name: server } => server_op(
            client,
            out,
            &server,
            "fail",
            "crashed: it stops answering; the health monitor marks it down after the grace period",
        )
        .await,
        ServerCmd::Recover { name: server } => {
            server_op(
                client,
                out,
                &server,
                "recover",
                "recovered: heartbeats resume and the server rejoins",
            )
            .await
        }
    }
}
