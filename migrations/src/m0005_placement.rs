//! Placement: allocation counters and the drain flag on servers, and dummy containers
//! (capacity reservations with a deadline).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one column at a time.
        for column in [
            big_integer("alloc_cpu_millis").default(0).to_owned(),
            big_integer("alloc_memory_mb").default(0).to_owned(),
            big_integer("alloc_disk_mb").default(0).to_owned(),
            big_integer("alloc_containers").default(0).to_owned(),
            boolean("draining").default(false).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table("servers")
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table("dummies")
                    .col(big_pk_auto("id"))
                    .col(big_integer("server_id"))
                    .col(big_integer("container_id"))
                    .col(big_integer_null("command_id"))
                    .col(big_integer("cpu_millis"))
                    .col(big_integer("memory_mb"))
                    .col(big_integer("disk_mb"))
                    .col(big_integer("deadline"))
                    .col(big_integer("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("dummies_by_server")
                    .table("dummies")
                    .col("server_id")
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("containers_by_guest")
                    .table("containers")
                    .col("guest_id")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("dummies").to_owned())
            .await
    }
}
