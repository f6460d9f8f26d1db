//! The fleet: the driver of every registered server, made by one factory per driver kind.
//!
//! Invariant: the fleet knows driver kinds only through their factories; a server whose kind
//! has no factory in this core is an error at start-up that names it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::core::{CoreConfig, CoreError};
use crate::driver::Driver;
use crate::driver::remote::{RemoteDriver, RemoteTimeouts};
use crate::driver::sim::{SimLatency, SimServer};
use crate::entities::server;

/// Makes the driver of a registered server from its row and attaches it to the fleet.
pub trait DriverFactory: Send + Sync + 'static {
    /// The kind it makes, as stored in `servers.driver`.
    fn kind(&self) -> &'static str;
    /// Makes the driver of server `row` and attaches it to `fleet`.
    fn attach(&self, fleet: &Fleet, row: &server::Model) -> Result<(), CoreError>;
}

/// Simulated servers: capacity from the row, latency from the configuration, state in
/// `DATA/sim/NAME.json` when the core persists it.
pub struct SimFactory {
    latency: Duration,
    state_dir: Option<PathBuf>,
}

impl SimFactory {
    /// The kind it makes.
    pub const KIND: &'static str = "sim";

    /// The factory of a core configured with `c`.
    pub fn new(c: &CoreConfig) -> Self {
        SimFactory {
            latency: c.sim_latency,
            state_dir: c.sim_persist.then(|| c.data_dir.join("sim")),
        }
    }
}

impl DriverFactory for SimFactory {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn attach(&self, fleet: &Fleet, row: &server::Model) -> Result<(), CoreError> {
        let mut sim = SimServer::new(
            &row.name,
            row.id as u32,
            crate::placement::capacity_of(row),
            SimLatency::uniform(self.latency),
        );
        if let Some(dir) = &self.state_dir {
            sim = sim
                .with_state_file(dir.join(format!("{}.json", row.name)))
                .map_err(|e| CoreError::Setup(e.to_string()))?;
        }
        fleet.add_sim(row.id, Arc::new(sim));
        Ok(())
    }
}

/// Servers run by node agents, reached at the row's address with the core's agent token.
pub struct RemoteFactory {
    token: String,
    timeouts: RemoteTimeouts,
}

impl RemoteFactory {
    /// The kind it makes.
    pub const KIND: &'static str = "remote";

    /// The factory of a core configured with `c`.
    pub fn new(c: &CoreConfig) -> Self {
        RemoteFactory {
            token: c.agent_token.clone().unwrap_or_default(),
            timeouts: c.remote,
        }
    }
}

impl DriverFactory for RemoteFactory {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn attach(&self, fleet: &Fleet, row: &server::Model) -> Result<(), CoreError> {
        let url = row.address.as_deref().unwrap_or_default();
        let remote = RemoteDriver::new(&row.name, url, &self.token, self.timeouts);
        fleet.add_remote(row.id, &row.name, Arc::new(remote));
        Ok(())
    }
}

/// A server's driver and the server's name.
type NamedDriver = (Arc<dyn Driver>, String);

/// What an agent says of its network: its subnet and the range of it it hands out.
pub type Network = (Option<String>, Option<String>);

/// Drivers of the registered servers.
pub struct Fleet {
    /// One factory per driver kind.
    factories: BTreeMap<&'static str, Arc<dyn DriverFactory>>,
    /// Driver and server name by server id.
    drivers: RwLock<HashMap<i64, NamedDriver>>,
    sims: RwLock<HashMap<i64, Arc<SimServer>>>,
    remotes: RwLock<HashMap<i64, Arc<RemoteDriver>>>,
    /// What each server's agent said of its network: its subnet and the range of it it hands
    /// out (when it shares the network with others).
    networks: RwLock<HashMap<i64, Network>>,
}

impl Fleet {
    /// A fleet with no servers yet, making drivers with `factories`.
    pub fn new(factories: Vec<Arc<dyn DriverFactory>>) -> Self {
        Fleet {
            factories: factories.into_iter().map(|f| (f.kind(), f)).collect(),
            drivers: RwLock::default(),
            sims: RwLock::default(),
            remotes: RwLock::default(),
            networks: RwLock::default(),
        }
    }

    /// Makes and attaches the driver of server `row` with the factory of its kind.
    pub fn attach(&self, row: &server::Model) -> Result<(), CoreError> {
        let factory = self.factories.get(row.driver.as_str()).ok_or_else(|| {
            let known: Vec<&str> = self.factories.keys().copied().collect();
            CoreError::Setup(format!(
                "server {} uses driver '{}', which this core does not have (it has: {})",
                row.name,
                row.driver,
                known.join(", ")
            ))
        })?;
        factory.attach(self, row)?;
        self.networks
            .write()
            .unwrap()
            .insert(row.id, (row.subnet.clone(), row.addresses.clone()));
        Ok(())
    }

    /// What server `id`'s agent said of its network when it was last attached.
    pub fn network(&self, id: i64) -> Option<Network> {
        self.networks.read().unwrap().get(&id).cloned()
    }

    /// The other servers on the network server `id` shares (same subnet, each with a range
    /// of it), or `None` when it has a network of its own.
    pub fn network_peers(&self, id: i64) -> Option<Vec<i64>> {
        let networks = self.networks.read().unwrap();
        let shared = |n: &Network| match n {
            (Some(subnet), Some(_)) => Some(subnet.clone()),
            _ => None,
        };
        let mine = networks.get(&id).and_then(shared)?;
        Some(
            networks
                .iter()
                .filter(|(other, n)| **other != id && shared(n).as_ref() == Some(&mine))
                .map(|(other, _)| *other)
                .collect(),
        )
    }

    /// The servers (with a driver) outside `id`'s network: every other one when it shares
    /// none (a guest moving live keeps its address, so it can only go to a network peer).
    pub fn outside_network(&self, id: i64) -> Vec<i64> {
        let peers = self.network_peers(id).unwrap_or_default();
        self.drivers
            .read()
            .unwrap()
            .keys()
            .filter(|s| **s != id && !peers.contains(s))
            .copied()
            .collect()
    }

    /// The driver of a server.
    pub fn driver(&self, id: i64) -> Option<Arc<dyn Driver>> {
        self.drivers
            .read()
            .unwrap()
            .get(&id)
            .map(|(d, _)| d.clone())
    }

    /// The driver of a server with the server's name (for messages).
    pub fn named_driver(&self, id: i64) -> Option<(Arc<dyn Driver>, String)> {
        self.drivers.read().unwrap().get(&id).cloned()
    }

    /// The servers whose drivers lack what `has` asks of their capabilities.
    pub fn lacking(&self, has: impl Fn(&crate::driver::Capabilities) -> bool) -> Vec<i64> {
        self.drivers
            .read()
            .unwrap()
            .iter()
            .filter(|(_, (d, _))| !has(&d.capabilities()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The simulated server behind a server id, for fault injection and inspection.
    pub fn sim(&self, id: i64) -> Option<Arc<SimServer>> {
        self.sims.read().unwrap().get(&id).cloned()
    }

    /// Every simulated server with its id.
    pub fn sims(&self) -> Vec<(i64, Arc<SimServer>)> {
        self.sims
            .read()
            .unwrap()
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect()
    }

    /// The remote driver of a server run by an agent.
    pub fn remote(&self, id: i64) -> Option<Arc<RemoteDriver>> {
        self.remotes.read().unwrap().get(&id).cloned()
    }

    /// The remote server with this name, with its id.
    pub fn remote_named(&self, name: &str) -> Option<(i64, Arc<RemoteDriver>)> {
        let drivers = self.drivers.read().unwrap();
        let remotes = self.remotes.read().unwrap();
        remotes
            .iter()
            .find(|(id, _)| drivers.get(id).is_some_and(|(_, n)| n == name))
            .map(|(id, r)| (*id, r.clone()))
    }

    /// Registers (or replaces) a server run by an agent.
    pub fn add_remote(&self, id: i64, name: &str, remote: Arc<RemoteDriver>) {
        self.drivers
            .write()
            .unwrap()
            .insert(id, (remote.clone(), name.to_string()));
        self.remotes.write().unwrap().insert(id, remote);
    }

    /// Forgets server `id` (removed): its driver and network.
    pub fn detach(&self, id: i64) {
        self.drivers.write().unwrap().remove(&id);
        self.sims.write().unwrap().remove(&id);
        self.remotes.write().unwrap().remove(&id);
        self.networks.write().unwrap().remove(&id);
    }

    /// The servers with a driver here.
    pub fn ids(&self) -> Vec<i64> {
        self.drivers.read().unwrap().keys().copied().collect()
    }

    /// Registers a simulated server.
    pub fn add_sim(&self, id: i64, sim: Arc<SimServer>) {
        self.drivers
            .write()
            .unwrap()
            .insert(id, (sim.clone(), sim.name().to_string()));
        self.sims.write().unwrap().insert(id, sim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, name: &str, driver: &str) -> server::Model {
        server::Model {
            id,
            platform_id: 1,
            name: name.into(),
            driver: driver.into(),
            address: Some("http://127.0.0.1:1".into()),
            status: "up".into(),
            cpu_millis: 4000,
            memory_mb: 4096,
            disk_mb: 10_000,
            labels: "[]".into(),
            last_heartbeat: None,
            created_at: 0,
            alloc_cpu_millis: 0,
            alloc_memory_mb: 0,
            alloc_disk_mb: 0,
            alloc_containers: 0,
            draining: false,
            subnet: None,
            addresses: None,
            agent_id: None,
            address_slots: None,
        }
    }

    #[test]
    fn each_kind_is_made_by_its_factory_and_an_unknown_kind_is_named() {
        let config = CoreConfig {
            sim_persist: false,
            ..CoreConfig::new(std::path::Path::new("/nonexistent"))
        };
        let fleet = Fleet::new(vec![
            Arc::new(SimFactory::new(&config)),
            Arc::new(RemoteFactory::new(&config)),
        ]);
        fleet.attach(&row(1, "sim-1", "sim")).unwrap();
        fleet.attach(&row(2, "node-2", "remote")).unwrap();
        assert_eq!(fleet.driver(1).unwrap().kind(), "sim");
        assert!(fleet.sim(1).is_some() && fleet.remote(2).is_some());
        assert_eq!(fleet.named_driver(2).unwrap().1, "node-2");
        let e = fleet
            .attach(&row(3, "xen-3", "xen"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server xen-3 uses driver 'xen'") && e.contains("it has: remote, sim"),
            "{e}"
        );
        assert!(fleet.driver(3).is_none());
    }

    #[test]
    fn servers_sharing_a_network_know_their_peers() {
        let config = CoreConfig::new(std::path::Path::new("/nonexistent"));
        let fleet = Fleet::new(vec![Arc::new(RemoteFactory::new(&config))]);
        let on = |id: i64, subnet: &str, range: Option<&str>| server::Model {
            subnet: Some(subnet.into()),
            addresses: range.map(String::from),
            ..row(id, &format!("q{id}"), "remote")
        };
        fleet
            .attach(&on(1, "10.9.0.0/24", Some("10.9.0.10-10.9.0.99")))
            .unwrap();
        fleet
            .attach(&on(2, "10.9.0.0/24", Some("10.9.0.100-10.9.0.199")))
            .unwrap();
        fleet
            .attach(&on(3, "10.9.1.0/24", Some("10.9.1.10-10.9.1.99")))
            .unwrap();
        fleet.attach(&on(4, "10.9.2.0/24", None)).unwrap();
        assert_eq!(fleet.network_peers(1), Some(vec![2]));
        assert_eq!(fleet.network_peers(3), Some(vec![]));
        assert_eq!(fleet.network_peers(4), None);
        // An agent that leaves the shared network (a subnet of its own now) is no peer.
        fleet.attach(&on(2, "10.9.5.0/24", None)).unwrap();
        assert_eq!(fleet.network_peers(1), Some(vec![]));
    }
}
