//! `container.update`: new resources for a container, on its server if they fit there (else it
//! fails, saying to migrate the container first).

use super::*;

/// Steps of `container.update`: 0 reserve the growth on the container's server (a dummy,
/// committed before the server is touched), 1 resize the guest, then give the growth dummy's
/// reservation to the container and release what shrank, with the new requirements; 2 (only
/// when the growth expired meanwhile and the server has no room) give the guest its old size
/// back and fail. No transaction is open while the driver works.
pub(super) async fn update(
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
                // The quota again, now that it runs (it was checked when submitted), held
                // until this growth's dummy is committed: another update running at once
                // counts it.
                let more = Usage {
                    containers: 0,
                    resources: grow,
                };
                crate::projects::check_held(txn, project, &more)
                    .await
                    .map_err(crate::commands::core_err)?;
                let Some(r) =
                    placement::reserve_growth(txn, server_id, id, command, &grow, deadline).await?
                else {
                    return Err(StepError::Permanent(format!(
                        "server {server} lacks room to grow container {id} by {} cpu_millis, {} memory_mb and {} disk_mb; migrate it first",
                        grow.cpu_millis, grow.memory_mb, grow.disk_mb
                    )));
                };
                cache.hold(placement::Holder::Command(command), server_id, &grow, 1);
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
pub(super) async fn unique_address(
    svc: &Services,
    id: i64,
    ip: Option<&str>,
) -> Result<(), StepError> {
    match crate::commands::taken_addresses(svc.db(), &[(id, ip)])
        .await?
        .remove(&id)
    {
        Some(message) => Err(StepError::Permanent(message)),
        None => Ok(()),
    }
}

/// Undoes a failed `container.update`: its growth dummy (if any) goes, giving back what it
/// reserved. The guest keeps the size the driver reports; the core's requirements are unchanged.
pub(in crate::commands) async fn compensate_update(
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
