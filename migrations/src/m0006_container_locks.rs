//! Index for finding the containers a command holds (the containers of a batch create).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("containers_by_lock")
                    .table("containers")
                    .col("locked_by")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("containers_by_lock")
                    .table("containers")
                    .to_owned(),
            )
            .await
    }
}
