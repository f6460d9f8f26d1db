//! The event log: every change of a command's, container's, server's or environment's status
//! (and a container's move to another server) appends a row, written by triggers in the same
//! transaction as the change, so no code path can change a status without its event and no
//! event exists for a change that rolled back. `GET /v1/events` streams them.

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
                    .table("events")
                    .col(big_pk_auto("id"))
                    .col(big_integer("at"))
                    .col(string("topic"))
                    .col(big_integer("object_id"))
                    .col(string("action"))
                    .col(string_null("kind"))
                    .col(string_null("related_type"))
                    .col(big_integer_null("related_id"))
                    .col(big_integer_null("server_id"))
                    .col(string_null("requested_by"))
                    .to_owned(),
            )
            .await?;
        // No index on `at`: ids follow time, so retention finds its cut by walking ids from the
        // oldest (see `events::forget`), and every status change writes one B-tree entry less.
        crate::event_triggers::create(manager, crate::event_triggers::Columns::First).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::event_triggers::drop(manager).await?;
        manager
            .drop_table(Table::drop().table("events").to_owned())
            .await
    }
}
