//! Replacing a member that failed, cloning an environment, and the status of members as they
//! change.

use super::*;
use crate::commands::hooks::{CHILDREN_FROM, Dispatched};

/// Replaces a member that is down: it becomes illegal (the collector destroys it when its
/// server is back), the others hear it left, and a new container of its type is added on
/// another server. Steps: 0 retire; 1 the others' actions; 2 the child add; 3 finish. When no
/// replacement could be made, the member stays, down, and the others hear it is in again
/// (4), their actions run (5), and the command fails saying why.
pub(super) async fn replace(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
) -> Result<Transition, StepError> {
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
            // The hooks run before the transaction; the member retires with their new states.
            let (states, actions) =
                tell_others(svc, env, all, id, Hook::AfterOtherIsRemoved(old.clone()))?;
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
                    // Only while it is down: its server may have come back and given it its
                    // status meanwhile (`environment.recover` then tells the others it is up).
                    let retired = set_member_status(
                        txn,
                        id,
                        ContainerStatus::Illegal,
                        Some(ContainerStatus::Down),
                    )
                    .await?;
                    if retired == 0 {
                        // The others did not hear it leave: their states stay as they are.
                        return Ok(Next::Done(json!({
                            "container_id": id,
                            "replaced": false,
                            "reason": format!("container {id} is no longer down: its server came back"),
                        })));
                    }
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
                // collector does not destroy the only copy when its server comes back; the
                // others hear it is in again (they heard it left), so that it serves again
                // once its server is back. Failures of the children so far are this one.
                let mut progress = ctx.progress.clone();
                progress["failure"] = json!(failure);
                progress[CHILDREN_FROM] = json!(children.iter().map(|c| c.id + 1).max());
                let step = ReplaceStep::Rejoin.number();
                return Ok(Transition::commit(move |txn| {
                    Box::pin(async move {
                        let illegal = Some(ContainerStatus::Illegal);
                        set_member_status(txn, id, ContainerStatus::Down, illegal).await?;
                        Ok(Next::Continue { step, progress })
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
        ReplaceStep::Rejoin => {
            let all = members(svc.types(), svc.db(), env.id).await?;
            let mut progress = ctx.progress.clone();
            progress["actions"] = json!([]);
            let step = ReplaceStep::RejoinActions.number();
            // Gone meanwhile (destroyed): nobody to tell.
            let Some((_, back)) = all.iter().find(|(r, _)| r.id == id).cloned() else {
                return Ok(Transition::bare(Next::Continue { step, progress }));
            };
            let (states, actions) = tell_others(svc, env, all, id, Hook::AfterOtherIsAdded(back))?;
            progress["actions"] = serde_json::to_value(&actions).expect("serializable");
            Ok(with_states(
                ctx.cmd.id,
                states,
                Next::Continue { step, progress },
            ))
        }
        ReplaceStep::RejoinActions => {
            let failure: String = ctx.progress_field("failure")?;
            drain_actions(ctx, env, |_| {
                Next::Fail(format!(
                    "replacing container {id} failed, it stays down (still a member: the others were told it is in again): {failure}"
                ))
            })
            .await
        }
    }
}

/// The members of `all` but `id` each answer `hook`: their new states and the actions they
/// ask for.
fn tell_others(
    svc: &crate::services::Services,
    env: &environment::Model,
    all: Vec<(container::Model, MemberView)>,
    id: i64,
    hook: Hook,
) -> Result<Dispatched, StepError> {
    let others: Vec<_> = all.into_iter().filter(|(r, _)| r.id != id).collect();
    let view = env_view(env, &others);
    let calls = others
        .iter()
        .map(|(r, v)| Call {
            view: v,
            state: &r.state,
            hook: hook.clone(),
        })
        .collect();
    dispatch(svc, &view, calls, false)
}

/// Clones the source environment into the one named by `destination`: every member, in
/// priority order, is added to the copy as a clone of its source (state and disk), so the add
/// hooks wire the copy to itself. Step 0 plans; step k adds member k-1; the last step
/// activates the copy.
pub(super) async fn clone(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let dst = ctx.params::<params::CloneEnvironment>()?.destination;
    let PlanStep::Item(index) = PlanStep::of(ctx.cmd)? else {
        let mut plan: Vec<(i64, String, Value)> = Vec::new();
        let all = members(svc.types(), svc.db(), env.id).await?;
        // A member that went down since the submission: no partial copy wired to the source,
        // and the empty copy goes (its name is free for the next try).
        let rows: Vec<_> = all.iter().map(|(r, _)| r.clone()).collect();
        if let Some(why) = crate::managers::unclonable(&env.name, &rows) {
            return Ok(with_env_status(
                dst.0,
                EnvironmentStatus::Destroyed,
                Next::Fail(why),
            ));
        }
        for (r, v) in all {
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
pub(super) async fn set_member_status(
    txn: &DatabaseTransaction,
    id: i64,
    status: ContainerStatus,
    from: Option<ContainerStatus>,
) -> Result<u64, DbErr> {
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
    Ok(update.exec(txn).await?.rows_affected)
}
