//! Opening the core's database: SQLite in WAL mode by default or PostgreSQL, migrated; a
//! reader for long reads; the node id that names this core.

use super::*;
use sea_orm::ConnectionTrait;

/// A connection for long reads that must not hold up the core's own work (the metrics'
/// census): on SQLite a second, read-only connection (WAL lets it read while the core's one
/// connection writes); on PostgreSQL the pool itself.
pub async fn reader(
    config: &CoreConfig,
    db: &DatabaseConnection,
) -> Result<DatabaseConnection, CoreError> {
    if config.database_url.is_some() {
        return Ok(db.clone());
    }
    let path = config.data_dir.join("cloud48.db");
    let mut opt = ConnectOptions::new(format!("sqlite://{}", path.display()));
    opt.sqlx_logging(true)
        .max_connections(1)
        .min_connections(0)
        .test_before_acquire(false)
        .map_sqlx_sqlite_opts(|o| o.read_only(true).busy_timeout(Duration::from_secs(10)));
    Database::connect(opt)
        .await
        .map_err(|e| CoreError::Setup(format!("cannot open {} to read: {e}", path.display())))
}

/// Opens the core's database (creating the data directory, running the migrations).
pub async fn connect(config: &CoreConfig) -> Result<DatabaseConnection, CoreError> {
    create_data_dir(config)?;
    let setup = SetupLock::take(config).await?;
    let db = connect_as(config, None).await;
    setup.release().await;
    db
}

/// The data directory's lock (`DATA/core.lock`), which one core at a time holds until it
/// stops: a second core on the same files would act on servers and containers the first one
/// runs (on SQLite), or run as the same node as the first (on PostgreSQL: the same `node-id`,
/// so each would take the other's commands for its own, left over from a restart, and run them
/// again). Released by `Core::stop`, or by the system when the process ends.
pub(super) fn lock_data_dir(config: &CoreConfig) -> Result<Option<std::fs::File>, CoreError> {
    let path = config.data_dir.join("core.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CoreError::Setup(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(CoreError::Setup(format!(
            "another core is running on {} (it holds {}); stop it first, or give this one another --data-dir (several cores share a PostgreSQL database, not a data directory)",
            config.data_dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(CoreError::Setup(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// The key of the advisory lock of [`SetupLock`].
const SETUP_LOCK: i64 = 0x0c10_0d48_5e70;

/// On PostgreSQL, a session-level advisory lock that cores starting together on one database
/// hold around their first-start work (the migrations, the local platform, the simulated
/// servers, the bundled plugins), so that one does it and the others find it done instead of
/// failing on each other's rows. It lives on a connection of its own: released by `release`,
/// or by PostgreSQL when that connection closes (its holder failed or died). SQLite: nothing
/// (one core per file).
pub(super) struct SetupLock(Option<DatabaseConnection>);

impl SetupLock {
    /// Waits for the lock.
    pub(super) async fn take(config: &CoreConfig) -> Result<SetupLock, CoreError> {
        if config.database_url.is_none() {
            return Ok(SetupLock(None));
        }
        let mut opt = options(config, None);
        opt.max_connections(1).min_connections(1);
        let url = shown(opt.get_url());
        // The pool retries a refused connection until its timeout and then says only that it
        // timed out: one connection first says what is wrong, at once.
        reachable(opt.get_url())
            .await
            .map_err(|why| CoreError::Setup(format!("cannot open database {url}: {why}")))?;
        let conn = Database::connect(opt)
            .await
            .map_err(|e| CoreError::Setup(format!("cannot open database {url}: {e}")))?;
        let cannot = |e: sea_orm::DbErr| {
            CoreError::Setup(format!(
                "cannot wait for other cores starting on {url} to finish setting it up: {e}"
            ))
        };
        let taken = conn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                format!("SELECT pg_try_advisory_lock({SETUP_LOCK}) AS taken"),
            ))
            .await
            .map_err(cannot)?
            .map(|row| row.try_get::<bool>("", "taken"))
            .transpose()
            .map_err(cannot)?;
        if taken == Some(true) {
            return Ok(SetupLock(Some(conn)));
        }
        tracing::info!(
            "another core is setting this database up (migrations, the first start): waiting for it"
        );
        conn.execute_unprepared(&format!("SELECT pg_advisory_lock({SETUP_LOCK})"))
            .await
            .map_err(|e| {
                CoreError::Setup(format!(
                    "cannot wait for other cores starting on {url} to finish setting it up: {e}"
                ))
            })?;
        Ok(SetupLock(Some(conn)))
    }

    /// Lets the next starting core in.
    pub(super) async fn release(self) {
        if let Some(conn) = self.0 {
            let _ = conn
                .execute_unprepared(&format!("SELECT pg_advisory_unlock({SETUP_LOCK})"))
                .await;
            let _ = conn.close().await;
        }
    }
}

/// Creates the data directory, readable by its owner only when this call makes it; the
/// SQLite database in it (it holds the users' Digest hashes, as good as passwords, and the key
/// of every environment's secrets) is made readable by its owner only too. An existing
/// directory keeps its mode: it may be shared on purpose.
pub(super) fn create_data_dir(config: &CoreConfig) -> Result<(), CoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = &config.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            CoreError::Setup(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
    if config.database_url.is_some() {
        return Ok(());
    }
    let db = dir.join("cloud48.db");
    let cannot = |e: std::io::Error| CoreError::Setup(format!("cannot open {}: {e}", db.display()));
    // Made here with the mode it keeps (SQLite gives its journal files the same).
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&db)
        .map_err(cannot)?;
    let mode = std::fs::metadata(&db).map_err(cannot)?.permissions().mode();
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => tracing::warn!(
                file = %db.display(),
                was = format!("{:o}", mode & 0o777),
                "the database could be read by other users (it holds password hashes and the secrets' key): made it readable by its owner only (600)"
            ),
            Err(e) => tracing::warn!(
                file = %db.display(),
                error = %e,
                "the database can be read by other users (it holds password hashes and the secrets' key) and could not be closed: chmod 600 it"
            ),
        }
    }
    Ok(())
}

/// How long a PostgreSQL connection may have been idle before the pool pings it before
/// handing it out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// `connect` into an existing data directory; on PostgreSQL the connections carry `node` as
/// their `application_name`, which names this core in the work `NOTIFY`s of its inserts
/// (`cluster::listen_for_work`).
pub(super) async fn connect_as(
    config: &CoreConfig,
    node: Option<&str>,
) -> Result<DatabaseConnection, CoreError> {
    let opt = options(config, node);
    let url = shown(opt.get_url());
    let db = Database::connect(opt)
        .await
        .map_err(|e| CoreError::Setup(format!("cannot open database {url}: {e}")))?;
    use migrations::sea_orm_migration::MigratorTrait;
    migrations::Migrator::up(&db, None)
        .await
        .map_err(|e| CoreError::Setup(migration_failed(&e.to_string())))?;
    Ok(db)
}

/// What a failed migration means: a database a newer release has upgraded (its migration is
/// unknown to this one) is said as such, with what to do.
fn migration_failed(error: &str) -> String {
    let newer = error
        .split_once("Migration file of version '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .filter(|_| error.contains("is missing"))
        .map(|(version, _)| version);
    match newer {
        Some(version) => format!(
            "the database was upgraded by a newer Cloud48 (its schema has migration {version}, \
             which this release does not know); run that release or a newer one on it (a \
             release never downgrades a database: restore a backup taken before the upgrade to \
             go back)"
        ),
        None => format!("database migration failed: {error}"),
    }
}

/// A database URL as messages show it: without its password (in the user part or a
/// `password=` parameter).
pub(crate) fn shown(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The user part ends at the last '@' (a password may hold '/', '?' or '#').
    let (authority, path) = match rest.rsplit_once('@') {
        Some((userinfo, after)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') { ":****" } else { "" };
            let host_end = after.find('/').unwrap_or(after.len());
            (
                format!("{user}{masked}@{}", &after[..host_end]),
                &after[host_end..],
            )
        }
        None => {
            let host_end = rest.find('/').unwrap_or(rest.len());
            (rest[..host_end].to_string(), &rest[host_end..])
        }
    };
    let path = match path.split_once("password=") {
        Some((before, after)) => {
            let rest = after.find('&').map_or("", |i| &after[i..]);
            format!("{before}password=****{rest}")
        }
        None => path.to_string(),
    };
    format!("{scheme}://{authority}{path}")
}

/// Opens and closes one connection to the PostgreSQL database at `url` (SQLite: nothing),
/// saying what is wrong when it cannot: refused, no answer, no such database or role.
async fn reachable(url: &str) -> Result<(), String> {
    use sea_orm::sqlx::Connection;
    use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
    if !url.starts_with("postgres") {
        return Ok(());
    }
    let opts: PgConnectOptions = url.parse().map_err(|e| {
        format!("not a PostgreSQL URL ({e}); write postgres://USER:PASSWORD@HOST:PORT/DATABASE")
    })?;
    let connected =
        tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&opts)).await;
    match connected {
        Err(_) => Err(
            "no answer within 10 s: is the host right, and does a firewall let the port through?"
                .into(),
        ),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(sea_orm::sqlx::Error::Database(e))) => Err(match e.code().as_deref() {
            // invalid_catalog_name
            Some("3D000") => format!(
                "{}: create it (`createdb NAME` as a PostgreSQL superuser) or fix the database in the URL",
                e.message()
            ),
            // invalid_authorization_specification, invalid_password
            Some("28000" | "28P01") => format!(
                "{}: fix the user or password in the URL, or let that user in (pg_hba.conf, CREATE ROLE)",
                e.message()
            ),
            _ => e.message().to_string(),
        }),
        Ok(Err(sea_orm::sqlx::Error::Io(e))) => Err(format!(
            "{e}: is PostgreSQL running and listening at {}:{}?",
            opts.get_host(),
            opts.get_port()
        )),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// How `connect_as` opens the database.
pub(super) fn options(config: &CoreConfig, node: Option<&str>) -> ConnectOptions {
    let url = config
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", config.data_dir.join("cloud48.db").display()));
    let mut opt = ConnectOptions::new(url.clone());
    // Each statement is logged with its rows and time at `sqlx=info`, which `CLOUD48_LOG`
    // filters out by default.
    opt.sqlx_logging(true);
    if url.starts_with("sqlite:") {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        // One connection: SQLite has one writer anyway, and a single connection avoids
        // SQLITE_BUSY between our own transactions.
        // A local file cannot go stale, so the pool does not ping it before handing it out (a
        // round trip to SQLite's thread per statement).
        opt.max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
            });
    } else {
        // No JIT: the core's statements are short, and a claim whose estimated cost passed
        // `jit_above_cost` spent 50 of its 70 ms compiling itself (`auto_explain`).
        let node = node.map(str::to_string);
        // A connection in use a moment ago is handed out without a ping (a round trip before
        // every statement or transaction; the pool pings each connection it takes back
        // anyway); one idle for a second is pinged first, and a dead one replaced (the
        // database restarted, a proxy dropped it).
        opt.max_connections(config.db_connections.max(2))
            .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
            .map_sqlx_postgres_opts(move |o| {
                let o = o.options([("jit", "off")]);
                match &node {
                    Some(node) => o.application_name(node),
                    None => o,
                }
            });
    }
    opt
}

pub(super) fn node_id(data_dir: &std::path::Path) -> Result<String, CoreError> {
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("core-{:016x}", rand::random::<u64>());
    std::fs::write(&path, &id)
        .map_err(|e| CoreError::Setup(format!("cannot write {}: {e}", path.display())))?;
    Ok(id)
}

#[cfg(test)]
mod migration_tests {
    #[test]
    fn a_shown_url_keeps_all_but_the_password() {
        use super::shown;
        assert_eq!(
            shown("postgres://ada:S3cret@db:5432/cloud48?sslmode=require"),
            "postgres://ada:****@db:5432/cloud48?sslmode=require"
        );
        assert_eq!(
            shown("postgres://ada@db/cloud48"),
            "postgres://ada@db/cloud48"
        );
        assert_eq!(
            shown("postgres://db/c?user=ada&password=S3cret&x=1"),
            "postgres://db/c?user=ada&password=****&x=1"
        );
        assert_eq!(shown("sqlite:///var/c.db"), "sqlite:///var/c.db");
        assert_eq!(
            shown("postgres://ada:a/b?c#d@db:5432/cloud48"),
            "postgres://ada:****@db:5432/cloud48"
        );
    }

    /// The message sea-orm gives for a database with a migration this build lacks.
    #[test]
    fn a_database_of_a_newer_release_is_said_as_such() {
        let e = super::migration_failed(
            "Custom Error: Migration file of version 'm0099_future' is missing, this migration \
             has been applied but its file is missing",
        );
        assert!(
            e.starts_with("the database was upgraded by a newer Cloud48")
                && e.contains("migration m0099_future")
                && e.contains("run that release or a newer one"),
            "{e}"
        );
        assert_eq!(
            super::migration_failed("disk full"),
            "database migration failed: disk full"
        );
    }
}
