//! `plugin.upgrade`: every container of a plugin moves to a newer version of it.
//!
//! Step 0 loads the new component (kept in `plugin_uploads` by content hash), has its
//! `migrate-state` convert the state of every container of the old version (each seeing its
//! environment) and give it the parameters the new version declares (the defaults of new ones;
//! a new parameter without a default is refused), then commits in one transaction: the old
//! version's row gone (if another upgrade took it first, the command fails and changes
//! nothing: one version of a plugin is installed at a time), each container's new type, state
//! and parameters (only if no command holds it or its environment and its state is still the
//! one converted; otherwise the step is retried later), the new version's row, the upload gone.
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
    // A refusal fails the command and changes nothing (the upload goes).
    let refuse = |message: String| {
        let sha = p.sha256.clone();
        Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                plugin_upload::Entity::delete_by_id(sha).exec(txn).await?;
                Ok(Next::Fail(message))
            })
        }))
    };
    // Each container's parameters as the new version declares them (the defaults of new
    // ones filled in), then its state as the new version's `migrate-state` converts it.
    let specs = new.param_specs();
    let mut converted = Vec::with_capacity(containers.len());
    for c in containers {
        let current: cloud48_model::Params = serde_json::from_str(&c.params).unwrap_or_default();
        let params = match cloud48_model::upgrade_params(&specs, &current) {
            Ok(params) => params,
            Err(m) => {
                return refuse(format!(
                    "container {} ({old_type}) cannot move to {new_type}: {m}; nothing was \
                     changed",
                    c.id
                ));
            }
        };
        match manager.migrate_one(&new, &p.from, &c).await {
            Ok(state) => {
                let params = serde_json::to_string(&params).unwrap_or_else(|_| "{}".into());
                converted.push((c, state, params));
            }
            Err(e) => return refuse(e.to_string()),
        }
    }
    let meta = new.meta().clone();
    let (name, from, sha) = (p.name.clone(), p.from.clone(), p.sha256.clone());
    let count = converted.len();
    let ids: Vec<i64> = converted.iter().map(|(c, _, _)| c.id).collect();
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            // A container of the old version made while the states were converted would keep
            // a type this upgrade unregisters: converted too, on the next try.
            let newcomer = container::Entity::find()
                .filter(container::Column::TypeId.is_in(of_old.clone()))
                .filter(container::Column::Status.is_not_in([
                    ContainerStatus::Destroyed.as_str(),
                    ContainerStatus::Failed.as_str(),
                ]))
                .filter(container::Column::Id.is_not_in(ids))
                .one(txn)
                .await?;
            if let Some(c) = newcomer {
                return Err(StepError::Transient(format!(
                    "container {} of {old_type} was made while the states were converted; \
                     converting again",
                    c.id
                )));
            }
            // The version this upgrade leaves goes first: another upgrade submitted from it as
            // well may have committed meanwhile (then this one changes nothing and says so).
            let left = plugin::Entity::delete_many()
                .filter(plugin::Column::Name.eq(&name))
                .filter(plugin::Column::Version.eq(&from))
                .exec(txn)
                .await?
                .rows_affected;
            if left != 1 {
                let now = plugin::Entity::find()
                    .filter(plugin::Column::Name.eq(&name))
                    .one(txn)
                    .await?
                    .map_or("not installed".to_string(), |r| format!("at {}", r.version));
                plugin_upload::Entity::delete_by_id(sha).exec(txn).await?;
                return Ok(Next::Fail(format!(
                    "plugin {name} is no longer at {from} (another upgrade or a removal came \
                     first; it is {now} now): nothing was changed; upgrade it again from the \
                     version installed now if this one is newer"
                )));
            }
            for (c, state, params) in converted {
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
                        container::Column::Params,
                        sea_orm::sea_query::Expr::val(params),
                    )
                    .col_expr(
                        container::Column::UpdatedAt,
                        sea_orm::sea_query::Expr::val(now_ms()),
                    )
                    .filter(container::Column::Id.eq(c.id))
                    .filter(container::Column::TypeId.is_in(of_old.clone()))
                    .filter(container::Column::State.eq(c.state.clone()))
                    .filter(container::Column::Params.eq(c.params.clone()))
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
