//! The queue on PostgreSQL: several cores sharing it (wake-ups, each command run once, leases
//! taken over), planner statistics, rows written again on their page, the lease constraint.

use super::*;

/// A scratch PostgreSQL database with the schema, for several queues to share.
pub(super) async fn shared_postgres() -> Option<(PgDb, sea_orm::DatabaseConnection)> {
    let pg = PgDb::create().await?;
    let db = pg.connect().await;
    Some((pg, db))
}

/// `shared_postgres` with a queue of core `core-a` over it (not started).
pub(super) async fn shared_postgres_queue() -> Option<(PgDb, sea_orm::DatabaseConnection, Queue)> {
    let (pg, db) = shared_postgres().await?;
    let queue = Queue::new(
        db.clone(),
        "core-a".into(),
        QueueConfig::default(),
        Arc::new(SystemClock),
    );
    Some((pg, db, queue))
}

/// A runner that records which core ran each command.
pub(super) struct Recorder {
    node: String,
    seen: Arc<Mutex<HashMap<i64, Vec<String>>>>,
}

#[async_trait::async_trait]
impl Runner for Recorder {
    async fn step(&self, cmd: &command::Model) -> Result<Transition, StepError> {
        self.seen
            .lock()
            .unwrap()
            .entry(cmd.id)
            .or_default()
            .push(self.node.clone());
        tokio::task::yield_now().await;
        Ok(Transition::bare(Next::Done(Value::Null)))
    }
}

/// On PostgreSQL a command submitted through one core wakes the others (`LISTEN/NOTIFY`): a
/// core whose only poll is an hour away still runs it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn a_submission_through_one_core_wakes_another_on_postgres() {
    let Some((pg, db)) = shared_postgres().await else {
        return;
    };
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let config = QueueConfig {
        poll: Duration::from_secs(3600),
        ..QueueConfig::default()
    };
    let submitter = Queue::new(
        db.clone(),
        "core-a".into(),
        config.clone(),
        Arc::new(SystemClock),
    );
    let runner = Queue::new(db, "core-b".into(), config, Arc::new(SystemClock));
    runner
        .start(
            Arc::new(Recorder {
                node: "core-b".into(),
                seen: seen.clone(),
            }),
            false,
        )
        .await
        .unwrap();
    let (woken, listening) = (runner.clone(), tokio::sync::mpsc::unbounded_channel::<()>());
    let (ready, mut is_ready) = listening;
    let listener = tokio::spawn(cloud48_engine::cluster::listen_for_work(
        pg.url.clone(),
        move |_| {
            let _ = ready.send(());
            woken.wake()
        },
    ));
    // The listener wakes its core once when it starts listening.
    is_ready.recv().await.unwrap();
    let id = submitter.enqueue(crate::common::noop()).await.unwrap();
    let c = runner.wait(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(c.status, CommandStatus::Succeeded);
    assert_eq!(seen.lock().unwrap()[&id.0], ["core-b"]);
    listener.abort();
    runner.stop(Duration::from_secs(1)).await;
}

/// A core's claims do not queue for a connection behind its running commands' statements
/// (after a takeover, 10,000 resumed commands did, and claiming them all took 7 s): with the
/// only connection of its commands' pool held, a core that claims apart still claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn a_core_claims_while_its_commands_hold_every_connection_on_postgres() {
    use sea_orm::{EntityTrait, TransactionTrait};
    let Some((pg, db)) = shared_postgres().await else {
        return;
    };
    let mut one = sea_orm::ConnectOptions::new(pg.url.clone());
    one.max_connections(1);
    let pool = sea_orm::Database::connect(one).await.unwrap();
    let config = QueueConfig {
        poll: Duration::from_millis(20),
        ..QueueConfig::default()
    };
    let submitter = Queue::new(
        db.clone(),
        "core-b".into(),
        config.clone(),
        Arc::new(SystemClock),
    );
    let runner = Queue::new(pool.clone(), "core-a".into(), config, Arc::new(SystemClock));
    runner.connect_apart(sea_orm::ConnectOptions::new(pg.url.clone()));
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let recorder = Recorder {
        node: "core-a".into(),
        seen: seen.clone(),
    };
    runner.start(Arc::new(recorder), false).await.unwrap();
    let held = pool.begin().await.unwrap();
    let id = submitter.enqueue(crate::common::noop()).await.unwrap();
    let running = crate::common::eventually("the command claimed by core-a", || async {
        let c = command::Entity::find_by_id(id.0).one(&db).await.unwrap()?;
        (c.status == "running").then_some(c)
    })
    .await;
    assert_eq!(running.lease_owner.as_deref(), Some("core-a"));
    // Its step's commit waits for the connection; given back, the command ends.
    held.rollback().await.unwrap();
    let c = submitter.wait(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(c.status, CommandStatus::Succeeded);
    assert_eq!(seen.lock().unwrap()[&id.0], ["core-a"]);
    runner.stop(Duration::from_secs(1)).await;
}

/// A core whose own connections cannot be opened (the database refuses one more) still claims,
/// on its commands' pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn a_core_whose_claims_connection_is_refused_claims_on_its_pool_on_postgres() {
    let Some((_pg, _db, queue)) = shared_postgres_queue().await else {
        return;
    };
    // Nothing listens on port 1: each claim there fails at once.
    let mut refused = sea_orm::ConnectOptions::new("postgres://postgres@127.0.0.1:1/none");
    refused.max_connections(1).connect_lazy(true);
    queue.connect_apart(refused);
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let recorder = Recorder {
        node: "core-a".into(),
        seen: seen.clone(),
    };
    queue.start(Arc::new(recorder), false).await.unwrap();
    let id = queue.enqueue(crate::common::noop()).await.unwrap();
    let c = queue.wait(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(c.status, CommandStatus::Succeeded);
    assert_eq!(seen.lock().unwrap()[&id.0], ["core-a"]);
    queue.stop(Duration::from_secs(1)).await;
}

/// Each work `NOTIFY` names the core whose connection inserted the commands (its
/// `application_name`), in the order of the inserts, so that a core can pass over its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn a_wake_up_names_the_core_that_inserted_on_postgres() {
    let Some((pg, _db)) = shared_postgres().await else {
        return;
    };
    let (told, mut heard) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    let listener = tokio::spawn(cloud48_engine::cluster::listen_for_work(
        pg.url.clone(),
        move |by| {
            let _ = told.send(by.map(str::to_string));
        },
    ));
    assert_eq!(
        heard.recv().await.unwrap(),
        None,
        "a wake-up once listening"
    );
    let sep = if pg.url.contains('?') { '&' } else { '?' };
    for node in ["core-a", "core-b", "core-a"] {
        let db = sea_orm::Database::connect(format!("{}{sep}application_name={node}", pg.url))
            .await
            .unwrap();
        let queue = Queue::new(
            db.clone(),
            node.into(),
            QueueConfig::default(),
            Arc::new(SystemClock),
        );
        queue
            .enqueue_in(&db, vec![crate::common::noop(); 2], None)
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(heard.recv().await.unwrap());
    }
    assert_eq!(
        names,
        ["core-a", "core-b", "core-a"].map(|n| Some(n.to_string()))
    );
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn several_cores_share_one_postgres_queue_and_run_each_command_once() {
    let Some((_pg, db)) = shared_postgres().await else {
        return;
    };
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let queue_config = QueueConfig {
        workers: 16,
        claim_batch: 8,
        poll: Duration::from_millis(5),
        ..QueueConfig::default()
    };
    let mut queues = Vec::new();
    for node in ["core-a", "core-b", "core-c"] {
        let q = Queue::new(
            db.clone(),
            node.into(),
            queue_config.clone(),
            Arc::new(SystemClock),
        );
        q.start(
            Arc::new(Recorder {
                node: node.into(),
                seen: seen.clone(),
            }),
            false,
        )
        .await
        .unwrap();
        queues.push(q);
    }
    let mut ids = Vec::new();
    for i in 0..600 {
        let q = &queues[i % 3];
        ids.push(q.enqueue(crate::common::noop()).await.unwrap());
    }
    for id in &ids {
        let c = queues[0].wait(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(c.status, CommandStatus::Succeeded);
    }
    let seen = seen.lock().unwrap();
    for id in &ids {
        assert_eq!(
            seen[&id.0].len(),
            1,
            "command {id} ran {} times: {:?}",
            seen[&id.0].len(),
            seen[&id.0]
        );
    }
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for runs in seen.values() {
        *per_node.entry(runs[0].as_str()).or_default() += 1;
    }
    assert!(per_node.len() >= 2, "the work was shared: {per_node:?}");
}

/// A runner whose steps never finish: a core that hangs or died mid-command.
pub(super) struct Hang;

#[async_trait::async_trait]
impl Runner for Hang {
    async fn step(&self, _: &command::Model) -> Result<Transition, StepError> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn commands_of_a_core_that_stops_renewing_its_lease_move_to_another_core() {
    let Some((_pg, db)) = shared_postgres().await else {
        return;
    };
    let queue_config = QueueConfig {
        lease: Duration::from_millis(300),
        poll: Duration::from_millis(10),
        ..QueueConfig::default()
    };
    let dead = Queue::new(
        db.clone(),
        "core-dead".into(),
        queue_config.clone(),
        Arc::new(SystemClock),
    );
    dead.start(Arc::new(Hang), false).await.unwrap();
    let id = dead.enqueue(crate::common::noop()).await.unwrap();
    while dead.get(id).await.unwrap().status != CommandStatus::Running {
        tokio::task::yield_now().await;
    }
    // The core stops renewing (as if it died); its lease runs out and another core takes over.
    dead.stop(Duration::ZERO).await;
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let alive = Queue::new(
        db.clone(),
        "core-alive".into(),
        queue_config,
        Arc::new(SystemClock),
    );
    alive
        .start(
            Arc::new(Recorder {
                node: "core-alive".into(),
                seen: seen.clone(),
            }),
            false,
        )
        .await
        .unwrap();
    let done = alive.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded);
    assert_eq!(seen.lock().unwrap()[&id.0], vec!["core-alive".to_string()]);
}

/// A runner whose steps wait for a permit, counting how many started.
pub(super) struct Gated {
    started: Arc<std::sync::atomic::AtomicUsize>,
    entered: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Runner for Gated {
    async fn step(&self, _: &command::Model) -> Result<Transition, StepError> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.entered.notify_one();
        let _pass = self.gate.acquire().await.unwrap();
        Ok(Transition::bare(Next::Done(Value::Null)))
    }
}

/// A core whose lease renewal came too late (a saturated machine) sees its command put back by
/// a sweep and claims it again while its own task still runs it: it leaves the command to that
/// task, which finishes it; the step ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn a_core_that_claims_a_command_it_is_still_running_leaves_it_to_that_task() {
    use sea_orm::ConnectionTrait;
    let scratch = crate::common::ScratchDb::create(false).await.unwrap();
    let db = scratch.db.clone();
    let queue = Queue::new(
        db.clone(),
        "core-late".into(),
        QueueConfig {
            poll: Duration::from_millis(10),
            ..QueueConfig::default()
        },
        Arc::new(SystemClock),
    );
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    queue
        .start(
            Arc::new(Gated {
                started: started.clone(),
                entered: entered.clone(),
                gate: gate.clone(),
            }),
            false,
        )
        .await
        .unwrap();
    let id = queue.enqueue(crate::common::noop()).await.unwrap();
    entered.notified().await;
    // What another core's sweep does to a lease that ran out.
    db.execute_unprepared(&format!(
        "UPDATE commands SET status = 'queued', lease_owner = NULL, lease_until = NULL WHERE id = {}",
        id.0
    ))
    .await
    .unwrap();
    queue.wake();
    tokio::time::timeout(Duration::from_secs(30), queue.kept_in_flight_reaches(1))
        .await
        .expect("the core claims the command again and leaves it to the task running it");
    gate.add_permits(1);
    let done = queue.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded);
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);
    queue.stop(Duration::ZERO).await;
}

/// A queue that grows from empty faster than autovacuum looks (once a minute) gets its planner
/// statistics from the core: once `commands` changed by more rows than it held, `refresh`
/// analyzes it (and then not again until it changes as much once more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn planner_statistics_follow_a_growing_queue_on_postgres() {
    use sea_orm::ConnectionTrait;
    let Some((_pg, db, queue)) = shared_postgres_queue().await else {
        return;
    };
    let analyzed = || async {
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COALESCE(analyze_count, 0) AS n FROM pg_stat_user_tables WHERE relname = 'commands'",
        ))
        .await
        .unwrap()
        .map(|r| r.try_get::<i64>("", "n").unwrap())
        .unwrap_or(0)
    };
    let analyzes_commands = || async {
        cloud48_engine::statistics::refresh(&db)
            .await
            .unwrap()
            .contains(&"commands".to_string())
    };
    assert!(
        !analyzes_commands().await,
        "an unchanged table is not analyzed"
    );
    let before = analyzed().await;
    queue
        .enqueue_in(
            &db,
            (0..3000).map(|_| crate::common::noop()).collect(),
            None,
        )
        .await
        .unwrap();
    // The server counts the inserts once the inserting backend reports them (within a second).
    crate::common::eventually("commands is analyzed after growing from empty", || async {
        analyzes_commands().await.then_some(())
    })
    .await;
    assert_eq!(analyzed().await, before + 1);
    assert!(
        !analyzes_commands().await,
        "analyzed tables are not analyzed again until they change as much once more"
    );
}

/// On PostgreSQL `commands` keeps room on its pages (`m0024_room_for_updates`): the progress
/// of twenty commands of one page, written again, stays on that page, as heap-only updates that
/// touch no index; on full pages most of the new versions would move (measured: 12 of 21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn commands_written_again_stay_on_their_page_on_postgres() {
    use sea_orm::ConnectionTrait;
    let Some((_pg, db, queue)) = shared_postgres_queue().await else {
        return;
    };
    let ids = queue
        .enqueue_in(&db, (0..400).map(|_| crate::common::noop()).collect(), None)
        .await
        .unwrap();
    let count = |text: String| {
        let db = db.clone();
        async move {
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                text,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap()
        }
    };
    let page = "CAST((ctid::text::point)[0] AS BIGINT)";
    let first = count(format!("SELECT {page} FROM commands WHERE id = {}", ids[0])).await;
    let chosen = format!(
        "SELECT id FROM commands WHERE {page} = {first} AND id >= {} ORDER BY id LIMIT 20",
        ids[0]
    );
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM ({chosen}) AS c")).await,
        20,
        "the first page holds twenty commands"
    );
    db.execute_unprepared(&format!(
        "UPDATE commands SET step = 1, progress = '{{\"server_id\": 12345, \"dummy_id\": 67890}}' \
         WHERE id IN ({chosen})"
    ))
    .await
    .unwrap();
    assert_eq!(
        count(format!(
            "SELECT COUNT(*) FROM commands WHERE {page} = {first} AND step = 1"
        ))
        .await,
        20,
        "the twenty new versions are on their page"
    );
}

/// On PostgreSQL a command holds a lease only while it runs (`commands_leased_only_running`),
/// which lets the group writes fence on the lease owner alone: a write that ends a command but
/// keeps its lease is refused.
#[tokio::test]
pub(super) async fn a_lease_is_held_only_by_a_running_command_on_postgres() {
    use sea_orm::ConnectionTrait;
    let Some((_pg, db)) = shared_postgres().await else {
        return;
    };
    db.execute_unprepared(
        "INSERT INTO commands (id, kind, status, params, progress, step, attempts, run_after, \
         requested_by, created_at, lease_owner, lease_until) VALUES (1, 'noop', 'running', '{}', \
         '{}', 0, 0, 0, 'queue-test', 0, 'core-a', 9000000000000000)",
    )
    .await
    .unwrap();
    let err = db
        .execute_unprepared("UPDATE commands SET status = 'succeeded' WHERE id = 1")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("commands_leased_only_running"),
        "{err}"
    );
    db.execute_unprepared(
        "UPDATE commands SET status = 'succeeded', lease_owner = NULL WHERE id = 1",
    )
    .await
    .unwrap();
}
