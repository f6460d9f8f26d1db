//! Claiming commands, and giving back those whose claimer went away: the queue's leases.

use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, FromQueryResult};

use super::{GROUP_CHUNK, ids_in, json_objects, sql};
use crate::entities::command;
use crate::model::CommandStatus;

/// Commands taken by `claim`, oldest first.
pub(crate) struct Claimed {
    /// The commands, now `running` under the claimer's lease.
    pub rows: Vec<command::Model>,
    /// Those whose target they held already when claimed (a bulk submission locks each new
    /// container for its create), so they need not lock it.
    pub holding: std::collections::HashSet<i64>,
}

/// Claims up to `limit` due commands for `owner`, oldest first. A top-level command waits in
/// `queued`, unpolled, while another unfinished command holds its target's lock or an older
/// top-level command on the same target is unfinished: commands on one object run in the order
/// they were submitted.
pub(crate) async fn claim<C: ConnectionTrait>(
    conn: &C,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: usize,
) -> Result<Claimed, DbErr> {
    // `+o.parent_id` keeps SQLite from looking the older commands of a target up by
    // `parent_id IS NULL` (every top-level command: quadratic with many queued creates) instead
    // of by `commands_by_target`.
    let claimable = "status = 'queued' AND run_after <= $3 \
         AND (commands.parent_id IS NOT NULL OR (\
         NOT EXISTS (SELECT 1 FROM containers t WHERE commands.target_type = 'container' \
           AND t.id = commands.target_id AND t.locked_by IS NOT NULL AND t.locked_by <> commands.id \
           AND EXISTS (SELECT 1 FROM commands h WHERE h.id = t.locked_by AND h.status IN ('queued', 'running', 'waiting'))) \
         AND NOT EXISTS (SELECT 1 FROM environments t WHERE commands.target_type = 'environment' \
           AND t.id = commands.target_id AND t.locked_by IS NOT NULL AND t.locked_by <> commands.id \
           AND EXISTS (SELECT 1 FROM commands h WHERE h.id = t.locked_by AND h.status IN ('queued', 'running', 'waiting'))) \
         AND (commands.target_id IS NULL OR NOT EXISTS (SELECT 1 FROM commands o \
           WHERE o.target_type = commands.target_type AND o.target_id = commands.target_id \
           AND o.id < commands.id AND +o.parent_id IS NULL \
           AND o.status IN ('queued', 'running', 'waiting'))))) ";
    if conn.get_database_backend() == DatabaseBackend::Sqlite {
        return claim_sqlite(conn, claimable, owner, now, lease_until, limit).await;
    }
    // The claimed ids are an array taken once (an init plan), which the update finds by its
    // primary key: with `id IN (…)` PostgreSQL joined them to a scan of the whole table.
    // Each comes back with the holder of its target's lock, read by primary key, so that those
    // already holding it (a bulk submission's creates) are not locked again.
    let text = format!(
        "UPDATE commands SET status = 'running', lease_owner = $1, lease_until = $2, \
         started_at = COALESCE(started_at, $3) \
         WHERE id = ANY(ARRAY(SELECT id FROM commands WHERE {claimable} ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)) \
         RETURNING *, {HOLDER} AS holder"
    );
    let stmt = sql(
        conn,
        &text,
        vec![
            owner.into(),
            lease_until.into(),
            now.into(),
            (limit as i64).into(),
        ],
    );
    let mut holding = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for r in conn.query_all_raw(stmt).await? {
        let row = command::Model::from_query_result(&r, "")?;
        if r.try_get::<Option<i64>>("", "holder")? == Some(row.id) {
            holding.insert(row.id);
        }
        rows.push(row);
    }
    rows.sort_by_key(|r| r.id);
    Ok(Claimed { rows, holding })
}

/// The holder of the lock of a claimed command's target (`commands` is the command's row).
const HOLDER: &str = "CASE commands.target_type \
     WHEN 'container' THEN (SELECT locked_by FROM containers t WHERE t.id = commands.target_id) \
     WHEN 'environment' THEN (SELECT locked_by FROM environments t WHERE t.id = commands.target_id) END";

/// A candidate of `claim_sqlite`: the command and the holder of its target's lock.
#[derive(serde::Deserialize)]
struct Candidate {
    #[serde(flatten)]
    row: command::Model,
    holder: Option<i64>,
}

/// `claim` on SQLite, where this core is the only claimer: the candidates come as one
/// aggregated row (a row each would cost a thread switch each), each with the holder of its
/// target's lock, then one update takes them.
async fn claim_sqlite<C: ConnectionTrait>(
    conn: &C,
    claimable: &str,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: usize,
) -> Result<Claimed, DbErr> {
    let from = format!(
        "(SELECT *, {HOLDER} AS holder FROM commands WHERE {claimable} ORDER BY id LIMIT $4)"
    );
    let values = vec![
        owner.into(),
        lease_until.into(),
        now.into(),
        (limit as i64).into(),
    ];
    let columns: Vec<&str> = COMMAND_COLUMNS.iter().copied().chain(["holder"]).collect();
    let candidates: Vec<Candidate> = json_objects(conn, &columns, &from, values).await?;
    let holding = candidates
        .iter()
        .filter(|c| c.holder == Some(c.row.id))
        .map(|c| c.row.id)
        .collect();
    let mut rows: Vec<command::Model> = candidates.into_iter().map(|c| c.row).collect();
    if rows.is_empty() {
        return Ok(Claimed { rows, holding });
    }
    let (ids, mut values) = ids_in(conn, "id", rows.iter().map(|r| r.id), 4);
    let text = format!(
        "UPDATE commands SET status = 'running', lease_owner = $1, lease_until = $2, \
         started_at = COALESCE(started_at, $3) WHERE {ids} AND status || '' = 'queued'"
    );
    values.splice(0..0, [owner.into(), lease_until.into(), now.into()]);
    let taken = conn
        .execute_raw(sql(conn, &text, values))
        .await?
        .rows_affected();
    if taken != rows.len() as u64 {
        // Not expected with one claimer; read back what this call took.
        let (ids, mut values) = ids_in(conn, "id", rows.iter().map(|r| r.id), 3);
        let from = format!(
            "commands WHERE {ids} AND status = 'running' AND lease_owner = $1 AND lease_until = $2"
        );
        values.splice(0..0, [owner.into(), lease_until.into()]);
        rows = json_objects(conn, COMMAND_COLUMNS, &from, values).await?;
    } else {
        for r in &mut rows {
            r.status = CommandStatus::Running.as_str().to_string();
            r.lease_owner = Some(owner.to_string());
            r.lease_until = Some(lease_until);
            r.started_at = r.started_at.or(Some(now));
        }
    }
    rows.sort_by_key(|r| r.id);
    Ok(Claimed { rows, holding })
}

/// The columns of `commands`, as `json_objects` names them for `command::Model`.
const COMMAND_COLUMNS: &[&str] = &[
    "id",
    "kind",
    "status",
    "target_type",
    "target_id",
    "parent_id",
    "params",
    "progress",
    "step",
    "result",
    "error",
    "waiting_on",
    "attempts",
    "run_after",
    "lease_owner",
    "lease_until",
    "requested_by",
    "created_at",
    "started_at",
    "finished_at",
    "project_id",
];

/// Queues again the commands left `running` by a previous process (all of them when `owner`
/// is `None`).
pub(crate) async fn requeue_claimed<C: ConnectionTrait>(
    conn: &C,
    owner: Option<&str>,
) -> Result<u64, DbErr> {
    let base = "UPDATE commands SET status = 'queued', lease_owner = NULL, lease_until = NULL, \
                waiting_on = 'resumed after a restart of the core' WHERE status = 'running'";
    let stmt = match owner {
        Some(o) => sql(
            conn,
            &format!("{base} AND lease_owner = $1"),
            vec![o.into()],
        ),
        None => sql(conn, base, vec![]),
    };
    Ok(conn.execute_raw(stmt).await?.rows_affected())
}

/// Extends the leases of the commands `owner` is executing (`ids`).
pub(crate) async fn renew_leases<C: ConnectionTrait>(
    conn: &C,
    owner: &str,
    ids: &[i64],
    lease_until: i64,
) -> Result<u64, DbErr> {
    let mut n = 0;
    for chunk in ids.chunks(GROUP_CHUNK) {
        let (ids, mut values) = ids_in(conn, "id", chunk.iter().copied(), 3);
        let mine = format!("lease_owner = $2 AND status = 'running' AND {ids}");
        // On PostgreSQL a row another transaction is writing is passed over: that is this
        // core's own step committing (which renews the lease itself, or ends the command) or
        // another core that took the command. Waiting for it instead, in another order than
        // its writer's, deadlocked both for a second (`deadlock_timeout`) under load.
        let text = if conn.get_database_backend() == DatabaseBackend::Postgres {
            format!(
                "UPDATE commands SET lease_until = $1 WHERE id IN \
                 (SELECT id FROM commands WHERE {mine} FOR UPDATE SKIP LOCKED)"
            )
        } else {
            format!("UPDATE commands SET lease_until = $1 WHERE {mine}")
        };
        values.splice(0..0, [lease_until.into(), owner.into()]);
        n += conn
            .execute_raw(sql(conn, &text, values))
            .await?
            .rows_affected();
    }
    Ok(n)
}

/// Queues again commands whose lease expired (their core died), and wakes parents whose
/// children all finished (a safety net for the wake-up done at each child's end).
pub(crate) async fn sweep<C: ConnectionTrait>(conn: &C, now: i64) -> Result<u64, DbErr> {
    let expired = sql(
        conn,
        "UPDATE commands SET status = 'queued', lease_owner = NULL, lease_until = NULL, \
         waiting_on = 'lease expired; its core stopped answering' \
         WHERE status = 'running' AND lease_until < $1",
        vec![now.into()],
    );
    let n = conn.execute_raw(expired).await?.rows_affected();
    let parents = sql(
        conn,
        "UPDATE commands SET status = 'queued', waiting_on = NULL, run_after = $1 \
         WHERE status = 'waiting' AND NOT EXISTS (SELECT 1 FROM commands c \
         WHERE c.parent_id = commands.id AND c.status NOT IN ('succeeded', 'failed', 'cancelled'))",
        vec![now.into()],
    );
    Ok(n + conn.execute_raw(parents).await?.rows_affected())
}
