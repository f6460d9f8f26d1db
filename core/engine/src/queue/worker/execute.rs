//! The executor of one command: its steps in turn, each step's writes and decision committed
//! under the command's lease, its failure, retries and finish.

use super::*;

pub(super) fn backoff(inner: &Inner, attempts: i32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).max(0) as u32);
    inner
        .config
        .backoff_base
        .saturating_mul(factor)
        .min(inner.config.backoff_max)
}

/// Marks a command as executing in this process until dropped (also on panic).
pub(super) struct InFlight<'a> {
    inner: &'a Inner,
    id: i64,
}

impl<'a> InFlight<'a> {
    /// For claimed command `row` (its lease as the claim set it).
    pub(super) fn new(inner: &'a Inner, row: &command::Model) -> Self {
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

pub(super) async fn execute(
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
pub(super) fn activity_reporter(
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

/// The longest pause of a command waiting for a lock before it looks again, ms.
const MAX_LOCK_PAUSE_MS: i64 = 250;

/// How long a command that has waited `waited` ms pauses before it tries a busy lock again:
/// an eighth of its wait so far, at least `retry` (`queue.lock_retry`), at most
/// [`MAX_LOCK_PAUSE_MS`] (or `retry` if that is longer).
fn lock_pause(waited: i64, retry: i64) -> i64 {
    (waited / 8).clamp(retry, MAX_LOCK_PAUSE_MS.max(retry))
}

pub(super) async fn run(
    inner: &Arc<Inner>,
    row: &mut command::Model,
    done: &mpsc::UnboundedSender<PlainDone>,
) -> Result<(), sea_orm::DbErr> {
    let runner = inner.runner.get().expect("runner set before start").clone();
    // However the run ends, what its steps did not commit is settled as given back.
    let _unsettled = Unsettled {
        runner: runner.clone(),
        id: row.id,
    };
    let target = Target::of(row);
    if let Some(target) = target {
        match store::lock(&inner.db, target, row.id).await? {
            LockOutcome::Acquired => {}
            LockOutcome::Busy(holder) => {
                // Mostly a child (top-level commands are not claimed while another holds their
                // target): the longer it has waited, the longer it pauses before it looks
                // again, up to `MAX_LOCK_PAUSE_MS`, so that a long wait is not a flip between
                // queued and running (and two events) every few milliseconds.
                let now = inner.clock.now_ms();
                let retry = inner.config.lock_retry.as_millis() as i64;
                let after = now + lock_pause(now - row.created_at, retry);
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
        if outcome.is_err() {
            // Nothing of the step was committed (its writes, if any, rolled back).
            runner.settled(row.id, false);
        }
        let outcome = match outcome {
            Ok(t) => Ok(t),
            Err(e) => {
                // Kept whatever comes next (each its own write, like the activity lines).
                // Only while this core holds the lease: one that lost it leaves the step
                // to the core that took it over, which runs it again and logs its own lines.
                let (e, logs) = e.unlogged();
                let now = inner.clock.now_ms();
                match store::insert_logs_leased(&inner.db, row.id, &inner.node_id, now, logs).await
                {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(
                        command = row.id,
                        "lines of a step whose lease was lost were not recorded"
                    ),
                    Err(db) => {
                        tracing::warn!(command = row.id, error = %db, "what plugins logged before a failed step was not recorded")
                    }
                }
                Err(e)
            }
        };
        let (next, txn) = match outcome {
            Ok(t) => t,
            Err(StepError::Permanent(msg)) => return fail(inner, row, msg, None, None).await,
            Err(e) => {
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
                runner.settled(row.id, true);
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
                runner.settled(row.id, true);
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

/// Settles a run's uncommitted work as given back when the run ends (see `Runner::settled`).
struct Unsettled {
    runner: Arc<dyn crate::queue::Runner>,
    id: i64,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.runner.settled(self.id, false);
    }
}

pub(super) async fn begin(
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
pub(super) async fn written<T, E>(
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

pub(super) async fn lost_lease(
    row: &command::Model,
    txn: DatabaseTransaction,
) -> Result<(), sea_orm::DbErr> {
    tracing::warn!(
        id = row.id,
        "lost the lease of the command; another core took it over"
    );
    txn.rollback().await
}

/// Fails a command: the handler's own writes (if it returned some) or its `on_failure`
/// compensation commit together with the failure (and a result, for a partial failure).
pub(super) async fn fail(
    inner: &Arc<Inner>,
    row: &command::Model,
    msg: String,
    result: Option<String>,
    txn: Option<DatabaseTransaction>,
) -> Result<(), sea_orm::DbErr> {
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

pub(super) async fn commit_finish(
    inner: &Arc<Inner>,
    row: &command::Model,
    txn: DatabaseTransaction,
    f: &Finish,
) -> Result<(), sea_orm::DbErr> {
    if !store::finish(&txn, f, Some(&inner.node_id), inner.clock.now_ms()).await? {
        return lost_lease(row, txn).await;
    }
    txn.commit().await?;
    if let Some(runner) = inner.runner.get() {
        runner.settled(row.id, true);
    }
    // Said once committed: a core that lost the command's lease (another finished it) fails
    // nothing.
    match &f.error {
        Some(error) if f.status == CommandStatus::Failed => {
            tracing::warn!(%error, "command failed");
        }
        _ => tracing::info!(status = %f.status, "command finished"),
    }
    inner.waiters.wake([row.id]);
    inner.work.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short wait retries at `lock_retry`; a long one pauses longer, up to a quarter second,
    /// so that it looks again a few dozen times over seconds, not hundreds.
    #[test]
    fn a_long_wait_for_a_lock_retries_less_often() {
        assert_eq!(lock_pause(0, 20), 20);
        assert_eq!(lock_pause(800, 20), 100);
        assert_eq!(lock_pause(60_000, 20), MAX_LOCK_PAUSE_MS);
        assert_eq!(
            lock_pause(60_000, 1000),
            1000,
            "never shorter than configured"
        );
        let (mut t, mut looks) = (0, 0);
        while t < 2_000 {
            t += lock_pause(t, 5);
            looks += 1;
        }
        assert!(looks < 60, "{looks} looks in two seconds");
    }
}
