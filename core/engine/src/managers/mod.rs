//! ContainerManager, EnvironmentManager and ServerManager: the core's public operations.
//!
//! A mutation validates its input against the current state, then persists the objects it
//! creates and its command in one transaction, and returns the command id at once. Nothing is
//! written when validation fails.

use std::collections::HashMap;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::core::CoreError;
use crate::entities::{container, environment, origin_identity, server};
use crate::model::*;
use crate::queue::{NewCommand, Target};
use crate::services::Services;

mod containers;
mod environments;
mod servers;
mod transfer;

pub(crate) use environments::unclonable;
pub use environments::{AddContainer, EnvironmentManager, EnvironmentOp};
pub use servers::{DrainReport, ServerManager};

/// A lifecycle command on an existing container (`create` goes through
/// `ContainerManager::create` or an environment's `add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContainerCommand {
    /// Start a stopped container.
    Start {},
    /// Stop a running or suspended container.
    Stop {},
    /// Freeze a running container.
    Suspend {},
    /// Thaw a suspended container.
    Resume {},
    /// Restart a running container.
    Reboot {},
    /// Destroy a container.
    Destroy {},
    /// Change the resources of a container.
    Update {
        /// New resources.
        resources: Resources,
    },
    /// Copy a container (cold: a running source is stopped while copied, then started again).
    Clone {
        /// Server name for the copy; default: the source's server.
        server: Option<String>,
    },
    /// Move a container to another server (cold).
    Migrate {
        /// Name of the target server; default: placement chooses (never the current server).
        #[serde(default)]
        to: Option<String>,
        /// Without stopping it (live). Refused with the reason while no driver can.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        live: bool,
    },
}

impl ContainerCommand {
    /// Command kind, e.g. `container.start`.
    pub fn kind(&self) -> CommandKind {
        match self {
            ContainerCommand::Start {} => CommandKind::ContainerStart,
            ContainerCommand::Stop {} => CommandKind::ContainerStop,
            ContainerCommand::Suspend {} => CommandKind::ContainerSuspend,
            ContainerCommand::Resume {} => CommandKind::ContainerResume,
            ContainerCommand::Reboot {} => CommandKind::ContainerReboot,
            ContainerCommand::Destroy {} => CommandKind::ContainerDestroy,
            ContainerCommand::Update { .. } => CommandKind::ContainerUpdate,
            ContainerCommand::Clone { .. } => CommandKind::ContainerClone,
            ContainerCommand::Migrate { .. } => CommandKind::ContainerMigrate,
        }
    }

    /// Statuses from which the command may run.
    pub fn allowed_from(&self) -> &'static [ContainerStatus] {
        use ContainerStatus::*;
        match self {
            ContainerCommand::Start {} => &[Stopped],
            ContainerCommand::Stop {} => &[Running, Suspended],
            ContainerCommand::Suspend {} => &[Running],
            ContainerCommand::Resume {} => &[Suspended],
            ContainerCommand::Reboot {} => &[Running],
            ContainerCommand::Destroy {} => &[Creating, Running, Stopped, Suspended, Down],
            ContainerCommand::Update { .. } => &[Running, Stopped, Suspended],
            ContainerCommand::Clone { .. } | ContainerCommand::Migrate { .. } => {
                &[Running, Stopped]
            }
        }
    }
}

/// Checks that `status` allows `op`; the message says what the container must be.
pub fn check_status(
    id: i64,
    status: ContainerStatus,
    op: &str,
    allowed: &[ContainerStatus],
) -> Result<(), String> {
    if allowed.contains(&status) {
        return Ok(());
    }
    let want = allowed
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    Err(format!(
        "container {id} is {status}; {op} needs a container that is {want}"
    ))
}

/// Which containers to find.
#[derive(Debug, Clone, Default, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ContainerQuery {
    /// Only members of this environment (id or name).
    pub environment: Option<String>,
    /// Only this status.
    pub status: Option<ContainerStatus>,
    /// Only on this server (name).
    pub server: Option<String>,
    /// Only in this project (name or id).
    pub project: Option<String>,
    /// Only this type.
    #[serde(rename = "type")]
    pub type_id: Option<String>,
    /// Include destroyed and failed containers (default false).
    #[serde(default)]
    pub all: bool,
    /// At most this many, by ascending id (1-1000; default 1000).
    #[serde(default, deserialize_with = "page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only containers with a greater id (the next page).
    #[serde(default, deserialize_with = "cursor")]
    pub after: Option<ContainerId>,
}

/// The most items one page of a list holds; lists are read page by page (`after`/`before`).
pub const MAX_PAGE: u64 = 1000;

/// Reads a list's `limit` (serde `deserialize_with`): 1 to `MAX_PAGE`, as its schema says.
pub fn page_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    match Option::<u64>::deserialize(d)? {
        None => Ok(None),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(D::Error::custom(format!(
            "limit {n} is not 1-{MAX_PAGE}: a page holds 1 to {MAX_PAGE} items (the `Link` \
             header's cursor reads the next)"
        ))),
    }
}

/// A page's cursor (`after`): an id, so 0 or more.
pub fn cursor<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<i64>,
{
    use serde::de::Error;
    match Option::<i64>::deserialize(d)? {
        None => Ok(None),
        Some(n) if n >= 0 => Ok(Some(T::from(n))),
        Some(n) => Err(D::Error::custom(format!(
            "after {n} is not an id: ids are 0 or more (the `Link` header gives the next page's)"
        ))),
    }
}

/// The items a page holds when `limit` are asked for (none: a full page).
pub fn page_size(limit: Option<u32>) -> u64 {
    limit.map_or(MAX_PAGE, u64::from).clamp(1, MAX_PAGE)
}

/// Request to create a standalone container.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    /// Container type id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Server name; default: the server with the most free memory that fits.
    pub server: Option<String>,
    /// Requirements; default: the type's.
    pub requirements: Option<Requirements>,
    /// How many such containers (1-10,000; default 1). More than one are made by one
    /// `container.create_many` command; its result lists those that failed.
    #[serde(default)]
    pub count: Option<u32>,
    /// Project (name or id) it belongs to; default: `default`.
    #[serde(default)]
    pub project: Option<String>,
}

/// A container exported from one platform for import into another.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerExport {
    /// Format version of this document.
    pub format: u32,
    /// Name of the exporting platform.
    pub platform: String,
    /// Container id on the exporting platform.
    pub container_id: ContainerId,
    /// Guest id on the exporting platform.
    pub guest_id: String,
    /// Container type id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Requirements.
    pub requirements: Requirements,
    /// The opaque state blob, hex-encoded.
    pub state_hex: String,
    /// The disk image, hex-encoded.
    pub disk_hex: String,
}

impl ContainerExport {
    /// The format of a whole export in JSON (`disk_hex` holds the disk).
    pub const FORMAT: u32 = 1;
    /// The format of an export's description in an archive, its disk beside it
    /// (`crate::export_archive`).
    pub const STREAMED: u32 = 2;
}

/// Where an exported container's disk is.
pub enum ExportDisk {
    /// In hand (a server in this core's process).
    Bytes(Vec<u8>),
    /// An export kept by the server's agent at `url`, pulled from it as it streams on.
    Agent {
        /// The agent.
        url: String,
        /// Its export id.
        export: String,
    },
}

/// What `container purge` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PurgeReport {
    /// Failed containers deleted.
    pub purged: u64,
    /// Failed containers kept, each with the reason (their server could not destroy the guest).
    pub kept: Vec<String>,
}

/// The ContainerManager of the design notes: `run`, `find`, `get_by_id`, `get`, `put`.
pub struct ContainerManager<'a> {
    svc: &'a Services,
}

pub(crate) async fn load_container<C: ConnectionTrait>(
    conn: &C,
    id: i64,
) -> Result<container::Model, CoreError> {
    container::Entity::find_by_id(id)
        .one(conn)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("container {id} does not exist")))
}

/// A container's stored requirements.
fn requirements_of_row(row: &container::Model) -> Result<Requirements, CoreError> {
    serde_json::from_str(&row.requirements).map_err(|e| {
        CoreError::Corrupt(format!(
            "container {}: unreadable requirements: {e}",
            row.id
        ))
    })
}

/// A container's stored status. One this core does not know (written by a newer core, or
/// damaged) is an error that names the container, never `failed`.
pub(crate) fn parse_status(container: i64, status: &str) -> Result<ContainerStatus, UnknownStatus> {
    status.parse().map_err(|_| UnknownStatus {
        container,
        status: status.to_string(),
    })
}

/// A container's stored status that this core does not know.
#[derive(Debug, thiserror::Error)]
#[error(
    "container {container}: unknown status '{status}' in the database (written by a newer \
     Cloud48, or damaged); this core cannot act on it"
)]
pub struct UnknownStatus {
    /// The container.
    pub container: i64,
    /// The stored text.
    pub status: String,
}

impl From<UnknownStatus> for CoreError {
    fn from(e: UnknownStatus) -> Self {
        CoreError::Corrupt(e.to_string())
    }
}

impl From<UnknownStatus> for crate::queue::StepError {
    fn from(e: UnknownStatus) -> Self {
        crate::queue::StepError::Permanent(e.to_string())
    }
}

pub(crate) async fn server_by_name<C: ConnectionTrait>(
    conn: &C,
    field: &str,
    name: &str,
) -> Result<server::Model, CoreError> {
    server::Entity::find()
        .filter(server::Column::Name.eq(name))
        .one(conn)
        .await?
        .ok_or_else(|| {
            CoreError::invalid(
                field,
                format!("server '{name}' does not exist (see `cloud48 server list`)"),
            )
        })
}

/// A new container row in status `creating`, with no server yet (its guest id is set once
/// its id is known). Its initial state comes from its type, which for a plugin is a call into
/// a fresh WASM instance: make rows before taking a transaction where that can be done. A type
/// whose `initial-state` fails (a trap, a timeout, an oversized state) makes none.
pub fn creating_row(
    svc: &Services,
    ty: &dyn crate::types::ContainerType,
    requirements: &str,
    environment: Option<i64>,
    project: i64,
) -> Result<container::ActiveModel, CoreError> {
    let state = ty
        .initial_state()
        .map_err(|e| CoreError::Conflict(format!("a new container cannot be made: {e}")))?;
    Ok(row_with_state(
        svc,
        ty,
        requirements,
        (environment, project),
        state,
    ))
}

/// `creating_row` with a state known already (an environment's add ran its type's
/// `initial-state` before its hooks; an import brings its own).
fn row_with_state(
    svc: &Services,
    ty: &dyn crate::types::ContainerType,
    requirements: &str,
    (environment, project): (Option<i64>, i64),
    state: Vec<u8>,
) -> container::ActiveModel {
    let now = now_ms();
    container::ActiveModel {
        platform_id: Set(svc.platform_id()),
        // The type's own id (`tomcat@1.0.0`), not the name asked for: upgrades, removal and
        // exports go by it.
        type_id: Set(ty.type_id().to_string()),
        state: Set(state),
        status: Set(ContainerStatus::Creating.as_str().into()),
        server_id: Set(None),
        environment_id: Set(environment),
        project_id: Set(project),
        guest_id: Set(String::new()),
        ip: Set(None),
        requirements: Set(requirements.to_string()),
        locked_by: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
}

/// Most containers one `container.create_many` makes.
pub const MAX_BATCH: u32 = 10_000;

/// Guest id of a container: unique on the platform and fixed at creation, so that creating it
/// twice on a server is detectable.
pub(crate) fn guest_id_for(platform: &str, id: i64) -> String {
    format!("{}{id}", guest_id_prefix(platform))
}

/// What a guest id is before the container's id (statements that name many containers at
/// once append `CAST(id AS TEXT)` to it).
pub(crate) fn guest_id_prefix(platform: &str) -> String {
    format!("{platform}-c")
}

/// Persists new containers (`rows`, made by [`creating_row`]) and a create command for each
/// (`command(index in rows, container id)`): every container named by its id ([`guest_id_for`]) and, with
/// `lock`, locked by its create from the start. On PostgreSQL the ids are drawn from the
/// sequences first, so every row is written once, whole; on SQLite the containers are named
/// (and locked) by an update after the inserts. Returns (container, command) pairs in the order
/// of `rows`. Database work only: run it in the submission's transaction.
pub async fn insert_creates<C: ConnectionTrait>(
    conn: &C,
    queue: &crate::queue::Queue,
    platform: &str,
    mut rows: Vec<container::ActiveModel>,
    command: impl Fn(usize, i64) -> NewCommand,
    lock: bool,
) -> Result<Vec<(i64, i64)>, sea_orm::DbErr> {
    use crate::queue::store;
    let n = rows.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    // A create's project is its container's: given, so no statement looks it up per row.
    let projects: Vec<Option<i64>> = rows.iter().map(|r| r.project_id.clone().take()).collect();
    let command = |i: usize, id: i64| {
        let mut c = command(i, id);
        c.project = c.project.or(projects[i]);
        c
    };
    // On PostgreSQL the ids come first and each container is inserted whole; on SQLite the
    // insert numbers them, and one update names (and locks) them after the commands exist.
    let drawn = store::next_ids(conn, &["containers", "commands"], n).await?;
    let ids = match &drawn {
        Some(drawn) => {
            for ((row, id), number) in rows.iter_mut().zip(&drawn[0]).zip(&drawn[1]) {
                row.id = Set(*id);
                row.guest_id = Set(guest_id_for(platform, *id));
                row.locked_by = Set(lock.then_some(*number));
            }
            container::Entity::insert_many(rows)
                .exec_without_returning(conn)
                .await?;
            drawn[0].clone()
        }
        None => {
            let backend = conn.get_database_backend();
            let mut insert =
                sea_orm::QueryTrait::build(&container::Entity::insert_many(rows), backend);
            if backend != sea_orm::DatabaseBackend::Sqlite {
                insert.sql.push_str(" RETURNING id");
            }
            store::inserted_ids(conn, insert, n).await?
        }
    };
    let commands = ids
        .iter()
        .enumerate()
        .map(|(i, id)| command(i, *id))
        .collect();
    let numbers = match &drawn {
        Some(drawn) => queue.enqueue_numbered(conn, commands, &drawn[1]).await?,
        None => queue.enqueue_in(conn, commands, None).await?,
    };
    let pairs: Vec<(i64, i64)> = ids.into_iter().zip(numbers).collect();
    if drawn.is_none() {
        name_and_lock(conn, platform, &pairs, lock).await?;
    }
    Ok(pairs)
}

/// Gives new containers their guest ids and, with `lock`, locks each for the command that
/// creates it (`(container, command)` pairs of a bulk submission), one statement per 300
/// containers.
async fn name_and_lock<C: sea_orm::ConnectionTrait>(
    conn: &C,
    platform: &str,
    pairs: &[(i64, i64)],
    lock: bool,
) -> Result<(), sea_orm::DbErr> {
    for chunk in pairs.chunks(crate::queue::store::GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(id, cmd)| {
                vec![
                    (*id).into(),
                    guest_id_for(platform, *id).into(),
                    lock.then_some(*cmd).into(),
                ]
            })
            .collect();
        let (v, values) =
            crate::queue::store::rows_source(conn, &["BIGINT", "TEXT", "BIGINT"], rows, 1);
        let text = format!(
            "UPDATE containers SET guest_id = v.column2, locked_by = v.column3 FROM {v} WHERE containers.id = v.column1"
        );
        conn.execute_raw(crate::queue::store::sql(conn, &text, values))
            .await?;
    }
    Ok(())
}

/// A one-line title of a script: its first `# cloud48:` comment, else its first line.
fn script_title(script: &str) -> String {
    let first = script
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    first
        .strip_prefix("# cloud48:")
        .map_or(first, str::trim)
        .chars()
        .take(120)
        .collect()
}

/// A new container, checked and ready to insert. Its initial state comes from its type, which
/// for a plugin is a call into a fresh WASM instance: it is made here, before any transaction.
pub(crate) struct NewContainer {
    row: container::ActiveModel,
    server_id: Option<i64>,
}

/// Checks a new container's type, requirements, named server and its project's quota, and
/// makes its row, with `state` or else its type's initial state.
pub(crate) async fn prepare_container(
    svc: &Services,
    type_id: &str,
    server: Option<&str>,
    requirements: Option<Requirements>,
    (environment, project): (Option<i64>, i64),
    state: Option<Vec<u8>>,
) -> Result<NewContainer, CoreError> {
    let (ty, requirements, server_id) = checked_new(svc, type_id, server, requirements).await?;
    crate::projects::check(
        svc.db(),
        project,
        &Usage::of(1, &requirements.resources),
        None,
    )
    .await?;
    let requirements = serde_json::to_string(&requirements).expect("serializable");
    let row = match state {
        Some(state) => row_with_state(
            svc,
            ty.as_ref(),
            &requirements,
            (environment, project),
            state,
        ),
        None => creating_row(svc, ty.as_ref(), &requirements, environment, project)?,
    };
    Ok(NewContainer { row, server_id })
}

/// A new container's type, its requirements (the type's by default, validated) and the server
/// the user named.
async fn checked_new(
    svc: &Services,
    type_id: &str,
    server: Option<&str>,
    requirements: Option<Requirements>,
) -> Result<
    (
        std::sync::Arc<dyn crate::types::ContainerType>,
        Requirements,
        Option<i64>,
    ),
    CoreError,
> {
    let ty = svc
        .types()
        .require(type_id)
        .map_err(|m| CoreError::invalid("type", m))?;
    let requirements = requirements.unwrap_or_else(|| ty.default_requirements());
    requirements
        .validate()
        .map_err(|m| CoreError::invalid("requirements", m))?;
    let server_id = match server {
        Some(name) => Some(server_by_name(svc.db(), "server", name).await?.id),
        None => None,
    };
    Ok((ty, requirements, server_id))
}

/// Inserts a prepared container (in the caller's transaction) and gives it its guest id.
pub(crate) async fn insert_container<C: ConnectionTrait>(
    platform: &str,
    conn: &C,
    new: NewContainer,
) -> Result<(i64, Option<i64>), CoreError> {
    let row = new.row.insert(conn).await?;
    let guest = guest_id_for(platform, row.id);
    let mut active: container::ActiveModel = row.into();
    active.guest_id = Set(guest);
    let row = active.update(conn).await?;
    Ok((row.id, new.server_id))
}

/// API views of container rows (server and environment names resolved).
pub(crate) async fn to_views(
    svc: &Services,
    rows: Vec<container::Model>,
) -> Result<Vec<Container>, CoreError> {
    let db = svc.db();
    let servers: HashMap<i64, String> = server::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    let mut env_ids: Vec<i64> = rows.iter().filter_map(|r| r.environment_id).collect();
    env_ids.sort_unstable();
    env_ids.dedup();
    let envs: HashMap<i64, String> = if env_ids.is_empty() {
        HashMap::new()
    } else {
        environment::Entity::find()
            .filter(environment::Column::Id.is_in(env_ids))
            .all(db)
            .await?
            .into_iter()
            .map(|e| (e.id, e.name))
            .collect()
    };
    let projects = crate::projects::names(db).await?;
    rows.into_iter()
        .map(|r| {
            Ok(Container {
                id: ContainerId(r.id),
                priority: svc.types().get(&r.type_id).map_or(0, |t| t.priority()),
                type_id: r.type_id,
                status: parse_status(r.id, &r.status)?,
                status_reason: r.status_reason,
                server: r.server_id.and_then(|s| servers.get(&s).cloned()),
                server_id: r.server_id.map(ServerId),
                ip: r.ip,
                environment: r.environment_id.and_then(|e| envs.get(&e).cloned()),
                environment_id: r.environment_id.map(EnvironmentId),
                project: projects.get(&r.project_id).cloned().unwrap_or_default(),
                guest_id: r.guest_id,
                requirements: serde_json::from_str(&r.requirements).map_err(|e| {
                    CoreError::Corrupt(format!("container {}: unreadable requirements: {e}", r.id))
                })?,
                locked_by: r.locked_by.map(CommandId),
                state_bytes: r.state.len(),
                params: serde_json::from_str(&r.params).unwrap_or_default(),
                origin: None,
                inspect: None,
                execs: Vec::new(),
                created_at: r.created_at,
                updated_at: r.updated_at,
            })
        })
        .collect()
}

/// An environment by id (digits) or name.
pub(crate) async fn find_environment<C: ConnectionTrait>(
    conn: &C,
    key: &str,
) -> Result<environment::Model, CoreError> {
    let found = match key.parse::<i64>() {
        Ok(id) => environment::Entity::find_by_id(id).one(conn).await?,
        Err(_) => {
            // A live environment wins over destroyed ones of the same name.
            let mut all = environment::Entity::find()
                .filter(environment::Column::Name.eq(key))
                .order_by_desc(environment::Column::Id)
                .all(conn)
                .await?;
            let live = all
                .iter()
                .position(|e| e.status != EnvironmentStatus::Destroyed.as_str());
            match live {
                Some(i) => Some(all.swap_remove(i)),
                None => all.into_iter().next(),
            }
        }
    };
    found.ok_or_else(|| {
        CoreError::NotFound(format!(
            "environment '{key}' does not exist (see `cloud48 env list`)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_commands_read_from_json_and_name_their_kind() {
        let cmd: ContainerCommand =
            serde_json::from_str(r#"{"op": "update", "resources": {"cpu_millis": 500, "memory_mb": 256, "disk_mb": 1024}}"#).unwrap();
        let resources = Resources {
            cpu_millis: 500,
            memory_mb: 256,
            disk_mb: 1024,
        };
        assert_eq!(cmd, ContainerCommand::Update { resources });
        assert_eq!(cmd.kind(), CommandKind::ContainerUpdate);
        let back: ContainerCommand =
            serde_json::from_value(serde_json::to_value(&cmd).unwrap()).unwrap();
        assert_eq!(back, cmd);
        let migrate: ContainerCommand = serde_json::from_str(r#"{"op": "migrate"}"#).unwrap();
        assert_eq!(
            migrate,
            ContainerCommand::Migrate {
                to: None,
                live: false
            }
        );
        let live: ContainerCommand =
            serde_json::from_str(r#"{"op": "migrate", "live": true}"#).unwrap();
        assert!(matches!(live, ContainerCommand::Migrate { live: true, .. }));
        assert_eq!(migrate.kind().as_str(), "container.migrate");
    }

    #[test]
    fn a_bad_container_command_is_refused_naming_what_is_wrong() {
        let e = serde_json::from_str::<ContainerCommand>(r#"{"op": "explode"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `explode`") && e.contains("start"),
            "{e}"
        );
        let e = serde_json::from_str::<ContainerCommand>(r#"{"op": "start", "force": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = serde_json::from_str::<ContainerCommand>(
            r#"{"op": "update", "resources": {"cpu_millis": 1}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory_mb"), "{e}");
    }

    #[test]
    fn a_status_check_says_what_the_container_must_be() {
        let allowed = ContainerCommand::Stop {}.allowed_from();
        assert!(check_status(7, ContainerStatus::Running, "container.stop", allowed).is_ok());
        let e = check_status(7, ContainerStatus::Stopped, "container.stop", allowed).unwrap_err();
        assert_eq!(
            e,
            "container 7 is stopped; container.stop needs a container that is running or suspended"
        );
    }
}
