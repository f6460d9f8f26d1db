//! SQL of the queue. Every write of a claimed command is fenced on its lease owner.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait, Value,
};

use super::{NewCommand, QueueError, Target};
use crate::entities::command;
use crate::model::{Command, CommandId, CommandStatus};

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
