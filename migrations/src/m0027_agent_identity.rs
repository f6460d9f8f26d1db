//! Which agent runs a server: `servers.agent_id`, the id an agent makes in its data directory
//! at its first start and sends with every heartbeat. Another agent under a down server's name
//! (a different data directory, so none of its guests) is refused unless its operator says it
//! replaces that server (`--take-over`): the core would otherwise find every container of the
//! server gone, fail them and have their guests removed when the real agent came back.
//!
//! And which agents token a core takes: `cores.agents_token`, a fingerprint (never the token)
//! that a core starting with another token is refused by, since agents failing over to it
//! would be refused and their servers judged down.

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
        manager.alter_table(add).await?;
        if manager.has_table("cores").await? {
            let add = Table::alter()
                .table("cores")
                .add_column(text_null("agents_token"))
                .to_owned();
            manager.alter_table(add).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.has_table("cores").await? {
            let drop = Table::alter()
                .table("cores")
                .drop_column("agents_token")
                .to_owned();
            manager.alter_table(drop).await?;
        }
        let drop = Table::alter()
            .table("servers")
            .drop_column("agent_id")
            .to_owned();
        manager.alter_table(drop).await
    }
}
