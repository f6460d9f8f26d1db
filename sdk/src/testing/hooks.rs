//! The hooks a platform calls: the `Call` enum and the `Hooks` trait, with Rust
//! implementations run natively (`NativeHooks`).

use std::collections::BTreeMap;

use crate::{ContainerType, Context, DownCause, ExecResult, HookResult, Member, Metadata};

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
    /// `after-it-is-removed`.
    AfterItIsRemoved,
    /// `before-other-is-removed`.
    BeforeOtherIsRemoved(&'a Member),
    /// `after-other-is-removed`.
    AfterOtherIsRemoved(&'a Member),
    /// `is-down`.
    IsDown(&'a DownCause),
    /// `is-up`.
    IsUp,
    /// `after-other-is-down`.
    AfterOtherIsDown(&'a Member, &'a DownCause),
    /// `after-other-is-up`.
    AfterOtherIsUp(&'a Member),
    /// `after-exec`.
    AfterExec(&'a ExecResult),
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
    /// Runs a hook: the outer error is the platform's (unknown type, a trap), the inner one
    /// the hook's own `HookError`.
    fn call(&self, type_name: &str, call: &Call<'_>, ctx: &Context) -> Result<HookResult, String>;
    /// The state as JSON.
    fn inspect(&self, type_name: &str, state: &[u8]) -> Result<String, String>;
}

pub(super) trait ErasedType {
    fn metadata(&self) -> Metadata;
    fn migrate_state(&self, from_version: &str, ctx: &Context) -> Result<Vec<u8>, String>;
    fn initial_state(&self) -> Vec<u8>;
    fn call(&self, call: &Call<'_>, ctx: &Context) -> HookResult;
    fn inspect(&self, state: &[u8]) -> String;
}

impl<T: ContainerType> ErasedType for T {
    fn metadata(&self) -> Metadata {
        ContainerType::metadata(self)
    }
    fn migrate_state(&self, from_version: &str, ctx: &Context) -> Result<Vec<u8>, String> {
        ContainerType::migrate_state(self, from_version, ctx)
    }
    fn initial_state(&self) -> Vec<u8> {
        ContainerType::initial_state(self)
    }
    fn call(&self, call: &Call<'_>, ctx: &Context) -> HookResult {
        match call {
            Call::BeforeItIsAdded => self.before_it_is_added(ctx),
            Call::AfterItIsAdded => self.after_it_is_added(ctx),
            Call::BeforeOtherIsAdded(o) => self.before_other_is_added(ctx, o),
            Call::AfterOtherIsAdded(o) => self.after_other_is_added(ctx, o),
            Call::BeforeItIsRemoved => self.before_it_is_removed(ctx),
            Call::AfterItIsRemoved => self.after_it_is_removed(ctx),
            Call::BeforeOtherIsRemoved(o) => self.before_other_is_removed(ctx, o),
            Call::AfterOtherIsRemoved(o) => self.after_other_is_removed(ctx, o),
            Call::IsDown(c) => self.is_down(ctx, c),
            Call::IsUp => self.is_up(ctx),
            Call::AfterOtherIsDown(o, c) => self.after_other_is_down(ctx, o, c),
            Call::AfterOtherIsUp(o) => self.after_other_is_up(ctx, o),
            Call::AfterExec(r) => self.after_exec(ctx, r),
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
        self.insert::<T>();
        self
    }

    /// Adds or replaces a type; returns the one it replaced.
    pub(super) fn insert<T: ContainerType + 'static>(&mut self) -> Option<Box<dyn ErasedType>> {
        let t = T::default();
        let name = ContainerType::metadata(&t).name;
        self.types.insert(name, Box::new(t))
    }

    /// Puts back the type `insert` replaced (or removes `name` when it replaced none).
    pub(super) fn put_back(&mut self, name: &str, previous: Option<Box<dyn ErasedType>>) {
        match previous {
            Some(t) => self.types.insert(name.to_string(), t),
            None => self.types.remove(name),
        };
    }

    /// `migrate-state` of the type named `type_name`.
    pub(super) fn migrate(
        &self,
        type_name: &str,
        from_version: &str,
        ctx: &Context,
    ) -> Result<Vec<u8>, String> {
        self.types
            .get(type_name)
            .ok_or_else(|| format!("unknown type {type_name}"))?
            .migrate_state(from_version, ctx)
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
    fn call(&self, type_name: &str, call: &Call<'_>, ctx: &Context) -> Result<HookResult, String> {
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

pub(super) fn hook_name(call: &Call<'_>) -> &'static str {
    match call {
        Call::BeforeItIsAdded => "before-it-is-added",
        Call::AfterItIsAdded => "after-it-is-added",
        Call::BeforeOtherIsAdded(_) => "before-other-is-added",
        Call::AfterOtherIsAdded(_) => "after-other-is-added",
        Call::BeforeItIsRemoved => "before-it-is-removed",
        Call::AfterItIsRemoved => "after-it-is-removed",
        Call::BeforeOtherIsRemoved(_) => "before-other-is-removed",
        Call::AfterOtherIsRemoved(_) => "after-other-is-removed",
        Call::IsDown(_) => "is-down",
        Call::IsUp => "is-up",
        Call::AfterOtherIsDown(..) => "after-other-is-down",
        Call::AfterOtherIsUp(_) => "after-other-is-up",
        Call::AfterExec(_) => "after-exec",
        Call::AfterCcStart => "after-cc-start",
        Call::BeforeCcStop => "before-cc-stop",
    }
}
