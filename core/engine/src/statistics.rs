//! Planner statistics kept fresh on PostgreSQL while tables grow.
//!
//! PostgreSQL's autovacuum analyzes a table once a tenth of it changed, checking every minute;
//! a queue that grows from empty to a hundred thousand commands in seconds is planned all that
//! time as if its tables were nearly empty (nested loops over sequential scans, every queued
//! command filtered and sorted before a claim takes a thousand). The core checks every second
//! how each of its tables changed since it was last analyzed and analyzes those that more than
//! doubled (by at least 1,000 rows) or changed by more rows than they hold: then the planner's
//! picture of a table's size and statuses has gone stale. One core at a time does it (an advisory
//! lock): the statistics belong to the database, not to a core.
//!
//! On SQLite nothing is done: its planner needs no statistics for these statements.

use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, Statement, TransactionTrait,
};

/// How often the tables' changes are checked.
pub const CHECK: Duration = Duration::from_secs(1);

/// The statistics target of the refreshes (PostgreSQL's default is 100; each unit samples 300
/// rows).
const SAMPLE_TARGET: u32 = 30;

/// The advisory lock held while analyzing (any number; the same in every core).
const LOCK: i64 = 0x0c10_0d48_57a7;

/// The tables analyzed when they changed enough: those whose rows commands change in bulk and
/// whose statuses the queue's and placement's statements filter on.
const TABLES: [&str; 3] = ["commands", "containers", "dummies"];

/// Analyzes the tables that more than doubled, or changed by more rows than they hold (in
/// either case by at least 1,000 rows), since their last analysis; returns their names. Does
/// nothing on SQLite or while another core analyzes.
#[expect(
    clippy::disallowed_methods,
    reason = "database work only: the transaction holds the advisory lock while analyzing"
)]
pub async fn refresh(db: &DatabaseConnection) -> Result<Vec<String>, DbErr> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(Vec::new());
    }
    let list = TABLES.map(|t| format!("'{t}'")).join(", ");
    let stale: Vec<String> = db
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!(
                "SELECT s.relname::text AS name FROM pg_stat_user_tables s \
                 JOIN pg_class c ON c.oid = s.relid \
                 WHERE s.schemaname = current_schema() AND s.relname IN ({list}) \
                 AND (s.n_live_tup > 1000 + 2 * GREATEST(c.reltuples, 0) \
                 OR s.n_mod_since_analyze > 1000 + s.n_live_tup)"
            ),
        ))
        .await?
        .iter()
        .map(|r| r.try_get::<String>("", "name"))
        .collect::<Result<_, _>>()?;
    if stale.is_empty() {
        return Ok(stale);
    }
    let txn = db.begin().await?;
    let locked = txn
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!("SELECT pg_try_advisory_xact_lock({LOCK}) AS locked"),
        ))
        .await?
        .map(|r| r.try_get::<bool>("", "locked"))
        .transpose()?
        .unwrap_or(false);
    if !locked {
        return Ok(Vec::new());
    }
    // A sample of 9,000 rows instead of 30,000 (a third of the time): these refreshes need the
    // tables' sizes and the mix of their statuses, which it gives as well; the database's own
    // autovacuum, where it runs, still analyzes with its full target.
    txn.execute_unprepared(&format!(
        "SET LOCAL default_statistics_target = {SAMPLE_TARGET}"
    ))
    .await?;
    // The names come from the fixed list above, so they are safe in the statement's text.
    for table in &stale {
        txn.execute_unprepared(&format!("ANALYZE {table}")).await?;
    }
    txn.commit().await?;
    Ok(stale)
}

/// Keeps the statistics fresh until the task is dropped (see `refresh`).
pub async fn keep_fresh(db: DatabaseConnection) {
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        match refresh(&db).await {
            Ok(tables) if !tables.is_empty() => {
                tracing::debug!(?tables, "refreshed the planner's statistics");
            }
            Ok(_) => {}
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot refresh the planner's statistics; statements may be planned for empty tables");
            }
            Err(_) => {}
        }
    }
}
