//! The ledger of reservations: the servers' allocation counters and the dummies that hold
//! capacity for containers being placed, created, copied, moved or grown. Every statement that
//! reads or writes them lives here; commands, the collector and the managers call these
//! functions.

use std::collections::{HashMap, HashSet};

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, QueryFilter, QueryOrder, Set, Statement,
    TransactionTrait,
};

use super::{Holder, PlacementCache, PlacementError, allocated_of, resources};
use crate::entities::{container, dummy, server};
use crate::model::{ContainerStatus, ImageRef, Requirements, Resources, now_ms};

/// Reserves `r` (and `count` containers) on `server` if it still fits; with `placeable` the
/// server must also be up and not draining. True when reserved.
pub async fn claim<C: ConnectionTrait>(
    conn: &C,
    server_id: i64,
    r: &Resources,
    count: i64,
    placeable: bool,
) -> Result<bool, DbErr> {
    use sea_orm::sea_query::ExprTrait;
    use server::Column as S;
    let (cpu, mem, disk) = (r.cpu_millis as i64, r.memory_mb as i64, r.disk_mb as i64);
    let mut q = server::Entity::update_many()
        .col_expr(S::AllocCpuMillis, Expr::col(S::AllocCpuMillis).add(cpu))
        .col_expr(S::AllocMemoryMb, Expr::col(S::AllocMemoryMb).add(mem))
        .col_expr(S::AllocDiskMb, Expr::col(S::AllocDiskMb).add(disk))
        .col_expr(S::AllocContainers, Expr::col(S::AllocContainers).add(count))
        .filter(S::Id.eq(server_id))
        .filter(
            Expr::col(S::AllocCpuMillis)
                .add(cpu)
                .lte(Expr::col(S::CpuMillis)),
        )
        .filter(
            Expr::col(S::AllocMemoryMb)
                .add(mem)
                .lte(Expr::col(S::MemoryMb)),
        )
        .filter(
            Expr::col(S::AllocDiskMb)
                .add(disk)
                .lte(Expr::col(S::DiskMb)),
        )
        .filter(
            Expr::col(S::AddressSlots)
                .is_null()
                .or(Expr::col(S::AllocContainers)
                    .add(count)
                    .lte(Expr::col(S::AddressSlots))),
        );
    if placeable {
        q = q.filter(S::Status.eq("up")).filter(S::Draining.eq(false));
    }
    Ok(q.exec(conn).await?.rows_affected == 1)
}

/// `claim` for many servers with few statements; returns the servers whose claim held (the
/// others changed nothing).
#[expect(
    clippy::disallowed_methods,
    reason = "a savepoint inside the caller's transaction"
)]
pub async fn claim_many(
    txn: &DatabaseTransaction,
    claims: &[(i64, Resources, i64)],
) -> Result<HashSet<i64>, DbErr> {
    let mut held = HashSet::new();
    for chunk in claims.chunks(crate::queue::store::GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(server, r, count)| {
                [
                    *server,
                    r.cpu_millis as i64,
                    r.memory_mb as i64,
                    r.disk_mb as i64,
                    *count,
                ]
                .map(serde_json::Value::from)
                .to_vec()
            })
            .collect();
        let (v, params) = crate::queue::store::rows_source(txn, &["BIGINT"; 5], rows, 1);
        let text = format!(
            "UPDATE servers SET alloc_cpu_millis = alloc_cpu_millis + v.column2, alloc_memory_mb = alloc_memory_mb + v.column3, \
             alloc_disk_mb = alloc_disk_mb + v.column4, alloc_containers = alloc_containers + v.column5 \
             FROM {v} WHERE servers.id = v.column1 \
             AND servers.alloc_cpu_millis + v.column2 <= servers.cpu_millis \
             AND servers.alloc_memory_mb + v.column3 <= servers.memory_mb \
             AND servers.alloc_disk_mb + v.column4 <= servers.disk_mb \
             AND (servers.address_slots IS NULL OR servers.alloc_containers + v.column5 <= servers.address_slots) \
             AND servers.status || '' = 'up' AND servers.draining = false"
        );
        // Usually every claim holds; otherwise undo the chunk and claim server by server.
        let sp = txn.begin().await?;
        if sp
            .execute_raw(crate::queue::store::sql(&sp, &text, params))
            .await?
            .rows_affected()
            == chunk.len() as u64
        {
            sp.commit().await?;
            held.extend(chunk.iter().map(|c| c.0));
            continue;
        }
        sp.rollback().await?;
        for (server, r, count) in chunk {
            if claim(txn, *server, r, *count, true).await? {
                held.insert(*server);
            }
        }
    }
    Ok(held)
}

/// Gives back `r` (and `count` containers) on `server`.
pub async fn release<C: ConnectionTrait>(
    conn: &C,
    server_id: i64,
    r: &Resources,
    count: i64,
) -> Result<(), DbErr> {
    use sea_orm::sea_query::ExprTrait;
    use server::Column as S;
    let (cpu, mem, disk) = (r.cpu_millis as i64, r.memory_mb as i64, r.disk_mb as i64);
    server::Entity::update_many()
        .col_expr(S::AllocCpuMillis, Expr::col(S::AllocCpuMillis).sub(cpu))
        .col_expr(S::AllocMemoryMb, Expr::col(S::AllocMemoryMb).sub(mem))
        .col_expr(S::AllocDiskMb, Expr::col(S::AllocDiskMb).sub(disk))
        .col_expr(S::AllocContainers, Expr::col(S::AllocContainers).sub(count))
        .filter(S::Id.eq(server_id))
        .exec(conn)
        .await?;
    Ok(())
}

/// Reserves the growth `grow` of a container on its own server with a dummy (so the ledger's
/// invariant holds while the container is resized, and the collector gives the growth back if
/// the command dies); `None` when the server lacks room. The server may be draining or down:
/// the container is already there.
pub async fn reserve_growth(
    txn: &DatabaseTransaction,
    server_id: i64,
    container_id: i64,
    command_id: i64,
    grow: &Resources,
    deadline: i64,
) -> Result<Option<Reservation>, DbErr> {
    if !claim(txn, server_id, grow, 1, false).await? {
        return Ok(None);
    }
    let dummy_id = dummy_row(server_id, container_id, Some(command_id), grow, deadline)
        .insert(txn)
        .await?
        .id;
    Ok(Some(Reservation {
        server_id,
        dummy_id,
    }))
}

/// The container now has its new size: the growth dummy (if any) gives its reservation to the
/// container, and `shrink` is given back. When the dummy expired meanwhile, the growth is
/// claimed again; false when it no longer fits (nothing is changed then).
pub async fn settle_resize(
    txn: &DatabaseTransaction,
    server_id: i64,
    growth: Option<Reservation>,
    grow: &Resources,
    shrink: &Resources,
) -> Result<bool, DbErr> {
    if let Some(r) = growth {
        if dummy::Entity::delete_by_id(r.dummy_id)
            .exec(txn)
            .await?
            .rows_affected
            == 1
        {
            // The dummy counted as a container of the server; the container is counted already.
            release(txn, server_id, &Resources::default(), 1).await?;
        } else if !claim(txn, server_id, grow, 0, false).await? {
            return Ok(false);
        }
    }
    release(txn, server_id, shrink, 0).await?;
    Ok(true)
}

/// A reservation made by `place`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The chosen server.
    pub server_id: i64,
    /// The dummy holding the capacity.
    pub dummy_id: i64,
}

/// What to place.
pub struct PlaceRequest<'a> {
    /// The container's requirements.
    pub requirements: &'a Requirements,
    /// The image it runs (servers holding it are preferred).
    pub image: Option<&'a ImageRef>,
    /// The container the dummy stands for.
    pub container_id: i64,
    /// The command placing it. Its count in the view is held for that command, whose run
    /// settles it (`Runner::settled`): place within the command's step, or settle it yourself.
    pub command_id: Option<i64>,
    /// Servers it must not go to (its current server, spread).
    pub avoid: HashSet<i64>,
    /// A server the user named instead of letting placement choose.
    pub server: Option<i64>,
    /// Deadline of the dummy, milliseconds since the Unix epoch.
    pub deadline: i64,
}

/// Chooses a server and reserves capacity there with a dummy, inside `txn` (the caller
/// commits it with its step). When a claim loses a race (the server filled up meanwhile),
/// refreshes that server and tries the next best.
pub async fn place(
    txn: &DatabaseTransaction,
    cache: &PlacementCache,
    req: PlaceRequest<'_>,
) -> Result<Reservation, PlacementError> {
    let need = req.requirements.resources;
    let mut avoid = req.avoid.clone();
    // Its claims so far are in `txn`: a read through it has them already.
    let holder = req.command_id.map(Holder::Command);
    // Other cores may have changed servers since this core's view was read: on a shared
    // database, a decision that finds no server is made once more on a fresh view.
    let mut fresh = txn.get_database_backend() != sea_orm::DatabaseBackend::Postgres;
    if req.server.is_none() {
        cache.follow_others(txn, holder).await?;
    }
    for _ in 0..32 {
        let server_id = match req.server {
            Some(s) => s,
            None => match cache.decide(req.requirements, req.image, &avoid) {
                Ok(s) => s,
                Err(_) if !fresh => {
                    fresh = true;
                    cache.refresh_all_within(txn, holder).await?;
                    continue;
                }
                Err(reason) => return Err(PlacementError::NoFit(reason)),
            },
        };
        // A failed conditional update changes nothing, so no savepoint is needed.
        if claim(txn, server_id, &need, 1, true).await? {
            let dummy_id = insert_dummy(txn, server_id, &req, &need).await?;
            match holder {
                Some(h) => cache.hold(h, server_id, &need, 1),
                None => cache.apply(server_id, &need, 1, 1),
            }
            return Ok(Reservation {
                server_id,
                dummy_id,
            });
        }
        cache.refresh_within(txn, server_id, holder).await?;
        if req.server.is_some() {
            let row = server::Entity::find_by_id(server_id).one(txn).await?;
            let Some(row) = row else {
                return Err(PlacementError::NoFit(format!(
                    "the requested server #{server_id} does not exist"
                )));
            };
            let why = super::lacks(&super::Candidate::from_row(&row), &need);
            return Err(PlacementError::NoFit(format!(
                "the requested server {} cannot take it: {why}",
                row.name
            )));
        }
        avoid.insert(server_id);
    }
    Err(PlacementError::NoFit(
        "every fitting server filled up while placing; try again".into(),
    ))
}

async fn insert_dummy(
    txn: &DatabaseTransaction,
    server_id: i64,
    req: &PlaceRequest<'_>,
    need: &Resources,
) -> Result<i64, DbErr> {
    Ok(dummy_row(
        server_id,
        req.container_id,
        req.command_id,
        need,
        req.deadline,
    )
    .insert(txn)
    .await?
    .id)
}

/// A dummy reserving `need` on `server_id` for `container_id` until `deadline`.
pub fn dummy_row(
    server_id: i64,
    container_id: i64,
    command_id: Option<i64>,
    need: &Resources,
    deadline: i64,
) -> dummy::ActiveModel {
    dummy::ActiveModel {
        server_id: Set(server_id),
        container_id: Set(container_id),
        command_id: Set(command_id),
        cpu_millis: Set(need.cpu_millis as i64),
        memory_mb: Set(need.memory_mb as i64),
        disk_mb: Set(need.disk_mb as i64),
        deadline: Set(deadline),
        created_at: Set(now_ms()),
        ..Default::default()
    }
}

/// The real container takes the place of its dummy: the dummy goes, its reservation stays. If
/// the collector already removed the dummy (deadline passed), reserves again; false when the
/// container no longer fits.
pub async fn fill<C: ConnectionTrait>(
    conn: &C,
    r: Reservation,
    need: &Resources,
) -> Result<bool, DbErr> {
    let deleted = dummy::Entity::delete_by_id(r.dummy_id)
        .exec(conn)
        .await?
        .rows_affected;
    if deleted == 1 {
        return Ok(true);
    }
    claim(conn, r.server_id, need, 1, false).await
}

/// Removes a dummy and gives back what it reserved; false if it was already gone.
pub async fn drop_dummy<C: ConnectionTrait>(conn: &C, dummy_id: i64) -> Result<bool, DbErr> {
    let Some(d) = dummy::Entity::find_by_id(dummy_id).one(conn).await? else {
        return Ok(false);
    };
    if dummy::Entity::delete_by_id(d.id)
        .exec(conn)
        .await?
        .rows_affected
        == 0
    {
        return Ok(false);
    }
    release(conn, d.server_id, &dummy_resources(&d), 1).await?;
    Ok(true)
}

/// What a dummy reserves.
pub fn dummy_resources(d: &dummy::Model) -> Resources {
    resources(d.cpu_millis, d.memory_mb, d.disk_mb)
}

/// Requirements of a container row.
pub fn requirements_of(row: &container::Model) -> Requirements {
    serde_json::from_str(&row.requirements).unwrap_or_default()
}

/// What the counters of every server should be, recomputed from containers and dummies by
/// one aggregate in the database (a million containers never enter the core's memory).
async fn recompute<C: ConnectionTrait>(conn: &C) -> Result<HashMap<i64, (Resources, u64)>, DbErr> {
    let backend = conn.get_database_backend();
    let field = |f: &str| match backend {
        DatabaseBackend::Postgres => {
            format!("COALESCE((requirements::jsonb ->> '{f}')::bigint, 0)")
        }
        _ => format!("COALESCE(json_extract(requirements, '$.{f}'), 0)"),
    };
    let sql = format!(
        "SELECT server_id, CAST(SUM(cpu) AS BIGINT) AS cpu, CAST(SUM(memory) AS BIGINT) AS memory, \
         CAST(SUM(disk) AS BIGINT) AS disk, COUNT(*) AS n FROM ( \
         SELECT server_id, {} AS cpu, {} AS memory, {} AS disk FROM containers \
         WHERE server_id IS NOT NULL AND status NOT IN ('{}', '{}') \
         UNION ALL SELECT server_id, cpu_millis, memory_mb, disk_mb FROM dummies) AS used \
         GROUP BY server_id",
        field("cpu_millis"),
        field("memory_mb"),
        field("disk_mb"),
        ContainerStatus::Destroyed.as_str(),
        ContainerStatus::Failed.as_str(),
    );
    let rows = conn
        .query_all_raw(Statement::from_string(backend, sql))
        .await?;
    rows.iter()
        .map(|r| {
            let n = |c: &str| r.try_get::<i64>("", c);
            Ok((
                n("server_id")?,
                (
                    resources(n("cpu")?, n("memory")?, n("disk")?),
                    n("n")?.max(0) as u64,
                ),
            ))
        })
        .collect()
}

/// Servers whose counters differ from their containers and dummies, as messages (empty when
/// the ledger is consistent).
pub async fn audit<C: ConnectionTrait>(conn: &C) -> Result<Vec<String>, DbErr> {
    let used = recompute(conn).await?;
    let mut out = Vec::new();
    for s in server::Entity::find()
        .order_by_asc(server::Column::Id)
        .all(conn)
        .await?
    {
        let (want, count) = used.get(&s.id).copied().unwrap_or_default();
        let have = allocated_of(&s);
        if have != want || s.alloc_containers != count as i64 || s.alloc_cpu_millis < 0 {
            out.push(format!(
                "server {}: counters {have:?} x{} but containers and dummies reserve {want:?} x{count}",
                s.name, s.alloc_containers
            ));
        }
    }
    Ok(out)
}

/// Recomputes every server's counters (at start-up, before commands run). Returns how many
/// servers were corrected.
#[expect(
    clippy::disallowed_methods,
    reason = "database work only: every driver or plugin call happens before it"
)]
pub async fn reconcile(db: &DatabaseConnection) -> Result<usize, DbErr> {
    let txn = db.begin().await?;
    let used = recompute(&txn).await?;
    let mut fixed = 0;
    for s in server::Entity::find().all(&txn).await? {
        let (want, count) = used.get(&s.id).copied().unwrap_or_default();
        if allocated_of(&s) == want && s.alloc_containers == count as i64 && s.alloc_cpu_millis >= 0
        {
            continue;
        }
        let mut am: server::ActiveModel = s.into();
        am.alloc_cpu_millis = Set(want.cpu_millis as i64);
        am.alloc_memory_mb = Set(want.memory_mb as i64);
        am.alloc_disk_mb = Set(want.disk_mb as i64);
        am.alloc_containers = Set(count as i64);
        am.update(&txn).await?;
        fixed += 1;
    }
    txn.commit().await?;
    Ok(fixed)
}

/// A dummy to insert: capacity `need` held on `server_id` for `container_id` by `command_id`.
#[derive(Debug, Clone, Copy)]
pub struct NewDummy {
    /// The server.
    pub server_id: i64,
    /// The container it stands for.
    pub container_id: i64,
    /// The command that placed it.
    pub command_id: i64,
    /// What it holds.
    pub need: Resources,
}

/// Inserts dummies for capacity already claimed (`claim_many`), with few statements; returns
/// their ids in order.
pub async fn insert_dummies(
    txn: &DatabaseTransaction,
    dummies: &[NewDummy],
    deadline: i64,
) -> Result<Vec<i64>, DbErr> {
    use crate::queue::store::{GROUP_CHUNK, insert_ids, rows_source};
    let mut ids = Vec::with_capacity(dummies.len());
    let now = now_ms();
    for chunk in dummies.chunks(GROUP_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|d| {
                [
                    d.server_id,
                    d.container_id,
                    d.command_id,
                    d.need.cpu_millis as i64,
                    d.need.memory_mb as i64,
                    d.need.disk_mb as i64,
                    deadline,
                    now,
                ]
                .map(serde_json::Value::from)
                .to_vec()
            })
            .collect();
        let (v, params) = rows_source(txn, &["BIGINT"; 8], rows, 1);
        let text = format!(
            "INSERT INTO dummies (server_id, container_id, command_id, cpu_millis, memory_mb, disk_mb, deadline, created_at) \
             SELECT * FROM {v}"
        );
        ids.extend(insert_ids(txn, text, params, chunk.len()).await?);
    }
    Ok(ids)
}

/// The containers take the places of these dummies: the dummies go, their reservations stay
/// (now held by the containers). Returns how many were still there; fewer than asked means the
/// collector took some (deadline passed), and the caller settles those one by one.
pub async fn fill_dummies(txn: &DatabaseTransaction, dummy_ids: &[i64]) -> Result<u64, DbErr> {
    use crate::queue::store::{GROUP_CHUNK, ids_in, sql};
    let mut deleted = 0;
    for chunk in dummy_ids.chunks(GROUP_CHUNK) {
        let (ids, values) = ids_in(txn, "id", chunk.iter().copied(), 1);
        deleted += txn
            .execute_raw(sql(
                txn,
                &format!("DELETE FROM dummies WHERE {ids}"),
                values,
            ))
            .await?
            .rows_affected();
    }
    Ok(deleted)
}

/// `fill_dummies` for every dummy placed by `command_id`.
pub async fn fill_dummies_of(txn: &DatabaseTransaction, command_id: i64) -> Result<u64, DbErr> {
    Ok(dummy::Entity::delete_many()
        .filter(dummy::Column::CommandId.eq(command_id))
        .exec(txn)
        .await?
        .rows_affected)
}

/// One dummy, if it still exists.
pub async fn dummy<C: ConnectionTrait>(
    conn: &C,
    dummy_id: i64,
) -> Result<Option<dummy::Model>, DbErr> {
    dummy::Entity::find_by_id(dummy_id).one(conn).await
}

/// The dummies placed by `command_id`.
pub async fn dummies_of<C: ConnectionTrait>(
    conn: &C,
    command_id: i64,
) -> Result<Vec<dummy::Model>, DbErr> {
    dummy::Entity::find()
        .filter(dummy::Column::CommandId.eq(command_id))
        .all(conn)
        .await
}

/// Every dummy, or those of one server.
pub async fn dummies<C: ConnectionTrait>(
    conn: &C,
    server: Option<i64>,
) -> Result<Vec<dummy::Model>, DbErr> {
    let mut q = dummy::Entity::find();
    if let Some(s) = server {
        q = q.filter(dummy::Column::ServerId.eq(s));
    }
    q.all(conn).await
}

/// How many dummies each server holds.
pub async fn dummy_counts<C: ConnectionTrait>(conn: &C) -> Result<HashMap<i64, i64>, DbErr> {
    use sea_orm::QuerySelect;
    Ok(dummy::Entity::find()
        .select_only()
        .column(dummy::Column::ServerId)
        .column_as(dummy::Column::Id.count(), "n")
        .group_by(dummy::Column::ServerId)
        .into_tuple::<(i64, i64)>()
        .all(conn)
        .await?
        .into_iter()
        .collect())
}

/// Which of `containers` a dummy holds capacity for.
pub async fn reserved_for<C: ConnectionTrait>(
    conn: &C,
    containers: &[i64],
) -> Result<HashSet<i64>, DbErr> {
    let mut held = HashSet::new();
    for chunk in containers.chunks(500) {
        let rows = dummy::Entity::find()
            .filter(dummy::Column::ContainerId.is_in(chunk.iter().copied()))
            .all(conn)
            .await?;
        held.extend(rows.into_iter().map(|d| d.container_id));
    }
    Ok(held)
}
