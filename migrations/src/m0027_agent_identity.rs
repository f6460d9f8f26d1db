//! Which agent runs a server: `servers.agent_id`, the id an agent makes in its data directory
//! at its first start and sends with every heartbeat. Another agent under a down server's name
//! (a different data directory, so none of its guests) is refused unless its operator says it
//! replaces that server (`--take-over`): the core would otherwise find every container of the
//! server gone, fail them and have their guests removed when the real agent came back.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let add = Table::alter()
            .table("servers")
            .add_column(text_null("agent_id"))
            .to_owned();
        manager.alter_table(add).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let drop = Table::alter()
            .table("servers")
            .drop_column("agent_id")
            .to_owned();
        manager.alter_table(drop).await
    }
}
