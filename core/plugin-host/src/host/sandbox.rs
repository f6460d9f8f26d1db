//! What a hook call's instance may reach: a WASI context without files, network or
//! environment, frozen clocks, a memory cap, and the host import's state for the call.

use super::*;

/// The state of one hook call's store.
pub(super) struct HostState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    /// The most linear memory the instance may grow to, in bytes.
    pub(super) memory_cap: usize,
    /// Set when the instance asked to grow past `memory_cap`: the call fails saying so.
    pub(super) memory_exceeded: bool,
    /// The environment's parameters, for the `host` import of this call.
    pub(super) env_params: Params,
    /// What the plugin logged during this call.
    pub(super) logs: Vec<LogLine>,
    /// Lines dropped past the limit.
    pub(super) logs_dropped: usize,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A clock that always reads zero: plugins get no time.
pub(super) struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}
