//! The cloud core: database, queue, fleet of server drivers and container types, wired together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, Database, DatabaseBackend, DatabaseConnection,
    DbErr, EntityTrait, QueryFilter, Set, TransactionTrait,
};

mod futures_job {
    /// A background job's future.
    pub type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}
use crate::agents::Agents;
use crate::collector::Collector;
use crate::entities::{platform, server};
pub use crate::fleet::Fleet;
use crate::fleet::{RemoteFactory, SimFactory};
use crate::health::{Health, Monitor};
use crate::managers::{ContainerManager, EnvironmentManager, ServerManager};
use crate::model::{CommandId, Resources, now_ms};
use crate::queue::{Clock, Queue, QueueConfig, SystemClock};
use crate::rebalance::Rebalancer;
use crate::services::{Services, Settings};
use crate::types::TypeRegistry;

mod config;
mod database;
mod parts;

pub use config::{ClusterConfig, CoreConfig, HealthConfig, PlacementConfig};
use database::{SetupLock, connect_as, create_data_dir, lock_data_dir, node_id, options};
pub use database::{connect, reader};

/// Errors of core operations, each with a clear message for the user.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// An object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object's current state does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// Bad input; `field` names the offending field.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A queue error.
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// Starting the core failed.
    #[error("{0}")]
    Setup(String),
    /// Stored data this core cannot read (the message names the object).
    #[error("{0}")]
    Corrupt(String),
    /// A server's agent could not be reached, or answered what it should not.
    #[error("{0}")]
    Unreachable(String),
    /// Other cores kept changing what the operation reads; the same request may succeed later.
    #[error("{0}")]
    Busy(String),
}

impl CoreError {
    /// Bad input in `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        CoreError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

pub(crate) struct CoreInner {
    pub plugin_host: Arc<crate::plugins::PluginHost>,
    pub images: Arc<cloud48_image::Store>,
    pub auth: crate::auth::Authenticator,
    pub platform: platform::Model,
    pub config: CoreConfig,
    pub collector: Collector,
    pub monitor: Monitor,
    pub rebalancer: Rebalancer,
    pub agents: Agents,
    pub cluster: Arc<crate::cluster::Cluster>,
    pub events: crate::events::Events,
    /// Long reads (see `reader`).
    pub reader: DatabaseConnection,
    /// The database, queue, fleet, types, heartbeats and placement's view, shared with the
    /// commands and managers.
    pub services: Services,
    /// `start` has finished: commands run, servers were reconciled once.
    pub ready: std::sync::atomic::AtomicBool,
    pub background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The data directory's lock (`database::lock_data_dir`), until `stop`.
    pub data_lock: std::sync::Mutex<Option<std::fs::File>>,
    /// Set when the core begins to stop (`close`): open event streams end.
    pub closing: tokio::sync::watch::Sender<bool>,
}

/// A running cloud core; cheap to clone.
#[derive(Clone)]
pub struct Core {
    pub(crate) inner: Arc<CoreInner>,
}

impl Core {
    /// Opens a core: database, migrations, local platform, servers (creating simulated ones if
    /// none is registered). Call `start` to run the queue.
    pub async fn open(config: CoreConfig) -> Result<Core, CoreError> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// `open` with an injected clock.
    pub async fn open_with_clock(
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Core, CoreError> {
        create_data_dir(&config)?;
        let data_lock = lock_data_dir(&config)?;
        let node = node_id(&config.data_dir)?;
        // Released once the bundled plugins are in; dropped on an error (its connection
        // closes, and PostgreSQL releases it).
        let setup = SetupLock::take(&config).await?;
        let mut db = connect_as(&config, Some(&node)).await?;
        let recorder = Arc::new(crate::metrics::Recorder::default());
        let statements = recorder.clone();
        db.set_metric_callback(move |info| statements.statement(info.elapsed, info.failed));
        let platform = local_platform(&db).await?;
        let secret_key = crate::secrets::platform_key(&db, &platform).await?;
        let mut cluster =
            crate::cluster::Cluster::new(db.clone(), node.clone(), config.cluster.duty_lease)
                .with_agents_token(config.agent_token.as_deref());
        // Cores sharing a database share its clock.
        let clock: Arc<dyn Clock> = if cluster.shared() {
            let db_clock = Arc::new(crate::cluster::DbClock::new(clock, &db).await?);
            cluster = cluster.with_clock(db_clock.clone());
            db_clock
        } else {
            clock
        };
        let cluster = Arc::new(cluster);
        // Before this core acts as its node (reconciling the servers' counters, resuming its
        // commands, serving): no other process may run as it.
        cluster
            .check_node_free(config.health.heartbeat)
            .await
            .map_err(CoreError::Setup)?;
        let queue = Queue::with_recorder(
            db.clone(),
            node.clone(),
            config.queue.clone(),
            clock.clone(),
            recorder,
        );
        // Another core takes over a command whose lease ran out: the leases of a core sharing
        // its database are renewed on a thread and a connection of their own, so that a core
        // whose runtime is saturated for a while (a burst of events, a large group) does not
        // lose its commands to another core while it still runs them. Its claims go on a
        // connection of their own too: one that queued behind the statements of 10,000
        // commands taken over from a dead core took 7 s to claim them all instead of 2.
        if cluster.shared() {
            let mut opt = options(&config, Some(&node));
            opt.max_connections(1).min_connections(0).connect_lazy(true);
            queue.connect_apart(opt);
        }
        let health = Health::new(clock.clone());
        let health = Arc::new(if cluster.shared() {
            health.shared()
        } else {
            health
        });
        let placement = Arc::new(crate::placement::PlacementCache::new(
            config.placement.weights,
        ));
        let fleet = Arc::new(Fleet::new(vec![
            Arc::new(SimFactory::new(&config)),
            Arc::new(RemoteFactory::new(&config)),
        ]));
        let collector = Collector::new(
            db.clone(),
            fleet.clone(),
            placement.clone(),
            clock.clone(),
            config.events_retention,
        );
        let h = &config.health;
        let monitor = Monitor::new(
            db.clone(),
            queue.clone(),
            fleet.clone(),
            placement.clone(),
            health.clone(),
            collector.clone(),
            h.grace,
        )
        .sharing(cluster.clone());
        let rebalancer = Rebalancer::new(
            db.clone(),
            queue.clone(),
            placement.clone(),
            h.rebalance_spread,
            h.rebalance_batch,
        );
        let agents = Agents::new(
            db.clone(),
            fleet.clone(),
            placement.clone(),
            health.clone(),
            platform.id,
            config.agent_token.clone(),
            h.grace,
        )
        .watched_by(monitor.clone());
        let plugin_host = crate::plugins::PluginHost::shared(
            Some(
                config
                    .plugin_cache
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("plugin-cache")),
            ),
            config.plugin_limits.clone(),
        )
        .map_err(|e| CoreError::Setup(e.to_string()))?;
        let services = Services::new(
            db.clone(),
            queue.clone(),
            fleet.clone(),
            placement.clone(),
            TypeRegistry::with_builtins(),
            health.clone(),
            Settings {
                platform: platform.name.clone(),
                platform_id: platform.id,
                dummy_ttl: config.placement.dummy_ttl(),
                agent_token: config.agent_token.clone(),
                secret_key,
                uploads: uploads_dir(&config.data_dir)?,
                plugin_host: plugin_host.clone(),
            },
        );
        let auth = crate::auth::Authenticator::new(config.auth.clone(), db.clone(), clock);
        let images_dir = config
            .images_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("images"));
        let images = Arc::new(
            cloud48_image::Store::open(&images_dir)
                .map_err(|e| CoreError::Setup(format!("cannot open the image store: {e}")))?,
        );

        let reader = reader(&config, &db).await?;
        let core = Core {
            inner: Arc::new(CoreInner {
                plugin_host,
                images,
                auth,
                platform,
                config,
                collector,
                monitor,
                rebalancer,
                agents,
                cluster,
                events: crate::events::Events::new(db.clone()),
                reader,
                services,
                ready: std::sync::atomic::AtomicBool::new(false),
                background: std::sync::Mutex::new(Vec::new()),
                data_lock: std::sync::Mutex::new(data_lock),
                closing: tokio::sync::watch::Sender::new(false),
            }),
        };
        core.load_servers().await?;
        // The counters are kept by the transactions that change them; recomputing them is a
        // safety net for a core alone (it would race with other cores' commands).
        let fixed = if core.other_cores_alive().await? {
            0
        } else {
            crate::placement::reconcile(core.db()).await?
        };
        if fixed > 0 {
            tracing::warn!(
                servers = fixed,
                "corrected the allocation counters of servers"
            );
        }
        core.placement().refresh_all(core.db()).await?;
        let plugins = core.plugins();
        plugins.load_all().await?;
        plugins.bootstrap(core.inner.platform.id).await?;
        setup.release().await;
        Ok(core)
    }

    async fn load_servers(&self) -> Result<(), CoreError> {
        let c = &self.inner.config;
        let mut rows = server::Entity::find().all(self.db()).await?;
        if rows.is_empty() && c.sim_servers > 0 {
            for i in 1..=c.sim_servers {
                let row = server::ActiveModel {
                    platform_id: Set(self.inner.platform.id),
                    name: Set(format!("sim-{i}")),
                    driver: Set(SimFactory::KIND.into()),
                    address: Set(None),
                    status: Set("up".into()),
                    cpu_millis: Set(c.sim_capacity.cpu_millis as i64),
                    memory_mb: Set(c.sim_capacity.memory_mb as i64),
                    disk_mb: Set(c.sim_capacity.disk_mb as i64),
                    labels: Set("[]".into()),
                    last_heartbeat: Set(Some(now_ms())),
                    created_at: Set(now_ms()),
                    ..Default::default()
                };
                rows.push(row.insert(self.db()).await?);
            }
            tracing::info!(servers = c.sim_servers, "created a simulated platform");
        }
        if c.sim_persist {
            let sim_dir = c.data_dir.join("sim");
            std::fs::create_dir_all(&sim_dir).map_err(|e| {
                CoreError::Setup(format!("cannot create {}: {e}", sim_dir.display()))
            })?;
        }
        // Without the token the agents' heartbeats would be refused and every one of their
        // servers judged down (and its containers replaced): refuse to start instead.
        if c.agent_token.is_none()
            && let Some(row) = rows.iter().find(|r| r.driver == RemoteFactory::KIND)
        {
            return Err(CoreError::Setup(format!(
                "server {} is run by a node agent, but agents.token is not set: set \
                 CLOUD48_AGENT_TOKEN (or agents.token in the config file) to the token the \
                 agents were given, or this core would refuse their heartbeats and judge \
                 their servers down",
                row.name
            )));
        }
        for row in rows {
            self.fleet().attach(&row)?;
        }
        Ok(())
    }

    /// Starts executing commands, resuming those a previous run left unfinished; runs the
    /// collector once, tells every environment the core started (`after-cc-start`) and starts
    /// the background monitor, heartbeats, collector and rebalancer.
    pub async fn start(&self) -> Result<(), CoreError> {
        // If no other core runs, this one starts the control plane: the environments are owed
        // `after-cc-start`, sent by the core holding the monitor duty (maybe another one,
        // started at the same time).
        self.cluster()
            .owe_if_alone(START_NOTICE, self.alive_within())
            .await?;
        // Before this core acts: it must take the token the other cores' agents present.
        self.cluster()
            .check_agents_token(self.seen_lately())
            .await
            .map_err(CoreError::Setup)?;
        // The first core to start takes the duties at once; the others wait for a lapse.
        for duty in crate::cluster::Duty::ALL {
            self.cluster().claim(duty).await?;
        }
        // The servers other cores changed, read before any command places on them.
        self.sync_cluster().await?;
        let runner = Arc::new(crate::commands::Handlers::new(self.services().clone()));
        let single_core = self.db().get_database_backend() == DatabaseBackend::Sqlite;
        self.queue().start(runner, single_core).await?;
        if self.cluster().holds(crate::cluster::Duty::Collector) {
            self.collector().collect(None).await?;
        }
        self.send_owed_notices().await?;
        self.health().begin();
        let publisher = tokio::spawn(self.events().clone().publish());
        self.inner.background.lock().unwrap().push(publisher);
        if let (true, Some(url)) = (self.cluster().shared(), &self.inner.config.database_url) {
            let queue = self.queue().clone();
            // This core's own inserts are skipped: it wakes its queue itself after them (as
            // on SQLite), and a second wake-up would cost a claim that finds nothing.
            let own = self.cluster().node().to_string();
            // Its connection is named as the pool's are, for `pg_stat_activity`.
            let sep = if url.contains('?') { '&' } else { '?' };
            let url = format!("{url}{sep}application_name={own}-wake-ups");
            let listener = tokio::spawn(crate::cluster::listen_for_work(url, move |by| {
                if by != Some(own.as_str()) {
                    queue.wake()
                }
            }));
            self.inner.background.lock().unwrap().push(listener);
            let statistics = tokio::spawn(crate::statistics::keep_fresh(self.db().clone()));
            self.inner.background.lock().unwrap().push(statistics);
        }
        if self.inner.config.health.background {
            self.spawn_background();
        }
        self.inner
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Shares this core's heartbeats with the other cores, takes in theirs, takes in the
    /// servers they changed, and records that it is alive (nothing on SQLite).
    pub async fn sync_cluster(&self) -> Result<(), CoreError> {
        let cluster = self.cluster();
        if !cluster.shared() {
            return Ok(());
        }
        let health = self.health();
        let mine = health.take_unwritten();
        cluster.write_beats(&mine).await?;
        health.merge_all(cluster.read_beats().await?);
        // Servers other cores registered, marked down or up, drained or placed on: attach their
        // drivers and refresh placement's view (the allocation counters in it are checked
        // again by the database when a reservation is written). Read only when they changed.
        // Begun before the read: what this core commits meanwhile is not lost from the view.
        let read = self.placement().reading();
        // The servers attached before the read: one this core registers meanwhile is missing
        // from the rows read, and is not taken for one another core removed.
        let attached = self.fleet().ids();
        match cluster.changed_servers().await? {
            crate::cluster::ServerChanges::None => drop(read),
            crate::cluster::ServerChanges::All(rows) => {
                // New servers, and agents another core accepted at another address or network
                // (or another agent taking a server over): this core's next heartbeat from
                // each agent is checked against the database again.
                let fleet = self.fleet();
                let moved = |r: &crate::entities::server::Model| {
                    fleet.remote(r.id).is_some_and(|d| {
                        Some(d.url()) != r.address.as_deref()
                            || fleet.network(r.id) != Some((r.subnet.clone(), r.addresses.clone()))
                    })
                };
                for row in rows
                    .iter()
                    .filter(|r| fleet.driver(r.id).is_none() || moved(r))
                {
                    fleet.attach(row)?;
                }
                // Servers another core removed: forgotten here too.
                let now: std::collections::HashSet<i64> = rows.iter().map(|r| r.id).collect();
                for gone in attached.into_iter().filter(|id| !now.contains(id)) {
                    self.agents().forget(gone);
                }
                self.agents().forget_changed(&rows);
                self.placement().load(read, &rows);
            }
            crate::cluster::ServerChanges::Allocations(counters) => {
                self.placement().set_allocations(read, &counters)
            }
        }
        cluster
            .sync_cores(
                self.inner.config.cluster.advertise_url.as_deref(),
                self.seen_lately(),
            )
            .await?;
        self.placement().others_place(
            cluster.others_seen(),
            self.inner.config.placement.view_max_age(),
        );
        Ok(())
    }

    /// How lately a core must have been seen to count as running: one silent for ten duty
    /// leases is gone (agents need not try it first, its token no longer counts).
    fn seen_lately(&self) -> Duration {
        self.inner.config.cluster.duty_lease * 10
    }

    /// Takes or renews every duty this core can hold; a monitor taking over counts every
    /// server's silence afresh (it may not have seen the last beats of the previous holder).
    pub async fn claim_duties(&self) -> Result<(), CoreError> {
        for duty in crate::cluster::Duty::ALL {
            // The monitor's checks run as soon as the claim below holds the duty: the silence
            // they count must start before it, not once the claim has been followed up (a
            // check in between judged a server on the previous holder's stale beats).
            if duty == crate::cluster::Duty::Monitor && !self.cluster().holds(duty) {
                self.health().begin();
            }
            let claim = self.cluster().claim(duty).await?;
            if claim == crate::cluster::Claim::Taken {
                tracing::info!(
                    duty = duty.name(),
                    node = self.cluster().node(),
                    "this core took a duty"
                );
                if duty == crate::cluster::Duty::Monitor {
                    self.sync_cluster().await?;
                    self.health().begin();
                }
            }
        }
        // Duties renewed first: a notice that cannot be sent now is sent at the next renewal.
        if let Err(e) = self.send_owed_notices().await {
            tracing::warn!(error = %e, "telling the environments the control plane started failed; trying again at the next renewal");
        }
        Ok(())
    }

    /// If this core holds the monitor duty, sends the environments the notice the control
    /// plane owes them (`after-cc-start`, owed by a core that started finding no other running),
    /// taking it in the transaction that queues the notices: each is sent once, by one core.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: the notices are queued, not run"
    )]
    async fn send_owed_notices(&self) -> Result<(), CoreError> {
        if !self.cluster().holds(crate::cluster::Duty::Monitor) {
            return Ok(());
        }
        if !crate::cluster::owed(self.db(), START_NOTICE).await? {
            return Ok(());
        }
        let txn = self.db().begin().await?;
        if !crate::cluster::take_owed(&txn, START_NOTICE).await? {
            txn.rollback().await?;
            return Ok(());
        }
        let ids = self
            .notify_environments_in(&txn, crate::commands::params::NotifyHook::AfterCcStart)
            .await?;
        txn.commit().await?;
        tracing::info!(
            environments = ids.len(),
            "told the environments the control plane started (after-cc-start)"
        );
        if !ids.is_empty() {
            self.queue().wake();
        }
        Ok(())
    }

    /// How lately another core must have written to the database to count as running (when
    /// this one starts or stops the control plane): three duty leases.
    fn alive_within(&self) -> Duration {
        self.inner.config.cluster.duty_lease * 3
    }

    /// Whether another core wrote to the database within three duty leases.
    async fn other_cores_alive(&self) -> Result<bool, CoreError> {
        let cluster = self.cluster();
        Ok(cluster
            .cores(self.alive_within())
            .await?
            .iter()
            .any(|c| c.node != cluster.node()))
    }

    /// Whether `start` has finished (what `GET /v1/health` reports).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn spawn_background(&self) {
        let h = self.inner.config.health.clone();
        fn every<S: Clone + Send + 'static>(
            period: Duration,
            service: S,
            job: fn(S) -> futures_job::Job,
        ) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    job(service.clone()).await;
                }
            })
        }
        let mut tasks = self.inner.background.lock().unwrap();
        tasks.push(every(h.heartbeat, self.monitor().clone(), |m| {
            Box::pin(async move { m.beat_sims().await })
        }));
        if self.cluster().shared() {
            tasks.push(every(h.heartbeat, self.clone(), |core| {
                Box::pin(async move {
                    if let Err(e) = core.sync_cluster().await {
                        tracing::warn!(error = %e, "sharing heartbeats with the other cores failed");
                    }
                })
            }));
            tasks.push(every(self.cluster().lease() / 3, self.clone(), |core| {
                Box::pin(async move {
                    if let Err(e) = core.claim_duties().await {
                        tracing::warn!(error = %e, "renewing this core's duties failed");
                    }
                })
            }));
        }
        // The monitor measures how late each of its passes runs (its own scheduling delay).
        let monitor = self.monitor().clone();
        let cluster = self.inner.cluster.clone();
        let check = h.check;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(check);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let due = tick.tick().await;
                let delay = tokio::time::Instant::now().saturating_duration_since(due);
                if !cluster.holds(crate::cluster::Duty::Monitor) {
                    continue;
                }
                if let Err(e) = monitor.tick(delay).await {
                    tracing::warn!(error = %e, "health check failed");
                }
            }
        }));
        let periodic = (
            self.services().clone(),
            self.collector().clone(),
            self.rebalancer().clone(),
            self.inner.cluster.clone(),
            self.monitor().clone(),
        );
        tasks.push(every(
            h.collector,
            periodic,
            |(svc, collector, rebalancer, cluster, monitor)| {
                Box::pin(async move {
                    if let Err(e) = svc.placement().refresh_all(svc.db()).await {
                        tracing::warn!(error = %e, "placement refresh failed");
                    }
                    if !cluster.holds(crate::cluster::Duty::Collector) {
                        return;
                    }
                    if let Err(e) = collector.collect(None).await {
                        tracing::warn!(error = %e, "collector failed");
                    }
                    if let Err(e) = monitor.recheck_down().await {
                        tracing::warn!(error = %e, "reading containers left down failed");
                    }
                    if let Err(e) = rebalancer.rebalance().await {
                        tracing::warn!(error = %e, "rebalancer failed");
                    }
                })
            },
        ));
    }

    /// Says the core is stopping: open event streams end (their clients resume elsewhere
    /// with `Last-Event-ID`), so that an HTTP server draining its connections is not held
    /// open by them. `stop` does it too.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves once the core began to stop (`close`).
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.inner.closing.subscribe();
        async move {
            // An error means the core is gone, which is stopping too.
            let _ = closing.wait_for(|c| *c).await;
        }
    }

    /// Stops the background tasks, stops claiming commands and waits up to `grace` for
    /// running steps.
    pub async fn stop(&self, grace: Duration) {
        self.close();
        let tasks: Vec<_> = self.inner.background.lock().unwrap().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        // Each gone before this core takes back its token and liveness: a task midway through
        // an announcement (another thread) would otherwise write them again afterwards.
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.cluster().release().await {
            tracing::warn!(error = %e, "could not hand this core's duties over");
        }
        self.queue().stop(grace).await;
        if let Err(e) = self.cluster().leave().await {
            tracing::warn!(error = %e, "could not record that this core stopped");
        }
        self.inner.data_lock.lock().unwrap().take();
    }

    /// A graceful stop: `before-cc-stop` runs in every environment (waiting up to `grace`
    /// for it and the actions its hooks ask for), then `stop`.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), CoreError> {
        let result = async {
            // The control plane does not stop while other cores run on.
            if self.other_cores_alive().await? {
                tracing::info!("other cores run on: before-cc-stop is not run");
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + grace;
            for id in self
                .notify_environments(crate::commands::params::NotifyHook::BeforeCcStop)
                .await?
            {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.queue().wait(CommandId(id), left).await?;
            }
            Ok(())
        }
        .await;
        self.stop(grace).await;
        result
    }

    /// Submits an `environment.notify` command running `hook` for the members of every
    /// active environment that has members; returns the command ids.
    pub async fn notify_environments(
        &self,
        hook: crate::commands::params::NotifyHook,
    ) -> Result<Vec<i64>, CoreError> {
        let ids = self.notify_environments_in(self.db(), hook).await?;
        if !ids.is_empty() {
            self.queue().wake();
        }
        Ok(ids)
    }

    /// `notify_environments` on `conn` (a transaction that commits the commands with other
    /// writes), without waking the queue.
    async fn notify_environments_in<C: sea_orm::ConnectionTrait>(
        &self,
        conn: &C,
        hook: crate::commands::params::NotifyHook,
    ) -> Result<Vec<i64>, CoreError> {
        use sea_orm::QuerySelect;
        // Environment by environment (an index probe each), never a pass over every container.
        let live = [
            crate::model::ContainerStatus::Running,
            crate::model::ContainerStatus::Stopped,
            crate::model::ContainerStatus::Suspended,
        ]
        .map(|s| format!("'{}'", s.as_str()))
        .join(", ");
        let envs: Vec<i64> = crate::entities::environment::Entity::find()
            .select_only()
            .column(crate::entities::environment::Column::Id)
            .filter(sea_orm::sea_query::Expr::cust(format!(
                "EXISTS (SELECT 1 FROM containers c WHERE c.environment_id = environments.id \
                 AND c.status IN ({live}))"
            )))
            .into_tuple::<i64>()
            .all(conn)
            .await?;
        let commands: Vec<_> = envs
            .into_iter()
            .map(|env| crate::queue::NewCommand {
                project: None,
                kind: crate::model::CommandKind::EnvironmentNotify,
                target: Some(crate::queue::Target::Environment(env)),
                params: crate::commands::params::to_value(crate::commands::params::Notify {
                    containers: Vec::new(),
                    cause: None,
                    hook: Some(hook),
                    previous_ip: None,
                }),
                requested_by: "core".into(),
            })
            .collect();
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.queue().enqueue_in(conn, commands, None).await?)
    }
}

/// The name of the `after-cc-start` notice in `owed_notices`.
const START_NOTICE: &str = "after-cc-start";

async fn local_platform(db: &DatabaseConnection) -> Result<platform::Model, DbErr> {
    if let Some(p) = platform::Entity::find()
        .filter(platform::Column::IsLocal.eq(true))
        .one(db)
        .await?
    {
        return Ok(p);
    }
    platform::ActiveModel {
        name: Set(format!("platform-{:08x}", rand::random::<u32>())),
        is_local: Set(true),
        plugins_bootstrapped: Set(false),
        created_at: Set(now_ms()),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// Where containers uploaded for import wait (`DATA/uploads/ID/disk`), made if missing;
/// uploads left over for more than a day (an import that failed or never ran) are removed.
fn uploads_dir(data_dir: &std::path::Path) -> Result<PathBuf, CoreError> {
    let dir = data_dir.join("uploads");
    std::fs::create_dir_all(&dir)
        .map_err(|e| CoreError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    let day = std::time::Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if old {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(dir)
}
