//! Projects: environments, containers and their commands and events belong to one; users get
//! roles per project (by user name: users of the configuration file have no row); each
//! project may limit what its containers use. Everything that existed
//! before belongs to the project `default` (id 1), which has no limits.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Tables that get a `project_id` column, and whether every row must have one.
const OWNED: [(&str, bool); 4] = [
    ("environments", true),
    ("containers", true),
    ("commands", false),
    ("events", false),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("projects")
                    .col(big_pk_auto("id"))
                    .col(string_uniq("name"))
                    .col(big_integer_null("max_containers"))
                    .col(big_integer_null("max_cpu_millis"))
                    .col(big_integer_null("max_memory_mb"))
                    .col(big_integer_null("max_disk_mb"))
                    .col(big_integer("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("project_grants")
                    .col(big_integer("project_id"))
                    .col(string("user_name"))
                    .col(string("role"))
                    .primary_key(Index::create().col("project_id").col("user_name"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("project_grants_by_user")
                    .table("project_grants")
                    .col("user_name")
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        db.execute_unprepared(
            "INSERT INTO projects (id, name, created_at) VALUES (1, 'default', 0)",
        )
        .await?;
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DatabaseBackend::Postgres {
            db.execute_unprepared(
                "SELECT setval(pg_get_serial_sequence('projects', 'id'), (SELECT MAX(id) FROM projects))",
            )
            .await?;
        }
        for (table, required) in OWNED {
            let column = if required {
                big_integer("project_id").default(1).to_owned()
            } else {
                big_integer_null("project_id")
            };
            manager
                .alter_table(Table::alter().table(table).add_column(column).to_owned())
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("containers_by_project")
                    .table("containers")
                    .col("project_id")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        // Every command was on containers and environments of the default project, but plugin
        // upgrades, which act on the whole fleet.
        db.execute_unprepared("UPDATE commands SET project_id = 1 WHERE kind <> 'plugin.upgrade'")
            .await?;
        crate::event_triggers::drop(manager).await?;
        crate::event_triggers::create(manager, crate::event_triggers::Columns::Project).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::event_triggers::drop(manager).await?;
        manager
            .drop_index(
                Index::drop()
                    .name("containers_by_project")
                    .table("containers")
                    .to_owned(),
            )
            .await?;
        for (table, _) in OWNED {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .drop_column("project_id")
                        .to_owned(),
                )
                .await?;
        }
        crate::event_triggers::create(manager, crate::event_triggers::Columns::First).await?;
        for table in ["project_grants", "projects"] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
