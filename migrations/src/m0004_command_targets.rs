//! Index for finding the unfinished commands of a target (per-object submission order).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("commands_by_target")
                    .table("commands")
                    .col("target_type")
                    .col("target_id")
                    .col("status")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("commands_by_target")
                    .table("commands")
                    .to_owned(),
            )
            .await
    }
}
