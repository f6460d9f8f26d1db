//! `container.exec`: a command run inside a container.

use super::*;

/// Runs a script inside a running container (the CIS layer). Scripts run by hooks must be
/// idempotent: after a crash of the core the step may run again.
pub(super) async fn exec(
    ctx: &StepCtx<'_>,
    row: container::Model,
) -> Result<Transition, StepError> {
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
