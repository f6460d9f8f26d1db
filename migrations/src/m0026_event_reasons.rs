//! Why, in the event stream: `events.reason` holds a failed command's error and a container's
//! status reason (its guest lost in an outage, the command that failed its create), so that
//! `cloud48 events` and the console say why without another request. The triggers are made
//! again to fill it (SQLite: row triggers; PostgreSQL: the statement triggers' functions).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::event_triggers::{self, Columns, Planned};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let add = Table::alter()
            .table("events")
            .add_column(text_null("reason"))
            .to_owned();
        manager.alter_table(add).await?;
        triggers(manager, Columns::Reason).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        triggers(manager, Columns::Project).await?;
        let drop = Table::alter()
            .table("events")
            .drop_column("reason")
            .to_owned();
        manager.alter_table(drop).await
    }
}

/// Makes the triggers fill `columns`.
async fn triggers(manager: &SchemaManager<'_>, columns: Columns) -> Result<(), DbErr> {
    match manager.get_database_backend() {
        DatabaseBackend::Sqlite => {
            event_triggers::drop(manager).await?;
            event_triggers::create(manager, columns).await
        }
        _ => event_triggers::replan_per_statement(manager, Planned::Once, columns).await,
    }
}
