//! `container.migrate`: cold (stop, copy, start) or live, and the undoing of one that failed.

use super::*;

/// After a failed migration that did not switch servers: destroys the copy on the target and
/// starts the container again where it was if it ran before.
pub(super) async fn undo_migrate(
    svc: &Services,
    cmd: &command::Model,
    progress: &Recorded,
    row: &container::Model,
) -> Option<Undo> {
    let target = progress.server_id;
    if target.is_some() && row.server_id == target {
        return undo_switched(svc, cmd, progress, row).await;
    }
    if target.is_none() || cmd.step < MigrateStep::Copy.number() {
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
            ..Undo::default()
        }),
        Err(e) => {
            tracing::warn!(error = %e, container = row.id, "could not restart a container after its migration failed");
            None
        }
    }
}

/// A migration that failed after its switch (the container is on the target, its source copy
/// gone) cannot be undone: what is left is said and done. A container that ran is started on
/// the target once more (its server may be back); if it cannot be, it stays stopped with a
/// reason saying where it is and how to start it. Its environment hears of a new address.
async fn undo_switched(
    svc: &Services,
    cmd: &command::Model,
    progress: &Recorded,
    row: &container::Model,
) -> Option<Undo> {
    let server = row.server_id.and_then(|s| svc.fleet().named_driver(s));
    let name = server
        .as_ref()
        .map_or("its new server", |(_, n)| n.as_str());
    let mut undo = Undo::default();
    if progress.was_running {
        let started = match &server {
            Some((driver, _)) => driver.start(&row.guest_id).await.map_err(|e| e.to_string()),
            None => Err("its server is not attached to this core".to_string()),
        };
        match started {
            Ok(()) => undo.status = Some(ContainerStatus::Running),
            Err(e) => {
                undo.reason = Some(format!(
                    "moved to server {name} by command {} ({}), which could not start it there \
                     ({e}); start it with `cloud48 container start {}`",
                    cmd.id, cmd.kind, row.id
                ));
            }
        }
    }
    let previous = serde_json::from_str::<Value>(&cmd.progress)
        .ok()
        .and_then(|p| p.get("previous_ip")?.as_str().map(String::from));
    undo.notify = moved_notice(row, previous, &cmd.requested_by);
    Some(undo)
}

/// The `environment.notify` (`moved`) that tells container `row`'s environment it moved from
/// address `previous` to its own; none when it has no environment or kept its address.
fn moved_notice(
    row: &container::Model,
    previous: Option<String>,
    requested_by: &str,
) -> Option<NewCommand> {
    let env = row.environment_id?;
    (previous.is_some() && previous != row.ip).then(|| NewCommand {
        project: None,
        kind: CommandKind::EnvironmentNotify,
        target: Some(Target::Environment(env)),
        params: params::to_value(params::Notify {
            containers: vec![row.id],
            cause: None,
            hook: Some(params::NotifyHook::Moved),
            previous_ip: previous,
        }),
        requested_by: requested_by.to_string(),
    })
}

/// Steps: 0 check and place on the target (dummy), 1 stop, 2 copy to the target, 3 destroy on
/// the source and switch, 4 start. Live (a running VM): nothing stops; step 2 sends the running
/// guest to the target (`live_migrate`), and start finds it running.
pub(super) async fn migrate(
    ctx: &StepCtx<'_>,
    row: container::Model,
) -> Result<Transition, StepError> {
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
        let params::Migrate { to, live, leave } = ctx.params::<params::Migrate>()?;
        if (to.is_some() && row.server_id == to) || (leave.is_some() && row.server_id != leave) {
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
                        avoid: crate::commands::network_avoid(svc, r.server_id).await?,
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
            let then = match moved_notice(&row, previous, &ctx.cmd.requested_by) {
                Some(notice) => Next::Spawn {
                    step: MigrateStep::Rewired.number(),
                    progress: ctx.progress.clone(),
                    children: vec![notice],
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
            if let Some(failure) = crate::commands::hooks::child_failures(ctx).await? {
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
