//! The `cloud48` binary.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CLOUD48_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = cloud48_core::cli::Cli::parse();
    if let Err(e) = cloud48_core::cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
