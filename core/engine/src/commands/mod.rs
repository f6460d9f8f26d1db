//! Command handlers: the steps of every container and environment command.
//!
//! Invariants:
//! - A step either finishes before its side effect or repeats it idempotently: driver
//!   operations are idempotent by guest id, and each step's database writes commit together
//!   with the step number.
//! - No step opens a transaction (`clippy.toml` denies it): a step makes its driver and plugin
//!   calls, then returns its writes (`queue::Transition::commit`), which the queue runs in the
//!   transaction it commits with the step.
//! - A step re-checks the object's status; a command queued behind another one fails with a
//!   clear message when the object is no longer in a status it can act on.

mod batch;
mod container;
mod environment;
mod grouped;
mod hooks;
pub mod params;
mod plugin;
mod steps;

use std::sync::Arc;

use async_trait::async_trait;
use sea_orm::DbErr;
use serde_json::Value;

use crate::core::CoreError;
use crate::driver::{Driver, DriverError, GuestImage, GuestInfo, GuestSpec};
use crate::entities::command;
use crate::model::CommandKind;
use crate::model::{ContainerStatus, Resources};
use crate::queue::{GroupSink, Next, Runner, StepError, Transition, UndoWrites};
use crate::services::Services;

/// The `queue::Runner` of the core.
pub struct Handlers {
    svc: Services,
}

impl Handlers {
    /// Handlers acting through `svc`.
    pub fn new(svc: Services) -> Self {
        Handlers { svc }
    }
}

#[async_trait]
impl Runner for Handlers {
    async fn step(&self, cmd: &command::Model) -> Result<Transition, StepError> {
        let kind = kind_of(cmd)?;
        let ctx = StepCtx {
            svc: &self.svc,
            cmd,
            params: read_json(cmd, "parameters", &cmd.params)?,
            progress: read_json(cmd, "progress", &cmd.progress)?,
        };
        match kind {
            CommandKind::Noop => Ok(Transition::bare(Next::Done(Value::Null))),
            CommandKind::ContainerCreateMany => batch::create_many(&ctx).await,
            CommandKind::PluginUpgrade => plugin::upgrade(&ctx).await,
            k if k.on_container() => container::step(&ctx, k).await,
            k => environment::step(&ctx, k).await,
        }
    }

    fn group_key(&self, cmd: &command::Model) -> Option<String> {
        grouped::key(cmd)
    }

    fn settled(&self, id: i64, committed: bool) {
        // What its placement decisions counted: in the database now, or given back.
        self.svc
            .placement()
            .settle(crate::placement::Holder::Command(id), committed);
    }

    async fn step_group(
        &self,
        cmds: &[command::Model],
        sink: &mut dyn GroupSink,
    ) -> Result<(), StepError> {
        grouped::step(&self.svc, cmds, sink).await
    }

    async fn on_failure(
        &self,
        cmd: &command::Model,
        error: &str,
    ) -> Result<Option<UndoWrites>, DbErr> {
        // A command whose kind this core does not know did nothing it could undo.
        match cmd.kind.parse::<CommandKind>() {
            Ok(CommandKind::ContainerCreateMany) => batch::compensate(&self.svc, cmd).await,
            Ok(CommandKind::ContainerUpdate) => container::compensate_update(&self.svc, cmd).await,
            Ok(
                CommandKind::ContainerCreate
                | CommandKind::ContainerClone
                | CommandKind::ContainerMigrate,
            ) => container::compensate(&self.svc, cmd, error).await,
            _ => Ok(None),
        }
    }
}

/// The kind of a stored command; an unknown one (written by a newer core, or damaged) fails the
/// command with a message that names it.
pub(crate) fn kind_of(cmd: &command::Model) -> Result<CommandKind, StepError> {
    cmd.kind.parse().map_err(|e| {
        StepError::Permanent(format!("command {}: {e}; this core cannot run it", cmd.id))
    })
}

/// A stored JSON column of a command (`what`: parameters or progress); unreadable JSON fails
/// the command with a message that names it, never `null`.
fn read_json(cmd: &command::Model, what: &str, text: &str) -> Result<Value, StepError> {
    serde_json::from_str(text).map_err(|e| StepError::Permanent(unreadable(cmd, what, e)))
}

/// The message of a stored command part (`what`) that cannot be read.
pub(crate) fn unreadable(cmd: &command::Model, what: &str, e: impl std::fmt::Display) -> String {
    format!("command {} ({}): unreadable {what}: {e}", cmd.id, cmd.kind)
}

/// What a step sees.
pub(crate) struct StepCtx<'a> {
    pub svc: &'a Services,
    pub cmd: &'a command::Model,
    pub params: Value,
    pub progress: Value,
}

impl StepCtx<'_> {
    /// The target id of the command.
    pub fn target_id(&self) -> Result<i64, StepError> {
        self.cmd
            .target_id
            .ok_or_else(|| StepError::Permanent("command has no target".into()))
    }

    /// The command's parameters as `T`; unreadable ones fail the command, naming it.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T, StepError> {
        params::read(self.cmd, &self.params).map_err(StepError::Permanent)
    }

    /// Field `key` of the progress as `T`; a missing or unreadable one fails the command,
    /// naming it (the step that wrote the progress always writes it).
    pub fn progress_field<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<T, StepError> {
        let value = self.progress.get(key).cloned().unwrap_or(Value::Null);
        serde_json::from_value(value).map_err(|e| {
            StepError::Permanent(format!(
                "command {} ({}) at step {}: unreadable progress: {key}: {e}",
                self.cmd.id, self.cmd.kind, self.cmd.step
            ))
        })
    }
}

/// What a new container's guest is: its id, type, reserved resources and the workload its type
/// declares, with its parameters (`params`, stored JSON; the type's defaults fill the rest) and
/// the secrets it names in `scope` put in (its server gives it an address).
pub(crate) fn guest_spec(
    svc: &Services,
    guest_id: &str,
    type_id: &str,
    resources: Resources,
    params: &str,
    scope: crate::secrets::SecretScope,
) -> GuestSpec {
    let workload = svc.types().get(type_id).map_or_else(Default::default, |t| {
        let workload = t.workload();
        if workload.is_default() {
            return workload;
        }
        let given: crate::model::Params = serde_json::from_str(params).unwrap_or_default();
        let mut params = cloud48_model::resolve_params(&t.param_specs(), &given).unwrap_or(given);
        for name in workload.secrets() {
            let value = svc.secret(scope, &name);
            params.insert(cloud48_model::secret_param(&name), value);
        }
        workload.with_params(&params)
    });
    GuestSpec {
        avoid: Vec::new(),
        guest_id: guest_id.to_string(),
        type_id: type_id.to_string(),
        resources,
        ip: None,
        workload,
    }
}

/// The image containers of type `type_id` run, if their type declares one (placement prefers
/// servers that hold it).
pub(crate) fn image_of(svc: &Services, type_id: &str) -> Option<crate::model::ImageRef> {
    svc.types().get(type_id).and_then(|t| t.workload().image)
}

/// The addresses containers on the other servers of `server`'s network hold, when it shares
/// its network (a VM that moved away live keeps an address this server handed out, and it
/// must not hand it out again); empty otherwise, without reading the database.
pub(crate) async fn network_avoid(svc: &Services, server: i64) -> Result<Vec<String>, DbErr> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
    let Some(peers) = svc.fleet().network_peers(server).filter(|p| !p.is_empty()) else {
        return Ok(Vec::new());
    };
    let gone = [ContainerStatus::Destroyed, ContainerStatus::Failed].map(|s| s.as_str());
    let ips: Vec<Option<String>> = crate::entities::container::Entity::find()
        .select_only()
        .column(crate::entities::container::Column::Ip)
        .filter(crate::entities::container::Column::ServerId.is_in(peers))
        .filter(crate::entities::container::Column::Status.is_not_in(gone))
        .filter(crate::entities::container::Column::Ip.is_not_null())
        .into_tuple()
        .all(svc.db())
        .await?;
    Ok(ips.into_iter().flatten().collect())
}

/// `network_avoid` of each server, read once per step however many containers it makes there.
#[derive(Default)]
pub(crate) struct Avoided(std::collections::HashMap<i64, Vec<String>>);

impl Avoided {
    pub(crate) async fn of(&mut self, svc: &Services, server: i64) -> Result<Vec<String>, DbErr> {
        if let std::collections::hash_map::Entry::Vacant(e) = self.0.entry(server) {
            e.insert(network_avoid(svc, server).await?);
        }
        Ok(self.0[&server].clone())
    }
}

/// The one way a container's guest is made on its server, for single, grouped and batch creates
/// and for copies: imported from `image` when given (already usable by this driver), created
/// otherwise, then started when asked. Idempotent like the driver calls it makes.
pub(crate) async fn make_guest(
    driver: &dyn Driver,
    spec: &GuestSpec,
    image: Option<&GuestImage>,
    start: bool,
) -> Result<GuestInfo, DriverError> {
    let info = match image {
        Some(image) => driver.import(spec, image).await?,
        None => driver.create(spec).await?,
    };
    if start {
        driver.start(&spec.guest_id).await?;
    }
    Ok(info)
}

/// Addresses are unique on the platform: of `made` (a container and the address its server
/// gave it), the containers whose address another live container already holds (or another
/// container of `made` took first), each with a message naming both. Simulated and real
/// servers alike: a server's own allocation cannot see the others' containers.
pub(crate) async fn taken_addresses<C: sea_orm::ConnectionTrait>(
    conn: &C,
    made: &[(i64, Option<&str>)],
) -> Result<std::collections::HashMap<i64, String>, DbErr> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
    let (mut taken, first) = clashes_within(made);
    let gone = [ContainerStatus::Destroyed, ContainerStatus::Failed].map(|s| s.as_str());
    let ips: Vec<&str> = first.keys().copied().collect();
    for chunk in ips.chunks(500) {
        let holders: Vec<(i64, Option<String>)> = crate::entities::container::Entity::find()
            .select_only()
            .column(crate::entities::container::Column::Id)
            .column(crate::entities::container::Column::Ip)
            .filter(crate::entities::container::Column::Ip.is_in(chunk.iter().copied()))
            .filter(crate::entities::container::Column::Status.is_not_in(gone))
            .into_tuple()
            .all(conn)
            .await?;
        for (holder, ip) in holders {
            let Some(ip) = ip else { continue };
            if let Some(&id) = first.get(ip.as_str())
                && id != holder
            {
                taken.insert(id, clash(id, &ip, holder));
            }
        }
    }
    Ok(taken)
}

/// Of `made`, the containers given an address an earlier one of `made` took (with a message),
/// and the first holder of each address.
pub(crate) fn clashes_within<'a>(
    made: &[(i64, Option<&'a str>)],
) -> (
    std::collections::HashMap<i64, String>,
    std::collections::HashMap<&'a str, i64>,
) {
    let mut taken = std::collections::HashMap::new();
    let mut first: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (id, ip) in made {
        let Some(ip) = ip else { continue };
        match first.entry(ip) {
            std::collections::hash_map::Entry::Occupied(o) => {
                taken.insert(*id, clash(*id, ip, *o.get()));
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(*id);
            }
        }
    }
    (taken, first)
}

fn clash(id: i64, ip: &str, holder: i64) -> String {
    format!(
        "its server gave container {id} address {ip}, which container {holder} already holds; \
         addresses must be unique on the platform: give each agent its own --subnet"
    )
}

/// Maps driver errors: transient ones are retried by the queue, the others fail the command
/// with the driver's message.
pub(crate) fn driver_err(server: &str, e: DriverError) -> StepError {
    if e.is_transient() {
        StepError::Transient(e.to_string())
    } else {
        StepError::Permanent(format!("server {server}: {e}"))
    }
}

pub(crate) fn core_err(e: CoreError) -> StepError {
    match e {
        CoreError::Db(e) => StepError::Db(e),
        other => StepError::Permanent(other.to_string()),
    }
}

/// The driver of a server, with its name for messages. A server another core registered a
/// moment ago may not be attached here yet (cores take in new servers every heartbeat
/// period): that is retried.
pub(crate) fn driver_of(
    svc: &Services,
    server_id: i64,
) -> Result<(Arc<dyn Driver>, String), StepError> {
    svc.fleet().named_driver(server_id).ok_or_else(|| {
        StepError::Transient(format!(
            "server #{server_id} has no driver in this core yet (registered through another core?)"
        ))
    })
}

/// The members of environment `env_id` as hooks see them, ascending priority then id.
pub(crate) async fn environment_members<C: sea_orm::ConnectionTrait>(
    types: &crate::types::TypeRegistry,
    conn: &C,
    env_id: i64,
) -> Result<Vec<crate::types::MemberView>, crate::queue::StepError> {
    Ok(hooks::members(types, conn, env_id)
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// The view hooks get of one container row (no server name).
pub(crate) fn container_view(
    types: &crate::types::TypeRegistry,
    row: &crate::entities::container::Model,
) -> Result<crate::types::MemberView, crate::managers::UnknownStatus> {
    hooks::member_view(types, row, None)
}
