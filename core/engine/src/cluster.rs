//! Several cores on one PostgreSQL database: the duties exactly one core performs at a time,
//! the heartbeats every core shares, and the cores agents can reach.
//!
//! - **Duties** (`Duty`): the health monitor's decisions, the collector and the rebalancer run
//!   on the one core holding the duty's lease (a row of `duties`), renewed every third of its
//!   length and taken over by another core once it expires. Leases are computed from the
//!   database's clock, so a core whose clock is skewed neither steals nor loses one.
//! - **Shared heartbeats**: every core writes the heartbeats it received since its last write
//!   in one statement (`server_beats`, age-corrected to the database's clock) and reads the
//!   others', so the core holding the monitor judges every server from the same facts whichever
//!   core its agent talks to.
//! - **Cores**: every core records itself (`cores`) with the URL agents reach it at; agents
//!   learn the list from their heartbeats' answers and fail over to the next core.
//!
//! On SQLite there is one core: it holds every duty and shares nothing.
//!
//! Invariants: a core acts on a duty only before the local deadline of its last successful
//! claim, and that deadline (measured from before the claim was sent) never outlasts the lease
//! the database recorded; at most one core's claim succeeds while a lease is unexpired.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, Statement, Value};
use tokio::time::Instant;

use crate::queue::Clock;

/// The database's clock in milliseconds since the Unix epoch (PostgreSQL).
pub(crate) const PG_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// The database's clock, read through this core's: the core's clock plus the offset last
/// measured against the database (`calibrate`, every heartbeat period). On PostgreSQL every
/// time a core writes or compares with other cores' (command leases, retry times, dummies'
/// deadlines) comes from it, so a core whose clock is skewed neither steals nor loses leases.
pub struct DbClock {
    inner: std::sync::Arc<dyn Clock>,
    offset: AtomicI64,
}

impl DbClock {
    /// `inner` corrected by the offset measured now against `db`.
    pub async fn new(
        inner: std::sync::Arc<dyn Clock>,
        db: &DatabaseConnection,
    ) -> Result<Self, DbErr> {
        let clock = DbClock {
            inner,
            offset: AtomicI64::new(0),
        };
        clock.calibrate(db).await?;
        Ok(clock)
    }

    /// Measures the offset of the database's clock from this core's and returns it in
    /// milliseconds: of `SAMPLES` readings, the one with the shortest round trip (its middle is
    /// the best estimate of when the database read its clock; a reading delayed by a busy
    /// database or runtime would be off by half its round trip).
    pub async fn calibrate(&self, db: &DatabaseConnection) -> Result<i64, DbErr> {
        const SAMPLES: usize = 3;
        let mut best: Option<(i64, i64)> = None;
        for _ in 0..SAMPLES {
            let before = self.inner.now_ms();
            let row = db
                .query_one_raw(Statement::from_string(
                    DatabaseBackend::Postgres,
                    format!("SELECT {PG_NOW_MS} AS now"),
                ))
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("the database's time".into()))?;
            let now: i64 = row.try_get("", "now")?;
            let after = self.inner.now_ms();
            best = Some(best_reading(
                best,
                after - before,
                now - (before + after) / 2,
            ));
        }
        let (_, offset) = best.expect("at least one sample");
        self.offset.store(offset, Ordering::Relaxed);
        Ok(offset)
    }
}

/// Of two clock readings `(round trip, offset)`, the one with the shorter round trip.
fn best_reading(best: Option<(i64, i64)>, round_trip: i64, offset: i64) -> (i64, i64) {
    match best {
        Some(b) if b.0 <= round_trip => b,
        _ => (round_trip, offset),
    }
}

impl Clock for DbClock {
    fn now_ms(&self) -> i64 {
        self.inner.now_ms() + self.offset.load(Ordering::Relaxed)
    }
}

/// Work exactly one core does at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Duty {
    /// Marking servers down and up, and the failovers that follow.
    Monitor,
    /// Collecting leftovers and rebalancing servers.
    Collector,
}

impl Duty {
    /// Every duty.
    pub const ALL: [Duty; 2] = [Duty::Monitor, Duty::Collector];

    /// Its name in `duties`.
    pub fn name(self) -> &'static str {
        match self {
            Duty::Monitor => "monitor",
            Duty::Collector => "collector",
        }
    }
}

/// What a claim of a duty found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This core took the duty (it was free, expired, or held by it before a lapse).
    Taken,
    /// This core held it and renewed it.
    Kept,
    /// Another core holds it.
    Elsewhere,
}

/// One core's view of the cluster.
pub struct Cluster {
    db: DatabaseConnection,
    node: String,
    lease: Duration,
    /// Local deadlines of the duties this core holds.
    held: Mutex<HashMap<Duty, Instant>>,
    /// The URLs of the cores seen lately (told to agents).
    urls: Mutex<Vec<String>>,
    /// Whether another core was seen lately (as of the last `sync_cores`).
    others: std::sync::atomic::AtomicBool,
    /// The database's clock (PostgreSQL), recalibrated by `sync_cores`.
    clock: Option<std::sync::Arc<DbClock>>,
    /// The servers' fingerprints (what they are, what is placed on them) when this core last
    /// read them.
    servers_seen: Mutex<Option<(String, String)>>,
    /// A fingerprint of the agents token this core takes (never the token), announced with it
    /// (`NO_TOKEN` when it takes none).
    agents_token: String,
    /// This process's random id, announced with the node: another process announcing the same
    /// node (a copied data directory) is told apart by it.
    instance: String,
}

/// Takes the PostgreSQL advisory lock `key` for the rest of transaction `txn`, waiting at
/// most `wait` (a stalled holder must not stall every caller): past it, busy, with `busy`
/// given how long it waited and why it stopped.
pub(crate) async fn xact_lock(
    txn: &sea_orm::DatabaseTransaction,
    key: i64,
    wait: Duration,
    busy: impl FnOnce(String) -> String,
) -> Result<(), crate::core::CoreError> {
    txn.execute_unprepared(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        wait.as_millis()
    ))
    .await?;
    txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({key})"))
        .await
        .map_err(|e| {
            crate::core::CoreError::Busy(busy(format!(
                "{} s ({})",
                wait.as_secs(),
                crate::model::with_causes(&e)
            )))
        })?;
    Ok(())
}

/// What changed in `servers` since a core last read it.
#[derive(Debug)]
pub enum ServerChanges {
    /// Nothing (and always so on SQLite).
    None,
    /// Servers added or removed, or their status, draining, address, network, capacity or
    /// labels: every row.
    All(Vec<crate::entities::server::Model>),
    /// Only the allocation counters: `(id, cpu_millis, memory_mb, disk_mb, containers)` of
    /// every server, a narrow read.
    Allocations(Vec<(i64, i64, i64, i64, i64)>),
}

/// A core of the cluster, as the database last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CoreSeen {
    /// Its node id.
    pub node: String,
    /// The URL agents reach it at, if it has one.
    pub url: Option<String>,
    /// Milliseconds since it last wrote (by the database's clock).
    pub silent_ms: i64,
}

impl Cluster {
    /// The cluster as seen by core `node`; duties are held for `lease` between renewals.
    pub fn new(db: DatabaseConnection, node: String, lease: Duration) -> Self {
        Cluster {
            db,
            node,
            lease,
            held: Mutex::new(HashMap::new()),
            urls: Mutex::new(Vec::new()),
            others: std::sync::atomic::AtomicBool::new(false),
            clock: None,
            servers_seen: Mutex::new(None),
            agents_token: NO_TOKEN.into(),
            instance: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// The same, announcing a fingerprint of the agents token it takes (`None`: none).
    pub fn with_agents_token(mut self, token: Option<&str>) -> Self {
        self.agents_token = token.map_or_else(|| NO_TOKEN.into(), token_fingerprint);
        self
    }

    /// Refuses to run beside a core seen within `within` that takes another agents token (or
    /// none where this one takes one, or the reverse): agents present one token to whichever
    /// core they reach, so the agents failing over to this core would be refused, and their
    /// servers judged down. This core's token is announced before the others' are read, so of
    /// two cores started at once with different tokens at least one sees the other; a refused
    /// core takes its token back.
    pub async fn check_agents_token(&self, within: Duration) -> Result<(), String> {
        if !self.shared() {
            return Ok(());
        }
        // Its URL comes with the next announcement, at the end of the start.
        self.announce(None).await.map_err(|e| e.to_string())?;
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!(
                    "SELECT node, url FROM cores WHERE seen_at >= {PG_NOW_MS} - $1 AND node <> $2 \
                     AND agents_token IS NOT NULL AND agents_token IS DISTINCT FROM $3 \
                     ORDER BY seen_at DESC LIMIT 1"
                ),
                [
                    Value::BigInt(Some(within.as_millis() as i64)),
                    self.node.clone().into(),
                    self.agents_token.clone().into(),
                ],
            ))
            .await
            .map_err(|e| e.to_string())?;
        let Some(row) = rows.first() else {
            return Ok(());
        };
        // Refused: this core does not run.
        self.leave().await.map_err(|e| e.to_string())?;
        let node: String = row.try_get("", "node").map_err(|e| e.to_string())?;
        let url: Option<String> = row.try_get("", "url").map_err(|e| e.to_string())?;
        Err(format!(
            "core {node}{} runs on this database with another agents token than this core's \
             ({}): agents present one token to whichever core they reach, so the agents that \
             came to this one would be refused and their servers judged down. Give every core \
             the same agents.token (CLOUD48_AGENT_TOKEN); to change it, stop every core first \
             (one ended by kill -9 counts as running for {} s after it was last seen)",
            url.map(|u| format!(" (at {u})")).unwrap_or_default(),
            if self.agents_token != NO_TOKEN {
                "set, and different"
            } else {
                "none set"
            },
            within.as_secs()
        ))
    }

    /// Refuses to run as a node another process runs as: a data directory copied with its
    /// `node-id` (a cloned machine, a restored backup) would make two processes one node, each
    /// taking the other's running commands for its own. Run before this core writes its row:
    /// when another instance wrote it lately, this waits two announcement periods (`period`,
    /// at least 1 s in all) and refuses if it wrote again; a core killed a moment ago has
    /// stopped writing, and one that stopped gracefully left its row at once.
    pub async fn check_node_free(&self, period: Duration) -> Result<(), String> {
        if !self.shared() {
            return Ok(());
        }
        let wait = (period * 2).max(Duration::from_secs(1));
        let Some((instance, seen_at, age)) = self.node_row().await? else {
            return Ok(());
        };
        if instance.is_none() || age > wait.as_millis() as i64 {
            return Ok(());
        }
        tokio::time::sleep(wait).await;
        match self.node_row().await? {
            Some((again, at, _)) if again == instance && at > seen_at => Err(format!(
                "another core runs as node {} on this database (it announced itself {} ms \
                 before this one started, and again since): this data directory's node-id is \
                 that core's, copied with the directory (a cloned machine, a restored backup). \
                 Give this core a data directory of its own; to keep this one, delete its \
                 node-id file and the core makes a new one",
                self.node, age
            )),
            _ => Ok(()),
        }
    }

    /// The row of this core's node: the instance that wrote it, when, and how long ago (ms).
    async fn node_row(&self) -> Result<Option<(Option<String>, i64, i64)>, String> {
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!(
                    "SELECT instance, seen_at, {PG_NOW_MS} - seen_at AS age FROM cores \
                     WHERE node = $1"
                ),
                [self.node.clone().into()],
            ))
            .await
            .map_err(|e| e.to_string())?;
        rows.first()
            .map(|r| {
                Ok((
                    r.try_get("", "instance")?,
                    r.try_get("", "seen_at")?,
                    r.try_get("", "age")?,
                ))
            })
            .transpose()
            .map_err(|e: DbErr| e.to_string())
    }

    /// The same, keeping `clock` calibrated against the database.
    pub fn with_clock(mut self, clock: std::sync::Arc<DbClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Whether several cores can share this database (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.db.get_database_backend() == DatabaseBackend::Postgres
    }

    /// This core's node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// How long a claimed duty stays this core's without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Takes or renews `duty` for this core. On SQLite the only core always holds it.
    pub async fn claim(&self, duty: Duty) -> Result<Claim, DbErr> {
        if !self.shared() {
            let mut held = self.held.lock().unwrap();
            let before = held.insert(duty, Instant::now() + Duration::from_secs(1 << 30));
            return Ok(if before.is_some() {
                Claim::Kept
            } else {
                Claim::Taken
            });
        }
        let sent = Instant::now();
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!(
                    "INSERT INTO duties (name, owner, expires_at) VALUES ($1, $2, {PG_NOW_MS} + $3) \
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at \
                     WHERE duties.owner = excluded.owner OR duties.expires_at < {PG_NOW_MS} \
                     RETURNING owner"
                ),
                [
                    duty.name().into(),
                    self.node.clone().into(),
                    Value::BigInt(Some(self.lease.as_millis() as i64)),
                ],
            ))
            .await;
        let mut held = self.held.lock().unwrap();
        let was = held.get(&duty).is_some_and(|d| *d > sent);
        match row {
            Ok(Some(_)) => {
                held.insert(duty, sent + self.lease);
                Ok(if was { Claim::Kept } else { Claim::Taken })
            }
            Ok(None) => {
                held.remove(&duty);
                Ok(Claim::Elsewhere)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this core holds `duty` now (its last claim's lease has not run out).
    pub fn holds(&self, duty: Duty) -> bool {
        self.held
            .lock()
            .unwrap()
            .get(&duty)
            .is_some_and(|d| *d > Instant::now())
    }

    /// Says this core no longer runs (after its last step ended, or refused at start): it is
    /// not seen as running, so cores starting next find themselves alone (and owe the
    /// environments `after-cc-start`), and takes no token any more (every core
    /// stopped, they may all start again with a new one at once).
    pub async fn leave(&self) -> Result<(), DbErr> {
        if !self.shared() {
            return Ok(());
        }
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "UPDATE cores SET agents_token = NULL, seen_at = 0 WHERE node = $1",
                [self.node.clone().into()],
            ))
            .await?;
        Ok(())
    }

    /// Records that this core owes the environments `notice` if no other core was seen within
    /// `within`, i.e. it starts the control plane. The read and the write are one statement,
    /// made before this core announces itself: a core that sees this one finds the notice owed,
    /// and a core that reads after another sent the notice sees that one and owes nothing.
    pub async fn owe_if_alone(&self, notice: &str, within: Duration) -> Result<(), DbErr> {
        let backend = self.db.get_database_backend();
        let (text, values): (String, Vec<Value>) = if self.shared() {
            (
                format!(
                    "INSERT INTO owed_notices (name, owed_by, since) SELECT $1, $2, {PG_NOW_MS} \
                     WHERE NOT EXISTS (SELECT 1 FROM cores WHERE node <> $2 \
                       AND seen_at >= {PG_NOW_MS} - $3) \
                     ON CONFLICT (name, owed_by) DO NOTHING"
                ),
                vec![
                    notice.into(),
                    self.node.clone().into(),
                    Value::BigInt(Some(within.as_millis() as i64)),
                ],
            )
        } else {
            (
                "INSERT INTO owed_notices (name, owed_by, since) VALUES ($1, $2, $3) \
                 ON CONFLICT (name, owed_by) DO NOTHING"
                    .to_string(),
                vec![
                    notice.into(),
                    self.node.clone().into(),
                    crate::model::now_ms().into(),
                ],
            )
        };
        self.db
            .execute_raw(Statement::from_sql_and_values(backend, text, values))
            .await?;
        Ok(())
    }

    /// Gives up every duty this core holds, so that another core takes them at once (a graceful
    /// stop).
    pub async fn release(&self) -> Result<(), DbErr> {
        self.held.lock().unwrap().clear();
        if !self.shared() {
            return Ok(());
        }
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "UPDATE duties SET expires_at = 0 WHERE owner = $1",
                [self.node.clone().into()],
            ))
            .await?;
        Ok(())
    }

    /// The holders of every duty whose lease has not expired (node ids by duty name).
    pub async fn holders(&self) -> Result<Vec<(String, String)>, DbErr> {
        if !self.shared() {
            return Ok(Duty::ALL
                .iter()
                .map(|d| (d.name().to_string(), self.node.clone()))
                .collect());
        }
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                format!(
                    "SELECT name, owner FROM duties WHERE expires_at >= {PG_NOW_MS} ORDER BY name"
                ),
            ))
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("", "name")?, r.try_get("", "owner")?)))
            .collect()
    }

    /// Writes heartbeats this core received: `(server, age in ms, load as JSON)`, the age
    /// counted by this core's clock up to now. A beat older than the stored one changes nothing.
    pub async fn write_beats(&self, beats: &[(i64, i64, Option<String>)]) -> Result<(), DbErr> {
        if !self.shared() || beats.is_empty() {
            return Ok(());
        }
        let rows: Vec<serde_json::Value> = beats
            .iter()
            .map(|(s, age, load)| serde_json::json!([s, age, load]))
            .collect();
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!(
                    "INSERT INTO server_beats (server_id, at, load) \
                     SELECT (b->>0)::bigint, {PG_NOW_MS} - (b->>1)::bigint, b->>2 \
                     FROM jsonb_array_elements($1::jsonb) AS b \
                     ON CONFLICT (server_id) DO UPDATE SET at = excluded.at, load = excluded.load \
                     WHERE server_beats.at < excluded.at"
                ),
                [serde_json::Value::Array(rows).to_string().into()],
            ))
            .await?;
        Ok(())
    }

    /// Every server's last heartbeat received by any core: `(server, age in ms by the
    /// database's clock, load as JSON)`.
    pub async fn read_beats(&self) -> Result<Vec<(i64, i64, Option<String>)>, DbErr> {
        if !self.shared() {
            return Ok(Vec::new());
        }
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                format!("SELECT server_id, {PG_NOW_MS} - at AS age, load FROM server_beats"),
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("", "server_id")?,
                    r.try_get("", "age")?,
                    r.try_get("", "load")?,
                ))
            })
            .collect()
    }

    /// Records that this core is alive, reachable at `url`.
    pub async fn announce(&self, url: Option<&str>) -> Result<(), DbErr> {
        if !self.shared() {
            return Ok(());
        }
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!(
                    "INSERT INTO cores (node, url, seen_at, agents_token, instance) \
                     VALUES ($1, $2, {PG_NOW_MS}, $3, $4) ON CONFLICT (node) DO UPDATE \
                     SET url = excluded.url, seen_at = excluded.seen_at, \
                     agents_token = excluded.agents_token, instance = excluded.instance"
                ),
                [
                    self.node.clone().into(),
                    url.map(str::to_string).into(),
                    self.agents_token.clone().into(),
                    self.instance.clone().into(),
                ],
            ))
            .await?;
        Ok(())
    }

    /// What other cores changed in `servers` since this core last read it: servers added or
    /// removed, their status, draining, address, network, capacity, labels or agent (every row is
    /// read again), or only the allocations (only the counters are), by two fingerprints
    /// computed in the database. The allocations are followed so that placement here sees
    /// what other cores placed within a heartbeat period (the database checks capacity on
    /// every reservation anyway; without them, cores placing at once each saw the same server
    /// emptiest and stacked containers on it).
    pub async fn changed_servers(&self) -> Result<ServerChanges, DbErr> {
        use crate::entities::server;
        use sea_orm::{EntityTrait, QueryOrder};
        if !self.shared() {
            return Ok(ServerChanges::None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT md5(coalesce(string_agg(id || ':' || status || ':' || draining || ':' || \
                 coalesce(address, '') || ':' || coalesce(subnet, '') || ':' || \
                 coalesce(addresses, '') || ':' || cpu_millis || ':' || memory_mb || ':' || \
                 disk_mb || ':' || labels || ':' || coalesce(agent_id, ''), ',' ORDER BY id), \
                 '')) AS what, \
                 md5(coalesce(string_agg(id || ':' || alloc_cpu_millis || ':' || \
                 alloc_memory_mb || ':' || alloc_disk_mb || ':' || alloc_containers, ',' \
                 ORDER BY id), '')) AS placed FROM servers",
            ))
            .await?;
        let Some(row) = row else {
            return Ok(ServerChanges::None);
        };
        let seen = (row.try_get("", "what")?, row.try_get("", "placed")?);
        let before = self.servers_seen.lock().unwrap().clone();
        let changes = match before {
            Some(b) if b == seen => return Ok(ServerChanges::None),
            Some((what, _)) if what == seen.0 => {
                ServerChanges::Allocations(crate::placement::read_allocations(&self.db).await?)
            }
            _ => ServerChanges::All(
                server::Entity::find()
                    .order_by_asc(server::Column::Id)
                    .all(&self.db)
                    .await?,
            ),
        };
        *self.servers_seen.lock().unwrap() = Some(seen);
        Ok(changes)
    }

    /// Records that this core is alive at `url`, and reads the URLs of the cores seen within
    /// `within` (what `urls` answers until the next call).
    pub async fn sync_cores(&self, url: Option<&str>, within: Duration) -> Result<(), DbErr> {
        if !self.shared() {
            return Ok(());
        }
        self.announce(url).await?;
        if let Some(clock) = &self.clock {
            clock.calibrate(&self.db).await?;
        }
        let cores = self.cores(within).await?;
        let others = cores.iter().any(|c| c.node != self.node);
        self.others.store(others, Ordering::Relaxed);
        *self.urls.lock().unwrap() = cores.into_iter().filter_map(|c| c.url).collect();
        Ok(())
    }

    /// Whether another core was seen lately on this database (as of the last `sync_cores`).
    pub fn others_seen(&self) -> bool {
        self.others.load(Ordering::Relaxed)
    }

    /// The URLs of the cores seen lately (as of the last `sync_cores`).
    pub fn urls(&self) -> Vec<String> {
        self.urls.lock().unwrap().clone()
    }

    /// The cores that wrote within `within`, most recently seen first.
    pub async fn cores(&self, within: Duration) -> Result<Vec<CoreSeen>, DbErr> {
        if !self.shared() {
            return Ok(vec![CoreSeen {
                node: self.node.clone(),
                url: None,
                silent_ms: 0,
            }]);
        }
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!(
                    "SELECT node, url, {PG_NOW_MS} - seen_at AS silent FROM cores \
                     WHERE seen_at >= {PG_NOW_MS} - $1 ORDER BY seen_at DESC, node"
                ),
                [Value::BigInt(Some(within.as_millis() as i64))],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(CoreSeen {
                    node: r.try_get("", "node")?,
                    url: r.try_get("", "url")?,
                    silent_ms: r.try_get("", "silent")?,
                })
            })
            .collect()
    }
}

/// Milliseconds since any core last wrote a heartbeat of `server` (by the database's clock),
/// through `conn`; `None` when none is shared (always on SQLite, where one core hears every
/// agent).
pub(crate) async fn beat_age<C: ConnectionTrait>(
    conn: &C,
    server: i64,
) -> Result<Option<i64>, DbErr> {
    if conn.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(None);
    }
    conn.query_one_raw(Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        format!("SELECT {PG_NOW_MS} - at AS age FROM server_beats WHERE server_id = $1"),
        [Value::BigInt(Some(server))],
    ))
    .await?
    .map(|r| r.try_get::<i64>("", "age"))
    .transpose()
}

/// Calls `wake(Some(by))` whenever commands are inserted into the database at `url` (PostgreSQL
/// `LISTEN cloud48_work`; the trigger of migration 17 notifies once per inserting statement,
/// since migration 23 with the inserting connection's `application_name` as `by`: a core's
/// connections carry its name), and `wake(None)` after every (re)connection for what may have
/// been missed. Runs until the task is dropped; a lost connection is retried with a growing
/// delay.
pub async fn listen_for_work(url: String, wake: impl Fn(Option<&str>) + Send + 'static) {
    use sea_orm::sqlx::postgres::PgListener;
    let mut delay = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut l = PgListener::connect(&url).await?;
            l.listen("cloud48_work").await?;
            Ok::<_, sea_orm::sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut l) => {
                delay = Duration::from_millis(100);
                wake(None);
                loop {
                    match l.recv().await {
                        Ok(n) => wake(Some(n.payload())),
                        Err(e) => {
                            tracing::warn!(error = %e, "lost the wake-ups of other cores; polling until they are back");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other cores' commands; polling meanwhile");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What a running core without an agents token announces (a fingerprint is 16 hex digits).
const NO_TOKEN: &str = "none";

/// What a core announces of its agents token: enough to tell two tokens apart, nothing to
/// find the token from.
fn token_fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("cloud48 agents token\n{token}").as_bytes());
    hex::encode(&digest[..8])
}

/// Whether `notice` is owed (a read: the monitor's holder asks at every renewal).
pub async fn owed<C: ConnectionTrait>(conn: &C, notice: &str) -> Result<bool, DbErr> {
    let backend = conn.get_database_backend();
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            "SELECT 1 AS owed FROM owed_notices WHERE name = $1",
            [notice.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// Takes `notice` if any core owes it (true): in the transaction that sends it, so that one
/// core sends it, once.
pub async fn take_owed<C: ConnectionTrait>(conn: &C, notice: &str) -> Result<bool, DbErr> {
    let backend = conn.get_database_backend();
    let taken = conn
        .execute_raw(Statement::from_sql_and_values(
            backend,
            "DELETE FROM owed_notices WHERE name = $1",
            [notice.into()],
        ))
        .await?;
    Ok(taken.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::best_reading;

    #[test]
    fn a_token_fingerprint_tells_tokens_apart_and_is_not_the_token() {
        let a = super::token_fingerprint("a-token-of-sixteen-chars");
        assert_eq!(a.len(), 16);
        assert_eq!(a, super::token_fingerprint("a-token-of-sixteen-chars"));
        assert_ne!(a, super::token_fingerprint("a-token-of-sixteen-charz"));
        assert!(!a.contains("token"));
    }

    #[test]
    fn the_reading_with_the_shortest_round_trip_wins() {
        let first = best_reading(None, 40, 900);
        assert_eq!(first, (40, 900));
        // A slow reading (its offset off by up to half its round trip) does not replace it.
        assert_eq!(best_reading(Some(first), 800, 1_300), (40, 900));
        assert_eq!(best_reading(Some(first), 2, 1_010), (2, 1_010));
    }
}
