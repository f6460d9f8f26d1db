//! Steps of container commands: the one-step lifecycle commands and what the others share
//! (placement, compensation); the multi-step ones in a file each.

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

mod clone;
mod create;
mod exec;
mod migrate;
mod update;

use clone::{clone, restart_clone_source};
use create::{create, import_on};
use exec::exec;
use migrate::{migrate, undo_migrate};
use update::{unique_address, update};

pub(super) use update::compensate_update;

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
            write_in(txn, &row, |am| {
                am.status = status_of(new_status);
                // Why it had its former status (e.g. its processes had exited) no longer holds.
                am.status_reason = Set(None);
            })
            .await?;
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

/// Undoes a failed create, clone or migration: destroys what it made on the target server,
/// gives back its dummy and puts the containers back as they were.
///
/// Every read happens before the transaction begins: SQLite has one connection.
pub(super) async fn compensate(
    svc: &Services,
    cmd: &command::Model,
    error: &str,
) -> Result<Option<UndoWrites>, DbErr> {
    let reason = format!("{} (command {}) failed: {error}", cmd.kind, cmd.id);
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
    let (cache, queue) = (svc.placement_shared(), svc.queue().clone());
    Ok(Some(Box::new(move |txn| {
        Box::pin(async move {
            if let Some(d) = dummy
                && placement::drop_dummy(txn, d.id).await?
            {
                cache.apply(d.server_id, &placement::dummy_resources(&d), 1, -1);
            }
            if let (Some(row), Some(mut change)) = (row, change) {
                let notify = change.notify.take();
                write_in(txn, &row, |am| {
                    if let Some(status) = change.status {
                        am.status = status_of(status);
                        if status == ContainerStatus::Failed {
                            am.status_reason = Set(Some(reason));
                        }
                    }
                    if let Some(why) = change.reason {
                        am.status_reason = Set(Some(why));
                    }
                    if change.unlock {
                        am.locked_by = Set(None);
                    }
                })
                .await?;
                if let Some(n) = notify {
                    queue.enqueue_in(txn, vec![n], None).await?;
                }
            }
            Ok(())
        })
    })))
}

/// What undoing a command changes on its container row, and a command it leaves to run.
#[derive(Default)]
struct Undo {
    status: Option<ContainerStatus>,
    unlock: bool,
    /// Why the container is as it is (a failed status gets the command's failure anyway).
    reason: Option<String>,
    notify: Option<NewCommand>,
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
            unlock: true,
            ..Undo::default()
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
        ..Undo::default()
    })
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
