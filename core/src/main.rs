//! The `cloud48` binary.

use tracing_subscriber::EnvFilter;

/// mimalloc instead of the C library's allocator: a core allocates and frees many small,
/// short-lived values per command (rows, statements, JSON), where glibc's malloc spent a fifth of
/// the core's time in `bench place`; without transparent huge pages (the `no_thp` feature), which
/// made it zero 2 MiB for each page it took back from the kernel (see ARCHITECTURE.md and
/// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CLOUD48_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = cloud48_core::cli::Cli::from_args();
    if !cli.is_server() {
        // A command's output piped into `head` ends it quietly, as for any Unix tool, instead
        // of a panic on the broken pipe. Servers keep ignoring SIGPIPE: a client that goes
        // away must not stop them.
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let built = runtime_threads().and_then(|n| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build();
        rt.map_err(|e| format!("cannot start the async runtime: {e}"))
    });
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(cloud48_core::cli::run(cli)) {
        eprintln!(
            "error: {}",
            cloud48_core::cli::output::printable(&format!("{e:#}"))
        );
        std::process::exit(1);
    }
}

/// Worker threads of the async runtime: one fewer than the machine's cores (at least one), so
/// that the database thread (SQLite runs every statement on one thread of its own) keeps a core
/// to itself. `TOKIO_WORKER_THREADS` overrides it.
fn runtime_threads() -> Result<usize, String> {
    if let Ok(v) = std::env::var("TOKIO_WORKER_THREADS") {
        return v.trim().parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            format!("TOKIO_WORKER_THREADS={v:?} is not a positive number of threads; unset it to use one fewer than the cores")
        });
    }
    Ok(std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1).max(1))
        .unwrap_or(1))
}
