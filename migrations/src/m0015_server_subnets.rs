//! The subnet an agent hands its containers' addresses from, so that the core can refuse an
//! agent whose subnet overlaps another server's.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("servers")
                    .add_column(ColumnDef::new("subnet").string().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("servers")
                    .drop_column("subnet")
                    .to_owned(),
            )
            .await
    }
}
