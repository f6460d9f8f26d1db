//! Notices the control plane owes the environments, a row per core that owes one, until the
//! core holding the monitor duty sends it (once for all its rows): a core that starts finding no other core running owes the
//! environments `after-cc-start`, whichever core then holds the monitor (cores started
//! together after an outage: the one that found itself alone need not be the one that took the
//! duty). The row is taken in the transaction that queues the notices, so each is sent once.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, string};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("owed_notices")
                    .col(string("name"))
                    .col(string("owed_by"))
                    .col(big_integer("since"))
                    .primary_key(Index::create().col("name").col("owed_by"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("owed_notices").to_owned())
            .await
    }
}
