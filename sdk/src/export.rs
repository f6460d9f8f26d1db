//! The one place that knows the generated WIT bindings: the SDK's types to and from them, and
//! the adapter from a [`ContainerType`] to the generated exports.

use crate::bindings::cloud48::container::host;
use crate::bindings::cloud48::container::types as wit;
use crate::bindings::exports::cloud48::container::hooks::Guest;
use crate::{
    Action, AddRequest, Check, ContainerType, Context, DownCause, Endpoint, EnvParams, Environment,
    ExecRequest, ExecResult, HookError, HookResult, Member, Metadata, Outcome, ParamKind, Protocol,
    Resources, Status, Verdict, Workload,
};

impl From<wit::Status> for Status {
    fn from(s: wit::Status) -> Self {
        match s {
            wit::Status::Creating => Status::Creating,
            wit::Status::Running => Status::Running,
            wit::Status::Stopped => Status::Stopped,
            wit::Status::Suspended => Status::Suspended,
            wit::Status::Down => Status::Down,
            wit::Status::Illegal => Status::Illegal,
            wit::Status::Destroyed => Status::Destroyed,
            wit::Status::Failed => Status::Failed,
        }
    }
}

impl From<wit::Protocol> for Protocol {
    fn from(p: wit::Protocol) -> Self {
        match p {
            wit::Protocol::Tcp => Protocol::Tcp,
            wit::Protocol::Udp => Protocol::Udp,
            wit::Protocol::Http => Protocol::Http,
        }
    }
}

impl From<Protocol> for wit::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => wit::Protocol::Tcp,
            Protocol::Udp => wit::Protocol::Udp,
            Protocol::Http => wit::Protocol::Http,
        }
    }
}

impl From<wit::Endpoint> for Endpoint {
    fn from(e: wit::Endpoint) -> Self {
        Endpoint {
            name: e.name,
            port: e.port,
            protocol: e.protocol.into(),
        }
    }
}

impl From<Endpoint> for wit::Endpoint {
    fn from(e: Endpoint) -> Self {
        wit::Endpoint {
            name: e.name,
            port: e.port,
            protocol: e.protocol.into(),
        }
    }
}

impl From<wit::Resources> for Resources {
    fn from(r: wit::Resources) -> Self {
        Resources::new(r.cpu_millis, r.memory_mb, r.disk_mb)
    }
}

fn params_from(p: Vec<wit::Param>) -> std::collections::BTreeMap<String, String> {
    p.into_iter().map(|p| (p.name, p.value)).collect()
}

fn params_to(p: std::collections::BTreeMap<String, String>) -> Vec<wit::Param> {
    p.into_iter()
        .map(|(name, value)| wit::Param { name, value })
        .collect()
}

impl From<wit::Member> for Member {
    fn from(m: wit::Member) -> Self {
        Member {
            id: m.id,
            type_id: m.type_id,
            priority: m.priority,
            status: m.status.into(),
            server: m.server,
            ip: m.ip,
            resources: m.resources.into(),
            endpoints: m.endpoints.into_iter().map(Into::into).collect(),
            params: params_from(m.params),
        }
    }
}

impl From<wit::Context> for Context {
    fn from(c: wit::Context) -> Self {
        Context {
            container: c.container.into(),
            environment: Environment {
                id: c.environment.id,
                name: c.environment.name,
                members: c.environment.members.into_iter().map(Into::into).collect(),
                params: EnvParams::fetched_by(host::environment_params),
            },
            state: c.state,
        }
    }
}

impl From<wit::DownCause> for DownCause {
    fn from(c: wit::DownCause) -> Self {
        match c {
            wit::DownCause::ServerUnreachable(s) => DownCause::ServerUnreachable(s),
            wit::DownCause::Crashed(s) => DownCause::Crashed(s),
        }
    }
}

impl From<wit::ExecResult> for ExecResult {
    fn from(r: wit::ExecResult) -> Self {
        ExecResult {
            tag: r.tag,
            container: r.container,
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
        }
    }
}

impl From<Resources> for wit::Resources {
    fn from(r: Resources) -> Self {
        wit::Resources {
            cpu_millis: r.cpu_millis,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
        }
    }
}

impl From<Action> for wit::Action {
    fn from(a: Action) -> Self {
        match a {
            Action::AddContainer(AddRequest {
                type_id,
                params,
                resources,
                placement,
            }) => wit::Action::AddContainer(wit::AddRequest {
                type_id,
                params: params_to(params),
                resources: resources.map(Into::into),
                placement: wit::Placement {
                    spread: placement.spread,
                    avoid_servers: placement.avoid_servers,
                    labels: placement.labels,
                },
            }),
            Action::RemoveContainer(id) => wit::Action::RemoveContainer(id),
            Action::Exec(ExecRequest {
                container,
                script,
                args,
                tag,
            }) => wit::Action::Exec(wit::ExecRequest {
                container,
                script,
                args,
                tag,
            }),
            Action::ReplaceContainer(id) => wit::Action::ReplaceContainer(id),
            Action::SetParams { container, params } => {
                wit::Action::SetParams(wit::SetParamsRequest {
                    container,
                    params: params_to(params),
                })
            }
        }
    }
}

impl From<Outcome> for wit::Outcome {
    fn from(o: Outcome) -> Self {
        wit::Outcome {
            verdict: match o.verdict {
                Verdict::Allow => wit::Verdict::Allow,
                Verdict::Deny(r) => wit::Verdict::Deny(r),
            },
            actions: o.actions.into_iter().map(Into::into).collect(),
            new_state: o.new_state,
        }
    }
}

impl From<Check> for wit::Check {
    fn from(c: Check) -> Self {
        match c {
            Check::None => wit::Check::None,
            Check::Tcp(e) => wit::Check::Tcp(e),
            Check::Http(endpoint, path) => wit::Check::Http(wit::HttpCheck { endpoint, path }),
            Check::Exec(cmd) => wit::Check::Exec(cmd),
        }
    }
}

impl From<Workload> for wit::Workload {
    fn from(w: Workload) -> Self {
        wit::Workload {
            image: w.image.map(|i| wit::Image {
                reference: i.reference,
                digest: i.digest,
            }),
            command: w.command,
            env: w.env,
            workdir: w.workdir,
            endpoints: w.endpoints.into_iter().map(Into::into).collect(),
            readiness: w.readiness.map(|r| wit::Readiness {
                check: r.check.into(),
                interval_ms: r.interval_ms,
                retries: r.retries,
            }),
            volumes: w
                .volumes
                .into_iter()
                .map(|v| wit::Volume {
                    name: v.name,
                    path: v.path,
                })
                .collect(),
        }
    }
}

impl From<Metadata> for wit::Metadata {
    fn from(m: Metadata) -> Self {
        wit::Metadata {
            name: m.name,
            version: m.version,
            wit_version: m.wit_version,
            priority: m.priority,
            requirements: m.requirements.into(),
            placement: wit::Placement {
                spread: m.placement.spread,
                avoid_servers: Vec::new(),
                labels: m.placement.labels,
            },
            description: m.description,
            workload: m.workload.into(),
            params: m
                .params
                .into_iter()
                .map(|p| wit::ParamSpec {
                    name: p.name,
                    kind: match p.kind {
                        ParamKind::Text => wit::ParamKind::Text,
                        ParamKind::Integer => wit::ParamKind::Integer,
                        ParamKind::Boolean => wit::ParamKind::Boolean,
                    },
                    default: p.default,
                    description: p.description,
                    settable: p.settable,
                })
                .collect(),
        }
    }
}

/// Writes a log line through the `host` import.
#[cfg(target_arch = "wasm32")]
pub(crate) fn log(level: crate::Level, message: &str) {
    use crate::Level;
    let level = match level {
        Level::Debug => host::Level::Debug,
        Level::Info => host::Level::Info,
        Level::Warn => host::Level::Warn,
        Level::Error => host::Level::Error,
    };
    host::log(level, message);
}

/// Adapts a [`ContainerType`] to the generated WIT exports.
#[doc(hidden)]
pub struct Export<T>(std::marker::PhantomData<T>);

/// Runs a hook of `T` on the converted context and converts its result.
fn hook<T: ContainerType>(
    ctx: wit::Context,
    f: impl FnOnce(&T, &Context) -> HookResult,
) -> Result<wit::Outcome, wit::HookError> {
    f(&T::default(), &ctx.into())
        .map(Into::into)
        .map_err(|HookError { message, retryable }| wit::HookError { message, retryable })
}

type Returned = Result<wit::Outcome, wit::HookError>;

impl<T: ContainerType> Guest for Export<T> {
    fn describe() -> wit::Metadata {
        T::default().metadata().into()
    }
    fn initial_state() -> Vec<u8> {
        T::default().initial_state()
    }
    fn before_it_is_added(ctx: wit::Context) -> Returned {
        hook(ctx, T::before_it_is_added)
    }
    fn after_it_is_added(ctx: wit::Context) -> Returned {
        hook(ctx, T::after_it_is_added)
    }
    fn before_other_is_added(ctx: wit::Context, other: wit::Member) -> Returned {
        hook(ctx, |t: &T, c| t.before_other_is_added(c, &other.into()))
    }
    fn after_other_is_added(ctx: wit::Context, other: wit::Member) -> Returned {
        hook(ctx, |t: &T, c| t.after_other_is_added(c, &other.into()))
    }
    fn before_it_is_removed(ctx: wit::Context) -> Returned {
        hook(ctx, T::before_it_is_removed)
    }
    fn after_it_is_removed(ctx: wit::Context) -> Returned {
        hook(ctx, T::after_it_is_removed)
    }
    fn before_other_is_removed(ctx: wit::Context, other: wit::Member) -> Returned {
        hook(ctx, |t: &T, c| t.before_other_is_removed(c, &other.into()))
    }
    fn after_other_is_removed(ctx: wit::Context, other: wit::Member) -> Returned {
        hook(ctx, |t: &T, c| t.after_other_is_removed(c, &other.into()))
    }
    fn is_down(ctx: wit::Context, cause: wit::DownCause) -> Returned {
        hook(ctx, |t: &T, c| t.is_down(c, &cause.into()))
    }
    fn is_up(ctx: wit::Context) -> Returned {
        hook(ctx, T::is_up)
    }
    fn after_other_is_down(
        ctx: wit::Context,
        other: wit::Member,
        cause: wit::DownCause,
    ) -> Returned {
        hook(ctx, |t: &T, c| {
            t.after_other_is_down(c, &other.into(), &cause.into())
        })
    }
    fn after_other_is_up(ctx: wit::Context, other: wit::Member) -> Returned {
        hook(ctx, |t: &T, c| t.after_other_is_up(c, &other.into()))
    }
    fn after_exec(ctx: wit::Context, ran: wit::ExecResult) -> Returned {
        hook(ctx, |t: &T, c| t.after_exec(c, &ran.into()))
    }
    fn after_cc_start(ctx: wit::Context) -> Returned {
        hook(ctx, T::after_cc_start)
    }
    fn before_cc_stop(ctx: wit::Context) -> Returned {
        hook(ctx, T::before_cc_stop)
    }
    fn inspect(state: Vec<u8>) -> String {
        T::default().inspect(&state)
    }
    fn migrate_state(from_version: String, ctx: wit::Context) -> Result<Vec<u8>, String> {
        let ctx: Context = ctx.into();
        T::default().migrate_state(&from_version, &ctx)
    }
}
