//! The `cloud48-agent` binary: the node agent of one virtualization server.
//! `cloud48 agent` runs the same agent from the main binary.

use clap::{Parser, Subcommand};
use cloud48_agent::cli::{AgentArgs, GuestHttpArgs};
use tracing_subscriber::EnvFilter;

/// The node agent of one server: it drives its containers for the core.
#[derive(Debug, Parser)]
#[command(
    name = "cloud48-agent",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Helper>,
    #[command(flatten)]
    agent: Option<AgentArgs>,
}

#[derive(Debug, Subcommand)]
enum Helper {
    /// A small HTTP server that answers every request with one line (the stand-in for a
    /// workload whose image a server cannot run).
    GuestHttp(GuestHttpArgs),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CLOUD48_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match (cli.command, cli.agent) {
        (Some(Helper::GuestHttp(args)), _) => cloud48_agent::cli::guest_http(args).await,
        (None, Some(args)) => cloud48_agent::cli::run(args).await,
        (None, None) => Err(anyhow::anyhow!(
            "give the agent's options (at least --token); see cloud48-agent --help"
        )),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
