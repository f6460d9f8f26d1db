//! Group steps of `container.create`: many independently submitted create commands, claimed
//! together by the queue, run each step as one group with a few multi-row statements (see
//! `queue::Runner::step_group`).
//!
//! Step 0 decides a server for each container in the placement cache (one heap per set of
//! equal requirements), claims capacity with one conditional update per server and inserts a
//! dummy per container; the commands are carried on to step 1 without a write (`GroupNext::
//! Carry`): the dummy, which names its command, records the placement, and a command that runs
//! step 0 again finds it (alone, through `container::create`). Step 1 creates and starts the
//! guests concurrently and commits them in waves, as they finish: the dummies go, the
//! containers get server, address and status, and the commands succeed. Commands placed by
//! step 0 go on to step 1 in the same call, with the containers step 0 read.
//!
//! Invariants: each command's writes are those of `container::create`'s same step (step 0
//! leaves the command's step unwritten), so a command can continue alone at any point. Only the common case is grouped; a command with
//! an image, a source to clone, spread or servers to avoid, a project with a quota, a decision that finds no server, a
//! claim that loses a race, a driver error or an expired dummy is left uncommitted, and the
//! queue runs it alone through `container::create`, which knows how to wait, retry, fail and
//! compensate.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use sea_orm::DbErr;
use serde_json::{Value, json};

use super::batch::fill_many;
use super::container::Recorded;
use super::{driver_err, driver_of, guest_spec, make_guest, params};
use crate::entities::command;
use crate::managers::parse_status;
use crate::model::{ContainerStatus, Requirements, Resources};
use crate::placement::{self, Reservation, Settling};
use crate::queue::store::{GROUP_CHUNK as CHUNK, ids_in, json_rows};
use crate::queue::{GroupCommit, GroupNext, GroupSink, GroupWrite, GroupWrites, StepError};
use crate::services::Services;

/// The key under which create commands at `cmd`'s step run together, if they may.
pub(super) fn key(cmd: &command::Model) -> Option<String> {
    (cmd.kind == "container.create" && (cmd.step == 0 || cmd.step == 1))
        .then(|| format!("container.create@{}", cmd.step))
}

/// Runs the current step (all share it) of a group of create commands.
pub(super) async fn step(
    svc: &Services,
    cmds: &[command::Model],
    sink: &mut dyn GroupSink,
) -> Result<(), StepError> {
    match cmds.first().map(|c| c.step) {
        Some(0) => place(svc, cmds, sink).await,
        Some(1) => make(svc, cmds, sink).await,
        _ => Ok(()),
    }
}

/// What the group reads of a container (one row of `load`'s statement, its columns in this
/// order).
#[derive(serde::Deserialize)]
struct Row {
    id: i64,
    status: String,
    guest_id: String,
    type_id: String,
    /// Requirements as stored (text).
    requirements: String,
    environment_id: Option<i64>,
    /// Parameters as stored (JSON).
    params: String,
    project_id: i64,
    /// 1 when the command holding the container's lock holds a dummy for it: it placed the
    /// container in an earlier run whose step 0 carried its progress without writing it.
    reserved: u8,
}

impl Row {
    fn requirements(&self) -> Requirements {
        serde_json::from_str(&self.requirements).unwrap_or_default()
    }
}

/// A command of the group that the group can run: its container is being created from
/// nothing, with no placement constraint beyond its requirements (and a server it named).
struct Plain<'a> {
    index: usize,
    row: &'a Row,
    params: params::Create,
}

/// The parameters of a create; `None` when they do not read (the command then runs alone and
/// fails with the reason).
fn params_of(cmd: &command::Model) -> Option<params::Create> {
    let value: Value = serde_json::from_str(&cmd.params).ok()?;
    params::read(cmd, &value).ok()
}

/// The commands of the group that the group can run, with their containers (`rows`).
fn plain<'a>(cmds: &[command::Model], rows: &'a HashMap<i64, Row>) -> Vec<Plain<'a>> {
    cmds.iter()
        .enumerate()
        .filter_map(|(index, cmd)| {
            let params = params_of(cmd).filter(params::Create::is_plain)?;
            let row = rows.get(&cmd.target_id?)?;
            (parse_status(row.id, &row.status).ok()? == ContainerStatus::Creating)
                .then_some(Plain { index, row, params })
        })
        .collect()
}

/// The containers of the group's commands, by id: only the columns the group needs, in one
/// row per chunk. A container is read with whether its lock's holder (the group's command)
/// has a dummy for it.
async fn load(svc: &Services, cmds: &[command::Model]) -> Result<HashMap<i64, Row>, DbErr> {
    let ids: Vec<i64> = cmds.iter().filter_map(|c| c.target_id).collect();
    let mut rows = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let (ids, values) = ids_in(svc.db(), "id", chunk.iter().copied(), 1);
        let from = format!("containers WHERE {ids}");
        let found: Vec<Row> = json_rows(
            svc.db(),
            "id, status, guest_id, type_id, requirements, environment_id, params, project_id, \
             CASE WHEN EXISTS (SELECT 1 FROM dummies d WHERE d.command_id = containers.locked_by \
             AND d.container_id = containers.id) THEN 1 ELSE 0 END",
            &from,
            values,
        )
        .await?;
        rows.extend(found.into_iter().map(|r| (r.id, r)));
    }
    Ok(rows)
}

/// A decision of step 0: command index, container, server, need.
type Decided = (usize, i64, i64, Resources);

/// What step 0's writes kept, with the dummy of each container.
type Placed = (Vec<Decided>, HashMap<i64, i64>);

/// Step 0: decide, claim and reserve with dummies.
async fn place(
    svc: &Services,
    cmds: &[command::Model],
    sink: &mut dyn GroupSink,
) -> Result<(), StepError> {
    let rows = load(svc, cmds).await?;
    // A project with a quota checks it command by command (`container::create`).
    let limited = crate::projects::limited(svc.db())
        .await
        .map_err(super::core_err)?;
    let cache = svc.placement();
    // What the decisions count is given back when the step ends, unless committed: whatever
    // fails below needs to give nothing back itself.
    let hold = Settling::new(svc.placement_shared(), cache.group_holder());
    let holder = hold.holder();
    // Equal requirements, named server and type (its image) share one decision heap.
    // Those that named a server come first, so the others' decisions see what they take.
    let mut by_need: BTreeMap<(bool, Option<i64>, String, String), Vec<Plain<'_>>> =
        BTreeMap::new();
    // Whether each command starts its container, read once from its parameters.
    let mut starts: HashMap<usize, bool> = HashMap::new();
    for p in plain(cmds, &rows) {
        starts.insert(p.index, p.params.start);
        let req = p.row.requirements();
        // One placed by an earlier run goes on alone from its dummy.
        if req.spread && p.row.environment_id.is_some()
            || limited.contains(&p.row.project_id)
            || p.row.reserved != 0
        {
            continue;
        }
        let fixed = p.params.server_id;
        by_need
            .entry((
                fixed.is_none(),
                fixed,
                p.row.requirements.clone(),
                p.row.type_id.clone(),
            ))
            .or_default()
            .push(p);
    }
    // Counted in the cache.
    let mut decided: Vec<Decided> = Vec::new();
    for ((_, fixed, _, type_id), members) in by_need {
        let req = members[0].row.requirements();
        let image = super::image_of(svc, &type_id);
        let need = req.resources;
        let n = members.len();
        let decisions = match fixed {
            Some(s) => {
                cache.hold(holder, s, &need.times(n as u64), n as i64);
                vec![Ok(s); n]
            }
            None => cache
                .decide_many_fresh(svc.db(), holder, &req, image.as_ref(), n)
                .await
                .map_err(StepError::Db)?,
        };
        for (p, d) in members.into_iter().zip(decisions) {
            // No server fits: it fails alone, with the reason.
            if let Ok(server) = d {
                decided.push((p.index, p.row.id, server, need));
            }
        }
    }
    if decided.is_empty() {
        return Ok(());
    }
    let deadline = svc.queue().now_ms() + svc.dummy_ttl_ms();
    let mut per_server: BTreeMap<i64, (Resources, i64)> = BTreeMap::new();
    for (_, _, server, need) in &decided {
        let e = per_server.entry(*server).or_default();
        e.0 = e.0.plus(need);
        e.1 += 1;
    }
    let claims: Vec<(i64, Resources, i64)> =
        per_server.iter().map(|(s, (r, n))| (*s, *r, *n)).collect();
    let commands: HashMap<usize, i64> = decided.iter().map(|d| (d.0, cmds[d.0].id)).collect();
    // What the writes kept (and the dummies they made), for step 1 after the commit.
    let slot: Arc<Mutex<Option<Placed>>> = Arc::default();
    let (shared, kept_slot) = (svc.placement_shared(), slot.clone());
    let writes: GroupWrites = Box::new(move |txn| {
        Box::pin(async move {
            let held = placement::claim_many(txn, &claims).await?;
            // A server that filled up meanwhile: its containers are placed alone.
            let (kept, lost): (Vec<_>, Vec<_>) =
                decided.into_iter().partition(|d| held.contains(&d.2));
            for (_, _, server, need) in &lost {
                shared.unhold(holder, *server, need, 1);
            }
            for server in lost.iter().map(|d| d.2).collect::<BTreeSet<_>>() {
                shared.refresh_within(txn, server, Some(holder)).await?;
            }
            let new: Vec<placement::NewDummy> = kept
                .iter()
                .map(|(i, container, server, need)| placement::NewDummy {
                    server_id: *server,
                    container_id: *container,
                    command_id: commands[i],
                    need: *need,
                })
                .collect();
            let ids = placement::insert_dummies(txn, &new, deadline).await?;
            let dummies: HashMap<i64, i64> = kept.iter().map(|d| d.1).zip(ids).collect();
            let decisions = kept
                .iter()
                .map(|(i, container, server, _)| {
                    let progress = json!({ "server_id": server, "dummy_id": dummies[container] });
                    // The dummy records the placement: a run of step 0 again finds it.
                    (*i, GroupNext::Carry { step: 1, progress })
                })
                .collect();
            *kept_slot.lock().expect("not poisoned") = Some((kept, dummies));
            Ok(GroupWrite::Commit(decisions))
        })
    });
    let outcome = sink.commit(writes).await;
    let Some((kept, dummies)) = slot.lock().expect("not poisoned").take() else {
        // The writes failed: nothing of them was committed.
        return outcome.map(|_| ());
    };
    match outcome {
        Ok(GroupCommit::Committed) => cache.settle(holder, true),
        // Nothing of it was committed.
        other => return other.map(|_| ()),
    }
    let placed = kept
        .iter()
        .map(|(i, container, server, _)| {
            let r = Reservation {
                server_id: *server,
                dummy_id: dummies[container],
            };
            (*i, &rows[container], r, starts[i])
        })
        .collect();
    make_placed(svc, placed, sink).await
}

/// Step 1: create and start the guests, committing them in waves as they finish.
async fn make(
    svc: &Services,
    cmds: &[command::Model],
    sink: &mut dyn GroupSink,
) -> Result<(), StepError> {
    let rows = load(svc, cmds).await?;
    let placed = plain(cmds, &rows)
        .into_iter()
        .filter_map(|p| {
            Some((
                p.index,
                p.row,
                Recorded::of(&cmds[p.index]).reservation()?,
                p.params.start,
            ))
        })
        .collect();
    make_placed(svc, placed, sink).await
}

/// Step 1 for the commands at these indexes, with their containers, reservations and whether
/// they start them.
async fn make_placed(
    svc: &Services,
    placed: Vec<(usize, &Row, Reservation, bool)>,
    sink: &mut dyn GroupSink,
) -> Result<(), StepError> {
    let mut pending = FuturesUnordered::new();
    let mut avoided = super::Avoided::default();
    for (index, row, r, start) in placed {
        let Ok((driver, server)) = driver_of(svc, r.server_id) else {
            continue;
        };
        let spec = crate::driver::GuestSpec {
            avoid: avoided.of(svc, r.server_id).await?,
            ..guest_spec(
                svc,
                &row.guest_id,
                &row.type_id,
                row.requirements().resources,
                &row.params,
                crate::secrets::SecretScope::of(row.environment_id, row.id),
            )
        };
        let id = row.id;
        pending.push(async move {
            let made = make_guest(driver.as_ref(), &spec, None, start)
                .await
                .map(|info| info.ip);
            (index, id, r, start, server, made)
        });
    }
    while let Some(first) = pending.next().await {
        let mut wave = vec![first];
        while let Some(Some(more)) = pending.next().now_or_never() {
            wave.push(more);
        }
        // A transient driver error is retried alone; a permanent one fails its command, and so
        // does an address another live container holds (compensation destroys the guest).
        let mut made = Vec::with_capacity(wave.len());
        for (i, id, r, start, server, outcome) in wave {
            match outcome {
                Ok(ip) => made.push((i, id, r, start, ip)),
                Err(e) if e.is_transient() => {}
                Err(e) => sink.fail(i, driver_err(&server, e).to_string()),
            }
        }
        // Two of the wave given one address: the later fails.
        let addresses: Vec<(i64, Option<&str>)> =
            made.iter().map(|m| (m.1, m.4.as_deref())).collect();
        let (mut taken, _) = super::clashes_within(&addresses);
        refuse(&mut made, &mut taken, sink);
        while !made.is_empty() {
            let batch = made.clone();
            let writes: GroupWrites = Box::new(move |txn| {
                Box::pin(async move {
                    let ids: Vec<i64> = batch.iter().map(|m| m.2.dummy_id).collect();
                    if placement::fill_dummies(txn, &ids).await? != batch.len() as u64 {
                        // Some dummy expired and was collected.
                        return Ok(GroupWrite::Rollback);
                    }
                    let mut filled = 0;
                    for start in [true, false] {
                        let rows: Vec<(i64, i64, Option<String>)> = batch
                            .iter()
                            .filter(|m| m.3 == start)
                            .map(|m| (m.1, m.2.server_id, m.4.clone()))
                            .collect();
                        let status = if start {
                            ContainerStatus::Running
                        } else {
                            ContainerStatus::Stopped
                        };
                        for chunk in rows.chunks(CHUNK) {
                            let chunk: Vec<_> = chunk.iter().collect();
                            filled += fill_many(txn, &chunk, status, true).await?;
                        }
                    }
                    if filled != batch.len() as u64 {
                        return Ok(GroupWrite::Rollback);
                    }
                    // The fill released each container with its command's success.
                    let decisions = batch
                        .iter()
                        .map(|m| {
                            let result = json!({ "container_id": m.1 });
                            (
                                m.0,
                                GroupNext::Done {
                                    result,
                                    released: true,
                                },
                            )
                        })
                        .collect();
                    Ok(GroupWrite::Commit(decisions))
                })
            });
            if sink.commit(writes).await? != GroupCommit::RolledBack {
                break;
            }
            // An address another live container holds was caught by the guarded fill: those
            // fail, and the wave is committed without them. Otherwise a dummy expired or a
            // container changed: each runs alone.
            let addresses: Vec<(i64, Option<&str>)> =
                made.iter().map(|m| (m.1, m.4.as_deref())).collect();
            let mut taken = super::taken_addresses(svc.db(), &addresses).await?;
            if taken.is_empty() {
                break;
            }
            refuse(&mut made, &mut taken, sink);
        }
    }
    Ok(())
}

/// Fails the commands of `made` whose container is in `taken`, with its message.
fn refuse<T, U, V>(
    made: &mut Vec<(usize, i64, T, U, V)>,
    taken: &mut HashMap<i64, String>,
    sink: &mut dyn GroupSink,
) {
    made.retain(|m| match taken.remove(&m.1) {
        Some(message) => {
            sink.fail(m.0, message);
            false
        }
        None => true,
    });
}
