//! The platform's secret key: the secrets containers receive (`${secret:NAME}` in a type's
//! workload) are derived from it, so every core of a cluster derives the same ones. The core
//! fills it with random bytes on its first start after this migration.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("platforms")
                    .add_column(ColumnDef::new("secret").string().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("platforms")
                    .drop_column("secret")
                    .to_owned(),
            )
            .await
    }
}
