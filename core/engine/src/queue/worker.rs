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

/// A command that succeeded without writes, target or parent: finished in batches.
struct PlainDone {
    id: i64,
    result: String,
}

pub(super) fn spawn(inner: Arc<Inner>) {
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    tokio::spawn(completer(inner.clone(), done_rx));
    match inner.lease_db.get().cloned() {
        Some(opt) => keeper_apart(inner.clone(), opt),
        None => {
            tokio::spawn(lease_keeper(inner.clone(), inner.db.clone()));
        }
    }
    tokio::spawn(dispatcher(inner, done_tx));
}

async fn dispatcher(inner: Arc<Inner>, done: mpsc::UnboundedSender<PlainDone>) {
    let batch = claim_cap(inner.config.claim_batch, inner.config.workers);
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
        let claimed = store::claim(&inner.db, &inner.node_id, now, lease_until, asked).await;
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

/// How a command of a group step ended up.
enum Settled {
    /// Committed at a new step; it goes on in the group.
    Continued,
    /// Committed as succeeded.
    Finished,
    /// Runs alone.
    Alone,
    /// Fails alone with this message.
    Failed(String),
}

/// The queue's side of a group step: commits decisions with few statements.
struct Sink<'a> {
    inner: &'a Inner,
    rows: &'a [command::Model],
    settled: Vec<Option<Settled>>,
    /// The last step and progress committed (or carried) for each command, if any.
    committed: Vec<Option<(i32, String)>>,
}

#[async_trait]
impl GroupSink for Sink<'_> {
    async fn commit(&mut self, writes: GroupWrites) -> Result<GroupCommit, StepError> {
        let (decisions, txn) = match written(self.inner, writes).await?? {
            (GroupWrite::Commit(decisions), txn) => (decisions, txn),
            (GroupWrite::Rollback, txn) => {
                txn.rollback().await?;
                return Ok(GroupCommit::RolledBack);
            }
        };
        // A command committed at a new step may be committed again, at its next step.
        let open = |s: Option<&Option<Settled>>| matches!(s, Some(None | Some(Settled::Continued)));
        if let Some((i, _)) = decisions.iter().find(|(i, _)| !open(self.settled.get(*i))) {
            txn.rollback().await?;
            return Err(StepError::Permanent(format!(
                "group step committed command #{i} of the group after it ended, or out of range"
            )));
        }
        let now = self.inner.clock.now_ms();
        let lease_until = now + self.inner.config.lease.as_millis() as i64;
        let mut advances = Vec::new();
        let mut carried = Vec::new();
        let mut finishes = Vec::new();
        for (i, next) in &decisions {
            let row = &self.rows[*i];
            match next {
                GroupNext::Continue { step, progress } => {
                    advances.push((row.id, *step, progress.to_string()))
                }
                GroupNext::Carry { .. } => carried.push(row.id),
                GroupNext::Done { result, released } => {
                    // Its last step and progress, which a carry did not write.
                    let (step, progress) = self.committed[*i]
                        .clone()
                        .unwrap_or_else(|| (row.step, row.progress.clone()));
                    finishes.push(store::Succeeded {
                        id: row.id,
                        result: result.to_string(),
                        step,
                        progress,
                        target: Target::of(row).filter(|_| !*released),
                    })
                }
            }
        }
        let owner = self.inner.node_id.as_str();
        let advanced = store::advance_many(&txn, owner, lease_until, &advances).await?;
        let fenced = store::hold_many(&txn, owner, &carried).await?;
        let finished = store::succeed_many(&txn, owner, now, &finishes).await?;
        if advanced != advances.len() as u64
            || fenced != carried.len() as u64
            || finished != finishes.len() as u64
        {
            tracing::warn!("lost the lease of a command of a group; its members run alone");
            txn.rollback().await?;
            for (i, _) in decisions {
                self.settled[i] = Some(Settled::Alone);
            }
            return Ok(GroupCommit::LeaseLost);
        }
        let parents: BTreeSet<i64> = decisions
            .iter()
            .filter(|(_, n)| matches!(n, GroupNext::Done { .. }))
            .filter_map(|(i, _)| self.rows[*i].parent_id)
            .collect();
        for parent in parents {
            store::wake_parent(&txn, parent, now).await?;
        }
        txn.commit().await?;
        self.inner
            .grouped
            .fetch_add(decisions.len() as u64, Ordering::Relaxed);
        for (i, next) in decisions {
            self.settled[i] = Some(match next {
                GroupNext::Continue { step, progress } | GroupNext::Carry { step, progress } => {
                    self.committed[i] = Some((step, progress.to_string()));
                    Settled::Continued
                }
                GroupNext::Done { .. } => Settled::Finished,
            });
        }
        if !finishes.is_empty() {
            tracing::debug!(commands = finishes.len(), "commands of a group finished");
            self.inner.waiters.wake(finishes.iter().map(|f| f.id));
            self.inner.work.notify_one();
        }
        Ok(GroupCommit::Committed)
    }

    fn fail(&mut self, index: usize, message: String) {
        if let Some(slot @ (None | Some(Settled::Continued))) = self.settled.get_mut(index) {
            *slot = Some(Settled::Failed(message));
        }
    }
}

/// Runs commands that share a group key: locks their targets together (except those the claim
/// found them `holding`), then runs their steps as groups for as long as they go on together.
/// Whatever a group step leaves uncommitted runs alone (`execute`) from its current step, with
/// its own permit.
async fn execute_group(
    inner: Arc<Inner>,
    rows: Vec<command::Model>,
    holding: HashSet<i64>,
    mut permits: Vec<OwnedSemaphorePermit>,
    done: mpsc::UnboundedSender<PlainDone>,
) {
    let runner = inner.runner.get().expect("runner set before start").clone();
    let mut in_flight: HashMap<i64, InFlight<'_>> = rows
        .iter()
        .map(|r| (r.id, InFlight::new(&inner, r)))
        .collect();
    let mut alone = Vec::new();
    let mut current = Vec::new();
    // Lock the targets, one statement per table; a target that is busy or missing is left to
    // the single path, which knows how to wait for it or fail.
    let mut held: HashSet<(&'static str, i64)> = HashSet::new();
    for table in ["containers", "environments"] {
        let mut pairs: Vec<(i64, i64)> = Vec::new();
        for r in &rows {
            match Target::of(r).filter(|t| t.table() == table) {
                Some(t) if holding.contains(&r.id) => {
                    held.insert((table, t.id()));
                }
                Some(t) => pairs.push((t.id(), r.id)),
                None => {}
            }
        }
        if pairs.is_empty() {
            continue;
        }
        match store::lock_many(&inner.db, table, &pairs).await {
            Ok(ids) => held.extend(ids.into_iter().map(|id| (table, id))),
            Err(e) => {
                tracing::warn!(error = %e, "locking the targets of a group failed; its commands run alone")
            }
        }
    }
    for row in rows {
        match Target::of(&row) {
            Some(t) if !held.contains(&(t.table(), t.id())) => alone.push(row),
            _ => current.push(row),
        }
    }
    loop {
        for row in alone.drain(..) {
            // The single path marks it in flight again.
            in_flight.remove(&row.id);
            let permit = permits.pop().expect("one permit per command of the group");
            spawn_alone(&inner, row, permit, &done);
        }
        if current.is_empty() {
            return;
        }
        let (groups, singles) = by_group_key(runner.as_ref(), current.drain(..));
        alone.extend(singles);
        for (_, group) in groups {
            let n = group.len();
            let mut sink = Sink {
                inner: &inner,
                rows: &group,
                settled: (0..n).map(|_| None).collect(),
                committed: vec![None; n],
            };
            if let Err(e) = runner.step_group(&group, &mut sink).await {
                tracing::info!(error = %e, "a group step stopped; its uncommitted commands run alone");
            }
            let (settled, committed) = (
                std::mem::take(&mut sink.settled),
                std::mem::take(&mut sink.committed),
            );
            for ((mut row, s), c) in group.into_iter().zip(settled).zip(committed) {
                // Whatever happens next starts from the last step committed.
                if let Some((step, progress)) = c {
                    row.step = step;
                    row.progress = progress;
                }
                match s {
                    Some(Settled::Continued) => current.push(row),
                    Some(Settled::Finished) => {
                        in_flight.remove(&row.id);
                        permits.pop();
                    }
                    Some(Settled::Failed(msg)) => {
                        in_flight.remove(&row.id);
                        let permit = permits.pop().expect("one permit per command of the group");
                        let inner = inner.clone();
                        let span = tracing::info_span!("command", id = row.id, kind = %row.kind);
                        tokio::spawn(
                            async move {
                                let _permit = permit;
                                if let Err(e) = fail(&inner, &row, msg, None, None).await {
                                    tracing::warn!(error = %e, "failing a command of a group failed; it runs again after its lease expires");
                                }
                            }
                            .instrument(span),
                        );
                    }
                    Some(Settled::Alone) | None => alone.push(row),
                }
            }
        }
    }
}

fn backoff(inner: &Inner, attempts: i32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).max(0) as u32);
    inner
        .config
        .backoff_base
        .saturating_mul(factor)
        .min(inner.config.backoff_max)
}

/// Marks a command as executing in this process until dropped (also on panic).
struct InFlight<'a> {
    inner: &'a Inner,
    id: i64,
}

impl<'a> InFlight<'a> {
    /// For claimed command `row` (its lease as the claim set it).
    fn new(inner: &'a Inner, row: &command::Model) -> Self {
        let until = row.lease_until.unwrap_or(i64::MIN);
        inner.in_flight.lock().unwrap().insert(row.id, until);
        InFlight { inner, id: row.id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.inner.in_flight.lock().unwrap().remove(&self.id);
    }
}

async fn execute(
    inner: Arc<Inner>,
    mut row: command::Model,
    _permit: OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<PlainDone>,
) {
    // Only commands a task is executing get their lease renewed: anything left `running` by a
    // failed write expires and is resumed by the sweep.
    let _in_flight = InFlight::new(&inner, &row);
    if let Err(e) = run(&inner, &mut row, &done).await {
        // A database error outside a step: leave the command to be retried.
        tracing::warn!(error = %e, "command interrupted by a database error; retrying");
        let attempts = row.attempts + 1;
        let after = inner.clock.now_ms() + backoff(&inner, attempts).as_millis() as i64;
        let _ = store::requeue(
            &inner.db,
            row.id,
            &inner.node_id,
            after,
            attempts,
            &format!("retry after database error: {e}"),
        )
        .await;
    }
}

/// Records what a step's driver calls report (`driver::activity`) as lines of command `id`'s
/// log: each its own small write, outside any transaction, never waited for.
fn activity_reporter(
    inner: &Arc<Inner>,
    id: i64,
    target: Option<Target>,
) -> crate::driver::activity::Reporter {
    let (db, clock) = (inner.db.clone(), inner.clock.clone());
    let container = match target {
        Some(Target::Container(c)) => Some(c),
        _ => None,
    };
    Arc::new(move |what: &str| {
        let line = crate::entities::command_log::ActiveModel {
            command_id: sea_orm::Set(id),
            container_id: sea_orm::Set(container),
            level: sea_orm::Set("info".into()),
            message: sea_orm::Set(what.to_string()),
            at: sea_orm::Set(clock.now_ms()),
            ..Default::default()
        };
        let db = db.clone();
        tokio::spawn(async move {
            use sea_orm::EntityTrait;
            if let Err(e) = crate::entities::command_log::Entity::insert(line)
                .exec(&db)
                .await
            {
                tracing::debug!(command = id, error = %e, "an activity line was not recorded");
            }
        });
    })
}

async fn run(
    inner: &Arc<Inner>,
    row: &mut command::Model,
    done: &mpsc::UnboundedSender<PlainDone>,
) -> Result<(), sea_orm::DbErr> {
    let runner = inner.runner.get().expect("runner set before start").clone();
    let target = Target::of(row);
    if let Some(target) = target {
        match store::lock(&inner.db, target, row.id).await? {
            LockOutcome::Acquired => {}
            LockOutcome::Busy(holder) => {
                let after = inner.clock.now_ms() + inner.config.lock_retry.as_millis() as i64;
                let why = format!("lock of {target} held by command {holder}");
                tracing::debug!(%why, "waiting for lock");
                store::requeue_unstarted(&inner.db, row, &inner.node_id, after, &why).await?;
                return Ok(());
            }
            LockOutcome::TooDeep => {
                let msg = format!(
                    "hook actions nested more than {} levels deep; a container type keeps asking for more work",
                    store::MAX_NESTING
                );
                return fail(inner, row, msg, None, None).await;
            }
            LockOutcome::Missing => {
                return fail(inner, row, format!("{target} does not exist"), None, None).await;
            }
        }
    }
    let reporter = activity_reporter(inner, row.id, target);
    loop {
        let step = crate::driver::activity::scope(reporter.clone(), runner.step(row));
        let outcome = match step.await {
            Ok(Transition::Bare(next)) => Ok((next, None)),
            // The step's driver and plugin calls are done: only now is a transaction opened.
            Ok(Transition::Commit(writes)) => written(inner, writes)
                .await?
                .map(|(next, txn)| (next, Some(txn))),
            Err(e) => Err(e),
        };
        let (next, txn) = match outcome {
            Ok(t) => t,
            Err(StepError::Permanent(msg)) => return fail(inner, row, msg, None, None).await,
            Err(e @ (StepError::Transient(_) | StepError::Db(_))) => {
                let attempts = row.attempts + 1;
                let max = inner.config.max_attempts;
                if attempts >= max {
                    let msg = format!("gave up after {attempts} attempts: {e}");
                    return fail(inner, row, msg, None, None).await;
                }
                let after = inner.clock.now_ms() + backoff(inner, attempts).as_millis() as i64;
                let why = format!("retry {attempts}/{} after: {e}", max - 1);
                tracing::info!(%why, "transient failure");
                store::requeue(&inner.db, row.id, &inner.node_id, after, attempts, &why).await?;
                inner.work.notify_one();
                return Ok(());
            }
        };
        // Spawning nothing is simply going on.
        let next = match next {
            Next::Spawn {
                step,
                progress,
                children,
            } if children.is_empty() => Next::Continue { step, progress },
            other => other,
        };
        match next {
            Next::Continue { step, progress } => {
                let txn = begin(inner, txn).await?;
                let lease_until = inner.clock.now_ms() + inner.config.lease.as_millis() as i64;
                if !store::advance(&txn, row.id, &inner.node_id, step, &progress, lease_until)
                    .await?
                {
                    return lost_lease(row, txn).await;
                }
                txn.commit().await?;
                row.step = step;
                row.progress = progress.to_string();
            }
            Next::Spawn {
                step,
                progress,
                children,
            } => {
                let txn = begin(inner, txn).await?;
                let now = inner.clock.now_ms();
                let ids = store::insert(&txn, &children, Some(row.id), now, None).await?;
                if !store::wait_for_children(&txn, row.id, &inner.node_id, step, &progress).await? {
                    return lost_lease(row, txn).await;
                }
                txn.commit().await?;
                tracing::info!(children = ?ids, "waiting for child commands");
                inner.work.notify_one();
                return Ok(());
            }
            Next::Done(result) => {
                let result = result.to_string();
                if txn.is_none() && target.is_none() && row.parent_id.is_none() {
                    let _ = done.send(PlainDone { id: row.id, result });
                    return Ok(());
                }
                let txn = begin(inner, txn).await?;
                let f = Finish {
                    id: row.id,
                    status: CommandStatus::Succeeded,
                    result: Some(result),
                    error: None,
                    target,
                    parent: row.parent_id,
                };
                return commit_finish(inner, row, txn, &f).await;
            }
            Next::Fail(msg) => return fail(inner, row, msg, None, txn).await,
            Next::Partial { result, error } => {
                return fail(inner, row, error, Some(result.to_string()), txn).await;
            }
        }
    }
}

async fn begin(
    inner: &Inner,
    txn: Option<DatabaseTransaction>,
) -> Result<DatabaseTransaction, sea_orm::DbErr> {
    match txn {
        Some(t) => Ok(t),
        None => inner.db.begin().await,
    }
}

/// Opens a transaction and runs `writes` in it (a step's, a group step's or a compensation's);
/// returns their result with the open transaction, or rolls back and returns their error.
async fn written<T, E>(
    inner: &Inner,
    writes: impl for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, E>>,
) -> Result<Result<(T, DatabaseTransaction), E>, sea_orm::DbErr> {
    let txn = inner.db.begin().await?;
    match writes(&txn).await {
        Ok(v) => Ok(Ok((v, txn))),
        Err(e) => {
            txn.rollback().await?;
            Ok(Err(e))
        }
    }
}

async fn lost_lease(row: &command::Model, txn: DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
    tracing::warn!(
        id = row.id,
        "lost the lease of the command; another core took it over"
    );
    txn.rollback().await
}

/// Fails a command: the handler's own writes (if it returned some) or its `on_failure`
/// compensation commit together with the failure (and a result, for a partial failure).
async fn fail(
    inner: &Arc<Inner>,
    row: &command::Model,
    msg: String,
    result: Option<String>,
    txn: Option<DatabaseTransaction>,
) -> Result<(), sea_orm::DbErr> {
    tracing::warn!(error = %msg, "command failed");
    let txn = match txn {
        Some(t) => t,
        None => {
            let runner = inner.runner.get().expect("runner set").clone();
            match runner.on_failure(row, &msg).await? {
                Some(undo) => written(inner, undo).await??.1,
                None => inner.db.begin().await?,
            }
        }
    };
    let f = Finish {
        id: row.id,
        status: CommandStatus::Failed,
        result,
        error: Some(msg),
        target: Target::of(row),
        parent: row.parent_id,
    };
    commit_finish(inner, row, txn, &f).await
}

async fn commit_finish(
    inner: &Arc<Inner>,
    row: &command::Model,
    txn: DatabaseTransaction,
    f: &Finish,
) -> Result<(), sea_orm::DbErr> {
    if !store::finish(&txn, f, Some(&inner.node_id), inner.clock.now_ms()).await? {
        return lost_lease(row, txn).await;
    }
    txn.commit().await?;
    tracing::info!(status = %f.status, "command finished");
    inner.waiters.wake([row.id]);
    inner.work.notify_one();
    Ok(())
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

/// Runs the lease keeper on a thread of its own, on a runtime of its own and a connection
/// opened with `opt`, so that its renewals keep time whatever this runtime's tasks do. It ends
/// with the queue (`stop`) or with the runtime that called this; if its thread or runtime
/// cannot be made, the keeper runs as a task here instead.
fn keeper_apart(inner: Arc<Inner>, opt: sea_orm::ConnectOptions) {
    let here = tokio::runtime::Handle::current();
    let (alive, ended) = tokio::sync::oneshot::channel::<()>();
    // This task's end, when its runtime shuts down, ends the keeper.
    here.spawn(async move {
        let _alive = alive;
        std::future::pending::<()>().await
    });
    let fallback = here.clone();
    let keeper = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("cloud48-leases".into())
        .spawn(move || {
            let apart = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let apart = match apart {
                Ok(rt) => rt,
                Err(e) => return keep_beside(&fallback, &keeper, "make its runtime", &e),
            };
            apart.block_on(async move {
                // A lazy pool: no connection yet, so only bad options fail here.
                let db = match sea_orm::Database::connect(opt).await {
                    Ok(db) => db,
                    Err(e) => return keep_beside(&fallback, &keeper, "open its connection", &e),
                };
                tokio::select! {
                    _ = lease_keeper(keeper, db) => {}
                    _ = ended => {}
                }
            });
        });
    if let Err(e) = spawned {
        keep_beside(&here, &inner, "start its thread", &e);
    }
}

/// The lease keeper as a task of `here`, beside the commands, when it cannot `what` apart.
fn keep_beside(
    here: &tokio::runtime::Handle,
    inner: &Arc<Inner>,
    what: &str,
    e: &dyn std::fmt::Display,
) {
    tracing::warn!(error = %e, "the lease keeper cannot {what}; renewing leases beside the commands");
    here.spawn(lease_keeper(inner.clone(), inner.db.clone()));
}

/// Every third of a lease: renews the leases of the commands this process executes, then
/// queues again every command whose lease ran out, on `db`.
async fn lease_keeper(inner: Arc<Inner>, db: sea_orm::DatabaseConnection) {
    let _running = inner.keeper.lock().await;
    let mut halt = inner.halt.subscribe();
    let every = (inner.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = halt.wait_for(|halted| *halted) => return,
        }
        let now = inner.clock.now_ms();
        let until = now + inner.config.lease.as_millis() as i64;
        // A command claimed in the last half interval is left for the next tick, when it
        // still has at least half a lease (most commands end before it).
        let fresh = until - (every / 2).as_millis() as i64;
        let ids: Vec<i64> = inner
            .in_flight
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, claimed_until)| **claimed_until < fresh)
            .map(|(id, _)| *id)
            .collect();
        if let Err(e) = store::renew_leases(&db, &inner.node_id, &ids, until).await {
            tracing::warn!(error = %e, "renewing leases failed");
        }
        match store::sweep(&db, now).await {
            Ok(n) => {
                inner.sweeps.fetch_add(1, Ordering::Relaxed);
                if n > 0 {
                    inner.work.notify_one();
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeping the queue failed"),
        }
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
