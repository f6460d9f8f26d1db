//! The core's side of node agents: registering servers run by agents (by their heartbeats or
//! by `server add URL`), receiving their heartbeats, and removing servers gone for good
//! (`remove`).
//!
//! Invariant: a server keeps its id and name until it is removed; an agent that comes back
//! under the same name at another address updates the address; another agent (another data
//! directory, so none of the server's guests) under the name is refused unless it says it
//! takes the server over.

use std::sync::Arc;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection,
    EntityTrait, QueryFilter, Set, SqlErr, TransactionTrait,
};

use crate::agent::protocol::{AgentInfo, Heartbeat};
use crate::core::CoreError;
use crate::driver::ServerStats;
use crate::driver::remote::RemoteDriver;
use crate::entities::server;
use crate::fleet::{Fleet, RemoteFactory};
use crate::health::Health;
use crate::placement::PlacementCache;

mod remove;
pub use remove::RemovedServer;

/// What one registration did.
enum Registration {
    /// The server is as the agent says: nothing written.
    Unchanged(server::Model),
    /// The server's row as written; `refresh`: new, or its network changed; `new`: the row
    /// was inserted.
    Written {
        row: server::Model,
        refresh: bool,
        new: bool,
    },
    /// Another agent takes over server `id`, which is up: it is to be marked down first (the
    /// guests of the agent at `from` went with it), then the agent written.
    TakeOver { id: i64, from: String },
    /// Another core wrote the server meanwhile (inserted it first, gave it to another agent,
    /// removed it): read it again.
    Lost,
    /// A write is due, which takes the registration lock.
    NeedsLock,
}

/// Registrations of one agent that another core's writes may make read the server again.
const REGISTER_TRIES: usize = 3;

/// The key of the PostgreSQL advisory lock registrations that write take (one at a time in the
/// cluster).
const REGISTER_LOCK: i64 = 0x0c10_0d48_4e67;

/// Takes the cluster's registration lock in `txn` (PostgreSQL), held until it ends: waited for
/// at most 2 s, then busy (a stalled holder must not stall every agent's registration).
async fn lock_registrations(
    txn: &sea_orm::DatabaseTransaction,
    again: &str,
) -> Result<(), CoreError> {
    crate::cluster::xact_lock(
        txn,
        REGISTER_LOCK,
        std::time::Duration::from_secs(2),
        |waited| {
            format!("another core has been registering or removing a server for {waited}; {again}")
        },
    )
    .await
}

/// Checks a server name an agent gives.
fn valid_name(name: &str) -> Result<(), CoreError> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(CoreError::invalid(
            "agent.name",
            format!("server name '{name}' must be 1-63 characters of a-z, A-Z, 0-9, '-', '.', '_'"),
        ));
    }
    Ok(())
}

fn valid_url(url: &str) -> Result<(), CoreError> {
    if url.contains(char::is_whitespace) {
        return Err(CoreError::invalid(
            "agent.url",
            format!("agent address '{url}' has blanks in it: give it as in http://10.0.0.7:7048"),
        ));
    }
    if url.len() > 500 {
        return Err(CoreError::invalid(
            "agent.url",
            "agent address is longer than 500 characters: give the scheme, host and port only, as in http://10.0.0.7:7048",
        ));
    }
    crate::model::base_url(url)
        .map(|_| ())
        .map_err(|e| CoreError::invalid("agent.url", format!("agent address {e}")))
}

/// The agents' registry, with what it uses: the database of servers, the fleet their drivers
/// join, placement's view of the servers, the heartbeats, this platform, the agents' token and
/// the grace period after which an agent's name is free again.
#[derive(Clone)]
pub struct Agents {
    db: DatabaseConnection,
    fleet: Arc<Fleet>,
    placement: Arc<PlacementCache>,
    health: Arc<Health>,
    platform: i64,
    token: Option<String>,
    grace: std::time::Duration,
    /// The agent id each server registered here was last accepted with.
    accepted: Arc<std::sync::Mutex<std::collections::HashMap<i64, Option<String>>>>,
    /// Written by the registration that writes and by the removal (one at a time on this
    /// core); read by registrations that write nothing, which go on together but not while a
    /// removal could delete the server they read.
    registering: Arc<tokio::sync::RwLock<()>>,
    /// Marks a server taken over while up down (its containers are then judged by what the new
    /// agent holds, as after an outage).
    monitor: Option<crate::health::Monitor>,
}

impl Agents {
    /// A registry over these parts.
    pub fn new(
        db: DatabaseConnection,
        fleet: Arc<Fleet>,
        placement: Arc<PlacementCache>,
        health: Arc<Health>,
        platform: i64,
        token: Option<String>,
        grace: std::time::Duration,
    ) -> Self {
        Agents {
            db,
            fleet,
            placement,
            health,
            platform,
            token,
            grace,
            accepted: Default::default(),
            registering: Default::default(),
            monitor: None,
        }
    }

    /// These agents with the monitor that marks a server down when another agent takes it
    /// over while it is up.
    pub fn watched_by(self, monitor: crate::health::Monitor) -> Self {
        Agents {
            monitor: Some(monitor),
            ..self
        }
    }

    /// Forgets which agent a server of `rows` was accepted with here where its row now names
    /// another (another core accepted one with `--take-over`): that server's next heartbeat is
    /// checked against the database, every other agent's stays on the fast path.
    pub fn forget_changed(&self, rows: &[server::Model]) {
        let now: std::collections::HashMap<i64, &Option<String>> =
            rows.iter().map(|r| (r.id, &r.agent_id)).collect();
        self.accepted
            .lock()
            .unwrap()
            .retain(|id, agent| now.get(id).is_some_and(|a| *a == agent));
    }

    /// The token agents must present; an error when none is configured.
    pub fn token(&self) -> Result<&str, CoreError> {
        self.token
            .as_deref()
            .ok_or_else(|| CoreError::Conflict("this core has no agents.token; set it (CLOUD48_AGENT_TOKEN or agents.token in the config file) to the token the agents use".into()))
    }

    /// Attaches the driver of the agent's server `row` to this core's fleet.
    fn attach_agent(&self, row: &server::Model) -> Result<Arc<RemoteDriver>, CoreError> {
        self.fleet.attach(row)?;
        Ok(self
            .fleet
            .remote(row.id)
            .expect("the remote factory attached it"))
    }

    /// Registers the server an agent runs, or updates its address and capabilities.
    pub async fn register(&self, info: &AgentInfo, stats: &ServerStats) -> Result<i64, CoreError> {
        self.token()?;
        // Every heartbeat comes here: an agent already known at its address costs no database read.
        if let Some((id, remote)) = self.fleet.remote_named(&info.name)
            && remote.url() == info.url
            && self.fleet.network(id) == Some((info.subnet.clone(), info.addresses.clone()))
            && self.accepted.lock().unwrap().get(&id) == Some(&info.id)
        {
            remote.set_capabilities(info.capabilities);
            return Ok(id);
        }
        valid_name(&info.name)?;
        valid_url(&info.url)?;
        stats.capacity.within_bounds().map_err(|m| {
            CoreError::invalid("capacity", format!("agent {}: capacity {m}", info.name))
        })?;
        // An agent known to the database as it is now (a core that restarted, or one an agent
        // failed over to) is judged without the database's lock: nothing is written. It reads
        // the registrations' lock here, so a removal does not delete the server between its
        // read and the agent's attachment.
        let reading = self.registering.read().await;
        if let Registration::Unchanged(row) =
            self.register_once(&self.db, info, stats, false).await?
        {
            return self.registered(&row, false, info).await;
        }
        drop(reading);
        // Another core may register the same agent at the same moment (an agent's heartbeats
        // reach a second core while it fails over, or `server add` races its first beat): the
        // registration that loses reads the server again and is judged against the winner's row.
        //
        // One registration that writes at a time: its checks read the other servers (their
        // subnets) before it writes this one, so two agents with one subnet registering at once
        // would both pass. A mutex orders this core's; on PostgreSQL a transaction lock orders
        // every core's (waited for a bounded time: a stalled holder makes this one busy).
        let _one = self.registering.write().await;
        for _ in 0..REGISTER_TRIES {
            let outcome = if self.db.get_database_backend() == DatabaseBackend::Postgres {
                self.register_locked(info, stats).await?
            } else {
                self.register_once(&self.db, info, stats, true).await?
            };
            match outcome {
                Registration::Unchanged(row) => return self.registered(&row, false, info).await,
                Registration::Written { row, refresh, new } => {
                    let id = self.registered(&row, refresh, info).await?;
                    if let (true, Some(monitor)) = (new, &self.monitor) {
                        // An agent back under the name of a server removed before may hold
                        // that server's guests, taking room placement counts as free: they
                        // go now, not at the collector's next pass.
                        let monitor = monitor.clone();
                        tokio::spawn(async move { monitor.collect_new(id).await });
                    }
                    return Ok(id);
                }
                Registration::TakeOver { id, from } => {
                    // The old agent's guests went with it (another data directory, or another
                    // machine): its containers go down and their environments fail over before
                    // this agent is written, so that a failure here leaves the take-over to the
                    // agent's next heartbeat; once this agent beats, the monitor marks the
                    // server up and judges its containers by what this agent holds.
                    let monitor = self.monitor.as_ref().expect("only with a monitor");
                    let cause = format!(
                        "another agent took it over (--take-over) from the agent at {from}, \
                         whose guests went with it"
                    );
                    monitor.mark_down(id, &cause).await?;
                }
                Registration::Lost | Registration::NeedsLock => {}
            }
        }
        Err(CoreError::Busy(format!(
            "other cores kept changing server {} while this one registered it \
             ({REGISTER_TRIES} tries); the agent's next heartbeat tries again",
            info.name
        )))
    }

    /// `register_once` in a transaction holding the cluster's registration lock (PostgreSQL):
    /// database reads and writes only, committed before the agent is attached.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: the agent is attached after the commit"
    )]
    async fn register_locked(
        &self,
        info: &AgentInfo,
        stats: &ServerStats,
    ) -> Result<Registration, CoreError> {
        let txn = self.db.begin().await?;
        lock_registrations(&txn, "the agent's next heartbeat tries again").await?;
        let outcome = self.register_once(&txn, info, stats, true).await?;
        if matches!(outcome, Registration::Written { .. }) {
            txn.commit().await?;
        }
        Ok(outcome)
    }

    /// What follows a registration: the agent's driver attached, placement's view of the
    /// server read again when it is new or its network changed, the agent remembered as
    /// accepted.
    async fn registered(
        &self,
        row: &server::Model,
        refresh: bool,
        info: &AgentInfo,
    ) -> Result<i64, CoreError> {
        let remote = self.attach_agent(row)?;
        if refresh {
            self.placement.refresh(&self.db, row.id).await?;
            tracing::info!(server = %info.name, url = %info.url, subnet = ?info.subnet, driver = %info.driver, "registered a server run by an agent");
        }
        remote.set_capabilities(info.capabilities);
        self.accepted
            .lock()
            .unwrap()
            .insert(row.id, info.id.clone());
        Ok(row.id)
    }

    /// One registration from a fresh read of the server through `db`; writes only when
    /// `write` (else says it needs to).
    async fn register_once<C: ConnectionTrait>(
        &self,
        db: &C,
        info: &AgentInfo,
        stats: &ServerStats,
        write: bool,
    ) -> Result<Registration, CoreError> {
        let existing = server::Entity::find()
            .filter(server::Column::Name.eq(&info.name))
            .one(db)
            .await?;
        match existing {
            Some(row) if row.driver != RemoteFactory::KIND => Err(CoreError::Conflict(format!(
                "server {} already exists with driver '{}'; give the agent another --name",
                row.name, row.driver
            ))),
            Some(row) => {
                let id = row.id;
                let grace = self.grace.as_millis() as i64;
                let age = self.health.age(id);
                let alive = age.is_some_and(|age| age < grace);
                // The same agent at its address (first heartbeat to this core, with several
                // cores) is no conflict.
                // Nor is the same agent (its id) come back at another address.
                let same = row.address.as_deref() == Some(info.url.as_str())
                    || (row.agent_id.is_some() && row.agent_id == info.id);
                if alive && !same && self.fleet.remote(id).is_some() {
                    let at = row.address.as_deref().unwrap_or("?");
                    return Err(if info.take_over {
                        // The old agent may have just died: the take-over waits out its grace
                        // (503: the new agent's heartbeats keep trying), rather than two agents
                        // running one server's name at once.
                        CoreError::Busy(format!(
                            "server {}'s agent at {at} beat {} ms ago: a take-over waits until \
                             it has been silent for {grace} ms; this agent's heartbeats keep trying",
                            info.name,
                            age.unwrap_or_default()
                        ))
                    } else {
                        CoreError::Conflict(format!(
                            "server name {} is taken by the live agent at {at}; give this agent another --name",
                            info.name
                        ))
                    });
                }
                if let (Some(theirs), Some(mine)) = (&row.agent_id, &info.id)
                    && theirs != mine
                    && !info.take_over
                {
                    return Err(CoreError::Conflict(format!(
                        "server {} is run by another agent (agent id {theirs}, last at {}); this \
                         one ({mine}, data directory without that server's guests) would make \
                         the core fail its containers and remove their guests when that agent \
                         comes back. Start that agent again, or give this one another --name; \
                         if that server is gone for good and this agent replaces it, start this \
                         one with --take-over",
                        row.name,
                        row.address.as_deref().unwrap_or("?")
                    )));
                }
                // Where either agent's id is unknown (a server registered before agents sent
                // one, or an agent of that older release), an agent at another address could
                // be another one, without the server's guests.
                if (row.agent_id.is_none() || info.id.is_none())
                    && !info.take_over
                    && row.address.as_deref().is_some_and(|a| a != info.url)
                    && holds_containers(db, id).await?
                {
                    return Err(CoreError::Conflict(format!(
                        "server {} has containers and was last run by the agent at {}; this \
                         agent at {} may not hold their guests, and the core cannot tell (an \
                         agent of an older release sends no id: upgrade it). Start that agent \
                         again at its address, or give this one another --name; if this agent \
                         replaces that server (or is that agent, moved), start it with \
                         --take-over",
                        row.name,
                        row.address.as_deref().unwrap_or("?"),
                        info.url
                    )));
                }
                // Another agent takes the server over (by its id; where an id is unknown, by
                // its address), not the same one with the flag left on.
                let other = match (&row.agent_id, &info.id) {
                    (Some(theirs), Some(mine)) => theirs != mine,
                    _ => row.address.as_deref() != Some(info.url.as_str()),
                };
                if info.take_over && other {
                    if write && row.status == "up" && self.monitor.is_some() {
                        return Ok(Registration::TakeOver {
                            id,
                            from: row.address.clone().unwrap_or_else(|| "?".into()),
                        });
                    }
                    tracing::warn!(server = %row.name, from = ?row.agent_id, to = ?info.id, "an agent takes a server over (--take-over): the containers the old one held are judged by what this one holds");
                }
                let agent_id = info.id.clone().or(row.agent_id.clone());
                // A core that restarted hears every agent again: no write when nothing changed
                // (each write would make every other core read every server again). The address
                // slots are compared too: a row written before they were stored (m0030) gets
                // them on its agent's next registration, and reservations need them in the row.
                let slots = address_slots(info);
                let unchanged = row.agent_id == agent_id
                    && row.address.as_deref() == Some(info.url.as_str())
                    && row.subnet == info.subnet
                    && row.addresses == info.addresses
                    && row.address_slots == slots;
                if unchanged {
                    return Ok(Registration::Unchanged(row));
                }
                if !write {
                    return Ok(Registration::NeedsLock);
                }
                let network = row.subnet != info.subnet || row.addresses != info.addresses;
                if network {
                    self.check_subnet(db, info, Some(id)).await?;
                    // Its containers keep their addresses: another network for the server
                    // must still hold them (a take-over judges them by what it holds).
                    if !info.take_over {
                        check_own_addresses(db, info, id, row.subnet.as_deref()).await?;
                    }
                }
                let row = {
                    use sea_orm::sea_query::Expr;
                    // Only while no other core gave the server to another agent since it was
                    // read (a take-over there is not undone here); the agent's next heartbeat
                    // is judged again.
                    let read = match &row.agent_id {
                        Some(a) => server::Column::AgentId.eq(a.clone()),
                        None => server::Column::AgentId.is_null(),
                    };
                    let written = server::Entity::update_many()
                        .col_expr(server::Column::AgentId, Expr::value(agent_id))
                        .col_expr(server::Column::Address, Expr::value(Some(info.url.clone())))
                        .col_expr(server::Column::Subnet, Expr::value(info.subnet.clone()))
                        .col_expr(
                            server::Column::Addresses,
                            Expr::value(info.addresses.clone()),
                        )
                        .col_expr(server::Column::AddressSlots, Expr::value(slots))
                        .filter(server::Column::Id.eq(id))
                        .filter(read)
                        .exec_with_returning(db)
                        .await?;
                    let Some(row) = written.into_iter().next() else {
                        return Ok(Registration::Lost);
                    };
                    row
                };
                Ok(Registration::Written {
                    row,
                    refresh: network,
                    new: false,
                })
            }
            None if !write => Ok(Registration::NeedsLock),
            None => {
                self.check_subnet(db, info, None).await?;
                let row = server::ActiveModel {
                    platform_id: Set(self.platform),
                    name: Set(info.name.clone()),
                    driver: Set(RemoteFactory::KIND.into()),
                    address: Set(Some(info.url.clone())),
                    status: Set("up".into()),
                    cpu_millis: Set(stats.capacity.cpu_millis as i64),
                    memory_mb: Set(stats.capacity.memory_mb as i64),
                    disk_mb: Set(stats.capacity.disk_mb as i64),
                    labels: Set(serde_json::to_string(&info.labels).expect("serializes")),
                    last_heartbeat: Set(Some(crate::model::now_ms())),
                    created_at: Set(crate::model::now_ms()),
                    subnet: Set(info.subnet.clone()),
                    addresses: Set(info.addresses.clone()),
                    agent_id: Set(info.id.clone()),
                    address_slots: Set(address_slots(info)),
                    ..Default::default()
                }
                .insert(db)
                .await;
                match row {
                    Ok(row) => Ok(Registration::Written {
                        row,
                        refresh: true,
                        new: true,
                    }),
                    // Another core inserted this name first (any other unique key is an error).
                    Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(m)) if m.contains("name")) => {
                        Ok(Registration::Lost)
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Refuses an agent whose subnet or address range is not one, or that could give one of
    /// its containers an address another server may give (overlapping subnets, unless one
    /// shared network with disjoint ranges); `own` is its server's id, when it has one.
    async fn check_subnet<C: ConnectionTrait>(
        &self,
        db: &C,
        info: &AgentInfo,
        own: Option<i64>,
    ) -> Result<(), CoreError> {
        use cloud48_driver::address::{AddressRange, Subnet, address_clash};
        let Some(text) = &info.subnet else {
            return Ok(());
        };
        let mine: Subnet = text
            .parse()
            .map_err(|e: String| CoreError::invalid("agent.subnet", e))?;
        let range: Option<AddressRange> = info
            .addresses
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| CoreError::invalid("agent.addresses", e))?;
        if let Some(r) = &range {
            r.check_within(&mine)
                .map_err(|e| CoreError::invalid("agent.addresses", e))?;
        }
        let others = server::Entity::find()
            .filter(server::Column::Subnet.is_not_null())
            .all(db)
            .await?;
        for other in others.iter().filter(|o| Some(o.id) != own) {
            let Some(theirs) = other
                .subnet
                .as_deref()
                .and_then(|t| t.parse::<Subnet>().ok())
            else {
                continue;
            };
            let their_range = other
                .addresses
                .as_deref()
                .and_then(|t| t.parse::<AddressRange>().ok());
            if let Some(why) =
                address_clash((&mine, range.as_ref()), (&theirs, their_range.as_ref()))
            {
                // A server that is down may be the one this agent replaces.
                let gone = if other.status == "down" {
                    format!(
                        "; if server {} is gone for good, remove it (`cloud48 server remove \
                         {}`), or start this agent as --name {} --take-over to replace it",
                        other.name, other.name, other.name
                    )
                } else {
                    String::new()
                };
                return Err(CoreError::Conflict(format!(
                    "agent {} clashes with server {}: {why}; two containers could get one \
                     address: start the agent with a --subnet of its own, or, to share the \
                     network (qemu and linux servers), with --addresses ranges of it that no \
                     other server gives{gone}",
                    info.name, other.name
                )));
            }
        }
        Ok(())
    }

    /// A heartbeat from an agent (registers its server on first contact).
    pub async fn heartbeat(&self, beat: Heartbeat) -> Result<i64, CoreError> {
        let grace = self.grace.as_millis() as u64;
        if let Some(period) = beat.period_ms
            && period.saturating_mul(2) > grace
        {
            // Its server would be judged down between two beats, its containers replaced.
            return Err(CoreError::Conflict(format!(
                "agent {} beats every {period} ms, but this core judges a server down after \
                 {grace} ms of silence (health.grace_ms): start the agent with --heartbeat-ms \
                 {} or less (the default is 500), or give the cores a grace period of at least \
                 {} ms",
                beat.agent.name,
                grace / 2,
                period.saturating_mul(2)
            )));
        }
        let id = self.register(&beat.agent, &beat.stats).await?;
        self.placement.set_images(id, &beat.stats.images);
        self.health.heartbeat(id, Some(beat.stats));
        Ok(id)
    }

    /// Registers the agent at `url` by asking it who it is (`cloud48 server add URL`).
    pub async fn add(&self, url: &str) -> Result<i64, CoreError> {
        valid_url(url)?;
        let token = self.token()?.to_string();
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .expect("an HTTP client without TLS builds");
        let base = url.trim_end_matches('/');
        let get = |path: &'static str| {
            let req = client.get(format!("{base}{path}")).bearer_auth(&token);
            let client = client.clone();
            async move {
                let resp = req.send().await.map_err(|e| {
                    CoreError::Unreachable(format!(
                        "cannot reach an agent at {base}: {}",
                        crate::model::with_causes(&e)
                    ))
                })?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    // Agents take the bearer token; a Digest challenge is a core's answer.
                    let digest = resp
                        .headers()
                        .get(reqwest::header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("Digest"));
                    if digest || is_core(&client, base).await {
                        return Err(CoreError::invalid(
                            "url",
                            format!(
                                "{base} is a Cloud48 core, not a node agent: give the URL \
                                 the agent listens on (its --listen or --url)"
                            ),
                        ));
                    }
                    let body = resp.text().await.unwrap_or_default();
                    return Err(CoreError::Unreachable(format!(
                        "the agent at {base} refused {path} ({status}): {body}"
                    )));
                }
                resp.bytes().await.map_err(|e| {
                    CoreError::Unreachable(format!(
                        "the agent at {base} broke off: {}",
                        crate::model::with_causes(&e)
                    ))
                })
            }
        };
        let mut info: AgentInfo = serde_json::from_slice(&get("/v1/info").await?).map_err(|e| {
            CoreError::Unreachable(format!("{base} does not speak the agent protocol: {e}"))
        })?;
        let stats: ServerStats = serde_json::from_slice(&get("/v1/stats").await?).map_err(|e| {
            CoreError::Unreachable(format!("{base} does not speak the agent protocol: {e}"))
        })?;
        if info.heartbeats == Some(false) {
            return Err(CoreError::invalid(
                "url",
                format!(
                    "the agent at {base} sends no heartbeats (it was started without --core), \
                     so it would be judged down at once: start it again with --core and this \
                     core's URL (it then registers itself; `server add` is not needed)"
                ),
            ));
        }
        info.url = base.to_string();
        let id = self.register(&info, &stats).await?;
        self.health.heartbeat(id, Some(stats));
        Ok(id)
    }
}

/// Whether `base` answers as a core does (`GET /v1/health` naming its node).
async fn is_core(client: &reqwest::Client, base: &str) -> bool {
    let Ok(resp) = client.get(format!("{base}/v1/health")).send().await else {
        return false;
    };
    resp.json::<serde_json::Value>()
        .await
        .is_ok_and(|v| v.get("node").is_some())
}

/// How many guests the agent's server can give an address, as its row keeps it.
fn address_slots(info: &AgentInfo) -> Option<i64> {
    crate::placement::address_slots(info.subnet.as_deref(), info.addresses.as_deref())
        .map(|n| n.min(i64::MAX as u64) as i64)
}

/// Refuses a network for server `own` (which had subnet `had`) that leaves out addresses its
/// live containers hold: they keep them, and another server could hand them out again. Only
/// the subnet counts: a range is what the server hands out, and a container moved in live from
/// a peer of the network keeps an address of the peer's range.
async fn check_own_addresses<C: ConnectionTrait>(
    db: &C,
    info: &AgentInfo,
    own: i64,
    had: Option<&str>,
) -> Result<(), CoreError> {
    use crate::entities::container;
    use crate::model::ContainerStatus;
    use cloud48_driver::address::Subnet;
    use sea_orm::QuerySelect;
    // Checked already (`check_subnet`) where given.
    let mine = info
        .subnet
        .as_deref()
        .and_then(|s| s.parse::<Subnet>().ok());
    if mine.is_none() && had.is_none() {
        return Ok(());
    }
    let gone = [ContainerStatus::Destroyed, ContainerStatus::Failed].map(|s| s.as_str());
    let held: Vec<(i64, Option<String>)> = container::Entity::find()
        .select_only()
        .column(container::Column::Id)
        .column(container::Column::Ip)
        .filter(container::Column::ServerId.eq(own))
        .filter(container::Column::Status.is_not_in(gone))
        .filter(container::Column::Ip.is_not_null())
        .into_tuple()
        .all(db)
        .await?;
    let outside: Vec<String> = held
        .into_iter()
        .filter_map(|(id, ip)| {
            let ip: std::net::Ipv4Addr = ip?.parse().ok()?;
            let inside = mine.is_some_and(|m| m.contains(ip));
            (!inside).then(|| format!("container {id} has {ip}"))
        })
        .collect();
    if outside.is_empty() {
        return Ok(());
    }
    let now = match mine {
        Some(m) => format!("gives addresses of {m}"),
        None => "reports no --subnet".to_string(),
    };
    Err(CoreError::Conflict(format!(
        "agent {} {now}, but containers of its server hold addresses outside that ({}{}); \
         they keep them: start the agent with the --subnet it had{}, or move those containers \
         to other servers first",
        info.name,
        outside
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        if outside.len() > 5 { ", ..." } else { "" },
        had.map_or(String::new(), |h| format!(" ({h})"))
    )))
}

/// Whether server `id` has containers that are not destroyed.
async fn holds_containers<C: ConnectionTrait>(db: &C, id: i64) -> Result<bool, CoreError> {
    use crate::entities::container;
    use sea_orm::PaginatorTrait;
    let n = container::Entity::find()
        .filter(container::Column::ServerId.eq(id))
        .filter(container::Column::Status.ne(crate::model::ContainerStatus::Destroyed.as_str()))
        .count(db)
        .await?;
    Ok(n > 0)
}
