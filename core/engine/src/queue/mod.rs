//! The persisted command queue.
//!
//! Every command is a row of `commands` before it runs. A dispatcher claims queued rows in
//! batches under a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so several cores can share
//! one queue), and at most `workers` commands execute at once. A command runs as a sequence of
//! steps; each step's outcome is committed together with the step number and progress, so after
//! a crash the command resumes from its last committed step.
//!
//! Invariants:
//! - A command only changes rows while it holds its lease (`lease_owner` = this core); every
//!   write to its row is fenced on that.
//! - A command with a target (a container or an environment) holds the target's lock
//!   (`locked_by`) from its first step until it finishes; a second command on the same target
//!   waits in `queued` until the lock is free. Lock release, the final status and waking the
//!   parent are one transaction.
//! - A parent in `waiting` is queued again exactly when its last child reaches a terminal status.
//! - Only commands that never started (step 0, no attempts) can be cancelled.

#[doc(hidden)]
pub mod store;
mod waiters;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};
use serde_json::Value;
use tokio::sync::Notify;

pub use store::CommandFilter;
pub use waiters::WaitLimits;

/// How often a waiting request re-reads its command besides being woken by its end: a safety
/// net for commands another core ends.
pub const WAIT_SAFETY_NET: Duration = Duration::from_secs(2);
/// How long `stop` waits at least for the lease keeper to end the renewal or sweep it is
/// doing (one statement each; a database that does not answer is given up on).
const KEEPER_END: Duration = Duration::from_secs(5);

use crate::entities::command;
use crate::model::{Command, CommandId, CommandStatus};

/// Tuning of the queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Commands executing at once.
    pub workers: usize,
    /// How long a claim is valid without renewal.
    pub lease: Duration,
    /// Delay before a command retries a busy lock.
    pub lock_retry: Duration,
    /// First retry delay after a transient error; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Attempts before a transient error fails the command.
    pub max_attempts: i32,
    /// Most commands claimed in one statement (a claim takes at most half the workers).
    pub claim_batch: usize,
    /// Poll interval when idle (for work from other cores and for due retries).
    pub poll: Duration,
    /// Caps of long-polls on commands.
    pub waits: WaitLimits,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            workers: 256,
            lease: Duration::from_secs(2),
            lock_retry: Duration::from_millis(20),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_attempts: 5,
            claim_batch: 256,
            poll: Duration::from_millis(50),
            waits: WaitLimits::default(),
        }
    }
}

/// Source of wall-clock time in milliseconds, injectable for tests.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::model::now_ms()
    }
}

/// A command to persist.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// The project it belongs to; `None`: its target's, or else its parent's, or else none
    /// (a fleet-wide command).
    pub project: Option<i64>,
    /// What it does.
    pub kind: crate::model::CommandKind,
    /// Target whose lock the command holds while it runs.
    pub target: Option<Target>,
    /// Parameters (JSON).
    pub params: Value,
    /// Who asked for it (`anonymous` or a user).
    pub requested_by: String,
}

/// The object a command locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A container row.
    Container(i64),
    /// An environment row.
    Environment(i64),
}

impl Target {
    fn table(&self) -> &'static str {
        match self {
            Target::Container(_) => "containers",
            Target::Environment(_) => "environments",
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Target::Container(_) => "container",
            Target::Environment(_) => "environment",
        }
    }
    fn id(&self) -> i64 {
        match self {
            Target::Container(id) | Target::Environment(id) => *id,
        }
    }
    /// The target of a stored command.
    pub fn of(row: &command::Model) -> Option<Target> {
        match (row.target_type.as_deref(), row.target_id) {
            (Some("container"), Some(id)) => Some(Target::Container(id)),
            (Some("environment"), Some(id)) => Some(Target::Environment(id)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.type_name(), self.id())
    }
}

/// What a step decided.
pub enum Next {
    /// Commit `progress` as step `step` and run that step now.
    Continue {
        /// The next step.
        step: i32,
        /// Progress to persist.
        progress: Value,
    },
    /// Persist `children` and wait; resume at `step` when all have finished.
    Spawn {
        /// Step to resume at.
        step: i32,
        /// Progress to persist.
        progress: Value,
        /// Child commands.
        children: Vec<NewCommand>,
    },
    /// Succeeded with a result.
    Done(Value),
    /// Failed with a message for the user.
    Fail(String),
    /// Failed part-way (a batch that made some of what it was asked): the step's writes commit
    /// (what was made stays), the command ends `failed` with `error` and keeps `result`.
    Partial {
        /// What was done and what was not.
        result: Value,
        /// One line for the user.
        error: String,
    },
}

/// The writes of a step, run by the queue inside the one transaction it opens for the step and
/// commits with the step's decision; they return that decision. A step makes its driver and
/// plugin calls first, then hands over its writes: no transaction is open during I/O, and the
/// writes themselves only reach the database through the transaction they are given.
pub type StepWrites = Box<
    dyn for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<Next, StepError>> + Send,
>;

/// A step's decision, or the writes that make it, committed together.
pub enum Transition {
    /// A decision without writes.
    Bare(Next),
    /// Writes that end in the decision, committed with it. When they fail, nothing of them is
    /// committed and their error is the step's.
    Commit(StepWrites),
}

impl Transition {
    /// A decision without writes.
    pub fn bare(next: Next) -> Self {
        Transition::Bare(next)
    }

    /// A decision made by `writes`, run in the step's transaction.
    pub fn commit<F>(writes: F) -> Self
    where
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<Next, StepError>>
            + Send
            + 'static,
    {
        Transition::Commit(Box::new(writes))
    }
}

/// What the writes of a group step decided (see `GroupSink::commit`).
pub enum GroupWrite {
    /// Commit the writes with these decisions (command index in the group, decision).
    Commit(Vec<(usize, GroupNext)>),
    /// Commit nothing: the writes found the database not as the step expected.
    Rollback,
}

/// The writes of a group step, run in a transaction the queue opens (see `StepWrites`).
pub type GroupWrites = Box<
    dyn for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<GroupWrite, StepError>>
        + Send,
>;

/// What became of a group step's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupCommit {
    /// Committed with their decisions.
    Committed,
    /// The writes asked to commit nothing.
    RolledBack,
    /// The queue could not commit them (a lease was lost): nothing of the call is committed
    /// and those commands run alone instead.
    LeaseLost,
}

/// The writes that undo a failed command, committed with its failure (see `Runner::on_failure`).
pub type UndoWrites =
    Box<dyn for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<(), DbErr>> + Send>;

/// What a command decided in a group step (see `Runner::step_group`).
pub enum GroupNext {
    /// Commit `progress` as step `step`; the command goes on.
    Continue {
        /// The next step.
        step: i32,
        /// Progress to persist.
        progress: Value,
    },
    /// Goes on to step `step` with `progress` in this run only: the command's row is held
    /// under its lease until the commit (fenced like `Continue`) but not written, so it still
    /// says the step before. For a step whose own writes record what it did, so that running
    /// it again finds them instead of doing it twice; it spares a write of every command. A
    /// command the group finishes is recorded with its last step and progress; one that goes
    /// on alone ends with the step its row last recorded.
    Carry {
        /// The next step.
        step: i32,
        /// Progress of the next step, kept in memory.
        progress: Value,
    },
    /// Succeeded with a result.
    Done {
        /// The command's result.
        result: Value,
        /// The step's transaction released the command's target itself (in a write it makes to
        /// the target anyway), so the queue does not.
        released: bool,
    },
}

/// Where a group step commits its commands' decisions, as often as it likes: each call is one
/// transaction holding the step's writes for the listed commands and their decisions. A command
/// committed at a new step may be committed again (its next step); one that ended may not.
#[async_trait]
pub trait GroupSink: Send {
    /// Runs `writes` in one transaction and commits it together with the decisions they return
    /// for the commands at those indexes of the group. When the queue cannot commit them (a
    /// lease was lost), nothing of the call is committed and those commands run alone instead.
    async fn commit(&mut self, writes: GroupWrites) -> Result<GroupCommit, StepError>;
    /// Fails the command at `index` of the group with `message`, as a step failing alone would
    /// (the runner's `on_failure` undoes what it can); for errors a retry would only repeat.
    fn fail(&mut self, index: usize, message: String);
}

/// Why a step did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Retry later with backoff.
    #[error("{0}")]
    Transient(String),
    /// Fail the command with this message.
    #[error("{0}")]
    Permanent(String),
    /// The database failed; retried like a transient error.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// `error`, with the lines plugins logged in the failed step (by container id, 0 for none):
    /// they are kept in the command's log whatever comes of the step (a retry or a failure),
    /// where the step's other writes are not.
    #[error("{error}")]
    Logged {
        /// The failure.
        error: Box<StepError>,
        /// The lines.
        logs: Vec<(i64, crate::types::LogLine)>,
    },
}

impl StepError {
    /// This error with `logs` to keep after those it keeps already (itself when there are
    /// none): never nested, so `unlogged` takes one layer.
    pub fn logged(self, logs: Vec<(i64, crate::types::LogLine)>) -> StepError {
        match (self, logs.is_empty()) {
            (e, true) => e,
            (
                StepError::Logged {
                    error,
                    logs: mut kept,
                },
                false,
            ) => {
                kept.extend(logs);
                StepError::Logged { error, logs: kept }
            }
            (e, false) => StepError::Logged {
                error: Box::new(e),
                logs,
            },
        }
    }

    /// The failure itself, and the lines to keep.
    pub(crate) fn unlogged(self) -> (StepError, Vec<(i64, crate::types::LogLine)>) {
        match self {
            StepError::Logged { error, logs } => (*error, logs),
            e => (e, Vec::new()),
        }
    }
}

/// Executes the steps of commands; implemented by the command handlers of the core.
///
/// A runner may also run one step of many commands at once (`group_key`, `step_group`): the
/// queue then locks their targets, persists their decisions and finishes them with a few
/// multi-row statements instead of a dozen statements each. Grouping is only an optimisation:
/// every command a group step does not commit runs alone, through `step`, from the step it
/// was at.
#[async_trait]
pub trait Runner: Send + Sync + 'static {
    /// Runs step `cmd.step` of `cmd` (its target already locked).
    async fn step(&self, cmd: &command::Model) -> Result<Transition, StepError>;
    /// Commands with the same key at their current step may run that step together through
    /// `step_group` (default: none may).
    fn group_key(&self, _cmd: &command::Model) -> Option<String> {
        None
    }
    /// Runs the current step of commands sharing a group key (their targets already locked),
    /// committing through `sink`; it may carry a command it committed at a new step on through
    /// that step, committing it again. The commands not committed when this returns run alone (default: all of
    /// them), those committed at a new step go on from it.
    async fn step_group(
        &self,
        _cmds: &[command::Model],
        _sink: &mut dyn GroupSink,
    ) -> Result<(), StepError> {
        Ok(())
    }
    /// The transaction of a step of command `id` ended: `committed` (the step's writes, or a
    /// failure committed with them), or not (rolled back, or the run ended before committing
    /// what the step decided). Called after each commit of the command, after a step that
    /// failed before committing, and once more with `false` when a run ends (default: nothing
    /// to do).
    fn settled(&self, _id: i64, _committed: bool) {}
    /// Undoes what it can of a failing command (its driver calls first); the writes it returns
    /// commit with the failure (default: nothing to undo).
    async fn on_failure(
        &self,
        _cmd: &command::Model,
        _error: &str,
    ) -> Result<Option<UndoWrites>, DbErr> {
        Ok(None)
    }
}

/// Errors of queue operations requested by users.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No command has this id.
    #[error("command {0} does not exist")]
    NotFound(CommandId),
    /// The command is past the point where it could be cancelled.
    #[error(
        "command {id} {}{detail}; only queued commands that have not started can be cancelled", status.predicate()
    )]
    NotCancellable {
        /// The command.
        id: CommandId,
        /// Its status.
        status: CommandStatus,
        /// Extra detail.
        detail: String,
    },
    /// The object to lock does not exist.
    #[error("{0} does not exist")]
    TargetMissing(String),
    /// A stored command this core cannot read (written by a newer core, or damaged); the
    /// message names it and what was wrong.
    #[error("{0}")]
    Unreadable(String),
    /// Too many requests wait on commands (for this client or in all).
    #[error("{0}")]
    TooManyWaits(String),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

pub(crate) struct Inner {
    db: DatabaseConnection,
    node_id: String,
    config: QueueConfig,
    clock: Arc<dyn Clock>,
    work: Notify,
    /// Long-polls, woken by their command's end.
    waiters: waiters::Waiters,
    stopping: AtomicBool,
    /// Command steps committed by group steps.
    grouped: std::sync::atomic::AtomicU64,
    /// Sweeps of expired leases done (each third of a lease).
    sweeps: std::sync::atomic::AtomicU64,
    /// Claimed commands left to the task of this process still executing them.
    kept: std::sync::atomic::AtomicU64,
    /// Notified each time `kept` grows.
    kept_more: tokio::sync::Notify,
    slots: Arc<tokio::sync::Semaphore>,
    /// Commands this process is executing right now, each with the end of the lease it was
    /// claimed with: the only ones whose leases it renews.
    in_flight: std::sync::Mutex<std::collections::HashMap<i64, i64>>,
    runner: std::sync::OnceLock<Arc<dyn Runner>>,
    recorder: Arc<crate::metrics::Recorder>,
    /// Where the lease keeper connects when it runs on a thread of its own, and the dispatcher
    /// claims (`Queue::connect_apart`).
    lease_db: std::sync::OnceLock<sea_orm::ConnectOptions>,
    /// Set by `stop` once the commands ended (or its grace passed): the lease keeper ends.
    halt: tokio::sync::watch::Sender<bool>,
    /// Held by the lease keeper while it runs, so that `stop` can wait for its end.
    keeper: tokio::sync::Mutex<()>,
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl Queue {
    /// A queue on `db`, claiming under the name `node_id`.
    pub fn new(
        db: DatabaseConnection,
        node_id: String,
        config: QueueConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_recorder(db, node_id, config, clock, Default::default())
    }

    /// `new`, recording its measurements (and those of the core around it) in `recorder`.
    pub fn with_recorder(
        db: DatabaseConnection,
        node_id: String,
        config: QueueConfig,
        clock: Arc<dyn Clock>,
        recorder: Arc<crate::metrics::Recorder>,
    ) -> Self {
        Queue {
            inner: Arc::new(Inner {
                db,
                node_id,
                config: config.clone(),
                clock,
                work: Notify::new(),
                waiters: Default::default(),
                stopping: AtomicBool::new(false),
                grouped: Default::default(),
                sweeps: Default::default(),
                kept: Default::default(),
                kept_more: tokio::sync::Notify::new(),
                slots: Arc::new(tokio::sync::Semaphore::new(config.workers.max(1))),
                in_flight: Default::default(),
                runner: std::sync::OnceLock::new(),
                recorder,
                lease_db: std::sync::OnceLock::new(),
                halt: tokio::sync::watch::Sender::new(false),
                keeper: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Renews leases (and sweeps expired ones) on a thread and a database connection of its
    /// own, opened with `opt`, instead of a task beside the commands: the renewals then keep
    /// time while this process's runtime is saturated. The dispatcher claims on another
    /// connection opened with `opt`, so that a claim does not queue for a connection behind
    /// the statements of thousands of running commands. Call before `start`; a second call
    /// is ignored.
    pub fn connect_apart(&self, opt: sea_orm::ConnectOptions) {
        let _ = self.inner.lease_db.set(opt);
    }

    /// Where the core's measurements go (`GET /metrics`).
    pub fn recorder(&self) -> &Arc<crate::metrics::Recorder> {
        &self.inner.recorder
    }

    /// The name this core claims commands under.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// Current time of the queue's clock.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Persists commands in `conn` (usually a transaction that also creates the objects they
    /// act on); call `wake` after committing.
    pub async fn enqueue_in<C: sea_orm::ConnectionTrait>(
        &self,
        conn: &C,
        commands: Vec<NewCommand>,
        parent: Option<i64>,
    ) -> Result<Vec<i64>, DbErr> {
        store::insert(conn, &commands, parent, self.now_ms(), None).await
    }

    /// Like `enqueue_in`, with ids for the commands (one each, taken from the commands'
    /// sequence by `store::next_ids`), so that rows written before them can name them.
    pub(crate) async fn enqueue_numbered<C: sea_orm::ConnectionTrait>(
        &self,
        conn: &C,
        commands: Vec<NewCommand>,
        ids: &[i64],
    ) -> Result<Vec<i64>, DbErr> {
        store::insert(conn, &commands, None, self.now_ms(), Some(ids)).await
    }

    /// Persists one command and wakes the workers.
    pub async fn enqueue(&self, command: NewCommand) -> Result<CommandId, DbErr> {
        let ids = store::insert(&self.inner.db, &[command], None, self.now_ms(), None).await?;
        self.wake();
        Ok(CommandId(ids[0]))
    }

    /// Command steps committed by group steps since the queue was made (see
    /// `Runner::step_group`).
    pub fn grouped_steps(&self) -> u64 {
        self.inner.grouped.load(Ordering::Relaxed)
    }

    /// Sweeps of expired leases this queue has done since it started (one every third of a
    /// lease): a test waits for some to know another core had its chance to take a command.
    pub fn sweeps(&self) -> u64 {
        self.inner.sweeps.load(Ordering::Relaxed)
    }

    /// Commands this queue claimed while one of its own tasks was still executing them (their
    /// lease was renewed late, e.g. on a saturated machine, and a sweep put them back): left to
    /// that task instead of run a second time.
    pub fn kept_in_flight(&self) -> u64 {
        self.inner.kept.load(Ordering::Relaxed)
    }

    /// Returns once [`Queue::kept_in_flight`] has reached `n`.
    pub async fn kept_in_flight_reaches(&self, n: u64) {
        loop {
            let more = self.inner.kept_more.notified();
            tokio::pin!(more);
            // Registered before the check, so an increment between the two is not missed.
            more.as_mut().enable();
            if self.kept_in_flight() >= n {
                return;
            }
            more.await;
        }
    }

    /// Tells the dispatcher that work may be waiting.
    pub fn wake(&self) {
        self.inner.work.notify_one();
    }

    /// One command.
    pub async fn get(&self, id: CommandId) -> Result<Command, QueueError> {
        let id = id.0;
        let row = store::get(&self.inner.db, id)
            .await?
            .ok_or(QueueError::NotFound(CommandId(id)))?;
        let mut view = store::to_api(&row)?;
        view.log = store::logs(&self.inner.db, id).await?;
        Ok(view)
    }

    /// Commands matching `filter`, newest first.
    pub async fn list(&self, filter: &CommandFilter) -> Result<Vec<Command>, QueueError> {
        store::list(&self.inner.db, filter)
            .await?
            .iter()
            .map(store::to_api)
            .collect()
    }

    /// Locks `target` for command `cmd` (the manager's `get`); true when acquired or already
    /// held by `cmd`, false when another command holds it.
    pub async fn lock(&self, target: Target, cmd: CommandId) -> Result<bool, QueueError> {
        let cmd = cmd.0;
        match store::lock(&self.inner.db, target, cmd).await? {
            store::LockOutcome::Acquired => Ok(true),
            store::LockOutcome::Busy(_) | store::LockOutcome::TooDeep => Ok(false),
            store::LockOutcome::Missing => Err(QueueError::TargetMissing(target.to_string())),
        }
    }

    /// Releases `target` if `cmd` holds it (the manager's `put`).
    pub async fn unlock(&self, target: Target, cmd: CommandId) -> Result<(), QueueError> {
        let cmd = cmd.0;
        store::unlock(&self.inner.db, target, cmd).await?;
        self.wake();
        Ok(())
    }

    /// Child commands of `parent`, oldest first.
    pub async fn children(&self, parent: i64) -> Result<Vec<command::Model>, DbErr> {
        store::children(&self.inner.db, parent).await
    }

    /// Cancels a command that has not started.
    pub async fn cancel(&self, id: CommandId) -> Result<Command, QueueError> {
        let id = id.0;
        let cmd = store::cancel(&self.inner.db, id, self.now_ms()).await?;
        self.inner.waiters.wake([id]);
        self.wake();
        Ok(cmd)
    }

    /// Waits until the command reaches a terminal status or `timeout` passes; returns its
    /// latest state either way (the core's own waits: not capped).
    pub async fn wait(&self, id: CommandId, timeout: Duration) -> Result<Command, QueueError> {
        self.wait_as(id, timeout, None).await
    }

    /// `wait` for a client (user name or address), counted against the caps of long-polls.
    /// The wait is woken by the command's end; it re-reads the command every
    /// `WAIT_SAFETY_NET` besides, for commands another core ends.
    pub async fn wait_as(
        &self,
        id: CommandId,
        timeout: Duration,
        client: Option<&str>,
    ) -> Result<Command, QueueError> {
        let id = id.0;
        let deadline = tokio::time::Instant::now() + timeout;
        let me = self
            .inner
            .waiters
            .register(id, client, self.inner.config.waits)?;
        loop {
            let ended = me.notify.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let cmd = self.get(CommandId(id)).await?;
            if cmd.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(cmd);
            }
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep(WAIT_SAFETY_NET) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Long-polls waiting now.
    pub fn waiting(&self) -> usize {
        self.inner.waiters.count()
    }

    /// Starts the dispatcher and its helpers with `runner` executing steps.
    ///
    /// On start, commands this node had claimed before a crash (same `node_id`) are queued again
    /// at once; with `reclaim_all`, every running command is (single-core databases like SQLite).
    pub async fn start(&self, runner: Arc<dyn Runner>, reclaim_all: bool) -> Result<(), DbErr> {
        if self.inner.runner.set(runner).is_err() {
            return Ok(());
        }
        let owner = if reclaim_all {
            None
        } else {
            Some(self.inner.node_id.as_str())
        };
        let n = store::requeue_claimed(&self.inner.db, owner).await?;
        if n > 0 {
            tracing::info!(
                commands = n,
                "resuming commands that were running before a restart"
            );
        }
        worker::spawn(self.inner.clone());
        Ok(())
    }

    /// Stops claiming new commands and waits up to `grace` for in-flight steps; whatever is
    /// still running then resumes from its last committed step after a restart.
    pub async fn stop(&self, grace: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.work.notify_waiters();
        let all = self.inner.config.workers.max(1) as u32;
        let _ = tokio::time::timeout(grace, self.inner.slots.acquire_many(all)).await;
        // The leases of the commands still running were renewed until now; the keeper ends
        // (after the renewal or sweep it may be doing), so that it renews and sweeps nothing
        // once `stop` returned (a command that outlived the grace may still write).
        self.inner.halt.send_replace(true);
        let _ = tokio::time::timeout(grace.max(KEEPER_END), self.inner.keeper.lock()).await;
    }

    /// Whether the lease keeper runs (it starts with `start` and ends with `stop`).
    pub fn keeper_running(&self) -> bool {
        self.inner.keeper.try_lock().is_err()
    }
}
