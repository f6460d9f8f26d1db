//! What container-type plugins log while a command runs their hooks (WIT 0.2.0 `host.log`),
//! kept with the command and shown by `command show`.

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
                    .table("command_logs")
                    .col(big_pk_auto("id"))
                    .col(big_integer("command_id"))
                    .col(big_integer_null("container_id"))
                    .col(string("level"))
                    .col(text("message"))
                    .col(big_integer("at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("command_logs_by_command")
                    .table("command_logs")
                    .col("command_id")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("command_logs").to_owned())
            .await
    }
}
