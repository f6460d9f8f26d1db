//! The dispatcher, the command executor, the group executor, the batching completer and the
//! lease keeper.
// The queue opens the step transactions: it runs a step's writes (`Transition::commit`) after
// the step returned, and commits them with its decision.
#![expect(
    clippy::disallowed_methods,
    reason = "the queue owns the step transactions"
)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sea_orm::{DatabaseTransaction, TransactionTrait};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

use super::store::{self, Finish, LockOutcome};
use super::{
    GroupCommit, GroupNext, GroupSink, GroupWrite, GroupWrites, Inner, Next, StepError, Target,
    Transition,
};
use crate::entities::command;
use crate::model::CommandStatus;

mod execute;
mod group;
mod keeper;

use execute::execute;
use group::execute_group;
use keeper::{keeper_apart, lease_keeper};

/// A command that succeeded without writes, target or parent: finished in batches.
struct PlainDone {
    id: i64,
    result: String,
}

pub(super) fn spawn(inner: Arc<Inner>) {
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    tokio::spawn(completer(inner.clone(), done_rx));
    let apart = inner.lease_db.get().cloned();
    match apart.clone() {
        Some(opt) => keeper_apart(inner.clone(), opt),
        None => {
            tokio::spawn(lease_keeper(inner.clone(), inner.db.clone()));
        }
    }
    tokio::spawn(async move {
        let own = match apart {
            Some(opt) => claims_apart(&inner, opt).await,
            None => None,
        };
        dispatcher(inner, own, done_tx).await
    });
}

/// The connection the dispatcher claims on, opened with `opt` (lazily: only bad options fail
/// here, and then it claims on the commands' pool).
async fn claims_apart(
    inner: &Inner,
    opt: sea_orm::ConnectOptions,
) -> Option<sea_orm::DatabaseConnection> {
    match sea_orm::Database::connect(opt).await {
        Ok(mut db) => {
            let recorder = inner.recorder.clone();
            db.set_metric_callback(move |info| recorder.statement(info.elapsed, info.failed));
            Some(db)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the dispatcher cannot open a connection of its own; claiming on the commands' pool");
            None
        }
    }
}

/// Claims commands (on `own` connection if it has one, else or when that fails on the
/// commands' pool) and starts them, as workers are free, until the queue stops.
async fn dispatcher(
    inner: Arc<Inner>,
    own: Option<sea_orm::DatabaseConnection>,
    done: mpsc::UnboundedSender<PlainDone>,
) {
    let batch = claim_cap(inner.config.claim_batch, inner.config.workers);
    // Whether the last claim on its own connection failed (said once, not at every claim).
    let mut own_failing = false;
    while !inner.stopping.load(Ordering::SeqCst) {
        let Ok(first) = inner.slots.clone().acquire_owned().await else {
            return;
        };
        let mut permits = vec![first];
        take_free(&inner.slots, &mut permits, batch);
        // Few free workers while the others are busy: wait (at most a poll interval) for more
        // to finish, so that claims, and the groups they make, stay large.
        let short = short_of_floor(permits.len(), batch);
        if short > 0 {
            let more = inner.slots.clone().acquire_many_owned(short as u32);
            if let Ok(Ok(mut more)) = tokio::time::timeout(inner.config.poll, more).await {
                while let Some(one) = more.split(1) {
                    permits.push(one);
                }
                take_free(&inner.slots, &mut permits, batch);
            }
            if inner.stopping.load(Ordering::SeqCst) {
                return;
            }
        }
        let now = inner.clock.now_ms();
        let lease_until = now + inner.config.lease.as_millis() as i64;
        let asked = permits.len();
        let node = inner.node_id.as_str();
        let db = own.as_ref().unwrap_or(&inner.db);
        let mut claimed = store::claim(db, node, now, lease_until, asked).await;
        // Its own connection may be refused (the database's `max_connections` sized for one
        // connection less per core) or lost: the commands' pool claims meanwhile.
        if let (Err(e), Some(_)) = (&claimed, &own) {
            if !own_failing {
                tracing::warn!(error = %e, "claiming on the dispatcher's own connection failed; claiming on the commands' pool until it works again");
                own_failing = true;
            }
            claimed = store::claim(&inner.db, node, now, lease_until, asked).await;
        } else if own_failing && own.is_some() {
            tracing::info!("the dispatcher claims on its own connection again");
            own_failing = false;
        }
        let (mut rows, holding) = match claimed {
            Ok(c) => {
                for r in &c.rows {
                    inner
                        .recorder
                        .queue_wait(&r.kind, now - r.run_after.max(r.created_at));
                }
                (c.rows, c.holding)
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming commands failed; retrying");
                (Vec::new(), HashSet::new())
            }
        };
        tracing::debug!(asked, claimed = rows.len(), "claimed commands");
        // Fewer than asked: nothing else was claimable when the claim ran, so the next claim
        // waits for a wake-up (one that came meanwhile is kept by `work`) instead of running
        // at once to find nothing (on PostgreSQL an empty claim still costs a statement and
        // its triggers, and holds the dispatcher while a new command waits).
        let mut idle = rows.len() < asked;
        // A command a task of this process still executes came back (its lease was renewed too
        // late and a sweep put it back): the claim made this process its owner again, so that
        // task's writes still pass their fence; it is left to it, not run twice. Its permit
        // goes back with the unused ones.
        {
            let in_flight = inner.in_flight.lock().unwrap();
            rows.retain(|r| {
                let mine = in_flight.contains_key(&r.id);
                if mine {
                    inner.kept.fetch_add(1, Ordering::Relaxed);
                    inner.kept_more.notify_waiters();
                    tracing::warn!(command = r.id, "claimed a command this core is still executing (its lease was renewed late); the running task goes on with it");
                }
                !mine
            });
        }
        idle |= rows.is_empty();
        let runner = inner.runner.get().expect("runner set before start").clone();
        let (groups, singles) = by_group_key(runner.as_ref(), rows);
        for (key, rows) in groups {
            let held = permits.split_off(permits.len() - rows.len());
            let span = tracing::info_span!("group", kind = %key, commands = rows.len());
            let holding = rows
                .iter()
                .map(|r| r.id)
                .filter(|id| holding.contains(id))
                .collect();
            tokio::spawn(
                execute_group(inner.clone(), rows, holding, held, done.clone()).instrument(span),
            );
        }
        for row in singles {
            let permit = permits.pop().expect("claimed at most one row per permit");
            spawn_alone(&inner, row, permit, &done);
        }
        drop(permits);
        if idle {
            tokio::select! {
                _ = inner.work.notified() => {}
                _ = tokio::time::sleep(inner.config.poll) => {}
            }
        }
    }
}

/// Adds free permits of `slots` to `permits`, up to `batch`, without waiting.
fn take_free(slots: &Arc<Semaphore>, permits: &mut Vec<OwnedSemaphorePermit>, batch: usize) {
    while permits.len() < batch {
        match slots.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
}

/// The most commands one claim takes: `claim_batch`, but at most half the workers, so that
/// the commands of one claim run while the next claim's are read and started. Claims of all
/// the workers ran one group at a time, each waiting for the one before to end.
fn claim_cap(claim_batch: usize, workers: usize) -> usize {
    claim_batch.min(workers / 2).max(1)
}

/// How many more permits a claim holding `have` waits for: one of less than half of the most
/// it may take (`cap`), which the other workers' being busy implies, waits for some of them to
/// end. Claiming the few permits each ending group gave back settled into one group of a
/// thousand commands beside a stream of groups of 24, each with the fixed cost of a group, a
/// fifth slower in all than two groups of 500 side by side.
fn short_of_floor(have: usize, cap: usize) -> usize {
    (cap / 2).saturating_sub(have)
}

/// Sorts commands into groups by `Runner::group_key`; a command without a key, or alone under
/// its key, goes into the second list.
fn by_group_key(
    runner: &dyn super::Runner,
    rows: impl IntoIterator<Item = command::Model>,
) -> (Vec<(String, Vec<command::Model>)>, Vec<command::Model>) {
    let mut keyed: BTreeMap<String, Vec<command::Model>> = BTreeMap::new();
    let mut singles = Vec::new();
    for row in rows {
        match runner.group_key(&row) {
            Some(key) => keyed.entry(key).or_default().push(row),
            None => singles.push(row),
        }
    }
    let mut groups = Vec::new();
    for (key, rows) in keyed {
        if rows.len() == 1 {
            singles.extend(rows);
        } else {
            groups.push((key, rows));
        }
    }
    (groups, singles)
}

fn spawn_alone(
    inner: &Arc<Inner>,
    row: command::Model,
    permit: OwnedSemaphorePermit,
    done: &mpsc::UnboundedSender<PlainDone>,
) {
    let span = tracing::info_span!("command", id = row.id, kind = %row.kind);
    tokio::spawn(execute(inner.clone(), row, permit, done.clone()).instrument(span));
}

async fn completer(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<PlainDone>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        batch.sort_by(|a, b| a.result.cmp(&b.result));
        let mut i = 0;
        while i < batch.len() {
            let result = batch[i].result.clone();
            let j = batch[i..]
                .iter()
                .position(|d| d.result != result)
                .map_or(batch.len(), |k| i + k);
            let ids: Vec<i64> = batch[i..j].iter().map(|d| d.id).collect();
            let now = inner.clock.now_ms();
            let res = async {
                let txn = inner.db.begin().await?;
                store::finish_plain_batch(&txn, &ids, &inner.node_id, &result, now).await?;
                txn.commit().await
            }
            .await;
            match res {
                Ok(()) => inner.waiters.wake(ids),
                Err(e) => {
                    tracing::warn!(error = %e, commands = ids.len(), "finishing commands failed; they will run again after their lease expires")
                }
            }
            i = j;
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::{claim_cap, short_of_floor};

    #[test]
    fn a_claim_takes_at_most_half_the_workers() {
        assert_eq!(claim_cap(1024, 1024), 512);
        assert_eq!(claim_cap(256, 256), 128);
        assert_eq!(claim_cap(64, 1024), 64);
        assert_eq!(claim_cap(1024, 64), 32);
        // One worker, or a batch of one: one command per claim.
        assert_eq!(claim_cap(256, 1), 1);
        assert_eq!(claim_cap(1, 256), 1);
        assert_eq!(claim_cap(0, 0), 1);
    }

    #[test]
    fn a_claim_waits_only_when_it_would_take_less_than_half_of_what_it_may() {
        // 24 free while the other workers run a group: wait for 232 more.
        assert_eq!(short_of_floor(24, 512), 232);
        // Half of what it may take, or all of it: claim at once.
        assert_eq!(short_of_floor(256, 512), 0);
        assert_eq!(short_of_floor(512, 512), 0);
        // A claim of one never waits.
        assert_eq!(short_of_floor(1, 1), 0);
    }
}
