//! The rebalancer: when the memory utilisation of the fullest and the emptiest server that
//! take containers differs by more than the configured spread, migrates a bounded number of
//! containers off the fullest one (placement chooses where). Off by default.

use std::sync::Arc;

use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
};

use crate::core::CoreError;
use crate::entities::{command, container};
use crate::model::{CommandId, CommandStatus, ContainerStatus};
use crate::placement::PlacementCache;
use crate::queue::{NewCommand, Queue, Target};

/// Who the rebalancer's commands are requested by.
pub const REBALANCER: &str = "rebalancer";

/// Memory utilisation of a server in percent.
fn utilisation(c: &crate::placement::Candidate) -> u64 {
    (c.allocated.memory_mb * 100)
        .checked_div(c.capacity.memory_mb)
        .unwrap_or(0)
}

/// The rebalancer, with what it uses: the database and queue it submits migrations to,
/// placement's view of the servers, and its settings.
#[derive(Clone)]
pub struct Rebalancer {
    db: DatabaseConnection,
    queue: Queue,
    placement: Arc<PlacementCache>,
    /// Spread in percentage points above which it migrates; 0 turns it off.
    spread: u64,
    /// Most migrations in flight.
    batch: usize,
}

impl Rebalancer {
    /// A rebalancer over these parts (`spread` 0 turns it off).
    pub fn new(
        db: DatabaseConnection,
        queue: Queue,
        placement: Arc<PlacementCache>,
        spread: u64,
        batch: usize,
    ) -> Self {
        Rebalancer {
            db,
            queue,
            placement,
            spread,
            batch,
        }
    }

    /// One pass of the rebalancer; returns the migrations it submitted.
    pub async fn rebalance(&self) -> Result<Vec<CommandId>, CoreError> {
        if self.spread == 0 {
            return Ok(Vec::new());
        }
        let unfinished = command::Entity::find()
            .filter(command::Column::RequestedBy.eq(REBALANCER))
            .filter(
                command::Column::Status.is_in(
                    [
                        CommandStatus::Queued,
                        CommandStatus::Running,
                        CommandStatus::Waiting,
                    ]
                    .map(|s| s.as_str()),
                ),
            )
            .count(&self.db)
            .await?;
        if unfinished > 0 {
            return Ok(Vec::new());
        }
        let servers: Vec<_> = self
            .placement
            .snapshot()
            .into_iter()
            .filter(|c| c.up && !c.draining)
            .collect();
        let (Some(full), Some(empty)) = (
            servers.iter().max_by_key(|c| utilisation(c)),
            servers.iter().min_by_key(|c| utilisation(c)),
        ) else {
            return Ok(Vec::new());
        };
        if utilisation(full) - utilisation(empty) <= self.spread {
            return Ok(Vec::new());
        }
        let movable = container::Entity::find()
            .filter(container::Column::ServerId.eq(full.id))
            .filter(container::Column::Status.is_in([
                ContainerStatus::Running.as_str(),
                ContainerStatus::Stopped.as_str(),
            ]))
            .filter(container::Column::LockedBy.is_null())
            .order_by_asc(container::Column::Id)
            .all(&self.db)
            .await?;
        let commands: Vec<NewCommand> = movable
            .into_iter()
            .take(self.batch.max(1))
            .map(|c| NewCommand {
                project: None,
                kind: crate::model::CommandKind::ContainerMigrate,
                target: Some(Target::Container(c.id)),
                params: crate::commands::params::to_value(crate::commands::params::Migrate {
                    to: None,
                    live: false,
                    leave: Some(full.id),
                }),
                requested_by: REBALANCER.into(),
            })
            .collect();
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        tracing::info!(server = full.id, migrations = commands.len(), "rebalancing");
        let ids = self.queue.enqueue_in(&self.db, commands, None).await?;
        self.queue.wake();
        Ok(ids.into_iter().map(CommandId).collect())
    }
}
