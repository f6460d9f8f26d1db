//! The event log: every change of a command's, container's, server's or environment's status
//! (and a container's move to another server) appends a row, written by triggers in the same
//! transaction as the change, so no code path can change a status without its event and no
//! event exists for a change that rolled back. `GET /v1/events` streams them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (table, topic, the `kind` column, related type and id, the server column, the `by` column,
/// the columns whose change is an event).
struct Source {
    table: &'static str,
    topic: &'static str,
    kind: &'static str,
    related_type: &'static str,
    related_id: &'static str,
    server_id: &'static str,
    by: &'static str,
    watched: &'static [&'static str],
}

const SOURCES: [Source; 4] = [
    Source {
        table: "commands",
        topic: "command",
        kind: "NEW.kind",
        related_type: "NEW.target_type",
        related_id: "NEW.target_id",
        server_id: "NULL",
        by: "NEW.requested_by",
        watched: &["status"],
    },
    Source {
        table: "containers",
        topic: "container",
        kind: "NEW.type_id",
        related_type: "CASE WHEN NEW.environment_id IS NULL THEN NULL ELSE 'environment' END",
        related_id: "NEW.environment_id",
        server_id: "NEW.server_id",
        by: "NULL",
        watched: &["status", "server_id"],
    },
    Source {
        table: "servers",
        topic: "server",
        kind: "NEW.driver",
        related_type: "NULL",
        related_id: "NULL",
        server_id: "NEW.id",
        by: "NULL",
        watched: &["status"],
    },
    Source {
        table: "environments",
        topic: "environment",
        kind: "NEW.name",
        related_type: "NULL",
        related_id: "NULL",
        server_id: "NULL",
        by: "NULL",
        watched: &["status"],
    },
];

impl Source {
    fn insert(&self, now: &str) -> String {
        format!(
            "INSERT INTO events (at, topic, object_id, action, kind, related_type, related_id, \
             server_id, requested_by) VALUES ({now}, '{}', NEW.id, NEW.status, {}, {}, {}, {}, {})",
            self.topic, self.kind, self.related_type, self.related_id, self.server_id, self.by
        )
    }

    fn changed(&self, distinct: &str) -> String {
        self.watched
            .iter()
            .map(|c| format!("OLD.{c} {distinct} NEW.{c}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    }
}

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
        let db = manager.get_connection();
        for s in &SOURCES {
            let columns = s.watched.join(", ");
            let statements = match manager.get_database_backend() {
                DatabaseBackend::Sqlite => {
                    let now = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
                    vec![
                        format!(
                            "CREATE TRIGGER events_{t}_insert AFTER INSERT ON {t} BEGIN {}; END",
                            s.insert(now),
                            t = s.table
                        ),
                        format!(
                            "CREATE TRIGGER events_{t}_update AFTER UPDATE OF {columns} ON {t} \
                             WHEN {} BEGIN {}; END",
                            s.changed("IS NOT"),
                            s.insert(now),
                            t = s.table
                        ),
                    ]
                }
                _ => {
                    let now = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";
                    vec![
                        format!(
                            "CREATE FUNCTION events_of_{t}() RETURNS trigger LANGUAGE plpgsql \
                             AS $$ BEGIN {}; RETURN NULL; END $$",
                            s.insert(now),
                            t = s.table
                        ),
                        format!(
                            "CREATE TRIGGER events_{t}_insert AFTER INSERT ON {t} FOR EACH ROW \
                             EXECUTE FUNCTION events_of_{t}()",
                            t = s.table
                        ),
                        format!(
                            "CREATE TRIGGER events_{t}_update AFTER UPDATE OF {columns} ON {t} \
                             FOR EACH ROW WHEN ({}) EXECUTE FUNCTION events_of_{t}()",
                            s.changed("IS DISTINCT FROM"),
                            t = s.table
                        ),
                    ]
                }
            };
            for sql in statements {
                db.execute_unprepared(&sql).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for s in &SOURCES {
            for when in ["insert", "update"] {
                let on = match manager.get_database_backend() {
                    DatabaseBackend::Sqlite => String::new(),
                    _ => format!(" ON {}", s.table),
                };
                db.execute_unprepared(&format!(
                    "DROP TRIGGER IF EXISTS events_{}_{when}{on}",
                    s.table
                ))
                .await?;
            }
            if manager.get_database_backend() != DatabaseBackend::Sqlite {
                db.execute_unprepared(&format!("DROP FUNCTION IF EXISTS events_of_{}()", s.table))
                    .await?;
            }
        }
        manager
            .drop_table(Table::drop().table("events").to_owned())
            .await
    }
}
