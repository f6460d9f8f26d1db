//! The settings a core is opened with (`CoreConfig` and its sections); `crate::config` reads
//! them from the settings file, the environment and flags.

use super::*;

/// Settings of a core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Directory for the SQLite file, the node id and simulated servers' state.
    pub data_dir: PathBuf,
    /// Database URL; `None` means SQLite at `<data_dir>/cloud48.db`.
    pub database_url: Option<String>,
    /// Connections to PostgreSQL (SQLite always uses one).
    pub db_connections: u32,
    /// Queue tuning.
    pub queue: QueueConfig,
    /// Simulated servers created when no server is registered (0 = none).
    pub sim_servers: u32,
    /// Capacity of each simulated server.
    pub sim_capacity: Resources,
    /// Latency of every simulated operation.
    pub sim_latency: Duration,
    /// Keep simulated servers' guests in `<data_dir>/sim/` across restarts.
    pub sim_persist: bool,
    /// Access control.
    pub auth: crate::auth::AuthConfig,
    /// Sandbox limits of plugin hooks.
    pub plugin_limits: crate::plugins::Limits,
    /// Where compiled plugins are cached; default `<data_dir>/plugin-cache`.
    pub plugin_cache: Option<PathBuf>,
    /// The image store (an OCI image layout); default `<data_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// Heartbeats, failure detection and the collector.
    pub health: HealthConfig,
    /// Several cores on one PostgreSQL database.
    pub cluster: ClusterConfig,
    /// Placement.
    pub placement: PlacementConfig,
    /// Token shared with the node agents (`agents.token`); without it no agent can register.
    pub agent_token: Option<String>,
    /// Deadlines and retries of requests to agents.
    pub remote: crate::driver::remote::RemoteTimeouts,
    /// How long the event log keeps an event (the collector forgets older ones).
    pub events_retention: Duration,
    /// A token that reads `/metrics` as `Authorization: Bearer TOKEN` (`metrics.token`), for
    /// scrapers that cannot do Digest.
    pub metrics_token: Option<String>,
}

/// Settings of a core among several on one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How long a duty (monitor, collector) stays with a core that stopped renewing it.
    pub duty_lease: Duration,
    /// The URL node agents reach this core at (told to agents for failover).
    pub advertise_url: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            duty_lease: Duration::from_secs(3),
            advertise_url: None,
        }
    }
}

/// Settings of failure detection, the collector and the rebalancer.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Run the monitor, the simulated servers' heartbeats, the collector and the rebalancer
    /// in the background (tests that drive them by hand turn this off).
    pub background: bool,
    /// Interval of the simulated servers' heartbeats.
    pub heartbeat: Duration,
    /// Silence after which a server is marked down.
    pub grace: Duration,
    /// Interval of the monitor's checks.
    pub check: Duration,
    /// Interval of the periodic collector (and rebalancer).
    pub collector: Duration,
    /// Memory-utilisation spread (percentage points between the fullest and the emptiest
    /// server) above which the rebalancer migrates containers; 0 turns it off.
    pub rebalance_spread: u64,
    /// Most migrations the rebalancer has in flight.
    pub rebalance_batch: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            background: true,
            heartbeat: Duration::from_millis(500),
            grace: Duration::from_millis(2000),
            check: Duration::from_millis(250),
            collector: Duration::from_secs(30),
            rebalance_spread: 0,
            rebalance_batch: 2,
        }
    }
}

/// Settings of placement.
#[derive(Debug, Clone, Default)]
pub struct PlacementConfig {
    /// Weights of the score.
    pub weights: crate::placement::Weights,
    /// Lifetime of a dummy (capacity reservation) if its command does not finish first.
    pub dummy_ttl: Option<Duration>,
    /// While other cores place on the database: how old the servers' allocations in this
    /// core's view may be when it places; older, they are read again first.
    pub view_max_age: Option<Duration>,
}

impl PlacementConfig {
    /// How old the allocations placement decides on may be while other cores place; default
    /// 100 ms.
    pub fn view_max_age(&self) -> Duration {
        self.view_max_age.unwrap_or(Duration::from_millis(100))
    }

    /// Lifetime of a dummy; default 10 minutes.
    pub fn dummy_ttl(&self) -> Duration {
        self.dummy_ttl.unwrap_or(Duration::from_secs(600))
    }
}

impl CoreConfig {
    /// Defaults with data under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        CoreConfig {
            data_dir: data_dir.into(),
            database_url: None,
            db_connections: 5,
            queue: QueueConfig::default(),
            sim_servers: 4,
            sim_capacity: Resources {
                cpu_millis: 16_000,
                memory_mb: 65_536,
                disk_mb: 1_048_576,
            },
            sim_latency: Duration::ZERO,
            sim_persist: true,
            auth: crate::auth::AuthConfig::default(),
            plugin_limits: crate::plugins::Limits::default(),
            plugin_cache: None,
            images_dir: None,
            health: HealthConfig::default(),
            cluster: ClusterConfig::default(),
            placement: PlacementConfig::default(),
            agent_token: None,
            remote: Default::default(),
            events_retention: Duration::from_secs(24 * 3600),
            metrics_token: None,
        }
    }
}
