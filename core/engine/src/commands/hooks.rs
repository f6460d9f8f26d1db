//! Container-type hooks inside environment commands: the members as hooks see them, one hook
//! call after another in the documented order (`dispatch`), what they wrote (states, log lines)
//! committed with the step, and their actions run one per step as child commands
//! (`drain_actions`: a tagged exec's result goes to its requester's `after-exec`, a
//! `set-params` is written at once).

use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter};
use serde_json::Value;

use super::{StepCtx, params};
use crate::entities::{command, container, environment, server};
use crate::managers::parse_status;
use crate::model::{
    CommandKind, CommandStatus, ContainerId, ContainerStatus, Params, Requirements, now_ms,
};
use crate::queue::{NewCommand, Next, StepError, Target, Transition};
use crate::services::Services;
use crate::types::{
    EnvironmentView, ExecResult, Hook, HookAction, HookContext, MemberView, TypeRegistry, Verdict,
};

/// The view hooks get of a container row.
pub(crate) fn member_view(
    types: &TypeRegistry,
    row: &container::Model,
    server: Option<String>,
) -> Result<MemberView, crate::managers::UnknownStatus> {
    let ty = types.get(&row.type_id);
    let requirements: Option<Requirements> = serde_json::from_str(&row.requirements).ok();
    Ok(MemberView {
        id: ContainerId(row.id),
        type_id: row.type_id.clone(),
        priority: ty.as_ref().map_or(0, |t| t.priority()),
        status: parse_status(row.id, &row.status)?,
        server,
        ip: row.ip.clone(),
        resources: requirements.map(|r| r.resources).unwrap_or_default(),
        endpoints: ty.map(|t| t.endpoints()).unwrap_or_default(),
        params: serde_json::from_str(&row.params).unwrap_or_default(),
    })
}

/// Live members of an environment, ascending priority then id.
pub(crate) async fn members<C: ConnectionTrait>(
    types: &TypeRegistry,
    conn: &C,
    env_id: i64,
) -> Result<Vec<(container::Model, MemberView)>, StepError> {
    let rows = container::Entity::find()
        .filter(container::Column::EnvironmentId.eq(env_id))
        .filter(container::Column::Status.is_not_in([
            ContainerStatus::Destroyed.as_str(),
            ContainerStatus::Failed.as_str(),
            ContainerStatus::Illegal.as_str(),
        ]))
        .all(conn)
        .await?;
    let servers: std::collections::HashMap<i64, String> = server::Entity::find()
        .all(conn)
        .await?
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    let mut out: Vec<_> = rows
        .into_iter()
        .map(|r| {
            let server = r.server_id.and_then(|s| servers.get(&s).cloned());
            let view = member_view(types, &r, server)?;
            Ok((r, view))
        })
        .collect::<Result<Vec<_>, crate::managers::UnknownStatus>>()?;
    out.sort_by_key(|(_, v)| (v.priority, v.id));
    Ok(out)
}

/// One hook call to make.
pub(super) struct Call<'a> {
    pub view: &'a MemberView,
    pub state: &'a [u8],
    pub hook: Hook,
}

/// An action a hook asked for, with the container whose hook asked (for `after-exec`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub(super) enum Queued {
    By {
        by: i64,
        action: HookAction,
    },
    /// As commands written before WIT 0.2.0 stored them.
    Bare(HookAction),
}

impl Queued {
    fn parts(self) -> (i64, HookAction) {
        match self {
            Queued::By { by, action } => (by, action),
            Queued::Bare(action) => (0, action),
        }
    }
}

/// What hooks changed: new state blobs and the lines they logged, by container id; committed
/// with the step that ran them.
#[derive(Default)]
pub(super) struct Written {
    pub states: Vec<(i64, Vec<u8>)>,
    pub logs: Vec<(i64, crate::types::LogLine)>,
}

impl Written {
    /// Writes the states, and the log lines as command `cmd`'s record.
    pub async fn write(self, txn: &DatabaseTransaction, cmd: i64) -> Result<(), StepError> {
        save_states(txn, self.states).await?;
        crate::queue::store::insert_logs(txn, cmd, now_ms(), self.logs).await?;
        Ok(())
    }
}

/// What hooks changed, and the actions they asked for in order.
pub(super) type Dispatched = (Written, Vec<Queued>);

/// Runs hooks in the given order; returns what they changed and asked for, or the first denial
/// (with who denied) as a permanent error when `may_deny`.
pub(super) fn dispatch(
    svc: &Services,
    env: &EnvironmentView,
    calls: Vec<Call<'_>>,
    may_deny: bool,
) -> Result<Dispatched, StepError> {
    let mut written = Written::default();
    let mut actions = Vec::new();
    // A container called twice in one dispatch sees the state its first call left.
    let mut latest: std::collections::HashMap<i64, Vec<u8>> = std::collections::HashMap::new();
    for call in calls {
        let ty = svc.types().get(&call.view.type_id).ok_or_else(|| {
            StepError::Permanent(format!(
                "container {} has type '{}', which is not installed",
                call.view.id, call.view.type_id
            ))
        })?;
        // A hook sees the other members, never its own container among them.
        let own_env = EnvironmentView {
            id: env.id,
            name: env.name.clone(),
            params: env.params.clone(),
            members: env
                .members
                .iter()
                .filter(|m| m.id != call.view.id)
                .cloned()
                .collect(),
        };
        let ctx = HookContext {
            container: call.view,
            environment: &own_env,
            state: latest
                .get(&call.view.id.0)
                .map_or(call.state, Vec::as_slice),
        };
        let started = std::time::Instant::now();
        let outcome = ty.handle(&call.hook, &ctx);
        svc.queue()
            .recorder()
            .hook(&call.view.type_id, call.hook.name(), started.elapsed());
        let by = call.view.id.0;
        let outcome = match outcome {
            Ok(o) => o,
            Err(mut e) => {
                // What this step's hooks logged up to the failure is kept with the command.
                let logged = std::mem::take(&mut e.logs);
                written.logs.extend(logged.into_iter().map(|l| (by, l)));
                let error = if e.retryable {
                    StepError::Transient(e.to_string())
                } else {
                    StepError::Permanent(e.to_string())
                };
                return Err(error.logged(written.logs));
            }
        };
        tracing::debug!(container = call.view.id.0, hook = call.hook.name(), ?outcome.verdict, "hook ran");
        if let Verdict::Deny(reason) = outcome.verdict {
            if may_deny {
                let who = if call.view.id.0 == 0 {
                    format!("the new {} container", call.view.type_id)
                } else {
                    format!("container {} ({})", call.view.id, call.view.type_id)
                };
                written
                    .logs
                    .extend(outcome.logs.into_iter().map(|l| (by, l)));
                return Err(StepError::Permanent(format!(
                    "denied by {who} in {}: {reason}",
                    call.hook.name()
                ))
                .logged(written.logs));
            }
            tracing::warn!(container = call.view.id.0, hook = call.hook.name(), %reason, "a hook denied after the fact; ignored");
        }
        if let Some(s) = outcome.new_state {
            latest.insert(by, s.clone());
            written.states.push((by, s));
        }
        written
            .logs
            .extend(outcome.logs.into_iter().map(|l| (by, l)));
        actions.extend(
            outcome
                .actions
                .into_iter()
                .map(|action| Queued::By { by, action }),
        );
    }
    Ok((written, actions))
}

/// The decision `next` of command `cmd`, committed with what its hooks wrote.
pub(super) fn with_states(cmd: i64, written: Written, next: Next) -> Transition {
    Transition::commit(move |txn| {
        Box::pin(async move {
            written.write(txn, cmd).await?;
            Ok(next)
        })
    })
}

pub(super) async fn save_states(
    txn: &DatabaseTransaction,
    states: Vec<(i64, Vec<u8>)>,
) -> Result<(), StepError> {
    for (id, state) in states {
        set_container(txn, id, container::Column::State, state).await?;
    }
    Ok(())
}

/// Sets one column of container `id` (and its change time).
pub(super) async fn set_container(
    txn: &DatabaseTransaction,
    id: i64,
    column: container::Column,
    value: impl Into<sea_orm::Value>,
) -> Result<(), DbErr> {
    container::Entity::update_many()
        .col_expr(column, sea_orm::sea_query::Expr::val(value.into()))
        .col_expr(
            container::Column::UpdatedAt,
            sea_orm::sea_query::Expr::val(now_ms()),
        )
        .filter(container::Column::Id.eq(id))
        .exec(txn)
        .await?;
    Ok(())
}

pub(super) fn env_view(
    env: &environment::Model,
    members: &[(container::Model, MemberView)],
) -> EnvironmentView {
    EnvironmentView {
        id: env.id,
        name: env.name.clone(),
        members: members.iter().map(|(_, v)| v.clone()).collect(),
        params: serde_json::from_str(&env.params).unwrap_or_default(),
    }
}

/// The progress field naming the first child whose failure still counts: the children before
/// it were dealt with by an earlier step (the add of a replacement that failed), and
/// [`child_failures`] (so [`drain_actions`]) passes over them.
pub(super) const CHILDREN_FROM: &str = "children_from";

/// The failure of any child (from [`CHILDREN_FROM`] on, when the progress has it), as one
/// message. A tagged script's failure is not one: its result goes to the requester's
/// `after-exec`.
pub(super) async fn child_failures(ctx: &StepCtx<'_>) -> Result<Option<String>, StepError> {
    let children = ctx.svc.queue().children(ctx.cmd.id).await?;
    Ok(failures_among(ctx, &children))
}

/// [`child_failures`] among `children`, read already.
fn failures_among(ctx: &StepCtx<'_>, children: &[command::Model]) -> Option<String> {
    let from = ctx.progress.get(CHILDREN_FROM).and_then(Value::as_i64);
    let failed: Vec<String> = children
        .iter()
        .filter(|c| from.is_none_or(|from| c.id >= from))
        .filter(|c| c.status != CommandStatus::Succeeded.as_str())
        .filter(|c| {
            serde_json::from_str::<params::Exec>(&c.params).map_or(true, |e| e.tag.is_none())
                || c.kind != CommandKind::ContainerExec.as_str()
        })
        .map(|c| {
            format!(
                "command {} ({} of {} {}) {}: {}",
                c.id,
                c.kind,
                c.target_type.as_deref().unwrap_or("-"),
                c.target_id.unwrap_or_default(),
                c.status,
                c.error.as_deref().unwrap_or("no error message")
            )
        })
        .collect();
    (!failed.is_empty()).then(|| failed.join("; "))
}

/// A server's id by name, for a hook's placement hints.
async fn server_id(ctx: &StepCtx<'_>, name: &str) -> Result<i64, String> {
    server::Entity::find()
        .filter(server::Column::Name.eq(name))
        .one(ctx.svc.db())
        .await
        .map_err(|e| e.to_string())?
        .map(|s| s.id)
        .ok_or_else(|| format!("a hook asked to avoid server '{name}', which does not exist"))
}

/// The command that carries out a hook's action; `None` for a script aimed at a container that
/// is down (it cannot run there; the replacement or `is-up` rewires it).
async fn action_command(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
    action: &HookAction,
    members: &[(container::Model, MemberView)],
) -> Result<Option<NewCommand>, String> {
    let member = |id: i64| members.iter().any(|(r, _)| r.id == id);
    let status = |id: i64| {
        members
            .iter()
            .find(|(r, _)| r.id == id)
            .map(|(_, v)| v.status)
    };
    let (kind, target, params) = match action {
        HookAction::AddContainer(r) => {
            let ty = ctx.svc.types().require(&r.type_id)?;
            let mut requirements = ty.default_requirements();
            if let Some(res) = r.resources {
                requirements.resources = res;
            }
            requirements.spread |= r.spread;
            requirements.labels.extend(r.labels.iter().cloned());
            let avoid = match r.avoid_servers.as_slice() {
                [] => None,
                [one] => Some(server_id(ctx, one).await?),
                more => {
                    return Err(format!(
                        "a hook asked to avoid {} servers; this core avoids at most one per added container (use spread to keep members of a type apart)",
                        more.len()
                    ));
                }
            };
            let add = params::Add {
                requirements: Some(requirements),
                avoid,
                params: r.params.clone(),
                ..params::Add::of_type(r.type_id.clone())
            };
            (
                CommandKind::EnvironmentAdd,
                Target::Environment(env.id),
                params::to_value(add),
            )
        }
        HookAction::RemoveContainer(id) => {
            if !member(id.0) {
                return Err(format!(
                    "a hook asked to remove container {id}, which is not a member of '{}'",
                    env.name
                ));
            }
            (
                CommandKind::EnvironmentRemove,
                Target::Environment(env.id),
                params::to_value(params::Member { container_id: id.0 }),
            )
        }
        HookAction::Exec {
            container,
            script,
            args,
            tag,
        } => {
            if !member(container.0) {
                return Err(format!(
                    "a hook asked to exec in container {container}, which is not a member of '{}'",
                    env.name
                ));
            }
            if status(container.0) == Some(ContainerStatus::Down) {
                tracing::warn!(
                    container = container.0,
                    "a hook asked to run a script in a container that is down; skipped"
                );
                return Ok(None);
            }
            (
                CommandKind::ContainerExec,
                Target::Container(container.0),
                params::to_value(params::Exec {
                    script: script.clone(),
                    args: args.clone(),
                    tag: tag.clone(),
                }),
            )
        }
        HookAction::ReplaceContainer(id) => {
            if !member(id.0) {
                return Err(format!(
                    "a hook asked to replace container {id}, which is not a member of '{}'",
                    env.name
                ));
            }
            (
                CommandKind::EnvironmentReplace,
                Target::Environment(env.id),
                params::to_value(params::Member { container_id: id.0 }),
            )
        }
        HookAction::SetParams { .. } => unreachable!("set-params is applied by drain_actions"),
    };
    Ok(Some(NewCommand {
        project: None,
        kind,
        target: Some(target),
        params,
        requested_by: ctx.cmd.requested_by.clone(),
    }))
}

/// The containers a command added (its own, for an add, then those its hooks' `add-container`
/// actions added), in that order: what a failed action leaves in the environment.
fn added_before(ctx: &StepCtx<'_>, children: &[command::Model]) -> Vec<i64> {
    let own = ctx.progress.get("container_id").and_then(Value::as_i64);
    let by_hooks = children
        .iter()
        .filter(|c| {
            c.kind == CommandKind::EnvironmentAdd.as_str()
                && c.status == CommandStatus::Succeeded.as_str()
        })
        .filter_map(|c| c.result.as_deref())
        .filter_map(|r| serde_json::from_str::<Value>(r).ok())
        .filter_map(|r| r["container_id"].as_i64());
    own.into_iter().chain(by_hooks).collect()
}

/// What a failed command leaves of what it added: `ids`, staying in `env`, and how to remove
/// them (empty when it added none).
fn kept_note(env: &environment::Model, ids: &[i64]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    format!(
        "; the containers added before it stay in '{}': {} (remove one with `cloud48 env remove \
         {} ID`, or add what is missing once a server has room)",
        env.name,
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        env.name
    )
}

/// A hook's action the core refuses: the command fails, saying which member's type asked for
/// it (`by`, 0 when unknown) and which containers the command added before (they stay).
fn refused_action(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
    (members, children): (&[(container::Model, MemberView)], &[command::Model]),
    by: i64,
    message: String,
) -> StepError {
    let asker = match members.iter().find(|(r, _)| r.id == by) {
        Some((r, _)) => format!(" (asked by a hook of container {by}, {})", r.type_id),
        None if by != 0 => format!(" (asked by a hook of container {by})"),
        None => String::new(),
    };
    let kept = kept_note(env, &added_before(ctx, children));
    StepError::Permanent(format!("{message}{asker}{kept}"))
}

/// A tagged script the last step spawned, waiting for its result to reach the requester.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PendingExec {
    by: i64,
    tag: String,
    container: i64,
}

/// What the newest `container.exec` child returned, as the requester's `after-exec` sees it.
async fn exec_result(ctx: &StepCtx<'_>, p: &PendingExec) -> Result<ExecResult, StepError> {
    let children = ctx.svc.queue().children(ctx.cmd.id).await?;
    let child = children
        .iter()
        .filter(|c| {
            c.kind == CommandKind::ContainerExec.as_str() && c.target_id == Some(p.container)
        })
        .max_by_key(|c| c.id);
    let result: Value = child
        .and_then(|c| c.result.as_deref())
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null);
    let text = |k: &str| result[k].as_str().unwrap_or_default().to_string();
    let clip = |s: String| s.chars().take(64 << 10).collect::<String>();
    Ok(match result["exit_code"].as_i64() {
        Some(code) => ExecResult {
            tag: p.tag.clone(),
            container: ContainerId(p.container),
            exit_code: code as i32,
            stdout: clip(text("stdout")),
            stderr: clip(text("stderr")),
        },
        None => ExecResult {
            tag: p.tag.clone(),
            container: ContainerId(p.container),
            exit_code: -1,
            stdout: String::new(),
            stderr: child
                .and_then(|c| c.error.clone())
                .unwrap_or_else(|| "the script did not run".into()),
        },
    })
}

/// Runs the actions stored in the progress one at a time, in order, each as a child command
/// (a `set-params` is written at once); when none is left, goes on with `then(progress)`. A
/// failed action fails the command, except a tagged script: its result goes to the requester's
/// `after-exec`, whose actions run next.
pub(super) async fn drain_actions(
    ctx: &StepCtx<'_>,
    env: &environment::Model,
    then: impl FnOnce(Value) -> Next,
) -> Result<Transition, StepError> {
    let children = ctx.svc.queue().children(ctx.cmd.id).await?;
    if let Some(failure) = failures_among(ctx, &children) {
        let kept = kept_note(env, &added_before(ctx, &children));
        return Ok(Transition::bare(Next::Fail(format!(
            "an action requested by a hook failed: {failure}{kept}"
        ))));
    }
    let mut progress = ctx.progress.clone();
    let mut actions: Vec<Queued> = ctx.progress_field("actions")?;
    let step = ctx.cmd.step;
    if let Some(pending) = progress.get("pending_exec").filter(|v| !v.is_null()) {
        let pending: PendingExec = serde_json::from_value(pending.clone()).map_err(|e| {
            StepError::Permanent(format!("command {}: unreadable progress: {e}", ctx.cmd.id))
        })?;
        progress["pending_exec"] = Value::Null;
        let result = exec_result(ctx, &pending).await?;
        let all = members(ctx.svc.types(), ctx.svc.db(), env.id).await?;
        let view = env_view(env, &all);
        let Some((row, requester)) = all.iter().find(|(r, _)| r.id == pending.by) else {
            // The requester left meanwhile: nobody to tell.
            return Ok(Transition::bare(Next::Continue { step, progress }));
        };
        let calls = vec![Call {
            view: requester,
            state: &row.state,
            hook: Hook::AfterExec(result),
        }];
        let (states, more) = dispatch(ctx.svc, &view, calls, false)?;
        actions.splice(0..0, more);
        progress["actions"] = serde_json::to_value(&actions).expect("serializable");
        return Ok(with_states(
            ctx.cmd.id,
            states,
            Next::Continue { step, progress },
        ));
    }
    if actions.is_empty() {
        return Ok(Transition::bare(then(progress)));
    }
    let (by, action) = actions.remove(0).parts();
    progress["actions"] = serde_json::to_value(&actions).expect("serializable");
    let members = members(ctx.svc.types(), ctx.svc.db(), env.id).await?;
    if let HookAction::SetParams { container, params } = &action {
        let Some((row, _)) = members.iter().find(|(r, _)| r.id == container.0) else {
            let m = format!(
                "a hook asked to set parameters of container {container}, which is not a member of '{}'",
                env.name
            );
            return Err(refused_action(ctx, env, (&members, &children), by, m));
        };
        let ty = ctx
            .svc
            .types()
            .require(&row.type_id)
            .map_err(StepError::Permanent)?;
        let current: Params = serde_json::from_str(&row.params).unwrap_or_default();
        let next = match cloud48_model::apply_settable(&ty.param_specs(), &current, params) {
            Ok(next) => next,
            Err(m) => {
                let m = format!(
                    "a hook asked to set parameters of container {container} ({}): {m}",
                    row.type_id
                );
                return Err(refused_action(ctx, env, (&members, &children), by, m));
            }
        };
        let (id, text) = (row.id, serde_json::to_string(&next).expect("serializable"));
        return Ok(Transition::commit(move |txn| {
            Box::pin(async move {
                set_container(txn, id, container::Column::Params, text).await?;
                Ok(Next::Continue { step, progress })
            })
        }));
    }
    let child = match action_command(ctx, env, &action, &members).await {
        Ok(child) => child,
        Err(m) => return Err(refused_action(ctx, env, (&members, &children), by, m)),
    };
    if let (
        HookAction::Exec {
            container,
            tag: Some(tag),
            ..
        },
        Some(_),
    ) = (&action, &child)
        && by != 0
    {
        progress["pending_exec"] = serde_json::to_value(PendingExec {
            by,
            tag: tag.clone(),
            container: container.0,
        })
        .expect("serializable");
    }
    // A skipped action spawns nothing, which the queue treats as going on at once.
    let children = child.into_iter().collect();
    Ok(Transition::bare(Next::Spawn {
        step,
        progress,
        children,
    }))
}
