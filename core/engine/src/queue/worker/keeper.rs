//! The lease keeper: renews the leases of the commands this core runs and sweeps expired ones
//! back into the queue, on a thread of its own where it can.

use super::*;

/// Runs the lease keeper on a thread of its own, on a runtime of its own and a connection
/// opened with `opt`, so that its renewals keep time whatever this runtime's tasks do. It ends
/// with the queue (`stop`) or with the runtime that called this; if its thread or runtime
/// cannot be made, the keeper runs as a task here instead.
pub(super) fn keeper_apart(inner: Arc<Inner>, opt: sea_orm::ConnectOptions) {
    let here = tokio::runtime::Handle::current();
    let (alive, ended) = tokio::sync::oneshot::channel::<()>();
    // This task's end, when its runtime shuts down, ends the keeper.
    here.spawn(async move {
        let _alive = alive;
        std::future::pending::<()>().await
    });
    let fallback = here.clone();
    let keeper = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("cloud48-leases".into())
        .spawn(move || {
            let apart = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let apart = match apart {
                Ok(rt) => rt,
                Err(e) => return keep_beside(&fallback, &keeper, "make its runtime", &e),
            };
            apart.block_on(async move {
                // A lazy pool: no connection yet, so only bad options fail here.
                let db = match sea_orm::Database::connect(opt).await {
                    Ok(db) => db,
                    Err(e) => return keep_beside(&fallback, &keeper, "open its connection", &e),
                };
                tokio::select! {
                    _ = lease_keeper(keeper, db) => {}
                    _ = ended => {}
                }
            });
        });
    if let Err(e) = spawned {
        keep_beside(&here, &inner, "start its thread", &e);
    }
}

/// The lease keeper as a task of `here`, beside the commands, when it cannot `what` apart.
pub(super) fn keep_beside(
    here: &tokio::runtime::Handle,
    inner: &Arc<Inner>,
    what: &str,
    e: &dyn std::fmt::Display,
) {
    tracing::warn!(error = %e, "the lease keeper cannot {what}; renewing leases beside the commands");
    here.spawn(lease_keeper(inner.clone(), inner.db.clone()));
}

/// Every third of a lease: renews the leases of the commands this process executes, then
/// queues again every command whose lease ran out, on `db`.
pub(super) async fn lease_keeper(inner: Arc<Inner>, db: sea_orm::DatabaseConnection) {
    let _running = inner.keeper.lock().await;
    let mut halt = inner.halt.subscribe();
    let every = (inner.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = halt.wait_for(|halted| *halted) => return,
        }
        let now = inner.clock.now_ms();
        let until = now + inner.config.lease.as_millis() as i64;
        // A command claimed in the last half interval is left for the next tick, when it
        // still has at least half a lease (most commands end before it).
        let fresh = until - (every / 2).as_millis() as i64;
        let ids: Vec<i64> = inner
            .in_flight
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, claimed_until)| **claimed_until < fresh)
            .map(|(id, _)| *id)
            .collect();
        if let Err(e) = store::renew_leases(&db, &inner.node_id, &ids, until).await {
            tracing::warn!(error = %e, "renewing leases failed");
        }
        match store::sweep(&db, now).await {
            Ok(n) => {
                inner.sweeps.fetch_add(1, Ordering::Relaxed);
                if n > 0 {
                    inner.work.notify_one();
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeping the queue failed"),
        }
    }
}
