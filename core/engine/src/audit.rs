//! The audit trail: every request that changes something (or tries to) and every change an
//! administrator makes with the command line on the core's machine, with who, when, what and
//! the outcome. The API writes an entry once a mutation has been answered (never inside the
//! mutation's transaction); the database refuses to change or delete one (migration
//! `m0014_audit`).

use sea_orm::{ConnectionTrait, DbErr};
use serde::Deserialize;

use crate::model::AuditEntry;
use crate::queue::store;

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this user's.
    pub who: Option<String>,
    /// Only entries whose object starts with this (`/v1/servers`).
    pub object: Option<String>,
    /// Only entries older than this one (the next page, newest first).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: u64,
}

/// Appends an entry (its `id` and, when 0, its `at` are filled in).
pub async fn record<C: ConnectionTrait>(db: &C, e: &AuditEntry) -> Result<(), DbErr> {
    let at = if e.at == 0 {
        crate::model::now_ms()
    } else {
        e.at
    };
    db.execute_raw(store::sql(
        db,
        "INSERT INTO audit (at, who, address, action, object, status, command_id, message, \
         request) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        vec![
            at.into(),
            e.who.clone().into(),
            e.address.clone().into(),
            e.action.clone().into(),
            e.object.clone().into(),
            i32::from(e.status).into(),
            e.command_id.into(),
            e.message.clone().into(),
            e.request.clone().into(),
        ],
    ))
    .await?;
    Ok(())
}

#[derive(Deserialize)]
struct Row {
    id: i64,
    at: i64,
    who: String,
    address: Option<String>,
    action: String,
    object: String,
    status: i64,
    command_id: Option<i64>,
    message: Option<String>,
    request: Option<String>,
}

/// Entries passing `filter`, newest first.
pub async fn list<C: ConnectionTrait>(
    db: &C,
    filter: &AuditFilter,
) -> Result<Vec<AuditEntry>, DbErr> {
    let mut conditions = vec!["1 = 1".to_string()];
    let mut values: Vec<sea_orm::Value> = Vec::new();
    if let Some(w) = &filter.who {
        values.push(w.clone().into());
        conditions.push(format!("who = ${}", values.len()));
    }
    if let Some(o) = &filter.object {
        values.push(o.clone().into());
        conditions.push(format!(
            "substr(object, 1, length(${n})) = ${n}",
            n = values.len()
        ));
    }
    if let Some(b) = filter.before {
        values.push(b.into());
        conditions.push(format!("id < ${}", values.len()));
    }
    let rows: Vec<Row> = store::json_objects(
        db,
        &[
            "id",
            "at",
            "who",
            "address",
            "action",
            "object",
            "status",
            "command_id",
            "message",
            "request",
        ],
        &format!(
            "(SELECT * FROM audit WHERE {} ORDER BY id DESC LIMIT {}) AS a",
            conditions.join(" AND "),
            filter.limit.max(1)
        ),
        values,
    )
    .await?;
    let mut out: Vec<AuditEntry> = rows
        .into_iter()
        .map(|r| AuditEntry {
            id: r.id,
            at: r.at,
            who: r.who,
            address: r.address,
            action: r.action,
            object: r.object,
            status: r.status as u16,
            command_id: r.command_id,
            message: r.message,
            request: r.request,
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.id));
    Ok(out)
}
