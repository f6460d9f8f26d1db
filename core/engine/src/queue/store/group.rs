//! Writes of many commands at once, as groups of the same step run together.

use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, Value};

use super::{GROUP_CHUNK, ids_in, json_rows, rows_source, sql};
use crate::queue::Target;

/// Locks many targets of one table, each for its command (`(target id, command id)`), like
/// `lock` without its slow paths; returns the ids of the targets now held by their command
/// (those locked before, by a bulk submission, included).
pub(crate) async fn lock_many<C: ConnectionTrait>(
    conn: &C,
    table: &str,
    pairs: &[(i64, i64)],
) -> Result<std::collections::HashSet<i64>, DbErr> {
    let mut locked = 0;
    for chunk in pairs.chunks(GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(t, c)| vec![(*t).into(), (*c).into()])
            .collect();
        let (v, values) = rows_source(conn, &["BIGINT", "BIGINT"], rows, 1);
        let text = format!(
            "UPDATE {table} SET locked_by = v.column2 FROM {v} WHERE {table}.id = v.column1 AND +{table}.locked_by IS NULL"
        );
        locked += conn
            .execute_raw(sql(conn, &text, values))
            .await?
            .rows_affected();
    }
    if locked == pairs.len() as u64 {
        return Ok(pairs.iter().map(|p| p.0).collect());
    }
    // Some were held already (by their command, or busy) or are missing: read who holds what.
    let wanted: std::collections::HashMap<i64, i64> = pairs.iter().copied().collect();
    let mut held = std::collections::HashSet::new();
    for chunk in pairs.chunks(GROUP_CHUNK) {
        let (ids, values) = ids_in(conn, "id", chunk.iter().map(|p| p.0), 1);
        let holders: Vec<(i64, Option<i64>)> = json_rows(
            conn,
            "id, locked_by",
            &format!("{table} WHERE {ids}"),
            values,
        )
        .await?;
        held.extend(
            holders
                .into_iter()
                .filter(|(id, h)| h.is_some() && *h == wanted.get(id).copied())
                .map(|(id, _)| id),
        );
    }
    Ok(held)
}

/// The fence of the group writes beyond the lease owner. On PostgreSQL a leased command is
/// running by construction (every write that moves a command out of `running` clears its
/// lease, and the `commands_leased_only_running` constraint of `m0021` refuses any other), so the
/// status is not named: naming it let stale statistics (no command running when the table was
/// last analyzed) pick a plan that joined every running command with every row of the group
/// (half a million comparisons, 110 ms) instead of probing the primary key.
fn running_fence<C: ConnectionTrait>(conn: &C) -> &'static str {
    match conn.get_database_backend() {
        DatabaseBackend::Postgres => "",
        _ => " AND commands.status || '' = 'running'",
    }
}

/// Persists the steps of many commands (`(id, step, progress)`), fenced like `advance`;
/// returns how many rows it changed.
pub(crate) async fn advance_many<C: ConnectionTrait>(
    conn: &C,
    owner: &str,
    lease_until: i64,
    items: &[(i64, i32, String)],
) -> Result<u64, DbErr> {
    let mut n = 0;
    for chunk in items.chunks(GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(id, step, progress)| {
                vec![(*id).into(), (*step).into(), progress.as_str().into()]
            })
            .collect();
        let (v, rows) = rows_source(conn, &["BIGINT", "INTEGER", "TEXT"], rows, 3);
        let text = format!(
            "UPDATE commands SET step = v.column2, progress = v.column3, lease_until = $1 FROM {v} \
             WHERE commands.id = v.column1 AND commands.lease_owner || '' = $2{}",
            running_fence(conn)
        );
        let mut values: Vec<Value> = vec![lease_until.into(), owner.into()];
        values.extend(rows);
        n += conn
            .execute_raw(sql(conn, &text, values))
            .await?
            .rows_affected();
    }
    Ok(n)
}

/// Holds many commands (`ids`) under `owner`'s lease until the transaction ends, without
/// writing them: a fence like `advance_many`'s for a step that leaves the commands' rows as
/// they are. Returns how many it holds. On PostgreSQL a row lock keeps a sweep or another
/// core from taking them back before the commit; on SQLite the transaction already excludes
/// every other writer.
pub(crate) async fn hold_many<C: ConnectionTrait>(
    conn: &C,
    owner: &str,
    ids: &[i64],
) -> Result<u64, DbErr> {
    let mut n = 0;
    for chunk in ids.chunks(GROUP_CHUNK) {
        let (ids, mut values) = ids_in(conn, "id", chunk.iter().copied(), 2);
        let lock = match conn.get_database_backend() {
            DatabaseBackend::Postgres => " FOR SHARE",
            _ => "",
        };
        let text = format!(
            "SELECT COUNT(*) AS n FROM (SELECT id FROM commands \
             WHERE {ids} AND commands.lease_owner || '' = $1{}{lock}) AS held",
            running_fence(conn)
        );
        values.insert(0, owner.into());
        let row = conn.query_one_raw(sql(conn, &text, values)).await?;
        n += row.map_or(Ok(0), |r| r.try_get::<i64>("", "n"))? as u64;
    }
    Ok(n)
}

/// A command a group step finished: its result, the last step and progress it went through
/// and the target to release (none when the step's writes released it).
pub(crate) struct Succeeded {
    pub id: i64,
    pub result: String,
    pub step: i32,
    pub progress: String,
    pub target: Option<Target>,
}

/// Marks many commands succeeded, fenced like `finish`, and releases their targets; returns
/// how many commands it finished. Waking parents is the caller's.
pub(crate) async fn succeed_many<C: ConnectionTrait>(
    conn: &C,
    owner: &str,
    now: i64,
    items: &[Succeeded],
) -> Result<u64, DbErr> {
    let mut n = 0;
    for chunk in items.chunks(GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|s| {
                vec![
                    s.id.into(),
                    s.result.as_str().into(),
                    s.step.into(),
                    s.progress.as_str().into(),
                ]
            })
            .collect();
        let (v, rows) = rows_source(conn, &["BIGINT", "TEXT", "INTEGER", "TEXT"], rows, 3);
        let text = format!(
            "UPDATE commands SET status = 'succeeded', result = v.column2, step = v.column3, \
             progress = v.column4, finished_at = $1, \
             lease_owner = NULL, lease_until = NULL, waiting_on = NULL FROM {v} \
             WHERE commands.id = v.column1 AND commands.lease_owner || '' = $2{}",
            running_fence(conn)
        );
        let mut values: Vec<Value> = vec![now.into(), owner.into()];
        values.extend(rows);
        n += conn
            .execute_raw(sql(conn, &text, values))
            .await?
            .rows_affected();
    }
    for table in ["containers", "environments"] {
        let pairs: Vec<(i64, i64)> = items
            .iter()
            .filter_map(|s| {
                s.target
                    .filter(|t| t.table() == table)
                    .map(|t| (t.id(), s.id))
            })
            .collect();
        for chunk in pairs.chunks(GROUP_CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|(t, c)| vec![(*t).into(), (*c).into()])
                .collect();
            let (v, values) = rows_source(conn, &["BIGINT", "BIGINT"], rows, 1);
            let text = format!(
                "UPDATE {table} SET locked_by = NULL FROM {v} WHERE {table}.id = v.column1 AND +{table}.locked_by = v.column2"
            );
            conn.execute_raw(sql(conn, &text, values)).await?;
        }
    }
    Ok(n)
}
