//! Group commit of single container creates. Concurrent `container create` requests are
//! written together: one transaction of a few statements (`managers::insert_creates`: the
//! containers and their commands, each row written once on PostgreSQL) for every request waiting when the
//! previous write ended, instead of one such transaction each. Under light load a request is
//! written alone, at once; under heavy load the requests that arrive during one write share the
//! next, so the database connection (SQLite has one, which the dispatcher also needs) is held
//! a few times per second instead of thousands.
//!
//! The writes run on the submitter's own task: a client that goes away while its request
//! waits does not cancel the others' write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sea_orm::{DatabaseConnection, DbErr, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use crate::entities::container;
use crate::model::{CommandId, CommandKind};
use crate::queue::{NewCommand, Queue, Target};

/// Most requests written in one transaction.
const MAX_GROUP: usize = 500;

/// A container create waiting to be written.
struct Pending {
    row: container::ActiveModel,
    server_id: Option<i64>,
    requested_by: String,
    reply: oneshot::Sender<Result<(CommandId, i64), DbErr>>,
}

/// Writes single container creates, grouping those submitted at the same time.
#[derive(Clone)]
pub(crate) struct CreateSubmitter {
    tx: mpsc::UnboundedSender<Pending>,
    stats: Arc<Stats>,
}

/// What the submitter has written since it started.
#[derive(Default)]
struct Stats {
    creates: AtomicU64,
    transactions: AtomicU64,
}

impl CreateSubmitter {
    /// A submitter writing through `db` and `queue`; its task ends when the last clone is
    /// dropped. Must be called inside a tokio runtime.
    pub(crate) fn start(db: DatabaseConnection, queue: Queue, platform: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(rx, db, queue, platform, stats.clone()));
        CreateSubmitter { tx, stats }
    }

    /// (creates, transactions) committed so far.
    pub(crate) fn written(&self) -> (u64, u64) {
        (
            self.stats.creates.load(Ordering::Relaxed),
            self.stats.transactions.load(Ordering::Relaxed),
        )
    }

    /// Persists a new container (`row`, in status `creating`) and its `container.create`
    /// command; returns (command, container) once committed.
    pub(crate) async fn submit(
        &self,
        row: container::ActiveModel,
        server_id: Option<i64>,
        requested_by: &str,
    ) -> Result<(CommandId, i64), DbErr> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            row,
            server_id,
            requested_by: requested_by.to_string(),
            reply,
        };
        let stopped = || DbErr::Custom("the core is stopping; submit the request again".into());
        self.tx.send(pending).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    db: DatabaseConnection,
    queue: Queue,
    platform: String,
    stats: Arc<Stats>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let (rows, waiting): (Vec<_>, Vec<_>) = group
            .drain(..)
            .map(|p| ((p.row, (p.server_id, p.requested_by)), p.reply))
            .unzip();
        match write(&db, &queue, &platform, rows).await {
            Ok(ids) => {
                queue.wake();
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats.creates.fetch_add(ids.len() as u64, Ordering::Relaxed);
                for (reply, ids) in waiting.into_iter().zip(ids) {
                    let _ = reply.send(Ok(ids));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in waiting {
                    let _ = reply.send(Err(DbErr::Custom(message.clone())));
                }
            }
        }
    }
}

/// Writes the containers and their creates in one transaction; returns (command, container)
/// per row, in order.
#[expect(
    clippy::disallowed_methods,
    reason = "database work only: every driver or plugin call happens before it"
)]
async fn write(
    db: &DatabaseConnection,
    queue: &Queue,
    platform: &str,
    rows: Vec<(container::ActiveModel, (Option<i64>, String))>,
) -> Result<Vec<(CommandId, i64)>, DbErr> {
    let (containers, commands): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    let txn = db.begin().await?;
    let pairs = crate::managers::insert_creates(
        &txn,
        queue,
        platform,
        containers,
        |i, id| {
            let (server_id, requested_by) = &commands[i];
            NewCommand {
                project: None,
                kind: CommandKind::ContainerCreate,
                target: Some(Target::Container(id)),
                params: crate::commands::params::to_value(crate::commands::params::Create::on(
                    *server_id,
                )),
                requested_by: requested_by.clone(),
            }
        },
        false,
    )
    .await?;
    txn.commit().await?;
    Ok(pairs
        .into_iter()
        .map(|(container, command)| (CommandId(command), container))
        .collect())
}
