//! Several cores on one PostgreSQL database: duties held under a lease by one core at a time,
//! heartbeats shared through the database, agents that fail over between cores.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud48_api::cluster::Cluster as ClusterView;
use cloud48_core::cli::Client;
use cloud48_engine::agent::protocol::AgentInfo;
use cloud48_engine::cluster::{Claim, Cluster, DbClock, Duty};
use cloud48_engine::entities::command;
use cloud48_engine::model::{Server, ServerStatus};
use cloud48_engine::queue::{
    Clock, Next, Queue, QueueConfig, Runner, StepError, SystemClock, Transition,
};

use crate::agent::{TOKEN, idle_stats, serve_agent, sim, sim_agent};
use crate::common::{PgDb, ServeProcess, eventually, serve};

/// `cloud48 serve` on `pg` with short health periods and duty leases (1 s), and `extra` flags.
async fn start_core(pg: &PgDb, dir: &std::path::Path, name: &str, extra: &[&str]) -> ServeProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, format!("[agents]\ntoken = \"{TOKEN}\"\n")).unwrap();
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let mut flags = vec![
        "--config",
        config.to_str().unwrap(),
        "--database-url",
        &pg.url,
        "--sim-servers",
        "0",
        "--heartbeat-ms",
        "100",
        "--grace-ms",
        "3000",
        "--health-check-ms",
        "100",
        "--duty-lease-ms",
        "1000",
    ];
    flags.extend(extra);
    serve(&data, &flags).await
}

fn node_id(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name).join("node-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// The cores and the holder of every duty, as `core` sees them.
async fn cluster(core: &Client) -> ClusterView {
    core.get("/v1/cluster").await.unwrap()
}

fn holders(view: &ClusterView) -> Vec<(String, String)> {
    view.duties
        .iter()
        .map(|d| (d.duty.clone(), d.core.clone()))
        .collect()
}

async fn status(core: &Client, server: &str) -> Option<ServerStatus> {
    let servers: Vec<Server> = core.get_all("/v1/servers").await.ok()?;
    servers
        .into_iter()
        .find(|s| s.name == server)
        .map(|s| s.status)
}

/// Two real cores on one database and an agent that knows both: when the first, which holds
/// the duties, is killed (-9), its duties move to the second within a lease and the agent's
/// heartbeats with them, so the server stays up; when the agent falls silent, the second core
/// marks it down; the first, restarted, takes nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_core_hands_its_duties_and_its_agents_to_another() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dir = crate::common::tempdir();
    let mut a = start_core(&pg, dir.path(), "a", &[]).await;
    let b = start_core(&pg, dir.path(), "b", &[]).await;
    let (node_a, node_b) = (node_id(dir.path(), "a"), node_id(dir.path(), "b"));
    let (api_a, api_b) = (Client::new(&a.url), Client::new(&b.url));
    let everything_on = |node: &str| {
        vec![
            ("collector".to_string(), node.to_string()),
            ("monitor".to_string(), node.to_string()),
        ]
    };
    // The first core took every duty; both see both cores, with the URLs agents use.
    let view = cluster(&api_b).await;
    assert_eq!(holders(&view), everything_on(&node_a));
    let urls: Vec<_> = eventually("both cores are announced", || async {
        let view = cluster(&api_a).await;
        (view.cores.len() == 2).then_some(view.cores)
    })
    .await
    .into_iter()
    .map(|c| c.url.unwrap())
    .collect();
    assert!(urls.contains(&a.url) && urls.contains(&b.url), "{urls:?}");
    // Every connection of a core carries its node name, its wake-ups' too.
    let db = sea_orm::Database::connect(&pg.url).await.unwrap();
    let names: Vec<String> = eventually("both cores listen for wake-ups", || async {
        use sea_orm::ConnectionTrait;
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT application_name AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            ))
            .await
            .unwrap();
        let names: Vec<String> = rows.iter().map(|r| r.try_get("", "n").unwrap()).collect();
        (names.len() == 2).then_some(names)
    })
    .await;
    for node in [&node_a, &node_b] {
        assert!(names.contains(&format!("{node}-wake-ups")), "{names:?}");
    }
    drop(db);

    let (agent, _) = serve_agent("node-1", sim("node-1", Duration::ZERO)).await;
    let beats = tokio::spawn(cloud48_engine::agent::heartbeats(
        agent,
        vec![a.url.clone(), b.url.clone()],
        TOKEN.into(),
        Duration::from_millis(100),
    ));
    eventually(
        "node-1 registers through the first core and is up",
        || async { (status(&api_b, "node-1").await == Some(ServerStatus::Up)).then_some(()) },
    )
    .await;
    // The second core knows its heartbeats although the agent never talked to it.
    eventually("the second core shares node-1's heartbeats", || async {
        let servers: Vec<Server> = api_b.get_all("/v1/servers").await.ok()?;
        servers
            .into_iter()
            .find(|s| s.name == "node-1")
            .and_then(|s| s.load)
    })
    .await;

    a.kill9();
    eventually("the second core takes every duty", || async {
        (holders(&cluster(&api_b).await) == everything_on(&node_b)).then_some(())
    })
    .await;
    // The killed core is listed for a while, as silent.
    eventually("the killed core is shown as not running", || async {
        let view = cluster(&api_b).await;
        let killed = view.cores.iter().find(|c| c.node == node_a)?;
        (!killed.running).then_some(())
    })
    .await;
    // Beyond the grace period (3 s) after the takeover, node-1 has not been marked down:
    // its agent moved its heartbeats to the second core.
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_millis(4000) {
        assert_eq!(
            status(&api_b, "node-1").await,
            Some(ServerStatus::Up),
            "node-1 stays up while its agent beats to the surviving core"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    beats.abort();
    eventually(
        "the surviving core marks the silent server down",
        || async { (status(&api_b, "node-1").await == Some(ServerStatus::Down)).then_some(()) },
    )
    .await;

    // The first core comes back: it serves the API, and the duties stay where they are.
    let a = start_core(&pg, dir.path(), "a", &[]).await;
    let api_a = Client::new(&a.url);
    assert_eq!(status(&api_a, "node-1").await, Some(ServerStatus::Down));
    let view = cluster(&api_a).await;
    assert_eq!(holders(&view), everything_on(&node_b));
    assert!(
        view.cores
            .iter()
            .any(|c| c.this && c.node == node_a && c.running)
    );
}

/// The monitor on one core judges a server whose agent beats to another core by the beats
/// shared through the database, read afresh before it calls the server silent: its own view
/// is a heartbeat period old, which under load was enough to mark a healthy server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_beating_to_another_core_is_not_judged_on_a_stale_view() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let (_dirs, cores) = agent_cores(&pg, 2).await;
    let (heard, judge) = (&cores[0], &cores[1]);
    let info = sim_agent("node-v", 20_998);
    let id = heard.agents().register(&info, &idle_stats()).await.unwrap();
    heard.health().heartbeat(id, None);
    heard.sync_cluster().await.unwrap();
    judge.sync_cluster().await.unwrap();
    let grace = judge.config().health.grace.as_millis() as i64;
    // The agent goes on beating to the first core, which shares its beats; the judging core
    // does not read them on its own meanwhile.
    eventually(
        "the judging core's own view is older than the grace period",
        || async {
            heard.health().heartbeat(id, None);
            heard.sync_cluster().await.unwrap();
            (judge.health().age(id)? > grace).then_some(())
        },
    )
    .await;
    let report = judge.monitor().check().await.unwrap();
    assert!(report.down.is_empty(), "{report:?}");
    // Once the agent is silent, the same check marks it down.
    eventually("the silent server is marked down", || async {
        let report = judge.monitor().check().await.unwrap();
        (report.down == [id]).then_some(())
    })
    .await;
}

/// A duty's lease: one holder at a time, renewed by it, taken by another only once it lapsed;
/// a holder that could not renew stops acting when its own deadline passes; a graceful
/// release hands the duty over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duty_has_one_holder_until_its_lease_lapses_or_is_released() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    // The migrations create the tables.
    let db = pg.connect().await;
    let lease = Duration::from_millis(600);
    let a = Cluster::new(db.clone(), "core-a".into(), lease);
    let b = Cluster::new(db.clone(), "core-b".into(), lease);
    assert!(a.shared());
    assert_eq!(a.claim(Duty::Monitor).await.unwrap(), Claim::Taken);
    assert_eq!(b.claim(Duty::Monitor).await.unwrap(), Claim::Elsewhere);
    assert_eq!(a.claim(Duty::Monitor).await.unwrap(), Claim::Kept);
    assert!(a.holds(Duty::Monitor) && !b.holds(Duty::Monitor));
    // Duties are independent.
    assert_eq!(b.claim(Duty::Collector).await.unwrap(), Claim::Taken);
    assert_eq!(
        b.holders().await.unwrap(),
        vec![
            ("collector".to_string(), "core-b".to_string()),
            ("monitor".to_string(), "core-a".to_string())
        ]
    );

    // `a` stops renewing: it stops acting at its own deadline, and `b` takes over once the
    // lease lapsed in the database, not before.
    eventually("core-b takes the lapsed monitor duty", || async {
        (b.claim(Duty::Monitor).await.unwrap() == Claim::Taken).then_some(())
    })
    .await;
    assert!(
        !a.holds(Duty::Monitor),
        "core-a acts no more once its lease ran out"
    );
    assert_eq!(a.claim(Duty::Monitor).await.unwrap(), Claim::Elsewhere);

    // A graceful stop hands over at once.
    b.release().await.unwrap();
    assert!(!b.holds(Duty::Monitor) && !b.holds(Duty::Collector));
    assert_eq!(a.claim(Duty::Monitor).await.unwrap(), Claim::Taken);
    assert_eq!(a.claim(Duty::Collector).await.unwrap(), Claim::Taken);
}

/// `n` cores on `pg` in this process, opened (nothing started), for agents only (their token,
/// no simulated servers); with their directories.
pub(crate) async fn agent_cores(
    pg: &PgDb,
    n: usize,
) -> (Vec<tempfile::TempDir>, Vec<cloud48_engine::Core>) {
    let dirs: Vec<_> = (0..n).map(|_| crate::common::tempdir()).collect();
    let mut cores = Vec::new();
    for d in &dirs {
        let mut config = cloud48_engine::CoreConfig::new(d.path());
        config.database_url = Some(pg.url.clone());
        config.agent_token = Some(TOKEN.into());
        config.sim_servers = 0;
        cores.push(
            cloud48_engine::Core::open(config)
                .await
                .expect("core opens"),
        );
    }
    (dirs, cores)
}

/// Two cores that hear the same new agents at the same moment (an agent's heartbeats failing
/// over, or `server add` racing its first beat) both accept each of them, as one server: the
/// registration that loses the race reads the winner's row instead of failing with a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cores_registering_agents_at_once_accept_each_once_and_one_per_subnet() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let (_dirs, cores) = agent_cores(&pg, 2).await;
    let infos: Vec<AgentInfo> = (0..40)
        .map(|i| sim_agent(&format!("racer-{i}"), 20_000 + i))
        .collect();
    let stats = idle_stats();
    let registrations = infos.iter().flat_map(|info| {
        let stats = &stats;
        cores
            .iter()
            .map(move |core| core.agents().register(info, stats))
    });
    let ids = futures::future::join_all(registrations).await;
    for (pair, info) in ids.chunks(2).zip(&infos) {
        let first = pair[0].as_ref().expect("the first core accepts the agent");
        let second = pair[1].as_ref().expect("the second core accepts the agent");
        assert_eq!(first, second, "{} is one server", info.name);
    }
    assert_eq!(cores[0].servers().list().await.unwrap().len(), infos.len());
    // Two new agents with one subnet heard at once by the two cores: one is accepted, the
    // other refused (each registration reads the others' subnets, then writes its own).
    let pairs: Vec<[AgentInfo; 2]> = (0..20)
        .map(|i| {
            [0, 1].map(|j| AgentInfo {
                name: format!("twin-{i}-{j}"),
                url: format!("http://127.0.0.1:{}", 21_000 + 2 * i + j),
                id: Some(format!("twin-{i}-{j}")),
                subnet: Some(format!("10.77.{i}.0/24")),
                ..infos[0].clone()
            })
        })
        .collect();
    let registrations = pairs.iter().flat_map(|pair| {
        let stats = &stats;
        pair.iter()
            .zip(&cores)
            .map(move |(info, core)| core.agents().register(info, stats))
    });
    let answers = futures::future::join_all(registrations).await;
    for (pair, answer) in answers.chunks(2).zip(&pairs) {
        let accepted = pair.iter().filter(|a| a.is_ok()).count();
        assert_eq!(accepted, 1, "{}: {pair:?}", answer[0].name);
        let refused = pair.iter().find_map(|a| a.as_ref().err()).unwrap();
        assert!(
            refused.to_string().contains("clashes with server twin-"),
            "{refused}"
        );
    }
}

/// Cores started together on a new database: one sets it up (schema, platform, simulated
/// servers, bundled plugins) while the others wait, and every one of them opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cores_started_together_on_a_new_database_all_open_and_set_it_up_once() {
    use sea_orm::ConnectionTrait;
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| crate::common::tempdir()).collect();
    let opens = dirs.iter().map(|d| {
        let mut config = cloud48_engine::CoreConfig::new(d.path());
        config.database_url = Some(pg.url.clone());
        cloud48_engine::Core::open(config)
    });
    let cores: Vec<_> = futures::future::join_all(opens)
        .await
        .into_iter()
        .map(|c| c.expect("every core opens"))
        .collect();
    let db = cores[0].db().clone();
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    sql,
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap()
        }
    };
    assert_eq!(
        count("SELECT COUNT(*) AS n FROM platforms WHERE is_local").await,
        1
    );
    let sims = cores[0].config().sim_servers as i64;
    assert_eq!(count("SELECT COUNT(*) AS n FROM servers").await, sims);
    let bundled = cloud48_engine::plugins::BUNDLED.len() as i64;
    assert_eq!(count("SELECT COUNT(*) AS n FROM plugins").await, bundled);
    for core in &cores {
        assert_eq!(core.servers().list().await.unwrap().len() as i64, sims);
    }
    // Cores share the database, not a data directory: a fourth on the first one's directory
    // would run as the same node (and take that core's running commands for its own).
    let mut twin = cloud48_engine::CoreConfig::new(dirs[0].path());
    twin.database_url = Some(pg.url.clone());
    let refused = cloud48_engine::Core::open(twin)
        .await
        .err()
        .expect("a second core on one data directory is refused")
        .to_string();
    assert!(
        refused.contains("another core is running on") && refused.contains("another --data-dir"),
        "{refused}"
    );
    // What one core places, the others' placement sees at their next sync.
    let sim1 = cores[1].servers().list().await.unwrap();
    let sim1 = sim1.iter().find(|s| s.name == "sim-1").unwrap().id.0;
    let load = |core: &cloud48_engine::Core| {
        let spread = core.placement().snapshot();
        spread.iter().find(|c| c.id == sim1).unwrap().containers
    };
    cores[1].sync_cluster().await.unwrap();
    assert_eq!(load(&cores[1]), 0);
    db.execute_unprepared(
        "UPDATE servers SET alloc_containers = 3, alloc_cpu_millis = 1500 WHERE name = 'sim-1'",
    )
    .await
    .unwrap();
    cores[1].sync_cluster().await.unwrap();
    assert_eq!(load(&cores[1]), 3);
    // A status another core changed: every row is read again.
    db.execute_unprepared("UPDATE servers SET status = 'down' WHERE name = 'sim-1'")
        .await
        .unwrap();
    cores[1].sync_cluster().await.unwrap();
    let seen = cores[1].placement().snapshot();
    let seen = seen.iter().find(|c| c.id == sim1).unwrap();
    assert!(!seen.up && seen.containers == 3);
}

/// A clock this many ms off the system's.
struct Skewed(i64);

impl Clock for Skewed {
    fn now_ms(&self) -> i64 {
        cloud48_engine::model::now_ms() + self.0
    }
}

/// A runner whose step waits for the gate to open, recording which core ran it.
struct Gated {
    node: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
    gate: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Runner for Gated {
    async fn step(&self, _: &command::Model) -> Result<Transition, StepError> {
        self.seen.lock().unwrap().push(self.node.into());
        let _ = self.gate.clone().wait_for(|open| *open).await;
        Ok(Transition::bare(Next::Done(serde_json::Value::Null)))
    }
}

/// Core a claims a command whose step waits; core b, with its clock `skew_b` ms off (and a's
/// `skew_a`), starts meanwhile and sweeps the queue for twice the lease; then the step ends.
/// Returns the cores that ran the step, a core that ran it again right after itself counted
/// once (on a loaded machine a core's own lease renewal can come late and it re-runs its own
/// command: a known limit, not what this judges). `corrected`: the clocks are `DbClock`s, as
/// `Core` makes them on PostgreSQL.
async fn who_runs_it(skew_a: i64, skew_b: i64, corrected: bool) -> Vec<String> {
    let pg = PgDb::create().await.unwrap();
    let db = pg.connect().await;
    // Long enough that a renewal delayed by a busy machine (renewals come every third of it)
    // does not lose the lease; the skews are far longer.
    let lease = Duration::from_millis(3000);
    let queue_config = QueueConfig {
        lease,
        poll: Duration::from_millis(20),
        ..QueueConfig::default()
    };
    let clock = |skew: i64| {
        let db = db.clone();
        async move {
            let raw: Arc<dyn Clock> = Arc::new(Skewed(skew));
            if corrected {
                Arc::new(DbClock::new(raw, &db).await.unwrap()) as Arc<dyn Clock>
            } else {
                raw
            }
        }
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (open, gate) = tokio::sync::watch::channel(false);
    let a = Queue::new(
        db.clone(),
        "core-a".into(),
        queue_config.clone(),
        clock(skew_a).await,
    );
    let runner = |node| {
        Arc::new(Gated {
            node,
            seen: seen.clone(),
            gate: gate.clone(),
        })
    };
    a.start(runner("core-a"), false).await.unwrap();
    let id = a.enqueue(crate::common::noop()).await.unwrap();
    eventually("core a runs the step", || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let b = Queue::new(
        db.clone(),
        "core-b".into(),
        queue_config,
        clock(skew_b).await,
    );
    b.start(runner("core-b"), false).await.unwrap();
    // Core b sweeps the queue every third of a lease: give it six sweeps.
    eventually("core b sweeps the queue six times", || async {
        (b.sweeps() >= 6).then_some(())
    })
    .await;
    open.send(true).unwrap();
    let done = a.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, cloud48_engine::model::CommandStatus::Succeeded);
    a.stop(Duration::from_secs(1)).await;
    b.stop(Duration::from_secs(1)).await;
    let mut seen = seen.lock().unwrap().clone();
    seen.dedup();
    seen
}

/// Leases are judged by the database's clock: a core whose clock runs 10 s ahead does not take
/// a running command from another core, and a core whose clock runs 10 s behind does not lose
/// its own; without the correction the one ahead steals it (the test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_with_a_skewed_clock_neither_steals_nor_loses_leases() {
    if PgDb::create().await.is_none() {
        return;
    }
    assert_eq!(who_runs_it(0, 10_000, true).await, ["core-a"], "ahead");
    assert_eq!(who_runs_it(-10_000, 0, true).await, ["core-a"], "behind");
    assert_eq!(
        who_runs_it(0, 10_000, false).await,
        ["core-a", "core-b"],
        "uncorrected, the core ahead takes the command while it runs"
    );
}

/// A runner that records which core ran its step; on the core given `entered` it then holds
/// its thread (the whole runtime, on a current-thread runtime) for `block`.
struct Hogging {
    node: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
    entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    block: Duration,
}

#[async_trait::async_trait]
impl Runner for Hogging {
    async fn step(&self, _: &command::Model) -> Result<Transition, StepError> {
        self.seen.lock().unwrap().push(self.node.into());
        if let Some(entered) = self.entered.lock().unwrap().take() {
            entered.send(()).unwrap();
            std::thread::sleep(self.block);
        }
        Ok(Transition::bare(Next::Done(serde_json::Value::Null)))
    }
}

/// A core whose runtime is saturated keeps its commands: its leases are renewed on a thread
/// and a connection of their own (`Queue::connect_apart`, as `Core` does on PostgreSQL).
/// Core a's step holds a's only runtime thread for three and a half leases while core b, on a
/// thread and runtime of its own, sweeps the queue every third of a lease: the step runs on
/// core a alone. (Renewed by a task on a's runtime, the lease runs out and core b runs the
/// step again: the test can fail.)
#[tokio::test(flavor = "current_thread")]
async fn a_core_whose_runtime_is_saturated_keeps_its_commands() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let lease = Duration::from_millis(1000);
    let queue_config = QueueConfig {
        lease,
        poll: Duration::from_millis(20),
        ..QueueConfig::default()
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (entered, a_entered) = std::sync::mpsc::channel();
    let (stop_b, b_stops) = tokio::sync::oneshot::channel::<()>();
    // Core b starts once core a runs the step, so that only a claims it at first.
    let b = {
        let (url, seen, config) = (pg.url.clone(), seen.clone(), queue_config.clone());
        std::thread::spawn(move || {
            a_entered.recv().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let b = Queue::new(
                    crate::common::connect_to(&url).await,
                    "core-b".into(),
                    config,
                    Arc::new(SystemClock),
                );
                let runner = Hogging {
                    node: "core-b",
                    seen,
                    entered: Mutex::new(None),
                    block: Duration::ZERO,
                };
                b.start(Arc::new(runner), false).await.unwrap();
                let _ = b_stops.await;
                b.stop(Duration::from_secs(1)).await;
                b.sweeps()
            })
        })
    };
    let a = Queue::new(
        pg.connect().await,
        "core-a".into(),
        queue_config,
        Arc::new(SystemClock),
    );
    let mut leases = sea_orm::ConnectOptions::new(pg.url.clone());
    leases.max_connections(1);
    a.connect_apart(leases);
    let runner = Hogging {
        node: "core-a",
        seen: seen.clone(),
        entered: Mutex::new(Some(entered)),
        block: lease * 7 / 2,
    };
    a.start(Arc::new(runner), false).await.unwrap();
    let id = a.enqueue(crate::common::noop()).await.unwrap();
    let done = a.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, cloud48_engine::model::CommandStatus::Succeeded);
    stop_b.send(()).unwrap();
    let b_sweeps = tokio::task::spawn_blocking(move || b.join().unwrap())
        .await
        .unwrap();
    a.stop(Duration::from_secs(1)).await;
    // Core b swept the queue while core a's step held its runtime (every third of a lease).
    assert!(b_sweeps >= 3, "core b swept {b_sweeps} times");
    assert_eq!(*seen.lock().unwrap(), ["core-a"]);
}

/// Three cores on one database and four simulated servers behind agents that know every core:
/// the chaos test's mixed commands and a batch of 1,000 submitted round-robin through the live
/// cores; one core killed (-9) while commands run, then another. The last core finishes what
/// the dead ones held once their leases expire: nothing lost, nothing duplicated, no leaked
/// dummy or lock, counters consistent, every balancer converged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_cores_lose_nothing_when_two_are_killed_in_turn() {
    use crate::chaos::{
        ROUNDS, Submitted, below, create_environments, submit_batch, submit_round, verify,
    };
    use proptest::test_runner::{RngAlgorithm, TestRng};
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let seed: u64 = std::env::var("CLOUD48_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed.to_le_bytes(); 4].concat());
    let dir = crate::common::tempdir();
    let flags = ["--lease-ms", "2000", "--anonymous", "full"];
    let mut cores = Vec::new();
    for name in ["a", "b", "c"] {
        cores.push(start_core(&pg, dir.path(), name, &flags).await);
    }
    let urls: Vec<String> = cores.iter().map(|c| c.url.clone()).collect();
    let sims = sim_agents(&urls).await;
    let mut clients: Vec<Client> = urls.iter().map(|u| Client::new(u)).collect();
    four_servers_up(&clients[0]).await;
    create_environments(&clients[0]).await;

    let mut submitted = Submitted::default();
    let mut batch = None;
    let mut kills = 0;
    for round in 0..ROUNDS {
        let mut ids = submit_round(&clients, &mut rng, &mut submitted).await;
        if round == 1 {
            let id = submit_batch(&clients[1 % clients.len()], &mut submitted).await;
            ids.push(id);
            batch = Some(id);
        }
        if round == 0 || round > 2 {
            continue;
        }
        // Kill the first live core once a random share of this round finished.
        let finished_before_kill = 1 + below(&mut rng, ids.len() / 2);
        let survivor = clients.last().unwrap();
        let killed_early = eventually("a random point in the round", || async {
            let mut done = 0;
            for id in &ids {
                let c: cloud48_engine::model::Command =
                    survivor.get(&format!("/v1/commands/{id}")).await.unwrap();
                done += c.status.is_terminal() as usize;
            }
            (done >= finished_before_kill).then_some(done < ids.len())
        })
        .await;
        cores.remove(0).kill9();
        clients.remove(0);
        kills += killed_early as usize;
    }
    assert!(kills > 0, "seed {seed}: no kill landed while commands ran");
    eprintln!(
        "cluster chaos seed {seed}: {} commands, {kills} of 2 kills while commands ran",
        submitted.all.len()
    );
    let guests = || sims.iter().flat_map(|s| s.guests()).collect();
    verify(&clients[0], &submitted, batch.unwrap(), &guests, seed).await;
    // The survivor holds every duty.
    let view = cluster(&clients[0]).await;
    let me = &view.cores.iter().find(|c| c.this).unwrap().node;
    assert!(
        view.duties.iter().all(|d| &d.core == me),
        "{:?}",
        holders(&view)
    );
}

/// Four simulated servers behind agents that beat to `urls` (and learn the cluster's other
/// cores from them); each server's index gives it its own addresses.
async fn sim_agents(urls: &[String]) -> Vec<Arc<cloud48_engine::driver::sim::SimServer>> {
    let mut sims = Vec::new();
    for i in 1..=4u32 {
        let name = format!("node-{i}");
        let sim = Arc::new(cloud48_engine::driver::sim::SimServer::new(
            &name,
            i,
            cloud48_engine::model::Resources {
                cpu_millis: 8000,
                memory_mb: 8192,
                disk_mb: 20_000,
            },
            cloud48_engine::driver::sim::SimLatency::uniform(Duration::from_millis(5)),
        ));
        let (agent, _) = serve_agent(&name, sim.clone()).await;
        tokio::spawn(cloud48_engine::agent::heartbeats(
            agent,
            urls.to_vec(),
            TOKEN.into(),
            Duration::from_millis(100),
        ));
        sims.push(sim);
    }
    sims
}

/// Two cores whose views of a small subnet were read apart place at once: together they never
/// reserve more containers on its server than the subnet has addresses (the agent would refuse
/// the extra ones, failing their creates); what does not fit there goes to the other server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cores_placing_at_once_do_not_place_more_containers_than_a_subnet_has_addresses() {
    use cloud48_engine::driver::address::Subnet;
    use cloud48_engine::driver::sim::{SimLatency, SimServer};
    use cloud48_engine::model::{Accepted, CommandStatus, Resources};
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dir = crate::common::tempdir();
    let flags = ["--anonymous", "full"];
    let cores = [
        start_core(&pg, dir.path(), "a", &flags).await,
        start_core(&pg, dir.path(), "b", &flags).await,
    ];
    let urls: Vec<String> = cores.iter().map(|c| c.url.clone()).collect();
    // The small subnet's server has the most room, so both cores pick it first.
    for (name, subnet, cpu) in [
        ("small", "10.66.0.0/29", 64_000),
        ("roomy", "10.67.0.0/24", 8_000),
    ] {
        let net: Subnet = subnet.parse().unwrap();
        let driver = SimServer::new(
            name,
            1,
            Resources {
                cpu_millis: cpu,
                memory_mb: 65_536,
                disk_mb: 100_000,
            },
            SimLatency::uniform(Duration::from_millis(5)),
        )
        .with_subnet(net);
        let (agent, _) =
            crate::agent::serve_agent_on(name, Arc::new(driver), Some((net, None))).await;
        tokio::spawn(cloud48_engine::agent::heartbeats(
            agent,
            urls.clone(),
            TOKEN.into(),
            Duration::from_millis(100),
        ));
    }
    for url in &urls {
        eventually("both servers up on every core", || async {
            let servers: Vec<Server> = Client::new(url).get_all("/v1/servers").await.ok()?;
            (servers
                .iter()
                .filter(|s| s.status == ServerStatus::Up)
                .count()
                == 2)
                .then_some(())
        })
        .await;
    }
    let body = serde_json::json!({
        "type": "plain",
        "requirements": { "cpu_millis": 10, "memory_mb": 16, "disk_mb": 10 }
    });
    let submits = (0..16).map(|i| {
        let (client, body) = (Client::new(&urls[i % 2]), body.clone());
        async move {
            client
                .post::<_, Accepted>("/v1/containers", &body)
                .await
                .unwrap()
                .command_id
        }
    });
    let ids = futures::future::join_all(submits).await;
    let client = Client::new(&urls[0]);
    for id in ids {
        let done: cloud48_engine::model::Command = eventually("the create ends", || async {
            let c: cloud48_engine::model::Command =
                client.get(&format!("/v1/commands/{id}")).await.ok()?;
            c.status.is_terminal().then_some(c)
        })
        .await;
        assert_eq!(done.status, CommandStatus::Succeeded, "{:?}", done.error);
    }
    let servers: Vec<Server> = client.get_all("/v1/servers").await.unwrap();
    let small = servers.iter().find(|s| s.name == "small").unwrap();
    assert!(
        small.containers <= 5,
        "a /29 has 5 addresses: {}",
        small.containers
    );
}

async fn four_servers_up(client: &Client) {
    eventually("four servers up", || async {
        let servers: Vec<Server> = client.get_all("/v1/servers").await.ok()?;
        (servers
            .iter()
            .filter(|s| s.status == ServerStatus::Up)
            .count()
            == 4)
            .then_some(())
    })
    .await;
}

/// Three cores restarted in turn (SIGTERM, then started again) while creates keep arriving
/// through the cores that are up: every accepted command succeeds, and nothing is left locked
/// or reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_core_fails_no_command() {
    use cloud48_engine::model::{Command, CommandId, CommandStatus};
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dir = crate::common::tempdir();
    let flags = ["--lease-ms", "2000", "--anonymous", "full"];
    let mut cores = Vec::new();
    for name in ["a", "b", "c"] {
        cores.push(start_core(&pg, dir.path(), name, &flags).await);
    }
    let live = Arc::new(Mutex::new(
        cores.iter().map(|c| c.url.clone()).collect::<Vec<_>>(),
    ));
    let urls = live.lock().unwrap().clone();
    let sims = sim_agents(&urls).await;
    four_servers_up(&Client::new(&cores[0].url)).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let submitter = {
        let (live, stop, count) = (live.clone(), stop.clone(), count.clone());
        tokio::spawn(async move {
            let mut accepted: Vec<CommandId> = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let url = {
                    let live = live.lock().unwrap();
                    live[n % live.len()].clone()
                };
                n += 1;
                let body = serde_json::json!({
                    "type": "plain",
                    "requirements": { "cpu_millis": 5, "memory_mb": 8, "disk_mb": 8 }
                });
                // A core that went away between the pick and the request refused nothing: the
                // next request goes to another.
                if let Ok(a) = Client::new(&url)
                    .post::<_, cloud48_engine::model::Accepted>("/v1/containers", &body)
                    .await
                {
                    accepted.push(a.command_id);
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            accepted
        })
    };
    let accepted_now = || count.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..cores.len() {
        let name = ["a", "b", "c"][i];
        // Creates arrive before each restart, and go on during it.
        let before = accepted_now();
        eventually("more creates accepted", || async {
            (accepted_now() >= before + 10).then_some(())
        })
        .await;
        let old = cores[i].url.clone();
        live.lock().unwrap().retain(|u| *u != old);
        // SIGTERM: the core finishes its running steps, hands its duties over and exits.
        let pid = cores[i].child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::task::block_in_place(|| cores[i].child.wait()).unwrap();
        assert!(status.success(), "core {name} stopped cleanly: {status}");
        cores[i] = start_core(&pg, dir.path(), name, &flags).await;
        live.lock().unwrap().push(cores[i].url.clone());
    }
    let before = accepted_now();
    eventually("creates accepted after the last restart", || async {
        (accepted_now() >= before + 10).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let accepted = submitter.await.unwrap();
    let client = Client::new(&cores[2].url);
    for id in &accepted {
        let c: Command = client.command(*id, 120).await.unwrap();
        assert_eq!(c.status, CommandStatus::Succeeded, "{c:?}");
    }
    let servers: Vec<serde_json::Value> = client.get("/v1/servers").await.unwrap();
    assert!(servers.iter().all(|s| s["dummies"] == 0), "{servers:?}");
    let guests: usize = sims.iter().map(|s| s.guests().len()).sum();
    assert_eq!(guests, accepted.len(), "one guest per accepted create");
}

/// A core on a copy of another's data directory (its node-id with it: a cloned machine, a
/// restored backup) ran as the same node beside it, each taking the other's running commands
/// for its own. It is refused at start, naming the node; once that core stopped, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_on_a_copied_data_directory_is_refused_while_the_original_runs() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..2).map(|_| crate::common::tempdir()).collect();
    let config = |i: usize| {
        let mut c = cloud48_engine::CoreConfig::new(dirs[i].path());
        c.database_url = Some(pg.url.clone());
        c.sim_servers = 0;
        c
    };
    let first = cloud48_engine::Core::open(config(0)).await.unwrap();
    first.start().await.unwrap();
    std::fs::copy(
        dirs[0].path().join("node-id"),
        dirs[1].path().join("node-id"),
    )
    .unwrap();
    let e = cloud48_engine::Core::open(config(1))
        .await
        .err()
        .expect("a core on a copied data directory is refused")
        .to_string();
    assert!(
        e.contains(&format!(
            "another core runs as node {} on this database",
            first.cluster().node()
        )) && e.contains("delete its node-id file"),
        "{e}"
    );
    first.stop(Duration::from_secs(5)).await;
    let copy = cloud48_engine::Core::open(config(1)).await.unwrap();
    assert_eq!(copy.cluster().node(), first.cluster().node());
    copy.start().await.unwrap();
    copy.stop(Duration::from_secs(5)).await;
}

/// A core given another agents token than the running cores' joined silently: agents that
/// failed over to it were refused and their servers judged down. It is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_with_another_agents_token_is_refused_at_start() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..6).map(|_| crate::common::tempdir()).collect();
    let config = |i: usize, token: Option<&str>| {
        let mut c = cloud48_engine::CoreConfig::new(dirs[i].path());
        c.database_url = Some(pg.url.clone());
        c.agent_token = token.map(Into::into);
        c.sim_servers = 0;
        c
    };
    let first = cloud48_engine::Core::open(config(0, Some(TOKEN)))
        .await
        .unwrap();
    first.start().await.unwrap();
    let other = cloud48_engine::Core::open(config(1, Some("another-token-of-the-wrong-kind")))
        .await
        .unwrap();
    let e = other.start().await.unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "core {} runs on this database with another agents token",
            first.cluster().node()
        )) && e.contains("Give every core the same agents.token"),
        "{e}"
    );
    // Nor does a core without a token (it would refuse every agent).
    let none = cloud48_engine::Core::open(config(3, None)).await.unwrap();
    let e = none.start().await.unwrap_err().to_string();
    assert!(
        e.contains("another agents token than this core's (none set)"),
        "{e}"
    );
    // The same token joins (the refused cores took theirs back).
    let same = cloud48_engine::Core::open(config(2, Some(TOKEN)))
        .await
        .unwrap();
    same.start().await.unwrap();
    for core in [&first, &same] {
        core.stop(Duration::from_secs(5)).await;
    }
    // Every core stopped, a core with a new token starts at once.
    other.start().await.unwrap();
    other.stop(Duration::from_secs(5)).await;
    // Two cores started at once with different tokens: not both run.
    let (a, b) = (
        cloud48_engine::Core::open(config(4, Some("the-first-token-of-a-race")))
            .await
            .unwrap(),
        cloud48_engine::Core::open(config(5, Some("the-other-token-of-a-race")))
            .await
            .unwrap(),
    );
    let (ra, rb) = tokio::join!(a.start(), b.start());
    assert!(ra.is_err() || rb.is_err(), "both started");
    for (core, started) in [(&a, ra.is_ok()), (&b, rb.is_ok())] {
        if started {
            core.stop(Duration::from_secs(5)).await;
        }
    }
}

/// Cores placing one after the other see each other's placements: the second core's view was
/// read before the first placed, yet it reads the allocations again before deciding and picks
/// another server (on a view a heartbeat period old it picked the same emptiest one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_places_on_what_another_core_placed_a_moment_before() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..2).map(|_| crate::common::tempdir()).collect();
    let mut cores = Vec::new();
    for d in &dirs {
        let mut config = cloud48_engine::CoreConfig::new(d.path());
        config.database_url = Some(pg.url.clone());
        // No background sync: only what placement reads itself can tell it.
        config.health.background = false;
        config.placement.view_max_age = Some(Duration::ZERO);
        let core = cloud48_engine::Core::open(config).await.unwrap();
        core.start().await.unwrap();
        cores.push(core);
    }
    // Each core learns that the other runs (and reads the servers, all empty).
    for core in cores.iter().chain(cores.iter()) {
        core.sync_cluster().await.unwrap();
    }
    let mut placed = Vec::new();
    for core in &cores {
        let (cmd, id) = core
            .containers()
            .create(&crate::common::plain(None), "test")
            .await
            .unwrap();
        let done = core
            .queue()
            .wait(cmd, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            done.status,
            cloud48_engine::model::CommandStatus::Succeeded,
            "{:?}",
            done.error
        );
        let container = core.containers().get_by_id(id).await.unwrap();
        placed.push(container.server.unwrap());
    }
    assert_ne!(
        placed[0], placed[1],
        "the second core placed on the server the first had just filled"
    );
    for core in &cores {
        core.stop(Duration::from_secs(5)).await;
    }
}
