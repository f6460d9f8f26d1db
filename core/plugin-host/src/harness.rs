//! Runs the SDK's test harness (`cloud48_sdk::testing`) against compiled plugins through the
//! real host, and `cloud48 plugin test` scenario files.

use std::collections::BTreeMap;
use std::sync::Arc;

use cloud48_sdk::testing::{Call, Hooks, Platform};
use cloud48_sdk::{
    Action, Context, DownCause as SdkCause, HookError, HookResult, Member, Metadata, Outcome,
    Resources, Status, Verdict as SdkVerdict,
};
use serde::Deserialize;

use crate::types::{
    ContainerType, DownCause, EnvironmentView, ExecResult, Hook, HookAction, HookContext,
    MemberView, Verdict,
};
use crate::{PluginHost, PluginMeta, WasmPlugin};
use cloud48_model::{ContainerId, ContainerStatus};

/// Compiled plugins by type name, for the SDK harness: the SDK's `Platform` calls them through
/// the host's `ContainerType`, as the core does.
#[derive(Default)]
pub struct WasmHooks {
    plugins: BTreeMap<String, (PluginMeta, Arc<dyn ContainerType>)>,
}

impl WasmHooks {
    /// Adds a compiled plugin (replacing one of the same name).
    pub fn with(self, plugin: WasmPlugin) -> Self {
        let meta = plugin.meta().clone();
        self.with_type(meta, Arc::new(plugin))
    }

    /// Adds a container type described by `meta` (replacing one of the same name): a compiled
    /// plugin wrapped, e.g. by a test that records every hook call on both the core and the
    /// harness.
    pub fn with_type(mut self, meta: PluginMeta, t: Arc<dyn ContainerType>) -> Self {
        self.plugins.insert(meta.name.clone(), (meta, t));
        self
    }

    /// The version of the type named `name`, if loaded.
    pub fn version_of(&self, name: &str) -> Option<&str> {
        self.plugins.get(name).map(|(m, _)| m.version.as_str())
    }

    fn get(&self, name: &str) -> Result<&Arc<dyn ContainerType>, String> {
        self.plugins
            .get(name)
            .map(|(_, t)| t)
            .ok_or_else(|| format!("no plugin named {name} is loaded"))
    }
}

fn status(s: Status) -> ContainerStatus {
    match s {
        Status::Creating => ContainerStatus::Creating,
        Status::Running => ContainerStatus::Running,
        Status::Stopped => ContainerStatus::Stopped,
        Status::Suspended => ContainerStatus::Suspended,
        Status::Down => ContainerStatus::Down,
        Status::Illegal => ContainerStatus::Illegal,
        Status::Destroyed => ContainerStatus::Destroyed,
        Status::Failed => ContainerStatus::Failed,
    }
}

fn protocol(p: cloud48_sdk::Protocol) -> cloud48_model::Protocol {
    match p {
        cloud48_sdk::Protocol::Tcp => cloud48_model::Protocol::Tcp,
        cloud48_sdk::Protocol::Udp => cloud48_model::Protocol::Udp,
        cloud48_sdk::Protocol::Http => cloud48_model::Protocol::Http,
    }
}

fn sdk_protocol(p: cloud48_model::Protocol) -> cloud48_sdk::Protocol {
    match p {
        cloud48_model::Protocol::Tcp => cloud48_sdk::Protocol::Tcp,
        cloud48_model::Protocol::Udp => cloud48_sdk::Protocol::Udp,
        cloud48_model::Protocol::Http => cloud48_sdk::Protocol::Http,
    }
}

fn resources(r: Resources) -> cloud48_model::Resources {
    cloud48_model::Resources {
        cpu_millis: r.cpu_millis,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
    }
}

fn sdk_resources(r: cloud48_model::Resources) -> Resources {
    Resources::new(r.cpu_millis, r.memory_mb, r.disk_mb)
}

fn view(m: &Member) -> MemberView {
    MemberView {
        id: ContainerId(m.id),
        type_id: m.type_id.clone(),
        priority: m.priority,
        status: status(m.status),
        server: m.server.clone(),
        ip: m.ip.clone(),
        resources: resources(m.resources),
        endpoints: m
            .endpoints
            .iter()
            .map(|e| cloud48_model::Endpoint {
                name: e.name.clone(),
                port: e.port,
                protocol: protocol(e.protocol),
            })
            .collect(),
        params: m.params.clone(),
    }
}

/// The SDK's view of a workload the host read from a plugin.
fn sdk_workload(w: cloud48_model::Workload) -> cloud48_sdk::Workload {
    use cloud48_model::Check as C;
    cloud48_sdk::Workload {
        image: w.image.map(|i| cloud48_sdk::Image {
            reference: i.reference,
            digest: i.digest,
        }),
        command: w.command,
        env: w.env,
        workdir: w.workdir,
        endpoints: w
            .endpoints
            .into_iter()
            .map(|e| cloud48_sdk::Endpoint {
                name: e.name,
                port: e.port,
                protocol: sdk_protocol(e.protocol),
            })
            .collect(),
        readiness: w.readiness.map(|r| cloud48_sdk::Readiness {
            check: match r.check {
                C::None => cloud48_sdk::Check::None,
                C::Tcp { endpoint } => cloud48_sdk::Check::Tcp(endpoint),
                C::Http { endpoint, path } => cloud48_sdk::Check::Http(endpoint, path),
                C::Exec { command } => cloud48_sdk::Check::Exec(command),
            },
            interval_ms: r.interval_ms,
            retries: r.retries,
        }),
        volumes: w
            .volumes
            .into_iter()
            .map(|v| cloud48_sdk::Volume {
                name: v.name,
                path: v.path,
            })
            .collect(),
    }
}

fn hook_of(call: &Call<'_>) -> Hook {
    let cause = |c: &SdkCause| match c {
        SdkCause::ServerUnreachable(s) => DownCause::ServerUnreachable(s.clone()),
        SdkCause::Crashed(s) => DownCause::Crashed(s.clone()),
    };
    match call {
        Call::BeforeItIsAdded => Hook::BeforeItIsAdded,
        Call::AfterItIsAdded => Hook::AfterItIsAdded,
        Call::BeforeOtherIsAdded(o) => Hook::BeforeOtherIsAdded(view(o)),
        Call::AfterOtherIsAdded(o) => Hook::AfterOtherIsAdded(view(o)),
        Call::BeforeItIsRemoved => Hook::BeforeItIsRemoved,
        Call::AfterItIsRemoved => Hook::AfterItIsRemoved,
        Call::BeforeOtherIsRemoved(o) => Hook::BeforeOtherIsRemoved(view(o)),
        Call::AfterOtherIsRemoved(o) => Hook::AfterOtherIsRemoved(view(o)),
        Call::IsDown(c) => Hook::IsDown(cause(c)),
        Call::IsUp => Hook::IsUp,
        Call::AfterOtherIsDown(o, c) => Hook::AfterOtherIsDown(view(o), cause(c)),
        Call::AfterOtherIsUp(o) => Hook::AfterOtherIsUp(view(o)),
        Call::AfterExec(r) => Hook::AfterExec(ExecResult {
            tag: r.tag.clone(),
            container: ContainerId(r.container),
            exit_code: r.exit_code,
            stdout: r.stdout.clone(),
            stderr: r.stderr.clone(),
        }),
        Call::AfterCcStart => Hook::AfterCcStart,
        Call::BeforeCcStop => Hook::BeforeCcStop,
    }
}

fn action(a: HookAction) -> Action {
    match a {
        HookAction::AddContainer(r) => Action::AddContainer(cloud48_sdk::AddRequest {
            type_id: r.type_id,
            params: r.params,
            resources: r.resources.map(sdk_resources),
            placement: cloud48_sdk::Placement {
                spread: r.spread,
                avoid_servers: r.avoid_servers,
                labels: r.labels,
            },
        }),
        HookAction::RemoveContainer(id) => Action::RemoveContainer(id.0),
        HookAction::ReplaceContainer(id) => Action::ReplaceContainer(id.0),
        HookAction::Exec {
            container,
            script,
            args,
            tag,
        } => Action::Exec(cloud48_sdk::ExecRequest {
            container: container.0,
            script,
            args,
            tag,
        }),
        HookAction::SetParams { container, params } => Action::SetParams {
            container: container.0,
            params,
        },
    }
}

/// The SDK's view of what a plugin says about itself.
fn sdk_meta(m: PluginMeta) -> Metadata {
    Metadata {
        name: m.name,
        version: m.version,
        wit_version: m.wit_version,
        priority: m.priority,
        requirements: sdk_resources(m.requirements.resources),
        placement: cloud48_sdk::Placement {
            spread: m.requirements.spread,
            avoid_servers: Vec::new(),
            labels: m.requirements.labels.clone(),
        },
        description: m.description,
        workload: sdk_workload(m.workload),
        params: m
            .params
            .into_iter()
            .map(|p| cloud48_sdk::ParamSpec {
                name: p.name,
                kind: match p.kind {
                    cloud48_model::ParamKind::Text => cloud48_sdk::ParamKind::Text,
                    cloud48_model::ParamKind::Integer => cloud48_sdk::ParamKind::Integer,
                    cloud48_model::ParamKind::Boolean => cloud48_sdk::ParamKind::Boolean,
                },
                default: p.default,
                description: p.description,
                settable: p.settable,
            })
            .collect(),
    }
}

/// The host's views of the container and environment of an SDK context.
fn views(ctx: &Context) -> (MemberView, EnvironmentView) {
    let env = EnvironmentView {
        id: ctx.environment.id,
        name: ctx.environment.name.clone(),
        members: ctx.environment.members.iter().map(view).collect(),
        params: (*ctx.environment.params).clone(),
    };
    (view(&ctx.container), env)
}

impl Hooks for WasmHooks {
    fn metadata(&self, type_name: &str) -> Option<Metadata> {
        Some(sdk_meta(self.plugins.get(type_name)?.0.clone()))
    }

    fn initial_state(&self, type_name: &str) -> Result<Vec<u8>, String> {
        self.get(type_name)?
            .initial_state()
            .map_err(|e| e.to_string())
    }

    fn call(&self, type_name: &str, call: &Call<'_>, ctx: &Context) -> Result<HookResult, String> {
        let plugin = self.get(type_name)?;
        let (me, env) = views(ctx);
        let hctx = HookContext {
            container: &me,
            environment: &env,
            state: &ctx.state,
        };
        let out = match plugin.handle(&hook_of(call), &hctx) {
            Ok(out) => out,
            Err(mut e) => {
                // What it logged before it failed, as the core keeps it.
                forward(std::mem::take(&mut e.logs));
                return Ok(Err(HookError {
                    message: e.to_string(),
                    retryable: e.retryable,
                }));
            }
        };
        forward(out.logs);
        Ok(Ok(Outcome {
            verdict: match out.verdict {
                Verdict::Allow => SdkVerdict::Allow,
                Verdict::Deny(r) => SdkVerdict::Deny(r),
            },
            actions: out.actions.into_iter().map(action).collect(),
            new_state: out.new_state,
        }))
    }

    fn inspect(&self, type_name: &str, state: &[u8]) -> Result<String, String> {
        Ok(self
            .get(type_name)?
            .inspect(state)
            .map_err(|e| e.to_string())?
            .to_string())
    }
}

/// Upgrades the type of component `wasm` on the platform as `plugin.upgrade` does: its
/// `migrate-state` converts every container of the loaded version (each seeing its
/// environment), all or none; then the new version runs. Returns the new type id.
pub fn upgrade_on(
    p: &mut Platform<WasmHooks>,
    host: &Arc<PluginHost>,
    wasm: &[u8],
) -> Result<String, String> {
    let new = host.load(wasm).map_err(|e| e.to_string())?;
    let meta = new.meta().clone();
    let from = p
        .hooks()
        .version_of(&meta.name)
        .ok_or_else(|| format!("no version of {} is loaded to upgrade from", meta.name))?
        .to_string();
    let newer = match (
        semver::Version::parse(&from),
        semver::Version::parse(&meta.version),
    ) {
        (Ok(a), Ok(b)) => b > a,
        _ => false,
    };
    if !newer {
        return Err(format!(
            "{}@{} is not newer than the loaded {from}",
            meta.name, meta.version
        ));
    }
    let sdk = sdk_meta(meta.clone());
    p.migrate_members(&sdk, |_, ctx| {
        let (me, env) = views(ctx);
        let hctx = HookContext {
            container: &me,
            environment: &env,
            state: &ctx.state,
        };
        new.migrate_state(&from, &hctx).map_err(|e| e.cause)
    })?;
    let type_id = format!("{}@{}", meta.name, meta.version);
    let hooks = std::mem::take(p.hooks_mut());
    *p.hooks_mut() = hooks.with(new);
    Ok(type_id)
}

/// A scenario file for `cloud48 plugin test`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Bundled plugins to load besides the tested files (default: all of them).
    pub bundled: Option<Vec<String>>,
    /// The steps, in order.
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
}

/// One step: at most one operation, then expectations.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The environment this step and the next act in (created empty the first time; the first
    /// is `test`). Crashes, recoveries and the core's start and stop reach every environment.
    pub environment: Option<String>,
    /// Add a container of this type.
    pub add: Option<String>,
    /// The parameters of the container `add` adds.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Remove the container with this id.
    pub remove: Option<i64>,
    /// Crash this fake server (`s1`..`s3`): its members go down and get `is-down`.
    pub crash: Option<String>,
    /// Bring this crashed server back: its members that were not replaced run again and get
    /// `is-up`.
    pub recover: Option<String>,
    /// `start` or `stop` the core: every member that is not down gets `after-cc-start` or
    /// `before-cc-stop`.
    pub core: Option<CoreEvent>,
    /// Upgrade to the component in this `.wasm` file (a path from the current directory), as
    /// `cloud48 plugin upgrade` does: all containers of its type or none.
    pub upgrade: Option<std::path::PathBuf>,
    /// The operation must be denied with a reason containing this text.
    pub expect_deny: Option<String>,
    /// Type names of the members afterwards, in priority order.
    pub expect_members: Option<Vec<String>>,
    /// Number of scripts exec'd so far.
    pub expect_execs: Option<usize>,
    /// A value of a member's inspected state.
    pub expect_state: Option<StateExpectation>,
    /// A member's parameter.
    pub expect_params: Option<ParamExpectation>,
    /// The last script exec'd: its target container and arguments (and, optionally, a text
    /// its script contains).
    pub expect_last_exec: Option<ExecExpectation>,
}

/// What happens to the core in a step.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoreEvent {
    /// It started.
    Start,
    /// It is stopping.
    Stop,
}

/// The expected last exec of a step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecExpectation {
    /// Container the script ran in.
    pub container: i64,
    /// Its arguments, in order.
    pub args: Vec<String>,
    /// A text the script contains.
    pub script_contains: Option<String>,
}

/// An expected parameter of a member.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamExpectation {
    /// Container id.
    pub id: i64,
    /// Parameter name.
    pub name: String,
    /// Expected value.
    pub value: String,
}

/// An expected value in a member's inspected state.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateExpectation {
    /// Container id.
    pub id: i64,
    /// JSON pointer into the state, e.g. `/upstreams/0`.
    pub pointer: String,
    /// Expected value.
    pub value: serde_json::Value,
}

/// Runs a scenario over the bundled plugins `bundled` (name, component) it names and the
/// plugins `files`; returns one line per step, or the first failure.
pub fn run_scenario(
    host: &Arc<PluginHost>,
    bundled: &[(&str, &[u8])],
    files: &[Vec<u8>],
    scenario: &Scenario,
) -> Result<Vec<String>, String> {
    let mut hooks = WasmHooks::default();
    for (name, wasm) in bundled {
        if scenario
            .bundled
            .as_ref()
            .is_none_or(|b| b.iter().any(|x| x == name))
        {
            hooks = hooks.with(host.load(wasm).map_err(|e| e.to_string())?);
        }
    }
    for f in files {
        hooks = hooks.with(host.load(f).map_err(|e| e.to_string())?);
    }
    let mut p = Platform::new(hooks);
    let mut report = Vec::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        let n = i + 1;
        if let Some(env) = &step.environment {
            p.use_environment(env);
        }
        let (what, result) = if let Some(t) = &step.add {
            (
                format!("add {t}"),
                p.add_request(cloud48_sdk::AddRequest {
                    params: step.params.clone(),
                    ..cloud48_sdk::AddRequest::of(t)
                })
                .map(|id| format!("container {id}")),
            )
        } else if let Some(id) = step.remove {
            (
                format!("remove {id}"),
                p.remove(id).map(|_| "removed".to_string()),
            )
        } else if let Some(s) = &step.crash {
            (
                format!("crash {s}"),
                p.crash_server(s).map(|_| "crashed".to_string()),
            )
        } else if let Some(s) = &step.recover {
            (
                format!("recover {s}"),
                p.recover_server(s).map(|_| "back".to_string()),
            )
        } else if let Some(path) = &step.upgrade {
            let wasm = std::fs::read(path)
                .map_err(|e| format!("step {n}: cannot read {}: {e}", path.display()))?;
            (
                format!("upgrade to {}", path.display()),
                upgrade_on(&mut p, host, &wasm).map(|t| format!("to {t}")),
            )
        } else if let Some(event) = step.core {
            match event {
                CoreEvent::Start => (
                    "core start".to_string(),
                    p.start_core().map(|_| "notified".to_string()),
                ),
                CoreEvent::Stop => (
                    "core stop".to_string(),
                    p.stop_core().map(|_| "notified".to_string()),
                ),
            }
        } else {
            ("check".to_string(), Ok(String::new()))
        };
        let fail = |m: String| format!("step {n} ({what}): {m}");
        match (&step.expect_deny, result) {
            (Some(want), Err(reason)) if reason.contains(want.as_str()) => {
                report.push(format!("✓ step {n}: {what} denied: {reason}"))
            }
            (Some(want), Err(reason)) => {
                return Err(fail(format!(
                    "denied with '{reason}', expected a denial containing '{want}'"
                )));
            }
            (Some(want), Ok(_)) => {
                return Err(fail(format!(
                    "allowed, expected a denial containing '{want}'"
                )));
            }
            (None, Err(e)) => return Err(fail(e)),
            (None, Ok(r)) => report.push(format!("✓ step {n}: {what} {r}")),
        }
        if let Some(want) = &step.expect_members {
            let got: Vec<String> = p
                .members()
                .iter()
                .map(|m| cloud48_sdk::type_name(&m.type_id).to_string())
                .collect();
            if &got != want {
                return Err(fail(format!("members are {got:?}, expected {want:?}")));
            }
        }
        if let Some(want) = step.expect_execs
            && p.execs.len() != want
        {
            return Err(fail(format!(
                "{} scripts were exec'd, expected {want}",
                p.execs.len()
            )));
        }
        if let Some(want) = &step.expect_last_exec {
            let Some(got) = p.execs.last() else {
                return Err(fail("no script was exec'd".into()));
            };
            if got.container != want.container || got.args != want.args {
                return Err(fail(format!(
                    "the last script ran in container {} with {:?}, expected container {} with {:?}",
                    got.container, got.args, want.container, want.args
                )));
            }
            if let Some(text) = &want.script_contains
                && !got.script.contains(text.as_str())
            {
                return Err(fail(format!("the last script does not contain '{text}'")));
            }
        }
        if let Some(e) = &step.expect_params {
            let got = p.params_of(e.id);
            if got.get(&e.name) != Some(&e.value) {
                return Err(fail(format!(
                    "parameter '{}' of container {} is {:?}, expected '{}'",
                    e.name,
                    e.id,
                    got.get(&e.name),
                    e.value
                )));
            }
        }
        if let Some(e) = &step.expect_state {
            if !p.members().iter().any(|m| m.id == e.id) {
                return Err(fail(format!("container {} is not a member", e.id)));
            }
            let state = p.inspect(e.id);
            let got = state
                .pointer(&e.pointer)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            if got != e.value {
                return Err(fail(format!(
                    "state {} of container {} is {got}, expected {}",
                    e.pointer, e.id, e.value
                )));
            }
        }
    }
    Ok(report)
}

/// Logs what a component logged as the harness's own lines.
fn forward(logs: Vec<crate::types::LogLine>) {
    for l in logs {
        cloud48_sdk::log(
            match l.level {
                crate::types::LogLevel::Debug => cloud48_sdk::Level::Debug,
                crate::types::LogLevel::Info => cloud48_sdk::Level::Info,
                crate::types::LogLevel::Warn => cloud48_sdk::Level::Warn,
                crate::types::LogLevel::Error => cloud48_sdk::Level::Error,
            },
            l.message,
        );
    }
}
