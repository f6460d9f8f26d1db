//! Parameters (WIT 0.2.0): each container's parameters (its type's schema, defaults filled in)
//! and each environment's, as JSON objects of strings.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["containers", "environments"] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(ColumnDef::new("params").text().not_null().default("{}"))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["containers", "environments"] {
            manager
                .alter_table(Table::alter().table(table).drop_column("params").to_owned())
                .await?;
        }
        Ok(())
    }
}
