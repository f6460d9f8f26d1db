//! The range of its subnet an agent hands addresses from, when servers share a network (one
//! bridge and subnet, so that a VM moving live between them keeps its address).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("servers")
                    .add_column(ColumnDef::new("addresses").string().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("servers")
                    .drop_column("addresses")
                    .to_owned(),
            )
            .await
    }
}
