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
//! and takes the highest score (ties: lowest server id), which spreads load. The weights are
//! configurable (`placement.weight_cpu`, `placement.weight_memory`, `placement.weight_disk`).
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

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait,
};

use crate::entities::{container, dummy, server};
use crate::model::{ContainerId, ContainerStatus, Requirements, Resources, ServerId, now_ms};

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
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            cpu: 1.0,
            memory: 1.0,
            disk: 0.5,
        }
    }
}

/// A server as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Server id.
    pub id: ServerId,
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
        }
    }

    /// Capacity not reserved.
    pub fn free(&self) -> Resources {
        self.capacity.minus(&self.allocated)
    }

    fn placeable(&self) -> bool {
        self.up && !self.draining
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

fn has_labels(c: &Candidate, req: &Requirements) -> bool {
    req.labels.iter().all(|l| c.labels.contains(l))
}

/// Chooses a server for `req` among `servers`, never one in `avoid`. The error names the
/// requirement no server met.
pub fn decide(
    servers: &[Candidate],
    req: &Requirements,
    avoid: &HashSet<ServerId>,
    w: &Weights,
) -> Result<ServerId, String> {
    let need = &req.resources;
    let mut best: Option<(f64, ServerId)> = None;
    for c in servers {
        if !c.placeable()
            || avoid.contains(&c.id)
            || !has_labels(c, req)
            || !need.fits_in(&c.free())
        {
            continue;
        }
        let s = score(c, need, w);
        if best.is_none_or(|(b, id)| s > b || (s == b && c.id < id)) {
            best = Some((s, c.id));
        }
    }
    best.map(|(_, id)| id)
        .ok_or_else(|| no_fit_reason(servers, req, avoid))
}

/// Names the first requirement that eliminated every server.
fn no_fit_reason(servers: &[Candidate], req: &Requirements, avoid: &HashSet<ServerId>) -> String {
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

/// Placement's in-memory view of the servers: read by every decision, refreshed from the
/// database (fully at start and by the collector, per server after a failed claim).
#[derive(Default)]
pub struct PlacementCache {
    servers: RwLock<(Vec<Candidate>, HashMap<ServerId, usize>)>,
    weights: RwLock<Weights>,
    timing: AtomicBool,
    samples: std::sync::Mutex<Vec<u32>>,
}

impl PlacementCache {
    /// A cache scoring with `weights`.
    pub fn new(weights: Weights) -> Self {
        PlacementCache {
            weights: RwLock::new(weights),
            ..Default::default()
        }
    }

    /// A cache of the given servers (for tools and tests that need no database).
    pub fn with_servers(weights: Weights, servers: Vec<Candidate>) -> Self {
        let index = servers.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        let cache = PlacementCache::new(weights);
        *cache.servers.write().unwrap() = (servers, index);
        cache
    }

    /// Reloads every server.
    pub async fn refresh_all<C: ConnectionTrait>(&self, conn: &C) -> Result<(), DbErr> {
        let rows = server::Entity::find()
            .order_by_asc(server::Column::Id)
            .all(conn)
            .await?;
        let list: Vec<Candidate> = rows.iter().map(Candidate::from_row).collect();
        let index = list.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        *self.servers.write().unwrap() = (list, index);
        Ok(())
    }

    /// Reloads one server.
    pub async fn refresh<C: ConnectionTrait>(&self, conn: &C, id: ServerId) -> Result<(), DbErr> {
        let Some(row) = server::Entity::find_by_id(id).one(conn).await? else {
            return Ok(());
        };
        let fresh = Candidate::from_row(&row);
        let mut guard = self.servers.write().unwrap();
        let (list, index) = &mut *guard;
        match index.get(&id) {
            Some(&i) => list[i] = fresh,
            None => {
                index.insert(id, list.len());
                list.push(fresh);
            }
        }
        Ok(())
    }

    /// Records a reservation (`sign` 1) or a release (`sign` -1) made in this core.
    pub(crate) fn apply(&self, id: ServerId, r: &Resources, count: i64, sign: i64) {
        let mut guard = self.servers.write().unwrap();
        let (list, index) = &mut *guard;
        if let Some(&i) = index.get(&id) {
            let c = &mut list[i];
            if sign > 0 {
                c.allocated = c.allocated.plus(r);
                c.containers += count as u64;
            } else {
                c.allocated = c.allocated.minus(r);
                c.containers = c.containers.saturating_sub(count as u64);
            }
        }
    }

    /// Marks a server up or down and draining or not.
    pub fn set_status(&self, id: ServerId, up: bool, draining: bool) {
        let mut guard = self.servers.write().unwrap();
        let (list, index) = &mut *guard;
        if let Some(&i) = index.get(&id) {
            list[i].up = up;
            list[i].draining = draining;
        }
    }

    /// Chooses a server (see `decide`).
    pub fn decide(
        &self,
        req: &Requirements,
        avoid: &HashSet<ServerId>,
    ) -> Result<ServerId, String> {
        let started = self.timing.load(Ordering::Relaxed).then(Instant::now);
        let w = *self.weights.read().unwrap();
        let out = decide(&self.servers.read().unwrap().0, req, avoid, &w);
        if let Some(t) = started {
            let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
            self.samples.lock().unwrap().push(ns);
        }
        out
    }

    /// Decides servers for `count` containers with the same requirements, as `decide` would
    /// one after another, and counts each decision in the cache (like `apply`). The fitting
    /// servers go into a heap by score once; each decision takes the best, counts the container
    /// there and puts the server back with its new score, so a decision costs O(log servers)
    /// instead of a scan. The decisions that find no server carry the reason.
    pub fn decide_many(&self, req: &Requirements, count: usize) -> Vec<Result<ServerId, String>> {
        use std::cmp::{Ordering as O, Reverse};
        use std::collections::BinaryHeap;
        #[derive(PartialEq)]
        struct Best(f64, Reverse<ServerId>, usize);
        impl Eq for Best {}
        impl PartialOrd for Best {
            fn partial_cmp(&self, other: &Self) -> Option<O> {
                Some(self.cmp(other))
            }
        }
        impl Ord for Best {
            fn cmp(&self, other: &Self) -> O {
                self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
            }
        }
        let w = *self.weights.read().unwrap();
        let need = &req.resources;
        let timing = self.timing.load(Ordering::Relaxed);
        let mut guard = self.servers.write().unwrap();
        let list = &mut guard.0;
        let started = Instant::now();
        let mut heap: BinaryHeap<Best> = list
            .iter()
            .enumerate()
            .filter(|(_, c)| c.placeable() && has_labels(c, req) && need.fits_in(&c.free()))
            .map(|(i, c)| Best(score(c, need, &w), Reverse(c.id), i))
            .collect();
        let build = started.elapsed().as_nanos() as u64 / count.max(1) as u64;
        let mut out = Vec::with_capacity(count);
        let mut samples = Vec::new();
        for _ in 0..count {
            let one = Instant::now();
            let Some(Best(_, Reverse(id), at)) = heap.pop() else {
                let reason = no_fit_reason(list, req, &HashSet::new());
                out.resize(count, Err(reason));
                break;
            };
            let c = &mut list[at];
            c.allocated = c.allocated.plus(need);
            c.containers += 1;
            if need.fits_in(&c.free()) {
                heap.push(Best(score(c, need, &w), Reverse(id), at));
            }
            out.push(Ok(id));
            if timing {
                samples.push((build + one.elapsed().as_nanos() as u64).min(u32::MAX as u64) as u32);
            }
        }
        if timing {
            self.samples.lock().unwrap().extend(samples);
        }
        out
    }

    /// Starts recording the duration of every decision (for `bench place`).
    pub fn record_timings(&self, on: bool) {
        self.timing.store(on, Ordering::Relaxed);
    }

    /// Takes the recorded decision durations in nanoseconds.
    pub fn take_timings(&self) -> Vec<u32> {
        std::mem::take(&mut *self.samples.lock().unwrap())
    }

    /// A copy of the cached servers.
    pub fn snapshot(&self) -> Vec<Candidate> {
        self.servers.read().unwrap().0.clone()
    }
}

/// Reserves `r` (and `count` containers) on `server` if it still fits; with `placeable` the
/// server must also be up and not draining. True when reserved.
pub async fn claim<C: ConnectionTrait>(
    conn: &C,
    server_id: ServerId,
    r: &Resources,
    count: i64,
    placeable: bool,
) -> Result<bool, DbErr> {
    use sea_orm::sea_query::ExprTrait;
    use server::Column as S;
    let (cpu, mem, disk) = (r.cpu_millis as i64, r.memory_mb as i64, r.disk_mb as i64);
    let mut q = server::Entity::update_many()
        .col_expr(S::AllocCpuMillis, Expr::col(S::AllocCpuMillis).add(cpu))
        .col_expr(S::AllocMemoryMb, Expr::col(S::AllocMemoryMb).add(mem))
        .col_expr(S::AllocDiskMb, Expr::col(S::AllocDiskMb).add(disk))
        .col_expr(S::AllocContainers, Expr::col(S::AllocContainers).add(count))
        .filter(S::Id.eq(server_id))
        .filter(
            Expr::col(S::AllocCpuMillis)
                .add(cpu)
                .lte(Expr::col(S::CpuMillis)),
        )
        .filter(
            Expr::col(S::AllocMemoryMb)
                .add(mem)
                .lte(Expr::col(S::MemoryMb)),
        )
        .filter(
            Expr::col(S::AllocDiskMb)
                .add(disk)
                .lte(Expr::col(S::DiskMb)),
        );
    if placeable {
        q = q.filter(S::Status.eq("up")).filter(S::Draining.eq(false));
    }
    Ok(q.exec(conn).await?.rows_affected == 1)
}

/// `claim` for many servers with few statements; returns the servers whose claim held (the
/// others changed nothing).
pub async fn claim_many(
    txn: &DatabaseTransaction,
    claims: &[(ServerId, Resources, i64)],
) -> Result<HashSet<ServerId>, DbErr> {
    let mut held = HashSet::new();
    for chunk in claims.chunks(crate::queue::store::GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(server, r, count)| {
                [
                    *server,
                    r.cpu_millis as i64,
                    r.memory_mb as i64,
                    r.disk_mb as i64,
                    *count,
                ]
                .map(serde_json::Value::from)
                .to_vec()
            })
            .collect();
        let (v, params) = crate::queue::store::rows_source(txn, &["BIGINT"; 5], rows, 1);
        let text = format!(
            "UPDATE servers SET alloc_cpu_millis = alloc_cpu_millis + v.column2, alloc_memory_mb = alloc_memory_mb + v.column3, \
             alloc_disk_mb = alloc_disk_mb + v.column4, alloc_containers = alloc_containers + v.column5 \
             FROM {v} WHERE servers.id = v.column1 \
             AND servers.alloc_cpu_millis + v.column2 <= servers.cpu_millis \
             AND servers.alloc_memory_mb + v.column3 <= servers.memory_mb \
             AND servers.alloc_disk_mb + v.column4 <= servers.disk_mb \
             AND servers.status || '' = 'up' AND servers.draining = false"
        );
        // Usually every claim holds; otherwise undo the chunk and claim server by server.
        let sp = txn.begin().await?;
        if sp
            .execute_raw(crate::queue::store::sql(&sp, &text, params))
            .await?
            .rows_affected()
            == chunk.len() as u64
        {
            sp.commit().await?;
            held.extend(chunk.iter().map(|c| c.0));
            continue;
        }
        sp.rollback().await?;
        for (server, r, count) in chunk {
            if claim(txn, *server, r, *count, true).await? {
                held.insert(*server);
            }
        }
    }
    Ok(held)
}

/// Gives back `r` (and `count` containers) on `server`.
pub async fn release<C: ConnectionTrait>(
    conn: &C,
    server_id: ServerId,
    r: &Resources,
    count: i64,
) -> Result<(), DbErr> {
    use sea_orm::sea_query::ExprTrait;
    use server::Column as S;
    let (cpu, mem, disk) = (r.cpu_millis as i64, r.memory_mb as i64, r.disk_mb as i64);
    server::Entity::update_many()
        .col_expr(S::AllocCpuMillis, Expr::col(S::AllocCpuMillis).sub(cpu))
        .col_expr(S::AllocMemoryMb, Expr::col(S::AllocMemoryMb).sub(mem))
        .col_expr(S::AllocDiskMb, Expr::col(S::AllocDiskMb).sub(disk))
        .col_expr(S::AllocContainers, Expr::col(S::AllocContainers).sub(count))
        .filter(S::Id.eq(server_id))
        .exec(conn)
        .await?;
    Ok(())
}

/// Reserves the growth `grow` of a container on its own server with a dummy (so the ledger's
/// invariant holds while the container is resized, and the collector gives the growth back if
/// the command dies); `None` when the server lacks room. The server may be draining or down:
/// the container is already there.
pub async fn reserve_growth(
    txn: &DatabaseTransaction,
    server_id: ServerId,
    container_id: ContainerId,
    command_id: i64,
    grow: &Resources,
    deadline: i64,
) -> Result<Option<Reservation>, DbErr> {
    if !claim(txn, server_id, grow, 1, false).await? {
        return Ok(None);
    }
    let dummy_id = dummy_row(server_id, container_id, Some(command_id), grow, deadline)
        .insert(txn)
        .await?
        .id;
    Ok(Some(Reservation {
        server_id,
        dummy_id,
    }))
}

/// The container now has its new size: the growth dummy (if any) gives its reservation to the
/// container, and `shrink` is given back. When the dummy expired meanwhile, the growth is
/// claimed again; false when it no longer fits (nothing is changed then).
pub async fn settle_resize(
    txn: &DatabaseTransaction,
    server_id: ServerId,
    growth: Option<Reservation>,
    grow: &Resources,
    shrink: &Resources,
) -> Result<bool, DbErr> {
    if let Some(r) = growth {
        if dummy::Entity::delete_by_id(r.dummy_id)
            .exec(txn)
            .await?
            .rows_affected
            == 1
        {
            // The dummy counted as a container of the server; the container is counted already.
            release(txn, server_id, &Resources::default(), 1).await?;
        } else if !claim(txn, server_id, grow, 0, false).await? {
            return Ok(false);
        }
    }
    release(txn, server_id, shrink, 0).await?;
    Ok(true)
}

/// A reservation made by `place`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The chosen server.
    pub server_id: ServerId,
    /// The dummy holding the capacity.
    pub dummy_id: i64,
}

/// What to place.
pub struct PlaceRequest<'a> {
    /// The container's requirements.
    pub requirements: &'a Requirements,
    /// The container the dummy stands for.
    pub container_id: ContainerId,
    /// The command placing it.
    pub command_id: Option<i64>,
    /// Servers it must not go to (its current server, spread).
    pub avoid: HashSet<ServerId>,
    /// A server the user named instead of letting placement choose.
    pub server: Option<ServerId>,
    /// Deadline of the dummy, milliseconds since the Unix epoch.
    pub deadline: i64,
}

/// Chooses a server and reserves capacity there with a dummy, inside `txn` (the caller
/// commits it with its step). When a claim loses a race (the server filled up meanwhile),
/// refreshes that server and tries the next best.
pub async fn place(
    txn: &DatabaseTransaction,
    cache: &PlacementCache,
    req: PlaceRequest<'_>,
) -> Result<Reservation, PlacementError> {
    let need = req.requirements.resources;
    let mut avoid = req.avoid.clone();
    for _ in 0..32 {
        let server_id = match req.server {
            Some(s) => s,
            None => cache
                .decide(req.requirements, &avoid)
                .map_err(PlacementError::NoFit)?,
        };
        // A failed conditional update changes nothing, so no savepoint is needed.
        if claim(txn, server_id, &need, 1, true).await? {
            let dummy_id = insert_dummy(txn, server_id, &req, &need).await?;
            cache.apply(server_id, &need, 1, 1);
            return Ok(Reservation {
                server_id,
                dummy_id,
            });
        }
        cache.refresh(txn, server_id).await?;
        if req.server.is_some() {
            return Err(PlacementError::NoFit(format!(
                "the requested server #{server_id} is not up, is draining or lacks {} cpu_millis, {} memory_mb and {} disk_mb free",
                need.cpu_millis, need.memory_mb, need.disk_mb
            )));
        }
        avoid.insert(server_id);
    }
    Err(PlacementError::NoFit(
        "every fitting server filled up while placing; try again".into(),
    ))
}

async fn insert_dummy(
    txn: &DatabaseTransaction,
    server_id: ServerId,
    req: &PlaceRequest<'_>,
    need: &Resources,
) -> Result<i64, DbErr> {
    Ok(dummy_row(
        server_id,
        req.container_id,
        req.command_id,
        need,
        req.deadline,
    )
    .insert(txn)
    .await?
    .id)
}

/// A dummy reserving `need` on `server_id` for `container_id` until `deadline`.
pub fn dummy_row(
    server_id: ServerId,
    container_id: ContainerId,
    command_id: Option<i64>,
    need: &Resources,
    deadline: i64,
) -> dummy::ActiveModel {
    dummy::ActiveModel {
        server_id: Set(server_id),
        container_id: Set(container_id),
        command_id: Set(command_id),
        cpu_millis: Set(need.cpu_millis as i64),
        memory_mb: Set(need.memory_mb as i64),
        disk_mb: Set(need.disk_mb as i64),
        deadline: Set(deadline),
        created_at: Set(now_ms()),
        ..Default::default()
    }
}

/// The real container takes the place of its dummy: the dummy goes, its reservation stays. If
/// the collector already removed the dummy (deadline passed), reserves again; false when the
/// container no longer fits.
pub async fn fill<C: ConnectionTrait>(
    conn: &C,
    r: Reservation,
    need: &Resources,
) -> Result<bool, DbErr> {
    let deleted = dummy::Entity::delete_by_id(r.dummy_id)
        .exec(conn)
        .await?
        .rows_affected;
    if deleted == 1 {
        return Ok(true);
    }
    claim(conn, r.server_id, need, 1, false).await
}

/// Removes a dummy and gives back what it reserved; false if it was already gone.
pub async fn drop_dummy<C: ConnectionTrait>(conn: &C, dummy_id: i64) -> Result<bool, DbErr> {
    let Some(d) = dummy::Entity::find_by_id(dummy_id).one(conn).await? else {
        return Ok(false);
    };
    if dummy::Entity::delete_by_id(d.id)
        .exec(conn)
        .await?
        .rows_affected
        == 0
    {
        return Ok(false);
    }
    release(conn, d.server_id, &dummy_resources(&d), 1).await?;
    Ok(true)
}

/// What a dummy reserves.
pub fn dummy_resources(d: &dummy::Model) -> Resources {
    resources(d.cpu_millis, d.memory_mb, d.disk_mb)
}

/// Requirements of a container row.
pub fn requirements_of(row: &container::Model) -> Requirements {
    serde_json::from_str(&row.requirements).unwrap_or_default()
}

/// What the counters of every server should be, recomputed from containers and dummies.
async fn recompute<C: ConnectionTrait>(
    conn: &C,
) -> Result<HashMap<ServerId, (Resources, u64)>, DbErr> {
    let mut used: HashMap<ServerId, (Resources, u64)> = HashMap::new();
    let live = container::Entity::find()
        .filter(container::Column::ServerId.is_not_null())
        .filter(container::Column::Status.is_not_in([
            ContainerStatus::Destroyed.as_str(),
            ContainerStatus::Failed.as_str(),
        ]))
        .all(conn)
        .await?;
    for c in live {
        let e = used.entry(c.server_id.expect("filtered")).or_default();
        e.0 = e.0.plus(&requirements_of(&c).resources);
        e.1 += 1;
    }
    for d in dummy::Entity::find().all(conn).await? {
        let e = used.entry(d.server_id).or_default();
        e.0 = e.0.plus(&dummy_resources(&d));
        e.1 += 1;
    }
    Ok(used)
}

/// Servers whose counters differ from their containers and dummies, as messages (empty when
/// the ledger is consistent).
pub async fn audit<C: ConnectionTrait>(conn: &C) -> Result<Vec<String>, DbErr> {
    let used = recompute(conn).await?;
    let mut out = Vec::new();
    for s in server::Entity::find()
        .order_by_asc(server::Column::Id)
        .all(conn)
        .await?
    {
        let (want, count) = used.get(&s.id).copied().unwrap_or_default();
        let have = allocated_of(&s);
        if have != want || s.alloc_containers != count as i64 || s.alloc_cpu_millis < 0 {
            out.push(format!(
                "server {}: counters {have:?} x{} but containers and dummies reserve {want:?} x{count}",
                s.name, s.alloc_containers
            ));
        }
    }
    Ok(out)
}

/// Recomputes every server's counters (at start-up, before commands run). Returns how many
/// servers were corrected.
pub async fn reconcile(db: &DatabaseConnection) -> Result<usize, DbErr> {
    let txn = db.begin().await?;
    let used = recompute(&txn).await?;
    let mut fixed = 0;
    for s in server::Entity::find().all(&txn).await? {
        let (want, count) = used.get(&s.id).copied().unwrap_or_default();
        if allocated_of(&s) == want && s.alloc_containers == count as i64 && s.alloc_cpu_millis >= 0
        {
            continue;
        }
        let mut am: server::ActiveModel = s.into();
        am.alloc_cpu_millis = Set(want.cpu_millis as i64);
        am.alloc_memory_mb = Set(want.memory_mb as i64);
        am.alloc_disk_mb = Set(want.disk_mb as i64);
        am.alloc_containers = Set(count as i64);
        am.update(&txn).await?;
        fixed += 1;
    }
    txn.commit().await?;
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: ServerId, free_cpu: u64, free_mem: u64, labels: &[&str]) -> Candidate {
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
}
