//! `container.clone`: a copy of a container on a server placement chooses.

use super::*;

/// After a failed clone, starts the source again if the clone had stopped it (best effort).
pub(super) async fn restart_clone_source(
    svc: &Services,
    cmd: &command::Model,
    progress: &Recorded,
) {
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
pub(super) async fn clone(
    ctx: &StepCtx<'_>,
    row: container::Model,
) -> Result<Transition, StepError> {
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
                crate::projects::check_held(txn, row.project_id, &Usage::of(1, &req.resources))
                    .await
                    .map_err(crate::commands::core_err)?;
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
                avoid: crate::commands::network_avoid(svc, r.server_id).await?,
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
