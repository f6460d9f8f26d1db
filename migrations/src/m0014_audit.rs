//! The audit trail: every request that changes something (or tries to), with who, when, what
//! and the outcome. Append-only: the database refuses to change or delete an entry.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const REFUSAL: &str = "the audit trail is append-only";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("audit")
                    .col(big_pk_auto("id"))
                    .col(big_integer("at"))
                    .col(string("who"))
                    .col(string_null("address"))
                    .col(string("action"))
                    .col(text("object"))
                    .col(integer("status"))
                    .col(big_integer_null("command_id"))
                    .col(text_null("message"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("audit_by_who")
                    .table("audit")
                    .col("who")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        let statements = match manager.get_database_backend() {
            DatabaseBackend::Sqlite => ["UPDATE", "DELETE"]
                .iter()
                .map(|op| {
                    format!(
                        "CREATE TRIGGER audit_no_{} BEFORE {op} ON audit \
                         BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
                        op.to_lowercase()
                    )
                })
                .collect::<Vec<_>>(),
            _ => vec![
                format!(
                    "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql \
                     AS $$ BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$"
                ),
                "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit \
                 FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
                    .into(),
            ],
        };
        for sql in statements {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if manager.get_database_backend() == DatabaseBackend::Sqlite {
            db.execute_unprepared("DROP TRIGGER IF EXISTS audit_no_update")
                .await?;
            db.execute_unprepared("DROP TRIGGER IF EXISTS audit_no_delete")
                .await?;
        } else {
            db.execute_unprepared("DROP TRIGGER IF EXISTS audit_append_only ON audit")
                .await?;
            db.execute_unprepared("DROP FUNCTION IF EXISTS audit_append_only()")
                .await?;
        }
        manager
            .drop_table(Table::drop().table("audit").to_owned())
            .await
    }
}
