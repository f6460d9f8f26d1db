//! SQL of the queue. Every write of a claimed command is fenced on its lease owner.
//!
//! Here: the statement helpers every part shares (placeholders, JSON rows, id lists), and
//! submitting and reading commands; `claim` takes commands and keeps their leases,
//! `lifecycle` writes one command as it runs, `group` many commands of one step at once.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement, Value,
};

use super::{NewCommand, QueueError};
use crate::entities::command;
use crate::model::{Command, CommandId, CommandStatus};

mod claim;
mod group;
mod lifecycle;

pub(crate) use claim::{claim, renew_leases, requeue_claimed, sweep};
pub(crate) use group::{Succeeded, advance_many, hold_many, lock_many, succeed_many};
pub(crate) use lifecycle::{
    Finish, LockOutcome, MAX_NESTING, advance, cancel, finish, finish_plain_batch, lock, requeue,
    requeue_unstarted, unlock, wait_for_children, wake_parent,
};

/// Statement in `$N` placeholder style. For SQLite every `$N` becomes an anonymous `?` with
/// its value repeated in order of appearance: sqlx looks numbered parameters up by name, which
/// costs time quadratic in their number.
///
/// The hints that keep SQLite's planner off an index (`column || ''`, `+column`) are removed for
/// PostgreSQL, whose planner would take them for expressions it cannot estimate.
pub(crate) fn sql<C: ConnectionTrait>(conn: &C, text: &str, values: Vec<Value>) -> Statement {
    let backend = conn.get_database_backend();
    if backend != DatabaseBackend::Sqlite {
        return Statement::from_sql_and_values(backend, without_sqlite_hints(text), values);
    }
    let mut out = String::with_capacity(text.len());
    let mut ordered = Vec::with_capacity(values.len());
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut n = 0usize;
        while let Some(&(_, d)) = chars.peek() {
            let Some(digit) = d.to_digit(10) else { break };
            n = n * 10 + digit as usize;
            chars.next();
        }
        if n == 0 {
            out.push('$');
            continue;
        }
        out.push('?');
        ordered.push(
            values
                .get(n - 1)
                .expect("placeholder $N without a value")
                .clone(),
        );
    }
    Statement::from_sql_and_values(backend, out, ordered)
}

/// `text` without SQLite's planner hints: `|| ''` after a column, and a unary `+` before one
/// (a `+` after a space or `(` and before a letter; binary plus is written with spaces). The
/// queue's statements hold no string literal with either pattern.
fn without_sqlite_hints(text: &str) -> String {
    let text = text.replace(" || ''", "");
    let mut out = String::with_capacity(text.len());
    let mut prev = ' ';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let unary = c == '+'
            && (prev == ' ' || prev == '(')
            && chars.peek().is_some_and(|n| n.is_ascii_alphabetic());
        if !unary {
            out.push(c);
        }
        prev = c;
    }
    out
}

/// Runs `SELECT columns FROM rest` and returns its rows as one: the database aggregates them
/// into a JSON array of arrays, decoded into `T` per row. On SQLite every row of a result crosses
/// from the database thread to the core on its own (a thread switch each); this way a whole
/// result costs one. `rest` may hold `$N` placeholders for `values`.
pub async fn json_rows<C: ConnectionTrait, T: serde::de::DeserializeOwned>(
    conn: &C,
    columns: &str,
    rest: &str,
    values: Vec<Value>,
) -> Result<Vec<T>, DbErr> {
    let row = match conn.get_database_backend() {
        DatabaseBackend::Postgres => format!("json_build_array({columns})"),
        _ => format!("json_array({columns})"),
    };
    json_agg(conn, &row, rest, values).await
}

/// Like `json_rows`, with each row an object of the named columns (decoded into `T` by name);
/// `rest` may hold `$N` placeholders for `values`.
pub(crate) async fn json_objects<C: ConnectionTrait, T: serde::de::DeserializeOwned>(
    conn: &C,
    columns: &[&str],
    rest: &str,
    values: Vec<Value>,
) -> Result<Vec<T>, DbErr> {
    let pairs = columns
        .iter()
        .map(|c| format!("'{c}', {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let row = match conn.get_database_backend() {
        DatabaseBackend::Postgres => format!("json_build_object({pairs})"),
        _ => format!("json_object({pairs})"),
    };
    json_agg(conn, &row, rest, values).await
}

async fn json_agg<C: ConnectionTrait, T: serde::de::DeserializeOwned>(
    conn: &C,
    row: &str,
    rest: &str,
    values: Vec<Value>,
) -> Result<Vec<T>, DbErr> {
    let text = match conn.get_database_backend() {
        DatabaseBackend::Postgres => {
            format!("SELECT CAST(COALESCE(json_agg({row}), '[]') AS TEXT) AS agg FROM {rest}")
        }
        _ => format!("SELECT json_group_array({row}) AS agg FROM {rest}"),
    };
    let agg: Option<String> = match conn.query_one_raw(sql(conn, &text, values)).await? {
        Some(r) => r.try_get("", "agg")?,
        None => None,
    };
    serde_json::from_str(agg.as_deref().unwrap_or("[]"))
        .map_err(|e| DbErr::Custom(format!("rows of {rest} did not decode: {e}")))
}

/// Inserts commands, returning their ids in order; with `numbered`, the commands take those
/// ids (one per command, from [`next_ids`]).
pub(crate) async fn insert<C: ConnectionTrait>(
    conn: &C,
    commands: &[NewCommand],
    parent: Option<i64>,
    now: i64,
    numbered: Option<&[i64]>,
) -> Result<Vec<i64>, DbErr> {
    if numbered.is_some_and(|n| n.len() != commands.len()) {
        return Err(DbErr::Custom(format!(
            "{} commands were given {} ids",
            commands.len(),
            numbered.map_or(0, <[i64]>::len)
        )));
    }
    let mut ids = Vec::with_capacity(commands.len());
    for (k, chunk) in commands.chunks(1000).enumerate() {
        let numbers = numbered.map(|n| &n[k * 1000..k * 1000 + chunk.len()]);
        let mut text = format!(
            "INSERT INTO commands ({}kind, status, target_type, target_id, parent_id, params, \
             progress, step, attempts, run_after, requested_by, created_at, project_id) VALUES ",
            if numbers.is_some() { "id, " } else { "" }
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 9);
        for (i, c) in chunk.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('(');
            if let Some(numbers) = numbers {
                values.push(numbers[i].into());
                text.push_str(&format!("${}, ", values.len()));
            }
            let b = values.len();
            // The project: given, or its target's, or its parent's (read in the statement).
            let project = match (c.project, c.target, parent) {
                (Some(_), _, _) => format!("${}", b + 9),
                (None, Some(t), _) => format!(
                    "(SELECT project_id FROM {} WHERE id = ${})",
                    t.table(),
                    b + 3
                ),
                (None, None, Some(_)) => {
                    format!("(SELECT project_id FROM commands WHERE id = ${})", b + 4)
                }
                (None, None, None) => "NULL".into(),
            };
            text.push_str(&format!(
                "${}, 'queued', ${}, ${}, ${}, ${}, '{{}}', 0, 0, ${}, ${}, ${}, {project})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8
            ));
            values.push(c.kind.as_str().into());
            values.push(c.target.map(|t| t.type_name().to_string()).into());
            values.push(c.target.map(|t| t.id()).into());
            values.push(parent.into());
            values.push(c.params.to_string().into());
            values.push(now.into());
            values.push(c.requested_by.clone().into());
            values.push(now.into());
            if let Some(p) = c.project {
                values.push(p.into());
            }
        }
        let inserted = insert_ids(conn, text, values, chunk.len()).await?;
        // Given ids are the commands' in their order; returned ones come sorted.
        ids.extend(numbers.map_or(inserted, <[i64]>::to_vec));
    }
    Ok(ids)
}

/// Runs `text`, a multi-row `INSERT` of `n` rows into a table with an autoincrement `id`, and
/// returns the new ids in the order of the rows. On SQLite one multi-row `INSERT` takes
/// consecutive ids ending at the last inserted row id (returning each row would cost a thread
/// switch each); on PostgreSQL the sequence numbers the rows in order and `RETURNING id` gives
/// them back.
pub(crate) async fn insert_ids<C: ConnectionTrait>(
    conn: &C,
    mut text: String,
    values: Vec<Value>,
    n: usize,
) -> Result<Vec<i64>, DbErr> {
    if conn.get_database_backend() != DatabaseBackend::Sqlite {
        text.push_str(" RETURNING id");
    }
    inserted_ids(conn, sql(conn, &text, values), n).await
}

/// On PostgreSQL, `n` ids taken from each of `tables`' id sequences at once (one round trip),
/// for rows that are then written whole with their ids instead of inserted and updated;
/// `None` on SQLite, whose ids come from the insert. Each sequence is named in the statement
/// (`{table}_id_seq`, the name PostgreSQL gives the sequence of an identity column `id`, as the
/// migrations make every id; another name fails the statement, it draws nothing elsewhere), so
/// it is resolved once when planned: `pg_get_serial_sequence` in its place is called for every
/// id, five times the cost of drawing it.
pub(crate) async fn next_ids<C: ConnectionTrait>(
    conn: &C,
    tables: &[&str],
    n: usize,
) -> Result<Option<Vec<Vec<i64>>>, DbErr> {
    if conn.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(None);
    }
    let columns: Vec<String> = (0..tables.len()).map(|i| format!("c{i}")).collect();
    let draws: Vec<String> = tables
        .iter()
        .zip(&columns)
        .map(|(t, c)| format!("nextval('{t}_id_seq') AS {c}"))
        .collect();
    let rows: Vec<Vec<i64>> = json_rows(
        conn,
        &columns.join(", "),
        &format!(
            "(SELECT {} FROM generate_series(1, $1)) AS drawn",
            draws.join(", ")
        ),
        vec![(n as i64).into()],
    )
    .await?;
    let mut ids = vec![Vec::with_capacity(n); tables.len()];
    for row in rows {
        for (column, id) in ids.iter_mut().zip(row) {
            column.push(id);
        }
    }
    if ids.iter().any(|c| c.len() != n) {
        return Err(DbErr::Custom(format!(
            "asked {n} ids of the sequences, got fewer"
        )));
    }
    for column in &mut ids {
        column.sort_unstable();
    }
    Ok(Some(ids))
}

/// Like `insert_ids`, for a statement built for the connection's backend (on PostgreSQL it
/// ends with `RETURNING id`).
pub(crate) async fn inserted_ids<C: ConnectionTrait>(
    conn: &C,
    statement: Statement,
    n: usize,
) -> Result<Vec<i64>, DbErr> {
    if conn.get_database_backend() == DatabaseBackend::Sqlite {
        let done = conn.execute_raw(statement).await?;
        if done.rows_affected() != n as u64 {
            return Err(DbErr::Custom(format!(
                "inserted {} of {n} rows",
                done.rows_affected()
            )));
        }
        let last = done.last_insert_id() as i64;
        return Ok((last - n as i64 + 1..=last).collect());
    }
    let rows = conn.query_all_raw(statement).await?;
    let mut ids = rows
        .iter()
        .map(|r| r.try_get::<i64>("", "id"))
        .collect::<Result<Vec<_>, _>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// One command row.
pub(crate) async fn get<C: ConnectionTrait>(
    conn: &C,
    id: i64,
) -> Result<Option<command::Model>, DbErr> {
    command::Entity::find_by_id(id).one(conn).await
}

/// Which commands to list.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// Only this status.
    pub status: Option<CommandStatus>,
    /// Only children of this command.
    pub parent: Option<i64>,
    /// Only commands on this target type (`container`, `environment`) ...
    pub target_type: Option<String>,
    /// ... and id.
    pub target_id: Option<i64>,
    /// At most this many (default 100).
    pub limit: Option<u64>,
    /// Only commands older than this one (the next page of a newest-first listing).
    pub before: Option<i64>,
    /// Only commands of these projects (`None`: every command, fleet-wide ones included).
    pub projects: Option<Vec<i64>>,
}

pub(crate) async fn list<C: ConnectionTrait>(
    conn: &C,
    filter: &CommandFilter,
) -> Result<Vec<command::Model>, DbErr> {
    let mut q = command::Entity::find();
    if let Some(s) = filter.status {
        q = q.filter(command::Column::Status.eq(s.as_str()));
    }
    if let Some(p) = filter.parent {
        q = q.filter(command::Column::ParentId.eq(p));
    }
    if let Some(t) = &filter.target_type {
        q = q.filter(command::Column::TargetType.eq(t.clone()));
    }
    if let Some(t) = filter.target_id {
        q = q.filter(command::Column::TargetId.eq(t));
    }
    if let Some(b) = filter.before {
        q = q.filter(command::Column::Id.lt(b));
    }
    if let Some(p) = &filter.projects {
        q = q.filter(command::Column::ProjectId.is_in(p.clone()));
    }
    q.order_by_desc(command::Column::Id)
        .limit(filter.limit.unwrap_or(100))
        .all(conn)
        .await
}

pub(crate) async fn children<C: ConnectionTrait>(
    conn: &C,
    parent: i64,
) -> Result<Vec<command::Model>, DbErr> {
    command::Entity::find()
        .filter(command::Column::ParentId.eq(parent))
        .order_by_asc(command::Column::Id)
        .all(conn)
        .await
}

/// The API view of a row. A status this core does not know is an error that names the command;
/// parameters or a result that are not JSON are shown as the stored text (a string), so the
/// command can still be looked at, and nothing is shown as `null` that was not.
pub(crate) fn to_api(row: &command::Model) -> Result<Command, QueueError> {
    let json = |text: &str| {
        serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
    };
    Ok(Command {
        id: CommandId(row.id),
        kind: row.kind.clone(),
        status: row.status.parse().map_err(|e: String| {
            QueueError::Unreadable(format!(
                "command {} ({}): unreadable status: {e}",
                row.id, row.kind
            ))
        })?,
        target_type: row.target_type.clone(),
        target_id: row.target_id,
        parent: row.parent_id.map(CommandId),
        params: json(&row.params),
        step: row.step,
        result: row.result.as_deref().map(json),
        error: row.error.clone(),
        waiting_on: row.waiting_on.clone(),
        attempts: row.attempts,
        requested_by: row.requested_by.clone(),
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        log: Vec::new(),
    })
}

/// Writes lines plugins logged (by container id, 0 for none) as command `cmd`'s, at `at`.
pub(crate) async fn insert_logs<C: ConnectionTrait>(
    conn: &C,
    cmd: i64,
    at: i64,
    lines: Vec<(i64, crate::types::LogLine)>,
) -> Result<(), DbErr> {
    use crate::entities::command_log;
    if lines.is_empty() {
        return Ok(());
    }
    let rows = lines
        .into_iter()
        .map(|(container, l)| command_log::ActiveModel {
            command_id: sea_orm::Set(cmd),
            container_id: sea_orm::Set((container != 0).then_some(container)),
            level: sea_orm::Set(l.level.as_str().to_string()),
            message: sea_orm::Set(l.message),
            at: sea_orm::Set(at),
            ..Default::default()
        });
    command_log::Entity::insert_many(rows).exec(conn).await?;
    Ok(())
}

/// `insert_logs`, for a command `owner` runs: written only while `owner` still holds its lease
/// (checked and written in one transaction, the command's row locked meanwhile), so that a
/// step another core has taken over and will run again does not log its lines twice. Whether
/// they were written.
#[expect(
    clippy::disallowed_methods,
    reason = "database work only: the lines were logged by calls that have returned"
)]
pub(crate) async fn insert_logs_leased(
    db: &sea_orm::DatabaseConnection,
    cmd: i64,
    owner: &str,
    at: i64,
    lines: Vec<(i64, crate::types::LogLine)>,
) -> Result<bool, DbErr> {
    use sea_orm::TransactionTrait;
    if lines.is_empty() {
        return Ok(true);
    }
    let txn = db.begin().await?;
    // A write that changes nothing, for its row lock (PostgreSQL) and its lease check.
    let held = txn
        .execute_raw(sql(
            &txn,
            "UPDATE commands SET lease_until = lease_until \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            vec![cmd.into(), owner.into()],
        ))
        .await?
        .rows_affected()
        == 1;
    if !held {
        txn.rollback().await?;
        return Ok(false);
    }
    insert_logs(&txn, cmd, at, lines).await?;
    txn.commit().await?;
    Ok(true)
}

/// The lines plugins logged during command `id`, oldest first.
pub(crate) async fn logs<C: ConnectionTrait>(
    db: &C,
    id: i64,
) -> Result<Vec<crate::model::LogEntry>, DbErr> {
    use crate::entities::command_log;
    Ok(command_log::Entity::find()
        .filter(command_log::Column::CommandId.eq(id))
        .order_by_asc(command_log::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(|l| crate::model::LogEntry {
            at: l.at,
            container: l.container_id.map(crate::model::ContainerId),
            level: l.level,
            message: l.message,
        })
        .collect())
}
/// Rows of values for one statement, as a row source `v` with columns `column1…`, to follow
/// `FROM` (`UPDATE t SET … FROM {source} WHERE t.id = v.column1`) or `SELECT * FROM` (in an
/// `INSERT`); `$first` is the number of its first placeholder. Returns the source and its values.
///
/// On SQLite the rows travel as one JSON parameter read by `jsonb_each` (each row comes as
/// binary JSON, so reading its columns does not parse text again): the statement's text is
/// then the same for any number of rows, so it is prepared once and cached (a `VALUES` list of a
/// few hundred rows took longer to prepare than to run), and SQLite drives the join from the
/// rows, looking each target up by id. The caller must keep SQLite from using another index of
/// the target instead (`+column` or `column || ''` in its other conditions): with `VALUES`,
/// SQLite 3.51 scanned the whole target table once per statement. On PostgreSQL the rows are
/// one JSON parameter as well (`jsonb_array_elements`), each column cast to its type.
pub(crate) fn rows_source<C: ConnectionTrait>(
    conn: &C,
    types: &[&str],
    rows: Vec<Vec<serde_json::Value>>,
    first: usize,
) -> (String, Vec<Value>) {
    if conn.get_database_backend() == DatabaseBackend::Sqlite {
        let columns = (0..types.len())
            .map(|i| format!("value ->> {i} AS column{}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let json =
            serde_json::Value::Array(rows.into_iter().map(serde_json::Value::Array).collect());
        return (
            format!("(SELECT {columns} FROM jsonb_each(${first})) AS v"),
            vec![json.to_string().into()],
        );
    }
    // PostgreSQL: the rows as one JSON parameter too, so that the statement's text is the
    // same for any number of rows (prepared once per connection, planned without thousands of
    // parameters).
    let columns = types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("CAST(value ->> {i} AS {t}) AS column{}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let json = serde_json::Value::Array(rows.into_iter().map(serde_json::Value::Array).collect());
    (
        format!(
            "(SELECT {columns} FROM jsonb_array_elements(CAST(${first} AS JSONB)) AS value) AS v"
        ),
        vec![json.to_string().into()],
    )
}

/// Rows per multi-row statement (a claim of the default batch is one chunk).
pub(crate) const GROUP_CHUNK: usize = 1024;

/// The condition `column IN (ids)`, with its values; `$first` is the number of its placeholder.
/// The ids travel as one parameter, so the statement's text is the same for any ids and is
/// prepared once: on SQLite a JSON array read by `json_each`; on PostgreSQL an array
/// (`column = ANY($first)`), which the planner looks up by index one id at a time whatever it
/// believes of the table.
pub(crate) fn ids_in<C: ConnectionTrait>(
    conn: &C,
    column: &str,
    ids: impl IntoIterator<Item = i64>,
    first: usize,
) -> (String, Vec<Value>) {
    if conn.get_database_backend() == DatabaseBackend::Sqlite {
        let json = serde_json::Value::Array(ids.into_iter().map(serde_json::Value::from).collect());
        return (
            format!("{column} IN (SELECT value FROM json_each(${first}))"),
            vec![json.to_string().into()],
        );
    }
    let list = ids
        .into_iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    (
        format!("{column} = ANY(CAST(${first} AS BIGINT[]))"),
        vec![format!("{{{list}}}").into()],
    )
}
#[cfg(test)]
mod tests {
    #[test]
    fn sqlite_hints_are_removed_for_postgresql_and_arithmetic_is_kept() {
        assert_eq!(
            super::without_sqlite_hints(
                "WHERE c.owner || '' = $1 AND +o.parent_id IS NULL AND (+t.locked_by = 2) \
                 AND a = a + v.column2 AND b = +3"
            ),
            "WHERE c.owner = $1 AND o.parent_id IS NULL AND (t.locked_by = 2) \
             AND a = a + v.column2 AND b = +3"
        );
    }
}
