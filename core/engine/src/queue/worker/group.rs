//! The group executor: commands claimed together that share a group key run each step as one
//! group (their targets locked together, their writes in multi-row statements).

use super::execute::{InFlight, fail, written};
use super::*;

/// How a command of a group step ended up.
pub(super) enum Settled {
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
pub(super) struct Sink<'a> {
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
pub(super) async fn execute_group(
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
