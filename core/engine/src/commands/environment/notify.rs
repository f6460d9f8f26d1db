//! Fan-outs over an environment's members (start, stop, ...) and the notifications its members'
//! hooks get when another member changes or moves.

use super::*;

/// Step 0 plans groups of members by priority; step k spawns group k-1 after checking the
/// previous groups succeeded; the last step finishes (a destroy also retires the environment).
pub(super) async fn fan_out(
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
        let kind = crate::commands::kind_of(ctx.cmd)?
            .member_command()
            .ok_or_else(|| {
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
pub(super) async fn notify(
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
pub(super) async fn moved(
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
