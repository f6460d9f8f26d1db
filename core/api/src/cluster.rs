//! `GET /v1/cluster`: the cores sharing this database and the duties each holds.

use axum::Json;
use axum::extract::State;
use cloud48_engine::Core;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ApiError, ErrorBody};

/// A core of the cluster.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterCore {
    /// Its node id (in its data directory's `node-id`).
    pub node: String,
    /// The URL agents reach it at (`cluster.advertise_url`), if it has one.
    pub url: Option<String>,
    /// Milliseconds since it last wrote to the database (by the database's clock).
    pub silent_ms: i64,
    /// False once it has been silent for longer than the grace period (`health.grace_ms`; a
    /// running core writes every heartbeat period): it has most likely stopped, and its duties
    /// pass to another core when their leases run out. It leaves this list after a minute.
    #[serde(default = "running_by_default")]
    pub running: bool,
    /// Whether it is the core answering this request.
    pub this: bool,
}

/// What a core of an older release, which does not say, is taken for.
fn running_by_default() -> bool {
    true
}

/// A duty and the core holding it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DutyHolder {
    /// `monitor` (marking servers down and up) or `collector` (collector and rebalancer).
    pub duty: String,
    /// The node id of the core whose lease on it has not expired.
    pub core: String,
}

/// The cores sharing this database, and who holds each duty.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    /// Cores that wrote within the last minute, most recently seen first (on SQLite: this one).
    pub cores: Vec<ClusterCore>,
    /// Duties whose lease has not expired (a duty missing here is being taken over).
    pub duties: Vec<DutyHolder>,
}

#[utoipa::path(get, path = "/v1/cluster", tag = "servers",
    responses((status = 200, body = Cluster), (status = 401, body = ErrorBody)))]
pub(crate) async fn show_cluster(State(core): State<Core>) -> Result<Json<Cluster>, ApiError> {
    let cluster = core.cluster();
    let me = cluster.node().to_string();
    let grace = core.config().health.grace.as_millis() as i64;
    let cores = cluster
        .cores(std::time::Duration::from_secs(60))
        .await
        .map_err(cloud48_engine::core::CoreError::from)?
        .into_iter()
        .map(|c| ClusterCore {
            this: c.node == me,
            node: c.node,
            url: c.url,
            silent_ms: c.silent_ms,
            running: c.silent_ms <= grace,
        })
        .collect();
    let duties = cluster
        .holders()
        .await
        .map_err(cloud48_engine::core::CoreError::from)?
        .into_iter()
        .map(|(duty, core)| DutyHolder { duty, core })
        .collect();
    Ok(Json(Cluster { cores, duties }))
}
