//! The triggers that append a row to `events` for every status change of a command,
//! container, server or environment (`m0013_events` made them; `m0016_projects` made them
//! again to fill each event's project; `m0021_postgres_writes` made them per statement on
//! PostgreSQL; `m0022_events_planned_once` made their statements static). Shared so that all make them from one description.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

/// (table, topic, the `kind` column, related type and id, the server column, the `by` column,
/// the project column, why (`m0026_event_reasons`), the columns whose change is an event).
struct Source {
    table: &'static str,
    topic: &'static str,
    kind: &'static str,
    related_type: &'static str,
    related_id: &'static str,
    server_id: &'static str,
    by: &'static str,
    /// The row's project (`NULL`: none, as for servers).
    project: &'static str,
    /// Why it is in its new status, where the status alone does not say.
    reason: &'static str,
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
        project: "NEW.project_id",
        reason: "NEW.error",
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
        project: "NEW.project_id",
        reason: "NEW.status_reason",
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
        project: "NULL",
        reason: "NULL",
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
        project: "NEW.project_id",
        reason: "NULL",
        watched: &["status"],
    },
];

/// The longest reason an event keeps, characters (a command's error can be long; the command
/// keeps it whole).
const REASON_CHARS: u32 = 1000;

/// Which of the later columns of `events` a trigger fills.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Columns {
    /// Those of `m0013_events`.
    First,
    /// And `project_id` (`m0016_projects`).
    Project,
    /// And `reason` (`m0026_event_reasons`).
    Reason,
}

impl Source {
    /// The statement a trigger runs, filling `columns`.
    fn insert(&self, now: &str, columns: Columns) -> String {
        let (column, value) = match columns {
            Columns::First => (String::new(), String::new()),
            Columns::Project => (", project_id".into(), format!(", {}", self.project)),
            Columns::Reason => (
                ", project_id, reason".into(),
                format!(
                    ", {}, substr({}, 1, {REASON_CHARS})",
                    self.project, self.reason
                ),
            ),
        };
        format!(
            "INSERT INTO events (at, topic, object_id, action, kind, related_type, related_id, \
             server_id, requested_by{column}) VALUES ({now}, '{}', NEW.id, NEW.status, {}, {}, {}, \
             {}, {}{value})",
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

/// Creates the triggers (and on PostgreSQL their functions), filling `columns`.
pub(crate) async fn create(manager: &SchemaManager<'_>, columns: Columns) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for s in &SOURCES {
        let watched = s.watched.join(", ");
        let statements = match manager.get_database_backend() {
            DatabaseBackend::Sqlite => {
                let now = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
                vec![
                    format!(
                        "CREATE TRIGGER events_{t}_insert AFTER INSERT ON {t} BEGIN {}; END",
                        s.insert(now, columns),
                        t = s.table
                    ),
                    format!(
                        "CREATE TRIGGER events_{t}_update AFTER UPDATE OF {watched} ON {t} \
                         WHEN {} BEGIN {}; END",
                        s.changed("IS NOT"),
                        s.insert(now, columns),
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
                        s.insert(now, columns),
                        t = s.table
                    ),
                    format!(
                        "CREATE TRIGGER events_{t}_insert AFTER INSERT ON {t} FOR EACH ROW \
                         EXECUTE FUNCTION events_of_{t}()",
                        t = s.table
                    ),
                    format!(
                        "CREATE TRIGGER events_{t}_update AFTER UPDATE OF {watched} ON {t} \
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

/// How a statement trigger's function plans its `INSERT … SELECT`.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Planned {
    /// `EXECUTE`d: planned at each call, for the size of its transition tables (`m0021`).
    EachCall,
    /// Static SQL, planned once per connection; the update's join never a nested loop, so the
    /// one plan suits one row and five hundred alike (`m0022`).
    Once,
}

/// The two functions (`_inserted`, `_updated`) of a table's statement triggers.
fn statement_functions(s: &Source, planned: Planned, columns: Columns) -> [String; 2] {
    let now = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";
    // The row expressions read `n`, the transition table's row, where the row triggers
    // read `NEW`.
    let insert = s.insert(now, columns).replace("NEW.", "n.");
    let (head, values) = insert
        .split_once(" VALUES (")
        .expect("an insert has VALUES");
    let values = values.strip_suffix(')').expect("VALUES end with )");
    let changed = s
        .changed("IS DISTINCT FROM")
        .replace("OLD.", "o.")
        .replace("NEW.", "n.");
    let inserted = format!("{head} SELECT {values} FROM new_rows n ORDER BY n.id");
    let updated = format!(
        "{head} SELECT {values} FROM new_rows n \
         JOIN old_rows o ON o.id = n.id WHERE {changed} ORDER BY n.id"
    );
    let t = s.table;
    match planned {
        // Inside `EXECUTE '…'` quotes are doubled.
        Planned::EachCall => [("inserted", inserted), ("updated", updated)].map(|(what, sql)| {
            format!(
                "CREATE FUNCTION events_of_{t}_{what}() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN EXECUTE '{}'; RETURN NULL; END $$",
                sql.replace('\'', "''")
            )
        }),
        Planned::Once => [
            format!(
                "CREATE OR REPLACE FUNCTION events_of_{t}_inserted() RETURNS trigger \
                 LANGUAGE plpgsql AS $$ BEGIN {inserted}; RETURN NULL; END $$"
            ),
            format!(
                "CREATE OR REPLACE FUNCTION events_of_{t}_updated() RETURNS trigger \
                 LANGUAGE plpgsql SET enable_nestloop = off \
                 AS $$ BEGIN {updated}; RETURN NULL; END $$"
            ),
        ],
    }
}

/// On PostgreSQL, makes the triggers again as statement triggers over transition tables (each
/// with its row's project): one `INSERT … SELECT` per statement that inserts or updates rows,
/// instead of a PL/pgSQL call per row, planned at each call. An update's events are the rows
/// whose watched columns changed, in id order. The triggers must have been dropped (`drop`)
/// before.
pub(crate) async fn create_per_statement(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for s in &SOURCES {
        let [inserted, updated] = statement_functions(s, Planned::EachCall, Columns::Project);
        let statements = [
            inserted,
            updated,
            format!(
                "CREATE TRIGGER events_{t}_insert AFTER INSERT ON {t} \
                 REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT \
                 EXECUTE FUNCTION events_of_{t}_inserted()",
                t = s.table
            ),
            // A statement trigger with transition tables cannot name columns (`UPDATE OF`):
            // every update runs it, and the join keeps the rows whose watched columns changed.
            format!(
                "CREATE TRIGGER events_{t}_update AFTER UPDATE ON {t} \
                 REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT \
                 EXECUTE FUNCTION events_of_{t}_updated()",
                t = s.table
            ),
        ];
        for sql in statements {
            db.execute_unprepared(&sql).await?;
        }
    }
    Ok(())
}

/// On PostgreSQL, replaces the statement triggers' functions by ones planned as `planned`
/// says, filling `columns` (the triggers stay).
pub(crate) async fn replan_per_statement(
    manager: &SchemaManager<'_>,
    planned: Planned,
    columns: Columns,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for s in &SOURCES {
        for sql in statement_functions(s, planned, columns) {
            db.execute_unprepared(&sql.replacen(
                "CREATE FUNCTION",
                "CREATE OR REPLACE FUNCTION",
                1,
            ))
            .await?;
        }
    }
    Ok(())
}

/// Drops the triggers (and on PostgreSQL their functions).
pub(crate) async fn drop(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
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
    Ok(())
}

/// Drops what `create_per_statement` made (PostgreSQL).
pub(crate) async fn drop_per_statement(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for s in &SOURCES {
        for when in ["insert", "update"] {
            db.execute_unprepared(&format!(
                "DROP TRIGGER IF EXISTS events_{t}_{when} ON {t}",
                t = s.table
            ))
            .await?;
        }
        for what in ["inserted", "updated"] {
            db.execute_unprepared(&format!(
                "DROP FUNCTION IF EXISTS events_of_{}_{what}()",
                s.table
            ))
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `m0021` and `m0022` build their functions from the shared description: a change to it
    /// must not change what those released migrations run.
    #[test]
    fn released_statement_functions_are_unchanged() {
        let head = "INSERT INTO events (at, topic, object_id, action, kind, related_type, \
            related_id, server_id, requested_by, project_id) SELECT (EXTRACT(EPOCH FROM \
            clock_timestamp()) * 1000)::BIGINT, 'command', n.id, n.status, n.kind, \
            n.target_type, n.target_id, NULL, n.requested_by, n.project_id FROM new_rows n";
        let commands = &SOURCES[0];
        assert_eq!(
            statement_functions(commands, Planned::EachCall, Columns::Project),
            [
                format!(
                    "CREATE FUNCTION events_of_commands_inserted() RETURNS trigger LANGUAGE \
                     plpgsql AS $$ BEGIN EXECUTE '{}'; RETURN NULL; END $$",
                    format!("{head} ORDER BY n.id").replace('\'', "''")
                ),
                format!(
                    "CREATE FUNCTION events_of_commands_updated() RETURNS trigger LANGUAGE \
                     plpgsql AS $$ BEGIN EXECUTE '{}'; RETURN NULL; END $$",
                    format!(
                        "{head} JOIN old_rows o ON o.id = n.id \
                         WHERE o.status IS DISTINCT FROM n.status ORDER BY n.id"
                    )
                    .replace('\'', "''")
                ),
            ]
        );
        assert_eq!(
            statement_functions(commands, Planned::Once, Columns::Project),
            [
                format!(
                    "CREATE OR REPLACE FUNCTION events_of_commands_inserted() RETURNS trigger \
                     LANGUAGE plpgsql AS $$ BEGIN {head} ORDER BY n.id; RETURN NULL; END $$"
                ),
                format!(
                    "CREATE OR REPLACE FUNCTION events_of_commands_updated() RETURNS trigger \
                     LANGUAGE plpgsql SET enable_nestloop = off AS $$ BEGIN {head} \
                     JOIN old_rows o ON o.id = n.id WHERE o.status IS DISTINCT FROM n.status \
                     ORDER BY n.id; RETURN NULL; END $$"
                ),
            ]
        );
    }

    /// `m0026_event_reasons`: a command's event says its error and a container's its status
    /// reason, cut to `REASON_CHARS`; a row trigger (SQLite) reads `NEW`, a statement's `n`.
    #[test]
    fn events_carry_a_reason() {
        let [inserted, _] = statement_functions(&SOURCES[0], Planned::Once, Columns::Reason);
        assert!(
            inserted.contains("requested_by, project_id, reason) SELECT")
                && inserted.contains("n.project_id, substr(n.error, 1, 1000) FROM new_rows n"),
            "{inserted}"
        );
        let row = SOURCES[1].insert("now()", Columns::Reason);
        assert!(
            row.ends_with("NEW.project_id, substr(NEW.status_reason, 1, 1000))"),
            "{row}"
        );
        assert!(
            SOURCES[2]
                .insert("now()", Columns::Reason)
                .ends_with("NULL, substr(NULL, 1, 1000))")
        );
    }
}
