//! Steps of environment commands; the hooks they run and the actions those ask for go through
//! `hooks.rs`.
//!
//! Hook order (the design notes' rule): the hooks of the container being added or removed run
//! first, then those of the environment's members by ascending priority value (ties by id).

use sea_orm::{ColumnTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter};
use serde_json::{Value, json};

use super::hooks::{
    Call, Queued, Written, child_failures, dispatch, drain_actions, env_view, members, save_states,
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
                None => (ty.initial_state(), params.params.clone()),
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
                Some(env.id),
                env.project_id,
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
                    save_states(txn, vec![(id, new_state)]).await?;
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

/// Step 0 plans groups of members by priority; step k spawns group k-1 after checking the
/// previous groups succeeded; the last step finishes (a destroy also retires the environment).
async fn fan_out(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
    op: &str,
) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let index = match PlanStep::of(ctx.cmd)? {
        PlanStep::Plan => None,
        PlanStep::Item(n) => Some(n),
    };
    let Some(index) = index else {
        use ContainerStatus::*;
        let (applies, ascending): (&[ContainerStatus], bool) = match op {
            "start" => (&[Stopped], true),
            "resume" => (&[Suspended], true),
            "stop" => (&[Running, Suspended], false),
            "suspend" => (&[Running], false),
            _ => (&[Creating, Running, Stopped, Suspended, Down], false),
        };
        let mut groups: Vec<(i32, Vec<i64>)> = Vec::new();
        let mut members = members(svc.types(), svc.db(), env.id).await?;
        if !ascending {
            members.reverse();
        }
        for (row, v) in members {
            if !applies.contains(&parse_status(row.id, &row.status)?) {
                continue;
            }
            match groups.last_mut() {
                Some((p, ids)) if *p == v.priority => ids.push(row.id),
                _ => groups.push((v.priority, vec![row.id])),
            }
        }
        let groups: Vec<Vec<i64>> = groups.into_iter().map(|(_, ids)| ids).collect();
        return Ok(Transition::bare(Next::Continue {
            step: PlanStep::Item(0).number(),
            progress: json!({ "groups": groups }),
        }));
    };
    if index > 0
        && let Some(failure) = child_failures(ctx).await?
    {
        return Ok(Transition::bare(Next::Fail(format!(
            "{op} of environment '{}' stopped: {failure}",
            env.name
        ))));
    }
    let groups: Vec<Vec<i64>> = ctx.progress_field("groups")?;
    if let Some(group) = PlanStep::item(ctx.cmd, index, &groups)? {
        let kind = super::kind_of(ctx.cmd)?.member_command().ok_or_else(|| {
            StepError::Permanent(format!(
                "command {}: {} is not a fan-out",
                ctx.cmd.id, ctx.cmd.kind
            ))
        })?;
        let children = group
            .iter()
            .map(|id| NewCommand {
                project: None,
                kind,
                target: Some(Target::Container(*id)),
                params: json!({}),
                requested_by: ctx.cmd.requested_by.clone(),
            })
            .collect();
        return Ok(Transition::bare(Next::Spawn {
            step: PlanStep::Item(index + 1).number(),
            progress: ctx.progress.clone(),
            children,
        }));
    }
    let count: usize = groups.iter().map(Vec::len).sum();
    let result: Value = json!({ "environment_id": env.id, "containers": count });
    if op == "destroy" {
        return Ok(with_env_status(
            env.id,
            EnvironmentStatus::Destroyed,
            Next::Done(result),
        ));
    }
    Ok(Transition::bare(Next::Done(result)))
}

/// Runs one hook for chosen members in priority order, then the actions the hooks asked for.
/// `failover`: `is-down` for the listed containers that are still down; `recover`: `is-up` for
/// the listed ones that are back; `notify`: the hook named in the parameters for every member.
async fn notify(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
    op: &str,
) -> Result<Transition, StepError> {
    if NotifyStep::of(ctx.cmd)? == NotifyStep::Actions {
        return drain_actions(ctx, env, |_| {
            Next::Done(json!({ "environment_id": env.id }))
        })
        .await;
    }
    let svc = ctx.svc;
    let params: params::Notify = ctx.params()?;
    let listed = params.containers;
    let cause = params
        .cause
        .unwrap_or_else(|| "server unreachable".to_string());
    let hook = match (op, params.hook) {
        ("failover", _) => Hook::IsDown(crate::types::DownCause::ServerUnreachable(cause)),
        ("recover", _) => Hook::IsUp,
        (_, Some(params::NotifyHook::Moved)) => {
            return moved(ctx, env, &listed, params.previous_ip).await;
        }
        (_, Some(params::NotifyHook::AfterCcStart)) => Hook::AfterCcStart,
        (_, Some(params::NotifyHook::BeforeCcStop)) => Hook::BeforeCcStop,
        (_, None) => {
            return Err(StepError::Permanent(
                "environment.notify names no hook to run".into(),
            ));
        }
    };
    let members = members(svc.types(), svc.db(), env.id).await?;
    let chosen = |v: &MemberView| match op {
        "failover" => listed.contains(&v.id.0) && v.status == ContainerStatus::Down,
        "recover" => listed.contains(&v.id.0) && v.status != ContainerStatus::Down,
        _ => v.status != ContainerStatus::Down && v.status != ContainerStatus::Creating,
    };
    let view = env_view(env, &members);
    let changed: Vec<&(container::Model, MemberView)> =
        members.iter().filter(|(_, v)| chosen(v)).collect();
    let mut calls: Vec<Call<'_>> = changed
        .iter()
        .map(|(row, v)| Call {
            view: v,
            state: &row.state,
            hook: hook.clone(),
        })
        .collect();
    // Then every member that is not down hears of each one that went down or came back.
    for (_, c) in &changed {
        let about = match &hook {
            Hook::IsDown(cause) => Hook::AfterOtherIsDown(c.clone(), cause.clone()),
            Hook::IsUp => Hook::AfterOtherIsUp(c.clone()),
            _ => continue,
        };
        calls.extend(
            members
                .iter()
                .filter(|(_, v)| v.id != c.id && v.status != ContainerStatus::Down)
                .map(|(row, v)| Call {
                    view: v,
                    state: &row.state,
                    hook: about.clone(),
                }),
        );
    }
    let (states, actions) = dispatch(svc, &view, calls, false)?;
    let step = NotifyStep::Actions.number();
    let progress = json!({ "actions": actions });
    Ok(with_states(
        ctx.cmd.id,
        states,
        Next::Continue { step, progress },
    ))
}

/// Members that changed address (migrated to a server of another subnet): every other member
/// that is not down hears that the old one left (`after-other-is-removed`, with its previous
/// address) and that it joined at its new one (`after-other-is-added`), in that order, each
/// call seeing the state the one before left — the same two events a replacement makes.
async fn moved(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
    listed: &[i64],
    previous_ip: Option<String>,
) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let members = members(svc.types(), svc.db(), env.id).await?;
    let view = env_view(env, &members);
    let mut calls = Vec::new();
    for (_, now) in members.iter().filter(|(r, _)| listed.contains(&r.id)) {
        let mut before = now.clone();
        before.ip = previous_ip.clone();
        let others = members
            .iter()
            .filter(|(_, v)| v.id != now.id && v.status != ContainerStatus::Down);
        for (row, v) in others {
            for hook in [
                Hook::AfterOtherIsRemoved(before.clone()),
                Hook::AfterOtherIsAdded(now.clone()),
            ] {
                calls.push(Call {
                    view: v,
                    state: &row.state,
                    hook,
                });
            }
        }
    }
    let (states, actions) = dispatch(svc, &view, calls, false)?;
    let step = NotifyStep::Actions.number();
    Ok(with_states(
        ctx.cmd.id,
        states,
        Next::Continue {
            step,
            progress: json!({ "actions": actions }),
        },
    ))
}

/// Replaces a member that is down: it becomes illegal (the collector destroys it when its
/// server is back), the others hear it left, and a new container of its type is added on
/// another server. Steps: 0 retire; 1 the others' actions; 2 the child add; 3 finish.
async fn replace(ctx: &StepCtx<'_>, env: &environment::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let id = container_param(ctx)?;
    match ReplaceStep::of(ctx.cmd)? {
        ReplaceStep::Retire => {
            let all = members(svc.types(), svc.db(), env.id).await?;
            let Some((row, old)) = all.iter().find(|(r, _)| r.id == id).cloned() else {
                return Err(StepError::Permanent(format!(
                    "container {id} is not a member of environment '{}'",
                    env.name
                )));
            };
            if old.status != ContainerStatus::Down {
                return Ok(Transition::bare(Next::Done(json!({
                    "container_id": id,
                    "replaced": false,
                    "reason": format!("container {id} is {}, not down", old.status),
                }))));
            }
            let others: Vec<_> = all.into_iter().filter(|(r, _)| r.id != id).collect();
            let view = env_view(env, &others);
            let calls = others
                .iter()
                .map(|(r, v)| Call {
                    view: v,
                    state: &r.state,
                    hook: Hook::AfterOtherIsRemoved(old.clone()),
                })
                .collect();
            // The hooks run before the transaction; the member retires with their new states.
            let (states, actions) = dispatch(svc, &view, calls, false)?;
            let progress = json!({
                "type": row.type_id,
                "requirements": serde_json::from_str::<Value>(&row.requirements).unwrap_or(Value::Null),
                "avoid": row.server_id,
                "params": serde_json::from_str::<Value>(&row.params).unwrap_or(Value::Null),
                "actions": actions,
            });
            let step = ReplaceStep::Actions.number();
            let cmd = ctx.cmd.id;
            Ok(Transition::commit(move |txn| {
                Box::pin(async move {
                    set_member_status(txn, id, ContainerStatus::Illegal, None).await?;
                    states.write(txn, cmd).await?;
                    Ok(Next::Continue { step, progress })
                })
            }))
        }
        ReplaceStep::Actions => {
            drain_actions(ctx, env, |progress| Next::Continue {
                step: ReplaceStep::Add.number(),
                progress,
            })
            .await
        }
        ReplaceStep::Add => {
            // What step 0 recorded of the replaced container.
            #[derive(serde::Deserialize)]
            struct Replaced {
                #[serde(rename = "type")]
                type_id: String,
                requirements: Option<Requirements>,
                avoid: Option<i64>,
                #[serde(default)]
                params: Option<Params>,
            }
            let p: Replaced = serde_json::from_value(ctx.progress.clone()).map_err(|e| {
                StepError::Permanent(format!("command {}: unreadable progress: {e}", ctx.cmd.id))
            })?;
            let add = params::Add {
                requirements: p.requirements,
                avoid: p.avoid,
                params: p.params.unwrap_or_default(),
                ..params::Add::of_type(p.type_id)
            };
            let child = NewCommand {
                project: None,
                kind: crate::model::CommandKind::EnvironmentAdd,
                target: Some(Target::Environment(env.id)),
                params: params::to_value(add),
                requested_by: ctx.cmd.requested_by.clone(),
            };
            Ok(Transition::bare(Next::Spawn {
                step: ReplaceStep::Finish.number(),
                progress: ctx.progress.clone(),
                children: vec![child],
            }))
        }
        ReplaceStep::Finish => {
            let children = svc.queue().children(ctx.cmd.id).await?;
            if let Some(failure) = child_failures(ctx).await? {
                // No replacement: the old container is down again rather than illegal, so the
                // collector does not destroy the only copy when its server comes back.
                let fail = Next::Fail(format!(
                    "replacing container {id} failed, it stays down: {failure}"
                ));
                return Ok(Transition::commit(move |txn| {
                    Box::pin(async move {
                        let illegal = Some(ContainerStatus::Illegal);
                        set_member_status(txn, id, ContainerStatus::Down, illegal).await?;
                        Ok(fail)
                    })
                }));
            }
            let replacement = children
                .iter()
                .filter(|c| c.kind == "environment.add")
                .filter_map(|c| c.result.as_deref())
                .filter_map(|r| serde_json::from_str::<Value>(r).ok())
                .find_map(|r| r["container_id"].as_i64());
            Ok(Transition::bare(Next::Done(
                json!({ "container_id": id, "replaced": true, "replacement": replacement }),
            )))
        }
    }
}

/// Clones the source environment into the one named by `destination`: every member, in
/// priority order, is added to the copy as a clone of its source (state and disk), so the add
/// hooks wire the copy to itself. Step 0 plans; step k adds member k-1; the last step
/// activates the copy.
async fn clone(ctx: &StepCtx<'_>, env: &environment::Model) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let dst = ctx.params::<params::CloneEnvironment>()?.destination;
    let PlanStep::Item(index) = PlanStep::of(ctx.cmd)? else {
        let mut plan: Vec<(i64, String, Value)> = Vec::new();
        for (r, v) in members(svc.types(), svc.db(), env.id).await? {
            if !matches!(
                v.status,
                ContainerStatus::Running | ContainerStatus::Stopped
            ) {
                continue;
            }
            let requirements = serde_json::from_str(&r.requirements).map_err(|e| {
                StepError::Permanent(format!("container {}: unreadable requirements: {e}", r.id))
            })?;
            plan.push((r.id, v.type_id, requirements));
        }
        return Ok(Transition::bare(Next::Continue {
            step: PlanStep::Item(0).number(),
            progress: json!({ "plan": plan }),
        }));
    };
    if let Some(failure) = child_failures(ctx).await? {
        return Ok(Transition::bare(Next::Fail(format!(
            "cloning environment '{}' stopped: {failure}",
            env.name
        ))));
    }
    let plan: Vec<(i64, String, Value)> = ctx.progress_field("plan")?;
    if let Some((source, type_id, requirements)) = PlanStep::item(ctx.cmd, index, &plan)? {
        let child = NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentAdd,
            target: Some(Target::Environment(dst.0)),
            params: params::to_value(params::Add {
                requirements: serde_json::from_value(requirements.clone()).map_err(|e| {
                    StepError::Permanent(format!("command {}: unreadable plan: {e}", ctx.cmd.id))
                })?,
                clone_of: Some(*source),
                ..params::Add::of_type(type_id.clone())
            }),
            requested_by: ctx.cmd.requested_by.clone(),
        };
        return Ok(Transition::bare(Next::Spawn {
            step: PlanStep::Item(index + 1).number(),
            progress: ctx.progress.clone(),
            children: vec![child],
        }));
    }
    Ok(with_env_status(
        dst.0,
        EnvironmentStatus::Active,
        Next::Done(json!({ "environment_id": dst, "containers": plan.len() })),
    ))
}

/// Puts member `id` in `status` (only from `from`, when given).
async fn set_member_status(
    txn: &DatabaseTransaction,
    id: i64,
    status: ContainerStatus,
    from: Option<ContainerStatus>,
) -> Result<(), DbErr> {
    let mut update = container::Entity::update_many()
        .col_expr(
            container::Column::Status,
            sea_orm::sea_query::Expr::val(status.as_str()),
        )
        .col_expr(
            container::Column::UpdatedAt,
            sea_orm::sea_query::Expr::val(now_ms()),
        )
        .filter(container::Column::Id.eq(id));
    if let Some(from) = from {
        update = update.filter(container::Column::Status.eq(from.as_str()));
    }
    update.exec(txn).await?;
    Ok(())
}
