//! The work `NOTIFY` (migration 17) names the inserting connection's `application_name`, which
//! a core sets to its own name: a core skips the wake-ups of its own inserts (it wakes its
//! queue itself after them) and claims once per submission instead of twice. SQLite: nothing.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Makes the notifying function send `payload` (PostgreSQL only).
async fn notify_with(manager: &SchemaManager<'_>, payload: &str) -> Result<(), DbErr> {
    if manager.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(());
    }
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "CREATE OR REPLACE FUNCTION cloud48_work_notify() RETURNS trigger AS $$ \
             BEGIN PERFORM pg_notify('cloud48_work', {payload}); RETURN NULL; END $$ \
             LANGUAGE plpgsql"
        ))
        .await
        .map(drop)
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        notify_with(manager, "current_setting('application_name')").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        notify_with(manager, "''").await
    }
}
