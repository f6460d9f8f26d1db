//! Several cores on one database: duties that exactly one core performs at a time (the health
//! monitor's decisions, the collector, the rebalancer) held under a lease, the heartbeats every
//! core received (written in batches, so that every core judges a server from the same facts),
//! and the cores themselves with the address agents reach them at. On PostgreSQL, new commands
//! wake every core (`NOTIFY cloud48_work`, once per inserting statement).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("duties")
                    .col(string("name").primary_key())
                    .col(string("owner"))
                    .col(big_integer("expires_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("server_beats")
                    .col(big_integer("server_id").primary_key())
                    .col(big_integer("at"))
                    .col(text_null("load"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("cores")
                    .col(string("node").primary_key())
                    .col(string_null("url"))
                    .col(big_integer("seen_at"))
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DatabaseBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared(
                "CREATE OR REPLACE FUNCTION cloud48_work_notify() RETURNS trigger AS $$ \
                 BEGIN PERFORM pg_notify('cloud48_work', ''); RETURN NULL; END $$ LANGUAGE plpgsql",
            )
            .await?;
            db.execute_unprepared(
                "CREATE TRIGGER commands_work_notify AFTER INSERT ON commands \
                 FOR EACH STATEMENT EXECUTE FUNCTION cloud48_work_notify()",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DatabaseBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared("DROP TRIGGER IF EXISTS commands_work_notify ON commands")
                .await?;
            db.execute_unprepared("DROP FUNCTION IF EXISTS cloud48_work_notify()")
                .await?;
        }
        for table in ["cores", "server_beats", "duties"] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
