//! The one place that knows the generated WIT bindings: the SDK's types to and from them, and
//! the adapter from a [`ContainerType`] to the generated exports.

use crate::bindings::cloud48::container::types as wit;
use crate::bindings::exports::cloud48::container::hooks::Guest;
use crate::{
    Action, ContainerType, Context, DownCause, Environment, ExecRequest, Member, Metadata, Outcome,
    Resources, Status, Verdict,
};

impl From<wit::Status> for Status {
    fn from(s: wit::Status) -> Self {
        match s {
            wit::Status::Creating => Status::Creating,
            wit::Status::Running => Status::Running,
            wit::Status::Stopped => Status::Stopped,
            wit::Status::Suspended => Status::Suspended,
            wit::Status::Destroyed => Status::Destroyed,
            wit::Status::Failed => Status::Failed,
        }
    }
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
            Action::AddContainer(t) => wit::Action::AddContainer(t),
            Action::RemoveContainer(id) => wit::Action::RemoveContainer(id),
            Action::Exec(ExecRequest {
                container,
                script,
                args,
            }) => wit::Action::Exec(wit::ExecRequest {
                container,
                script,
                args,
            }),
            Action::ReplaceContainer(id) => wit::Action::ReplaceContainer(id),
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

impl From<Metadata> for wit::Metadata {
    fn from(m: Metadata) -> Self {
        wit::Metadata {
            name: m.name,
            version: m.version,
            wit_version: m.wit_version,
            priority: m.priority,
            requirements: m.requirements.into(),
            description: m.description,
        }
    }
}

/// Adapts a [`ContainerType`] to the generated WIT exports.
#[doc(hidden)]
pub struct Export<T>(std::marker::PhantomData<T>);

/// Runs a hook of `T` on the converted context and converts its outcome.
fn hook<T: ContainerType>(
    ctx: wit::Context,
    f: impl FnOnce(&T, &Context) -> Outcome,
) -> wit::Outcome {
    f(&T::default(), &ctx.into()).into()
}

impl<T: ContainerType> Guest for Export<T> {
    fn describe() -> wit::Metadata {
        T::default().metadata().into()
    }
    fn initial_state() -> Vec<u8> {
        T::default().initial_state()
    }
    fn before_it_is_added(ctx: wit::Context) -> wit::Outcome {
        hook(ctx, T::before_it_is_added)
    }
    fn after_it_is_added(ctx: wit::Context) -> wit::Outcome {
        hook(ctx, T::after_it_is_added)
    }
    fn before_other_is_added(ctx: wit::Context, other: wit::Member) -> wit::Outcome {
        hook(ctx, |t: &T, c| t.before_other_is_added(c, &other.into()))
    }
    fn after_other_is_added(ctx: wit::Context, other: wit::Member) -> wit::Outcome {
        hook(ctx, |t: &T, c| t.after_other_is_added(c, &other.into()))
    }
    fn before_it_is_removed(ctx: wit::Context) -> wit::Outcome {
        hook(ctx, T::before_it_is_removed)
    }
    fn after_other_is_removed(ctx: wit::Context, other: wit::Member) -> wit::Outcome {
        hook(ctx, |t: &T, c| t.after_other_is_removed(c, &other.into()))
    }
    fn is_down(ctx: wit::Context, cause: wit::DownCause) -> wit::Outcome {
        hook(ctx, |t: &T, c| t.is_down(c, &cause.into()))
    }
    fn is_up(ctx: wit::Context) -> wit::Outcome {
        hook(ctx, T::is_up)
    }
    fn after_cc_start(ctx: wit::Context) -> wit::Outcome {
        hook(ctx, T::after_cc_start)
    }
    fn before_cc_stop(ctx: wit::Context) -> wit::Outcome {
        hook(ctx, T::before_cc_stop)
    }
    fn inspect(state: Vec<u8>) -> String {
        T::default().inspect(&state)
    }
    fn migrate_state(from_version: String, state: Vec<u8>) -> Result<Vec<u8>, String> {
        T::default().migrate_state(&from_version, state)
    }
}
