//! A partial index of the containers that are down, by server: the collector's pass reads
//! which servers that are up still hold some (`Monitor::recheck_down`), which must not cost
//! more with a million containers that are not down.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX containers_down ON containers (server_id) WHERE status = 'down'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX containers_down")
            .await?;
        Ok(())
    }
}
