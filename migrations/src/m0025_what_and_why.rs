//! What an audited change asked for (`audit.request`: the request's JSON, secrets masked), and
//! why a container is in its status where the status alone does not say
//! (`containers.status_reason`: a failed one's guest lost in an outage, its create given up).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The columns added: (table, column).
const COLUMNS: [(&str, &str); 2] = [("audit", "request"), ("containers", "status_reason")];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, column) in COLUMNS {
            let add = Table::alter()
                .table(table)
                .add_column(text_null(column))
                .to_owned();
            manager.alter_table(add).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, column) in COLUMNS {
            let drop = Table::alter().table(table).drop_column(column).to_owned();
            manager.alter_table(drop).await?;
        }
        Ok(())
    }
}
