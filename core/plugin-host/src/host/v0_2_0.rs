//! WIT 0.2.0: its bindings, the `host` imports and the conversions between its types and the
//! host's.

use wasmtime::Store;
use wasmtime::component::{
    Component, ComponentExportIndex, ComponentType, Instance, Lower, TypedFunc,
};

use super::{HostState, PluginMeta};
use crate::types::{
    AddRequest, DownCause, Hook, HookAction, HookContext, LogLevel, LogLine, MemberView, Verdict,
};
use cloud48_model::{
    Check, ContainerId, ContainerStatus, Endpoint, ImageRef, ParamKind, ParamSpec, Params,
    Protocol, Readiness, Requirements, Resources, Volume, Workload,
};

wasmtime::component::bindgen!({
    path: "../../wit/0.2.0",
    world: "container-type",
});

use cloud48::container::host as imports;
use cloud48::container::types as wit;

/// Most log lines one hook call keeps, and the longest line.
const MAX_LOG_LINES: usize = 100;
const MAX_LOG_LINE: usize = 4096;

impl wit::Host for HostState {}

impl imports::Host for HostState {
    fn log(&mut self, level: imports::Level, message: String) {
        if self.logs.len() >= MAX_LOG_LINES {
            self.logs_dropped += 1;
            return;
        }
        let level = match level {
            imports::Level::Debug => LogLevel::Debug,
            imports::Level::Info => LogLevel::Info,
            imports::Level::Warn => LogLevel::Warn,
            imports::Level::Error => LogLevel::Error,
        };
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(" [truncated]");
        }
        self.logs.push(LogLine { level, message });
    }

    fn environment_param(&mut self, name: String) -> Option<String> {
        self.env_params.get(&name).cloned()
    }

    fn environment_params(&mut self) -> Vec<(String, String)> {
        self.env_params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Adds the `host` imports to the linker.
pub(super) fn link(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    ContainerType::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
}

fn status(s: ContainerStatus) -> wit::Status {
    match s {
        ContainerStatus::Creating => wit::Status::Creating,
        ContainerStatus::Running => wit::Status::Running,
        ContainerStatus::Stopped => wit::Status::Stopped,
        ContainerStatus::Suspended => wit::Status::Suspended,
        ContainerStatus::Down => wit::Status::Down,
        ContainerStatus::Illegal => wit::Status::Illegal,
        ContainerStatus::Destroyed => wit::Status::Destroyed,
        ContainerStatus::Failed => wit::Status::Failed,
    }
}

fn resources(r: &Resources) -> wit::Resources {
    wit::Resources {
        cpu_millis: r.cpu_millis,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
    }
}

fn resources_from(r: wit::Resources) -> Resources {
    Resources {
        cpu_millis: r.cpu_millis,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
    }
}

fn protocol(p: Protocol) -> wit::Protocol {
    match p {
        Protocol::Tcp => wit::Protocol::Tcp,
        Protocol::Udp => wit::Protocol::Udp,
        Protocol::Http => wit::Protocol::Http,
    }
}

fn endpoint(e: &Endpoint) -> wit::Endpoint {
    wit::Endpoint {
        name: e.name.clone(),
        port: e.port,
        protocol: protocol(e.protocol),
    }
}

fn params(p: &Params) -> Vec<wit::Param> {
    p.iter()
        .map(|(name, value)| wit::Param {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

fn params_from(p: Vec<wit::Param>) -> Params {
    p.into_iter().map(|p| (p.name, p.value)).collect()
}

/// The 0.2.0 records a hook receives, borrowing the host's views instead of copying every
/// string into the generated types first: with ten members that copy was a third of the
/// lowering's cost. Field order and types are those of `wit/0.2.0` (the canonical ABI lays
/// records out by order); `call_hook`'s contract covers the match.
pub(super) mod borrowed {
    use super::*;

    #[derive(ComponentType, Lower)]
    #[component(record)]
    pub(in crate::host) struct Endpoint<'a> {
        pub name: &'a str,
        pub port: u16,
        pub protocol: wit::Protocol,
    }

    #[derive(ComponentType, Lower)]
    #[component(record)]
    pub(in crate::host) struct Param<'a> {
        pub name: &'a str,
        pub value: &'a str,
    }

    #[derive(ComponentType, Lower)]
    #[component(record)]
    pub(in crate::host) struct Member<'a> {
        pub id: i64,
        #[component(name = "type-id")]
        pub type_id: &'a str,
        pub priority: i32,
        pub status: wit::Status,
        pub server: Option<&'a str>,
        pub ip: Option<&'a str>,
        pub resources: wit::Resources,
        pub endpoints: Vec<Endpoint<'a>>,
        pub params: Vec<Param<'a>>,
    }

    #[derive(ComponentType, Lower)]
    #[component(record)]
    pub(in crate::host) struct Environment<'a> {
        pub id: i64,
        pub name: &'a str,
        pub members: Vec<Member<'a>>,
    }

    #[derive(ComponentType, Lower)]
    #[component(record)]
    pub(in crate::host) struct Context<'a> {
        pub container: Member<'a>,
        pub environment: Environment<'a>,
        pub state: &'a [u8],
    }
}

fn member(m: &MemberView) -> borrowed::Member<'_> {
    borrowed::Member {
        id: m.id.0,
        type_id: &m.type_id,
        priority: m.priority,
        status: status(m.status),
        server: m.server.as_deref(),
        ip: m.ip.as_deref(),
        resources: resources(&m.resources),
        endpoints: m
            .endpoints
            .iter()
            .map(|e| borrowed::Endpoint {
                name: &e.name,
                port: e.port,
                protocol: protocol(e.protocol),
            })
            .collect(),
        params: m
            .params
            .iter()
            .map(|(name, value)| borrowed::Param { name, value })
            .collect(),
    }
}

/// The context of a hook call, borrowing from `ctx`.
pub(super) fn context<'a>(ctx: &'a HookContext<'_>) -> borrowed::Context<'a> {
    borrowed::Context {
        container: member(ctx.container),
        environment: borrowed::Environment {
            id: ctx.environment.id,
            name: &ctx.environment.name,
            members: ctx.environment.members.iter().map(member).collect(),
        },
        state: ctx.state,
    }
}

/// The context of a call through the generated bindings (`migrate-state`).
pub(super) fn owned_context(ctx: &HookContext<'_>) -> wit::Context {
    let member = |m: &MemberView| wit::Member {
        id: m.id.0,
        type_id: m.type_id.clone(),
        priority: m.priority,
        status: status(m.status),
        server: m.server.clone(),
        ip: m.ip.clone(),
        resources: resources(&m.resources),
        endpoints: m.endpoints.iter().map(endpoint).collect(),
        params: params(&m.params),
    };
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

fn cause(c: &DownCause) -> wit::DownCause {
    match c {
        DownCause::ServerUnreachable(m) => wit::DownCause::ServerUnreachable(m.clone()),
        DownCause::Crashed(m) => wit::DownCause::Crashed(m.clone()),
    }
}

/// What a hook returned: its outcome or its own error.
pub(super) type Returned = Result<wit::Outcome, wit::HookError>;

/// A hook's outcome in the host's types: verdict, actions, new state.
pub(super) fn outcome(out: wit::Outcome) -> (Verdict, Vec<HookAction>, Option<Vec<u8>>) {
    let actions = out
        .actions
        .into_iter()
        .map(|a| match a {
            wit::Action::AddContainer(r) => HookAction::AddContainer(AddRequest {
                type_id: r.type_id,
                params: params_from(r.params),
                resources: r.resources.map(resources_from),
                spread: r.placement.spread,
                avoid_servers: r.placement.avoid_servers,
                labels: r.placement.labels,
            }),
            wit::Action::RemoveContainer(id) => HookAction::RemoveContainer(ContainerId(id)),
            wit::Action::ReplaceContainer(id) => HookAction::ReplaceContainer(ContainerId(id)),
            wit::Action::Exec(e) => HookAction::Exec {
                container: ContainerId(e.container),
                script: e.script,
                args: e.args,
                tag: e.tag,
            },
            wit::Action::SetParams(p) => HookAction::SetParams {
                container: ContainerId(p.container),
                params: params_from(p.params),
            },
        })
        .collect();
    let verdict = match out.verdict {
        wit::Verdict::Allow => Verdict::Allow,
        wit::Verdict::Deny(r) => Verdict::Deny(r),
    };
    (verdict, actions, out.new_state)
}

/// The error a hook returned: its message and whether retrying may help.
pub(super) fn hook_error(e: wit::HookError) -> (String, bool) {
    (e.message, e.retryable)
}

fn check(c: wit::Check) -> Check {
    match c {
        wit::Check::None => Check::None,
        wit::Check::Tcp(endpoint) => Check::Tcp { endpoint },
        wit::Check::Http(h) => Check::Http {
            endpoint: h.endpoint,
            path: h.path,
        },
        wit::Check::Exec(command) => Check::Exec { command },
    }
}

fn workload(w: wit::Workload) -> Workload {
    Workload {
        image: w.image.map(|i| ImageRef {
            reference: i.reference,
            digest: i.digest,
        }),
        command: w.command,
        env: w.env,
        workdir: w.workdir,
        endpoints: w
            .endpoints
            .into_iter()
            .map(|e| Endpoint {
                name: e.name,
                port: e.port,
                protocol: match e.protocol {
                    wit::Protocol::Tcp => Protocol::Tcp,
                    wit::Protocol::Udp => Protocol::Udp,
                    wit::Protocol::Http => Protocol::Http,
                },
            })
            .collect(),
        readiness: w.readiness.map(|r| Readiness {
            check: check(r.check),
            interval_ms: r.interval_ms,
            retries: r.retries,
        }),
        volumes: w
            .volumes
            .into_iter()
            .map(|v| Volume {
                name: v.name,
                path: v.path,
            })
            .collect(),
    }
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
            resources: resources_from(m.requirements),
            labels: m.placement.labels,
            spread: m.placement.spread,
        },
        workload: workload(m.workload),
        params: m
            .params
            .into_iter()
            .map(|p| ParamSpec {
                name: p.name,
                kind: match p.kind {
                    wit::ParamKind::Text => ParamKind::Text,
                    wit::ParamKind::Integer => ParamKind::Integer,
                    wit::ParamKind::Boolean => ParamKind::Boolean,
                },
                default: p.default,
                description: p.description,
                settable: p.settable,
            })
            .collect(),
    }
}

/// Every hook export, by name.
const HOOKS: &[&str] = &[
    "before-it-is-added",
    "after-it-is-added",
    "before-other-is-added",
    "after-other-is-added",
    "before-it-is-removed",
    "after-it-is-removed",
    "before-other-is-removed",
    "after-other-is-removed",
    "is-down",
    "is-up",
    "after-other-is-down",
    "after-other-is-up",
    "after-exec",
    "after-cc-start",
    "before-cc-stop",
];

/// Where each hook, and `initial-state`, is among a component's exports, found once per
/// component. A call then instantiates the component and looks up only its own function: the
/// generated bindings would look up and type-check every export on each instantiation, which
/// with 0.2.0's records cost more than the hook itself (they still serve `describe`, `inspect`
/// and `migrate-state`, which are rare; `initial-state` runs for every new container).
pub(super) struct HookExports {
    hooks: std::collections::HashMap<&'static str, ComponentExportIndex>,
    initial_state: ComponentExportIndex,
}

impl HookExports {
    /// The hooks of `component`, if it exports all of them.
    pub(super) fn of(component: &Component) -> Option<HookExports> {
        let hooks = component.get_export_index(None, "cloud48:container/hooks@0.2.0")?;
        let mut by_name = std::collections::HashMap::new();
        for name in HOOKS {
            by_name.insert(*name, component.get_export_index(Some(&hooks), *name)?);
        }
        Some(HookExports {
            hooks: by_name,
            initial_state: component.get_export_index(Some(&hooks), "initial-state")?,
        })
    }
}

/// Type-checks every hook export of `instance` against the types `call_hook` calls it with
/// (`initial-state` needs no check here: `ContainerTypePre::new` checked it, with the very
/// types `call_initial_state` uses).
pub(super) fn check_hooks(
    instance: &Instance,
    s: &mut Store<HostState>,
    exports: &HookExports,
) -> wasmtime::Result<()> {
    for (name, index) in &exports.hooks {
        let func = instance
            .get_func(&mut *s, index)
            .ok_or_else(|| wasmtime::format_err!("the plugin lacks hook {name}"))?;
        let checked = match *name {
            "after-exec" => func
                .typed::<(&borrowed::Context<'_>, &wit::ExecResult), (Returned,)>(&*s)
                .map(drop),
            "is-down" => func
                .typed::<(&borrowed::Context<'_>, &wit::DownCause), (Returned,)>(&*s)
                .map(drop),
            "after-other-is-down" => func
                .typed::<(
                    &borrowed::Context<'_>,
                    &borrowed::Member<'_>,
                    &wit::DownCause,
                ), (Returned,)>(&*s)
                .map(drop),
            n if n.contains("-other-") => func
                .typed::<(&borrowed::Context<'_>, &borrowed::Member<'_>), (Returned,)>(&*s)
                .map(drop),
            _ => func
                .typed::<(&borrowed::Context<'_>,), (Returned,)>(&*s)
                .map(drop),
        };
        checked
            .map_err(|e| wasmtime::format_err!("hook {name} has an unexpected signature: {e:#}"))?;
    }
    Ok(())
}

/// Calls `initial-state` on `instance`.
///
/// # Safety
/// `instance` is an instance of the component `exports` were found in, whose
/// `ContainerTypePre::new` succeeded: the generated bindings type-checked its `initial-state`
/// as `func() -> list<u8>`, the type used here.
pub(super) unsafe fn call_initial_state(
    instance: &Instance,
    s: &mut Store<HostState>,
    exports: &HookExports,
) -> wasmtime::Result<Vec<u8>> {
    let func = instance
        .get_func(&mut *s, exports.initial_state)
        .ok_or_else(|| wasmtime::format_err!("the plugin lacks initial-state"))?;
    // SAFETY: see the function's contract.
    unsafe {
        TypedFunc::<(), (Vec<u8>,)>::new_unchecked(func)
            .call(&mut *s, ())
            .map(|(state,)| state)
    }
}

/// Calls the export of `hook` on `instance`.
///
/// # Safety
/// `instance` is an instance of the component `exports` were found in, and `check_hooks`
/// type-checked that component's hooks against the types used here (`load` does, once).
pub(super) unsafe fn call_hook(
    instance: &Instance,
    s: &mut Store<HostState>,
    exports: &HookExports,
    hook: &Hook,
    c: &borrowed::Context<'_>,
) -> wasmtime::Result<Returned> {
    let index = exports
        .hooks
        .get(hook.name())
        .ok_or_else(|| wasmtime::format_err!("the plugin lacks hook {}", hook.name()))?;
    let func = instance
        .get_func(&mut *s, index)
        .ok_or_else(|| wasmtime::format_err!("the plugin lacks hook {}", hook.name()))?;
    // SAFETY: see the function's contract: the signatures match the types named here.
    unsafe {
        match hook {
            Hook::BeforeItIsAdded
            | Hook::AfterItIsAdded
            | Hook::BeforeItIsRemoved
            | Hook::AfterItIsRemoved
            | Hook::IsUp
            | Hook::AfterCcStart
            | Hook::BeforeCcStop => {
                TypedFunc::<(&borrowed::Context<'_>,), (Returned,)>::new_unchecked(func)
                    .call(&mut *s, (c,))
                    .map(|(r,)| r)
            }
            Hook::BeforeOtherIsAdded(o)
            | Hook::AfterOtherIsAdded(o)
            | Hook::BeforeOtherIsRemoved(o)
            | Hook::AfterOtherIsRemoved(o)
            | Hook::AfterOtherIsUp(o) => {
                let o = member(o);
                TypedFunc::<(&borrowed::Context<'_>, &borrowed::Member<'_>), (Returned,)>::new_unchecked(func)
                    .call(&mut *s, (c, &o))
                    .map(|(r,)| r)
            }
            Hook::IsDown(why) => {
                let why = cause(why);
                TypedFunc::<(&borrowed::Context<'_>, &wit::DownCause), (Returned,)>::new_unchecked(
                    func,
                )
                .call(&mut *s, (c, &why))
                .map(|(r,)| r)
            }
            Hook::AfterOtherIsDown(o, why) => {
                let (o, why) = (member(o), cause(why));
                TypedFunc::<
                    (
                        &borrowed::Context<'_>,
                        &borrowed::Member<'_>,
                        &wit::DownCause,
                    ),
                    (Returned,),
                >::new_unchecked(func)
                .call(&mut *s, (c, &o, &why))
                .map(|(r,)| r)
            }
            Hook::AfterExec(r) => {
                let r = wit::ExecResult {
                    tag: r.tag.clone(),
                    container: r.container.0,
                    exit_code: r.exit_code,
                    stdout: r.stdout.clone(),
                    stderr: r.stderr.clone(),
                };
                TypedFunc::<(&borrowed::Context<'_>, &wit::ExecResult), (Returned,)>::new_unchecked(
                    func,
                )
                .call(&mut *s, (c, &r))
                .map(|(r,)| r)
            }
        }
    }
}
