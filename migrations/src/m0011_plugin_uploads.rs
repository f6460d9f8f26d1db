//! Components waiting for their `plugin.upgrade` command: kept by content hash until the
//! command installs them (or fails and drops them), so the command can resume after a crash.

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
                    .table("plugin_uploads")
                    .col(string("sha256").primary_key())
                    .col(blob("wasm"))
                    .col(big_integer("created_at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("plugin_uploads").to_owned())
            .await
    }
}
