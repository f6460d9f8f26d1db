//! The event triggers' statements planned once per connection on PostgreSQL. `m0021` made
//! them `EXECUTE` their `INSERT … SELECT`, planned at every call so that a plan made for one
//! row never joined five hundred in a nested loop; planning was then most of their cost (under
//! `bench api --postgres`, 150 of the 215 ms spent on the commonest). Static statements are
//! planned once, and the update's join is kept from nested loops (`enable_nestloop = off` for
//! the function alone), so the one plan suits any size. SQLite: nothing changes.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::event_triggers::{Columns, Planned, replan_per_statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        replan_per_statement(manager, Planned::Once, Columns::Project).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        replan_per_statement(manager, Planned::EachCall, Columns::Project).await
    }
}
