//! Fewer writes per command and container on PostgreSQL, where every create paid for B-tree
//! entries it never used (`perf` of `bench place --postgres`: a quarter of the database's time
//! inserting index entries, a tenth in the per-row event triggers):
//! - indexes on columns that stay NULL for most of a row's life (a container's server, address,
//!   environment and lock; a command's parent) hold only the rows where they are set, so an
//!   insert or update of a row where they are NULL writes no entry there (a lookup `col = …`
//!   implies `col IS NOT NULL`, so the planner still uses them);
//! - commands leave a fifth of each page free, so that updates touching no indexed column (a
//!   step's progress, a lease renewal) stay on their page without new index entries;
//! - the event triggers run once per statement over its transition tables;
//! - a command holds a lease only while it runs (a constraint), which the queue's group writes
//!   rely on instead of naming the status.
//!
//! SQLite keeps its indexes: it meets its rate with them, and its planner hints are tuned to
//! them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (index, table, column) made partial: only rows where the column is set.
const SPARSE: [(&str, &str, &str); 5] = [
    ("containers_by_environment", "containers", "environment_id"),
    ("containers_by_ip", "containers", "ip"),
    ("containers_by_lock", "containers", "locked_by"),
    ("containers_by_server", "containers", "server_id"),
    ("commands_by_parent", "commands", "parent_id"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        for (index, table, column) in SPARSE {
            db.execute_unprepared(&format!("DROP INDEX {index}"))
                .await?;
            db.execute_unprepared(&format!(
                "CREATE INDEX {index} ON {table} ({column}) WHERE {column} IS NOT NULL"
            ))
            .await?;
        }
        db.execute_unprepared("ALTER TABLE commands SET (fillfactor = 80)")
            .await?;
        // A command holds a lease only while it runs (the queue's group writes rely on it;
        // `NOT VALID`: rows of older releases are not checked).
        db.execute_unprepared(
            "ALTER TABLE commands ADD CONSTRAINT commands_leased_only_running \
             CHECK (lease_owner IS NULL OR status = 'running') NOT VALID",
        )
        .await?;
        crate::event_triggers::drop(manager).await?;
        crate::event_triggers::create_per_statement(manager).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        crate::event_triggers::drop_per_statement(manager).await?;
        crate::event_triggers::create(manager, crate::event_triggers::Columns::Project).await?;
        db.execute_unprepared("ALTER TABLE commands RESET (fillfactor)")
            .await?;
        db.execute_unprepared("ALTER TABLE commands DROP CONSTRAINT commands_leased_only_running")
            .await?;
        for (index, table, column) in SPARSE {
            db.execute_unprepared(&format!("DROP INDEX {index}"))
                .await?;
            db.execute_unprepared(&format!("CREATE INDEX {index} ON {table} ({column})"))
                .await?;
        }
        Ok(())
    }
}
