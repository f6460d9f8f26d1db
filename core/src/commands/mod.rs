//! Command handlers: the steps of every container and environment command.
//!
//! Invariants:
//! - A step either finishes before its side effect or repeats it idempotently: driver
//!   operations are idempotent by guest id, and each step's database writes commit together
//!   with the step number (`queue::Transition`).
//! - A step re-checks the object's status; a command queued behind another one fails with a
//!   clear message when the object is no longer in a status it can act on.

mod batch;
mod container;
mod environment;
mod grouped;

use std::sync::Arc;

use async_trait::async_trait;
use sea_orm::{DatabaseTransaction, DbErr};
use serde_json::Value;

use crate::core::{Core, CoreError};
use crate::driver::{Driver, DriverError};
use crate::entities::command;
use crate::queue::{GroupSink, Next, Runner, StepError, Transition};

/// The `queue::Runner` of the core.
pub struct Handlers {
    core: Core,
}

impl Handlers {
    /// Handlers acting on `core`.
    pub fn new(core: Core) -> Self {
        Handlers { core }
    }
}

#[async_trait]
impl Runner for Handlers {
    async fn step(&self, cmd: &command::Model) -> Result<Transition, StepError> {
        let progress: Value = serde_json::from_str(&cmd.progress).unwrap_or(Value::Null);
        let params: Value = serde_json::from_str(&cmd.params).unwrap_or(Value::Null);
        let ctx = StepCtx {
            core: &self.core,
            cmd,
            params,
            progress,
        };
        match cmd.kind.split_once('.') {
            _ if cmd.kind == "noop" => Ok(Transition::bare(Next::Done(Value::Null))),
            _ if cmd.kind == "container.create_many" => batch::create_many(&ctx).await,
            Some(("container", op)) => container::step(&ctx, op).await,
            Some(("environment", op)) => environment::step(&ctx, op).await,
            _ => Err(StepError::Permanent(format!(
                "unknown command kind '{}'",
                cmd.kind
            ))),
        }
    }

    fn group_key(&self, cmd: &command::Model) -> Option<String> {
        grouped::key(cmd)
    }

    async fn step_group(&self, cmds: &[command::Model], sink: &mut dyn GroupSink) -> Result<(), StepError> {
        grouped::step(&self.core, cmds, sink).await
    }

    async fn on_failure(
        &self,
        cmd: &command::Model,
        error: &str,
    ) -> Result<Option<DatabaseTransaction>, DbErr> {
        if cmd.kind == "container.create_many" {
            return batch::compensate(&self.core, cmd).await;
        }
        if matches!(cmd.kind.as_str(), "container.create" | "container.clone" | "container.migrate") {
            return container::compensate(&self.core, cmd, error).await;
        }
        Ok(None)
    }
}

/// What a step sees.
pub(crate) struct StepCtx<'a> {
    pub core: &'a Core,
    pub cmd: &'a command::Model,
    pub params: Value,
    pub progress: Value,
}

impl StepCtx<'_> {
    /// The target id of the command.
    pub fn target_id(&self) -> Result<i64, StepError> {
        self.cmd
            .target_id
            .ok_or_else(|| StepError::Permanent("command has no target".into()))
    }

    /// An integer from the progress.
    pub fn progress_i64(&self, key: &str) -> Option<i64> {
        self.progress.get(key).and_then(Value::as_i64)
    }
}

/// Maps driver errors: transient ones are retried by the queue, the others fail the command
/// with the driver's message.
pub(crate) fn driver_err(server: &str, e: DriverError) -> StepError {
    if e.is_transient() {
        StepError::Transient(e.to_string())
    } else {
        StepError::Permanent(format!("server {server}: {e}"))
    }
}

pub(crate) fn core_err(e: CoreError) -> StepError {
    match e {
        CoreError::Db(e) => StepError::Db(e),
        other => StepError::Permanent(other.to_string()),
    }
}

/// The driver of a server, with its name for messages.
pub(crate) fn driver_of(
    core: &Core,
    server_id: i64,
) -> Result<(Arc<dyn Driver>, String), StepError> {
    core.fleet().named_driver(server_id).ok_or_else(|| {
        StepError::Permanent(format!("server #{server_id} has no driver in this core"))
    })
}
