//! Removing a server gone for good: its name and subnet are free again, and no core keeps it.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, TransactionTrait, sea_query::Expr,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Agents;
use crate::core::CoreError;
use crate::entities::{container, server};
use crate::fleet::RemoteFactory;
use crate::model::ContainerStatus;

/// What `server remove` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemovedServer {
    /// The server removed.
    pub server: String,
    /// Its id (containers that ran there keep it in their history).
    pub id: i64,
    /// Containers destroyed while it was down (`illegal`, waiting for it to come back so that
    /// their guests could be removed): destroyed now, their guests gone with the server.
    pub destroyed: Vec<i64>,
}

/// How many container ids a refusal names before it says how many more there are.
const NAMED: usize = 10;

impl Agents {
    /// Removes server `key` (name or id), run by an agent that is gone for good: the row, its
    /// heartbeats, and what every core holds of it (this one at once, the others when they next
    /// read the servers). Refused while its agent beats, while containers other than destroyed
    /// ones are on it, and while placements reserve room there. Its name and subnet are free
    /// again; an agent starting under its name later registers a new server, and the guests
    /// it still holds are leftovers the collector destroys.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: nothing is asked of the server, which is gone"
    )]
    pub async fn remove(&self, key: &str) -> Result<RemovedServer, CoreError> {
        // One registration or removal at a time (here, and across cores on PostgreSQL): an
        // agent registering meanwhile either comes first (then the server is up and stays)
        // or after (then it is a new server).
        let _one = self.registering.write().await;
        let txn = self.db.begin().await?;
        if self.db.get_database_backend() == DatabaseBackend::Postgres {
            super::lock_registrations(&txn, "try the removal again").await?;
        }
        let row = server::Entity::find()
            .filter(server::Column::Name.eq(key))
            .one(&txn)
            .await?;
        let row = match (row, key.parse::<i64>()) {
            (Some(row), _) => Some(row),
            (None, Ok(id)) => server::Entity::find_by_id(id).one(&txn).await?,
            (None, Err(_)) => None,
        }
        .ok_or_else(|| {
            CoreError::NotFound(format!(
                "server '{key}' does not exist (see `cloud48 server list`)"
            ))
        })?;
        let name = row.name.clone();
        if row.driver != RemoteFactory::KIND {
            return Err(CoreError::Conflict(format!(
                "server {name} is simulated (driver '{}'): the core makes its simulated servers \
                 from --sim-servers at every start, so it would come back; `cloud48 server fail \
                 {name}` rehearses losing it",
                row.driver
            )));
        }
        let grace = self.grace.as_millis() as i64;
        // Its last beat as this core knows it, or as another core shared it (its agent may
        // beat to another core; the monitor's verdict can be a check old).
        let shared = crate::cluster::beat_age(&txn, row.id).await?;
        let age = [self.health.age(row.id), shared]
            .into_iter()
            .flatten()
            .min()
            .filter(|age| *age <= grace);
        if row.status != "down" || age.is_some() {
            let beat = age.map_or(String::new(), |a| format!(" (its agent beat {a} ms ago)"));
            return Err(CoreError::Conflict(format!(
                "server {name} is up{beat}: only a server whose agent is gone can be removed. \
                 Move its containers away (`cloud48 server drain {name}`), stop its agent, and \
                 remove it once the monitor marks it down ({grace} ms after its last heartbeat)"
            )));
        }
        let rows = container::Entity::find()
            .filter(container::Column::ServerId.eq(row.id))
            .order_by_asc(container::Column::Id)
            .all(&txn)
            .await?;
        let mut held = Vec::new();
        let mut illegal = Vec::new();
        for c in rows {
            match crate::managers::parse_status(c.id, &c.status)? {
                status if status.is_gone() => {}
                ContainerStatus::Illegal => illegal.push(c.id),
                status => held.push(format!("{} ({status})", c.id)),
            }
        }
        if !held.is_empty() {
            let more = held.len().saturating_sub(NAMED);
            held.truncate(NAMED);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            return Err(CoreError::Conflict(format!(
                "server {name} still has containers: {}{more}. Destroy each (`cloud48 container \
                 destroy ID`; a container down with its server is given up at once), or, in an \
                 environment, let its failover replace it; then remove the server",
                held.join(", ")
            )));
        }
        let placing = crate::entities::dummy::Entity::find()
            .filter(crate::entities::dummy::Column::ServerId.eq(row.id))
            .count(&txn)
            .await?;
        if placing > 0 {
            return Err(CoreError::Conflict(format!(
                "{placing} placement(s) under way reserve room on server {name} (creates or \
                 migrations to it); try again once their commands have ended"
            )));
        }
        // The status first, so that the event stream says the server went (its trigger
        // records the change), then the row.
        let changed = server::Entity::update_many()
            .col_expr(server::Column::Status, Expr::val("removed"))
            .filter(server::Column::Id.eq(row.id))
            .filter(server::Column::Status.eq("down"))
            .exec(&txn)
            .await?
            .rows_affected;
        if changed == 0 {
            return Err(CoreError::Conflict(format!(
                "server {name} came back meanwhile: it is up and stays"
            )));
        }
        container::Entity::update_many()
            .col_expr(
                container::Column::Status,
                Expr::val(ContainerStatus::Destroyed.as_str()),
            )
            .col_expr(
                container::Column::UpdatedAt,
                Expr::val(crate::model::now_ms()),
            )
            .filter(container::Column::Id.is_in(illegal.clone()))
            .filter(container::Column::Status.eq(ContainerStatus::Illegal.as_str()))
            .exec(&txn)
            .await?;
        server::Entity::delete_by_id(row.id).exec(&txn).await?;
        // Other cores' heartbeats of it (PostgreSQL; the table is empty on SQLite).
        txn.execute_unprepared(&format!(
            "DELETE FROM server_beats WHERE server_id = {}",
            row.id
        ))
        .await?;
        txn.commit().await?;
        self.forget(row.id);
        // Removed whatever follows: if placement's view cannot be read again now, it keeps the
        // server, down and so never chosen, until it is next read whole.
        if let Err(e) = self.placement.refresh_all(&self.db).await {
            tracing::warn!(server = %name, error = %e, "placement's view not read again after a removal");
        }
        tracing::warn!(server = %name, id = row.id, destroyed = illegal.len(), "server removed");
        Ok(RemovedServer {
            server: name,
            id: row.id,
            destroyed: illegal,
        })
    }

    /// Forgets server `id` here: its driver, its heartbeats, the agent accepted for it.
    pub(crate) fn forget(&self, id: i64) {
        self.fleet.detach(id);
        self.health.forget(id);
        self.accepted.lock().unwrap().remove(&id);
    }
}
