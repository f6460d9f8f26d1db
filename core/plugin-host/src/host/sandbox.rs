//! What a hook call's instance may reach: a WASI context without files, network or
//! environment, frozen clocks, a standard error the host keeps the start of, a memory cap, and
//! the host import's state for the call.

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
    /// What the plugin wrote to its standard error (a panic's message, before its trap).
    pub(super) stderr: KeptStderr,
}

impl HostState {
    /// Takes the lines logged so far, with a note of those dropped past the limit.
    pub(super) fn take_logs(&mut self) -> Vec<LogLine> {
        let mut logs = std::mem::take(&mut self.logs);
        if self.logs_dropped > 0 {
            logs.push(LogLine {
                level: crate::types::LogLevel::Warn,
                message: format!(
                    "{} more lines dropped (a hook call keeps at most {})",
                    self.logs_dropped,
                    logs.len()
                ),
            });
            self.logs_dropped = 0;
        }
        logs
    }
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

/// A plugin's standard error: the first `STDERR_KEPT` bytes kept, the rest discarded, and no
/// write ever fails (a plugin printing much must not trap for it). A Rust plugin's panic
/// writes its message here just before it traps, and the trap's error then carries it.
#[derive(Clone, Default)]
pub(super) struct KeptStderr(Arc<std::sync::Mutex<Vec<u8>>>);

/// How much of a plugin's standard error a call keeps.
const STDERR_KEPT: usize = 4096;

impl KeptStderr {
    fn keep(&self, bytes: &[u8]) {
        let mut kept = self.0.lock().unwrap();
        let room = STDERR_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// What was written, as one line: lines joined, Rust's hint about backtraces left out.
    pub(super) fn text(&self) -> String {
        let kept = self.0.lock().unwrap();
        String::from_utf8_lossy(&kept)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl wasmtime_wasi::cli::IsTerminal for KeptStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for KeptStderr {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::OutputStream for KeptStderr {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), wasmtime_wasi::p2::StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), wasmtime_wasi::p2::StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, wasmtime_wasi::p2::StreamError> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for KeptStderr {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for KeptStderr {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.keep(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
