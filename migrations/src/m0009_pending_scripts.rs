//! Scripts hooks asked to run in a container that was stopped or suspended at the time: kept
//! in order and run when it starts or resumes, so an environment change converges.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("pending_scripts")
                    .col(big_pk_auto("id"))
                    .col(big_integer("container_id"))
                    .col(text("script"))
                    .col(text("args"))
                    .col(big_integer("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("pending_scripts_by_container")
                    .table("pending_scripts")
                    .col("container_id")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("pending_scripts").to_owned())
            .await
    }
}
