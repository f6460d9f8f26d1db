//! The container collector: removes what must not exist any more.
//!
//! - dummies whose command finished or whose deadline passed (their capacity is given back);
//! - illegal containers (replaced while their server was down), once their server is up and
//!   no replacement in their environment is still running (until it ends, the retired member
//!   may become `down` again: no replacement could be made);
//! - guests a server still runs although the database says their container was destroyed or
//!   failed (a create or destroy that could not reach the server);
//! - events older than the retention window (`events.retention_secs`).
//!
//! Its pass over each server also notes containers held as running whose guest the server
//! reports stopped (their processes exited on their own): they become stopped, saying why.
//!
//! It runs when a server comes back, periodically, and at start-up.
//! Invariant: it never destroys a guest whose container the database holds as legal
//! (any status other than destroyed, failed or illegal).

use std::collections::HashMap;
use std::sync::Arc;

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait};

use crate::core::CoreError;
use crate::entities::{command, container};
use crate::fleet::Fleet;
use crate::model::{CommandStatus, ContainerStatus};
use crate::placement::{PlacementCache, drop_dummy, release, requirements_of};
use crate::queue::Clock;

/// How long the collector works on one server in one pass.
pub const SERVER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// What one collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CollectReport {
    /// Dummies removed.
    pub dummies: usize,
    /// Illegal containers destroyed.
    pub illegal: usize,
    /// Leftover guests of destroyed or failed containers destroyed.
    pub leftovers: usize,
    /// Events past the retention window forgotten.
    pub events: u64,
    /// Containers held as running whose guest their server reports stopped (its processes
    /// exited on their own), now stopped.
    pub exited: usize,
}

/// The collector, with what it uses: the database, the servers' drivers, placement's view of
/// the servers and the clock that dates dummies.
#[derive(Clone)]
pub struct Collector {
    db: DatabaseConnection,
    fleet: Arc<Fleet>,
    placement: Arc<PlacementCache>,
    clock: Arc<dyn Clock>,
    events_retention: std::time::Duration,
}

impl Collector {
    /// A collector over these parts.
    pub fn new(
        db: DatabaseConnection,
        fleet: Arc<Fleet>,
        placement: Arc<PlacementCache>,
        clock: Arc<dyn Clock>,
        events_retention: std::time::Duration,
    ) -> Self {
        Collector {
            events_retention,
            db,
            fleet,
            placement,
            clock,
        }
    }

    /// Collects on one server, or on every server that is up.
    pub async fn collect(&self, only: Option<i64>) -> Result<CollectReport, CoreError> {
        let mut report = CollectReport {
            dummies: self.collect_dummies(only).await?,
            ..Default::default()
        };
        let servers: Vec<i64> = self
            .placement
            .snapshot()
            .into_iter()
            .filter(|c| c.up && only.is_none_or(|o| o == c.id))
            .map(|c| c.id)
            .collect();
        // The illegal containers of every server in one statement (the partial index of
        // migration 18 holds only them): a pass costs the same with a million legal ones.
        // Not while a replacement of a member of its environment runs: a member retired for
        // one is illegal only until the replacement is made, and down again when none could
        // be (read in the same statement, so a replacement that ended since is seen whole).
        let mut illegal: HashMap<i64, Vec<container::Model>> = HashMap::new();
        let mut query = container::Entity::find()
            .filter(Expr::cust(format!(
                "status = '{}'",
                ContainerStatus::Illegal.as_str()
            )))
            .filter(Expr::cust(
                "NOT EXISTS (SELECT 1 FROM commands k WHERE k.kind = 'environment.replace' \
                 AND k.status IN ('queued', 'running', 'waiting') \
                 AND k.target_type = 'environment' \
                 AND k.target_id = containers.environment_id)",
            ));
        if let Some(o) = only {
            query = query.filter(container::Column::ServerId.eq(o));
        }
        for row in query.all(&self.db).await? {
            if let Some(server) = row.server_id {
                illegal.entry(server).or_default().push(row);
            }
        }
        // Every server at once, each within a deadline: one that does not answer delays
        // nobody (the next pass tries it again).
        let passes = servers.into_iter().map(|server_id| {
            let illegal = illegal.remove(&server_id).unwrap_or_default();
            async move {
                match tokio::time::timeout(SERVER_DEADLINE, self.collect_server(server_id, illegal))
                    .await
                {
                    Ok(done) => done,
                    Err(_) => {
                        tracing::warn!(
                            server = server_id,
                            "collector gave up on a server that did not answer within {} s",
                            SERVER_DEADLINE.as_secs()
                        );
                        Ok((0, 0, 0))
                    }
                }
            }
        });
        for done in futures::future::join_all(passes).await {
            let (illegal, leftovers, exited) = done?;
            report.illegal += illegal;
            report.leftovers += leftovers;
            report.exited += exited;
        }
        if only.is_none() {
            let before = self.clock.now_ms() - self.events_retention.as_millis() as i64;
            report.events = crate::events::forget(&self.db, before).await?;
        }
        if report != CollectReport::default() {
            tracing::info!(?report, "collector removed what must not exist");
        }
        Ok(report)
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    async fn collect_dummies(&self, only: Option<i64>) -> Result<usize, CoreError> {
        let now = self.clock.now_ms();
        let dummies = crate::placement::dummies(&self.db, only).await?;
        if dummies.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = dummies.iter().filter_map(|d| d.command_id).collect();
        let alive: HashMap<i64, bool> = command::Entity::find()
            .filter(command::Column::Id.is_in(ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|c| {
                (
                    c.id,
                    !c.status
                        .parse::<CommandStatus>()
                        .is_ok_and(|s| s.is_terminal()),
                )
            })
            .collect();
        let mut removed = 0;
        for d in dummies {
            let owner_alive = d
                .command_id
                .is_some_and(|c| alive.get(&c).copied().unwrap_or(false));
            if owner_alive && d.deadline > now {
                continue;
            }
            let txn = self.db.begin().await?;
            if drop_dummy(&txn, d.id).await? {
                removed += 1;
            }
            txn.commit().await?;
            self.placement
                .apply(d.server_id, &crate::placement::dummy_resources(&d), 1, -1);
        }
        Ok(removed)
    }

    /// Destroys the illegal containers (`rows`, read by the caller) and leftover guests of one
    /// server.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    async fn collect_server(
        &self,
        server_id: i64,
        rows: Vec<container::Model>,
    ) -> Result<(usize, usize, usize), CoreError> {
        let Some((driver, name)) = self.fleet.named_driver(server_id) else {
            return Ok((0, 0, 0));
        };
        let mut illegal = 0;
        for row in rows {
            if let Err(e) = driver.destroy(&row.guest_id).await {
                tracing::warn!(server = %name, guest = %row.guest_id, error = %e, "collector could not destroy an illegal container; will retry");
                continue;
            }
            let txn = self.db.begin().await?;
            let changed = container::Entity::update_many()
                .col_expr(
                    container::Column::Status,
                    Expr::val(ContainerStatus::Destroyed.as_str()),
                )
                .col_expr(
                    container::Column::UpdatedAt,
                    Expr::val(crate::model::now_ms()),
                )
                .filter(container::Column::Id.eq(row.id))
                .filter(container::Column::Status.eq(ContainerStatus::Illegal.as_str()))
                .exec(&txn)
                .await?
                .rows_affected;
            if changed == 1 {
                let need = requirements_of(&row).resources;
                release(&txn, server_id, &need, 1).await?;
                self.placement.apply(server_id, &need, 1, -1);
                illegal += 1;
            }
            txn.commit().await?;
        }
        // Taken before the list: a container written since (a command started it again)
        // is not judged on it.
        let listed_at = crate::model::now_ms();
        let guests = match driver.list().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(server = %name, error = %e, "collector could not list guests");
                return Ok((illegal, 0, 0));
            }
        };
        if guests.is_empty() {
            return Ok((illegal, 0, 0));
        }
        let stopped: Vec<String> = guests
            .iter()
            .filter(|g| g.state == crate::driver::GuestState::Stopped)
            .map(|g| g.guest_id.clone())
            .collect();
        let exited = self.note_exited(server_id, &stopped, listed_at).await?;
        if exited > 0 {
            tracing::warn!(server = %name, containers = exited, "containers whose processes exited on their own are now stopped");
        }
        let ids: Vec<String> = guests.iter().map(|g| g.guest_id.clone()).collect();
        let mut leftovers = 0;
        for chunk in ids.chunks(500) {
            let dead = container::Entity::find()
                .filter(container::Column::GuestId.is_in(chunk.to_vec()))
                .filter(container::Column::Status.is_in([
                    ContainerStatus::Destroyed.as_str(),
                    ContainerStatus::Failed.as_str(),
                ]))
                .all(&self.db)
                .await?;
            for row in dead {
                // A destroyed container that was re-created under the same guest id does not
                // exist: guest ids are unique per container.
                match driver.destroy(&row.guest_id).await {
                    Ok(()) => leftovers += 1,
                    Err(e) => {
                        tracing::warn!(server = %name, guest = %row.guest_id, error = %e, "collector could not destroy a leftover guest")
                    }
                }
            }
        }
        Ok((illegal, leftovers, exited))
    }

    /// Containers on `server_id` held as running whose guest (among `stopped`, as the server
    /// listed them at `listed_at`) is stopped: their processes exited on their own (a crash, an
    /// out-of-memory kill, a workload that ended). They become stopped, saying why, so that
    /// `start` works and lists and events tell the truth; not one a command holds, nor one
    /// written since the list (a start that ran meanwhile).
    async fn note_exited(
        &self,
        server_id: i64,
        stopped: &[String],
        listed_at: i64,
    ) -> Result<usize, CoreError> {
        let mut exited = 0;
        for chunk in stopped.chunks(500) {
            exited += container::Entity::update_many()
                .col_expr(
                    container::Column::Status,
                    Expr::val(ContainerStatus::Stopped.as_str()),
                )
                .col_expr(container::Column::StatusReason, Expr::val(EXITED))
                .col_expr(
                    container::Column::UpdatedAt,
                    Expr::val(crate::model::now_ms()),
                )
                .filter(container::Column::ServerId.eq(server_id))
                .filter(container::Column::GuestId.is_in(chunk.to_vec()))
                .filter(container::Column::Status.eq(ContainerStatus::Running.as_str()))
                .filter(container::Column::LockedBy.is_null())
                .filter(container::Column::UpdatedAt.lt(listed_at))
                .exec(&self.db)
                .await?
                .rows_affected as usize;
        }
        Ok(exited)
    }
}

/// Why a container the core held as running is stopped: its server reported its guest so.
pub const EXITED: &str = "its processes exited on their own (its server reported it stopped): \
                          `container logs` shows its last output, `container start` runs it again";
