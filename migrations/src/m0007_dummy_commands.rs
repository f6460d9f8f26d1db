//! Index for finding the dummies a command placed (group and batch creates, compensation, the
//! collector).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("dummies_by_command")
                    .table("dummies")
                    .col("command_id")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("dummies_by_command")
                    .table("dummies")
                    .to_owned(),
            )
            .await
    }
}
