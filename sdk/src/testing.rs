//! Test harness: runs scenarios of a container type against a fake platform.
//!
//! The fake platform follows the core's rules: the hooks of the container being added or removed
//! run first, then the members' by ascending priority; a denial stops the operation and changes
//! nothing; requested actions run in order (an added container joins before the requester goes
//! on; exec'd scripts are recorded). Run scenarios natively against Rust implementations with
//! [`Platform::with`]; `cloud48 plugin test` runs the same against compiled `.wasm` files.

use std::collections::BTreeMap;

use crate::{
    Action, ContainerType, Context, DownCause, Environment, Member, Metadata, Outcome, Status,
    Verdict,
};

/// One hook call, as the platform sees it.
#[derive(Debug, Clone)]
pub enum Call<'a> {
    /// `before-it-is-added`.
    BeforeItIsAdded,
    /// `after-it-is-added`.
    AfterItIsAdded,
    /// `before-other-is-added`.
    BeforeOtherIsAdded(&'a Member),
    /// `after-other-is-added`.
    AfterOtherIsAdded(&'a Member),
    /// `before-it-is-removed`.
    BeforeItIsRemoved,
    /// `after-other-is-removed`.
    AfterOtherIsRemoved(&'a Member),
    /// `is-down`.
    IsDown(&'a DownCause),
    /// `is-up`.
    IsUp,
    /// `after-cc-start`: the core started.
    AfterCcStart,
    /// `before-cc-stop`: the core is stopping.
    BeforeCcStop,
}

/// Something that can run the hooks of container types by name: Rust implementations here,
/// WASM components in the core.
pub trait Hooks {
    /// Metadata of a type, or `None` if unknown.
    fn metadata(&self, type_name: &str) -> Option<Metadata>;
    /// Initial state of a new container of the type.
    fn initial_state(&self, type_name: &str) -> Result<Vec<u8>, String>;
    /// Runs a hook.
    fn call(&self, type_name: &str, call: &Call<'_>, ctx: &Context) -> Result<Outcome, String>;
    /// The state as JSON.
    fn inspect(&self, type_name: &str, state: &[u8]) -> Result<String, String>;
}

trait ErasedType {
    fn metadata(&self) -> Metadata;
    fn initial_state(&self) -> Vec<u8>;
    fn call(&self, call: &Call<'_>, ctx: &Context) -> Outcome;
    fn inspect(&self, state: &[u8]) -> String;
}

impl<T: ContainerType> ErasedType for T {
    fn metadata(&self) -> Metadata {
        ContainerType::metadata(self)
    }
    fn initial_state(&self) -> Vec<u8> {
        ContainerType::initial_state(self)
    }
    fn call(&self, call: &Call<'_>, ctx: &Context) -> Outcome {
        match call {
            Call::BeforeItIsAdded => self.before_it_is_added(ctx),
            Call::AfterItIsAdded => self.after_it_is_added(ctx),
            Call::BeforeOtherIsAdded(o) => self.before_other_is_added(ctx, o),
            Call::AfterOtherIsAdded(o) => self.after_other_is_added(ctx, o),
            Call::BeforeItIsRemoved => self.before_it_is_removed(ctx),
            Call::AfterOtherIsRemoved(o) => self.after_other_is_removed(ctx, o),
            Call::IsDown(c) => self.is_down(ctx, c),
            Call::IsUp => self.is_up(ctx),
            Call::AfterCcStart => self.after_cc_start(ctx),
            Call::BeforeCcStop => self.before_cc_stop(ctx),
        }
    }
    fn inspect(&self, state: &[u8]) -> String {
        ContainerType::inspect(self, state)
    }
}

/// Rust implementations of container types, run natively.
#[derive(Default)]
pub struct NativeHooks {
    types: BTreeMap<String, Box<dyn ErasedType>>,
}

impl NativeHooks {
    /// Adds a type.
    pub fn with<T: ContainerType + 'static>(mut self) -> Self {
        let t = T::default();
        let name = ContainerType::metadata(&t).name;
        self.types.insert(name, Box::new(t));
        self
    }
}

impl Hooks for NativeHooks {
    fn metadata(&self, type_name: &str) -> Option<Metadata> {
        self.types.get(type_name).map(|t| t.metadata())
    }
    fn initial_state(&self, type_name: &str) -> Result<Vec<u8>, String> {
        self.types
            .get(type_name)
            .map(|t| t.initial_state())
            .ok_or_else(|| format!("unknown type {type_name}"))
    }
    fn call(&self, type_name: &str, call: &Call<'_>, ctx: &Context) -> Result<Outcome, String> {
        self.types
            .get(type_name)
            .map(|t| t.call(call, ctx))
            .ok_or_else(|| format!("unknown type {type_name}"))
    }
    fn inspect(&self, type_name: &str, state: &[u8]) -> Result<String, String> {
        self.types
            .get(type_name)
            .map(|t| t.inspect(state))
            .ok_or_else(|| format!("unknown type {type_name}"))
    }
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
}

struct Slot {
    member: Member,
    state: Vec<u8>,
}

/// A fake platform: environments (`test` to begin with) on three fake servers.
pub struct Platform<H: Hooks> {
    hooks: H,
    /// The members of the current environment.
    members: Vec<Slot>,
    /// The current environment's id and name.
    env: (i64, String),
    /// The other environments: id, name, members.
    parked: Vec<(i64, String, Vec<Slot>)>,
    next_id: i64,
    servers: Vec<String>,
    avoid: Option<String>,
    /// Members whose server crashed and is not back.
    down: Vec<i64>,
    /// Every exec'd script, in order.
    pub execs: Vec<Exec>,
    /// Containers replaced after going down: no longer members, left for the collector.
    pub illegal: Vec<Member>,
    /// Every hook call as `type#id:hook`, in order.
    pub log: Vec<String>,
}

impl Platform<NativeHooks> {
    /// A platform running Rust implementations natively.
    pub fn with_native(hooks: NativeHooks) -> Self {
        Platform::new(hooks)
    }
}

fn hook_name(call: &Call<'_>) -> &'static str {
    match call {
        Call::BeforeItIsAdded => "before-it-is-added",
        Call::AfterItIsAdded => "after-it-is-added",
        Call::BeforeOtherIsAdded(_) => "before-other-is-added",
        Call::AfterOtherIsAdded(_) => "after-other-is-added",
        Call::BeforeItIsRemoved => "before-it-is-removed",
        Call::AfterOtherIsRemoved(_) => "after-other-is-removed",
        Call::IsDown(_) => "is-down",
        Call::IsUp => "is-up",
        Call::AfterCcStart => "after-cc-start",
        Call::BeforeCcStop => "before-cc-stop",
    }
}

impl<H: Hooks> Platform<H> {
    /// An empty environment on three fake servers, `s1` to `s3`.
    pub fn new(hooks: H) -> Self {
        Platform {
            hooks,
            members: Vec::new(),
            env: (1, "test".into()),
            parked: Vec::new(),
            next_id: 1,
            servers: vec!["s1".into(), "s2".into(), "s3".into()],
            avoid: None,
            down: Vec::new(),
            execs: Vec::new(),
            illegal: Vec::new(),
            log: Vec::new(),
        }
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
        self.log.push(format!(
            "{}#{}:{}",
            crate::type_name(&member.type_id),
            member.id,
            hook_name(&call)
        ));
        let outcome = self
            .hooks
            .call(crate::type_name(&member.type_id), &call, &ctx)?;
        if let Some(s) = &outcome.new_state
            && let Some(slot) = self.members.iter_mut().find(|s| s.member.id == member.id)
        {
            slot.state = s.clone();
        }
        Ok(outcome)
    }

    fn act(&mut self, actions: Vec<Action>) -> Result<(), String> {
        for a in actions {
            match a {
                Action::AddContainer(t) => {
                    self.add(&t)?;
                }
                Action::RemoveContainer(id) => self.remove(id)?,
                Action::Exec(e) => {
                    if !self.members.iter().any(|s| s.member.id == e.container) {
                        return Err(format!(
                            "exec in container {} that is not a member",
                            e.container
                        ));
                    }
                    self.execs.push(Exec {
                        container: e.container,
                        script: e.script,
                        args: e.args,
                    });
                }
                Action::ReplaceContainer(id) => {
                    let pos = self
                        .members
                        .iter()
                        .position(|s| s.member.id == id)
                        .ok_or_else(|| format!("replace of unknown container {id}"))?;
                    let old = self.members.remove(pos).member;
                    let avoid = old.server.clone();
                    let t = crate::type_name(&old.type_id).to_string();
                    self.illegal.push(old);
                    self.avoid = avoid;
                    let added = self.add(&t);
                    self.avoid = None;
                    added?;
                }
            }
        }
        Ok(())
    }

    /// Adds a container of `type_name`; returns its id or the denial.
    pub fn add(&mut self, type_name: &str) -> Result<i64, String> {
        let meta = self
            .hooks
            .metadata(type_name)
            .ok_or_else(|| format!("unknown type {type_name}"))?;
        let initial = self.hooks.initial_state(type_name)?;
        let mut new = Member {
            id: 0,
            type_id: format!("{}@{}", meta.name, meta.version),
            priority: meta.priority,
            status: Status::Creating,
            server: None,
            ip: None,
        };
        let mut actions = Vec::new();
        let mut new_state = initial;
        let outcome = self.run(&new, Call::BeforeItIsAdded, Some(&new_state))?;
        if let Verdict::Deny(r) = outcome.verdict {
            return Err(r);
        }
        if let Some(s) = outcome.new_state {
            new_state = s;
        }
        actions.extend(outcome.actions);
        for m in self.members() {
            let outcome = self.run(&m, Call::BeforeOtherIsAdded(&new), None)?;
            if let Verdict::Deny(r) = outcome.verdict {
                return Err(r);
            }
            actions.extend(outcome.actions);
        }
        self.act(actions)?;
        let id = self.next_id;
        self.next_id += 1;
        new.id = id;
        new.status = Status::Running;
        let mut server = self.servers[(id as usize - 1) % self.servers.len()].clone();
        if Some(&server) == self.avoid.as_ref() {
            server = self.servers[id as usize % self.servers.len()].clone();
        }
        new.server = Some(server);
        new.ip = Some(format!("10.0.0.{}", id + 1));
        self.members.push(Slot {
            member: new.clone(),
            state: new_state,
        });
        let mut actions = self.run(&new, Call::AfterItIsAdded, None)?.actions;
        for m in self.members().into_iter().filter(|m| m.id != id) {
            actions.extend(self.run(&m, Call::AfterOtherIsAdded(&new), None)?.actions);
        }
        self.act(actions)?;
        Ok(id)
    }

    /// Removes a member.
    pub fn remove(&mut self, id: i64) -> Result<(), String> {
        let member = self
            .members
            .iter()
            .find(|s| s.member.id == id)
            .map(|s| s.member.clone())
            .ok_or_else(|| format!("container {id} is not a member"))?;
        let outcome = self.run(&member, Call::BeforeItIsRemoved, None)?;
        if let Verdict::Deny(r) = outcome.verdict {
            return Err(r);
        }
        self.act(outcome.actions)?;
        self.members.retain(|s| s.member.id != id);
        let mut actions = Vec::new();
        for m in self.members() {
            actions.extend(
                self.run(&m, Call::AfterOtherIsRemoved(&member), None)?
                    .actions,
            );
        }
        self.act(actions)
    }

    /// Crashes a server: its members go down and get `is-down`, in priority order.
    pub fn crash_server(&mut self, server: &str) -> Result<(), String> {
        let server = server.to_string();
        self.in_every_environment(|p| p.crash_here(&server))
    }

    fn crash_here(&mut self, server: &str) -> Result<(), String> {
        let cause = DownCause::ServerUnreachable(server.to_string());
        let down: Vec<Member> = self
            .members()
            .into_iter()
            .filter(|m| m.server.as_deref() == Some(server))
            .collect();
        for slot in self
            .members
            .iter_mut()
            .filter(|s| s.member.server.as_deref() == Some(server))
        {
            slot.member.status = Status::Stopped;
            self.down.push(slot.member.id);
        }
        let mut actions = Vec::new();
        for m in down {
            actions.extend(self.run(&m, Call::IsDown(&cause), None)?.actions);
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
        let mut actions = Vec::new();
        for m in self.members().into_iter().filter(|m| back.contains(&m.id)) {
            actions.extend(self.run(&m, Call::IsUp, None)?.actions);
        }
        self.act(actions)
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

    /// Makes `name` the environment later calls act on, creating it (empty) the first time.
    /// Hooks only ever see their own environment's members; ids are unique on the platform.
    pub fn use_environment(&mut self, name: &str) {
        if self.env.1 == name {
            return;
        }
        let next = match self.parked.iter().position(|(_, n, _)| n == name) {
            Some(i) => self.parked.remove(i),
            None => {
                let id = self
                    .parked
                    .iter()
                    .map(|e| e.0)
                    .max()
                    .unwrap_or(0)
                    .max(self.env.0)
                    + 1;
                (id, name.to_string(), Vec::new())
            }
        };
        let members = std::mem::replace(&mut self.members, next.2);
        let (id, name) = std::mem::replace(&mut self.env, (next.0, next.1));
        self.parked.push((id, name, members));
    }

    /// The current environment's name.
    pub fn environment(&self) -> &str {
        &self.env.1
    }

    /// Runs `f` in each environment in turn (by id), then comes back to the current one: for
    /// events of the whole platform (a server crash, the core starting).
    fn in_every_environment(
        &mut self,
        mut f: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        let current = self.env.1.clone();
        let mut all: Vec<(i64, String)> = self
            .parked
            .iter()
            .map(|(id, n, _)| (*id, n.clone()))
            .chain([self.env.clone()])
            .collect();
        all.sort();
        let mut result = Ok(());
        for (_, name) in all {
            self.use_environment(&name);
            result = f(self);
            if result.is_err() {
                break;
            }
        }
        self.use_environment(&current);
        result
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
                actions.extend(self.run(&m, call, None)?.actions);
            }
        }
        self.act(actions)
    }
}
