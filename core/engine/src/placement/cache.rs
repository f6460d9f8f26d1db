//! Placement's in-memory view of the servers, and what this core's decisions counted in it.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sea_orm::{ConnectionTrait, DbErr, EntityTrait, QueryOrder};

use super::pending::{Held, Holder, Pending};
use super::{
    Candidate, Weights, decide, decide_preferring, has_labels, holds, no_fit_reason, resources,
    score,
};
use crate::entities::server;
use crate::model::{ImageRef, Requirements, Resources};

/// Placement's in-memory view of the servers: read by every decision, refreshed from the
/// database (fully at start, by the collector, by the cluster sync when other cores changed
/// servers and when a decision on PostgreSQL finds no server; per server after a failed
/// claim), with what this core's decisions counted in it and the database does not have yet
/// (`Pending`).
#[derive(Default)]
pub struct PlacementCache {
    servers: RwLock<View>,
    /// The images each server holds (`name@digest`, as its agent reports them).
    held: RwLock<HashMap<i64, Vec<String>>>,
    weights: RwLock<Weights>,
    timing: AtomicBool,
    samples: std::sync::Mutex<Vec<u32>>,
    /// Decisions that found a server, and that found none.
    placed: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
    /// The last group holder handed out.
    groups: std::sync::atomic::AtomicU64,
    /// How the view follows what other cores place (`follow_others`).
    others: std::sync::Mutex<Others>,
}

/// Whether other cores place on this core's database, how old the allocations in the view may
/// be when one of this core's decisions reads them, and when they were last read.
#[derive(Default)]
struct Others {
    placing: bool,
    max_age: std::time::Duration,
    read_at: Option<Instant>,
}

/// Every server's allocation counters, `(id, cpu_millis, memory_mb, disk_mb, containers)`, as
/// `set_allocations` takes them.
pub async fn read_allocations<C: ConnectionTrait>(
    conn: &C,
) -> Result<Vec<(i64, i64, i64, i64, i64)>, DbErr> {
    use sea_orm::QuerySelect;
    server::Entity::find()
        .select_only()
        .columns([
            server::Column::Id,
            server::Column::AllocCpuMillis,
            server::Column::AllocMemoryMb,
            server::Column::AllocDiskMb,
            server::Column::AllocContainers,
        ])
        .into_tuple()
        .all(conn)
        .await
}

/// Whether allocations read at `read_at` (never: `None`) are older than `max_age` at `now`.
fn stale(read_at: Option<Instant>, now: Instant, max_age: std::time::Duration) -> bool {
    read_at.is_none_or(|at| now.saturating_duration_since(at) >= max_age)
}

#[derive(Default)]
struct View {
    list: Vec<Candidate>,
    index: HashMap<i64, usize>,
    pending: Pending,
}

impl View {
    fn of(list: Vec<Candidate>) -> View {
        let index = list.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        View {
            list,
            index,
            pending: Pending::default(),
        }
    }

    /// Counts (`sign` 1) or gives back (`sign` -1) `held` on `id`.
    fn count(&mut self, id: i64, held: &Held, sign: i64) {
        if let Some(&i) = self.index.get(&id) {
            let c = &mut self.list[i];
            if sign > 0 {
                c.allocated = c.allocated.plus(&held.resources);
                c.containers += held.containers;
            } else {
                c.allocated = c.allocated.minus(&held.resources);
                c.containers = c.containers.saturating_sub(held.containers);
            }
        }
    }

    /// Adds back to the servers `only` names (all when `None`), freshly read by `read` (in
    /// the transaction of `within`, if named), what that read could not hold.
    fn add_back(&mut self, read: u64, only: Option<&HashSet<i64>>, within: Option<Holder>) {
        let lacking: Vec<(i64, Held)> = self
            .pending
            .since(read, within)
            .filter(|(s, _)| only.is_none_or(|o| o.contains(s)))
            .collect();
        for (server, held) in lacking {
            self.count(server, &held, 1);
        }
    }
}

/// A read of the servers from the database in progress: taken before the read begins, handed
/// to what takes the rows in, so that counts committed meanwhile are not lost (see `Pending`).
pub struct Reading<'a> {
    cache: &'a PlacementCache,
    at: u64,
    began: Instant,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.cache
            .servers
            .write()
            .unwrap()
            .pending
            .end_read(self.at);
    }
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
        let cache = PlacementCache::new(weights);
        *cache.servers.write().unwrap() = View::of(servers);
        cache
    }

    /// Begins a read of servers from the database, for `load` or `set_allocations`.
    pub fn reading(&self) -> Reading<'_> {
        let at = self.servers.write().unwrap().pending.begin_read();
        Reading {
            cache: self,
            at,
            began: Instant::now(),
        }
    }

    /// Reloads every server.
    pub async fn refresh_all<C: ConnectionTrait>(&self, conn: &C) -> Result<(), DbErr> {
        self.refresh_all_within(conn, None).await
    }

    /// `refresh_all`, through the transaction (`conn`) that holds the claims `within` counted.
    pub async fn refresh_all_within<C: ConnectionTrait>(
        &self,
        conn: &C,
        within: Option<Holder>,
    ) -> Result<(), DbErr> {
        let read = self.reading();
        let rows = server::Entity::find()
            .order_by_asc(server::Column::Id)
            .all(conn)
            .await?;
        self.take_in(read, &rows, within);
        Ok(())
    }

    /// Replaces the view with these rows of `servers` (all of them), read by `read`.
    pub fn load(&self, read: Reading<'_>, rows: &[server::Model]) {
        self.take_in(read, rows, None)
    }

    fn take_in(&self, read: Reading<'_>, rows: &[server::Model], within: Option<Holder>) {
        let mut view = View::of(rows.iter().map(Candidate::from_row).collect());
        let mut guard = self.servers.write().unwrap();
        view.pending = std::mem::take(&mut guard.pending);
        view.add_back(read.at, None, within);
        *guard = view;
        drop(guard);
        self.note_read(read.began);
    }

    /// Reloads one server.
    pub async fn refresh<C: ConnectionTrait>(&self, conn: &C, id: i64) -> Result<(), DbErr> {
        self.refresh_within(conn, id, None).await
    }

    /// `refresh`, through the transaction (`conn`) that holds the claims `within` counted.
    pub async fn refresh_within<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: i64,
        within: Option<Holder>,
    ) -> Result<(), DbErr> {
        let read = self.reading();
        let Some(row) = server::Entity::find_by_id(id).one(conn).await? else {
            return Ok(());
        };
        let fresh = Candidate::from_row(&row);
        let mut guard = self.servers.write().unwrap();
        let view = &mut *guard;
        match view.index.get(&id) {
            Some(&i) => view.list[i] = fresh,
            None => {
                view.index.insert(id, view.list.len());
                view.list.push(fresh);
            }
        }
        view.add_back(read.at, Some(&HashSet::from([id])), within);
        Ok(())
    }

    /// Counts a reservation `holder` made on server `id` (`count` containers needing `r` in
    /// all); `holder` settles it when its writes commit or fail (`settle`).
    pub(crate) fn hold(&self, holder: Holder, id: i64, r: &Resources, count: i64) {
        let held = Held::of(r, count.max(0) as u64);
        let mut view = self.servers.write().unwrap();
        view.count(id, &held, 1);
        view.pending.add(holder, id, held);
    }

    /// Gives back part of what `holder` counted on server `id` (a decision it gave up).
    pub(crate) fn unhold(&self, holder: Holder, id: i64, r: &Resources, count: i64) {
        let held = Held::of(r, count.max(0) as u64);
        let mut view = self.servers.write().unwrap();
        view.count(id, &held, -1);
        view.pending.remove(holder, id, held);
    }

    /// Settles what `holder` counted: committed (the database has it now) or given back.
    pub fn settle(&self, holder: Holder, committed: bool) {
        if !self.servers.read().unwrap().pending.holds(holder) {
            return;
        }
        let mut view = self.servers.write().unwrap();
        for (server, held) in view.pending.settle(holder, committed) {
            view.count(server, &held, -1);
        }
    }

    /// A holder for a group step's decisions, unlike any other.
    pub fn group_holder(&self) -> Holder {
        Holder::Group(self.groups.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Records a release (`sign` -1) made in this core, or a reservation (`sign` 1) that no
    /// step settles (see `hold`).
    pub(crate) fn apply(&self, id: i64, r: &Resources, count: i64, sign: i64) {
        let held = Held::of(r, count.max(0) as u64);
        self.servers.write().unwrap().count(id, &held, sign);
    }

    /// Replaces the allocation counters of the servers named, from `(id, cpu_millis,
    /// memory_mb, disk_mb, containers)` as the database holds them (read by `read`).
    pub fn set_allocations(&self, read: Reading<'_>, counters: &[(i64, i64, i64, i64, i64)]) {
        self.set_allocations_within(read, counters, None)
    }

    /// `set_allocations`, read through the transaction that holds the claims `within` counted.
    fn set_allocations_within(
        &self,
        read: Reading<'_>,
        counters: &[(i64, i64, i64, i64, i64)],
        within: Option<Holder>,
    ) {
        let mut guard = self.servers.write().unwrap();
        let view = &mut *guard;
        for &(id, cpu, memory, disk, containers) in counters {
            if let Some(&i) = view.index.get(&id) {
                view.list[i].allocated = resources(cpu, memory, disk);
                view.list[i].containers = containers.max(0) as u64;
            }
        }
        let named: HashSet<i64> = counters.iter().map(|c| c.0).collect();
        view.add_back(read.at, Some(&named), within);
        drop(guard);
        self.note_read(read.began);
    }

    /// Records that the allocations in the view are as read at `began` (unless a later read
    /// was recorded or taken).
    fn note_read(&self, began: Instant) {
        let mut others = self.others.lock().unwrap();
        if others.read_at.is_none_or(|at| at < began) {
            others.read_at = Some(began);
        }
    }

    /// Tells the view whether other cores place on this core's database (the cluster's sync
    /// does, from the cores seen lately), and how old the allocations it reads may be then.
    pub fn others_place(&self, placing: bool, max_age: std::time::Duration) {
        let mut others = self.others.lock().unwrap();
        others.placing = placing;
        others.max_age = max_age;
    }

    /// While other cores place on this database: reads every server's allocation counters
    /// again (through `conn`, whose claims `within` counted) when the view's are older than
    /// the age `others_place` set, so that a decision sees what the other cores placed since
    /// (the cluster's sync reads them only once a heartbeat period; without this, cores
    /// placing at once each picked the same emptiest server). Nothing otherwise.
    pub async fn follow_others<C: ConnectionTrait>(
        &self,
        conn: &C,
        within: Option<Holder>,
    ) -> Result<(), DbErr> {
        {
            let mut others = self.others.lock().unwrap();
            let now = Instant::now();
            if !others.placing || !stale(others.read_at, now, others.max_age) {
                return Ok(());
            }
            // Taken by this decision: those deciding meanwhile do not read them too.
            others.read_at = Some(now);
        }
        let read = self.reading();
        let counters = read_allocations(conn).await?;
        self.set_allocations_within(read, &counters, within);
        Ok(())
    }

    /// Marks a server up or down and draining or not.
    pub fn set_status(&self, id: i64, up: bool, draining: bool) {
        let mut guard = self.servers.write().unwrap();
        let view = &mut *guard;
        if let Some(&i) = view.index.get(&id) {
            view.list[i].up = up;
            view.list[i].draining = draining;
        }
    }

    /// Records the images server `id` holds (`name@digest`), from its heartbeat.
    pub fn set_images(&self, id: i64, images: &[String]) {
        let mut held = self.held.write().unwrap();
        if held.get(&id).map(Vec::as_slice) != Some(images) {
            held.insert(id, images.to_vec());
        }
    }

    /// The servers whose agents last said they hold `image`, lowest id first.
    pub fn holders(&self, image: &ImageRef) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .held
            .read()
            .unwrap()
            .iter()
            .filter(|(_, names)| names.iter().any(|n| holds(n, image)))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Chooses a server (see `decide`), preferring those that hold `image`.
    pub fn decide(
        &self,
        req: &Requirements,
        image: Option<&ImageRef>,
        avoid: &HashSet<i64>,
    ) -> Result<i64, String> {
        let started = self.timing.load(Ordering::Relaxed).then(Instant::now);
        let w = *self.weights.read().unwrap();
        let servers = &self.servers.read().unwrap().list;
        let out = match image {
            None => decide(servers, req, avoid, &w),
            Some(image) => {
                let held = self.held.read().unwrap();
                decide_preferring(servers, req, avoid, &w, |id| {
                    held.get(&id)
                        .is_some_and(|names| names.iter().any(|n| holds(n, image)))
                })
            }
        };
        if let Some(t) = started {
            let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
            self.samples.lock().unwrap().push(ns);
        }
        self.count(std::iter::once(&out));
        out
    }

    fn count<'a>(&self, decisions: impl IntoIterator<Item = &'a Result<i64, String>>) {
        let (mut placed, mut refused) = (0, 0);
        for d in decisions {
            if d.is_ok() {
                placed += 1;
            } else {
                refused += 1;
            }
        }
        self.placed.fetch_add(placed, Ordering::Relaxed);
        self.refused.fetch_add(refused, Ordering::Relaxed);
    }

    /// Decisions made since the cache was made: (placed, found no server).
    pub fn decisions(&self) -> (u64, u64) {
        (
            self.placed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// `decide_many` (on a view that follows other cores' placements, `follow_others`), and on
    /// a database other cores share once more on a fresh view when a decision found no
    /// server: another core may have registered servers, or seen them come back, since this
    /// view was read.
    pub async fn decide_many_fresh<C: ConnectionTrait>(
        &self,
        conn: &C,
        holder: Holder,
        req: &Requirements,
        image: Option<&ImageRef>,
        count: usize,
    ) -> Result<Vec<Result<i64, String>>, DbErr> {
        self.follow_others(conn, None).await?;
        let decisions = self.decide_many(holder, req, image, count);
        if decisions.iter().all(Result::is_ok)
            || conn.get_database_backend() != sea_orm::DatabaseBackend::Postgres
        {
            return Ok(decisions);
        }
        // Decided again on the fresh view: these are given back first.
        for server in decisions.iter().flatten() {
            self.unhold(holder, *server, &req.resources, 1);
        }
        self.refresh_all(conn).await?;
        Ok(self.decide_many(holder, req, image, count))
    }

    /// Decides servers for `count` containers with the same requirements, as `decide` would
    /// one after another, and counts each decision in the cache for `holder` (like `hold`). The fitting
    /// servers go into a heap by score once; each decision takes the best, counts the container
    /// there and puts the server back with its new score, so a decision costs O(log servers)
    /// instead of a scan. The decisions that find no server carry the reason.
    pub fn decide_many(
        &self,
        holder: Holder,
        req: &Requirements,
        image: Option<&ImageRef>,
        count: usize,
    ) -> Vec<Result<i64, String>> {
        use std::cmp::{Ordering as O, Reverse};
        use std::collections::BinaryHeap;
        #[derive(PartialEq)]
        struct Best(f64, Reverse<i64>, usize);
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
        // Locks taken in the order `decide` takes them (servers, then images): a writer
        // waiting on either could otherwise leave the two deciders waiting on each other.
        let mut guard = self.servers.write().unwrap();
        let held = self.held.read().unwrap();
        let bonus = |id: i64| match image {
            Some(image)
                if held
                    .get(&id)
                    .is_some_and(|n| n.iter().any(|n| holds(n, image))) =>
            {
                w.image
            }
            _ => 0.0,
        };
        let timing = self.timing.load(Ordering::Relaxed);
        let view = &mut *guard;
        let list = &mut view.list;
        let started = Instant::now();
        let mut heap: BinaryHeap<Best> = list
            .iter()
            .enumerate()
            .filter(|(_, c)| c.placeable() && has_labels(c, req) && c.fits(need))
            .map(|(i, c)| Best(score(c, need, &w) + bonus(c.id), Reverse(c.id), i))
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
            if c.fits(need) {
                heap.push(Best(score(c, need, &w) + bonus(id), Reverse(id), at));
            }
            out.push(Ok(id));
            if timing {
                samples.push((build + one.elapsed().as_nanos() as u64).min(u32::MAX as u64) as u32);
            }
        }
        let mut per_server: HashMap<i64, u64> = HashMap::new();
        for id in out.iter().flatten() {
            *per_server.entry(*id).or_default() += 1;
        }
        for (id, n) in per_server {
            view.pending.add(holder, id, Held::of(&need.times(n), n));
        }
        drop(guard);
        if timing {
            self.samples.lock().unwrap().extend(samples);
        }
        self.count(&out);
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
        self.servers.read().unwrap().list.clone()
    }
}

/// Gives back, when dropped, what its holder counted and did not settle: a group step that
/// ended early, failed, or was dropped.
pub struct Settling {
    cache: std::sync::Arc<PlacementCache>,
    holder: Holder,
}

impl Settling {
    /// Settles `holder` in `cache` when dropped.
    pub fn new(cache: std::sync::Arc<PlacementCache>, holder: Holder) -> Self {
        Settling { cache, holder }
    }

    /// Whose counts these are.
    pub fn holder(&self) -> Holder {
        self.holder
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.cache.settle(self.holder, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Allocations never read, or read at least the maximum age ago, are read again; younger
    /// ones are not (a maximum age of 0 reads them before every decision).
    #[test]
    fn allocations_are_read_again_once_older_than_the_maximum_age() {
        let now = Instant::now();
        let max = Duration::from_millis(100);
        assert!(stale(None, now, max));
        assert!(!stale(Some(now - Duration::from_millis(99)), now, max));
        assert!(stale(Some(now - max), now, max));
        assert!(stale(Some(now), now, Duration::ZERO));
        // A read that began after `now` (another task's) is not stale.
        assert!(!stale(Some(now + Duration::from_millis(5)), now, max));
    }
}
