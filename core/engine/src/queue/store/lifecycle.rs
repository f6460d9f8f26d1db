//! Writes of one command as it runs: its target's lock, its steps, waiting for children, its end.

use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, TransactionTrait, Value};

use super::{GROUP_CHUNK, get, ids_in, sql, to_api};
use crate::entities::command;
use crate::model::{Command, CommandId, CommandStatus};
use crate::queue::{QueueError, Target};

/// Deepest chain of child commands (hook actions asking for more actions) the queue follows.
pub(crate) const MAX_NESTING: usize = 32;

/// Outcome of trying to lock a target.
pub(crate) enum LockOutcome {
    Acquired,
    Busy(i64),
    Missing,
    TooDeep,
}

/// Locks `target` for command `cmd` (idempotent for the holder).
pub(crate) async fn lock<C: ConnectionTrait>(
    conn: &C,
    target: Target,
    cmd: i64,
) -> Result<LockOutcome, DbErr> {
    let table = target.table();
    let stmt = sql(
        conn,
        &format!(
            "UPDATE {table} SET locked_by = $1 WHERE id = $2 AND (locked_by IS NULL OR locked_by = $1)"
        ),
        vec![cmd.into(), target.id().into()],
    );
    if conn.execute_raw(stmt).await?.rows_affected() == 1 {
        return Ok(LockOutcome::Acquired);
    }
    let row = conn
        .query_one_raw(sql(
            conn,
            &format!("SELECT locked_by FROM {table} WHERE id = $1"),
            vec![target.id().into()],
        ))
        .await?;
    let Some(row) = row else {
        return Ok(LockOutcome::Missing);
    };
    let holder: Option<i64> = row.try_get("", "locked_by")?;
    let Some(holder) = holder else {
        return Ok(LockOutcome::Busy(0));
    };
    // A child acts under the lock of an ancestor (an environment add that a hook asked for
    // while its parent holds the environment).
    let mut ancestor = get(conn, cmd).await?.and_then(|c| c.parent_id);
    let mut depth = 0;
    while let Some(a) = ancestor {
        if a == holder {
            return Ok(LockOutcome::Acquired);
        }
        depth += 1;
        if depth > MAX_NESTING {
            return Ok(LockOutcome::TooDeep);
        }
        ancestor = get(conn, a).await?.and_then(|c| c.parent_id);
    }
    // A lock whose holder finished is stale (it cannot happen through the queue, which releases
    // locks in the finishing transaction, but a manual edit could leave one): take it over.
    let holder_row = get(conn, holder).await?;
    let stale = holder_row.is_none_or(|h| {
        h.status
            .parse::<CommandStatus>()
            .map(|s| s.is_terminal())
            .unwrap_or(true)
    });
    if stale {
        let stmt = sql(
            conn,
            &format!("UPDATE {table} SET locked_by = $1 WHERE id = $2 AND locked_by = $3"),
            vec![cmd.into(), target.id().into(), holder.into()],
        );
        if conn.execute_raw(stmt).await?.rows_affected() == 1 {
            return Ok(LockOutcome::Acquired);
        }
    }
    Ok(LockOutcome::Busy(holder))
}

/// Releases `target` if `cmd` holds it.
pub(crate) async fn unlock<C: ConnectionTrait>(
    conn: &C,
    target: Target,
    cmd: i64,
) -> Result<(), DbErr> {
    let stmt = sql(
        conn,
        &format!(
            "UPDATE {} SET locked_by = NULL WHERE id = $1 AND locked_by = $2",
            target.table()
        ),
        vec![target.id().into(), cmd.into()],
    );
    conn.execute_raw(stmt).await?;
    Ok(())
}

/// Persists a step (fenced); false when the lease was lost.
pub(crate) async fn advance<C: ConnectionTrait>(
    conn: &C,
    id: i64,
    owner: &str,
    step: i32,
    progress: &serde_json::Value,
    lease_until: i64,
) -> Result<bool, DbErr> {
    let stmt = sql(
        conn,
        "UPDATE commands SET step = $1, progress = $2, lease_until = $3 \
         WHERE id = $4 AND lease_owner = $5 AND status = 'running'",
        vec![
            step.into(),
            progress.to_string().into(),
            lease_until.into(),
            id.into(),
            owner.into(),
        ],
    );
    Ok(conn.execute_raw(stmt).await?.rows_affected() == 1)
}

/// Puts a parent to sleep until its children finish (fenced); false when the lease was lost.
pub(crate) async fn wait_for_children<C: ConnectionTrait>(
    conn: &C,
    id: i64,
    owner: &str,
    step: i32,
    progress: &serde_json::Value,
) -> Result<bool, DbErr> {
    let stmt = sql(
        conn,
        "UPDATE commands SET status = 'waiting', step = $1, progress = $2, \
         waiting_on = 'children', lease_owner = NULL, lease_until = NULL \
         WHERE id = $3 AND lease_owner = $4 AND status = 'running'",
        vec![
            step.into(),
            progress.to_string().into(),
            id.into(),
            owner.into(),
        ],
    );
    Ok(conn.execute_raw(stmt).await?.rows_affected() == 1)
}

/// Queues a claimed command again because its target's lock was busy. A command runs steps only
/// while holding its lock, so if it has no progress it never started and stays cancellable;
/// fenced.
pub(crate) async fn requeue_unstarted<C: ConnectionTrait>(
    conn: &C,
    row: &command::Model,
    owner: &str,
    run_after: i64,
    waiting_on: &str,
) -> Result<bool, DbErr> {
    let never_started = row.step == 0 && row.attempts == 0;
    let stmt = sql(
        conn,
        &format!(
            "UPDATE commands SET status = 'queued', lease_owner = NULL, lease_until = NULL, \
             run_after = $1, waiting_on = $2{} WHERE id = $3 AND lease_owner = $4 AND status = 'running'",
            if never_started {
                ", started_at = NULL"
            } else {
                ""
            }
        ),
        vec![
            run_after.into(),
            waiting_on.into(),
            row.id.into(),
            owner.into(),
        ],
    );
    Ok(conn.execute_raw(stmt).await?.rows_affected() == 1)
}

/// Queues a claimed command again (lock busy, retry after backoff); fenced.
pub(crate) async fn requeue<C: ConnectionTrait>(
    conn: &C,
    id: i64,
    owner: &str,
    run_after: i64,
    attempts: i32,
    waiting_on: &str,
) -> Result<bool, DbErr> {
    let stmt = sql(
        conn,
        "UPDATE commands SET status = 'queued', lease_owner = NULL, lease_until = NULL, \
         run_after = $1, attempts = $2, waiting_on = $3 \
         WHERE id = $4 AND lease_owner = $5 AND status = 'running'",
        vec![
            run_after.into(),
            attempts.into(),
            waiting_on.into(),
            id.into(),
            owner.into(),
        ],
    );
    Ok(conn.execute_raw(stmt).await?.rows_affected() == 1)
}

/// The end of a command.
pub(crate) struct Finish {
    pub id: i64,
    pub status: CommandStatus,
    pub result: Option<String>,
    pub error: Option<String>,
    pub target: Option<Target>,
    pub parent: Option<i64>,
}

/// Writes a terminal status, releases the target lock and wakes the parent, in `conn` (a
/// transaction). `owner` fences the write (None for cancellation of a queued command).
pub(crate) async fn finish<C: ConnectionTrait>(
    conn: &C,
    f: &Finish,
    owner: Option<&str>,
    now: i64,
) -> Result<bool, DbErr> {
    let mut values: Vec<Value> = vec![
        f.status.as_str().into(),
        f.result.clone().into(),
        f.error.clone().into(),
        now.into(),
        f.id.into(),
    ];
    let fence = match owner {
        Some(o) => {
            values.push(o.into());
            "lease_owner = $6 AND status = 'running'"
        }
        // Cancellation: only a command that never started (checked in the same statement).
        None => "status = 'queued' AND started_at IS NULL AND step = 0 AND attempts = 0",
    };
    let stmt = sql(
        conn,
        &format!(
            "UPDATE commands SET status = $1, result = $2, error = $3, finished_at = $4, \
             lease_owner = NULL, lease_until = NULL, waiting_on = NULL WHERE id = $5 AND {fence}"
        ),
        values,
    );
    if conn.execute_raw(stmt).await?.rows_affected() != 1 {
        return Ok(false);
    }
    if let Some(target) = f.target {
        unlock(conn, target, f.id).await?;
    }
    if let Some(parent) = f.parent {
        wake_parent(conn, parent, now).await?;
    }
    Ok(true)
}

/// Queues `parent` again if it waits and all its children are terminal.
pub(crate) async fn wake_parent<C: ConnectionTrait>(
    conn: &C,
    parent: i64,
    now: i64,
) -> Result<(), DbErr> {
    if conn.get_database_backend() == DatabaseBackend::Postgres {
        // Serialize siblings finishing at once, so the last one sees the others' status.
        conn.execute_raw(sql(
            conn,
            "SELECT id FROM commands WHERE id = $1 FOR UPDATE",
            vec![parent.into()],
        ))
        .await?;
    }
    let stmt = sql(
        conn,
        "UPDATE commands SET status = 'queued', waiting_on = NULL, run_after = $1 \
         WHERE id = $2 AND status = 'waiting' AND NOT EXISTS (SELECT 1 FROM commands c \
         WHERE c.parent_id = $2 AND c.status NOT IN ('succeeded', 'failed', 'cancelled'))",
        vec![now.into(), parent.into()],
    );
    conn.execute_raw(stmt).await?;
    Ok(())
}

/// Marks many commands without target or parent succeeded in one statement.
pub(crate) async fn finish_plain_batch<C: ConnectionTrait>(
    conn: &C,
    ids: &[i64],
    owner: &str,
    result: &str,
    now: i64,
) -> Result<(), DbErr> {
    for chunk in ids.chunks(GROUP_CHUNK) {
        let (ids, mut values) = ids_in(conn, "id", chunk.iter().copied(), 4);
        let text = format!(
            "UPDATE commands SET status = 'succeeded', result = $1, finished_at = $2, \
             lease_owner = NULL, lease_until = NULL, waiting_on = NULL \
             WHERE {ids} AND lease_owner = $3 AND status = 'running'"
        );
        values.splice(0..0, [result.into(), now.into(), owner.into()]);
        conn.execute_raw(sql(conn, &text, values)).await?;
    }
    Ok(())
}

/// Cancels a command that has not started.
#[expect(
    clippy::disallowed_methods,
    reason = "database work only: every driver or plugin call happens before it"
)]
pub(crate) async fn cancel(
    conn: &sea_orm::DatabaseConnection,
    id: i64,
    now: i64,
) -> Result<Command, QueueError> {
    let txn = conn.begin().await?;
    let row = get(&txn, id)
        .await?
        .ok_or(QueueError::NotFound(CommandId(id)))?;
    let status: CommandStatus = row
        .status
        .parse()
        .map_err(|e| QueueError::Unreadable(format!("command {id}: unreadable status: {e}")))?;
    let started = row.step > 0 || row.attempts > 0 || row.started_at.is_some();
    if status != CommandStatus::Queued || started {
        return Err(QueueError::NotCancellable {
            id: CommandId(id),
            status,
            detail: if started && status == CommandStatus::Queued {
                format!(
                    " but already started (step {}, {} retries)",
                    row.step, row.attempts
                )
            } else {
                String::new()
            },
        });
    }
    let f = Finish {
        id,
        status: CommandStatus::Cancelled,
        result: None,
        error: Some("cancelled by request".into()),
        target: Target::of(&row),
        parent: row.parent_id,
    };
    if !finish(&txn, &f, None, now).await? {
        return Err(QueueError::NotCancellable {
            id: CommandId(id),
            status: CommandStatus::Running,
            detail: String::new(),
        });
    }
    txn.commit().await?;
    to_api(
        &get(conn, id)
            .await?
            .ok_or(QueueError::NotFound(CommandId(id)))?,
    )
}
