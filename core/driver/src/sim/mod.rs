//! `sim`: simulated servers inside the core process, for tests, demos and benchmarks at scale.
//!
//! A simulated server has a capacity, assigns IPs, waits a configurable latency per operation,
//! can crash and recover, can be told to fail the next operations, and records what was done to
//! each guest (including exec'd scripts). With a state file it keeps its guests across restarts
//! of the core, as a real server would.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Capabilities, Driver, DriverError, ExecOutput, GuestImage, GuestInfo, GuestSpec, GuestState,
    ServerStats,
};
use cloud48_model::Resources;

use crate::address::Subnet;

mod driver;
mod journal;

use journal::{Entry, SimState, compact, journal_of, load};

/// Latency of simulated operations.
#[derive(Debug, Clone, Default)]
pub struct SimLatency {
    /// Latency of every operation without its own entry.
    pub default: Duration,
    /// Latency per operation name (`create`, `start`, ...).
    pub per_operation: HashMap<String, Duration>,
}

impl SimLatency {
    /// The same latency for every operation.
    pub fn uniform(latency: Duration) -> Self {
        SimLatency {
            default: latency,
            per_operation: HashMap::new(),
        }
    }

    fn of(&self, operation: &str) -> Duration {
        self.per_operation
            .get(operation)
            .copied()
            .unwrap_or(self.default)
    }
}

/// A script run inside a simulated guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// The script.
    pub script: String,
    /// Its arguments.
    pub args: Vec<String>,
}

/// A simulated guest with the history of what was done to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimGuest {
    /// Current state and reservation.
    pub info: GuestInfo,
    /// Type id it was created with.
    pub type_id: String,
    /// The workload it was created with (a simulated server runs nothing); not written to the
    /// journal when empty.
    #[serde(default, skip_serializing_if = "cloud48_model::Workload::is_default")]
    pub workload: cloud48_model::Workload,
    /// Opaque disk content (travels with export/import).
    pub disk: Vec<u8>,
    /// Operations that changed the guest, in order (`create`, `start`, ...).
    pub operations: Vec<String>,
    /// Scripts exec'd inside it, in order.
    pub execs: Vec<ExecRecord>,
}

struct Fault {
    operation: String,
    remaining: u32,
    error: DriverError,
}

/// The prefix of a simulated server's own pool of addresses (without a given subnet).
const POOL_PREFIX: u8 = 22;
/// How many guests a simulated server without a given subnet can address: the hosts of its
/// /22 but the gateway (.1) (`Subnet::host_count` of a /22).
pub const POOL_HOSTS: u64 = (1 << (32 - POOL_PREFIX)) - 3;

/// One simulated server.
pub struct SimServer {
    name: String,
    index: u32,
    capacity: Resources,
    latency: SimLatency,
    state_file: Option<PathBuf>,
    state: Mutex<SimState>,
    /// Lines in the journal since the state file was last written whole.
    journal_lines: Mutex<usize>,
    crashed: Mutex<bool>,
    faults: Mutex<Vec<Fault>>,
    busy: Mutex<HashMap<String, u32>>,
    overlaps: std::sync::atomic::AtomicU64,
    /// The guests' addresses (default: the /22 of `index`).
    pool: Option<Subnet>,
}

/// Marks a guest busy for the duration of one operation.
struct Busy<'a> {
    server: &'a SimServer,
    guest: Option<String>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(g) = &self.guest {
            let mut busy = self.server.busy.lock().unwrap();
            if let Some(n) = busy.get_mut(g) {
                *n -= 1;
                if *n == 0 {
                    busy.remove(g);
                }
            }
        }
    }
}

impl SimServer {
    /// A simulated server; `index` (e.g. the server id) picks its IP range `10.x.y.0/22`.
    pub fn new(name: &str, index: u32, capacity: Resources, latency: SimLatency) -> Self {
        SimServer {
            name: name.to_string(),
            index,
            capacity,
            latency,
            state_file: None,
            state: Mutex::new(SimState::default()),
            journal_lines: Mutex::new(0),
            crashed: Mutex::new(false),
            faults: Mutex::new(Vec::new()),
            busy: Mutex::new(HashMap::new()),
            overlaps: std::sync::atomic::AtomicU64::new(0),
            pool: None,
        }
    }

    /// Hands out its guests' addresses from `subnet` (`.1` is the gateway's) instead of the
    /// /22 its index picks: an agent's `--subnet`.
    pub fn with_subnet(mut self, subnet: Subnet) -> Self {
        self.pool = Some(subnet);
        self
    }

    /// Keeps the guests in `path` (JSON) and the journal of their changes beside it, loading
    /// what is there; a corrupt file is an error, except a last journal line cut short by a
    /// crash, which is dropped (its operation had not returned).
    pub fn with_state_file(mut self, path: PathBuf) -> Result<Self, DriverError> {
        let (state, mut lines, cut_short) = load(&path)?;
        if cut_short {
            // Start the journal afresh, so the next line does not follow the cut one.
            compact(&path, &state).map_err(|e| {
                DriverError::Permanent(format!("cannot write {}: {e}", path.display()))
            })?;
            lines = 0;
        }
        *self.state.lock().unwrap() = state;
        *self.journal_lines.lock().unwrap() = lines;
        self.state_file = Some(path);
        Ok(self)
    }

    /// The guests kept in `path` and its journal, read without changing either (for tools and
    /// tests looking at a server another process runs).
    pub fn guests_in(path: &std::path::Path) -> Result<Vec<SimGuest>, DriverError> {
        Ok(load(path)?.0.guests.into_values().collect())
    }

    /// Server name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Simulates a crash: every operation fails as unreachable until `recover`. False when it
    /// was crashed already.
    pub fn crash(&self) -> bool {
        !std::mem::replace(&mut *self.crashed.lock().unwrap(), true)
    }

    /// Ends a simulated crash; the guests are as they were. False when it was not crashed.
    pub fn recover(&self) -> bool {
        std::mem::replace(&mut *self.crashed.lock().unwrap(), false)
    }

    /// The load figures a heartbeat of this server carries, or `None` while crashed (a
    /// crashed server sends nothing). No simulated latency: heartbeats are pushed by the
    /// server, not answers to an operation.
    pub fn heartbeat(&self) -> Option<ServerStats> {
        if self.is_crashed() {
            return None;
        }
        let state = self.state.lock().unwrap();
        Some(ServerStats {
            capacity: self.capacity,
            allocated: Self::allocated(&state),
            guests: state.guests.len() as u64,
            used: None,
            images: Vec::new(),
        })
    }

    /// True while crashed.
    pub fn is_crashed(&self) -> bool {
        *self.crashed.lock().unwrap()
    }

    /// Makes the next `times` calls of `operation` fail with `error`.
    pub fn fail_next(&self, operation: &str, times: u32, error: DriverError) {
        self.faults.lock().unwrap().push(Fault {
            operation: operation.to_string(),
            remaining: times,
            error,
        });
    }

    /// A copy of one guest with its history.
    pub fn guest(&self, guest_id: &str) -> Option<SimGuest> {
        self.state.lock().unwrap().guests.get(guest_id).cloned()
    }

    /// Copies of every guest with their history.
    pub fn guests(&self) -> Vec<SimGuest> {
        self.state
            .lock()
            .unwrap()
            .guests
            .values()
            .cloned()
            .collect()
    }

    /// Times two operations ran on the same guest at once (the core's locks should make this 0).
    pub fn overlapping_operations(&self) -> u64 {
        self.overlaps.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn enter(&self, operation: &str, guest: Option<&str>) -> Result<Busy<'_>, DriverError> {
        let busy = Busy {
            server: self,
            guest: guest.map(str::to_string),
        };
        if let Some(g) = guest {
            let mut map = self.busy.lock().unwrap();
            let n = map.entry(g.to_string()).or_insert(0);
            *n += 1;
            if *n > 1 {
                self.overlaps
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let latency = self.latency.of(operation);
        if latency.is_zero() {
            // Thousands of instant operations in a row must not starve the rest of the process
            // (API reads, heartbeats): every operation gives the runtime a turn.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(latency).await;
        }
        if self.is_crashed() {
            return Err(DriverError::Unreachable {
                server: self.name.clone(),
                message: "simulated crash".into(),
            });
        }
        let mut faults = self.faults.lock().unwrap();
        if let Some(pos) = faults
            .iter()
            .position(|f| f.operation == operation && f.remaining > 0)
        {
            faults[pos].remaining -= 1;
            let error = faults[pos].error.clone();
            if faults[pos].remaining == 0 {
                faults.remove(pos);
            }
            return Err(error);
        }
        Ok(busy)
    }

    /// Persists the change of one guest: a line appended to the journal beside the state file
    /// (the guest as it is now, or its removal), not a rewrite of every guest. When the journal
    /// holds more lines than twice the guests (and at least 1,000), the state file is rewritten
    /// whole and the journal emptied.
    fn save(&self, state: &mut SimState, guest_id: &str) -> Result<(), DriverError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let failed = |e: std::io::Error| {
            DriverError::Transient(format!("cannot save {}: {e}", path.display()))
        };
        state.seq += 1;
        let mut lines = self.journal_lines.lock().unwrap();
        if *lines >= (2 * state.guests.len()).max(1000) {
            compact(path, state).map_err(failed)?;
            *lines = 0;
            return Ok(());
        }
        let entry = match state.guests.get(guest_id) {
            Some(g) => Entry::Put {
                seq: state.seq,
                guest: Box::new(g.clone()),
                next_ip: state.next_ip,
            },
            None => Entry::Remove {
                seq: state.seq,
                guest_id: guest_id.to_string(),
            },
        };
        let mut line = serde_json::to_vec(&entry).expect("a journal entry serializes");
        line.push(b'\n');
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(journal_of(path))
            .and_then(|mut f| f.write_all(&line))
            .map_err(failed)?;
        *lines += 1;
        Ok(())
    }

    fn allocated(state: &SimState) -> Resources {
        state
            .guests
            .values()
            .fold(Resources::default(), |sum, g| sum.plus(&g.info.resources))
    }

    fn check_capacity(&self, state: &SimState, extra: &Resources) -> Result<(), DriverError> {
        let wanted = Self::allocated(state).plus(extra);
        for (figure, want, have) in [
            ("cpu_millis", wanted.cpu_millis, self.capacity.cpu_millis),
            ("memory_mb", wanted.memory_mb, self.capacity.memory_mb),
            ("disk_mb", wanted.disk_mb, self.capacity.disk_mb),
        ] {
            if want > have {
                return Err(DriverError::Capacity {
                    server: self.name.clone(),
                    message: format!("{figure} would be {want}, capacity is {have}"),
                });
            }
        }
        Ok(())
    }

    /// This server's pool of addresses: a /22 of 10.0.0.0/8 by its index ([`POOL_HOSTS`]
    /// guests) unless given a subnet.
    fn pool(&self) -> Subnet {
        self.pool.unwrap_or(Subnet {
            network: std::net::Ipv4Addr::from((10u32 << 24) | ((self.index & 0x3fff) << 10)),
            prefix: POOL_PREFIX,
        })
    }

    /// The address asked for, when it is a host of this server's pool that none of its
    /// guests holds (a guest moved here from another network gets one of this one, as on a
    /// real server).
    fn asked_ip<'a>(&self, state: &SimState, asked: Option<&'a str>) -> Option<&'a str> {
        let ip: std::net::Ipv4Addr = asked?.parse().ok()?;
        let held = state.guests.values().any(|g| g.info.ip.as_deref() == asked);
        (self.pool().contains(ip) && !held).then_some(asked?)
    }

    /// The next free address of this server's /22 (10.0.0.0/8 holds 16,384 of them, one per
    /// server index; .1 is the gateway's), after the last one handed out; an address one of its
    /// guests holds is skipped, and a pool whose 1,021 addresses are all held is an error,
    /// never a wrap.
    fn next_ip(&self, state: &mut SimState) -> Result<String, DriverError> {
        let pool = self.pool();
        // Every address but the network's, the gateway's (.1) and the broadcast.
        let hosts = pool.host_count() as u32;
        let net = u32::from(pool.network);
        let used: std::collections::HashSet<&str> = state
            .guests
            .values()
            .filter_map(|g| g.info.ip.as_deref())
            .collect();
        for _ in 0..hosts {
            state.next_ip = state.next_ip.wrapping_add(1);
            let host = (state.next_ip.wrapping_sub(1)) % hosts + 2;
            let ip = std::net::Ipv4Addr::from(net | host).to_string();
            if !used.contains(ip.as_str()) {
                return Ok(ip);
            }
        }
        Err(DriverError::Capacity {
            server: self.name.clone(),
            message: format!("no free address left in {pool}: its guests hold all {hosts}"),
        })
    }

    fn insert(
        &self,
        spec: &GuestSpec,
        disk: Vec<u8>,
        operation: &str,
    ) -> Result<GuestInfo, DriverError> {
        let mut state = self.state.lock().unwrap();
        if let Some(existing) = state.guests.get(&spec.guest_id) {
            return Ok(existing.info.clone());
        }
        self.check_capacity(&state, &spec.resources)?;
        let info = GuestInfo {
            guest_id: spec.guest_id.clone(),
            state: GuestState::Stopped,
            ip: Some(match self.asked_ip(&state, spec.ip.as_deref()) {
                Some(ip) => ip.to_string(),
                None => self.next_ip(&mut state)?,
            }),
            resources: spec.resources,
        };
        state.guests.insert(
            spec.guest_id.clone(),
            SimGuest {
                info: info.clone(),
                type_id: spec.type_id.clone(),
                workload: spec.workload.clone(),
                disk,
                operations: vec![operation.to_string()],
                execs: Vec::new(),
            },
        );
        self.save(&mut state, &spec.guest_id)?;
        Ok(info)
    }

    /// Moves a guest from one of `from` states to `to`; a guest already in `to` is left alone.
    fn transition(
        &self,
        guest_id: &str,
        operation: &str,
        from: &[GuestState],
        to: GuestState,
    ) -> Result<(), DriverError> {
        let mut state = self.state.lock().unwrap();
        let guest = state
            .guests
            .get_mut(guest_id)
            .ok_or_else(|| DriverError::NotFound(guest_id.to_string()))?;
        if guest.info.state == to && operation != "reboot" {
            return Ok(());
        }
        if !from.contains(&guest.info.state) {
            return Err(DriverError::InvalidState {
                guest: guest_id.to_string(),
                state: guest.info.state,
                operation: operation.to_string(),
            });
        }
        guest.info.state = to;
        guest.operations.push(operation.to_string());
        self.save(&mut state, guest_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Driver, GuestSpec};

    fn spec(n: u32) -> GuestSpec {
        GuestSpec {
            avoid: Vec::new(),
            guest_id: format!("g{n}"),
            type_id: "plain".into(),
            resources: Resources {
                cpu_millis: 1,
                memory_mb: 1,
                disk_mb: 1,
            },
            ip: None,
            workload: Default::default(),
        }
    }

    /// Regression (hardening): a simulated server's /22 wrapped after 1,022 guests and handed
    /// out addresses its guests still held.
    #[tokio::test]
    async fn addresses_never_repeat_and_an_exhausted_pool_says_so() {
        let capacity = Resources {
            cpu_millis: 1_000_000,
            memory_mb: 1_000_000,
            disk_mb: 1_000_000,
        };
        let sim = SimServer::new("sim-1", 1, capacity, SimLatency::default());
        let mut seen = std::collections::HashSet::new();
        for n in 0..1021 {
            let ip = sim.create(&spec(n)).await.unwrap().ip.unwrap();
            assert!(ip.starts_with("10.0.") && ip != "10.0.4.1", "{ip}");
            assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
        assert!(seen.contains("10.0.4.2") && seen.contains("10.0.7.254"));
        let e = sim.create(&spec(5000)).await.unwrap_err().to_string();
        assert!(
            e.contains("no free address left in 10.0.4.0/22: its guests hold all 1021"),
            "{e}"
        );
        // A freed address is handed out again, and only that one.
        let freed = sim.guest("g7").unwrap().info.ip.unwrap();
        sim.destroy("g7").await.unwrap();
        let again = sim.create(&spec(5001)).await.unwrap().ip.unwrap();
        assert_eq!(again, freed);
    }

    /// A slow server is slow to act, not to report its load: `stats` (what an agent's
    /// heartbeats carry) takes none of the simulated latency; a crashed one answers nothing.
    #[tokio::test(start_paused = true)]
    async fn stats_take_no_simulated_latency() {
        let capacity = Resources {
            cpu_millis: 1000,
            memory_mb: 1000,
            disk_mb: 1000,
        };
        let latency = SimLatency::uniform(std::time::Duration::from_secs(10));
        let sim = SimServer::new("sim-1", 1, capacity, latency);
        let start = tokio::time::Instant::now();
        sim.create(&spec(1)).await.unwrap();
        let acted = start.elapsed();
        assert!(acted >= std::time::Duration::from_secs(10), "{acted:?}");
        let stats = sim.stats().await.unwrap();
        assert_eq!((stats.guests, stats.allocated.cpu_millis), (1, 1));
        assert_eq!(start.elapsed(), acted, "no latency to report the load");
        sim.crash();
        assert!(sim.stats().await.is_err());
    }

    /// A guest moved here keeps its address only where this server could have given it: in
    /// its pool and held by no other guest (as a linux server does); else it gets a new one.
    #[tokio::test]
    async fn an_address_of_another_network_or_held_here_is_replaced() {
        let capacity = Resources {
            cpu_millis: 1000,
            memory_mb: 1000,
            disk_mb: 1000,
        };
        let sim = SimServer::new("sim-1", 1, capacity, SimLatency::default())
            .with_subnet("10.48.7.0/24".parse().unwrap());
        let asking = |n: u32, ip: &str| GuestSpec {
            ip: Some(ip.into()),
            ..spec(n)
        };
        let elsewhere = sim
            .create(&asking(1, "10.48.9.5"))
            .await
            .unwrap()
            .ip
            .unwrap();
        assert!(elsewhere.starts_with("10.48.7."), "{elsewhere}");
        let kept = sim
            .create(&asking(2, "10.48.7.77"))
            .await
            .unwrap()
            .ip
            .unwrap();
        assert_eq!(kept, "10.48.7.77");
        let held = sim
            .create(&asking(3, "10.48.7.77"))
            .await
            .unwrap()
            .ip
            .unwrap();
        assert!(
            held != "10.48.7.77" && held.starts_with("10.48.7."),
            "{held}"
        );
        for reserved in ["10.48.7.0", "10.48.7.1", "10.48.7.255"] {
            let ip = sim.create(&asking(4, reserved)).await.unwrap().ip.unwrap();
            assert_ne!(ip, reserved);
            sim.destroy("g4").await.unwrap();
        }
    }

    /// A simulated server behind an agent takes its addresses from the agent's `--subnet`.
    #[tokio::test]
    async fn a_given_subnet_is_the_pool() {
        let capacity = Resources {
            cpu_millis: 1_000_000,
            memory_mb: 1_000_000,
            disk_mb: 1_000_000,
        };
        let sim = SimServer::new("sim-1", 1, capacity, SimLatency::default())
            .with_subnet("10.48.7.0/24".parse().unwrap());
        let mut seen = std::collections::HashSet::new();
        for n in 0..253 {
            let ip = sim.create(&spec(n)).await.unwrap().ip.unwrap();
            assert!(
                ip.starts_with("10.48.7.") && ip != "10.48.7.1" && ip != "10.48.7.255",
                "{ip}"
            );
            assert!(seen.insert(ip));
        }
        let e = sim.create(&spec(999)).await.unwrap_err().to_string();
        assert!(
            e.contains("no free address left in 10.48.7.0/24: its guests hold all 253"),
            "{e}"
        );
    }

    /// Regression (hardening): every operation rewrote the whole state file (600 KB at 2,500
    /// guests). Operations append one journal line; a restart replays it; a line cut short by
    /// a crash is dropped, a corrupt one elsewhere is an error.
    #[tokio::test]
    async fn state_is_kept_in_a_journal_that_a_restart_replays() {
        let dir = std::env::temp_dir().join(format!("cloud48-sim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sim-1.json");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(journal_of(&path));
        let capacity = Resources {
            cpu_millis: 1000,
            memory_mb: 1000,
            disk_mb: 1000,
        };
        let open = || {
            SimServer::new("sim-1", 1, capacity, SimLatency::default())
                .with_state_file(path.clone())
                .unwrap()
        };
        let sim = open();
        for n in 0..3 {
            sim.create(&spec(n)).await.unwrap();
        }
        sim.start("g1").await.unwrap();
        sim.destroy("g2").await.unwrap();
        assert!(!path.exists(), "no whole-file rewrite per operation");
        let journal = std::fs::read_to_string(journal_of(&path)).unwrap();
        assert_eq!(journal.lines().count(), 5);

        let again = open();
        let states: Vec<(String, GuestState)> = again
            .guests()
            .into_iter()
            .map(|g| (g.info.guest_id, g.info.state))
            .collect();
        assert_eq!(
            states,
            [
                ("g0".into(), GuestState::Stopped),
                ("g1".into(), GuestState::Running)
            ]
        );
        assert_eq!(
            again.create(&spec(9)).await.unwrap().ip.unwrap(),
            "10.0.4.5"
        );

        // A crash cut the last line short: it is dropped and the journal starts afresh.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(journal_of(&path))
            .unwrap();
        f.write_all(b"{\"put\": {\"guest\"").unwrap();
        let third = open();
        assert_eq!(third.guests().len(), 3);
        assert!(path.exists() && std::fs::read(journal_of(&path)).unwrap().is_empty());
        third.destroy("g9").await.unwrap();
        assert_eq!(open().guests().len(), 2);

        // Past 1,000 lines the state file is written whole and the journal emptied; a crash
        // between the two replays nothing twice.
        let busy = open();
        for _ in 0..600 {
            busy.start("g0").await.unwrap();
            busy.stop("g0").await.unwrap();
        }
        assert!(
            std::fs::read_to_string(journal_of(&path))
                .unwrap()
                .lines()
                .count()
                < 1000
        );
        let before = std::fs::read_to_string(journal_of(&path)).unwrap();
        busy.destroy("g1").await.unwrap();
        let snapshot_only = open();
        assert_eq!(snapshot_only.guest("g0").unwrap().operations.len(), 1201);
        assert!(snapshot_only.guest("g1").is_none());
        // As if the journal had not been emptied after a compaction: old lines are skipped.
        let mut stale = std::fs::read_to_string(journal_of(&path)).unwrap();
        stale.insert_str(0, &before);
        std::fs::write(journal_of(&path), stale).unwrap();
        assert!(open().guest("g1").is_none());

        std::fs::write(journal_of(&path), "nonsense\n{}\n").unwrap();
        let e = SimServer::new("sim-1", 1, capacity, SimLatency::default())
            .with_state_file(path.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("corrupt sim journal") && e.contains("line 1"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
