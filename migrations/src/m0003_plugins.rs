//! Installed container-type plugins (WASM components) and the first-start marker.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("plugins")
                    .col(big_pk_auto("id"))
                    .col(string("name"))
                    .col(string("version"))
                    .col(string("wit_version"))
                    .col(integer("priority"))
                    .col(text("description"))
                    .col(text("requirements"))
                    .col(string("sha256"))
                    .col(blob("wasm"))
                    .col(big_integer("installed_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("plugins_name_version")
                    .table("plugins")
                    .col("name")
                    .col("version")
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table("platforms")
                    .add_column(boolean("plugins_bootstrapped").default(false))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("plugins").to_owned())
            .await
    }
}
