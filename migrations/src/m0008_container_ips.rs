//! Index for checking that an address a server gave a new container is not held by another
//! live container (addresses are unique on the platform).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("containers_by_ip")
                    .table("containers")
                    .col("ip")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("containers_by_ip")
                    .table("containers")
                    .to_owned(),
            )
            .await
    }
}
