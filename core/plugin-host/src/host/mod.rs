//! The WASM plugin host: wasmtime component model behind the core's `ContainerType` trait.
//!
//! One `Engine` (pooling allocator, epoch interruption driven by a ticker thread), one `Linker`
//! with a locked-down WASI (no files, no network, no environment, frozen clocks). Each plugin
//! version is compiled once (the artefact is cached on disk by content hash and engine
//! compatibility) and pre-instantiated once; every hook call gets a fresh instance, so a trap
//! cannot poison later calls. A hook has a deadline and a memory cap; a trap, a timeout, a memory
//! bomb or oversized output fails that one call with an error naming plugin, hook and cause.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::types::{
    ContainerType, Hook, HookAction, HookContext, HookOutcome, LogLine, TypeError, Verdict,
};
use cloud48_model::{ParamSpec, Params, Requirements, Workload};

mod container_type;
mod sandbox;
mod v0_1_0;
mod v0_2_0;

use sandbox::{FrozenClock, HostState};

/// The WIT versions this host runs, newest first.
pub const SUPPORTED_WIT: &[&str] = &["0.2.0", "0.1.0"];

/// Sandbox limits of every hook call.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock deadline of one hook call.
    pub deadline: Duration,
    /// Largest linear memory of a plugin instance.
    pub memory: usize,
    /// Largest state blob, inspect output or script a hook may return.
    pub max_output: usize,
    /// Most actions one hook may request.
    pub max_actions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(100),
            memory: 64 << 20,
            max_output: 1 << 20,
            max_actions: 64,
        }
    }
}

/// Errors of loading a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not a valid component or was built for another contract.
    #[error("{0}")]
    Invalid(String),
}

/// Epoch ticks per second.
const TICKS_PER_SEC: u64 = 1000;

/// The engine, linker and artefact cache shared by all plugins.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    limits: Limits,
}

impl PluginHost {
    /// A host caching compiled artefacts in `cache_dir` (none: compile every time).
    pub fn new(cache_dir: Option<PathBuf>, limits: Limits) -> Result<Arc<PluginHost>, LoadError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_core_instances(1024)
            .total_memories(256)
            .total_tables(512)
            .max_memory_size(limits.memory.max(1 << 20))
            // Reset the first pages of a reused slot with memset instead of returning them to
            // the kernel: page faults and TLB shootdowns dominated instantiation otherwise.
            .linear_memory_keep_resident(512 << 10)
            .table_keep_resident(64 << 10)
            // Where the kernel can say which pages a call wrote (Linux 6.7+, PAGEMAP_SCAN), only
            // those are reset: resetting the whole resident part was a sixth of a hook's time.
            .pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(|e| LoadError::Invalid(format!("cannot start the WASM engine: {e}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| LoadError::Invalid(format!("cannot link WASI: {e}")))?;
        v0_2_0::link(&mut linker)
            .map_err(|e| LoadError::Invalid(format!("cannot link the host imports: {e}")))?;
        if let Some(dir) = &cache_dir {
            let _ = std::fs::create_dir_all(dir);
        }
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("cloud48-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(Duration::from_micros(1_000_000 / TICKS_PER_SEC));
                }
            })
            .expect("epoch ticker starts");
        Ok(Arc::new(PluginHost {
            engine,
            linker,
            cache_dir,
            limits,
        }))
    }

    /// The host of this process for `cache_dir` and `limits`: one `Engine` per process and
    /// configuration, created on first use and kept (engines reserve much address space, so
    /// several cores in one process, as in tests, share one).
    pub fn shared(
        cache_dir: Option<PathBuf>,
        limits: Limits,
    ) -> Result<Arc<PluginHost>, LoadError> {
        type Key = (Option<PathBuf>, Duration, usize, usize, usize);
        static HOSTS: std::sync::Mutex<Vec<(Key, Arc<PluginHost>)>> =
            std::sync::Mutex::new(Vec::new());
        let key: Key = (
            cache_dir.clone(),
            limits.deadline,
            limits.memory,
            limits.max_output,
            limits.max_actions,
        );
        let mut hosts = HOSTS.lock().unwrap();
        if let Some((_, h)) = hosts.iter().find(|(k, _)| *k == key) {
            return Ok(h.clone());
        }
        let host = PluginHost::new(cache_dir, limits)?;
        hosts.push((key, host.clone()));
        Ok(host)
    }

    /// The sandbox limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let key = format!(
            "{}-{:016x}",
            hex::encode(sha2::Sha256::digest(bytes)),
            h.finish()
        );
        if let Some(dir) = &self.cache_dir {
            let path = dir.join(format!("{key}.cwasm"));
            if path.exists() {
                // SAFETY: the file is an artefact this host wrote for this engine configuration
                // (the key includes the engine's compatibility hash).
                if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &path) } {
                    return Ok(c);
                }
                tracing::warn!(path = %path.display(), "corrupt plugin cache entry; recompiling");
            }
            let artefact = self
                .engine
                .precompile_component(bytes)
                .map_err(|e| invalid_component(bytes, &e))?;
            let tmp = path.with_extension(format!("{:08x}.tmp", rand::random::<u32>()));
            if std::fs::write(&tmp, &artefact)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .is_err()
            {
                tracing::warn!(path = %path.display(), "cannot cache a compiled plugin");
            }
            // SAFETY: produced just above by this engine.
            return unsafe { Component::deserialize(&self.engine, &artefact) }.map_err(|e| {
                LoadError::Invalid(format!("cannot load the compiled plugin: {e:#}"))
            });
        }
        Component::new(&self.engine, bytes).map_err(|e| invalid_component(bytes, &e))
    }

    fn store(&self, env_params: Params) -> Store<HostState> {
        let stderr = sandbox::KeptStderr::default();
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                wasi,
                table: ResourceTable::new(),
                memory_cap: self.limits.memory,
                memory_exceeded: false,
                env_params,
                logs: Vec::new(),
                logs_dropped: 0,
                stderr,
            },
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        let ticks = (self.limits.deadline.as_millis() as u64 * TICKS_PER_SEC / 1000).max(1);
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        store
    }

    /// Compiles and pre-instantiates a plugin, then asks it to describe itself.
    pub fn load(self: &Arc<Self>, bytes: &[u8]) -> Result<WasmPlugin, LoadError> {
        let component = self.compile(bytes)?;
        let deterministic = deterministic(&self.engine, &component);
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            LoadError::Invalid(format!(
                "the plugin needs something the host does not give plugins (only the cloud48:container contract and a locked-down WASI are available): {e:#}"
            ))
        })?;
        let pre = match v0_2_0::ContainerTypePre::new(pre.clone()) {
            // `new` found every export, so every hook export is there to index.
            Ok(p) => Pre::V0_2_0(
                p,
                v0_2_0::HookExports::of(&component).ok_or_else(|| {
                    LoadError::Invalid("the plugin lacks a hook of WIT 0.2.0".into())
                })?,
            ),
            Err(newest) => Pre::V0_1_0(v0_1_0::ContainerTypePre::new(pre).map_err(|_| {
                LoadError::Invalid(format!(
                    "the plugin implements none of the WIT versions this core supports ({}); for the newest: {newest:#}",
                    SUPPORTED_WIT.join(", ")
                ))
            })?),
        };
        let mut plugin = WasmPlugin {
            host: self.clone(),
            pre,
            type_id: String::new(),
            meta: PluginMeta::default(),
            deterministic,
            initial: std::sync::OnceLock::new(),
            instances: std::sync::atomic::AtomicU64::new(0),
        };
        plugin.meta = plugin
            .call("describe", Params::new(), |b, s| match b {
                Bindings::V0_1_0(b) => b
                    .cloud48_container_hooks()
                    .call_describe(s)
                    .map(v0_1_0::meta),
                Bindings::V0_2_0(b) => b
                    .cloud48_container_hooks()
                    .call_describe(s)
                    .map(v0_2_0::meta),
                Bindings::Raw(_) => unreachable!("raw instances only run hooks and initial-state"),
            })
            .map_err(|e| LoadError::Invalid(e.to_string()))?;
        plugin.meta.validate().map_err(LoadError::Invalid)?;
        if let Pre::V0_2_0(_, hooks) = &plugin.pre {
            // Type-check every hook against the records `call_hook` lowers, once per load.
            plugin
                .call_here("hooks", Params::new(), true, |b, s| match b {
                    Bindings::Raw(instance) => v0_2_0::check_hooks(instance, s, hooks),
                    _ => unreachable!("raw instances were asked for"),
                })
                .map_err(|e| LoadError::Invalid(e.to_string()))?;
        }
        plugin.type_id = format!("{}@{}", plugin.meta.name, plugin.meta.version);
        Ok(plugin)
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluginMeta {
    /// Type name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// WIT contract version it targets.
    pub wit_version: String,
    /// Priority (lower runs first).
    pub priority: i32,
    /// One line for humans.
    pub description: String,
    /// Default requirements of new containers.
    pub requirements: Requirements,
    /// What runs in its containers (empty for WIT 0.1.0 plugins).
    #[serde(default)]
    pub workload: Workload,
    /// The parameters its containers take.
    #[serde(default)]
    pub params: Vec<ParamSpec>,
}

impl PluginMeta {
    /// Checks name, versions and requirements.
    pub fn validate(&self) -> Result<(), String> {
        cloud48_model::validate_name(&self.name).map_err(|m| format!("plugin name: {m}"))?;
        if self.name == "plain" {
            return Err("plugin name 'plain' is taken by the built-in type".into());
        }
        semver::Version::parse(&self.version).map_err(|e| {
            format!(
                "plugin version '{}' is not a semantic version: {e}",
                self.version
            )
        })?;
        let wit = semver::Version::parse(&self.wit_version).map_err(|e| {
            format!(
                "WIT version '{}' is not a semantic version: {e}",
                self.wit_version
            )
        })?;
        let compatible = SUPPORTED_WIT.iter().any(|s| {
            let s = semver::Version::parse(s).expect("valid");
            s.major == wit.major && (s.major > 0 || s.minor == wit.minor) && wit <= s
        });
        if !compatible {
            return Err(format!(
                "plugin {} targets WIT version {}, which this core does not support (supported: {}); rebuild it with a matching cloud48-sdk",
                self.name,
                self.wit_version,
                SUPPORTED_WIT.join(", ")
            ));
        }
        self.requirements
            .resources
            .validate()
            .map_err(|m| format!("default requirements: {m}"))?;
        self.workload
            .validate()
            .map_err(|m| format!("workload: {m}"))?;
        cloud48_model::validate_schema(&self.params).map_err(|m| format!("parameters: {m}"))
    }
}

/// A pre-instantiated component, by the WIT version it implements.
enum Pre {
    V0_1_0(v0_1_0::ContainerTypePre<HostState>),
    /// With where each hook and `initial-state` is among its exports (they are called through
    /// `Bindings::Raw`).
    V0_2_0(v0_2_0::ContainerTypePre<HostState>, v0_2_0::HookExports),
}

impl Pre {
    fn wit_version(&self) -> &'static str {
        match self {
            Pre::V0_1_0(_) => "0.1.0",
            Pre::V0_2_0(..) => "0.2.0",
        }
    }
}

/// An instance of a component, by WIT version.
enum Bindings {
    V0_1_0(v0_1_0::ContainerType),
    V0_2_0(v0_2_0::ContainerType),
    /// A 0.2.0 instance whose hooks are called one by one (`v0_2_0::call_hook`).
    Raw(wasmtime::component::Instance),
}

/// A loaded plugin version: a `ContainerType` whose hooks run in the sandbox.
pub struct WasmPlugin {
    host: Arc<PluginHost>,
    pre: Pre,
    type_id: String,
    meta: PluginMeta,
    /// Whether its exports answer the same for the same inputs ([`deterministic`]).
    deterministic: bool,
    /// `initial-state`'s answer, kept when the plugin is deterministic (it takes no input).
    initial: std::sync::OnceLock<Vec<u8>>,
    /// Instances made for its calls so far.
    instances: std::sync::atomic::AtomicU64,
}

/// The interfaces whose every call answers the same for the same inputs in this host's
/// sandbox: WASI's command-line and streams (no arguments, no environment, empty stdin, output
/// discarded), clocks (frozen at zero), files (nothing preopened), sockets (all denied), and
/// the `host` import (it answers from the call's environment). Not `wasi:random`.
const DETERMINISTIC_IMPORTS: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:sockets/",
    "cloud48:container/",
];

/// Whether `component` imports only interfaces of [`DETERMINISTIC_IMPORTS`]: then a fresh
/// instance's export, given the same inputs, always returns the same (or fails).
fn deterministic(engine: &Engine, component: &Component) -> bool {
    component
        .component_type()
        .imports(engine)
        .all(|(name, _)| DETERMINISTIC_IMPORTS.iter().any(|p| name.starts_with(p)))
}

impl WasmPlugin {
    /// Metadata.
    pub fn meta(&self) -> &PluginMeta {
        &self.meta
    }

    /// The WIT version the component implements.
    pub fn wit_version(&self) -> &'static str {
        self.pre.wit_version()
    }

    /// Whether the plugin imports nothing that makes a call's answer vary (randomness): its
    /// `initial-state` then runs once and its answer is kept.
    pub fn is_deterministic(&self) -> bool {
        self.deterministic
    }

    /// How many instances its calls have made (one per call).
    pub fn instances(&self) -> u64 {
        self.instances.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `call_logged` without the log lines.
    fn call<R: Send>(
        &self,
        hook: &str,
        env_params: Params,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<R> + Send,
    ) -> Result<R, TypeError> {
        self.call_logged(hook, env_params, false, f).map(|(r, _)| r)
    }

    /// Runs one export in a fresh instance, off the async runtime's scheduling (WASI's blocking
    /// shims may block on the runtime); classifies failures; returns what the plugin logged.
    fn call_logged<R: Send>(
        &self,
        hook: &str,
        env_params: Params,
        raw: bool,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<R> + Send,
    ) -> Result<(R, Vec<LogLine>), TypeError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.call_here(hook, env_params, raw, f))
            }
            Ok(_) => std::thread::scope(|s| {
                s.spawn(|| self.call_here(hook, env_params, raw, f))
                    .join()
                    .expect("hook thread")
            }),
            Err(_) => self.call_here(hook, env_params, raw, f),
        }
    }

    /// Refuses a state blob `hook` returned past the output limit (a hook's, `initial-state`'s
    /// or `migrate-state`'s alike: each is kept in the container's row).
    fn check_state(&self, hook: &str, state: &[u8]) -> Result<(), TypeError> {
        if state.len() > self.host.limits.max_output {
            return Err(self.oversized(hook, "a state blob", state.len()));
        }
        Ok(())
    }

    /// `hook` returned `what` of `n` bytes, past the output limit.
    fn oversized(&self, hook: &str, what: &str, n: usize) -> TypeError {
        self.error(
            hook,
            format!(
                "returned oversized output: {what} of {n} bytes (limit {} bytes)",
                self.host.limits.max_output
            ),
        )
    }

    fn error(&self, hook: &str, cause: String) -> TypeError {
        let type_id = if self.type_id.is_empty() {
            "plugin"
        } else {
            &self.type_id
        };
        TypeError::new(type_id, hook, cause)
    }

    fn call_here<R>(
        &self,
        hook: &str,
        env_params: Params,
        raw: bool,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, Vec<LogLine>), TypeError> {
        let mut store = self.host.store(env_params);
        let limits = &self.host.limits;
        self.instances
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let instance = match &self.pre {
            Pre::V0_1_0(p) => p.instantiate(&mut store).map(Bindings::V0_1_0),
            Pre::V0_2_0(p, _) if raw => p.instance_pre().instantiate(&mut store).map(Bindings::Raw),
            Pre::V0_2_0(p, _) => p.instantiate(&mut store).map(Bindings::V0_2_0),
        }
        .map_err(|e| self.error(hook, classify(&e, &store, limits)))?;
        let result = f(&instance, &mut store);
        // What the call logged goes to the core's log whatever came of it.
        let logs = store.data_mut().take_logs();
        for l in &logs {
            tracing::info!(plugin = %self.type_id, hook, level = ?l.level, "{}", l.message);
        }
        match result {
            Ok(out) => Ok((out, logs)),
            Err(e) => Err(TypeError {
                logs,
                ..self.error(hook, classify(&e, &store, limits))
            }),
        }
    }

    /// Converts the state of a container of version `from` of this plugin to this version;
    /// `ctx` is the container's context with its old state. A refusal names the reason.
    pub fn migrate_state(&self, from: &str, ctx: &HookContext<'_>) -> Result<Vec<u8>, TypeError> {
        let env_params = ctx.environment.params.clone();
        let out = match &self.pre {
            Pre::V0_1_0(_) => self.call("migrate-state", env_params, |b, s| match b {
                Bindings::V0_1_0(b) => b
                    .cloud48_container_hooks()
                    .call_migrate_state(s, from, ctx.state),
                _ => unreachable!("instantiated from its own Pre"),
            })?,
            Pre::V0_2_0(..) => {
                let c = v0_2_0::owned_context(ctx);
                self.call("migrate-state", env_params, |b, s| match b {
                    Bindings::V0_2_0(b) => {
                        b.cloud48_container_hooks().call_migrate_state(s, from, &c)
                    }
                    _ => unreachable!("instantiated from its own Pre"),
                })?
            }
        };
        let state = out.map_err(|m| self.error("migrate-state", format!("refused: {m}")))?;
        self.check_state("migrate-state", &state)?;
        Ok(state)
    }
}

/// At most `n` characters of `s`.
fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One line saying why `bytes` is not a component this host can load, and how to make one.
fn invalid_component(bytes: &[u8], e: &wasmtime::Error) -> LoadError {
    const HOW: &str =
        "build the plugin with `cargo build --release --target wasm32-wasip2` and upload its .wasm";
    let message = if !bytes.starts_with(b"\0asm") {
        format!("the upload is not WebAssembly (it lacks the \\0asm header); {HOW}")
    } else if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
        format!("the upload is a core WebAssembly module, not a component; {HOW}")
    } else {
        let detail = format!("{e:#}")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        format!("not a valid WASM component: {detail}")
    };
    LoadError::Invalid(message)
}

fn classify(e: &wasmtime::Error, store: &Store<HostState>, limits: &Limits) -> String {
    if store.data().memory_exceeded {
        return format!("exceeded its memory limit of {} MiB", limits.memory >> 20);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "exceeded its deadline of {} ms",
            limits.deadline.as_millis()
        ),
        // A panic wrote its message to standard error just before the trap.
        Some(trap) => match store.data().stderr.text() {
            said if said.is_empty() => format!("trapped: {trap}"),
            said => format!("trapped: {trap}; it wrote: {}", clip(&said, 1000)),
        },
        None => format!("{e:#}"),
    }
}
