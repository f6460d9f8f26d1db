//! Why a container is in its status, where the status alone does not say (a failed one: its
//! guest lost in an outage, its create given up), shown with the container.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("containers")
                    .add_column(text_null("status_reason"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("containers")
                    .drop_column("status_reason")
                    .to_owned(),
            )
            .await
    }
}
