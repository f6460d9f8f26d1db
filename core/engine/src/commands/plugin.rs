//! `plugin.upgrade`: every container of a plugin moves to a newer version of it.
//!
//! Step 0 loads the new component (kept in `plugin_uploads` by content hash), has its
//! `migrate-state` convert the state of every container of the old version (each seeing its
//! environment), then commits in one transaction: each container's new type and state (only if
//! no command holds it or its environment and its state is still the one converted; otherwise
//! the step is retried later), the new version's row in place of the old one, the upload gone.
//! A refusal fails the command naming the container and changes nothing. Step 1 puts this
//! core's registry in line with the database (idempotent; a restarted core loads the database).

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;

use super::steps::UpgradeStep;
use super::{StepCtx, params};
use crate::entities::{container, environment, plugin, plugin_upload};
use crate::model::{ContainerStatus, now_ms};
use crate::plugins::{PluginManager, WasmPlugin};
use crate::queue::{Next, StepError, Transition};
use crate::types::ContainerType;

pub(super) async fn upgrade(ctx: &StepCtx<'_>) -> Result<Transition, StepError> {
    let p: params::PluginUpgrade = ctx.params()?;
    match UpgradeStep::of(ctx.cmd)? {
        UpgradeStep::Migrate => migrate(ctx, p).await,
        UpgradeStep::Activate => activate(ctx, p).await,
    }
}

/// The uploaded component of `p`, loaded.
async fn load(ctx: &StepCtx<'_>, p: &params::PluginUpgrade) -> Result<WasmPlugin, StepError> {
    let upload = plugin_upload::Entity::find_by_id(p.sha256.clone())
        .one(ctx.svc.db())
        .await?
        .ok_or_else(|| {
            StepError::Permanent(format!(
                "the component of this upgrade (sha256 {}) is gone; upload it again",
                p.sha256
            ))
        })?;
    ctx.svc
        .plugin_host()
        .load(&upload.wasm)
        .map_err(|e| StepError::Permanent(e.to_string()))
}

async fn migrate(ctx: &StepCtx<'_>, p: params::PluginUpgrade) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let new = load(ctx, &p).await?;
    let old_type = format!("{}@{}", p.name, p.from);
    let new_type = new.type_id().to_string();
    let manager = PluginManager::new(svc.db(), svc.plugin_host(), svc.types());
    // Containers made before types were recorded with their version carry the bare name:
    // they are of the version installed, the one this upgrade leaves.
    let of_old = [old_type.clone(), p.name.clone()];
    let containers = container::Entity::find()
        .filter(container::Column::TypeId.is_in(of_old.clone()))
        .filter(container::Column::Status.is_not_in([
            ContainerStatus::Destroyed.as_str(),
            ContainerStatus::Failed.as_str(),
        ]))
        .all(svc.db())
        .await?;
    // Serialized with the commands on these containers: wait while any holds one of them or
    // its environment.
    for c in &containers {
        if let Some(holder) = c.locked_by {
            return Err(StepError::Transient(format!(
                "waiting for command {holder} on container {}",
                c.id
            )));
        }
        if let Some(env) = c.environment_id
            && let Some(holder) = environment::Entity::find_by_id(env)
                .one(svc.db())
                .await?
                .and_then(|e| e.locked_by)
        {
            return Err(StepError::Transient(format!(
                "waiting for command {holder} on the environment of container {}",
                c.id
            )));
        }
    }
    let mut converted = Vec::with_capacity(containers.len());
    for c in containers {
        match manager.migrate_one(&new, &p.from, &c).await {
            Ok(state) => converted.push((c, state)),
            Err(e) => {
                let sha = p.sha256.clone();
                let fail = Next::Fail(e.to_string());
                return Ok(Transition::commit(move |txn| {
                    Box::pin(async move {
                        plugin_upload::Entity::delete_by_id(sha).exec(txn).await?;
                        Ok(fail)
                    })
                }));
            }
        }
    }
    let meta = new.meta().clone();
    let (name, from, sha) = (p.name.clone(), p.from.clone(), p.sha256.clone());
    let count = converted.len();
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            for (c, state) in converted {
                let changed = container::Entity::update_many()
                    .col_expr(
                        container::Column::TypeId,
                        sea_orm::sea_query::Expr::val(new_type.clone()),
                    )
                    .col_expr(
                        container::Column::State,
                        sea_orm::sea_query::Expr::val(state),
                    )
                    .col_expr(
                        container::Column::UpdatedAt,
                        sea_orm::sea_query::Expr::val(now_ms()),
                    )
                    .filter(container::Column::Id.eq(c.id))
                    .filter(container::Column::TypeId.is_in(of_old.clone()))
                    .filter(container::Column::State.eq(c.state.clone()))
                    .filter(container::Column::LockedBy.is_null())
                    .exec(txn)
                    .await?;
                if changed.rows_affected != 1 {
                    return Err(StepError::Transient(format!(
                        "container {} changed while its state was converted; converting again",
                        c.id
                    )));
                }
            }
            let upload = plugin_upload::Entity::find_by_id(sha.clone())
                .one(txn)
                .await?
                .ok_or_else(|| StepError::Permanent("the uploaded component vanished".into()))?;
            plugin::Entity::delete_many()
                .filter(plugin::Column::Name.eq(&name))
                .filter(plugin::Column::Version.eq(&from))
                .exec(txn)
                .await?;
            PluginManager::insert_row(txn, &upload.wasm, &meta).await?;
            plugin_upload::Entity::delete_by_id(sha).exec(txn).await?;
            Ok(Next::Continue {
                step: UpgradeStep::Activate.number(),
                progress: json!({ "type_id": new_type, "containers": count }),
            })
        })
    }))
}

async fn activate(ctx: &StepCtx<'_>, p: params::PluginUpgrade) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let row = plugin::Entity::find()
        .filter(plugin::Column::Name.eq(&p.name))
        .one(svc.db())
        .await?
        .ok_or_else(|| StepError::Permanent(format!("plugin {} is not installed", p.name)))?;
    let loaded = svc
        .plugin_host()
        .load(&row.wasm)
        .map_err(|e| StepError::Permanent(e.to_string()))?;
    let type_id = loaded.type_id().to_string();
    svc.types().register(std::sync::Arc::new(loaded));
    let old = format!("{}@{}", p.name, p.from);
    if old != type_id {
        svc.types().unregister(&old);
    }
    Ok(Transition::bare(Next::Done(json!({
        "type_id": type_id,
        "containers": ctx.progress.get("containers").cloned().unwrap_or(json!(0)),
    }))))
}
