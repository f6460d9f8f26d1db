//! What this core's decisions counted in placement's view before the database had it.
//!
//! A decision counts its container on the chosen server at once, so that the next decision
//! sees it; the reservation reaches the database only when the step's writes commit. A view
//! read from the database meanwhile (a full reload, one server after a failed claim, counters
//! another core changed) cannot hold it yet. The ledger keeps each count until it is settled,
//! and until every read that began before its commit has been taken in, so that such a
//! reload adds it back instead of dropping it: otherwise later decisions crowd the server the
//! first one filled, their claims fail, and a create that named that server fails with them.
//!
//! Invariants:
//! - The view of a server is its row as last read plus every count still open (not settled)
//!   plus every count committed after that read began (a read made in the transaction of the
//!   holder whose claims it already holds leaves that holder's open counts out).
//! - A count is settled once: committed when the transaction that holds its claim committed,
//!   given back otherwise. So the view never lacks a reservation it made; it may count one
//!   twice for a moment (a read that began just before a commit it already saw) until the
//!   next reload, which errs on the side of a fuller server.

use std::collections::HashMap;

use crate::model::Resources;

/// Who counted a reservation in the view, and settles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A command running alone: the queue settles it when the step's transaction ends.
    Command(i64),
    /// A group step: it settles its counts itself when its commit ends.
    Group(u64),
}

/// Capacity and containers counted on one server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Capacity counted.
    pub resources: Resources,
    /// Containers (and dummies) counted.
    pub containers: u64,
}

impl Held {
    /// `resources` for `containers` containers.
    pub fn of(resources: &Resources, containers: u64) -> Held {
        Held {
            resources: *resources,
            containers,
        }
    }

    fn plus(&self, o: &Held) -> Held {
        Held {
            resources: self.resources.plus(&o.resources),
            containers: self.containers + o.containers,
        }
    }

    fn minus(&self, o: &Held) -> Held {
        Held {
            resources: self.resources.minus(&o.resources),
            containers: self.containers.saturating_sub(o.containers),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Held::default()
    }
}

/// The ledger (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Commits settled so far: a read remembers the number it began at.
    commits: u64,
    /// Counts not settled, by holder and server.
    open: HashMap<Holder, Vec<(i64, Held)>>,
    /// Counts committed while a read was in progress: (commit number, server, count).
    recent: Vec<(u64, i64, Held)>,
    /// Reads in progress: the commit number each began at.
    reads: Vec<u64>,
}

impl Pending {
    /// Records `held` on `server` for `holder`.
    pub(super) fn add(&mut self, holder: Holder, server: i64, held: Held) {
        let list = self.open.entry(holder).or_default();
        match list.iter_mut().find(|(s, _)| *s == server) {
            Some((_, h)) => *h = h.plus(&held),
            None => list.push((server, held)),
        }
    }

    /// Takes `held` on `server` back from `holder`'s open counts (a decision given up).
    pub(super) fn remove(&mut self, holder: Holder, server: i64, held: Held) {
        let Some(list) = self.open.get_mut(&holder) else {
            return;
        };
        if let Some((_, h)) = list.iter_mut().find(|(s, _)| *s == server) {
            *h = h.minus(&held);
        }
        list.retain(|(_, h)| !h.is_empty());
        if list.is_empty() {
            self.open.remove(&holder);
        }
    }

    /// Whether `holder` has open counts.
    pub(super) fn holds(&self, holder: Holder) -> bool {
        self.open.contains_key(&holder)
    }

    /// Settles `holder`'s open counts. Committed, they are kept for the reads in progress
    /// (which may have missed them) and nothing is returned; otherwise they are returned, for
    /// the view to give back.
    pub(super) fn settle(&mut self, holder: Holder, committed: bool) -> Vec<(i64, Held)> {
        let list = self.open.remove(&holder).unwrap_or_default();
        if !committed {
            return list;
        }
        self.commits += 1;
        if !self.reads.is_empty() {
            let n = self.commits;
            self.recent
                .extend(list.into_iter().map(|(server, h)| (n, server, h)));
        }
        Vec::new()
    }

    /// A read of the database begins: returns its number for `since` and `end_read`.
    pub(super) fn begin_read(&mut self) -> u64 {
        self.reads.push(self.commits);
        self.commits
    }

    /// The read numbered `read` was taken in (or given up).
    pub(super) fn end_read(&mut self, read: u64) {
        if let Some(i) = self.reads.iter().position(|r| *r == read) {
            self.reads.swap_remove(i);
        }
        match self.reads.iter().min() {
            Some(&oldest) => self.recent.retain(|(n, _, _)| *n > oldest),
            None => self.recent.clear(),
        }
    }

    /// What a view read at `read` lacks: every open count and those committed after it began.
    /// A read made in the transaction of `within` already holds that holder's open counts.
    pub(super) fn since(
        &self,
        read: u64,
        within: Option<Holder>,
    ) -> impl Iterator<Item = (i64, Held)> + '_ {
        let open = self
            .open
            .iter()
            .filter(move |(h, _)| Some(**h) != within)
            .flat_map(|(_, list)| list.iter().copied());
        let recent = self
            .recent
            .iter()
            .filter(move |(n, _, _)| *n > read)
            .map(|(_, s, h)| (*s, *h));
        open.chain(recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(cpu: u64, n: u64) -> Held {
        Held {
            resources: Resources {
                cpu_millis: cpu,
                memory_mb: cpu,
                disk_mb: n,
            },
            containers: n,
        }
    }

    fn total(p: &Pending, read: u64, server: i64) -> Held {
        p.since(read, None)
            .filter(|(s, _)| *s == server)
            .fold(Held::default(), |a, (_, h)| a.plus(&h))
    }

    #[test]
    fn an_open_count_is_added_back_to_every_read_until_it_is_settled() {
        let mut p = Pending::default();
        let a = Holder::Group(1);
        p.add(a, 7, held(100, 1));
        p.add(a, 7, held(100, 1));
        p.add(a, 8, held(50, 1));
        let read = p.begin_read();
        assert_eq!(total(&p, read, 7), held(200, 2));
        p.remove(a, 7, held(100, 1));
        assert_eq!(total(&p, read, 7), held(100, 1));
        p.end_read(read);
        // Given back: the view returns it, and no read adds it again.
        let back = p.settle(a, false);
        assert_eq!(back.len(), 2);
        assert!(!p.holds(a));
        assert_eq!(total(&p, p.commits, 7), Held::default());
    }

    #[test]
    fn a_count_committed_during_a_read_is_added_back_to_that_read_only() {
        let mut p = Pending::default();
        let (a, b) = (Holder::Command(1), Holder::Command(2));
        p.add(a, 7, held(100, 1));
        let early = p.begin_read();
        // Committed after `early` began: that read may have missed it.
        assert!(p.settle(a, true).is_empty());
        let late = p.begin_read();
        assert_eq!(total(&p, early, 7), held(100, 1));
        assert_eq!(total(&p, late, 7), Held::default());
        p.add(b, 7, held(10, 1));
        p.end_read(late);
        assert_eq!(total(&p, early, 7), held(110, 2));
        p.end_read(early);
        // No read in progress: nothing committed is kept.
        assert!(p.recent.is_empty());
        assert_eq!(total(&p, p.commits, 7), held(10, 1));
    }

    #[test]
    fn a_read_within_a_holders_transaction_leaves_its_open_counts_out() {
        let mut p = Pending::default();
        let (a, b) = (Holder::Command(1), Holder::Group(2));
        p.add(a, 7, held(100, 1));
        p.add(b, 7, held(10, 1));
        let read = p.begin_read();
        let lacking = |within| {
            p.since(read, within)
                .fold(Held::default(), |acc, (_, h)| acc.plus(&h))
        };
        assert_eq!(lacking(Some(a)), held(10, 1));
        assert_eq!(lacking(None), held(110, 2));
    }

    #[test]
    fn a_commit_with_no_read_in_progress_keeps_nothing() {
        let mut p = Pending::default();
        p.add(Holder::Command(3), 1, held(1, 1));
        p.settle(Holder::Command(3), true);
        assert!(p.recent.is_empty() && p.open.is_empty());
        // Settling again (nothing open) changes nothing.
        assert!(p.settle(Holder::Command(3), false).is_empty());
    }
}
