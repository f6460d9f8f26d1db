//! Live fleet health: heartbeats, and the transitions of servers between up and down.
//!
//! Servers send heartbeats with their load figures (`Health::heartbeat`; the simulated servers
//! of this core send theirs from a background task). The monitor (`Monitor::check`) marks
//! a server down when its last heartbeat is older than the grace period, and up again when
//! heartbeats resume. A gap shorter than the grace period changes nothing.
//!
//! Going down: the server's existing containers become `down` and each affected environment
//! gets an `environment.failover` command, which runs `is-down` in priority order and carries
//! out what the hooks ask (typically a replacement on another server, which makes the old
//! container `illegal`). Coming back: the collector cleans the server, containers that were not
//! replaced take the status their server reports, and `environment.recover` runs `is-up`.
//!
//! Invariant: a transition is a conditional update of the server's status, so when several
//! cores watch the same servers exactly one of them acts on each transition.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QuerySelect, TransactionTrait,
};

use crate::collector::Collector;
use crate::core::CoreError;
use crate::driver::{GuestState, ServerStats};
use crate::entities::{container, server};
use crate::fleet::Fleet;
use crate::model::ContainerStatus;
use crate::placement::PlacementCache;
use crate::queue::{Clock, NewCommand, Queue, Target};

/// The last heartbeat of a server.
#[derive(Debug, Clone)]
pub struct Beat {
    /// When it arrived, milliseconds since the Unix epoch (by the core's clock).
    pub at: i64,
    /// The load figures it carried.
    pub load: Option<ServerStats>,
}

/// Heartbeats received by this core, and those other cores received (merged from the
/// database, see `cluster`).
pub struct Health {
    beats: Mutex<HashMap<i64, Beat>>,
    /// Servers whose heartbeat arrived here since the last write to the database; `None`
    /// when no other core reads them (SQLite).
    unwritten: Option<Mutex<std::collections::HashSet<i64>>>,
    clock: Arc<dyn Clock>,
    /// When monitoring began: the grace period of a server that never sent a heartbeat
    /// counts from here.
    started: std::sync::atomic::AtomicI64,
    /// When the monitor first looked at a server it has heard no heartbeat of: one another
    /// core registered a moment ago counts its grace from then, not from `started`.
    noticed: Mutex<HashMap<i64, i64>>,
}

/// Server transitions made by one pass of the monitor.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Servers marked down.
    pub down: Vec<i64>,
    /// Servers marked up again.
    pub up: Vec<i64>,
}

impl Health {
    /// No heartbeats yet; the grace period of every server starts now.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let started = std::sync::atomic::AtomicI64::new(clock.now_ms());
        Health {
            beats: Mutex::new(HashMap::new()),
            unwritten: None,
            clock,
            started,
            noticed: Mutex::new(HashMap::new()),
        }
    }

    /// Restarts the grace period of every server that has not sent a heartbeat yet (when the
    /// core starts monitoring).
    pub fn begin(&self) {
        self.started
            .store(self.clock.now_ms(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Records a heartbeat of `server` now.
    pub fn heartbeat(&self, server: i64, load: Option<ServerStats>) {
        let at = self.clock.now_ms();
        self.beats.lock().unwrap().insert(server, Beat { at, load });
        if let Some(unwritten) = &self.unwritten {
            unwritten.lock().unwrap().insert(server);
        }
    }

    /// The same, keeping the heartbeats received here for other cores (`take_unwritten`).
    pub fn shared(mut self) -> Self {
        self.unwritten = Some(Mutex::new(Default::default()));
        self
    }

    /// The heartbeats that arrived here since the last call, for other cores: `(server, age in
    /// ms, load as JSON)`.
    pub fn take_unwritten(&self) -> Vec<(i64, i64, Option<String>)> {
        let Some(unwritten) = &self.unwritten else {
            return Vec::new();
        };
        let servers = std::mem::take(&mut *unwritten.lock().unwrap());
        let now = self.clock.now_ms();
        let beats = self.beats.lock().unwrap();
        servers
            .into_iter()
            .filter_map(|s| beats.get(&s).map(|b| (s, b)))
            .map(|(s, b)| {
                let load = b.load.as_ref().and_then(|l| serde_json::to_string(l).ok());
                (s, (now - b.at).max(0), load)
            })
            .collect()
    }

    /// Takes in a heartbeat another core received, `age` ms ago; an older one than this core
    /// knows changes nothing.
    pub fn merge(&self, server: i64, age: i64, load: Option<&str>) {
        let at = self.clock.now_ms() - age.max(0);
        let mut beats = self.beats.lock().unwrap();
        if beats.get(&server).is_some_and(|b| b.at >= at) {
            return;
        }
        let load = load.and_then(|l| serde_json::from_str(l).ok());
        beats.insert(server, Beat { at, load });
    }

    /// Takes in the heartbeats other cores shared (`Cluster::read_beats`).
    pub fn merge_all(&self, beats: Vec<(i64, i64, Option<String>)>) {
        for (server, age, load) in beats {
            self.merge(server, age, load.as_deref());
        }
    }

    /// Forgets `server` (removed): its heartbeats and the notice of its silence.
    pub fn forget(&self, server: i64) {
        self.beats.lock().unwrap().remove(&server);
        self.noticed.lock().unwrap().remove(&server);
        if let Some(unwritten) = &self.unwritten {
            unwritten.lock().unwrap().remove(&server);
        }
    }

    /// Milliseconds since the last heartbeat of `server` (by this core's clock, the one beats
    /// are stamped with).
    pub fn age(&self, server: i64) -> Option<i64> {
        let now = self.clock.now_ms();
        self.last(server).map(|b| now - b.at)
    }

    /// The last heartbeat of `server`.
    pub fn last(&self, server: i64) -> Option<Beat> {
        self.beats.lock().unwrap().get(&server).cloned()
    }

    /// Milliseconds of silence of `server` that count: since its last heartbeat (or, when it
    /// has sent none that this core knows of, since the monitor first looked at it), or since
    /// the monitor began (or resumed after a stall of its own), whichever is later.
    fn silence(&self, server: i64, now: i64) -> i64 {
        let started = self.started.load(std::sync::atomic::Ordering::SeqCst);
        let beat = self.beats.lock().unwrap().get(&server).map(|b| b.at);
        let at = beat.unwrap_or_else(|| *self.noticed.lock().unwrap().entry(server).or_insert(now));
        now - at.max(started)
    }
}

/// The monitor, with what it uses: the heartbeats, the database and queue where transitions
/// and failovers go, the servers' drivers, placement's view of the servers, the collector that
/// cleans a server coming back, and the grace period.
#[derive(Clone)]
pub struct Monitor {
    db: DatabaseConnection,
    queue: Queue,
    fleet: Arc<Fleet>,
    placement: Arc<PlacementCache>,
    health: Arc<Health>,
    collector: Collector,
    /// Where other cores' heartbeats are shared (several cores on PostgreSQL).
    cluster: Option<Arc<crate::cluster::Cluster>>,
    grace: std::time::Duration,
    /// Stalls of its own the monitor noticed.
    stalls: Arc<std::sync::atomic::AtomicU64>,
}

impl Monitor {
    /// A monitor over these parts.
    pub fn new(
        db: DatabaseConnection,
        queue: Queue,
        fleet: Arc<Fleet>,
        placement: Arc<PlacementCache>,
        health: Arc<Health>,
        collector: Collector,
        grace: std::time::Duration,
    ) -> Self {
        Monitor {
            db,
            queue,
            fleet,
            placement,
            health,
            collector,
            cluster: None,
            grace,
            stalls: Default::default(),
        }
    }

    /// The same, judging servers also by the heartbeats other cores share through `cluster`.
    pub fn sharing(mut self, cluster: Arc<crate::cluster::Cluster>) -> Self {
        self.cluster = cluster.shared().then_some(cluster);
        self
    }

    /// One scheduled pass of the monitor, `delay` after it was due. A delay of a quarter of the
    /// grace period or more means the monitor itself did not run (the process was starved or
    /// paused): heartbeats that arrived meanwhile may not have been processed either, so the
    /// silence gathered while it was not running is not evidence; every server's silence counts
    /// afresh from now, and no server is marked down on it.
    pub async fn tick(&self, delay: std::time::Duration) -> Result<HealthReport, CoreError> {
        if delay >= self.grace / 4 {
            self.health.begin();
            self.stalls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                delay_ms = delay.as_millis() as u64,
                "the health monitor itself did not run on time; servers' silence counts afresh"
            );
        }
        self.check().await
    }

    /// Stalls of its own the monitor noticed.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a heartbeat for every simulated server that is not crashed (what their agents
    /// would do).
    pub async fn beat_sims(&self) {
        for (id, sim) in self.fleet.sims() {
            if let Some(stats) = sim.heartbeat() {
                self.health.heartbeat(id, Some(stats));
            }
        }
    }

    /// One pass of the monitor: marks silent servers down and answering ones up.
    pub async fn check(&self) -> Result<HealthReport, CoreError> {
        let grace = self.grace.as_millis() as i64;
        let mut now = self.health.clock.now_ms();
        let servers = self.placement.snapshot();
        // A server that looks silent may have beaten to another core since this one last read
        // the shared beats (once a heartbeat period): they are read afresh before it is judged,
        // so its silence here is at most the other core's period longer than the truth.
        if let Some(cluster) = &self.cluster
            && servers
                .iter()
                .any(|c| c.up && self.health.silence(c.id, now) > grace)
        {
            self.health.merge_all(cluster.read_beats().await?);
            now = self.health.clock.now_ms();
        }
        let mut report = HealthReport::default();
        for c in servers {
            let silent = self.health.silence(c.id, now) > grace;
            if c.up && silent {
                let cause = format!("server missed its heartbeats for more than {grace} ms");
                if self.mark_down(c.id, &cause).await? {
                    report.down.push(c.id);
                }
            } else if !c.up
                // Its own heartbeat within the grace period, not a silence counted afresh
                // (after a stall of the monitor or a takeover of its duty): it was marked
                // down on silence longer than that, so this beat came after.
                && self.health.age(c.id).is_some_and(|age| age <= grace)
                && self.mark_up(c.id).await?
            {
                report.up.push(c.id);
            }
        }
        Ok(report)
    }

    /// Marks a server down: its containers become `down` and their environments get an
    /// `environment.failover` command. False if it was not up.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn mark_down(&self, server_id: i64, cause: &str) -> Result<bool, CoreError> {
        let txn = self.db.begin().await?;
        let changed = server::Entity::update_many()
            .col_expr(server::Column::Status, Expr::val("down"))
            .filter(server::Column::Id.eq(server_id))
            .filter(server::Column::Status.eq("up"))
            .exec(&txn)
            .await?
            .rows_affected;
        if changed == 0 {
            return Ok(false);
        }
        let live = [
            ContainerStatus::Running,
            ContainerStatus::Stopped,
            ContainerStatus::Suspended,
        ]
        .map(|s| s.as_str());
        let hit = container::Entity::find()
            .filter(container::Column::ServerId.eq(server_id))
            .filter(container::Column::Status.is_in(live))
            .all(&txn)
            .await?;
        container::Entity::update_many()
            .col_expr(
                container::Column::Status,
                Expr::val(ContainerStatus::Down.as_str()),
            )
            .col_expr(
                container::Column::UpdatedAt,
                Expr::val(crate::model::now_ms()),
            )
            .filter(container::Column::ServerId.eq(server_id))
            .filter(container::Column::Status.is_in(live))
            .exec(&txn)
            .await?;
        let name = self
            .fleet
            .named_driver(server_id)
            .map_or(format!("#{server_id}"), |(_, n)| n);
        let cause = format!("server {name} is unreachable: {cause}");
        let commands = per_environment(&hit, |env, ids| NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentFailover,
            target: Some(Target::Environment(env)),
            params: crate::commands::params::to_value(crate::commands::params::Notify {
                containers: ids,
                cause: Some(cause.clone()),
                hook: None,
                previous_ip: None,
            }),
            requested_by: "health-monitor".into(),
        });
        let count = commands.len();
        self.queue.enqueue_in(&txn, commands, None).await?;
        txn.commit().await?;
        let draining = self
            .placement
            .snapshot()
            .iter()
            .any(|c| c.id == server_id && c.draining);
        self.placement.set_status(server_id, false, draining);
        self.queue.wake();
        tracing::warn!(server = %name, containers = hit.len(), environments = count, "server is down");
        Ok(true)
    }

    /// Removes the leftover guests of a server that just registered (an agent back under the
    /// name of a removed server may hold that server's guests); a failure waits for the
    /// collector's next pass.
    pub async fn collect_new(&self, server_id: i64) {
        match self.collector.collect(Some(server_id)).await {
            Ok(report) if report.leftovers > 0 => {
                tracing::info!(
                    server = server_id,
                    leftovers = report.leftovers,
                    "removed the guests a new server's agent held from before"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(server = server_id, error = %e, "cannot clean a new server yet; the collector's next pass will");
            }
        }
    }

    /// Marks a server up again: the collector cleans it, containers that were not replaced
    /// take the status their server reports, and their environments get `environment.recover`.
    /// False if it was not down.
    pub async fn mark_up(&self, server_id: i64) -> Result<bool, CoreError> {
        let changed = server::Entity::update_many()
            .col_expr(server::Column::Status, Expr::val("up"))
            .filter(server::Column::Id.eq(server_id))
            .filter(server::Column::Status.eq("down"))
            .exec(&self.db)
            .await?
            .rows_affected;
        if changed == 0 {
            return Ok(false);
        }
        self.placement.refresh(&self.db, server_id).await?;
        let report = self.collector.collect(Some(server_id)).await?;
        // Its guests are listed again after the collector's pass (which listed them too): the
        // statuses read are those left once it removed what must not exist.
        let (back, unread) = self.recover_down(server_id).await?;
        tracing::info!(
            server = server_id,
            back,
            unread,
            ?report,
            "server is up again"
        );
        Ok(true)
    }

    /// Reads the containers left `down` on servers that are up again and gives each the
    /// status its server reports (`recover_down`): those whose status could not be read when
    /// their server came back (it answered its heartbeats but not for them) would otherwise
    /// stay down for good. Run with the collector; returns how many it settled.
    pub async fn recheck_down(&self) -> Result<usize, CoreError> {
        let up: std::collections::HashSet<i64> = self
            .placement
            .snapshot()
            .iter()
            .filter(|c| c.up)
            .map(|c| c.id)
            .collect();
        let servers: Vec<Option<i64>> = container::Entity::find()
            .select_only()
            .column(container::Column::ServerId)
            .distinct()
            .filter(container::Column::Status.eq(ContainerStatus::Down.as_str()))
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut settled = 0;
        for server in servers.into_iter().flatten().filter(|s| up.contains(s)) {
            let (back, unread) = self.recover_down(server).await?;
            if back > 0 {
                tracing::info!(
                    server,
                    back,
                    unread,
                    "containers left down on a server that is up were read again"
                );
            }
            settled += back;
        }
        Ok(settled)
    }

    /// Gives each container `down` on `server_id` the status the server reports (running,
    /// stopped, suspended; failed when its guest is gone) and their environments
    /// `environment.recover`; a container the server does not answer for stays down.
    /// Returns (settled, still down).
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    async fn recover_down(&self, server_id: i64) -> Result<(usize, usize), CoreError> {
        let down = container::Entity::find()
            .filter(container::Column::ServerId.eq(server_id))
            .filter(container::Column::Status.eq(ContainerStatus::Down.as_str()))
            .all(&self.db)
            .await?;
        // Ask the server first, then write: no transaction is open across a driver call.
        let driver = self.fleet.driver(server_id);
        let mut seen = Vec::new();
        let mut unread = 0;
        let total = down.len();
        let status_of = |state: GuestState| match state {
            GuestState::Running => ContainerStatus::Running,
            GuestState::Stopped => ContainerStatus::Stopped,
            GuestState::Suspended => ContainerStatus::Suspended,
        };
        // All of them in one answer where the server lists its guests (a server back with
        // hundreds of containers is one request, not one each); one by one where it cannot.
        let listed = match (&driver, total) {
            (Some(d), 2..) => match d.list().await {
                Ok(guests) => Some(
                    guests
                        .into_iter()
                        .map(|g| (g.guest_id, g.state))
                        .collect::<std::collections::HashMap<_, _>>(),
                ),
                Err(e) => {
                    tracing::info!(server = server_id, error = %e, "cannot list a server's guests after it came back; reading them one by one");
                    None
                }
            },
            _ => None,
        };
        match listed {
            Some(guests) => seen.extend(down.into_iter().map(|row| {
                let status = guests
                    .get(&row.guest_id)
                    .map_or(ContainerStatus::Failed, |s| status_of(*s));
                (row, status)
            })),
            None => {
                for (n, row) in down.into_iter().enumerate() {
                    let Some(d) = &driver else { continue };
                    let status = match d.status(&row.guest_id).await {
                        Ok(Some(g)) => status_of(g.state),
                        Ok(None) => ContainerStatus::Failed,
                        Err(e) if e.is_transient() => {
                            // The server does not answer for its guests: the rest are read
                            // again with the collector's next pass, not each waited for now.
                            unread += total - n;
                            tracing::warn!(container = row.id, unread, error = %e, "cannot read a container's status after its server came back");
                            break;
                        }
                        Err(e) => {
                            // This guest alone: the others are read on.
                            unread += 1;
                            tracing::warn!(container = row.id, error = %e, "cannot read a container's status after its server came back");
                            continue;
                        }
                    };
                    seen.push((row, status));
                }
            }
        }
        let txn = self.db.begin().await?;
        let mut back = Vec::new();
        let mut settled = 0;
        for (row, status) in seen {
            let reason = (status == ContainerStatus::Failed).then(|| {
                format!(
                    "its guest ({}) was gone from its server when the server came back after an \
                     outage",
                    row.guest_id
                )
            });
            let changed = container::Entity::update_many()
                .col_expr(container::Column::Status, Expr::val(status.as_str()))
                .col_expr(container::Column::StatusReason, Expr::val(reason))
                .filter(container::Column::Id.eq(row.id))
                .filter(container::Column::Status.eq(ContainerStatus::Down.as_str()))
                // Not on a server marked down again meanwhile (its failover goes on).
                .filter(
                    container::Column::ServerId.in_subquery(
                        sea_orm::sea_query::Query::select()
                            .column(server::Column::Id)
                            .from(server::Entity)
                            .and_where(server::Column::Status.eq("up"))
                            .to_owned(),
                    ),
                )
                .exec(&txn)
                .await?
                .rows_affected;
            if changed == 0 {
                // Settled meanwhile (a failover replaced it, another pass read it).
                continue;
            }
            settled += 1;
            if status == ContainerStatus::Failed {
                let need = crate::placement::requirements_of(&row).resources;
                crate::placement::release(&txn, server_id, &need, 1).await?;
                tracing::warn!(
                    container = row.id,
                    "its guest is gone from its server after the outage; marked failed"
                );
            } else {
                back.push(row);
            }
        }
        let commands = per_environment(&back, |env, ids| NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentRecover,
            target: Some(Target::Environment(env)),
            params: crate::commands::params::to_value(crate::commands::params::Notify {
                containers: ids,
                cause: None,
                hook: None,
                previous_ip: None,
            }),
            requested_by: "health-monitor".into(),
        });
        self.queue.enqueue_in(&txn, commands, None).await?;
        txn.commit().await?;
        if settled > 0 {
            self.placement.refresh(&self.db, server_id).await?;
            self.queue.wake();
        }
        Ok((settled, unread))
    }
}

/// One command per environment of `rows` (standalone containers get none).
fn per_environment(
    rows: &[container::Model],
    make: impl Fn(i64, Vec<i64>) -> NewCommand,
) -> Vec<NewCommand> {
    let mut by_env: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for r in rows {
        if let Some(env) = r.environment_id {
            by_env.entry(env).or_default().push(r.id);
        }
    }
    by_env
        .into_iter()
        .map(|(env, ids)| make(env, ids))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct ManualClock(AtomicI64);

    impl ManualClock {
        fn advance(&self, ms: i64) {
            self.0.fetch_add(ms, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A server another core registered long after this monitor began (its heartbeats not yet
    /// merged here) counts its grace from when the monitor first looked at it.
    #[test]
    fn a_server_first_seen_late_counts_its_silence_from_then() {
        let clock = Arc::new(ManualClock(AtomicI64::new(1_000_000)));
        let health = Health::new(clock.clone());
        clock.advance(60_000);
        let now = clock.now_ms();
        assert_eq!(health.silence(7, now), 0, "new to the monitor");
        clock.advance(2_500);
        assert_eq!(health.silence(7, clock.now_ms()), 2_500);
        health.heartbeat(7, None);
        clock.advance(100);
        assert_eq!(health.silence(7, clock.now_ms()), 100);
        // A stall of the monitor counts every silence afresh.
        clock.advance(10_000);
        health.begin();
        assert_eq!(health.silence(7, clock.now_ms()), 0);
    }
}
