//! `container.create_many`: one persisted command creates many containers of one type, with
//! the same guarantees as `container.create` and a fraction of its database round trips.
//!
//! The containers are inserted at submission, locked by the command. Step 0 decides a server
//! for each in the placement cache, claims the capacity with one conditional update per server
//! (falling back to one-by-one placement on a server that filled up meanwhile), and records a
//! dummy per container in one insert. Step 1 creates and starts every guest, then in one
//! transaction the containers take their dummies' places and get their server, address and
//! status. A container that fits nowhere, or that its server refuses, fails alone; the others go
//! on.
//!
//! Invariants: as for `container.create` — the reservation is durable before anything is made on
//! a server, step 1 repeats idempotently (guest ids), and a failing command gives back every
//! reservation it holds and marks its unfinished containers failed.

use std::collections::{BTreeMap, HashMap, HashSet};

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter, QueryOrder,
    Value as DbValue,
};
use serde_json::json;

use super::steps::CreateManyStep;
use super::{StepCtx, driver_of, guest_spec, make_guest, params};
use crate::entities::{command, container, dummy};
use crate::managers::guest_id_for;
use crate::model::{ContainerStatus, Resources, now_ms};
use crate::placement::{self, Holder, PlaceRequest, PlacementCache};
use crate::queue::{Next, StepError, Transition, UndoWrites};
use crate::services::Services;

/// Rows per multi-row statement.
const CHUNK: usize = crate::queue::store::GROUP_CHUNK;

/// Ids of the containers the command still has to create.
async fn creating(svc: &Services, cmd: i64) -> Result<Vec<i64>, DbErr> {
    use sea_orm::QuerySelect;
    container::Entity::find()
        .select_only()
        .column(container::Column::Id)
        .filter(container::Column::LockedBy.eq(cmd))
        .filter(container::Column::Status.eq(ContainerStatus::Creating.as_str()))
        .order_by_asc(container::Column::Id)
        .into_tuple()
        .all(svc.db())
        .await
}

/// The steps.
pub(crate) async fn create_many(ctx: &StepCtx<'_>) -> Result<Transition, StepError> {
    match CreateManyStep::of(ctx.cmd)? {
        CreateManyStep::Place => place_all(ctx).await,
        CreateManyStep::Make => make_all(ctx).await,
    }
}

async fn place_all(ctx: &StepCtx<'_>) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let cache = svc.placement();
    let rows = creating(svc, ctx.cmd.id).await?;
    let params: params::CreateMany = ctx.params()?;
    let fixed = params.server_id;
    let req = params.requirements;
    // The quota again, now that it runs: containers asked for before these come first.
    if let (Some(project), Some(first)) = (ctx.cmd.project_id, rows.iter().min()) {
        let more = crate::model::Usage::of(rows.len() as u64, &req.resources);
        crate::projects::check(svc.db(), project, &more, Some(*first))
            .await
            .map_err(super::core_err)?;
    }
    let image = super::image_of(svc, &params.type_id);
    let need = req.resources;
    // Decide in memory; the cache counts each decision so the next one sees it (the queue
    // settles the counts when this step's transaction ends).
    let holder = Holder::Command(ctx.cmd.id);
    let decisions = match fixed {
        Some(s) => {
            cache.hold(holder, s, &need.times(rows.len() as u64), rows.len() as i64);
            vec![Ok(s); rows.len()]
        }
        None => cache
            .decide_many_fresh(svc.db(), holder, &req, image.as_ref(), rows.len())
            .await
            .map_err(StepError::Db)?,
    };
    let mut per_server: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut failed: Vec<(i64, String)> = Vec::new();
    for (id, decided) in rows.into_iter().zip(decisions) {
        match decided {
            Ok(s) => per_server.entry(s).or_default().push(id),
            Err(reason) => failed.push((id, reason)),
        }
    }
    let deadline = svc.queue().now_ms() + svc.dummy_ttl_ms();
    let (cache, command) = (svc.placement_shared(), ctx.cmd.id);
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            let mut placed: Vec<(i64, i64)> = Vec::new();
            let mut dummies = Vec::new();
            let claims: Vec<(i64, Resources, i64)> = per_server
                .iter()
                .map(|(s, ids)| (*s, need.times(ids.len() as u64), ids.len() as i64))
                .collect();
            let held = placement::claim_many(txn, &claims).await?;
            for (server, ids) in per_server {
                if held.contains(&server) {
                    for id in ids {
                        dummies.push(placement::NewDummy {
                            server_id: server,
                            container_id: id,
                            command_id: command,
                            need,
                        });
                        placed.push((id, server));
                    }
                    continue;
                }
                // The server filled up meanwhile: place these one by one.
                cache.unhold(
                    holder,
                    server,
                    &need.times(ids.len() as u64),
                    ids.len() as i64,
                );
                cache.refresh_within(txn, server, Some(holder)).await?;
                for id in ids {
                    let request = PlaceRequest {
                        requirements: &req,
                        image: image.as_ref(),
                        container_id: id,
                        command_id: Some(command),
                        avoid: HashSet::new(),
                        server: fixed,
                        deadline,
                    };
                    match placement::place(txn, &cache, request).await {
                        Ok(r) => placed.push((id, r.server_id)),
                        Err(placement::PlacementError::NoFit(reason)) => failed.push((id, reason)),
                        Err(placement::PlacementError::Db(e)) => return Err(e.into()),
                    }
                }
            }
            placement::insert_dummies(txn, &dummies, deadline).await?;
            give_up(txn, &failed).await?;
            let progress = json!({ "placed": placed, "failed": failed });
            let step = CreateManyStep::Make.number();
            Ok(Next::Continue { step, progress })
        })
    }))
}

/// Marks containers failed, each with why, and unlocks them.
async fn give_up<C: ConnectionTrait>(conn: &C, failed: &[(i64, String)]) -> Result<(), DbErr> {
    let mut by_reason: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
    for (id, reason) in failed {
        by_reason.entry(reason.as_str()).or_default().push(*id);
    }
    for (reason, ids) in by_reason {
        for chunk in ids.chunks(CHUNK) {
            container::Entity::update_many()
                .col_expr(
                    container::Column::Status,
                    Expr::value(ContainerStatus::Failed.as_str()),
                )
                .col_expr(container::Column::StatusReason, Expr::value(reason))
                .col_expr(
                    container::Column::LockedBy,
                    Expr::value(DbValue::BigInt(None)),
                )
                .col_expr(container::Column::UpdatedAt, Expr::value(now_ms()))
                .filter(container::Column::Id.is_in(chunk.iter().copied()))
                .exec(conn)
                .await?;
        }
    }
    Ok(())
}

async fn make_all(ctx: &StepCtx<'_>) -> Result<Transition, StepError> {
    let svc = ctx.svc;
    let placed: Vec<(i64, i64)> = serde_json::from_value(ctx.progress["placed"].clone())
        .map_err(|_| StepError::Permanent("lost the placements of this command".into()))?;
    let mut failed: Vec<(i64, String)> = ctx.progress_field("failed")?;
    let params: params::CreateMany = ctx.params()?;
    let need = params.requirements.resources;
    let (type_id, start) = (params.type_id, params.start);
    let mut made: Vec<(i64, i64, Option<String>)> = Vec::new();
    let mut refused: Vec<i64> = Vec::new();
    // The containers are locked by this command: no other command changed them meanwhile.
    let mut avoided = super::Avoided::default();
    for (id, server) in placed {
        let (driver, name) = driver_of(svc, server)?;
        let spec = crate::driver::GuestSpec {
            avoid: avoided.of(svc, server).await?,
            ..guest_spec(
                svc,
                &guest_id_for(svc.platform_name(), id),
                &type_id,
                need,
                "{}",
                crate::secrets::SecretScope::Container(id),
            )
        };
        match make_guest(driver.as_ref(), &spec, None, start).await {
            Ok(info) => made.push((id, server, info.ip)),
            Err(e) if e.is_transient() => {
                return Err(StepError::Transient(format!("server {name}: {e}")));
            }
            Err(e) => {
                failed.push((id, format!("server {name}: {e}")));
                refused.push(id);
            }
        }
    }
    // An address another live container holds fails its container; its guest goes at once.
    let addresses: Vec<(i64, Option<&str>)> = made.iter().map(|m| (m.0, m.2.as_deref())).collect();
    let mut taken = super::taken_addresses(svc.db(), &addresses).await?;
    if !taken.is_empty() {
        let mut kept = Vec::with_capacity(made.len());
        for m in made {
            let Some(message) = taken.remove(&m.0) else {
                kept.push(m);
                continue;
            };
            let (driver, name) = driver_of(svc, m.1)?;
            let guest = guest_id_for(svc.platform_name(), m.0);
            if let Err(e) = driver.destroy(&guest).await {
                tracing::warn!(server = %name, %guest, error = %e, "could not destroy a guest whose address was taken; the collector will");
            }
            failed.push((m.0, message));
            refused.push(m.0);
        }
        made = kept;
    }
    // The made take their dummies' places, the refused give their reservations back.
    let dummies = placement::dummies_of(svc.db(), ctx.cmd.id).await?;
    let (cache, command) = (svc.placement_shared(), ctx.cmd.id);
    Ok(Transition::commit(move |txn| {
        Box::pin(async move {
            // In the common case every dummy is there and nothing was refused: one delete does
            // it all.
            if refused.is_empty() && dummies.len() == made.len() {
                let removed = placement::fill_dummies_of(txn, command).await?;
                if removed != made.len() as u64 {
                    return Err(StepError::Transient(
                        "a reservation of this command went while its containers were recorded"
                            .into(),
                    ));
                }
                return finish(txn, made, Vec::new(), refused, failed, start).await;
            }
            let lost = settle_slowly(txn, &cache, &dummies, &made, &refused, need).await?;
            finish(txn, made, lost, refused, failed, start).await
        })
    }))
}

/// The uncommon end of step 1: some dummies were collected (their deadline passed) or some
/// containers were refused by their server. Returns the made containers that lost their
/// capacity.
async fn settle_slowly(
    txn: &DatabaseTransaction,
    cache: &PlacementCache,
    dummies: &[dummy::Model],
    made: &[(i64, i64, Option<String>)],
    refused: &[i64],
    need: Resources,
) -> Result<Vec<i64>, DbErr> {
    let by_container: HashMap<i64, &dummy::Model> =
        dummies.iter().map(|d| (d.container_id, d)).collect();
    for id in refused {
        if let Some(d) = by_container.get(id) {
            placement::release(txn, d.server_id, &placement::dummy_resources(d), 1).await?;
            cache.apply(d.server_id, &placement::dummy_resources(d), 1, -1);
        }
    }
    let mut lost = Vec::new();
    for (id, server, _) in made {
        // A dummy the collector took (deadline passed): reserve again if it still fits.
        if !by_container.contains_key(id)
            && !placement::claim(txn, *server, &need, 1, false).await?
        {
            lost.push(*id);
        }
    }
    let ids: Vec<i64> = dummies.iter().map(|d| d.id).collect();
    placement::fill_dummies(txn, &ids).await?;
    Ok(lost)
}

/// Records the made containers and fails the others.
async fn finish(
    txn: &DatabaseTransaction,
    made: Vec<(i64, i64, Option<String>)>,
    lost: Vec<i64>,
    refused: Vec<i64>,
    mut failed: Vec<(i64, String)>,
    start: bool,
) -> Result<Next, StepError> {
    let status = if start {
        ContainerStatus::Running
    } else {
        ContainerStatus::Stopped
    };
    let ok: Vec<&(i64, i64, Option<String>)> =
        made.iter().filter(|m| !lost.contains(&m.0)).collect();
    for chunk in ok.chunks(CHUNK) {
        fill_many(txn, chunk, status, false).await?;
    }
    for id in &lost {
        failed.push((
            *id,
            "the capacity reserved expired and the server has no room any more".into(),
        ));
    }
    let given_up: Vec<(i64, String)> = failed
        .iter()
        .filter(|(id, _)| refused.contains(id) || lost.contains(id))
        .cloned()
        .collect();
    give_up(txn, &given_up).await?;
    let created = ok.len();
    let summary = shortfall(created, &failed);
    let result = json!({ "created": created, "failed": failed });
    Ok(match summary {
        None => Next::Done(result),
        Some(error) => Next::Partial { result, error },
    })
}

/// One line when a batch made fewer containers than asked: how many, and the most common
/// reason (ties go to the first seen), e.g. `placed 109 of 500: ... (391 containers)`.
fn shortfall(created: usize, failed: &[(i64, String)]) -> Option<String> {
    if failed.is_empty() {
        return None;
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (_, reason) in failed {
        match counts.iter_mut().find(|(r, _)| *r == reason.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((reason, 1)),
        }
    }
    let (reason, n) = counts
        .iter()
        .fold(counts[0], |best, c| if c.1 > best.1 { *c } else { best });
    let others = if n == failed.len() {
        String::new()
    } else {
        format!("; {} failed for other reasons", failed.len() - n)
    };
    let plural = if n == 1 { "" } else { "s" };
    Some(format!(
        "placed {created} of {}: {reason} ({n} container{plural}){others}; see the command's result for each",
        created + failed.len()
    ))
}

/// One statement: each container gets its server, address and status, and is unlocked.
/// Records made containers (id, server, address) with `status`, releasing their locks; returns
/// how many rows it changed. `guarded`: a container whose address another live container holds
/// is left unchanged (the caller compares the count and finds which, the slow way).
pub(super) async fn fill_many(
    txn: &DatabaseTransaction,
    made: &[&(i64, i64, Option<String>)],
    status: ContainerStatus,
    guarded: bool,
) -> Result<u64, DbErr> {
    let rows: Vec<_> = made
        .iter()
        .map(|(id, server, ip)| vec![(*id).into(), (*server).into(), ip.clone().into()])
        .collect();
    let (v, mut params) =
        crate::queue::store::rows_source(txn, &["BIGINT", "BIGINT", "TEXT"], rows, 3);
    params.insert(0, DbValue::String(Some(status.as_str().to_string())));
    params.insert(1, DbValue::BigInt(Some(now_ms())));
    let guard = if guarded {
        // Probe the index by address: SQLite's planner has no statistics to go on.
        let by_ip = if txn.get_database_backend() == sea_orm::DatabaseBackend::Sqlite {
            " INDEXED BY containers_by_ip"
        } else {
            ""
        };
        format!(
            " AND (v.column3 IS NULL OR NOT EXISTS (SELECT 1 FROM containers o{by_ip} \
             WHERE o.ip = v.column3 AND o.id <> v.column1 AND o.status NOT IN ('destroyed', 'failed')))"
        )
    } else {
        String::new()
    };
    let text = format!(
        "UPDATE containers SET server_id = v.column2, ip = v.column3, status = $1, locked_by = NULL, updated_at = $2 \
         FROM {v} WHERE containers.id = v.column1{guard}"
    );
    Ok(txn
        .execute_raw(crate::queue::store::sql(txn, &text, params))
        .await?
        .rows_affected())
}

/// A failing `container.create_many` gives back every reservation it holds and marks its
/// unfinished containers failed.
pub(crate) async fn compensate(
    svc: &Services,
    cmd: &command::Model,
) -> Result<Option<UndoWrites>, DbErr> {
    let dummies = placement::dummies_of(svc.db(), cmd.id).await?;
    let why = format!(
        "its batch create (command {}) failed before it was made: `cloud48 command show {}` says why",
        cmd.id, cmd.id
    );
    let unfinished: Vec<(i64, String)> = creating(svc, cmd.id)
        .await?
        .into_iter()
        .map(|id| (id, why.clone()))
        .collect();
    let cache = svc.placement_shared();
    Ok(Some(Box::new(move |txn| {
        Box::pin(async move {
            for d in &dummies {
                placement::drop_dummy(txn, d.id).await?;
            }
            give_up(txn, &unfinished).await?;
            for d in &dummies {
                cache.apply(d.server_id, &placement::dummy_resources(d), 1, -1);
            }
            Ok(())
        })
    })))
}

#[cfg(test)]
mod tests {
    use super::shortfall;

    #[test]
    fn a_full_batch_has_no_shortfall() {
        assert_eq!(shortfall(3, &[]), None);
    }

    #[test]
    fn the_shortfall_names_the_most_common_reason() {
        let failed = vec![
            (4, "disk".to_string()),
            (5, "cpu".to_string()),
            (6, "cpu".to_string()),
        ];
        assert_eq!(
            shortfall(3, &failed).unwrap(),
            "placed 3 of 6: cpu (2 containers); 1 failed for other reasons; see the command's result for each"
        );
        let failed = vec![(4, "cpu".to_string())];
        assert_eq!(
            shortfall(0, &failed).unwrap(),
            "placed 0 of 1: cpu (1 container); see the command's result for each"
        );
    }
}
