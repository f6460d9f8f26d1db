//! `cloud48 serve`: a core on this machine, and the settings it runs with (also read by
//! `config show` and `user`).

use super::*;

/// Where the core's configuration comes from: a TOML file, the environment and these flags
/// (flag > env > file > default; see `cloud48 config show`).
#[derive(Debug, Args, Default, Clone)]
pub struct CoreArgs {
    /// Config file (TOML); default: ./cloud48.toml if it exists.
    #[arg(long, env = "CLOUD48_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default 127.0.0.1:4848].
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory for the SQLite database and local state [default ./cloud48-data].
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Database URL (`postgres://...`) [default: SQLite in the data directory].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Connections to PostgreSQL [default 5].
    #[arg(long, allow_negative_numbers = true)]
    pub db_connections: Option<u64>,
    /// Commands executing at once [default 256].
    #[arg(long, allow_negative_numbers = true)]
    pub workers: Option<u64>,
    /// First retry delay after a transient driver error, ms; doubles per attempt [default 200].
    #[arg(long, allow_negative_numbers = true)]
    pub retry_base_ms: Option<u64>,
    /// Attempts before a transient driver error fails a command [default 5].
    #[arg(long, allow_negative_numbers = true)]
    pub max_attempts: Option<u64>,
    /// Lease of a claimed command, ms: another core resumes the commands of a core that died
    /// this long after its last renewal [default 2000].
    #[arg(long, allow_negative_numbers = true)]
    pub lease_ms: Option<u64>,
    /// Lease of a cluster duty (health monitor, collector) held by one core of several on one
    /// PostgreSQL database, ms; another core takes it over this long after its holder dies
    /// [default 3000].
    #[arg(long, allow_negative_numbers = true)]
    pub duty_lease_ms: Option<u64>,
    /// URL node agents reach this core at, told to agents so that they can fail over to it
    /// when the core they talk to dies (several cores on one PostgreSQL database).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Simulated servers created when none is registered [default 4].
    #[arg(long, allow_negative_numbers = true)]
    pub sim_servers: Option<u64>,
    /// Latency of every simulated server operation, ms [default 0].
    #[arg(long, allow_negative_numbers = true)]
    pub sim_latency_ms: Option<u64>,
    /// Deadline of one plugin hook call, ms [default 100].
    #[arg(long, allow_negative_numbers = true)]
    pub plugin_deadline_ms: Option<u64>,
    /// Memory cap of one plugin instance, MiB [default 64].
    #[arg(long, allow_negative_numbers = true)]
    pub plugin_memory_mb: Option<u64>,
    /// What anonymous requests may do: none, read or full (full: local development only) [default read].
    #[arg(long)]
    pub anonymous: Option<String>,
    /// Endpoint families anonymous requests may read when --anonymous is read: some of fleet,
    /// environments, containers, commands, plugins, metrics; empty for none [default
    /// fleet,environments].
    #[arg(long)]
    pub anonymous_read: Option<String>,
    /// HTTP Digest realm; part of stored password hashes [default cloud48].
    #[arg(long)]
    pub realm: Option<String>,
    /// Lifetime of a Digest nonce, seconds [default 300].
    #[arg(long, allow_negative_numbers = true)]
    pub nonce_ttl_secs: Option<u64>,
    /// Interval of the simulated servers' heartbeats, ms [default 500].
    #[arg(long, allow_negative_numbers = true)]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a server is marked down, ms [default 2000].
    #[arg(long, allow_negative_numbers = true)]
    pub grace_ms: Option<u64>,
    /// Interval of the health monitor's checks, ms [default 250].
    #[arg(long, allow_negative_numbers = true)]
    pub health_check_ms: Option<u64>,
    /// Interval of the collector (and rebalancer), seconds [default 30].
    #[arg(long, allow_negative_numbers = true)]
    pub collector_secs: Option<u64>,
    /// How long the event log keeps events, seconds [default 86400].
    #[arg(long, allow_negative_numbers = true)]
    pub events_retention_secs: Option<u64>,
    /// Memory-utilisation spread (percentage points) above which the rebalancer migrates; 0 off [default 0].
    #[arg(long, allow_negative_numbers = true)]
    pub rebalance_spread: Option<u64>,
    /// Most migrations the rebalancer has in flight [default 2].
    #[arg(long, allow_negative_numbers = true)]
    pub rebalance_batch: Option<u64>,
    /// Placement weight of free cpu, a decimal such as 0.5 [default 1].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_cpu: Option<f64>,
    /// Placement weight of free memory [default 1].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_memory: Option<f64>,
    /// Placement weight of free disk [default 0.5].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_disk: Option<f64>,
    /// Placement score added for a server that already holds the container's image, so it
    /// need not pull it [default 0.25].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_image: Option<f64>,
    /// Lifetime of a capacity reservation whose command did not finish, seconds [default 600].
    #[arg(long, allow_negative_numbers = true)]
    pub dummy_ttl_secs: Option<u64>,
    /// While other cores share the database: how old the servers' allocations this core
    /// places on may be, ms; older, it reads them again before deciding (0: before every
    /// decision) [default 100].
    #[arg(long, allow_negative_numbers = true)]
    pub placement_view_max_age_ms: Option<u64>,
}

/// What commands that work on the core's database itself (`user ...`) take of its
/// configuration: where the database is, and the realm its password hashes belong to.
#[derive(Debug, Args, Default, Clone)]
pub struct DatabaseArgs {
    /// The core's config file (TOML); default: ./cloud48.toml if it exists.
    #[arg(long, env = "CLOUD48_CONFIG")]
    pub config: Option<PathBuf>,
    /// The core's data directory, holding its SQLite database [default ./cloud48-data].
    #[arg(long)]
    pub data_dir: Option<String>,
    /// The core's database URL (`postgres://...`) [default: SQLite in the data directory].
    #[arg(long)]
    pub database_url: Option<String>,
    /// HTTP Digest realm; part of stored password hashes [default cloud48].
    #[arg(long)]
    pub realm: Option<String>,
}

impl DatabaseArgs {
    /// The core's settings these (with its file and environment) give.
    pub fn settings(&self) -> Result<Settings> {
        CoreArgs {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            realm: self.realm.clone(),
            ..CoreArgs::default()
        }
        .settings()
    }
}

impl CoreArgs {
    fn flags(&self) -> std::collections::BTreeMap<&'static str, String> {
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k, v);
            }
        };
        put("server.listen", self.listen.clone());
        put("server.data_dir", self.data_dir.clone());
        put("database.url", self.database_url.clone());
        put(
            "database.connections",
            self.db_connections.map(|v| v.to_string()),
        );
        put("queue.workers", self.workers.map(|v| v.to_string()));
        put(
            "queue.retry_base_ms",
            self.retry_base_ms.map(|v| v.to_string()),
        );
        put(
            "queue.max_attempts",
            self.max_attempts.map(|v| v.to_string()),
        );
        put("queue.lease_ms", self.lease_ms.map(|v| v.to_string()));
        put(
            "cluster.duty_lease_ms",
            self.duty_lease_ms.map(|v| v.to_string()),
        );
        put("cluster.advertise_url", self.advertise_url.clone());
        put(
            "drivers.sim.servers",
            self.sim_servers.map(|v| v.to_string()),
        );
        put(
            "drivers.sim.latency_ms",
            self.sim_latency_ms.map(|v| v.to_string()),
        );
        put(
            "plugins.deadline_ms",
            self.plugin_deadline_ms.map(|v| v.to_string()),
        );
        put(
            "plugins.memory_mb",
            self.plugin_memory_mb.map(|v| v.to_string()),
        );
        put("auth.anonymous", self.anonymous.clone());
        put("auth.anonymous_read", self.anonymous_read.clone());
        put("auth.realm", self.realm.clone());
        put(
            "auth.nonce_ttl_secs",
            self.nonce_ttl_secs.map(|v| v.to_string()),
        );
        for (key, value) in [
            ("health.heartbeat_ms", self.heartbeat_ms),
            ("health.grace_ms", self.grace_ms),
            ("health.check_ms", self.health_check_ms),
            ("collector.interval_secs", self.collector_secs),
            ("events.retention_secs", self.events_retention_secs),
            ("rebalancer.spread_percent", self.rebalance_spread),
            ("rebalancer.batch", self.rebalance_batch),
            ("placement.dummy_ttl_secs", self.dummy_ttl_secs),
            ("placement.view_max_age_ms", self.placement_view_max_age_ms),
        ] {
            put(key, value.map(|v| v.to_string()));
        }
        for (key, value) in [
            ("placement.weight_cpu", self.weight_cpu),
            ("placement.weight_memory", self.weight_memory),
            ("placement.weight_disk", self.weight_disk),
            ("placement.weight_image", self.weight_image),
        ] {
            put(key, value.map(|v| v.to_string()));
        }
        m
    }

    /// The effective settings.
    pub fn settings(&self) -> Result<Settings> {
        let default_file = PathBuf::from("cloud48.toml");
        let file = self
            .config
            .clone()
            .or_else(|| default_file.exists().then_some(default_file));
        Ok(Settings::load(
            file.as_deref(),
            &cloud48_engine::config::process_env,
            &self.flags(),
        )?)
    }
}

/// Runs a core until Ctrl-C or SIGTERM.
pub async fn serve(args: CoreArgs) -> Result<()> {
    let settings = args.settings()?;
    let config = settings.core();
    let listen = settings.listen();
    let data_dir = config.data_dir.clone();
    if config.auth.anonymous == cloud48_engine::auth::Anonymous::Full {
        tracing::warn!(
            "anonymous requests have FULL access (auth.anonymous = full): for local development only"
        );
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "anonymous full access on a non-loopback address: anyone who can reach it controls the cloud");
        }
    }
    let new_dir = !data_dir.exists();
    let core = Core::open(config).await?;
    // Listen at once; resume commands and reconcile servers meanwhile (`GET /v1/health` says
    // `starting` until then; requests are accepted and their commands wait their turn).
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            // A core that never served leaves no new data directory behind.
            core.stop(Duration::ZERO).await;
            drop(core);
            if new_dir {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            return Err(e).with_context(|| format!("cannot listen on {listen}"));
        }
    };
    tracing::info!(%listen, data_dir = %data_dir.display(), platform = core.platform_name(), "cloud48 core listening; starting (resuming commands, joining the cluster)");
    let app =
        cloud48_api::router(core.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
    let closing = core.clone();
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!(
            "stopping: ending event streams, waiting up to {} s for open requests",
            DRAIN.as_secs()
        );
        closing.close();
    });
    // Requests still open a while after the signal (a long `--wait`) are cut off.
    let drained = core.closing();
    let served = async move {
        tokio::select! {
            served = served => served,
            _ = async { drained.await; tokio::time::sleep(DRAIN).await } => {
                tracing::warn!("requests still open {} s after the stop signal: cut off", DRAIN.as_secs());
                Ok(())
            }
        }
    };
    let starting = core.clone();
    let started = async move {
        starting.start().await?;
        tracing::info!("cloud48 core ready");
        check_advertised(&starting).await;
        std::future::pending::<Result<(), cloud48_engine::core::CoreError>>().await
    };
    tokio::select! {
        served = served => served.context("HTTP server failed")?,
        failed = started => failed.context("the core could not start")?,
    }
    tracing::info!("stopping: before-cc-stop hooks, then letting running steps finish");
    if let Err(e) = core.shutdown(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "before-cc-stop did not finish");
    }
    Ok(())
}

/// Warns when the URL this core tells agents (and other cores) to reach it at does not
/// reach it: they would beat to nothing there, and `cloud48 cluster` lists a dead address.
async fn check_advertised(core: &Core) {
    let Some(url) = core.config().cluster.advertise_url.clone() else {
        return;
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("an HTTP client without TLS builds");
    let node = core.queue().node_id().to_string();
    let answer = match client.get(format!("{url}/v1/health")).send().await {
        Ok(resp) => resp.json::<serde_json::Value>().await.ok(),
        Err(e) => {
            tracing::warn!(%url, error = %cloud48_engine::model::with_causes(&e), "this core tells agents to reach it at a URL that does not answer: give --advertise-url (cluster.advertise_url) the address agents reach this core at");
            return;
        }
    };
    let theirs = answer.as_ref().and_then(|v| v.get("node")?.as_str());
    if theirs != Some(node.as_str()) {
        tracing::warn!(%url, answered = ?theirs, "this core tells agents to reach it at a URL another server (or another core) answers: give --advertise-url (cluster.advertise_url) the address agents reach this core at");
    }
}

/// How long a stopping core waits for the requests it is answering.
const DRAIN: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
