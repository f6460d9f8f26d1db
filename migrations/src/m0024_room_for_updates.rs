//! Room on each page for the new versions of rows that are updated in place (PostgreSQL only).
//!
//! A command row is written four times in its life (claimed, its step advanced, its lease
//! renewed, finished) and a server's row at every placement on it; with full pages (the default
//! `fillfactor` of 100) each new version goes to another page and every index gets an entry for
//! it. With room on the page, an update that changes no indexed column (a step's progress, a
//! lease, a server's allocations) is a heap-only tuple: no index is touched. The price is
//! space: a finished command's page may stay half empty, up to twice the pages for the history
//! of commands (servers are few). SQLite: nothing.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The tables and the share of each new page that inserts fill.
const TABLES: [(&str, u8); 2] = [("commands", 50), ("servers", 50)];

/// Sets each table's `fillfactor` (`up`), or sets it back to the default.
async fn fill(manager: &SchemaManager<'_>, up: bool) -> Result<(), DbErr> {
    if manager.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(());
    }
    for (table, factor) in TABLES {
        let change = if up {
            format!("ALTER TABLE {table} SET (fillfactor = {factor})")
        } else {
            format!("ALTER TABLE {table} RESET (fillfactor)")
        };
        manager.get_connection().execute_unprepared(&change).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        fill(manager, true).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        fill(manager, false).await
    }
}
