//! Placement (the ContainerFactory): where a new, cloned or migrating container goes, and the
//! ledger of what each server has reserved.
//!
//! The decision filters servers by status (up, not draining), anti-affinity (`spread`), labels
//! and free resources, then scores each fitting server by the share of its capacity left free
//! after placing the container:
//!
//! ```text
//! score = (w_cpu·free_cpu/cap_cpu + w_mem·free_mem/cap_mem + w_disk·free_disk/cap_disk)
//!         / (w_cpu + w_mem + w_disk)        where free = capacity − allocated − need
//! ```
//!
//! and takes the highest score (ties: lowest server id), which spreads load. A server that
//! already holds the container's image (its agent says so in heartbeats) gets `w_image` more,
//! so it wins unless another has that much more of its capacity free. The weights are
//! configurable (`placement.weight_cpu`, `placement.weight_memory`, `placement.weight_disk`,
//! `placement.weight_image`).
//!
//! Invariants:
//! - The decision reads an in-memory `PlacementCache`; it may be stale. The database is the
//!   truth: a reservation is a conditional `UPDATE` of the server's allocation counters that
//!   succeeds only if the container still fits, so concurrent placements (in one core or many)
//!   never over-commit a server. A failed claim refreshes that server and tries the next one.
//! - A server's counters are the sum of the requirements of its existing containers (status
//!   not destroyed or failed) plus its dummies. Every change to either changes the counters in
//!   the same transaction (`claim`, `release`, `fill`, `drop_dummy`); `reconcile` recomputes
//!   them at start-up and `audit` checks them.
//! - A dummy carries the id of the command that placed it and a deadline; the collector removes
//!   dummies whose command finished or whose deadline passed.

use std::collections::HashSet;

use sea_orm::DbErr;

mod cache;
mod ledger;
mod pending;

pub use cache::{PlacementCache, Reading, Settling, read_allocations};
pub use ledger::*;
pub use pending::Holder;

use crate::entities::server;
use crate::model::{ImageRef, Requirements, Resources};

/// Why no server fits.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// No server fits; the message names the unmet requirement.
    #[error("no server fits the container: {0}")]
    NoFit(String),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// Weights of the score's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Weight of the free CPU share.
    pub cpu: f64,
    /// Weight of the free memory share.
    pub memory: f64,
    /// Weight of the free disk share.
    pub disk: f64,
    /// Added to the score of a server that holds the container's image.
    pub image: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            cpu: 1.0,
            memory: 1.0,
            disk: 0.5,
            image: 0.25,
        }
    }
}

/// A server as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Server id.
    pub id: i64,
    /// True when up.
    pub up: bool,
    /// True while drained.
    pub draining: bool,
    /// Labels it carries.
    pub labels: Vec<String>,
    /// Total capacity.
    pub capacity: Resources,
    /// Reserved by containers and dummies.
    pub allocated: Resources,
    /// Containers and dummies on it.
    pub containers: u64,
    /// How many guests it can give an address (its subnet's or range's hosts), when known: a
    /// server whose addresses are all held takes no more, whatever room it has.
    pub slots: Option<u64>,
}

impl Candidate {
    /// Placement's view of a server row.
    pub fn from_row(s: &server::Model) -> Candidate {
        Candidate {
            id: s.id,
            up: s.status == "up",
            draining: s.draining,
            labels: serde_json::from_str(&s.labels).unwrap_or_default(),
            capacity: capacity_of(s),
            allocated: allocated_of(s),
            containers: s.alloc_containers.max(0) as u64,
            slots: slots_of(s),
        }
    }

    /// Whether `need` fits in its free capacity and it has an address left.
    fn fits(&self, need: &Resources) -> bool {
        need.fits_in(&self.free()) && self.slots.is_none_or(|n| self.containers < n)
    }

    /// Capacity not reserved.
    pub fn free(&self) -> Resources {
        self.capacity.minus(&self.allocated)
    }

    fn placeable(&self) -> bool {
        self.up && !self.draining
    }
}

/// How many guests server `s` can give an address: see [`address_slots`]; a simulated server
/// without a subnet hands out the hosts of its own /22.
fn slots_of(s: &server::Model) -> Option<u64> {
    match address_slots(s.subnet.as_deref(), s.addresses.as_deref()) {
        None if s.driver == crate::fleet::SimFactory::KIND => Some(cloud48_driver::sim::POOL_HOSTS),
        slots => slots,
    }
}

/// How many guests a server with this subnet and range can give an address: the hosts of its
/// range, else of its subnet (but the network, gateway and broadcast addresses); `None` when
/// it reports neither (or what it reports cannot be read).
pub fn address_slots(subnet: Option<&str>, addresses: Option<&str>) -> Option<u64> {
    use cloud48_driver::address::{AddressRange, Subnet};
    let range = addresses.and_then(|r| r.parse::<AddressRange>().ok());
    let subnet = subnet.and_then(|n| n.parse::<Subnet>().ok());
    match (range, subnet) {
        (Some(r), _) => Some(r.address_count()),
        (None, Some(n)) => Some(n.host_count()),
        (None, None) => None,
    }
}

/// Resources from database figures (negative ones read as zero).
fn resources(cpu_millis: i64, memory_mb: i64, disk_mb: i64) -> Resources {
    let n = |v: i64| v.max(0) as u64;
    Resources {
        cpu_millis: n(cpu_millis),
        memory_mb: n(memory_mb),
        disk_mb: n(disk_mb),
    }
}

/// Capacity of a server row.
pub fn capacity_of(s: &server::Model) -> Resources {
    resources(s.cpu_millis, s.memory_mb, s.disk_mb)
}

/// Allocation counters of a server row.
pub fn allocated_of(s: &server::Model) -> Resources {
    resources(s.alloc_cpu_millis, s.alloc_memory_mb, s.alloc_disk_mb)
}

/// Score of placing `need` on `c` (higher is better); see the module documentation.
pub fn score(c: &Candidate, need: &Resources, w: &Weights) -> f64 {
    let share = |cap: u64, used: u64, need: u64| {
        if cap == 0 {
            0.0
        } else {
            cap.saturating_sub(used + need) as f64 / cap as f64
        }
    };
    let total = w.cpu + w.memory + w.disk;
    let sum = w.cpu
        * share(
            c.capacity.cpu_millis,
            c.allocated.cpu_millis,
            need.cpu_millis,
        )
        + w.memory * share(c.capacity.memory_mb, c.allocated.memory_mb, need.memory_mb)
        + w.disk * share(c.capacity.disk_mb, c.allocated.disk_mb, need.disk_mb);
    if total > 0.0 { sum / total } else { 0.0 }
}

/// Whether a held image (`name:tag@digest`) is `image`: the same digest when it names one,
/// else the same name (a name without a tag means `latest`).
fn holds(held: &str, image: &ImageRef) -> bool {
    let (name, digest) = held.split_once('@').unwrap_or((held, ""));
    match &image.digest {
        Some(d) => d == digest,
        None => {
            let parse = |n: &str| n.parse::<cloud48_image::Name>().ok();
            parse(name).is_some_and(|held| Some(held) == parse(&image.reference))
        }
    }
}

fn has_labels(c: &Candidate, req: &Requirements) -> bool {
    req.labels.iter().all(|l| c.labels.contains(l))
}

/// Chooses a server for `req` among `servers`, never one in `avoid`. The error names the
/// requirement no server met.
pub fn decide(
    servers: &[Candidate],
    req: &Requirements,
    avoid: &HashSet<i64>,
    w: &Weights,
) -> Result<i64, String> {
    decide_preferring(servers, req, avoid, w, |_| false)
}

/// `decide`, scoring `w.image` more for the servers `holds` says hold the container's image.
pub fn decide_preferring(
    servers: &[Candidate],
    req: &Requirements,
    avoid: &HashSet<i64>,
    w: &Weights,
    holds: impl Fn(i64) -> bool,
) -> Result<i64, String> {
    let need = &req.resources;
    let mut best: Option<(f64, i64)> = None;
    for c in servers {
        if !c.placeable() || avoid.contains(&c.id) || !has_labels(c, req) || !c.fits(need) {
            continue;
        }
        let s = score(c, need, w) + if holds(c.id) { w.image } else { 0.0 };
        if best.is_none_or(|(b, id)| s > b || (s == b && c.id < id)) {
            best = Some((s, c.id));
        }
    }
    best.map(|(_, id)| id)
        .ok_or_else(|| no_fit_reason(servers, req, avoid))
}

/// Names the first requirement that eliminated every server.
fn no_fit_reason(servers: &[Candidate], req: &Requirements, avoid: &HashSet<i64>) -> String {
    let placeable: Vec<_> = servers.iter().filter(|c| c.placeable()).collect();
    if placeable.is_empty() {
        return "no server is up and accepting containers (not draining)".into();
    }
    let allowed: Vec<_> = placeable
        .into_iter()
        .filter(|c| !avoid.contains(&c.id))
        .collect();
    if allowed.is_empty() {
        return if req.spread {
            "every server that is up already runs a container of the same type in this environment (spread)".into()
        } else {
            "no other server is up".into()
        };
    }
    let labelled: Vec<_> = allowed.into_iter().filter(|c| has_labels(c, req)).collect();
    if labelled.is_empty() {
        return format!(
            "no server that is up carries the labels [{}]",
            req.labels.join(", ")
        );
    }
    let addressed: Vec<_> = labelled
        .iter()
        .filter(|c| c.slots.is_none_or(|n| c.containers < n))
        .copied()
        .collect();
    if addressed.is_empty() {
        return "every eligible server has all its addresses in use (its subnet or range is full)"
            .into();
    }
    let labelled = addressed;
    let r = &req.resources;
    for (figure, need, have) in [
        (
            "cpu_millis",
            r.cpu_millis,
            labelled.iter().map(|c| c.free().cpu_millis).max(),
        ),
        (
            "memory_mb",
            r.memory_mb,
            labelled.iter().map(|c| c.free().memory_mb).max(),
        ),
        (
            "disk_mb",
            r.disk_mb,
            labelled.iter().map(|c| c.free().disk_mb).max(),
        ),
    ] {
        let have = have.unwrap_or(0);
        if need > have {
            return format!("{figure} {need} needed, at most {have} free on any eligible server");
        }
    }
    format!(
        "no single server has {} cpu_millis, {} memory_mb and {} disk_mb free together",
        r.cpu_millis, r.memory_mb, r.disk_mb
    )
}

/// What server `c`, named for a container needing `need`, lacks to take it: that it is not
/// up, is draining, has no address left, or each figure it has too little of.
pub(crate) fn lacks(c: &Candidate, need: &Resources) -> String {
    if !c.up {
        return "it is not up".into();
    }
    if c.draining {
        return "it is draining".into();
    }
    if c.slots.is_some_and(|n| c.containers >= n) {
        return "all its addresses are in use (its subnet or range is full)".into();
    }
    let free = c.free();
    let short: Vec<String> = [
        ("cpu_millis", need.cpu_millis, free.cpu_millis),
        ("memory_mb", need.memory_mb, free.memory_mb),
        ("disk_mb", need.disk_mb, free.disk_mb),
    ]
    .into_iter()
    .filter(|(_, need, have)| need > have)
    .map(|(figure, need, have)| format!("{figure} {need} needed, {have} free"))
    .collect();
    if short.is_empty() {
        "it filled up while this was placed; try again".into()
    } else {
        short.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named server that cannot take a container says only what it lacks.
    #[test]
    fn a_named_server_says_what_it_lacks() {
        let need = Resources {
            cpu_millis: 200,
            memory_mb: 256,
            disk_mb: 2048,
        };
        let mut c = server(1, 1000, 1024, &[]);
        c.allocated.disk_mb = 100_000 - 1000;
        assert_eq!(lacks(&c, &need), "disk_mb 2048 needed, 1000 free");
        c.draining = true;
        assert_eq!(lacks(&c, &need), "it is draining");
        c.up = false;
        assert_eq!(lacks(&c, &need), "it is not up");
    }

    fn server(id: i64, free_cpu: u64, free_mem: u64, labels: &[&str]) -> Candidate {
        let capacity = Resources {
            cpu_millis: 8000,
            memory_mb: 8192,
            disk_mb: 100_000,
        };
        Candidate {
            id,
            up: true,
            draining: false,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            capacity,
            allocated: Resources {
                cpu_millis: 8000 - free_cpu,
                memory_mb: 8192 - free_mem,
                disk_mb: 0,
            },
            containers: 0,
            slots: None,
        }
    }

    fn need(cpu_millis: u64, memory_mb: u64) -> Requirements {
        Requirements {
            resources: Resources {
                cpu_millis,
                memory_mb,
                disk_mb: 10,
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_emptiest_fitting_server_wins_and_ties_go_to_the_lowest_id() {
        let servers = [
            server(1, 1000, 1024, &[]),
            server(2, 6000, 6000, &[]),
            server(3, 6000, 6000, &[]),
        ];
        let w = Weights::default();
        assert_eq!(
            decide(&servers, &need(500, 512), &HashSet::new(), &w),
            Ok(2)
        );
        assert_eq!(
            decide(&servers, &need(500, 512), &HashSet::from([2]), &w),
            Ok(3)
        );
        assert_eq!(
            decide(&servers, &need(2000, 512), &HashSet::from([2, 3]), &w).unwrap_err(),
            "cpu_millis 2000 needed, at most 1000 free on any eligible server"
        );
    }

    #[test]
    fn down_draining_and_unlabelled_servers_are_never_chosen_and_the_reason_says_why() {
        let mut down = server(1, 8000, 8192, &["ssd"]);
        down.up = false;
        let mut draining = server(2, 8000, 8192, &["ssd"]);
        draining.draining = true;
        let plain = server(3, 8000, 8192, &[]);
        let w = Weights::default();
        let mut req = need(100, 100);
        req.labels = vec!["ssd".into()];
        let e = decide(
            &[down.clone(), draining.clone(), plain.clone()],
            &req,
            &HashSet::new(),
            &w,
        )
        .unwrap_err();
        assert_eq!(e, "no server that is up carries the labels [ssd]");
        let e = decide(&[down, draining], &need(100, 100), &HashSet::new(), &w).unwrap_err();
        assert!(e.contains("no server is up"), "{e}");
        assert_eq!(
            decide(&[plain], &need(100, 100), &HashSet::new(), &w),
            Ok(3)
        );
    }

    #[test]
    fn a_server_whose_addresses_are_all_held_takes_no_more_whatever_its_room() {
        let mut full = server(1, 8000, 8192, &[]);
        full.slots = Some(3);
        full.containers = 3;
        let mut roomy = server(2, 1000, 1024, &[]);
        roomy.slots = Some(253);
        let w = Weights::default();
        let none = HashSet::new();
        assert_eq!(
            decide(&[full.clone(), roomy], &need(100, 100), &none, &w),
            Ok(2)
        );
        let e = decide(&[full.clone()], &need(100, 100), &none, &w).unwrap_err();
        assert!(e.contains("all its addresses in use"), "{e}");
        // In a batch, a server stops taking containers once its addresses run out.
        full.containers = 1;
        let cache = PlacementCache::with_servers(w, vec![full]);
        let placed = cache.decide_many(Holder::Command(1), &need(100, 100), None, 3);
        assert_eq!(placed.iter().filter(|p| p.is_ok()).count(), 2, "{placed:?}");
    }

    #[test]
    fn allocations_read_from_the_database_replace_the_counters_and_steer_placement() {
        let cache = PlacementCache::with_servers(
            Weights::default(),
            vec![server(1, 6000, 6000, &[]), server(2, 5000, 5000, &[])],
        );
        let none = HashSet::new();
        assert_eq!(cache.decide(&need(100, 100), None, &none), Ok(1));
        // Another core filled server 1; an unknown server (99) is passed over.
        cache.set_allocations(
            cache.reading(),
            &[(1, 7900, 8000, 10, 40), (99, 1, 1, 1, 1)],
        );
        let one = cache.snapshot().into_iter().find(|c| c.id == 1).unwrap();
        assert_eq!(one.free().cpu_millis, 100);
        assert_eq!(one.containers, 40);
        assert_eq!(cache.decide(&need(100, 100), None, &none), Ok(2));
        assert_eq!(cache.snapshot().len(), 2);
    }

    #[test]
    fn a_reload_keeps_what_decisions_counted_until_the_database_has_it() {
        let cache =
            PlacementCache::with_servers(Weights::default(), vec![server(1, 1000, 8192, &[])]);
        let free = || cache.snapshot()[0].free().cpu_millis;
        let group = cache.group_holder();
        let placed = cache.decide_many(group, &need(100, 100), None, 5);
        assert!(placed.iter().all(|p| *p == Ok(1)), "{placed:?}");
        // A read that began before the group's writes committed does not have them.
        let early = cache.reading();
        cache.settle(group, true);
        cache.set_allocations(early, &[(1, 7000, 0, 0, 0)]);
        assert_eq!(free(), 500);
        // A read that began after the commit has them: not counted twice.
        cache.set_allocations(cache.reading(), &[(1, 7500, 500, 50, 5)]);
        assert_eq!(free(), 500);
        // A decision not settled survives a reload, and is given back when it fails.
        let command = Holder::Command(9);
        cache.decide_many(command, &need(100, 100), None, 2);
        assert_eq!(free(), 300);
        cache.set_allocations(cache.reading(), &[(1, 7500, 500, 50, 5)]);
        assert_eq!(free(), 300);
        cache.settle(command, false);
        assert_eq!(free(), 500);
        assert_eq!(cache.snapshot()[0].containers, 5);
    }

    #[test]
    fn a_server_holding_the_image_wins_unless_another_is_much_emptier() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let tomcat = |digest: Option<&str>| ImageRef {
            reference: "cloud48/tomcat".into(),
            digest: digest.map(String::from),
        };
        // Server 2 is a little emptier; server 1 holds the image.
        let cache = PlacementCache::with_servers(
            Weights::default(),
            vec![server(1, 5000, 5000, &[]), server(2, 5600, 5600, &[])],
        );
        cache.set_images(1, &[format!("cloud48/tomcat:latest@{digest}")]);
        let none = HashSet::new();
        assert_eq!(cache.decide(&need(100, 100), None, &none), Ok(2));
        assert_eq!(
            cache.decide(&need(100, 100), Some(&tomcat(None)), &none),
            Ok(1)
        );
        assert_eq!(
            cache.decide(&need(100, 100), Some(&tomcat(Some(&digest))), &none),
            Ok(1)
        );
        // Another tag, or another digest of the same name, is another image.
        let tagged = ImageRef {
            reference: "cloud48/tomcat:9".into(),
            digest: None,
        };
        assert_eq!(cache.decide(&need(100, 100), Some(&tagged), &none), Ok(2));
        let other = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            cache.decide(&need(100, 100), Some(&tomcat(Some(&other))), &none),
            Ok(2)
        );
        // Much more room elsewhere outweighs the image.
        let roomy = PlacementCache::with_servers(
            Weights::default(),
            vec![server(1, 1000, 1000, &[]), server(2, 8000, 8192, &[])],
        );
        roomy.set_images(1, &[format!("cloud48/tomcat:latest@{digest}")]);
        assert_eq!(
            roomy.decide(&need(100, 100), Some(&tomcat(None)), &none),
            Ok(2)
        );
        // Batches prefer it too, until it is no longer the best.
        let many = cache.decide_many(Holder::Command(1), &need(100, 100), Some(&tomcat(None)), 2);
        assert_eq!(many[0], Ok(1));
        // With the weight at 0 the image counts for nothing.
        let indifferent = PlacementCache::with_servers(
            Weights {
                image: 0.0,
                ..Weights::default()
            },
            vec![server(1, 5000, 5000, &[]), server(2, 5600, 5600, &[])],
        );
        indifferent.set_images(1, &[format!("cloud48/tomcat:latest@{digest}")]);
        assert_eq!(
            indifferent.decide(&need(100, 100), Some(&tomcat(None)), &none),
            Ok(2)
        );
    }
}
