//! Steps of container commands.

use std::collections::HashSet;
use std::sync::Arc;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter,
    QueryOrder, Set,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::steps::{CloneStep, CreateStep, MigrateStep, UpdateStep};
use super::{StepCtx, core_err, driver_err, driver_of, guest_spec, make_guest, params};
use crate::driver::{Driver, GuestImage, GuestInfo, GuestSpec, GuestState};
use crate::entities::{command, container, pending_script};
use crate::managers::{ContainerCommand, check_status, guest_id_for, load_container, parse_status};
use crate::model::{CommandKind, ContainerStatus, Requirements, Resources, Usage, now_ms};
use crate::placement::PlacementCache;
use crate::placement::{self, PlaceRequest, PlacementError, Reservation, requirements_of};
use crate::queue::{NewCommand, Next, StepError, Target, Transition, UndoWrites};
use crate::services::Services;

fn spec(svc: &Services, row: &container::Model) -> GuestSpec {
    guest_spec(
        svc,
        &row.guest_id,
        &row.type_id,
        requirements_of(row).resources,
        &row.params,
        crate::secrets::SecretScope::of(row.environment_id, row.id),
    )
}

/// The step's decision `next`, committed with `change` applied to container `row`.
fn write(
    row: container::Model,
    change: impl FnOnce(&mut container::ActiveModel) + Send + 'static,
    next: Next,
) -> Transition {
    Transition::commit(move |txn| {
        Box::pin(async move {
            write_in(txn, &row, change).await?;
            Ok(next)
        })
    })
}

/// Applies `change` to container `row` in `txn`.
async fn write_in(
    txn: &DatabaseTransaction,
    row: &container::Model,
    change: impl FnOnce(&mut container::ActiveModel) + Send,
) -> Result<(), DbErr> {
    let mut am: container::ActiveModel = row.clone().into();
    change(&mut am);
    am.updated_at = Set(now_ms());
    am.update(txn).await?;
    Ok(())
}

fn status_of(s: ContainerStatus) -> sea_orm::ActiveValue<String> {
    Set(s.as_str().to_string())
}

fn done(id: i64) -> Next {
    Next::Done(json!({ "container_id": id }))
}

pub(super) async fn step(ctx: &StepCtx<'_>, kind: CommandKind) -> Result<Transition, StepError> {
    // The one-step lifecycle commands; the multi-step ones have their own functions.
    let simple = match kind {
        CommandKind::ContainerStart => Some(ContainerCommand::Start {}),
        CommandKind::ContainerStop => Some(ContainerCommand::Stop {}),
        CommandKind::ContainerSuspend => Some(ContainerCommand::Suspend {}),
        CommandKind::ContainerResume => Some(ContainerCommand::Resume {}),
        CommandKind::ContainerReboot => Some(ContainerCommand::Reboot {}),
        CommandKind::ContainerDestroy => Some(ContainerCommand::Destroy {}),
        CommandKind::ContainerUpdate => {
            let p: params::Update = ctx.params()?;
            Some(ContainerCommand::Update {
                resources: p.resources,
            })
        }
        _ => None,
    };
    let svc = ctx.svc;
    let id = ctx.target_id()?;
    let row = load_container(svc.db(), id).await.map_err(core_err)?;
    let Some(cmd) = simple else {
        return match kind {
            CommandKind::ContainerCreate => create(ctx, row).await,
            CommandKind::ContainerClone => clone(ctx, row).await,
            CommandKind::ContainerMigrate => migrate(ctx, row).await,
            CommandKind::ContainerExec => exec(ctx, row).await,
            other => Err(StepError::Permanent(format!(
                "command {}: {other} is not a container command",
                ctx.cmd.id
            ))),
        };
    };
    let status = parse_status(row.id, &row.status)?;
    if matches!(cmd, ContainerCommand::Destroy {}) && status.is_gone() {
        return Ok(Transition::bare(done(id)));
    }
    check_status(id, status, cmd.kind().as_str(), cmd.allowed_from())
        .map_err(StepError::Permanent)?;
    if matches!(cmd, ContainerCommand::Destroy {}) && status == ContainerStatus::Down {
        // Its server does not answer: the container is given up now and its guest destroyed
        // by the collector when the server is back.
        let illegal =
            |am: &mut container::ActiveModel| am.status = status_of(ContainerStatus::Illegal);
        return Ok(write(row, illegal, done(id)));
    }
    let Some(server_id) = row.server_id else {
        // Destroying a container that never reached a server (its create gives back its dummy).
        let gone =
            |am: &mut container::ActiveModel| am.status = status_of(ContainerStatus::Destroyed);
        return Ok(write(row, gone, done(id)));
    };
    let (driver, server) = driver_of(svc, server_id)?;
    let guest = row.guest_id.as_str();
    let new_status = match &cmd {
        ContainerCommand::Start {} => {
            driver
                .start(guest)
                .await
                .map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Running
        }
        ContainerCommand::Stop {} => {
            driver
                .stop(guest)
                .await
                .map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Stopped
        }
        ContainerCommand::Suspend {} => {
            driver
                .suspend(guest)
                .await
                .map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Suspended
        }
        ContainerCommand::Resume {} => {
            driver
                .resume(guest)
                .await
                .map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Running
        }
        ContainerCommand::Reboot {} => {
            driver
                .reboot(guest)
                .await
                .map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Running
        }
        ContainerCommand::Destroy {} => {
            driver
                .destroy(guest)
                .await
                .map_err(|e| driver_err(&server, e))?;
            let need = requirements_of(&row).resources;
            let cache = svc.placement_shared();
            return Ok(Transition::commit(move |txn| {
                Box::pin(async move {
                    write_in(txn, &row, |am| {
                        am.status = status_of(ContainerStatus::Destroyed)
                    })
                    .await?;
                    pending_script::Entity::delete_many()
                        .filter(pending_script::Column::ContainerId.eq(id))
                        .exec(txn)
                        .await?;
                    placement::release(txn, server_id, &need, 1).await?;
                    cache.apply(server_id, &need, 1, -1);
                    Ok(done(id))
                })
            }));
        }
        ContainerCommand::Update { resources } => {
            return update(ctx, &row, (driver.as_ref(), &server), server_id, resources).await;
        }
        ContainerCommand::Clone { .. } | ContainerCommand::Migrate { .. } => unreachable!(),
    };
    // Running again: the scripts hooks asked for while it was stopped or suspended run now,
    // in order, before the transaction (no I/O inside it).
    let (applied, failure) = if new_status == ContainerStatus::Running {
        run_pending(svc, id, driver.as_ref(), guest, &server).await?
    } else {
        (Vec::new(), None)
    };
    let next = match failure {
        None => done(id),
        Some(error) => Next::Partial {
            result: json!({ "container_id": id }),
            error,
        },
    };
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            write_in(txn, &row, |am| am.status = status_of(new_status)).await?;
            forget_pending(txn, applied).await?;
            Ok(next)
        })
    }))
}

/// Forgets the pending scripts that ran.
async fn forget_pending(txn: &DatabaseTransaction, applied: Vec<i64>) -> Result<(), DbErr> {
    if !applied.is_empty() {
        pending_script::Entity::delete_many()
            .filter(pending_script::Column::Id.is_in(applied))
            .exec(txn)
            .await?;
    }
    Ok(())
}

/// Runs the scripts waiting for container `id` in order; returns the ids of those that ran and,
/// if one failed, why (it and those after it stay pending, and run before any later script:
/// scripts run in the order hooks asked for them).
async fn run_pending(
    svc: &Services,
    id: i64,
    driver: &dyn crate::driver::Driver,
    guest: &str,
    server: &str,
) -> Result<(Vec<i64>, Option<String>), StepError> {
    let waiting = pending_script::Entity::find()
        .filter(pending_script::Column::ContainerId.eq(id))
        .order_by_asc(pending_script::Column::Id)
        .all(svc.db())
        .await?;
    let mut applied = Vec::new();
    for p in waiting {
        let args: Vec<String> = serde_json::from_str(&p.args).map_err(|e| {
            StepError::Permanent(format!(
                "container {id}: unreadable arguments of pending script {}: {e}",
                p.id
            ))
        })?;
        let outcome = match driver.exec(guest, &p.script, &args).await {
            Ok(out) if out.exit_code == 0 => None,
            Ok(out) => Some(format!(
                "exited with code {}: {}",
                out.exit_code,
                out.stderr.trim()
            )),
            Err(e) if e.is_transient() => return Err(driver_err(server, e)),
            Err(e) => Some(format!("server {server}: {e}")),
        };
        if let Some(why) = outcome {
            return Ok((
                applied,
                Some(format!(
                    "container {id} runs, but a script a hook asked for while it was stopped {why}; it stays pending for its next start"
                )),
            ));
        }
        applied.push(p.id);
    }
    Ok((applied, None))
}

/// Steps of `container.update`: 0 reserve the growth on the container's server (a dummy,
/// committed before the server is touched), 1 resize the guest, then give the growth dummy's
/// reservation to the container and release what shrank, with the new requirements; 2 (only
/// when the growth expired meanwhile and the server has no room) give the guest its old size
/// back and fail. No transaction is open while the driver works.
async fn update(
    ctx: &StepCtx<'_>,
    row: &container::Model,
    (driver, server): (&dyn Driver, &str),
    server_id: i64,
    resources: &Resources,
) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let id = row.id;
    let mut req = requirements_of(row);
    let (grow, shrink) = (
        resources.minus(&req.resources),
        req.resources.minus(resources),
    );
    let growth = reservation(&ctx.progress);
    if UpdateStep::of(ctx.cmd)? == UpdateStep::Reserve && grow != Resources::default() {
        let ttl = svc.dummy_ttl_ms();
        let deadline = svc.queue().now_ms() + ttl;
        let (cache, command, server) = (svc.placement_shared(), ctx.cmd.id, server.to_string());
        let project = row.project_id;
        return Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                // The quota again, now that it runs (it was checked when submitted).
                let more = Usage {
                    containers: 0,
                    resources: grow,
                };
                crate::projects::check(txn, project, &more, None)
                    .await
                    .map_err(super::core_err)?;
                let Some(r) =
                    placement::reserve_growth(txn, server_id, id, command, &grow, deadline).await?
                else {
                    return Err(StepError::Permanent(format!(
                        "server {server} lacks room to grow container {id} by {} cpu_millis, {} memory_mb and {} disk_mb; migrate it first",
                        grow.cpu_millis, grow.memory_mb, grow.disk_mb
                    )));
                };
                cache.apply(server_id, &grow, 1, 1);
                let progress = json!({ "server_id": r.server_id, "dummy_id": r.dummy_id });
                let step = UpdateStep::Resize.number();
                Ok(Next::Continue { step, progress })
            })
        }));
    }
    if UpdateStep::of(ctx.cmd)? == UpdateStep::Undo {
        // Give the guest its old size back (best effort) so it uses what the ledger holds.
        if let Err(e) = driver.update(&row.guest_id, &req.resources).await {
            tracing::warn!(container = id, error = %e, "could not undo a resize whose growth expired");
        }
        return Ok(Transition::bare(Next::Fail(format!(
            "the capacity reserved on server {server} to grow container {id} expired and the server has no room any more; its size is unchanged"
        ))));
    }
    driver
        .update(&row.guest_id, resources)
        .await
        .map_err(|e| driver_err(server, e))?;
    let (row, resources, cache) = (row.clone(), *resources, svc.placement_shared());
    let progress = ctx.progress.clone();
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            if !placement::settle_resize(txn, server_id, growth, &grow, &shrink).await? {
                // Nothing was written: the guest is given its old size back.
                let step = UpdateStep::Undo.number();
                return Ok(Next::Continue { step, progress });
            }
            req.resources = resources;
            let text = serde_json::to_string(&req).expect("serializable");
            write_in(txn, &row, |am| am.requirements = Set(text)).await?;
            cache.refresh(txn, server_id).await?;
            Ok(done(id))
        })
    }))
}

/// Fails the step when another live container holds the address `id`'s server gave it (the
/// command's compensation then destroys the new guest).
async fn unique_address(svc: &Services, id: i64, ip: Option<&str>) -> Result<(), StepError> {
    match super::taken_addresses(svc.db(), &[(id, ip)])
        .await?
        .remove(&id)
    {
        Some(message) => Err(StepError::Permanent(message)),
        None => Ok(()),
    }
}

/// Undoes a failed `container.update`: its growth dummy (if any) goes, giving back what it
/// reserved. The guest keeps the size the driver reports; the core's requirements are unchanged.
pub(super) async fn compensate_update(
    svc: &Services,
    cmd: &command::Model,
) -> Result<Option<UndoWrites>, DbErr> {
    let Some(r) = Recorded::of(cmd).reservation() else {
        return Ok(None);
    };
    let Some(d) = placement::dummy(svc.db(), r.dummy_id).await? else {
        return Ok(None);
    };
    let cache = svc.placement_shared();
    Ok(Some(Box::new(move |txn| {
        Box::pin(async move {
            if placement::drop_dummy(txn, d.id).await? {
                cache.apply(d.server_id, &placement::dummy_resources(&d), 1, -1);
            }
            Ok(())
        })
    })))
}

fn place_err(e: PlacementError) -> StepError {
    match e {
        PlacementError::Db(e) => StepError::Db(e),
        other => StepError::Permanent(other.to_string()),
    }
}

/// Servers that hold another member of the same type in the container's environment (for
/// `spread`).
async fn spread_avoid(
    svc: &Services,
    row: &container::Model,
    req: &Requirements,
) -> Result<HashSet<i64>, StepError> {
    let (true, Some(env)) = (req.spread, row.environment_id) else {
        return Ok(HashSet::new());
    };
    let same = container::Entity::find()
        .filter(container::Column::EnvironmentId.eq(env))
        .filter(container::Column::TypeId.eq(row.type_id.clone()))
        .filter(container::Column::Id.ne(row.id))
        .all(svc.db())
        .await?;
    let mut servers = std::collections::HashSet::new();
    for c in same {
        if parse_status(c.id, &c.status)?.is_member() {
            servers.extend(c.server_id);
        }
    }
    Ok(servers)
}

/// What a step's writes need to place a container with a dummy that dies with its command.
struct Placing {
    cache: Arc<PlacementCache>,
    command: i64,
    deadline: i64,
    /// The image of the container's type.
    image: Option<crate::model::ImageRef>,
}

impl Placing {
    /// For a container of type `type_id`.
    fn of(ctx: &StepCtx<'_>, type_id: &str) -> Self {
        Placing {
            cache: ctx.svc.placement_shared(),
            command: ctx.cmd.id,
            deadline: ctx.svc.queue().now_ms() + ctx.svc.dummy_ttl_ms(),
            image: super::image_of(ctx.svc, type_id),
        }
    }

    /// Places `container_id` in `txn`.
    async fn reserve(
        &self,
        txn: &DatabaseTransaction,
        container_id: i64,
        req: &Requirements,
        avoid: HashSet<i64>,
        server: Option<i64>,
    ) -> Result<Reservation, StepError> {
        let request = PlaceRequest {
            requirements: req,
            image: self.image.as_ref(),
            container_id,
            command_id: Some(self.command),
            avoid,
            server,
            deadline: self.deadline,
        };
        placement::place(txn, &self.cache, request)
            .await
            .map_err(place_err)
    }
}

/// The reservation a placing step recorded in the progress.
pub(super) fn reservation(progress: &Value) -> Option<Reservation> {
    Recorded::deserialize(progress).ok()?.reservation()
}

/// What the steps of a create, clone, migration or resize recorded in its progress, as the
/// group steps and the compensation of a failed command read it. A field a step has not
/// written yet is absent (the command did not get that far).
#[derive(Debug, Default, Deserialize)]
pub(super) struct Recorded {
    /// The server of the reservation.
    server_id: Option<i64>,
    /// The dummy holding it.
    dummy_id: Option<i64>,
    /// The copy a clone made.
    clone_id: Option<i64>,
    /// Whether the container ran before a clone or migration stopped it.
    #[serde(default)]
    was_running: bool,
}

impl Recorded {
    /// The progress of `cmd`. One that does not read (damaged) is logged with the command and
    /// read as recording nothing: compensation then undoes only what the database shows.
    pub(super) fn of(cmd: &command::Model) -> Recorded {
        match serde_json::from_str::<Option<Recorded>>(&cmd.progress) {
            Ok(recorded) => recorded.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(command = cmd.id, kind = %cmd.kind, error = %e, "unreadable progress; undoing only what the database shows");
                Recorded::default()
            }
        }
    }

    /// The reservation, once the placing step made it.
    pub(super) fn reservation(&self) -> Option<Reservation> {
        Some(Reservation {
            server_id: self.server_id?,
            dummy_id: self.dummy_id?,
        })
    }
}

/// The reservation command `command` holds for container `container` in a dummy, if any.
async fn placed_before(
    svc: &Services,
    command: i64,
    container: i64,
) -> Result<Option<Reservation>, DbErr> {
    Ok(placement::dummies_of(svc.db(), command)
        .await?
        .into_iter()
        .find(|d| d.container_id == container)
        .map(|d| Reservation {
            server_id: d.server_id,
            dummy_id: d.id,
        }))
}

fn lost_reservation() -> StepError {
    StepError::Permanent("lost the placement of this command".into())
}

/// Makes the container the holder of its dummy's reservation; fails when the dummy expired
/// and the server has no room any more.
async fn fill(
    txn: &DatabaseTransaction,
    r: Reservation,
    need: &Resources,
    server: &str,
) -> Result<(), StepError> {
    if placement::fill(txn, r, need).await? {
        return Ok(());
    }
    Err(StepError::Permanent(format!(
        "the capacity reserved on server {server} expired and the server has no room any more"
    )))
}

/// Steps: 0 place (dummy), 1 create (or import) and start on the server, replacing the dummy.
async fn create(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let id = row.id;
    if parse_status(row.id, &row.status)? != ContainerStatus::Creating {
        // Already created (a repeated final step): nothing left to do.
        return Ok(Transition::bare(done(id)));
    }
    let req = requirements_of(&row);
    if CreateStep::of(ctx.cmd)? == CreateStep::Place {
        // Placed by an earlier run whose group carried the step without writing it: its dummy
        // is the placement.
        if let Some(r) = placed_before(svc, ctx.cmd.id, id).await? {
            let progress = json!({ "server_id": r.server_id, "dummy_id": r.dummy_id });
            let step = CreateStep::Make.number();
            return Ok(Transition::bare(Next::Continue { step, progress }));
        }
        let params: params::Create = ctx.params()?;
        let mut avoid = spread_avoid(svc, &row, &req).await?;
        avoid.extend(params.avoid);
        let placing = Placing::of(ctx, &row.type_id);
        let project = row.project_id;
        return Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                // The quota again, now that it runs: of racing creates, the first asked wins.
                let more = Usage::of(1, &req.resources);
                crate::projects::check(txn, project, &more, Some(id))
                    .await
                    .map_err(super::core_err)?;
                let r = placing
                    .reserve(txn, id, &req, avoid, params.server_id)
                    .await?;
                let progress = json!({ "server_id": r.server_id, "dummy_id": r.dummy_id });
                let step = CreateStep::Make.number();
                Ok(Next::Continue { step, progress })
            })
        }));
    }
    let params: params::Create = ctx.params()?;
    let r = reservation(&ctx.progress).ok_or_else(lost_reservation)?;
    let (driver, server) = driver_of(svc, r.server_id)?;
    let image = match (params.image, params.clone_of) {
        (Some(image), _) => Some(image),
        (None, Some(source))
            if driver
                .status(&row.guest_id)
                .await
                .map_err(|e| driver_err(&server, e))?
                .is_none() =>
        {
            Some(disk_of(svc, source).await?)
        }
        _ => None,
    };
    let upload = image
        .as_ref()
        .and_then(|i| crate::driver::remote::upload_of(i).map(String::from));
    let image = match image {
        Some(image) if upload.is_none() => {
            Some(usable_image(svc, driver.as_ref(), &server, image).await?)
        }
        other => other,
    };
    let start = params.start;
    let spec = GuestSpec {
        avoid: super::network_avoid(svc, r.server_id).await?,
        ..spec(ctx.svc, &row)
    };
    let info = match &upload {
        // A container uploaded to this core: agents pull it from their cores; a server in
        // this process reads the file.
        Some(id) if driver.kind() != crate::fleet::RemoteFactory::KIND => {
            import_upload(svc, driver.as_ref(), &spec, id, start).await
        }
        _ => make_guest(driver.as_ref(), &spec, image.as_ref(), start).await,
    }
    .map_err(|e| driver_err(&server, e))?;
    if let Some(id) = &upload {
        // Imported: the upload is needed no more (a repeated step finds the guest made).
        let _ = tokio::fs::remove_dir_all(svc.upload(id)).await;
    }
    unique_address(svc, id, info.ip.as_deref()).await?;
    let status = if start {
        ContainerStatus::Running
    } else {
        ContainerStatus::Stopped
    };
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            fill(txn, r, &req.resources, &server).await?;
            write_in(txn, &row, |am| {
                am.server_id = Set(Some(r.server_id));
                am.ip = Set(info.ip);
                am.status = status_of(status);
            })
            .await?;
            Ok(done(id))
        })
    }))
}

/// Creates the guest of `spec` on `driver` (a server in this process) from upload `id`'s file,
/// streamed; a guest made by an earlier run of the step, whose upload is gone, is answered.
async fn import_upload(
    svc: &Services,
    driver: &dyn Driver,
    spec: &GuestSpec,
    id: &str,
    start: bool,
) -> Result<GuestInfo, crate::driver::DriverError> {
    let disk = svc.upload(id).join("disk");
    let info = match tokio::fs::try_exists(&disk).await {
        Ok(true) => driver.import_from(spec, &disk).await?,
        _ => driver.status(&spec.guest_id).await?.ok_or_else(|| {
            crate::driver::DriverError::Permanent(format!(
                "the uploaded container {id} is no longer on this core (uploads are kept a day); import it again"
            ))
        })?,
    };
    if start {
        driver.start(&spec.guest_id).await?;
    }
    Ok(info)
}

/// Imports `image` on `target`, first pulling it from an agent if it refers to an agent's
/// export and `target` cannot pull it itself.
async fn import_on(
    svc: &Services,
    target: &dyn Driver,
    name: &str,
    spec: &GuestSpec,
    image: GuestImage,
) -> Result<GuestInfo, StepError> {
    let image = usable_image(svc, target, name, image).await?;
    make_guest(target, spec, Some(&image), false)
        .await
        .map_err(|e| driver_err(name, e))
}

/// `image` in a form the driver `target` can import (a reference to an agent's export stays a
/// reference between agents, and is pulled for other drivers).
async fn usable_image(
    svc: &Services,
    target: &dyn Driver,
    name: &str,
    image: GuestImage,
) -> Result<GuestImage, StepError> {
    let token = svc.agent_token().to_string();
    crate::driver::remote::for_target(image, target, &token)
        .await
        .map_err(|e| driver_err(name, e))
}

/// A copy of a container's disk; a running container is stopped for the copy and started again.
async fn disk_of(svc: &Services, id: i64) -> Result<GuestImage, StepError> {
    let row = load_container(svc.db(), id).await.map_err(core_err)?;
    let server_id = row.server_id.ok_or_else(|| {
        StepError::Permanent(format!("container {id} has no server to copy from"))
    })?;
    let (src, name) = driver_of(svc, server_id)?;
    let running = parse_status(row.id, &row.status)? == ContainerStatus::Running;
    if running {
        src.stop(&row.guest_id)
            .await
            .map_err(|e| driver_err(&name, e))?;
    }
    let image = src
        .export(&row.guest_id)
        .await
        .map_err(|e| driver_err(&name, e));
    if running {
        src.start(&row.guest_id)
            .await
            .map_err(|e| driver_err(&name, e))?;
    }
    image
}

/// Undoes a failed create, clone or migration: destroys what it made on the target server,
/// gives back its dummy and puts the containers back as they were.
///
/// Every read happens before the transaction begins: SQLite has one connection.
pub(super) async fn compensate(
    svc: &Services,
    cmd: &command::Model,
    _error: &str,
) -> Result<Option<UndoWrites>, DbErr> {
    let progress = Recorded::of(cmd);
    let new_id = match cmd.kind.as_str() {
        "container.clone" => progress.clone_id,
        _ => cmd.target_id,
    };
    // A create whose placement was carried, not written, holds it in a dummy only.
    let reserved = match (progress.reservation(), cmd.kind.as_str(), new_id) {
        (None, "container.create", Some(id)) => placed_before(svc, cmd.id, id).await?,
        (r, _, _) => r,
    };
    let row = match new_id {
        Some(id) => container::Entity::find_by_id(id).one(svc.db()).await?,
        None => None,
    };
    let dummy = match reserved {
        Some(r) => placement::dummy(svc.db(), r.dummy_id).await?,
        None => None,
    };
    if cmd.kind == "container.clone" {
        restart_clone_source(svc, cmd, &progress).await;
    }
    // Side effects on servers first (best effort), then one transaction.
    let change = match (&row, cmd.kind.as_str()) {
        (Some(row), "container.migrate") => undo_migrate(svc, cmd, &progress, row).await,
        (Some(row), _) => undo_create(svc, cmd, row, reserved).await,
        (None, _) => None,
    };
    let cache = svc.placement_shared();
    Ok(Some(Box::new(move |txn| {
        Box::pin(async move {
            if let Some(d) = dummy
                && placement::drop_dummy(txn, d.id).await?
            {
                cache.apply(d.server_id, &placement::dummy_resources(&d), 1, -1);
            }
            if let (Some(row), Some(change)) = (row, change) {
                write_in(txn, &row, |am| {
                    if let Some(status) = change.status {
                        am.status = status_of(status);
                    }
                    if change.unlock {
                        am.locked_by = Set(None);
                    }
                })
                .await?;
            }
            Ok(())
        })
    })))
}

/// What undoing a command changes on its container row.
struct Undo {
    status: Option<ContainerStatus>,
    unlock: bool,
}

/// A container that never got created becomes failed (its guest destroyed if it got made);
/// a copy this command already finished is only unlocked.
async fn undo_create(
    svc: &Services,
    cmd: &command::Model,
    row: &container::Model,
    reserved: Option<Reservation>,
) -> Option<Undo> {
    // A status this core does not know is left as it is (only the lock goes).
    if parse_status(row.id, &row.status).map_or(true, |s| s != ContainerStatus::Creating) {
        return (row.locked_by == Some(cmd.id)).then_some(Undo {
            status: None,
            unlock: true,
        });
    }
    if let Some(server_id) = reserved.map(|r| r.server_id).or(row.server_id)
        && let Some(driver) = svc.fleet().driver(server_id)
        && let Err(e) = driver.destroy(&row.guest_id).await
    {
        tracing::warn!(error = %e, guest = %row.guest_id, "could not destroy the guest of a failed create; it is left for the collector");
    }
    Some(Undo {
        status: Some(ContainerStatus::Failed),
        unlock: true,
    })
}

/// After a failed migration that did not switch servers: destroys the copy on the target and
/// starts the container again where it was if it ran before.
async fn undo_migrate(
    svc: &Services,
    cmd: &command::Model,
    progress: &Recorded,
    row: &container::Model,
) -> Option<Undo> {
    let target = progress.server_id;
    if target.is_none() || row.server_id == target || cmd.step < MigrateStep::Copy.number() {
        return None;
    }
    if let Some(driver) = target.and_then(|t| svc.fleet().driver(t))
        && let Err(e) = driver.destroy(&row.guest_id).await
    {
        tracing::warn!(error = %e, guest = %row.guest_id, "could not destroy the copy of a failed migration");
    }
    if !progress.was_running {
        return None;
    }
    let driver = row.server_id.and_then(|s| svc.fleet().driver(s))?;
    match driver.start(&row.guest_id).await {
        Ok(()) => Some(Undo {
            status: Some(ContainerStatus::Running),
            unlock: false,
        }),
        Err(e) => {
            tracing::warn!(error = %e, container = row.id, "could not restart a container after its migration failed");
            None
        }
    }
}

/// After a failed clone, starts the source again if the clone had stopped it (best effort).
async fn restart_clone_source(svc: &Services, cmd: &command::Model, progress: &Recorded) {
    if cmd.step < CloneStep::Copy.number() || !progress.was_running {
        return;
    }
    let Some(source) = cmd.target_id else { return };
    let Ok(row) = load_container(svc.db(), source).await else {
        return;
    };
    if let Some(driver) = row.server_id.and_then(|s| svc.fleet().driver(s))
        && let Err(e) = driver.start(&row.guest_id).await
    {
        tracing::warn!(error = %e, container = source, "could not restart the source of a failed clone");
    }
}

/// Steps: 0 make the copy's row and place it, 1 stop the source, 2 copy, 3 start both if the
/// source ran.
async fn clone(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let step = CloneStep::of(ctx.cmd)?;
    if step == CloneStep::Place {
        let status = parse_status(row.id, &row.status)?;
        check_status(
            row.id,
            status,
            "container.clone",
            ContainerCommand::Clone { server: None }.allowed_from(),
        )
        .map_err(StepError::Permanent)?;
        let server = ctx.params::<params::Clone>()?.server_id;
        let (placing, command, platform) = (
            Placing::of(ctx, &row.type_id),
            ctx.cmd.id,
            svc.platform_name().to_string(),
        );
        return Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                let req = requirements_of(&row);
                crate::projects::check(txn, row.project_id, &Usage::of(1, &req.resources), None)
                    .await
                    .map_err(super::core_err)?;
                let now = now_ms();
                let copy = container::ActiveModel {
                    platform_id: Set(row.platform_id),
                    type_id: Set(row.type_id.clone()),
                    state: Set(row.state.clone()),
                    status: status_of(ContainerStatus::Creating),
                    server_id: Set(None),
                    environment_id: Set(None),
                    project_id: Set(row.project_id),
                    guest_id: Set(String::new()),
                    ip: Set(None),
                    requirements: Set(row.requirements.clone()),
                    params: Set(row.params.clone()),
                    locked_by: Set(Some(command)),
                    created_at: Set(now),
                    updated_at: Set(now),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                let guest = guest_id_for(&platform, copy.id);
                let copy_id = copy.id;
                let mut am: container::ActiveModel = copy.into();
                am.guest_id = Set(guest);
                am.update(txn).await?;
                let r = placing
                    .reserve(txn, copy_id, &req, HashSet::new(), server)
                    .await?;
                let progress = json!({
                    "clone_id": copy_id,
                    "server_id": r.server_id,
                    "dummy_id": r.dummy_id,
                    "was_running": status == ContainerStatus::Running,
                });
                let step = CloneStep::StopSource.number();
                Ok(Next::Continue { step, progress })
            })
        }));
    }
    let clone_id: i64 = ctx.progress_field("clone_id")?;
    let r = reservation(&ctx.progress).ok_or_else(lost_reservation)?;
    let was_running: bool = ctx.progress_field("was_running")?;
    let source_server = row
        .server_id
        .ok_or_else(|| StepError::Permanent("source container has no server".into()))?;
    let (src, src_name) = driver_of(svc, source_server)?;
    let next = |step: CloneStep| Next::Continue {
        step: step.number(),
        progress: ctx.progress.clone(),
    };
    match step {
        CloneStep::Place => unreachable!("placing returned above"),
        CloneStep::StopSource => {
            src.stop(&row.guest_id)
                .await
                .map_err(|e| driver_err(&src_name, e))?;
            Ok(Transition::bare(next(CloneStep::Copy)))
        }
        CloneStep::Copy => {
            let copy = load_container(svc.db(), clone_id).await.map_err(core_err)?;
            let image = src
                .export(&row.guest_id)
                .await
                .map_err(|e| driver_err(&src_name, e))?;
            let (dst, dst_name) = driver_of(svc, r.server_id)?;
            let spec = GuestSpec {
                avoid: super::network_avoid(svc, r.server_id).await?,
                ..spec(svc, &copy)
            };
            let info = import_on(svc, dst.as_ref(), &dst_name, &spec, image).await?;
            unique_address(svc, copy.id, info.ip.as_deref()).await?;
            let next = next(CloneStep::Finish);
            Ok(Transition::commit(move |txn| {
                Box::pin(async move {
                    fill(txn, r, &requirements_of(&copy).resources, &dst_name).await?;
                    write_in(txn, &copy, |am| {
                        am.server_id = Set(Some(r.server_id));
                        am.ip = Set(info.ip);
                        am.status = status_of(ContainerStatus::Stopped);
                    })
                    .await?;
                    Ok(next)
                })
            }))
        }
        CloneStep::Finish => {
            let copy = load_container(svc.db(), clone_id).await.map_err(core_err)?;
            if was_running {
                let (dst, dst_name) = driver_of(svc, r.server_id)?;
                src.start(&row.guest_id)
                    .await
                    .map_err(|e| driver_err(&src_name, e))?;
                dst.start(&copy.guest_id)
                    .await
                    .map_err(|e| driver_err(&dst_name, e))?;
            }
            let status = if was_running {
                ContainerStatus::Running
            } else {
                ContainerStatus::Stopped
            };
            let finish = move |am: &mut container::ActiveModel| {
                am.status = status_of(status);
                am.locked_by = Set(None);
            };
            Ok(write(copy, finish, done(clone_id)))
        }
    }
}

/// Steps: 0 check and place on the target (dummy), 1 stop, 2 copy to the target, 3 destroy on
/// the source and switch, 4 start. Live (a running VM): nothing stops; step 2 sends the running
/// guest to the target (`live_migrate`), and start finds it running.
async fn migrate(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let next = |step: MigrateStep, progress: Value| Next::Continue {
        step: step.number(),
        progress,
    };
    let step = MigrateStep::of(ctx.cmd)?;
    if step == MigrateStep::Place {
        let status = parse_status(row.id, &row.status)?;
        check_status(
            row.id,
            status,
            "container.migrate",
            ContainerCommand::Migrate {
                to: None,
                live: false,
            }
            .allowed_from(),
        )
        .map_err(StepError::Permanent)?;
        let params::Migrate { to, live } = ctx.params::<params::Migrate>()?;
        if to.is_some() && row.server_id == to {
            return Ok(Transition::bare(done(row.id)));
        }
        let req = requirements_of(&row);
        let mut avoid = spread_avoid(svc, &row, &req).await?;
        avoid.extend(row.server_id);
        // A running container moving live can only go where it can be received running.
        let live = live && status == ContainerStatus::Running;
        if live && to.is_none() {
            avoid.extend(svc.fleet().lacking(|c| c.live_migrate));
            if let Some(source) = row.server_id {
                avoid.extend(svc.fleet().outside_network(source));
            }
        }
        let placing = Placing::of(ctx, &row.type_id);
        return Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                let r = placing.reserve(txn, row.id, &req, avoid, to).await?;
                let progress = json!({
                    "source": row.server_id,
                    "server_id": r.server_id,
                    "dummy_id": r.dummy_id,
                    "was_running": status == ContainerStatus::Running,
                    "previous_ip": row.ip,
                    // A stopped container has nothing to keep running: it moves cold.
                    "live": live,
                });
                Ok(next(MigrateStep::Stop, progress))
            })
        }));
    }
    let r = reservation(&ctx.progress).ok_or_else(lost_reservation)?;
    let source: i64 = ctx.progress_field("source")?;
    let live = ctx
        .progress
        .get("live")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match step {
        MigrateStep::Place => unreachable!("placing returned above"),
        MigrateStep::Stop if live => {
            let (dst, dst_name) = driver_of(svc, r.server_id)?;
            if !dst.capabilities().live_migrate {
                return Err(StepError::Permanent(format!(
                    "placement chose server {dst_name}, which cannot receive a running container (no live migration there); name a server that can with --to (server list shows live-migrate), or migrate without --live"
                )));
            }
            Ok(Transition::bare(next(
                MigrateStep::Copy,
                ctx.progress.clone(),
            )))
        }
        MigrateStep::Copy if live => {
            let report = migrate_live(svc, &row, source, r.server_id).await?;
            let mut progress = ctx.progress.clone();
            progress["ip"] = json!(row.ip);
            progress["moved"] = report;
            Ok(Transition::bare(next(MigrateStep::Switch, progress)))
        }
        MigrateStep::Stop => {
            let (src, src_name) = driver_of(svc, source)?;
            src.stop(&row.guest_id)
                .await
                .map_err(|e| driver_err(&src_name, e))?;
            let stopped =
                |am: &mut container::ActiveModel| am.status = status_of(ContainerStatus::Stopped);
            Ok(write(
                row,
                stopped,
                next(MigrateStep::Copy, ctx.progress.clone()),
            ))
        }
        MigrateStep::Copy => {
            let (src, src_name) = driver_of(svc, source)?;
            let (dst, dst_name) = driver_of(svc, r.server_id)?;
            let info = match dst
                .status(&row.guest_id)
                .await
                .map_err(|e| driver_err(&dst_name, e))?
            {
                Some(info) => info,
                None => {
                    let image = src
                        .export(&row.guest_id)
                        .await
                        .map_err(|e| driver_err(&src_name, e))?;
                    // The container keeps its address: its environment stays wired.
                    let keep = GuestSpec {
                        ip: row.ip.clone(),
                        avoid: super::network_avoid(svc, r.server_id).await?,
                        ..spec(svc, &row)
                    };
                    import_on(svc, dst.as_ref(), &dst_name, &keep, image).await?
                }
            };
            unique_address(svc, row.id, info.ip.as_deref()).await?;
            let mut progress = ctx.progress.clone();
            progress["ip"] = json!(info.ip);
            Ok(Transition::bare(next(MigrateStep::Switch, progress)))
        }
        MigrateStep::Switch => {
            let (src, src_name) = driver_of(svc, source)?;
            let (_, dst_name) = driver_of(svc, r.server_id)?;
            src.destroy(&row.guest_id)
                .await
                .map_err(|e| driver_err(&src_name, e))?;
            let need = requirements_of(&row).resources;
            let ip: Option<String> = ctx.progress_field("ip")?;
            let (cache, next) = (
                svc.placement_shared(),
                next(MigrateStep::Start, ctx.progress.clone()),
            );
            Ok(Transition::commit(move |txn| {
                Box::pin(async move {
                    fill(txn, r, &need, &dst_name).await?;
                    placement::release(txn, source, &need, 1).await?;
                    cache.apply(source, &need, 1, -1);
                    write_in(txn, &row, |am| {
                        am.server_id = Set(Some(r.server_id));
                        am.ip = Set(ip);
                    })
                    .await?;
                    Ok(next)
                })
            }))
        }
        MigrateStep::Start => {
            // A server of another subnet gave it another address: its environment is told, so
            // that what points at it (a balancer's upstreams, a datasource) follows.
            let previous: Option<String> = ctx
                .progress
                .get("previous_ip")
                .and_then(|v| v.as_str())
                .map(String::from);
            let then = match row.environment_id {
                Some(env) if previous.is_some() && previous != row.ip => Next::Spawn {
                    step: MigrateStep::Rewired.number(),
                    progress: ctx.progress.clone(),
                    children: vec![NewCommand {
                        project: None,
                        kind: CommandKind::EnvironmentNotify,
                        target: Some(Target::Environment(env)),
                        params: params::to_value(params::Notify {
                            containers: vec![row.id],
                            cause: None,
                            hook: Some(params::NotifyHook::Moved),
                            previous_ip: previous,
                        }),
                        requested_by: ctx.cmd.requested_by.clone(),
                    }],
                },
                _ if live => Next::Done(json!({
                    "container_id": row.id,
                    "live": ctx.progress.get("moved").cloned().unwrap_or(Value::Null),
                })),
                _ => done(row.id),
            };
            if ctx.progress_field::<bool>("was_running")? {
                let (dst, dst_name) = driver_of(svc, r.server_id)?;
                dst.start(&row.guest_id)
                    .await
                    .map_err(|e| driver_err(&dst_name, e))?;
                let running = |am: &mut container::ActiveModel| {
                    am.status = status_of(ContainerStatus::Running)
                };
                return Ok(write(row, running, then));
            }
            Ok(Transition::bare(then))
        }
        MigrateStep::Rewired => {
            // The move itself succeeded; a hook that failed to follow it is said, not undone.
            let mut result = json!({ "container_id": row.id });
            if let Some(failure) = super::hooks::child_failures(ctx).await? {
                tracing::warn!(container = row.id, %failure, "the environment did not follow a migrated container's new address");
                result["rewire_failed"] = json!(failure);
            }
            Ok(Transition::bare(Next::Done(result)))
        }
    }
}

/// Sends running container `row` from server `source` to `target` (both live-capable): the
/// target prepares to receive it, the source sends disk and memory while it runs, the target
/// runs it. Resumed after a crash, a source that no longer runs it while the target holds it
/// means it was sent: only the target's last step remains. On failure the container runs on
/// the source and nothing is left on the target.
async fn migrate_live(
    svc: &Services,
    row: &container::Model,
    source: i64,
    target: i64,
) -> Result<Value, StepError> {
    let (src, src_name) = driver_of(svc, source)?;
    let (dst, dst_name) = driver_of(svc, target)?;
    let guest = &row.guest_id;
    let on_source = src
        .status(guest)
        .await
        .map_err(|e| driver_err(&src_name, e))?
        .map(|g| g.state);
    let sent = on_source != Some(GuestState::Running)
        && dst
            .status(guest)
            .await
            .map_err(|e| driver_err(&dst_name, e))?
            .is_some();
    let mut report = json!({ "resumed": sent });
    if !sent {
        let offer = src
            .live_offer(guest)
            .await
            .map_err(|e| driver_err(&src_name, e))?;
        // It keeps its address: its environment stays wired, its neighbours' ARP entries right.
        let keep = GuestSpec {
            ip: row.ip.clone(),
            ..spec(svc, row)
        };
        let to = dst
            .live_receive(&keep, &offer)
            .await
            .map_err(|e| driver_err(&dst_name, e))?;
        match src.live_send(guest, &to).await {
            Ok(r) => report = serde_json::to_value(r).unwrap_or(Value::Null),
            Err(e) => {
                if let Err(d) = dst.destroy(guest).await {
                    tracing::warn!(error = %d, %guest, "could not remove the target's copy of a failed live migration");
                }
                return Err(driver_err(&src_name, e));
            }
        }
    }
    dst.live_finish(guest)
        .await
        .map_err(|e| driver_err(&dst_name, e))?;
    Ok(report)
}

/// Runs a script inside a running container (the CIS layer). Scripts run by hooks must be
/// idempotent: after a crash of the core the step may run again.
async fn exec(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let status = parse_status(row.id, &row.status)?;
    if matches!(
        status,
        ContainerStatus::Stopped | ContainerStatus::Suspended
    ) {
        // It cannot run now: kept, and run when the container runs again (start or resume),
        // so the environment change that asked for it converges instead of half-applying.
        let params::Exec { script, args, .. } = ctx.params()?;
        let id = row.id;
        return Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                pending_script::ActiveModel {
                    container_id: Set(id),
                    script: Set(script),
                    args: Set(serde_json::to_string(&args).expect("strings serialize")),
                    created_at: Set(crate::model::now_ms()),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                Ok(Next::Done(json!({ "pending": true, "container_id": id })))
            })
        }));
    }
    check_status(
        row.id,
        status,
        "container.exec",
        &[ContainerStatus::Running],
    )
    .map_err(StepError::Permanent)?;
    let params::Exec { script, args, .. } = ctx.params()?;
    let server_id = row
        .server_id
        .ok_or_else(|| StepError::Permanent(format!("container {} has no server", row.id)))?;
    let (driver, server) = driver_of(ctx.svc, server_id)?;
    // Scripts still waiting for this container (one failed at its start) run first, in order.
    let (applied, failure) =
        run_pending(ctx.svc, row.id, driver.as_ref(), &row.guest_id, &server).await?;
    let outcome = match failure {
        Some(error) => Err((error, None)),
        None => {
            let out = driver
                .exec(&row.guest_id, &script, &args)
                .await
                .map_err(|e| driver_err(&server, e))?;
            if out.exit_code == 0 {
                Ok(out)
            } else {
                let error = format!(
                    "script in container {} exited with code {}: {}",
                    row.id,
                    out.exit_code,
                    out.stderr.trim()
                );
                Err((error, Some(out)))
            }
        }
    };
    let next = match outcome {
        Ok(out) => Next::Done(json!({
            "exit_code": out.exit_code,
            "stdout": out.stdout,
            "stderr": out.stderr,
        })),
        Err((error, ran)) => Next::Partial {
            result: match ran {
                Some(out) => json!({
                    "container_id": row.id,
                    "exit_code": out.exit_code,
                    "stdout": out.stdout,
                    "stderr": out.stderr,
                }),
                None => json!({ "container_id": row.id }),
            },
            error,
        },
    };
    if applied.is_empty() {
        return Ok(Transition::bare(next));
    }
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            forget_pending(txn, applied).await?;
            Ok(next)
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_step_recorded_reads_back_and_damage_reads_as_nothing() {
        let mut cmd = super::params::tests_support::command("container.clone", 2);
        cmd.progress =
            r#"{"clone_id": 7, "server_id": 3, "dummy_id": 9, "was_running": true}"#.into();
        let r = Recorded::of(&cmd);
        assert_eq!((r.clone_id, r.was_running), (Some(7), true));
        assert_eq!(
            r.reservation(),
            Some(Reservation {
                server_id: 3,
                dummy_id: 9
            })
        );
        // Before the placing step: nothing recorded, nothing to undo.
        for progress in ["{}", "null"] {
            cmd.progress = progress.into();
            let r = Recorded::of(&cmd);
            assert_eq!((r.reservation(), r.was_running), (None, false));
        }
        // Damaged: read as nothing recorded, never as a default reservation.
        cmd.progress = r#"{"server_id": "three", "was_running": 1}"#.into();
        let r = Recorded::of(&cmd);
        assert_eq!(
            (r.reservation(), r.clone_id, r.was_running),
            (None, None, false)
        );
    }
}
