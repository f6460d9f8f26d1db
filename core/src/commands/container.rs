//! Steps of container commands.

use sea_orm::{ActiveModelTrait, DatabaseTransaction, DbErr, Set, TransactionTrait};
use serde_json::{Value, json};

use super::{StepCtx, core_err, driver_err, driver_of};
use crate::core::Core;
use crate::driver::GuestSpec;
use crate::entities::{command, container};
use crate::managers::{ContainerCommand, check_status, guest_id_for, load_container, parse_status};
use crate::model::{ContainerStatus, Requirements, Resources, now_ms};
use crate::queue::{Next, StepError, Transition};

fn spec(row: &container::Model) -> GuestSpec {
    let req: Requirements = serde_json::from_str(&row.requirements).unwrap_or_default();
    GuestSpec {
        guest_id: row.guest_id.clone(),
        type_id: row.type_id.clone(),
        resources: req.resources,
    }
}

/// Begins a transaction and applies `change` to container `row`.
async fn write(
    core: &Core,
    row: &container::Model,
    change: impl FnOnce(&mut container::ActiveModel),
) -> Result<DatabaseTransaction, DbErr> {
    let txn = core.db().begin().await?;
    write_in(&txn, row, change).await?;
    Ok(txn)
}

async fn write_in(
    txn: &DatabaseTransaction,
    row: &container::Model,
    change: impl FnOnce(&mut container::ActiveModel),
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

pub(super) async fn step(ctx: &StepCtx<'_>, op: &str) -> Result<Transition, StepError> {
    // The one-step lifecycle commands; the multi-step ones have their own functions.
    let simple = match op {
        "create" | "clone" | "migrate" | "exec" => None,
        "start" => Some(ContainerCommand::Start),
        "stop" => Some(ContainerCommand::Stop),
        "suspend" => Some(ContainerCommand::Suspend),
        "resume" => Some(ContainerCommand::Resume),
        "reboot" => Some(ContainerCommand::Reboot),
        "destroy" => Some(ContainerCommand::Destroy),
        "update" => {
            let resources: Resources = serde_json::from_value(ctx.params["resources"].clone())
                .map_err(|e| StepError::Permanent(format!("bad parameters: {e}")))?;
            Some(ContainerCommand::Update { resources })
        }
        other => {
            return Err(StepError::Permanent(format!("unknown container command '{other}'")));
        }
    };
    let core = ctx.core;
    let id = ctx.target_id()?;
    let row = load_container(core.db(), id).await.map_err(core_err)?;
    let Some(cmd) = simple else {
        return match op {
            "create" => create(ctx, row).await,
            "clone" => clone(ctx, row).await,
            "migrate" => migrate(ctx, row).await,
            _ => exec(ctx, row).await,
        };
    };
    let status = parse_status(&row.status);
    if cmd == ContainerCommand::Destroy && status.is_gone() {
        return Ok(Transition::bare(done(id)));
    }
    check_status(id, status, cmd.kind(), cmd.allowed_from()).map_err(StepError::Permanent)?;
    let Some(server_id) = row.server_id else {
        // Destroying a container that never reached a server.
        let txn = write(core, &row, |am| am.status = status_of(ContainerStatus::Destroyed)).await?;
        return Ok(Transition::with(done(id), txn));
    };
    let (driver, server) = driver_of(core, server_id)?;
    let guest = row.guest_id.as_str();
    let new_status = match &cmd {
        ContainerCommand::Start => {
            driver.start(guest).await.map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Running
        }
        ContainerCommand::Stop => {
            driver.stop(guest).await.map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Stopped
        }
        ContainerCommand::Suspend => {
            driver.suspend(guest).await.map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Suspended
        }
        ContainerCommand::Resume => {
            driver.resume(guest).await.map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Running
        }
        ContainerCommand::Reboot => {
            driver.reboot(guest).await.map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Running
        }
        ContainerCommand::Destroy => {
            driver.destroy(guest).await.map_err(|e| driver_err(&server, e))?;
            ContainerStatus::Destroyed
        }
        ContainerCommand::Update { resources } => {
            driver
                .update(guest, resources)
                .await
                .map_err(|e| driver_err(&server, e))?;
            let mut req: Requirements = serde_json::from_str(&row.requirements).unwrap_or_default();
            req.resources = *resources;
            let text = serde_json::to_string(&req).expect("serializable");
            let txn = write(core, &row, |am| am.requirements = Set(text)).await?;
            return Ok(Transition::with(done(id), txn));
        }
        ContainerCommand::Clone { .. } | ContainerCommand::Migrate { .. } => unreachable!(),
    };
    let txn = write(core, &row, |am| am.status = status_of(new_status)).await?;
    Ok(Transition::with(done(id), txn))
}

/// Steps: 0 place, 1 create on the server, 2 start.
async fn create(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let core = ctx.core;
    let id = row.id;
    let status = parse_status(&row.status);
    if status != ContainerStatus::Creating {
        // Already created (a repeated final step): nothing left to do.
        return Ok(Transition::bare(done(id)));
    }
    match ctx.cmd.step {
        0 => {
            let server_id = match row.server_id {
                Some(s) => s,
                None => {
                    let req: Requirements =
                        serde_json::from_str(&row.requirements).unwrap_or_default();
                    crate::placement::choose(core.db(), &req, Some(id), None)
                        .await
                        .map_err(|e| match e {
                            crate::placement::PlacementError::Db(e) => StepError::Db(e),
                            other => StepError::Permanent(other.to_string()),
                        })?
                }
            };
            let txn = write(core, &row, |am| am.server_id = Set(Some(server_id))).await?;
            let next = Next::Continue {
                step: 1,
                progress: json!({ "server_id": server_id }),
            };
            Ok(Transition::with(next, txn))
        }
        1 => {
            let server_id = row
                .server_id
                .ok_or_else(|| StepError::Permanent("container lost its server".into()))?;
            let (driver, server) = driver_of(core, server_id)?;
            let info = driver
                .create(&spec(&row))
                .await
                .map_err(|e| driver_err(&server, e))?;
            let txn = write(core, &row, |am| am.ip = Set(info.ip.clone())).await?;
            Ok(Transition::with(
                Next::Continue {
                    step: 2,
                    progress: ctx.progress.clone(),
                },
                txn,
            ))
        }
        _ => {
            let server_id = row
                .server_id
                .ok_or_else(|| StepError::Permanent("container lost its server".into()))?;
            let (driver, server) = driver_of(core, server_id)?;
            driver
                .start(&row.guest_id)
                .await
                .map_err(|e| driver_err(&server, e))?;
            let txn = write(core, &row, |am| am.status = status_of(ContainerStatus::Running)).await?;
            Ok(Transition::with(done(id), txn))
        }
    }
}

/// Undoes a failed create or clone: destroys the new guest if it got created and marks the new
/// container failed.
pub(super) async fn compensate(
    core: &Core,
    cmd: &command::Model,
    _error: &str,
) -> Result<Option<DatabaseTransaction>, DbErr> {
    let progress: Value = serde_json::from_str(&cmd.progress).unwrap_or(Value::Null);
    let new_id = if cmd.kind == "container.clone" {
        progress.get("clone_id").and_then(Value::as_i64)
    } else {
        cmd.target_id
    };
    let Some(new_id) = new_id else {
        return Ok(None);
    };
    let Ok(row) = load_container(core.db(), new_id).await else {
        return Ok(None);
    };
    if cmd.kind == "container.clone" {
        restart_clone_source(core, cmd, &progress).await;
    }
    if parse_status(&row.status) != ContainerStatus::Creating {
        // Only release what this command holds (the copy of a clone is locked by it).
        if row.locked_by == Some(cmd.id) {
            let txn = core.db().begin().await?;
            write_in(&txn, &row, |am| am.locked_by = Set(None)).await?;
            return Ok(Some(txn));
        }
        return Ok(None);
    }
    if let Some(server_id) = row.server_id
        && let Some(driver) = core.fleet().driver(server_id)
        && let Err(e) = driver.destroy(&row.guest_id).await
    {
        tracing::warn!(error = %e, guest = %row.guest_id, "could not destroy the guest of a failed create; it is left for the collector");
    }
    let txn = core.db().begin().await?;
    write_in(&txn, &row, |am| {
        am.status = status_of(ContainerStatus::Failed);
        am.locked_by = Set(None);
    })
    .await?;
    Ok(Some(txn))
}

/// After a failed clone, starts the source again if the clone had stopped it (best effort).
async fn restart_clone_source(core: &Core, cmd: &command::Model, progress: &Value) {
    if cmd.step < 2 || !progress["was_running"].as_bool().unwrap_or(false) {
        return;
    }
    let Some(source) = cmd.target_id else { return };
    let Ok(row) = load_container(core.db(), source).await else { return };
    if let Some(driver) = row.server_id.and_then(|s| core.fleet().driver(s))
        && let Err(e) = driver.start(&row.guest_id).await
    {
        tracing::warn!(error = %e, container = source, "could not restart the source of a failed clone");
    }
}

/// Steps: 0 make the copy's row, 1 stop the source, 2 copy, 3 start both if the source ran.
async fn clone(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let core = ctx.core;
    let step = ctx.cmd.step;
    if step == 0 {
        let status = parse_status(&row.status);
        check_status(row.id, status, "container.clone", ContainerCommand::Clone { server: None }.allowed_from())
            .map_err(StepError::Permanent)?;
        let target = ctx.params["server_id"].as_i64().or(row.server_id).ok_or_else(|| {
            StepError::Permanent(format!("container {} has no server to clone on", row.id))
        })?;
        let txn = core.db().begin().await?;
        let now = now_ms();
        let copy = container::ActiveModel {
            platform_id: Set(row.platform_id),
            type_id: Set(row.type_id.clone()),
            state: Set(row.state.clone()),
            status: status_of(ContainerStatus::Creating),
            server_id: Set(Some(target)),
            environment_id: Set(None),
            guest_id: Set(String::new()),
            ip: Set(None),
            requirements: Set(row.requirements.clone()),
            locked_by: Set(Some(ctx.cmd.id)),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        let guest = guest_id_for(core.platform_name(), copy.id);
        let copy_id = copy.id;
        let mut am: container::ActiveModel = copy.into();
        am.guest_id = Set(guest);
        am.update(&txn).await?;
        let progress = json!({
            "clone_id": copy_id,
            "server_id": target,
            "was_running": status == ContainerStatus::Running,
        });
        return Ok(Transition::with(Next::Continue { step: 1, progress }, txn));
    }
    let clone_id = ctx
        .progress_i64("clone_id")
        .ok_or_else(|| StepError::Permanent("lost the id of the copy".into()))?;
    let target = ctx.progress_i64("server_id").unwrap_or_default();
    let was_running = ctx.progress["was_running"].as_bool().unwrap_or(false);
    let source_server = row
        .server_id
        .ok_or_else(|| StepError::Permanent("source container has no server".into()))?;
    let (src, src_name) = driver_of(core, source_server)?;
    let next = |step| Next::Continue {
        step,
        progress: ctx.progress.clone(),
    };
    match step {
        1 => {
            src.stop(&row.guest_id).await.map_err(|e| driver_err(&src_name, e))?;
            Ok(Transition::bare(next(2)))
        }
        2 => {
            let copy = load_container(core.db(), clone_id).await.map_err(core_err)?;
            let image = src.export(&row.guest_id).await.map_err(|e| driver_err(&src_name, e))?;
            let (dst, dst_name) = driver_of(core, target)?;
            let info = dst
                .import(&spec(&copy), &image)
                .await
                .map_err(|e| driver_err(&dst_name, e))?;
            let txn = write(core, &copy, |am| {
                am.ip = Set(info.ip.clone());
                am.status = status_of(ContainerStatus::Stopped);
            })
            .await?;
            Ok(Transition::with(next(3), txn))
        }
        _ => {
            let copy = load_container(core.db(), clone_id).await.map_err(core_err)?;
            if was_running {
                let (dst, dst_name) = driver_of(core, target)?;
                src.start(&row.guest_id).await.map_err(|e| driver_err(&src_name, e))?;
                dst.start(&copy.guest_id).await.map_err(|e| driver_err(&dst_name, e))?;
            }
            let status = if was_running { ContainerStatus::Running } else { ContainerStatus::Stopped };
            let txn = write(core, &copy, |am| {
                am.status = status_of(status);
                am.locked_by = Set(None);
            })
            .await?;
            Ok(Transition::with(done(clone_id), txn))
        }
    }
}

/// Steps: 0 check, 1 stop, 2 copy to the target, 3 destroy on the source and switch, 4 start.
async fn migrate(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let core = ctx.core;
    let target = ctx.params["to"]
        .as_i64()
        .ok_or_else(|| StepError::Permanent("bad parameters: 'to' is missing".into()))?;
    let next = |step, progress: Value| Next::Continue { step, progress };
    match ctx.cmd.step {
        0 => {
            let status = parse_status(&row.status);
            check_status(row.id, status, "container.migrate", ContainerCommand::Migrate { to: String::new() }.allowed_from())
                .map_err(StepError::Permanent)?;
            if row.server_id == Some(target) {
                return Ok(Transition::bare(done(row.id)));
            }
            let progress = json!({
                "source": row.server_id,
                "was_running": status == ContainerStatus::Running,
            });
            Ok(Transition::bare(next(1, progress)))
        }
        1 => {
            let source = ctx.progress_i64("source").unwrap_or_default();
            let (src, src_name) = driver_of(core, source)?;
            src.stop(&row.guest_id).await.map_err(|e| driver_err(&src_name, e))?;
            let txn = write(core, &row, |am| am.status = status_of(ContainerStatus::Stopped)).await?;
            Ok(Transition::with(next(2, ctx.progress.clone()), txn))
        }
        2 => {
            let source = ctx.progress_i64("source").unwrap_or_default();
            let (src, src_name) = driver_of(core, source)?;
            let (dst, dst_name) = driver_of(core, target)?;
            let info = match dst.status(&row.guest_id).await.map_err(|e| driver_err(&dst_name, e))? {
                Some(info) => info,
                None => {
                    let image = src.export(&row.guest_id).await.map_err(|e| driver_err(&src_name, e))?;
                    dst.import(&spec(&row), &image)
                        .await
                        .map_err(|e| driver_err(&dst_name, e))?
                }
            };
            let mut progress = ctx.progress.clone();
            progress["ip"] = json!(info.ip);
            Ok(Transition::bare(next(3, progress)))
        }
        3 => {
            let source = ctx.progress_i64("source").unwrap_or_default();
            let (src, src_name) = driver_of(core, source)?;
            src.destroy(&row.guest_id).await.map_err(|e| driver_err(&src_name, e))?;
            let ip = ctx.progress["ip"].as_str().map(str::to_string);
            let txn = write(core, &row, |am| {
                am.server_id = Set(Some(target));
                am.ip = Set(ip);
            })
            .await?;
            Ok(Transition::with(next(4, ctx.progress.clone()), txn))
        }
        _ => {
            if ctx.progress["was_running"].as_bool().unwrap_or(false) {
                let (dst, dst_name) = driver_of(core, target)?;
                dst.start(&row.guest_id).await.map_err(|e| driver_err(&dst_name, e))?;
                let txn = write(core, &row, |am| am.status = status_of(ContainerStatus::Running)).await?;
                return Ok(Transition::with(done(row.id), txn));
            }
            Ok(Transition::bare(done(row.id)))
        }
    }
}


/// Runs a script inside a running container (the CIS layer). Scripts run by hooks must be
/// idempotent: after a crash of the core the step may run again.
async fn exec(ctx: &StepCtx<'_>, row: container::Model) -> Result<Transition, StepError> {
    let status = parse_status(&row.status);
    check_status(row.id, status, "container.exec", &[ContainerStatus::Running]).map_err(StepError::Permanent)?;
    let script = ctx.params["script"].as_str().unwrap_or_default();
    let args: Vec<String> = serde_json::from_value(ctx.params["args"].clone()).unwrap_or_default();
    let server_id = row
        .server_id
        .ok_or_else(|| StepError::Permanent(format!("container {} has no server", row.id)))?;
    let (driver, server) = driver_of(ctx.core, server_id)?;
    let out = driver
        .exec(&row.guest_id, script, &args)
        .await
        .map_err(|e| driver_err(&server, e))?;
    if out.exit_code != 0 {
        return Err(StepError::Permanent(format!(
            "script in container {} exited with code {}: {}",
            row.id,
            out.exit_code,
            out.stderr.trim()
        )));
    }
    Ok(Transition::bare(Next::Done(json!({
        "exit_code": out.exit_code,
        "stdout": out.stdout,
        "stderr": out.stderr,
    }))))
}
