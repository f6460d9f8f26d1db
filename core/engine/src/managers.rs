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
            "limit {n} is not 1-{MAX_PAGE}; read further pages with the `Link` header's cursor"
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
    /// The format this core writes and reads.
    pub const FORMAT: u32 = 1;
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
/// a fresh WASM instance: make rows before taking a transaction where that can be done.
pub fn creating_row(
    svc: &Services,
    type_id: &str,
    ty: &dyn crate::types::ContainerType,
    requirements: &str,
    environment: Option<i64>,
    project: i64,
) -> container::ActiveModel {
    let now = now_ms();
    container::ActiveModel {
        platform_id: Set(svc.platform_id()),
        type_id: Set(type_id.to_string()),
        state: Set(ty.initial_state()),
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

/// Gives new containers their guest ids and locks each for the command that creates it
/// (`(container, command)` pairs of a bulk submission), one statement per 300 containers.
pub async fn name_and_lock<C: sea_orm::ConnectionTrait>(
    conn: &C,
    platform: &str,
    pairs: &[(i64, i64)],
) -> Result<(), sea_orm::DbErr> {
    for chunk in pairs.chunks(crate::queue::store::GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(id, cmd)| {
                vec![
                    (*id).into(),
                    guest_id_for(platform, *id).into(),
                    (*cmd).into(),
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

impl<'a> ContainerManager<'a> {
    pub(crate) fn new(svc: &'a Services) -> Self {
        ContainerManager { svc }
    }

    /// Why `row` cannot migrate live to `to` (a server id, or any when `None`): a server
    /// whose driver does not move running guests (VMs on qemu servers move; OS containers
    /// that run their image move between linux servers where CRIU works), said with what to
    /// do instead.
    fn live_refusal(&self, row: &container::Model, to: Option<i64>) -> Option<CoreError> {
        let fleet = self.svc.fleet();
        let cannot = |server: Option<i64>| match server.and_then(|s| fleet.named_driver(s)) {
            Some((d, _)) if d.capabilities().live_migrate => None,
            Some((_, name)) => Some(format!("server {name}")),
            None => Some("its server".to_string()),
        };
        let Some(which) = cannot(row.server_id).or_else(|| to.and_then(|t| cannot(Some(t)))) else {
            return self.network_refusal(row.id, row.server_id?, to);
        };
        Some(CoreError::Conflict(format!(
            "container {} cannot migrate live: {which} reports no live migration (virtual machines on qemu servers move while they run, and containers that run their image on linux servers where CRIU works; the server's agent log says why not); migrate without --live: the container stops while its files are copied and starts on the target with the same address where the network allows",
            row.id
        )))
    }

    /// Why a guest on server `from` cannot move live to `to` (any when `None`) for want of a
    /// shared network: it keeps its address, so the target must be on the source's bridge
    /// and subnet.
    fn network_refusal(&self, id: i64, from: i64, to: Option<i64>) -> Option<CoreError> {
        let fleet = self.svc.fleet();
        let peers = fleet.network_peers(from).unwrap_or_default();
        let name = |s: i64| fleet.named_driver(s).map_or(format!("#{s}"), |(_, n)| n);
        let why = match to {
            Some(t) if !peers.contains(&t) => format!(
                "server {} is not on the network of server {}",
                name(t),
                name(from)
            ),
            None if peers.is_empty() => {
                format!(
                    "server {} shares its network with no other server",
                    name(from)
                )
            }
            _ => return None,
        };
        Some(CoreError::Conflict(format!(
            "container {id} cannot migrate live: {why}; a live move keeps the container's address, so source and target must share one bridge and subnet (agents started with the same --subnet and their own --addresses range); migrate without --live to move it cold (it gets an address on the target's network)"
        )))
    }

    /// Submits `cmd` for container `id`; returns the command id.
    pub async fn run(
        &self,
        cmd: ContainerCommand,
        id: ContainerId,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let id = id.0;
        let db = self.svc.db();
        let row = load_container(db, id).await?;
        // The status is checked when the command runs, after the commands queued before it on
        // this container (stop then start, submitted back to back, ends running). Only what can
        // never run is refused now: a container that no longer exists on any server.
        let status = parse_status(row.id, &row.status)?;
        if status.is_gone() && !matches!(cmd, ContainerCommand::Destroy {}) {
            check_status(id, status, cmd.kind().as_str(), cmd.allowed_from())
                .map_err(CoreError::Conflict)?;
        }
        let params = match &cmd {
            ContainerCommand::Update { resources } => {
                resources
                    .validate()
                    .map_err(|m| CoreError::invalid("resources", m))?;
                // What it asks beyond what it has counts against its project's quota.
                let had = requirements_of_row(&row)?.resources;
                let more = Usage {
                    containers: 0,
                    resources: Resources {
                        cpu_millis: resources.cpu_millis.saturating_sub(had.cpu_millis),
                        memory_mb: resources.memory_mb.saturating_sub(had.memory_mb),
                        disk_mb: resources.disk_mb.saturating_sub(had.disk_mb),
                    },
                };
                crate::projects::check(db, row.project_id, &more, None).await?;
                crate::commands::params::to_value(crate::commands::params::Update {
                    resources: *resources,
                })
            }
            ContainerCommand::Clone { server } => {
                let each = requirements_of_row(&row)?.resources;
                crate::projects::check(db, row.project_id, &Usage::of(1, &each), None).await?;
                let server_id = match server {
                    Some(name) => Some(server_by_name(db, "server", name).await?.id),
                    None => None,
                };
                crate::commands::params::to_value(crate::commands::params::Clone { server_id })
            }
            ContainerCommand::Migrate { to: None, live } => {
                if *live && let Some(refused) = self.live_refusal(&row, None) {
                    return Err(refused);
                }
                crate::commands::params::to_value(crate::commands::params::Migrate {
                    to: None,
                    live: *live,
                })
            }
            ContainerCommand::Migrate { to: Some(to), live } => {
                let target = server_by_name(db, "to", to).await?;
                if Some(target.id) == row.server_id {
                    return Err(CoreError::invalid(
                        "to",
                        format!("container {id} is already on server {to}; name another server"),
                    ));
                }
                if target.status != "up" {
                    return Err(CoreError::Conflict(format!(
                        "server {to} is {}; migrate to a server that is up",
                        target.status
                    )));
                }
                if *live && let Some(refused) = self.live_refusal(&row, Some(target.id)) {
                    return Err(refused);
                }
                crate::commands::params::to_value(crate::commands::params::Migrate {
                    to: Some(target.id),
                    live: *live,
                })
            }
            _ => crate::commands::params::to_value(crate::commands::params::NoParams {}),
        };
        let command = NewCommand {
            project: None,
            kind: cmd.kind(),
            target: Some(Target::Container(id)),
            params,
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(command).await?)
    }

    /// Creates a standalone container (not in an environment); returns (command, container).
    pub async fn create(
        &self,
        req: &CreateContainer,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        let project = crate::projects::named(self.svc.db(), req.project.as_deref()).await?;
        let new = prepare_container(
            self.svc,
            &req.type_id,
            req.server.as_deref(),
            req.requirements.clone(),
            None,
            project.id,
        )
        .await?;
        let (cmd, id) = self
            .svc
            .creates()
            .submit(new.row, new.server_id, requested_by)
            .await?;
        Ok((cmd, ContainerId(id)))
    }

    /// Creates `count` containers of one type with one `container.create_many` command (the
    /// fast path for many containers: batched placement and writes); returns the command,
    /// whose result lists the containers that failed. Each container is placed on its own and
    /// fails alone.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn create_many(
        &self,
        req: &CreateContainer,
        count: u32,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        if !(1..=MAX_BATCH).contains(&count) {
            return Err(CoreError::invalid(
                "count",
                format!("must be 1-{MAX_BATCH}; submit larger numbers as several batches"),
            ));
        }
        let (ty, requirements, server_id) = checked_new(
            self.svc,
            &req.type_id,
            req.server.as_deref(),
            req.requirements.clone(),
        )
        .await?;
        let project = crate::projects::named(self.svc.db(), req.project.as_deref()).await?;
        let more = Usage::of(u64::from(count), &requirements.resources);
        crate::projects::check(self.svc.db(), project.id, &more, None).await?;
        let text = serde_json::to_string(&requirements).expect("serializable");
        // The rows (and their plugin's initial states) are made before the transaction holds
        // the database connection.
        let mut rows: Vec<container::ActiveModel> = (0..count)
            .map(|_| creating_row(self.svc, &req.type_id, ty.as_ref(), &text, None, project.id))
            .collect();
        let txn = self.svc.db().begin().await?;
        let command = NewCommand {
            project: Some(project.id),
            kind: crate::model::CommandKind::ContainerCreateMany,
            target: None,
            params: crate::commands::params::to_value(crate::commands::params::CreateMany {
                type_id: req.type_id.clone(),
                count,
                server_id,
                requirements,
                start: true,
            }),
            requested_by: requested_by.to_string(),
        };
        let cmd = self
            .svc
            .queue()
            .enqueue_in(&txn, vec![command], None)
            .await?[0];
        // Each container is locked by its batch from the start.
        for row in &mut rows {
            row.locked_by = Set(Some(cmd));
        }
        while !rows.is_empty() {
            let chunk: Vec<_> = rows.drain(..rows.len().min(500)).collect();
            container::Entity::insert_many(chunk)
                .exec_without_returning(&txn)
                .await?;
        }
        // Guest ids in the format of `guest_id_for`, in one statement.
        let prefix = guest_id_prefix(self.svc.platform_name());
        txn.execute_raw(crate::queue::store::sql(
            &txn,
            "UPDATE containers SET guest_id = $1 || CAST(id AS TEXT) WHERE locked_by = $2 AND guest_id = ''",
            vec![prefix.into(), cmd.into()],
        ))
        .await?;
        txn.commit().await?;
        self.svc.queue().wake();
        Ok(CommandId(cmd))
    }

    /// Persists the `container.create` of a new container `id` in `txn` and commits;
    /// returns (command, container).
    async fn submit_create(
        &self,
        txn: sea_orm::DatabaseTransaction,
        id: i64,
        params: crate::commands::params::Create,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        let command = NewCommand {
            project: None,
            kind: crate::model::CommandKind::ContainerCreate,
            target: Some(Target::Container(id)),
            params: crate::commands::params::to_value(params),
            requested_by: requested_by.to_string(),
        };
        let ids = self
            .svc
            .queue()
            .enqueue_in(&txn, vec![command], None)
            .await?;
        txn.commit().await?;
        self.svc.queue().wake();
        Ok((CommandId(ids[0]), ContainerId(id)))
    }

    /// Exports a stopped container for another platform (`import` there): its type, state,
    /// requirements and disk, with its identity here.
    pub async fn export(&self, id: ContainerId) -> Result<ContainerExport, CoreError> {
        let id = id.0;
        let (driver, server, row) = self.guest(id).await?;
        check_status(
            id,
            parse_status(row.id, &row.status)?,
            "container export",
            &[ContainerStatus::Stopped],
        )
        .map_err(|m| {
            CoreError::Conflict(format!(
                "{m}; stop it first with `cloud48 container stop {id}`"
            ))
        })?;
        let image = driver
            .export(&row.guest_id)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))?;
        let token = self.svc.agent_token().to_string();
        let image = crate::driver::remote::materialize(image, &token)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))?;
        Ok(ContainerExport {
            format: ContainerExport::FORMAT,
            platform: self.svc.platform_name().to_string(),
            container_id: ContainerId(row.id),
            guest_id: row.guest_id,
            type_id: row.type_id,
            requirements: serde_json::from_str(&row.requirements).unwrap_or_default(),
            state_hex: hex::encode(&row.state),
            disk_hex: hex::encode(&image.data),
        })
    }

    /// The driver and server name of a container that is on a server, with its row.
    async fn guest(
        &self,
        id: i64,
    ) -> Result<
        (
            std::sync::Arc<dyn crate::driver::Driver>,
            String,
            container::Model,
        ),
        CoreError,
    > {
        let row = load_container(self.svc.db(), id).await?;
        let server_id = row
            .server_id
            .ok_or_else(|| CoreError::Conflict(format!("container {id} is on no server (yet)")))?;
        let (driver, server) = self.svc.fleet().named_driver(server_id).ok_or_else(|| {
            CoreError::Conflict(format!("server #{server_id} has no driver in this core"))
        })?;
        Ok((driver, server, row))
    }

    /// The recent output (stdout and stderr) of a container's main process.
    pub async fn logs(&self, id: ContainerId) -> Result<String, CoreError> {
        let id = id.0;
        let (driver, server, row) = self.guest(id).await?;
        driver
            .logs(&row.guest_id)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))
    }

    /// The value of secret `name` as container `id` receives it (see `crate::secrets`): only
    /// a secret its type's workload names, so that a mistyped name is an error, not a value.
    pub async fn secret(&self, id: ContainerId, name: &str) -> Result<String, CoreError> {
        let row = load_container(self.svc.db(), id.0).await?;
        let named = self
            .svc
            .types()
            .get(&row.type_id)
            .map(|t| t.workload().secrets())
            .unwrap_or_default();
        if !named.contains(name) {
            let known = if named.is_empty() {
                "it receives none".to_string()
            } else {
                format!(
                    "it receives: {}",
                    named.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(CoreError::NotFound(format!(
                "container {id} ({}) receives no secret '{name}'; {known}",
                row.type_id
            )));
        }
        Ok(self.svc.secret(
            crate::secrets::SecretScope::of(row.environment_id, row.id),
            name,
        ))
    }

    /// Runs a command inside a running container (an operator's shell; not a persisted command:
    /// it changes nothing the core keeps). `command[0]` is the program, the rest its arguments.
    pub async fn exec(
        &self,
        id: ContainerId,
        command: &[String],
    ) -> Result<crate::driver::ExecOutput, CoreError> {
        let id = id.0;
        if command.is_empty() || command[0].is_empty() {
            return Err(CoreError::invalid(
                "command",
                "give the program to run and its arguments, e.g. [\"cat\", \"/etc/hostname\"]",
            ));
        }
        let (driver, server, row) = self.guest(id).await?;
        if driver.capabilities().simulated {
            return Err(CoreError::Conflict(format!(
                "container {id} is on simulated server {server}, where no process runs: exec needs a real server (a node agent with --driver linux)"
            )));
        }
        driver
            .exec(&row.guest_id, "exec \"$@\"", command)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))
    }

    /// Imports a container exported by another platform: a new container here, placed by the
    /// factory and created from the exported disk (stopped), that records where it came from.
    /// Returns (command, container).
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn import(
        &self,
        export: &ContainerExport,
        project: Option<&str>,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        let project = crate::projects::named(self.svc.db(), project).await?;
        if export.format != ContainerExport::FORMAT {
            return Err(CoreError::invalid(
                "format",
                format!(
                    "export format {} is not supported (this core reads format {})",
                    export.format,
                    ContainerExport::FORMAT
                ),
            ));
        }
        if export.platform == self.svc.platform_name() {
            return Err(CoreError::invalid(
                "platform",
                "this container was exported by this platform; use `cloud48 container clone` to copy it here",
            ));
        }
        if export.guest_id.is_empty() || export.platform.is_empty() {
            return Err(CoreError::invalid(
                "guest_id",
                "the export names no origin platform or guest id",
            ));
        }
        let state = hex::decode(&export.state_hex)
            .map_err(|e| CoreError::invalid("state_hex", format!("not hex: {e}")))?;
        let disk = hex::decode(&export.disk_hex)
            .map_err(|e| CoreError::invalid("disk_hex", format!("not hex: {e}")))?;
        if crate::driver::remote::is_reference(&disk) {
            return Err(CoreError::invalid(
                "disk_hex",
                "is a reference to an agent's export, not a disk; export the container again with `cloud48 container export`",
            ));
        }
        let new = prepare_container(
            self.svc,
            &export.type_id,
            None,
            Some(export.requirements.clone()),
            None,
            project.id,
        )
        .await?;
        let txn = self.svc.db().begin().await?;
        let (id, _) = insert_container(self.svc.platform_name(), &txn, new).await?;
        container::Entity::update_many()
            .col_expr(
                container::Column::State,
                sea_orm::sea_query::Expr::val(state),
            )
            .filter(container::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        origin_identity::ActiveModel {
            container_id: Set(id),
            origin_platform: Set(export.platform.clone()),
            origin_container_id: Set(export.container_id.0),
            guest_id: Set(export.guest_id.clone()),
            imported_at: Set(now_ms()),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        let image = crate::driver::GuestImage {
            type_id: export.type_id.clone(),
            data: disk,
        };
        self.submit_create(
            txn,
            id,
            crate::commands::params::Create {
                image: Some(image),
                start: false,
                ..crate::commands::params::Create::on(None)
            },
            requested_by,
        )
        .await
    }

    /// Containers matching `query`, by id.
    /// `only`: just in these projects (what a caller limited to some projects may read).
    pub async fn find(
        &self,
        query: &ContainerQuery,
        only: Option<&[i64]>,
    ) -> Result<Vec<Container>, CoreError> {
        let db = self.svc.db();
        let mut q = container::Entity::find();
        if let Some(p) = &query.project {
            let p = crate::projects::filter(db, p).await?;
            q = q.filter(container::Column::ProjectId.eq(p));
        }
        if let Some(ids) = only {
            q = q.filter(container::Column::ProjectId.is_in(ids.to_vec()));
        }
        if let Some(env) = &query.environment {
            let env = find_environment(db, env).await.map_err(|e| match e {
                CoreError::NotFound(m) => CoreError::invalid("environment", m),
                e => e,
            })?;
            q = q.filter(container::Column::EnvironmentId.eq(env.id));
        }
        if let Some(s) = query.status {
            q = q.filter(container::Column::Status.eq(s.as_str()));
        } else if !query.all {
            q = q.filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]));
        }
        if let Some(name) = &query.server {
            let s = server_by_name(db, "server", name).await?;
            q = q.filter(container::Column::ServerId.eq(s.id));
        }
        if let Some(t) = &query.type_id {
            q = if t.contains('@') {
                q.filter(container::Column::TypeId.eq(t.clone()))
            } else {
                // A bare name matches every installed version of the type.
                q.filter(
                    sea_orm::Condition::any()
                        .add(container::Column::TypeId.eq(t.clone()))
                        .add(container::Column::TypeId.starts_with(format!("{t}@"))),
                )
            };
        }
        if let Some(after) = query.after {
            q = q.filter(container::Column::Id.gt(after.0));
        }
        let rows = q
            .order_by_asc(container::Column::Id)
            .limit(page_size(query.limit))
            .all(db)
            .await?;
        to_views(self.svc, rows).await
    }

    /// Deletes failed containers (a create that did not complete) that no command holds and no
    /// reservation names. The guest of one that reached a server is destroyed there first; one
    /// whose server cannot be reached is kept, so the collector can still find its guest.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn purge(&self) -> Result<PurgeReport, CoreError> {
        let db = self.svc.db();
        let rows = container::Entity::find()
            .filter(container::Column::Status.eq(ContainerStatus::Failed.as_str()))
            .filter(container::Column::LockedBy.is_null())
            .order_by_asc(container::Column::Id)
            .all(db)
            .await?;
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        // Driver calls first, then one transaction.
        for row in rows {
            if let Some(server_id) = row.server_id {
                let Some((driver, name)) = self.svc.fleet().named_driver(server_id) else {
                    kept.push(format!(
                        "container {}: server #{server_id} has no driver in this core",
                        row.id
                    ));
                    continue;
                };
                if let Err(e) = driver.destroy(&row.guest_id).await {
                    kept.push(format!("container {}: server {name}: {e}", row.id));
                    continue;
                }
            }
            gone.push(row.id);
        }
        let txn = db.begin().await?;
        let mut purged = 0;
        for chunk in gone.chunks(500) {
            // Still failed and unlocked now, and no reservation names them.
            let held = crate::placement::reserved_for(&txn, chunk).await?;
            use sea_orm::QuerySelect;
            let ids: Vec<i64> = container::Entity::find()
                .select_only()
                .column(container::Column::Id)
                .filter(container::Column::Id.is_in(chunk.iter().copied()))
                .filter(container::Column::Status.eq(ContainerStatus::Failed.as_str()))
                .filter(container::Column::LockedBy.is_null())
                .into_tuple::<i64>()
                .all(&txn)
                .await?
                .into_iter()
                .filter(|id| !held.contains(id))
                .collect();
            purged += container::Entity::delete_many()
                .filter(container::Column::Id.is_in(ids.iter().copied()))
                .exec(&txn)
                .await?
                .rows_affected;
            origin_identity::Entity::delete_many()
                .filter(origin_identity::Column::ContainerId.is_in(ids))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(PurgeReport { purged, kept })
    }

    /// One container.
    pub async fn get_by_id(&self, id: ContainerId) -> Result<Container, CoreError> {
        let id = id.0;
        let row = load_container(self.svc.db(), id).await?;
        let state = row.state.clone();
        let mut views = to_views(self.svc, vec![row]).await?;
        let mut view = views.pop().expect("one row in, one view out");
        if let Some(ty) = self.svc.types().get(&view.type_id) {
            view.inspect = Some(match ty.inspect(&state) {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            });
        }
        let execs = self
            .svc
            .queue()
            .list(&crate::queue::CommandFilter {
                target_type: Some("container".into()),
                target_id: Some(id),
                limit: Some(1000),
                ..Default::default()
            })
            .await?;
        view.execs = execs
            .into_iter()
            .rev()
            .filter(|c| c.kind == "container.exec")
            .map(|c| ExecSummary {
                command_id: c.id,
                status: c.status,
                script: script_title(c.params["script"].as_str().unwrap_or_default()),
                args: serde_json::from_value(c.params["args"].clone()).unwrap_or_default(),
            })
            .collect();
        if let Some(o) = origin_identity::Entity::find()
            .filter(origin_identity::Column::ContainerId.eq(id))
            .one(self.svc.db())
            .await?
        {
            view.origin = Some(OriginIdentity {
                origin_platform: o.origin_platform,
                origin_container_id: o.origin_container_id,
                guest_id: o.guest_id,
            });
        }
        Ok(view)
    }

    /// Locks container `id` for command `cmd`; false when another command holds it.
    pub async fn get(&self, id: ContainerId, cmd: CommandId) -> Result<bool, CoreError> {
        let id = id.0;
        Ok(self.svc.queue().lock(Target::Container(id), cmd).await?)
    }

    /// Unlocks container `id` if `cmd` holds it.
    pub async fn put(&self, id: ContainerId, cmd: CommandId) -> Result<(), CoreError> {
        let id = id.0;
        Ok(self.svc.queue().unlock(Target::Container(id), cmd).await?)
    }
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

/// Inserts a container row in status `creating` (validating type, server and requirements);
/// returns its id and the id of the server the caller named (placement reserves it there).
/// The type, the requirements (the type's by default) and the named server of new
/// containers, each checked.
/// A new container, checked and ready to insert. Its initial state comes from its type, which
/// for a plugin is a call into a fresh WASM instance: it is made here, before any transaction.
pub(crate) struct NewContainer {
    row: container::ActiveModel,
    server_id: Option<i64>,
}

/// Checks a new container's type, requirements, named server and its project's quota, and
/// makes its row.
pub(crate) async fn prepare_container(
    svc: &Services,
    type_id: &str,
    server: Option<&str>,
    requirements: Option<Requirements>,
    environment: Option<i64>,
    project: i64,
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
    let row = creating_row(
        svc,
        type_id,
        ty.as_ref(),
        &requirements,
        environment,
        project,
    );
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
        .resources
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

/// An operation on a whole environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentOp {
    /// Start every stopped member, ascending priority.
    Start,
    /// Stop every running or suspended member, descending priority.
    Stop,
    /// Suspend every running member, descending priority.
    Suspend,
    /// Resume every suspended member, ascending priority.
    Resume,
    /// Destroy every member, descending priority, then the environment.
    Destroy,
}

impl EnvironmentOp {
    /// Command kind, e.g. `environment.start`.
    pub fn kind(&self) -> CommandKind {
        match self {
            EnvironmentOp::Start => CommandKind::EnvironmentStart,
            EnvironmentOp::Stop => CommandKind::EnvironmentStop,
            EnvironmentOp::Suspend => CommandKind::EnvironmentSuspend,
            EnvironmentOp::Resume => CommandKind::EnvironmentResume,
            EnvironmentOp::Destroy => CommandKind::EnvironmentDestroy,
        }
    }
}

/// Request to add a container to an environment.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddContainer {
    /// Container type id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Requirements; default: the type's.
    pub requirements: Option<Requirements>,
    /// Server name; default: chosen by placement.
    pub server: Option<String>,
    /// Parameters of the container (its type's schema; the rest take their defaults).
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub params: crate::model::Params,
}

/// The EnvironmentManager of the design notes: `run`, `find`, `get_by_id`, `get`, `put`.
pub struct EnvironmentManager<'a> {
    svc: &'a Services,
}

impl<'a> EnvironmentManager<'a> {
    pub(crate) fn new(svc: &'a Services) -> Self {
        EnvironmentManager { svc }
    }

    /// Creates an empty environment; returns (command, environment id).
    pub async fn create(
        &self,
        name: &str,
        requested_by: &str,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        self.create_with(name, &Default::default(), None, requested_by)
            .await
    }

    /// Creates an empty environment with parameters its members' types may read; returns
    /// (command, environment id).
    /// In `project` (name or id; default: `default`).
    pub async fn create_with(
        &self,
        name: &str,
        params: &crate::model::Params,
        project: Option<&str>,
        requested_by: &str,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        let project = crate::projects::named(self.svc.db(), project).await?.id;
        for (k, v) in params {
            validate_name(k)
                .map_err(|m| CoreError::invalid("params", format!("parameter name: {m}")))?;
            if v.contains('\0') || v.len() > 4096 {
                return Err(CoreError::invalid(
                    "params",
                    format!("parameter '{k}': a value is at most 4096 bytes of text without NUL"),
                ));
            }
        }
        let params = serde_json::to_string(params).expect("serializable");
        self.submit_new_with(name, params, project, |env| NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentCreate,
            target: Some(Target::Environment(env)),
            params: crate::commands::params::to_value(crate::commands::params::CreateEnvironment {
                name: name.to_string(),
            }),
            requested_by: requested_by.to_string(),
        })
        .await
    }

    /// Clones environment `source` into a new environment `name`: every member is cloned
    /// (state and disk, placed by the factory) and the add hooks re-run so that the copy is
    /// wired to itself. Returns (command, new environment id).
    pub async fn clone(
        &self,
        source: &str,
        name: &str,
        requested_by: &str,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        let src = self.active(source).await?;
        // The copy is in the source's project, whose quota must hold the copied members.
        let mut more = Usage::default();
        let members = container::Entity::find()
            .filter(container::Column::EnvironmentId.eq(src.id))
            .filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]))
            .all(self.svc.db())
            .await?;
        for m in &members {
            more = more.plus(&Usage::of(1, &requirements_of_row(m)?.resources));
        }
        crate::projects::check(self.svc.db(), src.project_id, &more, None).await?;
        self.submit_new_with(name, "{}".into(), src.project_id, |env| NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentClone,
            target: Some(Target::Environment(src.id)),
            params: crate::commands::params::to_value(crate::commands::params::CloneEnvironment {
                destination: EnvironmentId(env),
            }),
            requested_by: requested_by.to_string(),
        })
        .await
    }

    /// Inserts a new environment `name` with parameters (JSON object) in `project` (status
    /// creating) and the command `make` returns for it, in one transaction.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    async fn submit_new_with(
        &self,
        name: &str,
        params: String,
        project: i64,
        make: impl FnOnce(i64) -> NewCommand,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        validate_name(name).map_err(|m| CoreError::invalid("name", m))?;
        let txn = self.svc.db().begin().await?;
        let exists = environment::Entity::find()
            .filter(environment::Column::Name.eq(name))
            .filter(environment::Column::Status.ne(EnvironmentStatus::Destroyed.as_str()))
            .one(&txn)
            .await?;
        if let Some(e) = exists {
            return Err(CoreError::Conflict(format!(
                "an environment named '{name}' already exists (id {}); choose another name",
                e.id
            )));
        }
        let now = now_ms();
        let env = environment::ActiveModel {
            name: Set(name.to_string()),
            status: Set(EnvironmentStatus::Creating.as_str().into()),
            locked_by: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
            params: Set(params),
            project_id: Set(project),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        let ids = self
            .svc
            .queue()
            .enqueue_in(&txn, vec![make(env.id)], None)
            .await?;
        txn.commit().await?;
        self.svc.queue().wake();
        Ok((CommandId(ids[0]), EnvironmentId(env.id)))
    }

    async fn active(&self, key: &str) -> Result<environment::Model, CoreError> {
        let env = find_environment(self.svc.db(), key).await?;
        if env.status == EnvironmentStatus::Destroyed.as_str() {
            return Err(CoreError::Conflict(format!(
                "environment '{}' is destroyed",
                env.name
            )));
        }
        Ok(env)
    }

    /// Adds a new container of a type; the command's result holds the container id.
    pub async fn add(
        &self,
        env: &str,
        req: &AddContainer,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let env = self.active(env).await?;
        let ty = self
            .svc
            .types()
            .require(&req.type_id)
            .map_err(|m| CoreError::invalid("type", m))?;
        if let Some(r) = &req.requirements {
            r.resources
                .validate()
                .map_err(|m| CoreError::invalid("requirements", m))?;
        }
        if let Some(s) = &req.server {
            server_by_name(self.svc.db(), "server", s).await?;
        }
        cloud48_model::resolve_params(&ty.param_specs(), &req.params).map_err(|m| {
            CoreError::invalid("params", format!("container type {}: {m}", ty.type_id()))
        })?;
        let need = req
            .requirements
            .as_ref()
            .map_or_else(|| ty.default_requirements().resources, |r| r.resources);
        crate::projects::check(self.svc.db(), env.project_id, &Usage::of(1, &need), None).await?;
        let cmd = NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentAdd,
            target: Some(Target::Environment(env.id)),
            params: crate::commands::params::to_value(crate::commands::params::Add {
                requirements: req.requirements.clone(),
                server: req.server.clone(),
                params: req.params.clone(),
                ..crate::commands::params::Add::of_type(ty.type_id())
            }),
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(cmd).await?)
    }

    /// Removes (and destroys) a member.
    pub async fn remove(
        &self,
        env: &str,
        container: ContainerId,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let container = container.0;
        let env = self.active(env).await?;
        let row = load_container(self.svc.db(), container).await?;
        if row.environment_id != Some(env.id) || parse_status(row.id, &row.status)?.is_gone() {
            return Err(CoreError::NotFound(format!(
                "container {container} is not a member of environment '{}'",
                env.name
            )));
        }
        let cmd = NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentRemove,
            target: Some(Target::Environment(env.id)),
            params: crate::commands::params::to_value(crate::commands::params::Member {
                container_id: container,
            }),
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(cmd).await?)
    }

    /// Runs an operation on the environment and its members (the `run` of the notes).
    pub async fn run(
        &self,
        op: EnvironmentOp,
        env: &str,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let env = self.active(env).await?;
        let cmd = NewCommand {
            project: None,
            kind: op.kind(),
            target: Some(Target::Environment(env.id)),
            params: crate::commands::params::to_value(crate::commands::params::NoParams {}),
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(cmd).await?)
    }

    /// Environments, by id (destroyed ones only with `all`).
    /// Environments by ascending id: at most `limit` (at most `MAX_PAGE`) after id `after`.
    /// `project`: only in this one (name or id); `only`: just in these (what a caller limited to
    /// some projects may read).
    pub async fn find(
        &self,
        all: bool,
        after: Option<EnvironmentId>,
        limit: Option<u32>,
        project: Option<&str>,
        only: Option<&[i64]>,
    ) -> Result<Vec<Environment>, CoreError> {
        let mut q = environment::Entity::find();
        if let Some(p) = project {
            let p = crate::projects::filter(self.svc.db(), p).await?;
            q = q.filter(environment::Column::ProjectId.eq(p));
        }
        if let Some(ids) = only {
            q = q.filter(environment::Column::ProjectId.is_in(ids.to_vec()));
        }
        if !all {
            q = q.filter(environment::Column::Status.ne(EnvironmentStatus::Destroyed.as_str()));
        }
        if let Some(after) = after {
            q = q.filter(environment::Column::Id.gt(after.0));
        }
        let envs = q
            .order_by_asc(environment::Column::Id)
            .limit(page_size(limit))
            .all(self.svc.db())
            .await?;
        let mut out = Vec::with_capacity(envs.len());
        for e in envs {
            out.push(self.view(e).await?);
        }
        Ok(out)
    }

    /// One environment (by id or name) with its members.
    pub async fn get_by_id(&self, key: &str) -> Result<Environment, CoreError> {
        let env = find_environment(self.svc.db(), key).await?;
        self.view(env).await
    }

    async fn view(&self, env: environment::Model) -> Result<Environment, CoreError> {
        let rows = container::Entity::find()
            .filter(container::Column::EnvironmentId.eq(env.id))
            .filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]))
            .order_by_asc(container::Column::Id)
            .all(self.svc.db())
            .await?;
        let mut members = to_views(self.svc, rows).await?;
        members.sort_by_key(|m| (m.priority, m.id));
        let project = crate::projects::names(self.svc.db())
            .await?
            .remove(&env.project_id)
            .unwrap_or_default();
        Ok(Environment {
            id: EnvironmentId(env.id),
            project,
            name: env.name,
            status: env.status.parse().unwrap_or(EnvironmentStatus::Active),
            locked_by: env.locked_by.map(CommandId),
            members,
            params: serde_json::from_str(&env.params).unwrap_or_default(),
            created_at: env.created_at,
        })
    }

    /// Locks environment `id` for command `cmd`; false when another command holds it.
    pub async fn get(&self, id: EnvironmentId, cmd: CommandId) -> Result<bool, CoreError> {
        let id = id.0;
        Ok(self.svc.queue().lock(Target::Environment(id), cmd).await?)
    }

    /// Unlocks environment `id` if `cmd` holds it.
    pub async fn put(&self, id: EnvironmentId, cmd: CommandId) -> Result<(), CoreError> {
        let id = id.0;
        Ok(self
            .svc
            .queue()
            .unlock(Target::Environment(id), cmd)
            .await?)
    }
}

/// What `ServerManager::drain` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrainReport {
    /// The drained server.
    pub server: String,
    /// The migrations submitted, one per container.
    pub commands: Vec<CommandId>,
    /// Containers that could not be migrated, with the reason.
    pub skipped: Vec<String>,
}

/// Servers of the platform.
pub struct ServerManager<'a> {
    svc: &'a Services,
}

/// The names `server list` shows for what a driver can do.
fn capability_names(c: &crate::driver::Capabilities) -> Vec<String> {
    [
        ("suspend", c.suspend),
        ("exec", c.exec),
        ("migrate", c.migrate),
        ("update", c.update),
        ("images", c.images),
        ("host-files", !c.images),
        ("live-migrate", c.live_migrate),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| name.to_string())
    .chain(c.vm.map(|accel| format!("vm-{accel}")))
    .collect()
}

impl<'a> ServerManager<'a> {
    pub(crate) fn new(svc: &'a Services) -> Self {
        ServerManager { svc }
    }

    /// Every server with its allocation, load and last heartbeat, by id.
    pub async fn list(&self) -> Result<Vec<Server>, CoreError> {
        let db = self.svc.db();
        let rows = server::Entity::find()
            .order_by_asc(server::Column::Id)
            .all(db)
            .await?;
        let dummies = crate::placement::dummy_counts(db).await?;
        Ok(rows
            .into_iter()
            .map(|s| {
                let beat = self.svc.health().last(s.id);
                let capabilities = self
                    .svc
                    .fleet()
                    .driver(s.id)
                    .map(|d| capability_names(&d.capabilities()))
                    .unwrap_or_default();
                Server {
                    capabilities,
                    id: ServerId(s.id),
                    status: s.status.parse().unwrap_or(ServerStatus::Down),
                    labels: serde_json::from_str(&s.labels).unwrap_or_default(),
                    last_heartbeat: beat.as_ref().map(|b| b.at).or(s.last_heartbeat),
                    load: beat.and_then(|b| b.load),
                    capacity: crate::placement::capacity_of(&s),
                    allocated: crate::placement::allocated_of(&s),
                    containers: s.alloc_containers.max(0) as u64,
                    dummies: dummies.get(&s.id).copied().unwrap_or(0) as u64,
                    draining: s.draining,
                    name: s.name,
                    driver: s.driver,
                    address: s.address,
                }
            })
            .collect())
    }

    /// Drains a server: placement puts nothing new there and every running or stopped
    /// container on it is migrated away (placement chooses where). `live`: running containers
    /// move while they run (virtual machines, to servers that can receive them); refused
    /// before anything changes when the server cannot send them so.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn drain(
        &self,
        key: &str,
        live: bool,
        requested_by: &str,
    ) -> Result<DrainReport, CoreError> {
        let db = self.svc.db();
        let s = server_by_name(db, "server", key).await?;
        if live {
            let can = self
                .svc
                .fleet()
                .driver(s.id)
                .is_some_and(|d| d.capabilities().live_migrate);
            if !can {
                return Err(CoreError::Conflict(format!(
                    "server {} cannot drain live: it reports no live migration (qemu servers move their virtual machines while they run, linux servers where CRIU works their image containers); drain without --live: running containers stop while their files are copied and start again on their new servers",
                    s.name
                )));
            }
            if self
                .svc
                .fleet()
                .network_peers(s.id)
                .unwrap_or_default()
                .is_empty()
            {
                return Err(CoreError::Conflict(format!(
                    "server {} cannot drain live: it shares its network with no other server, and a container moving live keeps its address (agents sharing a network start with the same --subnet and their own --addresses range); drain without --live: running containers stop while their files are copied and start again on their new servers with addresses of theirs",
                    s.name
                )));
            }
        }
        let txn = db.begin().await?;
        let mut am: server::ActiveModel = s.clone().into();
        am.draining = Set(true);
        am.update(&txn).await?;
        let rows = container::Entity::find()
            .filter(container::Column::ServerId.eq(s.id))
            .order_by_asc(container::Column::Id)
            .all(&txn)
            .await?;
        let mut commands = Vec::new();
        let mut skipped = Vec::new();
        for r in rows {
            match parse_status(r.id, &r.status)? {
                ContainerStatus::Running | ContainerStatus::Stopped => commands.push(NewCommand {
                    project: None,
                    kind: crate::model::CommandKind::ContainerMigrate,
                    target: Some(Target::Container(r.id)),
                    params: crate::commands::params::to_value(crate::commands::params::Migrate {
                        to: None,
                        live,
                    }),
                    requested_by: requested_by.to_string(),
                }),
                st if st.is_gone() => {}
                st => skipped.push(format!("container {} is {st} and cannot be migrated", r.id)),
            }
        }
        let ids = self.svc.queue().enqueue_in(&txn, commands, None).await?;
        txn.commit().await?;
        self.svc
            .placement()
            .set_status(s.id, s.status == "up", true);
        self.svc.queue().wake();
        Ok(DrainReport {
            server: s.name,
            commands: ids.into_iter().map(CommandId).collect(),
            skipped,
        })
    }

    /// Ends a drain: placement may use the server again.
    pub async fn undrain(&self, key: &str) -> Result<(), CoreError> {
        let db = self.svc.db();
        let s = server_by_name(db, "server", key).await?;
        let up = s.status == "up";
        let id = s.id;
        let mut am: server::ActiveModel = s.into();
        am.draining = Set(false);
        am.update(db).await?;
        self.svc.placement().set_status(id, up, false);
        Ok(())
    }

    /// Makes images present on server `key` ahead of need (placement then prefers it for
    /// containers of those images): `image` from the core, from server `peer`'s agent, or
    /// every image of `file` on the server. Says what the server holds of them.
    pub async fn fetch_image(
        &self,
        key: &str,
        image: Option<&str>,
        peer: Option<&str>,
        file: Option<&str>,
    ) -> Result<Vec<String>, CoreError> {
        let s = server_by_name(self.svc.db(), "server", key).await?;
        let from = match (peer, file) {
            (Some(_), Some(_)) => {
                return Err(CoreError::invalid(
                    "from_server",
                    "give an image's server or a file on the server, not both",
                ));
            }
            (None, Some(path)) if !path.starts_with('/') => {
                return Err(CoreError::invalid(
                    "file",
                    format!("'{path}' is not an absolute path on server {}", s.name),
                ));
            }
            (None, Some(path)) => crate::driver::ImageOrigin::File { path: path.into() },
            (Some(peer), None) => {
                let p = server_by_name(self.svc.db(), "from_server", peer).await?;
                match (p.driver == crate::fleet::RemoteFactory::KIND, p.address) {
                    (true, Some(url)) if p.id != s.id => crate::driver::ImageOrigin::Peer { url },
                    (true, Some(_)) => {
                        return Err(CoreError::invalid(
                            "from_server",
                            format!("server {} cannot fetch images from itself", s.name),
                        ));
                    }
                    _ => {
                        return Err(CoreError::invalid(
                            "from_server",
                            format!(
                                "server {} is not run by a node agent, so it serves no images",
                                p.name
                            ),
                        ));
                    }
                }
            }
            (None, None) => crate::driver::ImageOrigin::Core,
        };
        if image.is_none() && !matches!(from, crate::driver::ImageOrigin::File { .. }) {
            return Err(CoreError::invalid(
                "image",
                "name the image to fetch (a name such as cloud48/nginx, or a sha256: digest)",
            ));
        }
        let (driver, name) = self.svc.fleet().named_driver(s.id).ok_or_else(|| {
            CoreError::Conflict(format!("server {} has no driver in this core", s.name))
        })?;
        driver.fetch_image(&from, image).await.map_err(|e| match e {
            crate::driver::DriverError::Unsupported { .. } => CoreError::Conflict(format!(
                "server {name} runs no images (server show lists its capabilities): {e}"
            )),
            e => CoreError::Conflict(format!("server {name}: {e}")),
        })
    }

    /// Injects a crash into a simulated server (it stops answering and sending heartbeats);
    /// the health monitor marks it down after the grace period.
    pub async fn fail(&self, key: &str) -> Result<(), CoreError> {
        self.sim(key).await?.crash();
        Ok(())
    }

    /// Ends an injected crash: heartbeats resume and the monitor brings the server back.
    pub async fn recover(&self, key: &str) -> Result<(), CoreError> {
        self.sim(key).await?.recover();
        Ok(())
    }

    async fn sim(
        &self,
        key: &str,
    ) -> Result<std::sync::Arc<crate::driver::sim::SimServer>, CoreError> {
        // Fault injection is a rehearsal tool: a core without simulated servers has no such route.
        if self.svc.fleet().sims().is_empty() {
            return Err(CoreError::NotFound(
                "fault injection (server fail, server recover) exists only on a core that runs simulated servers (--sim-servers); use the real server's own tools".into(),
            ));
        }
        let s = server_by_name(self.svc.db(), "server", key).await?;
        self.svc.fleet().sim(s.id).ok_or_else(|| {
            CoreError::Conflict(format!(
                "server {} uses driver '{}'; only simulated servers can be failed and recovered on command",
                s.name, s.driver
            ))
        })
    }

    /// One server by name or id.
    pub async fn get(&self, key: &str) -> Result<Server, CoreError> {
        self.list()
            .await?
            .into_iter()
            .find(|s| s.name == key || s.id.to_string() == key)
            .ok_or_else(|| {
                CoreError::NotFound(format!(
                    "server '{key}' does not exist (see `cloud48 server list`)"
                ))
            })
    }
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
