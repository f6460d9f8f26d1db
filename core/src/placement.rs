//! Choosing a server for a new or moving container (the ContainerFactory's decision).
//!
//! For now: among servers that are up, carry every required label and have the required
//! resources free (capacity minus the requirements of their existing containers), pick the one
//! with the most free memory, ties by lowest id. When nothing fits, the error says which
//! requirement no server met.

use std::collections::HashMap;

use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder};

use crate::entities::{container, server};
use crate::model::{ContainerId, ContainerStatus, Requirements, Resources, ServerId};

/// Why no server fits.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// No server fits; the message names the unmet requirement.
    #[error("no server fits the container: {0}")]
    NoFit(String),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// A server with what its existing containers reserve.
pub struct ServerLoad {
    /// The server row.
    pub server: server::Model,
    /// Its total capacity.
    pub capacity: Resources,
    /// Resources reserved by its live containers.
    pub allocated: Resources,
    /// Number of its live containers.
    pub containers: u64,
}

impl ServerLoad {
    /// Capacity not reserved.
    pub fn free(&self) -> Resources {
        self.capacity.minus(&self.allocated)
    }
}

/// Every server (by id) with its load, not counting container `except`.
pub async fn server_loads<C: ConnectionTrait>(
    conn: &C,
    except: Option<ContainerId>,
) -> Result<Vec<ServerLoad>, DbErr> {
    let servers = server::Entity::find().order_by_asc(server::Column::Id).all(conn).await?;
    let live = container::Entity::find()
        .filter(container::Column::Status.is_not_in([
            ContainerStatus::Destroyed.as_str(),
            ContainerStatus::Failed.as_str(),
        ]))
        .filter(container::Column::ServerId.is_not_null())
        .all(conn)
        .await?;
    let mut used: HashMap<ServerId, (Resources, u64)> = HashMap::new();
    for c in live {
        if Some(c.id) == except {
            continue;
        }
        let req: Requirements = serde_json::from_str(&c.requirements).unwrap_or_default();
        let e = used.entry(c.server_id.expect("filtered")).or_default();
        e.0 = e.0.plus(&req.resources);
        e.1 += 1;
    }
    Ok(servers
        .into_iter()
        .map(|s| {
            let (allocated, containers) = used.get(&s.id).copied().unwrap_or_default();
            let capacity = Resources {
                cpu_millis: s.cpu_millis as u64,
                memory_mb: s.memory_mb as u64,
                disk_mb: s.disk_mb as u64,
            };
            ServerLoad { server: s, capacity, allocated, containers }
        })
        .collect())
}

/// Picks a server for `req`, excluding `avoid`.
pub async fn choose<C: ConnectionTrait>(
    conn: &C,
    req: &Requirements,
    except: Option<ContainerId>,
    avoid: Option<ServerId>,
) -> Result<ServerId, PlacementError> {
    let candidates: Vec<_> = server_loads(conn, except)
        .await?
        .into_iter()
        .map(|l| {
            let free = l.free();
            (l.server, free)
        })
        .collect();
    let up: Vec<_> = candidates
        .into_iter()
        .filter(|(s, _)| s.status == "up" && Some(s.id) != avoid)
        .collect();
    if up.is_empty() {
        return Err(PlacementError::NoFit("no other server is up".into()));
    }
    let labelled: Vec<_> = up
        .into_iter()
        .filter(|(s, _)| {
            let labels: Vec<String> = serde_json::from_str(&s.labels).unwrap_or_default();
            req.labels.iter().all(|l| labels.contains(l))
        })
        .collect();
    if labelled.is_empty() {
        return Err(PlacementError::NoFit(format!(
            "no server that is up carries the labels [{}]",
            req.labels.join(", ")
        )));
    }
    let r = &req.resources;
    for (figure, need, have) in [
        ("cpu_millis", r.cpu_millis, labelled.iter().map(|(_, f)| f.cpu_millis).max()),
        ("memory_mb", r.memory_mb, labelled.iter().map(|(_, f)| f.memory_mb).max()),
        ("disk_mb", r.disk_mb, labelled.iter().map(|(_, f)| f.disk_mb).max()),
    ] {
        let have = have.unwrap_or(0);
        if need > have {
            return Err(PlacementError::NoFit(format!(
                "{figure} {need} needed, at most {have} free on any eligible server"
            )));
        }
    }
    labelled
        .into_iter()
        .filter(|(_, free)| r.fits_in(free))
        .max_by(|(a, fa), (b, fb)| fa.memory_mb.cmp(&fb.memory_mb).then(b.id.cmp(&a.id)))
        .map(|(s, _)| s.id)
        .ok_or_else(|| {
            PlacementError::NoFit(format!(
                "no single server has {} cpu_millis, {} memory_mb and {} disk_mb free together",
                r.cpu_millis, r.memory_mb, r.disk_mb
            ))
        })
}
