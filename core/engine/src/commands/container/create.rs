//! `container.create` (and imports): the placement's server makes the guest, from an empty disk,
//! an image or an uploaded archive.

use super::*;

/// Steps: 0 place (dummy), 1 create (or import) and start on the server, replacing the dummy.
pub(super) async fn create(
    ctx: &StepCtx<'_>,
    row: container::Model,
) -> Result<Transition, StepError> {
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
                    .map_err(crate::commands::core_err)?;
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
        avoid: crate::commands::network_avoid(svc, r.server_id).await?,
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
pub(super) async fn import_on(
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
