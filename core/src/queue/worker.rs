//! The dispatcher, the command executor, the batching completer and the lease keeper.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sea_orm::{DatabaseTransaction, TransactionTrait};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument;

use super::store::{self, Finish, LockOutcome};
use super::{Inner, Next, StepError, Target, Transition};
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
    tokio::spawn(lease_keeper(inner.clone()));
    tokio::spawn(dispatcher(inner, done_tx));
}

async fn dispatcher(inner: Arc<Inner>, done: mpsc::UnboundedSender<PlainDone>) {
    let batch = inner.config.claim_batch.max(1);
    while !inner.stopping.load(Ordering::SeqCst) {
        let Ok(first) = inner.slots.clone().acquire_owned().await else {
            return;
        };
        let mut permits = vec![first];
        while permits.len() < batch {
            match inner.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let now = inner.clock.now_ms();
        let lease_until = now + inner.config.lease.as_millis() as i64;
        let claimed =
            store::claim(&inner.db, &inner.node_id, now, lease_until, permits.len()).await;
        let rows = match claimed {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "claiming commands failed; retrying");
                Vec::new()
            }
        };
        if rows.is_empty() {
            drop(permits);
            tokio::select! {
                _ = inner.work.notified() => {}
                _ = tokio::time::sleep(inner.config.poll) => {}
            }
            continue;
        }
        for row in rows {
            let permit = permits.pop().expect("claimed at most one row per permit");
            let span = tracing::info_span!("command", id = row.id, kind = %row.kind);
            tokio::spawn(execute(inner.clone(), row, permit, done.clone()).instrument(span));
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
    fn new(inner: &'a Inner, id: i64) -> Self {
        inner.in_flight.lock().unwrap().insert(id);
        InFlight { inner, id }
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
    let _in_flight = InFlight::new(&inner, row.id);
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
                return fail(inner, row, msg, None).await;
            }
            LockOutcome::Missing => {
                return fail(inner, row, format!("{target} does not exist"), None).await;
            }
        }
    }
    loop {
        let outcome = runner.step(row).await;
        let Transition { next, txn } = match outcome {
            Ok(t) => t,
            Err(StepError::Permanent(msg)) => return fail(inner, row, msg, None).await,
            Err(e @ (StepError::Transient(_) | StepError::Db(_))) => {
                let attempts = row.attempts + 1;
                let max = inner.config.max_attempts;
                if attempts >= max {
                    let msg = format!("gave up after {attempts} attempts: {e}");
                    return fail(inner, row, msg, None).await;
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
            Next::Spawn { step, progress, children } if children.is_empty() => Next::Continue { step, progress },
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
                let ids = store::insert(&txn, &children, Some(row.id), now).await?;
                if !store::wait_for_children(&txn, row.id, &inner.node_id, step, &progress).await?
                {
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
            Next::Fail(msg) => return fail(inner, row, msg, txn).await,
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

async fn lost_lease(row: &command::Model, txn: DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
    tracing::warn!(id = row.id, "lost the lease of the command; another core took it over");
    txn.rollback().await
}

/// Fails a command: the handler's own writes (if it returned some) or its `on_failure`
/// compensation commit together with the failure.
async fn fail(
    inner: &Arc<Inner>,
    row: &command::Model,
    msg: String,
    txn: Option<DatabaseTransaction>,
) -> Result<(), sea_orm::DbErr> {
    tracing::warn!(error = %msg, "command failed");
    let txn = match txn {
        Some(t) => t,
        None => {
            let runner = inner.runner.get().expect("runner set").clone();
            match runner.on_failure(row, &msg).await? {
                Some(t) => t,
                None => inner.db.begin().await?,
            }
        }
    };
    let f = Finish {
        id: row.id,
        status: CommandStatus::Failed,
        result: None,
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
    inner.finished.notify_waiters();
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
            if let Err(e) = res {
                tracing::warn!(error = %e, commands = ids.len(), "finishing commands failed; they will run again after their lease expires");
            }
            i = j;
        }
        batch.clear();
        inner.finished.notify_waiters();
    }
}

async fn lease_keeper(inner: Arc<Inner>) {
    let every = (inner.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let now = inner.clock.now_ms();
        let until = now + inner.config.lease.as_millis() as i64;
        let ids: Vec<i64> = inner.in_flight.lock().unwrap().iter().copied().collect();
        if let Err(e) = store::renew_leases(&inner.db, &inner.node_id, &ids, until).await {
            tracing::warn!(error = %e, "renewing leases failed");
        }
        match store::sweep(&inner.db, now).await {
            Ok(n) if n > 0 => inner.work.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping the queue failed"),
        }
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}
