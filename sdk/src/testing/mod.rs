//! Test harness: runs scenarios of a container type against a fake platform.
//!
//! The fake platform follows the core's rules: the hooks of the container being added or removed
//! run first, then the members' by ascending priority; a denial stops the operation and changes
//! nothing; requested actions run in order (an added container joins before the requester goes
//! on; exec'd scripts are recorded, and a tagged one's result goes to the requester's
//! `after-exec`). Run scenarios natively against Rust implementations with
//! [`Platform::with_native`]; `cloud48 plugin test` runs the same against compiled `.wasm` files,
//! and a test of the core checks that the core makes the same hook calls as this platform.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::{
    Action, AddRequest, Context, DownCause, Environment, ExecResult, Level, Member, Outcome,
    Status, Verdict,
};

mod environments;
mod hooks;
mod params;
mod upgrade;

use params::{check_settable, resolve};

use hooks::hook_name;
pub use hooks::{Call, Hooks, NativeHooks};

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
}

/// Where [`crate::log`] writes outside WASM: the platform collects it after each hook call.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
}

fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// A script exec'd in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// Container id.
    pub container: i64,
    /// The script.
    pub script: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its tag, when the requester wants the result.
    pub tag: Option<String>,
}

struct Slot {
    member: Member,
    state: Vec<u8>,
    /// How it was added (a replacement is placed and sized the same way).
    placement: crate::Placement,
}

/// An environment that is not the current one: id, name, parameters, members.
type Parked = (i64, String, BTreeMap<String, String>, Vec<Slot>);

/// What a script exec'd by the platform returns: exit code, stdout, stderr.
pub type ExecResponder = Box<dyn FnMut(&Exec) -> (i32, String, String)>;

/// A fake platform: environments (`test` to begin with) on three fake servers.
pub struct Platform<H: Hooks> {
    hooks: H,
    /// The members of the current environment.
    members: Vec<Slot>,
    /// The current environment's id and name.
    env: (i64, String),
    /// The current environment's parameters.
    env_params: BTreeMap<String, String>,
    /// The other environments.
    parked: Vec<Parked>,
    next_id: i64,
    servers: Vec<String>,
    avoid: Option<String>,
    /// Members whose server crashed and is not back.
    down: Vec<i64>,
    responder: ExecResponder,
    /// Every exec'd script, in order.
    pub execs: Vec<Exec>,
    /// Containers replaced after going down: no longer members, left for the collector.
    pub illegal: Vec<Member>,
    /// Every hook call as `type#id:hook`, in order.
    pub log: Vec<String>,
    /// What hooks logged, as `type#id: message`, in order.
    pub logs: Vec<(Level, String)>,
}

impl Platform<NativeHooks> {
    /// A platform running Rust implementations natively.
    pub fn with_native(hooks: NativeHooks) -> Self {
        Platform::new(hooks)
    }
}

impl<H: Hooks> Platform<H> {
    /// An empty environment on three fake servers, `s1` to `s3`.
    pub fn new(hooks: H) -> Self {
        Platform {
            hooks,
            members: Vec::new(),
            env: (1, "test".into()),
            env_params: BTreeMap::new(),
            parked: Vec::new(),
            next_id: 1,
            servers: vec!["s1".into(), "s2".into(), "s3".into()],
            avoid: None,
            down: Vec::new(),
            responder: Box::new(|_| (0, String::new(), String::new())),
            execs: Vec::new(),
            illegal: Vec::new(),
            log: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// The hooks the platform calls.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// The hooks the platform calls, to change (e.g. to install a newer version of a type).
    pub fn hooks_mut(&mut self) -> &mut H {
        &mut self.hooks
    }

    /// Decides what exec'd scripts return (default: exit 0, no output); a tagged exec's result
    /// goes to its requester's `after-exec`.
    pub fn on_exec(&mut self, responder: impl FnMut(&Exec) -> (i32, String, String) + 'static) {
        self.responder = Box::new(responder);
    }

    /// Sets a parameter of the current environment (hooks read it with
    /// `ctx.environment_param`).
    pub fn set_environment_param(&mut self, name: &str, value: &str) {
        self.env_params.insert(name.into(), value.into());
    }

    /// A member's parameters.
    pub fn params_of(&self, id: i64) -> BTreeMap<String, String> {
        self.slot(id)
            .map(|s| s.member.params.clone())
            .unwrap_or_default()
    }

    fn slot(&self, id: i64) -> Option<&Slot> {
        self.members.iter().find(|s| s.member.id == id)
    }

    /// The members, ascending priority then id.
    pub fn members(&self) -> Vec<Member> {
        let mut m: Vec<Member> = self.members.iter().map(|s| s.member.clone()).collect();
        m.sort_by_key(|m| (m.priority, m.id));
        m
    }

    /// Ids of the members of a type.
    pub fn ids_of(&self, type_name: &str) -> Vec<i64> {
        self.members()
            .into_iter()
            .filter(|m| crate::type_name(&m.type_id) == type_name)
            .map(|m| m.id)
            .collect()
    }

    /// The state of a member as its plugin's JSON.
    pub fn inspect(&self, id: i64) -> serde_json::Value {
        let slot = self
            .members
            .iter()
            .find(|s| s.member.id == id)
            .expect("member exists");
        let text = self
            .hooks
            .inspect(crate::type_name(&slot.member.type_id), &slot.state)
            .expect("inspect works");
        serde_json::from_str(&text).expect("inspect returns JSON")
    }

    fn context(&self, id: i64, new: Option<(&Member, &[u8])>) -> Context {
        let (container, state) = match new {
            Some((m, s)) => (m.clone(), s.to_vec()),
            None => {
                let slot = self
                    .members
                    .iter()
                    .find(|s| s.member.id == id)
                    .expect("member exists");
                (slot.member.clone(), slot.state.clone())
            }
        };
        Context {
            container,
            environment: Environment {
                id: self.env.0,
                name: self.env.1.clone(),
                members: self.members().into_iter().filter(|m| m.id != id).collect(),
                params: self.env_params.clone().into(),
            },
            state,
        }
    }

    fn run(
        &mut self,
        member: &Member,
        call: Call<'_>,
        new: Option<&[u8]>,
    ) -> Result<Outcome, String> {
        let ctx = self.context(member.id, new.map(|s| (member, s)));
        let who = format!("{}#{}", crate::type_name(&member.type_id), member.id);
        self.log.push(format!("{who}:{}", hook_name(&call)));
        take_logs();
        let returned = self
            .hooks
            .call(crate::type_name(&member.type_id), &call, &ctx);
        self.logs.extend(
            take_logs()
                .into_iter()
                .map(|(l, m)| (l, format!("{who}: {m}"))),
        );
        let outcome = returned?.map_err(|e| {
            format!(
                "{who} failed in {}: {}{}",
                hook_name(&call),
                e.message,
                if e.retryable { " (retryable)" } else { "" }
            )
        })?;
        if let Some(s) = &outcome.new_state
            && let Some(slot) = self.members.iter_mut().find(|s| s.member.id == member.id)
        {
            slot.state = s.clone();
        }
        Ok(outcome)
    }

    /// Runs `call` for `member` and adds its actions, tagged with the requester, to `actions`.
    fn collect(
        &mut self,
        actions: &mut Vec<(i64, Action)>,
        member: &Member,
        call: Call<'_>,
    ) -> Result<Outcome, String> {
        let mut outcome = self.run(member, call, None)?;
        actions.extend(outcome.actions.drain(..).map(|a| (member.id, a)));
        Ok(outcome)
    }

    fn act(&mut self, actions: Vec<(i64, Action)>) -> Result<(), String> {
        for (requester, a) in actions {
            match a {
                Action::AddContainer(r) => {
                    self.add_request(r)?;
                }
                Action::RemoveContainer(id) => self.remove(id)?,
                Action::Exec(e) => {
                    let Some(target) = self.slot(e.container).map(|s| s.member.clone()) else {
                        return Err(format!(
                            "exec in container {} that is not a member",
                            e.container
                        ));
                    };
                    // A script cannot run in a container that is down (as in the core).
                    if target.status == Status::Down {
                        continue;
                    }
                    let exec = Exec {
                        container: e.container,
                        script: e.script,
                        args: e.args,
                        tag: e.tag,
                    };
                    let (exit_code, stdout, stderr) = (self.responder)(&exec);
                    let tag = exec.tag.clone();
                    self.execs.push(exec);
                    if let Some(tag) = tag
                        && let Some(req) = self.slot(requester).map(|s| s.member.clone())
                    {
                        let result = ExecResult {
                            tag,
                            container: e.container,
                            exit_code,
                            stdout,
                            stderr,
                        };
                        let mut more = Vec::new();
                        self.collect(&mut more, &req, Call::AfterExec(&result))?;
                        self.act(more)?;
                    } else if exit_code != 0 {
                        return Err(format!(
                            "a script in container {} exited with {exit_code}",
                            e.container
                        ));
                    }
                }
                Action::ReplaceContainer(id) => {
                    let pos = self
                        .members
                        .iter()
                        .position(|s| s.member.id == id)
                        .ok_or_else(|| format!("replace of unknown container {id}"))?;
                    let removed = self.members.remove(pos);
                    let (old, placement) = (removed.member, removed.placement);
                    let others = self.members();
                    let mut actions = Vec::new();
                    for m in others {
                        self.collect(&mut actions, &m, Call::AfterOtherIsRemoved(&old))?;
                    }
                    let avoid = old.server.clone();
                    let t = crate::type_name(&old.type_id).to_string();
                    let params = old.params.clone();
                    let old_resources = old.resources;
                    self.illegal.push(Member {
                        status: Status::Illegal,
                        ..old
                    });
                    self.act(actions)?;
                    self.avoid = avoid;
                    let added = self.add_request(AddRequest {
                        params,
                        resources: Some(old_resources),
                        placement,
                        ..AddRequest::of(&t)
                    });
                    self.avoid = None;
                    added?;
                }
                Action::SetParams { container, params } => {
                    let slot = self
                        .members
                        .iter()
                        .find(|s| s.member.id == container)
                        .ok_or_else(|| format!("set-params on {container}, not a member"))?;
                    let meta = self
                        .hooks
                        .metadata(crate::type_name(&slot.member.type_id))
                        .ok_or("unknown type")?;
                    check_settable(&meta, &params)?;
                    let slot = self
                        .members
                        .iter_mut()
                        .find(|s| s.member.id == container)
                        .expect("found above");
                    slot.member.params.extend(params);
                }
            }
        }
        Ok(())
    }

    /// Adds a container of `type_name` with its defaults; returns its id or the denial.
    pub fn add(&mut self, type_name: &str) -> Result<i64, String> {
        self.add_request(AddRequest::of(type_name))
    }

    /// Picks a server for a new container of `type_id`, round robin from its id, honouring
    /// spread and avoided servers (as the core's placement would refuse, this fails when no
    /// server fits).
    fn place(&self, id: i64, type_id: &str, r: &AddRequest) -> Result<String, String> {
        let n = self.servers.len();
        let taken: Vec<String> = self
            .members()
            .into_iter()
            .filter(|m| m.type_id == type_id)
            .filter_map(|m| m.server)
            .collect();
        (0..n)
            .map(|k| self.servers[(id as usize - 1 + k) % n].clone())
            .find(|s| {
                Some(s) != self.avoid.as_ref()
                    && !r.placement.avoid_servers.contains(s)
                    && !(r.placement.spread && taken.contains(s))
            })
            .ok_or_else(|| {
                format!("no server fits a new {type_id} (spread or avoided servers exclude all)")
            })
    }

    /// Adds a container as a hook's `add-container` does (parameters, resources, placement);
    /// returns its id or the denial.
    pub fn add_request(&mut self, r: AddRequest) -> Result<i64, String> {
        let type_name = crate::type_name(&r.type_id).to_string();
        let meta = self
            .hooks
            .metadata(&type_name)
            .ok_or_else(|| format!("unknown type {type_name}"))?;
        let params = resolve(&meta, &r.params)?;
        // The type's default placement, as the core applies its default requirements.
        let mut r = r;
        r.placement.spread |= meta.placement.spread;
        r.placement
            .labels
            .extend(meta.placement.labels.iter().cloned());
        let initial = self.hooks.initial_state(&type_name)?;
        let mut new = Member {
            id: 0,
            type_id: format!("{}@{}", meta.name, meta.version),
            priority: meta.priority,
            status: Status::Creating,
            server: None,
            ip: None,
            resources: r.resources.unwrap_or(meta.requirements),
            endpoints: meta.workload.endpoints.clone(),
            params,
        };
        let mut actions = Vec::new();
        let mut new_state = initial;
        let mut outcome = self.run(&new, Call::BeforeItIsAdded, Some(&new_state))?;
        if let Verdict::Deny(r) = outcome.verdict {
            return Err(r);
        }
        if let Some(s) = outcome.new_state.take() {
            new_state = s;
        }
        // The new container's actions run in the name of the requester it does not yet have:
        // a tagged exec's result has nowhere to go.
        actions.extend(outcome.actions.into_iter().map(|a| (0, a)));
        for m in self.members() {
            let outcome = self.collect(&mut actions, &m, Call::BeforeOtherIsAdded(&new))?;
            if let Verdict::Deny(r) = outcome.verdict {
                return Err(r);
            }
        }
        self.act(actions)?;
        let id = self.next_id;
        new.server = Some(self.place(id, &new.type_id, &r)?);
        self.next_id += 1;
        new.id = id;
        new.status = Status::Running;
        new.ip = Some(format!("10.0.0.{}", id + 1));
        self.members.push(Slot {
            member: new.clone(),
            state: new_state,
            placement: r.placement.clone(),
        });
        let mut actions = Vec::new();
        self.collect(&mut actions, &new, Call::AfterItIsAdded)?;
        for m in self.members().into_iter().filter(|m| m.id != id) {
            self.collect(&mut actions, &m, Call::AfterOtherIsAdded(&new))?;
        }
        self.act(actions)?;
        Ok(id)
    }

    /// Removes a member: `before-it-is-removed`, then `before-other-is-removed` for the others
    /// (any may deny), the actions, then (it is gone) its `after-it-is-removed` and the others'
    /// `after-other-is-removed`, then those actions.
    pub fn remove(&mut self, id: i64) -> Result<(), String> {
        let member = self
            .slot(id)
            .map(|s| s.member.clone())
            .ok_or_else(|| format!("container {id} is not a member"))?;
        let mut actions = Vec::new();
        let outcome = self.collect(&mut actions, &member, Call::BeforeItIsRemoved)?;
        if let Verdict::Deny(r) = outcome.verdict {
            return Err(r);
        }
        for m in self.members().into_iter().filter(|m| m.id != id) {
            let outcome = self.collect(&mut actions, &m, Call::BeforeOtherIsRemoved(&member))?;
            if let Verdict::Deny(r) = outcome.verdict {
                return Err(r);
            }
        }
        self.act(actions)?;
        let mut actions = Vec::new();
        self.collect(&mut actions, &member, Call::AfterItIsRemoved)?;
        self.members.retain(|s| s.member.id != id);
        for m in self.members() {
            self.collect(&mut actions, &m, Call::AfterOtherIsRemoved(&member))?;
        }
        // The removed container is gone: nothing can run in it any more.
        actions.retain(|(_, a)| !matches!(a, Action::Exec(e) if e.container == id));
        self.act(actions)
    }

    /// Crashes a server: its members go down and get `is-down`, in priority order.
    pub fn crash_server(&mut self, server: &str) -> Result<(), String> {
        let server = server.to_string();
        self.in_every_environment(|p| p.crash_here(&server))
    }

    fn crash_here(&mut self, server: &str) -> Result<(), String> {
        let cause = DownCause::ServerUnreachable(server.to_string());
        let mut down = Vec::new();
        for slot in self.members.iter_mut().filter(|s| {
            s.member.server.as_deref() == Some(server) && s.member.status != Status::Down
        }) {
            slot.member.status = Status::Down;
            self.down.push(slot.member.id);
            down.push(slot.member.id);
        }
        self.after_status_change(&down, Some(&cause))
    }

    /// For each changed member (priority order) its own `is-down` (with `cause`) or `is-up`,
    /// then for each of them `after-other-is-down`/`-up` for every member that is not down;
    /// then the actions, in that order (as the core's failover and recover commands).
    fn after_status_change(
        &mut self,
        changed: &[i64],
        cause: Option<&DownCause>,
    ) -> Result<(), String> {
        let changed: Vec<Member> = self
            .members()
            .into_iter()
            .filter(|m| changed.contains(&m.id))
            .collect();
        let mut actions = Vec::new();
        for m in &changed {
            let call = match cause {
                Some(c) => Call::IsDown(c),
                None => Call::IsUp,
            };
            self.collect(&mut actions, m, call)?;
        }
        for c in &changed {
            for m in self.members() {
                if m.id == c.id || m.status == Status::Down {
                    continue;
                }
                let call = match cause {
                    Some(cause) => Call::AfterOtherIsDown(c, cause),
                    None => Call::AfterOtherIsUp(c),
                };
                self.collect(&mut actions, &m, call)?;
            }
        }
        self.act(actions)
    }

    /// A crashed server is back: its members that are still members (not replaced meanwhile)
    /// run again and get `is-up`, in priority order, as the core's `environment.recover` does.
    pub fn recover_server(&mut self, server: &str) -> Result<(), String> {
        let server = server.to_string();
        self.in_every_environment(|p| p.recover_here(&server))
    }

    fn recover_here(&mut self, server: &str) -> Result<(), String> {
        let back: Vec<i64> = self
            .members()
            .into_iter()
            .filter(|m| m.server.as_deref() == Some(server) && self.down.contains(&m.id))
            .map(|m| m.id)
            .collect();
        self.down.retain(|id| !back.contains(id));
        for slot in self
            .members
            .iter_mut()
            .filter(|s| back.contains(&s.member.id))
        {
            slot.member.status = Status::Running;
        }
        self.after_status_change(&back, None)
    }

    /// The core started: every member that is not down gets `after-cc-start`, in priority
    /// order, then the actions they asked for run (as the core's start-up notification).
    pub fn start_core(&mut self) -> Result<(), String> {
        self.in_every_environment(|p| p.notify(true))
    }

    /// The core is stopping: every member that is not down gets `before-cc-stop`, in priority
    /// order, then the actions they asked for run before it stops.
    pub fn stop_core(&mut self) -> Result<(), String> {
        self.in_every_environment(|p| p.notify(false))
    }

    fn notify(&mut self, start: bool) -> Result<(), String> {
        let mut actions = Vec::new();
        for m in self.members() {
            if !self.down.contains(&m.id) {
                let call = if start {
                    Call::AfterCcStart
                } else {
                    Call::BeforeCcStop
                };
                self.collect(&mut actions, &m, call)?;
            }
        }
        self.act(actions)
    }
}
