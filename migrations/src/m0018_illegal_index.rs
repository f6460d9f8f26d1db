//! A partial index of the illegal containers by server: the collector reads them in one
//! statement on every pass, which must not cost more with a million legal containers.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX containers_illegal ON containers (server_id) WHERE status = 'illegal'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX containers_illegal")
            .await?;
        Ok(())
    }
}
