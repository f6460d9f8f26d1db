//! Which process runs as a core's node: `cores.instance`, a random id each core process makes
//! at start and writes with every announcement. A core starting as a node whose row another
//! instance keeps writing (a copied data directory, with its `node-id`) is refused. Null where
//! a core of a release before it wrote the row.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::string_null;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let add = Table::alter()
            .table("cores")
            .add_column(string_null("instance"))
            .to_owned();
        manager.alter_table(add).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let drop = Table::alter()
            .table("cores")
            .drop_column("instance")
            .to_owned();
        manager.alter_table(drop).await
    }
}
