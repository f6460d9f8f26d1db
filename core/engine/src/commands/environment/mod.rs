//! Steps of environment commands; the hooks they run and the actions those ask for go through
//! `hooks.rs`.
//!
//! Hook order (the design notes' rule): the hooks of the container being added or removed run
//! first, then those of the environment's members by ascending priority value (ties by id).

use sea_orm::{ColumnTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter};
use serde_json::{Value, json};

use super::hooks::{
    Call, Queued, Written, child_failures, dispatch, drain_actions, env_view, members,
    set_container, with_states,
};
use super::steps::{AddStep, NotifyStep, PlanStep, RemoveStep, ReplaceStep};
use super::{StepCtx, core_err, params};
use crate::entities::{container, environment};
use crate::managers::{insert_container, parse_status, prepare_container};
use crate::model::{
    CommandKind, ContainerId, ContainerStatus, EnvironmentStatus, Params, Requirements, now_ms,
};
use crate::queue::{NewCommand, Next, StepError, Target, Transition};
use crate::types::{Hook, HookAction, MemberView};

mod notify;
mod replace;

use notify::{fan_out, notify};
use replace::{clone, replace};

pub(super) async fn step(ctx: &StepCtx<'_>, kind: CommandKind) -> Result<Transition, StepError> {
    let env_id = ctx.target_id()?;
    let env = environment::Entity::find_by_id(env_id)
        .one(ctx.svc.db())
        .await?
        .ok_or_else(|| StepError::Permanent(format!("environment {env_id} does not exist")))?;
    if env.status == EnvironmentStatus::Destroyed.as_str() {
        return Err(StepError::Permanent(format!(
            "environment '{}' is destroyed",
            env.name
        )));
    }
    use CommandKind::*;
    match kind {
        EnvironmentCreate => Ok(with_env_status(
            env.id,
            EnvironmentStatus::Active,
            Next::Done(json!({ "environment_id": env.id })),
        )),
        EnvironmentAdd => add(ctx, &env).await,
        EnvironmentRemove => remove(ctx, &env).await,
        EnvironmentReplace => replace(ctx, &env).await,
        EnvironmentFailover | EnvironmentRecover | EnvironmentNotify => {
            notify(ctx, &env, kind.op()).await
        }
        EnvironmentClone => clone(ctx, &env).await,
        EnvironmentStart | EnvironmentStop | EnvironmentSuspend | EnvironmentResume
        | EnvironmentDestroy => fan_out(ctx, &env, kind.op()).await,
        _ => Err(StepError::Permanent(format!(
            "command {}: {kind} is not an environment command",
            ctx.cmd.id
        ))),
    }
}

/// The decision `next`, committed with environment `id` in `status`.
fn with_env_status(id: i64, status: EnvironmentStatus, next: Next) -> Transition {
    Transition::commit(move |txn| {
        Box::pin(async move {
            environment::Entity::update_many()
                .col_expr(
                    environment::Column::Status,
                    sea_orm::sea_query::Expr::val(status.as_str()),
                )
                .col_expr(
                    environment::Column::UpdatedAt,
                    sea_orm::sea_query::Expr::val(now_ms()),
                )
                .filter(environment::Column::Id.eq(id))
                .exec(txn)
                .await?;
            Ok(next)
        })
    })
}

/// Steps: 0 before-hooks; 1 their actions; 2 the child create; 3 after-hooks; 4 their actions.
async fn add(ctx: &StepCtx<'_>, env: &environment::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let params: params::Add = ctx.params()?;
    let ty = svc
        .types()
        .require(&params.type_id)
        .map_err(StepError::Permanent)?;
    match AddStep::of(ctx.cmd)? {
        AddStep::BeforeHooks => {
            let members = members(svc.types(), svc.db(), env.id).await?;
            let view = env_view(env, &members);
            // A clone starts from a copy of its source's state; the add hooks then rewire it.
            let (initial, given) = match params.clone_of {
                Some(src) => {
                    let src = crate::managers::load_container(svc.db(), src)
                        .await
                        .map_err(core_err)?;
                    let given: Params = serde_json::from_str(&src.params).unwrap_or_default();
                    (src.state, given)
                }
                None => (
                    ty.initial_state()
                        .map_err(|e| StepError::Permanent(e.to_string()))?,
                    params.params.clone(),
                ),
            };
            let resolved = cloud48_model::resolve_params(&ty.param_specs(), &given)
                .map_err(|m| StepError::Permanent(format!("a new {}: {m}", ty.type_id())))?;
            let new_view = MemberView {
                id: ContainerId(0),
                type_id: ty.type_id().to_string(),
                priority: ty.priority(),
                status: ContainerStatus::Creating,
                server: None,
                ip: None,
                resources: params
                    .requirements
                    .as_ref()
                    .map_or(ty.default_requirements().resources, |r| r.resources),
                endpoints: ty.endpoints(),
                params: resolved.clone(),
            };
            let mut calls = vec![Call {
                view: &new_view,
                state: &initial,
                hook: Hook::BeforeItIsAdded,
            }];
            calls.extend(members.iter().map(|(row, v)| Call {
                view: v,
                state: &row.state,
                hook: Hook::BeforeOtherIsAdded(new_view.clone()),
            }));
            let (states, actions) = dispatch(svc, &view, calls, true)?;
            let (own, others): (Vec<_>, Vec<_>) =
                states.states.into_iter().partition(|(i, _)| *i == 0);
            let new_state = own.into_iter().last().map_or(initial.clone(), |(_, s)| s);
            let others = Written {
                states: others,
                logs: states.logs,
            };
            let progress =
                json!({ "new_state": new_state, "actions": actions, "params": resolved });
            let step = AddStep::BeforeActions.number();
            Ok(with_states(
                ctx.cmd.id,
                others,
                Next::Continue { step, progress },
            ))
        }
        AddStep::BeforeActions => {
            drain_actions(ctx, env, |progress| Next::Continue {
                step: AddStep::Create.number(),
                progress,
            })
            .await
        }
        AddStep::Create => {
            let new_state: Vec<u8> = serde_json::from_value(ctx.progress["new_state"].clone())
                .map_err(|e| {
                    StepError::Permanent(format!(
                        "command {}: unreadable progress: new_state: {e}",
                        ctx.cmd.id
                    ))
                })?;
            // Commands written before parameters existed have none: the type's defaults.
            let own: Params = match ctx.progress.get("params") {
                Some(p) if !p.is_null() => ctx.progress_field("params")?,
                _ => cloud48_model::resolve_params(&ty.param_specs(), &params.params)
                    .map_err(StepError::Permanent)?,
            };
            let own_params = serde_json::to_string(&own).expect("serializable");
            let server = params.server.as_deref();
            let new = prepare_container(
                svc,
                ty.type_id(),
                server,
                params.requirements,
                (Some(env.id), env.project_id),
                Some(new_state),
            )
            .await
            .map_err(core_err)?;
            let (platform, requested_by) = (
                svc.platform_name().to_string(),
                ctx.cmd.requested_by.clone(),
            );
            Ok(Transition::commit(move |txn| {
                Box::pin(async move {
                    let (id, server_id) = insert_container(&platform, txn, new)
                        .await
                        .map_err(core_err)?;
                    set_container(txn, id, container::Column::Params, own_params).await?;
                    let child = NewCommand {
                        project: None,
                        kind: crate::model::CommandKind::ContainerCreate,
                        target: Some(Target::Container(id)),
                        params: params::to_value(params::Create {
                            avoid: params.avoid,
                            clone_of: params.clone_of,
                            ..params::Create::on(server_id)
                        }),
                        requested_by,
                    };
                    Ok(Next::Spawn {
                        step: AddStep::AfterHooks.number(),
                        progress: json!({ "container_id": id }),
                        children: vec![child],
                    })
                })
            }))
        }
        AddStep::AfterHooks => {
            let id: i64 = ctx.progress_field("container_id")?;
            if let Some(failure) = child_failures(ctx).await? {
                return Ok(Transition::bare(Next::Fail(format!(
                    "adding a {} container failed: {failure}",
                    params.type_id
                ))));
            }
            let all = members(svc.types(), svc.db(), env.id).await?;
            // The new container has joined: every after-hook sees it among the members (each
            // hook's own container is left out by `dispatch`), as the SDK's Platform does.
            let view = env_view(env, &all);
            let (new, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|(r, _)| r.id == id);
            let (new_row, new_view) = new.into_iter().next().ok_or_else(|| {
                StepError::Permanent(format!("container {id} vanished while being added"))
            })?;
            let mut calls = vec![Call {
                view: &new_view,
                state: &new_row.state,
                hook: Hook::AfterItIsAdded,
            }];
            calls.extend(others.iter().map(|(row, v)| Call {
                view: v,
                state: &row.state,
                hook: Hook::AfterOtherIsAdded(new_view.clone()),
            }));
            let (states, actions) = dispatch(svc, &view, calls, false)?;
            let progress = json!({ "container_id": id, "actions": actions });
            let step = AddStep::AfterActions.number();
            Ok(with_states(
                ctx.cmd.id,
                states,
                Next::Continue { step, progress },
            ))
        }
        AddStep::AfterActions => {
            drain_actions(ctx, env, |p| {
                Next::Done(json!({ "container_id": p["container_id"] }))
            })
            .await
        }
    }
}

/// The `container_id` parameter of a remove or replace.
fn container_param(ctx: &StepCtx<'_>) -> Result<i64, StepError> {
    Ok(ctx.params::<params::Member>()?.container_id)
}

/// Steps: 0 before-it-is-removed; 1 its actions; 2 the child destroy; 3 after-other-is-removed;
/// 4 their actions.
async fn remove(ctx: &StepCtx<'_>, env: &environment::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let id = container_param(ctx)?;
    match RemoveStep::of(ctx.cmd)? {
        RemoveStep::BeforeHooks => {
            let members = members(svc.types(), svc.db(), env.id).await?;
            let Some((row, removed)) = members.iter().find(|(r, _)| r.id == id) else {
                return Err(StepError::Permanent(format!(
                    "container {id} is not a member of environment '{}'",
                    env.name
                )));
            };
            // Its own hook first, then the others', in priority order; any may deny.
            let view = env_view(env, &members);
            let mut calls = vec![Call {
                view: removed,
                state: &row.state,
                hook: Hook::BeforeItIsRemoved,
            }];
            calls.extend(
                members
                    .iter()
                    .filter(|(r, _)| r.id != id)
                    .map(|(r, v)| Call {
                        view: v,
                        state: &r.state,
                        hook: Hook::BeforeOtherIsRemoved(removed.clone()),
                    }),
            );
            let (states, actions) = dispatch(svc, &view, calls, true)?;
            let progress = json!({ "removed": serde_json::to_value(removed).expect("serializable"), "actions": actions });
            let step = RemoveStep::BeforeActions.number();
            Ok(with_states(
                ctx.cmd.id,
                states,
                Next::Continue { step, progress },
            ))
        }
        RemoveStep::BeforeActions => {
            drain_actions(ctx, env, |progress| Next::Continue {
                step: RemoveStep::Destroy.number(),
                progress,
            })
            .await
        }
        RemoveStep::Destroy => {
            let child = NewCommand {
                project: None,
                kind: crate::model::CommandKind::ContainerDestroy,
                target: Some(Target::Container(id)),
                params: json!({}),
                requested_by: ctx.cmd.requested_by.clone(),
            };
            Ok(Transition::bare(Next::Spawn {
                step: RemoveStep::AfterHooks.number(),
                progress: ctx.progress.clone(),
                children: vec![child],
            }))
        }
        RemoveStep::AfterHooks => {
            if let Some(failure) = child_failures(ctx).await? {
                return Ok(Transition::bare(Next::Fail(format!(
                    "removing container {id} failed: {failure}"
                ))));
            }
            let removed: MemberView = serde_json::from_value(ctx.progress["removed"].clone())
                .map_err(|e| StepError::Permanent(format!("lost the removed member: {e}")))?;
            let others = members(svc.types(), svc.db(), env.id).await?;
            let view = env_view(env, &others);
            // The removed container's own hook sees its last state and the members left.
            let last_state = container::Entity::find_by_id(id)
                .one(svc.db())
                .await?
                .map(|r| r.state)
                .unwrap_or_default();
            let gone = MemberView {
                status: ContainerStatus::Destroyed,
                ..removed.clone()
            };
            let mut calls = vec![Call {
                view: &gone,
                state: &last_state,
                hook: Hook::AfterItIsRemoved,
            }];
            calls.extend(others.iter().map(|(row, v)| Call {
                view: v,
                state: &row.state,
                hook: Hook::AfterOtherIsRemoved(removed.clone()),
            }));
            let (mut states, mut actions) = dispatch(svc, &view, calls, false)?;
            // Nothing runs in or changes a destroyed container any more.
            states.states.retain(|(c, _)| *c != id);
            actions.retain(|q| {
                !matches!(
                    q,
                    Queued::By { action: HookAction::Exec { container, .. }, .. }
                        | Queued::Bare(HookAction::Exec { container, .. })
                        if container.0 == id
                )
            });
            let mut progress = ctx.progress.clone();
            progress["actions"] = serde_json::to_value(&actions).expect("serializable");
            let step = RemoveStep::AfterActions.number();
            Ok(with_states(
                ctx.cmd.id,
                states,
                Next::Continue { step, progress },
            ))
        }
        RemoveStep::AfterActions => {
            drain_actions(ctx, env, |_| Next::Done(json!({ "container_id": id }))).await
        }
    }
}
