//! WIT 0.1.0 (frozen): its bindings and the conversions between its types and the host's.
//! A plugin built for 0.1.0 sees `down` members as `stopped` and never sees `illegal` ones; the
//! hooks 0.2.0 added are not called on it (they allow and do nothing); it declares no workload
//! and no parameters; its `add-container` adds with defaults and its `exec` has no tag.

use wasmtime::Store;

use super::{HostState, PluginMeta};
use crate::types::{AddRequest, DownCause, Hook, HookAction, HookContext, MemberView, Verdict};
use cloud48_model::{ContainerId, ContainerStatus, Requirements, Resources, Workload};

wasmtime::component::bindgen!({
    path: "../../wit/0.1.0",
    world: "container-type",
});

use cloud48::container::types as wit;

fn status(s: ContainerStatus) -> wit::Status {
    match s {
        ContainerStatus::Creating => wit::Status::Creating,
        ContainerStatus::Running => wit::Status::Running,
        ContainerStatus::Stopped => wit::Status::Stopped,
        ContainerStatus::Suspended => wit::Status::Suspended,
        ContainerStatus::Destroyed => wit::Status::Destroyed,
        ContainerStatus::Failed => wit::Status::Failed,
        // WIT 0.1.0 has no `down` or `illegal`: a down container is not running (its cause
        // comes with `is-down`), and illegal containers are never shown to hooks.
        ContainerStatus::Down => wit::Status::Stopped,
        ContainerStatus::Illegal => wit::Status::Destroyed,
    }
}

fn member(m: &MemberView) -> wit::Member {
    wit::Member {
        id: m.id.0,
        type_id: m.type_id.clone(),
        priority: m.priority,
        status: status(m.status),
        server: m.server.clone(),
        ip: m.ip.clone(),
    }
}

/// The context of a hook call.
pub(super) fn context(ctx: &HookContext<'_>) -> wit::Context {
    wit::Context {
        container: member(ctx.container),
        environment: wit::Environment {
            id: ctx.environment.id,
            name: ctx.environment.name.clone(),
            members: ctx.environment.members.iter().map(member).collect(),
        },
        state: ctx.state.to_vec(),
    }
}

/// Calls the export of `hook`; none for a hook this version does not have.
pub(super) fn call_hook(
    b: &ContainerType,
    s: &mut Store<HostState>,
    hook: &Hook,
    c: &wit::Context,
) -> wasmtime::Result<Option<wit::Outcome>> {
    let h = b.cloud48_container_hooks();
    let out = match hook {
        Hook::BeforeItIsAdded => h.call_before_it_is_added(s, c),
        Hook::AfterItIsAdded => h.call_after_it_is_added(s, c),
        Hook::BeforeOtherIsAdded(o) => h.call_before_other_is_added(s, c, &member(o)),
        Hook::AfterOtherIsAdded(o) => h.call_after_other_is_added(s, c, &member(o)),
        Hook::BeforeItIsRemoved => h.call_before_it_is_removed(s, c),
        Hook::AfterOtherIsRemoved(o) => h.call_after_other_is_removed(s, c, &member(o)),
        Hook::IsDown(cause) => {
            let cause = match cause {
                DownCause::ServerUnreachable(m) => wit::DownCause::ServerUnreachable(m.clone()),
                DownCause::Crashed(m) => wit::DownCause::Crashed(m.clone()),
            };
            h.call_is_down(s, c, &cause)
        }
        Hook::IsUp => h.call_is_up(s, c),
        Hook::AfterCcStart => h.call_after_cc_start(s, c),
        Hook::BeforeCcStop => h.call_before_cc_stop(s, c),
        Hook::AfterItIsRemoved
        | Hook::BeforeOtherIsRemoved(_)
        | Hook::AfterOtherIsDown(..)
        | Hook::AfterOtherIsUp(_)
        | Hook::AfterExec(_) => return Ok(None),
    };
    out.map(Some)
}

/// A hook's outcome in the host's types: verdict, actions, new state.
pub(super) fn outcome(out: wit::Outcome) -> (Verdict, Vec<HookAction>, Option<Vec<u8>>) {
    let actions = out
        .actions
        .into_iter()
        .map(|a| match a {
            wit::Action::AddContainer(t) => HookAction::AddContainer(AddRequest::of_type(t)),
            wit::Action::RemoveContainer(id) => HookAction::RemoveContainer(ContainerId(id)),
            wit::Action::ReplaceContainer(id) => HookAction::ReplaceContainer(ContainerId(id)),
            wit::Action::Exec(e) => HookAction::Exec {
                container: ContainerId(e.container),
                script: e.script,
                args: e.args,
                tag: None,
            },
        })
        .collect();
    let verdict = match out.verdict {
        wit::Verdict::Allow => Verdict::Allow,
        wit::Verdict::Deny(r) => Verdict::Deny(r),
    };
    (verdict, actions, out.new_state)
}

/// What `describe` returned, in the host's terms.
pub(super) fn meta(m: wit::Metadata) -> PluginMeta {
    PluginMeta {
        name: m.name,
        version: m.version,
        wit_version: m.wit_version,
        priority: m.priority,
        description: m.description,
        requirements: Requirements {
            resources: Resources {
                cpu_millis: m.requirements.cpu_millis,
                memory_mb: m.requirements.memory_mb,
                disk_mb: m.requirements.disk_mb,
            },
            labels: Vec::new(),
            spread: false,
        },
        workload: Workload::default(),
        params: Vec::new(),
    }
}
