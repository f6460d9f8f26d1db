//! `cloud48 command ...`: its subcommands and what each asks the core.

use super::*;

/// `command` subcommands.
#[derive(Debug, Subcommand)]
pub enum CommandCmd {
    /// List commands, newest first.
    List {
        /// Only this status (queued, running, waiting, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only children of this command.
        #[arg(long)]
        parent: Option<i64>,
        /// Only commands in this project (name or id).
        #[arg(long)]
        project: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        /// Only commands older than this one (the next page; its id is said on standard
        /// error when there are more).
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        before: Option<i64>,
    },
    /// Show a command.
    Show {
        /// Command id.
        id: i64,
    },
    /// Wait until a command finishes; exits non-zero if it failed.
    Wait {
        /// Command id.
        id: i64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel a queued command that has not started.
    Cancel {
        /// Command id.
        id: i64,
    },
}

pub(super) async fn command(client: &Client, out: Out, cmd: CommandCmd) -> Result<()> {
    match cmd {
        CommandCmd::List {
            status,
            parent,
            project,
            limit,
            before,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(b) = before {
                q.push(format!("before={b}"));
            }
            if let Some(p) = project {
                q.push(format!("project={}", enc(&p)));
            }
            if let Some(s) = status {
                q.push(format!("status={}", enc(&s)));
            }
            if let Some(p) = parent {
                q.push(format!("parent={p}"));
            }
            let (list, next) = client
                .page::<Command>(&format!("/v1/commands?{}", q.join("&")))
                .await?;
            out.show(&list, || output::commands(&list));
            say_next_page(next.as_deref());
            Ok(())
        }
        CommandCmd::Show { id } => {
            let c: Command = client.get(&format!("/v1/commands/{id}")).await?;
            out.show(&c, || output::command(&c));
            Ok(())
        }
        CommandCmd::Wait { id, timeout } => {
            let c = tokio::time::timeout(
                Duration::from_secs(timeout),
                follow(client, cloud48_engine::model::CommandId(id), !out.json),
            )
            .await
            .with_context(|| format!("command {id} did not finish within {timeout} s"))??;
            out.show(&c, || output::command(&c));
            finished_ok(&c)
        }
        CommandCmd::Cancel { id } => {
            let c: Command = client
                .post(&format!("/v1/commands/{id}/cancel"), &json!({}))
                .await?;
            out.show(&c, || format!("command {id} cancelled"));
            Ok(())
        }
    }
}
