//! Shared fixtures: an in-process core with its API on a loopback port, scratch PostgreSQL
//! databases, and the real `cloud48` binary.

use std::sync::Arc;
use std::time::Duration;

use cloud48_core::cli::Client;
use cloud48_engine::model::{Command, CommandStatus, ContainerId};
use cloud48_engine::types::ContainerType;
use cloud48_engine::{Core, CoreConfig};
use sea_orm::{ConnectionTrait, Database};

/// One CPU-heavy test at a time: VMs run under TCG here and real Tomcats start JVMs; each
/// takes whole CPUs, and two at once would starve each other's readiness windows (and the
/// other areas' tests beside them).
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This test process's own scratch directory, under which every test's files go: its
/// temporary directories and what outlives one test (the image stores built once per run,
/// in-process agents' spools). A test's servers may leave their guests' roots mounted (a
/// temporary directory with a mount in it is not removed when dropped), so when the process
/// exits everything under it is unmounted and removed; what a killed earlier run left (its
/// process gone) is removed at the first call.
pub fn scratch() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    fn remove(dir: &std::path::Path) {
        let _ = cloud48_engine::driver::linux::unmount_under(dir);
        let _ = std::fs::remove_dir_all(dir);
    }
    extern "C" fn remove_at_exit() {
        if let Some(dir) = DIR.get() {
            remove(dir);
        }
    }
    DIR.get_or_init(|| {
        const PREFIX: &str = "cloud48-it-";
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(PREFIX)
                && !std::path::Path::new("/proc").join(pid).exists()
            {
                remove(&entry.path());
            }
        }
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: registers a plain function that only reads a set OnceLock.
        unsafe { libc::atexit(remove_at_exit) };
        say_failures_again();
        dir
    })
}

/// Installed with the scratch directory: after the usual report of a panic (its message, then
/// a backtrace when `RUST_BACKTRACE` asks for one) the message is said again in one line, so
/// that a long log cut down to its head and tail still shows what failed.
fn say_failures_again() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let what = info
            .payload_as_str()
            .unwrap_or("(a panic without a message)");
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        eprintln!("failed at {at}: {what}");
    }));
}

/// A temporary directory under [`scratch`], removed when dropped (or, if a mount keeps it, when
/// the process exits).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(scratch()).unwrap()
}

/// A new directory under [`scratch`].
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = scratch().join(format!("{tag}-{}", hex::encode(rand::random::<[u8; 6]>())));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How to build a test core.
#[derive(Clone)]
pub struct Opts {
    pub sim_servers: u32,
    pub latency: Duration,
    pub postgres: bool,
    pub max_attempts: i32,
    pub workers: usize,
    pub types: Vec<Arc<dyn ContainerType>>,
    /// Access control; tests of other areas run with anonymous full access.
    pub auth: cloud48_engine::auth::AuthConfig,
    /// Health monitoring; off in the background unless a test turns it on.
    pub health: cloud48_engine::core::HealthConfig,
    /// Capacity of each simulated server (default: the core's).
    pub capacity: Option<cloud48_engine::model::Resources>,
    /// The core's clock (default: the system clock).
    pub clock: Option<Arc<dyn cloud48_engine::queue::Clock>>,
    /// The token node agents present (`agents.token`).
    pub agent_token: Option<String>,
    /// Address the API listens on (default 127.0.0.1, any port).
    pub listen: Option<std::net::SocketAddr>,
    /// Open the core and serve its API, but start nothing (the queue, health, collector) until
    /// the test calls `core.start()`: what is submitted meanwhile is claimed together.
    pub paused: bool,
    /// How long a plugin call may run (default: the product's default).
    pub plugin_deadline: Option<Duration>,
    /// The token scrapers read `/metrics` with (`metrics.token`).
    pub metrics_token: Option<String>,
    /// The core's image store (default: `images` in its directory).
    pub images_dir: Option<std::path::PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            sim_servers: 3,
            latency: Duration::ZERO,
            postgres: false,
            max_attempts: 4,
            workers: 8,
            types: Vec::new(),
            auth: cloud48_engine::auth::AuthConfig {
                anonymous: cloud48_engine::auth::Anonymous::Full,
                ..Default::default()
            },
            health: cloud48_engine::core::HealthConfig {
                background: false,
                ..Default::default()
            },
            capacity: None,
            clock: None,
            agent_token: None,
            listen: None,
            paused: false,
            plugin_deadline: None,
            metrics_token: None,
            images_dir: None,
        }
    }
}

/// A command id as a test holds it: from a view (`CommandId`) or read from JSON (`i64`).
pub trait IntoCommandId {
    /// The id.
    fn command_id(self) -> cloud48_engine::model::CommandId;
}

impl IntoCommandId for cloud48_engine::model::CommandId {
    fn command_id(self) -> cloud48_engine::model::CommandId {
        self
    }
}

impl IntoCommandId for i64 {
    fn command_id(self) -> cloud48_engine::model::CommandId {
        cloud48_engine::model::CommandId(self)
    }
}

/// A clock the test moves by hand.
pub struct ManualClock(pub std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(std::sync::atomic::AtomicI64::new(ms)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl cloud48_engine::queue::Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Polls `check` until it returns `Some` (at most 30 s): for conditions that only show in
/// the database or on simulated servers.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, Duration::from_secs(30), check).await
}

/// `eventually`, waiting at most `limit`.
pub async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running core with its API served on a loopback port.
pub struct TestCore {
    pub core: Core,
    pub client: Client,
    pub url: String,
    pub _dir: tempfile::TempDir,
    pub _pg: Option<PgDb>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestCore {
    fn drop(&mut self) {
        // Let go of the core (and its WASM engine) when the test ends.
        self.server.abort();
    }
}

impl TestCore {
    pub async fn start(opts: Opts) -> Option<TestCore> {
        let dir = crate::common::tempdir();
        let pg = if opts.postgres {
            Some(PgDb::create().await?)
        } else {
            None
        };
        let mut config = CoreConfig::new(dir.path());
        config.database_url = pg.as_ref().map(|p| p.url.clone());
        config.sim_servers = opts.sim_servers;
        config.sim_latency = opts.latency;
        config.queue.workers = opts.workers;
        config.queue.backoff_base = Duration::from_millis(5);
        config.queue.lock_retry = Duration::from_millis(5);
        config.queue.poll = Duration::from_millis(20);
        config.queue.max_attempts = opts.max_attempts;
        config.auth = opts.auth.clone();
        config.health = opts.health.clone();
        config.agent_token = opts.agent_token.clone();
        config.metrics_token = opts.metrics_token.clone();
        config.images_dir = opts.images_dir.clone();
        if let Some(c) = opts.capacity {
            config.sim_capacity = c;
        }
        // The production deadline (100 ms) is for release builds; a debug build on a loaded
        // 2-core machine can take longer for a well-behaved hook. Tests of deadlines set their own.
        config.plugin_limits.deadline = opts.plugin_deadline.unwrap_or(Duration::from_secs(2));
        // Compiled plugins are shared by all tests: compiling them is the slow part of a start.
        config.plugin_cache = Some(std::env::temp_dir().join("cloud48-test-plugin-cache"));
        let core = match &opts.clock {
            Some(clock) => Core::open_with_clock(config, clock.clone())
                .await
                .expect("core opens"),
            None => Core::open(config).await.expect("core opens"),
        };
        for t in opts.types {
            core.types().register(t);
        }
        if !opts.paused {
            core.start().await.expect("core starts");
        }
        let listener =
            tokio::net::TcpListener::bind(opts.listen.unwrap_or(([127, 0, 0, 1], 0).into()))
                .await
                .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = cloud48_api::router(core.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await;
        });
        Some(TestCore {
            core,
            client: Client::new(&url),
            url,
            _dir: dir,
            _pg: pg,
            server,
        })
    }

    /// Waits for a command to finish (at most 180 s: a VM booting under TCG on a loaded machine
    /// takes minutes) and returns it.
    pub async fn wait(&self, id: impl IntoCommandId) -> Command {
        let id = id.command_id();
        let cmd = self
            .core
            .queue()
            .wait(id, Duration::from_secs(180))
            .await
            .expect("command exists");
        assert!(
            cmd.status.is_terminal(),
            "command {id} did not finish: {cmd:?}"
        );
        cmd
    }

    /// Waits for a command and asserts it succeeded.
    pub async fn ok(&self, id: impl IntoCommandId) -> Command {
        let id = id.command_id();
        let cmd = self.wait(id).await;
        assert_eq!(
            cmd.status,
            CommandStatus::Succeeded,
            "command {id} failed: {cmd:?}"
        );
        cmd
    }

    /// Id of the container created by a finished command.
    pub async fn created(&self, id: impl IntoCommandId) -> ContainerId {
        ContainerId(
            self.ok(id).await.result.unwrap()["container_id"]
                .as_i64()
                .unwrap(),
        )
    }

    /// A `plain` container created on server `server`, once it runs.
    pub async fn plain_on(&self, server: &str) -> ContainerId {
        let a: cloud48_engine::model::Accepted = self
            .client
            .post(
                "/v1/containers",
                &serde_json::json!({ "type": "plain", "server": server }),
            )
            .await
            .unwrap();
        self.created(a.command_id).await
    }

    /// The `ip:8080` of the given containers (as balancer upstreams), sorted.
    pub async fn addresses(&self, ids: &[ContainerId]) -> Vec<String> {
        let mut out = Vec::new();
        for id in ids {
            let c: cloud48_engine::model::Container = self
                .client
                .get(&format!("/v1/containers/{id}"))
                .await
                .unwrap();
            out.push(format!("{}:8080", c.ip.unwrap()));
        }
        out.sort();
        out
    }

    /// The simulated server of a server name.
    pub async fn sim(&self, name: &str) -> Arc<cloud48_engine::driver::sim::SimServer> {
        let s = self.core.servers().get(name).await.unwrap();
        self.core.fleet().sim(s.id.0).unwrap()
    }
}

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A scratch PostgreSQL database, dropped at the end of the test.
pub struct PgDb {
    pub url: String,
    name: String,
}

impl PgDb {
    /// Creates a scratch database; `None` when PostgreSQL is not reachable (a failure instead
    /// when `CLOUD48_REQUIRE_POSTGRES=1`, as in CI).
    pub async fn create() -> Option<PgDb> {
        let admin = match Database::connect(PG_ADMIN).await {
            Ok(db) => db,
            Err(e) => {
                if std::env::var("CLOUD48_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                    panic!("PostgreSQL is required but unreachable at {PG_ADMIN}: {e}");
                }
                eprintln!("PostgreSQL unreachable at {PG_ADMIN}; skipping the PostgreSQL variant");
                return None;
            }
        };
        let name = format!("c48_test_{:016x}", rand::random::<u64>());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(PgDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        })
    }

    /// A connection pool to this database, its schema migrated as a core would.
    pub async fn connect(&self) -> sea_orm::DatabaseConnection {
        connect_to(&self.url).await
    }
}

/// A connection pool to the database at `url`, its schema migrated as a core would.
pub async fn connect_to(url: &str) -> sea_orm::DatabaseConnection {
    let mut config = cloud48_engine::CoreConfig::new(tempdir().path());
    config.database_url = Some(url.to_owned());
    cloud48_engine::core::connect(&config).await.unwrap()
}

/// A migrated database for a test: SQLite in a scratch directory, or (`postgres`) a scratch
/// PostgreSQL database; both go when it is dropped.
pub struct ScratchDb {
    pub db: sea_orm::DatabaseConnection,
    pub pg: Option<PgDb>,
    _dir: tempfile::TempDir,
}

impl ScratchDb {
    /// `None` when PostgreSQL is asked for but unreachable (see `PgDb::create`).
    pub async fn create(postgres: bool) -> Option<ScratchDb> {
        let dir = tempdir();
        let pg = match postgres {
            true => Some(PgDb::create().await?),
            false => None,
        };
        let db = match &pg {
            Some(pg) => pg.connect().await,
            None => cloud48_engine::core::connect(&cloud48_engine::CoreConfig::new(dir.path()))
                .await
                .unwrap(),
        };
        Some(ScratchDb { db, pg, _dir: dir })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = Database::connect(PG_ADMIN).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Runs an async test body on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body(false).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body(true).await;
            }
        }
    };
}

/// A create of one `plain` container with its type's requirements, on `server` or where
/// placement puts it.
pub fn plain(server: Option<&str>) -> cloud48_engine::managers::CreateContainer {
    cloud48_engine::managers::CreateContainer {
        project: None,
        type_id: "plain".into(),
        server: server.map(Into::into),
        requirements: None,
        count: None,
    }
}

/// Path of the `cloud48` binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cloud48")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub use cloud48_core::serving::ServeProcess;

/// The real `cloud48 serve` on `data_dir` with `extra` flags, once it is ready.
pub async fn serve(data_dir: &std::path::Path, extra: &[&str]) -> ServeProcess {
    // As in `TestCore::start`: a debug build's hooks get more than the production 100 ms.
    let mut args = extra.to_vec();
    if !args.contains(&"--plugin-deadline-ms") {
        args.extend(["--plugin-deadline-ms", "2000"]);
    }
    let mut serve = ServeProcess::spawn(std::path::Path::new(binary()), data_dir, &args)
        .expect("cloud48 serve starts");
    serve.health(true).await.expect("cloud48 serve gets ready");
    serve
}

/// Runs the CLI against `url`; returns (exit ok, stdout, stderr).
pub fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(binary())
        .arg("--server")
        .arg(url)
        .args(args)
        .output()
        .expect("cloud48 runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Health monitoring in the background with short periods: a silent server is down within a
/// second.
pub fn fast_health() -> cloud48_engine::core::HealthConfig {
    cloud48_engine::core::HealthConfig {
        background: true,
        heartbeat: Duration::from_millis(50),
        grace: Duration::from_millis(500),
        check: Duration::from_millis(50),
        collector: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// A no-op command with no target, as a test submits it.
pub fn noop() -> cloud48_engine::queue::NewCommand {
    cloud48_engine::queue::NewCommand {
        project: None,
        kind: cloud48_engine::model::CommandKind::Noop,
        target: None,
        params: serde_json::Value::Null,
        requested_by: "test".into(),
    }
}

/// Moves stopped container `id` from core `from` to core `to` as an operator would: `container
/// export ID -o FILE` there, `container import FILE --wait` here. Returns the new container.
pub fn export_then_import(
    from: &str,
    to: &str,
    id: cloud48_engine::model::ContainerId,
    file: &std::path::Path,
) -> cloud48_engine::model::ContainerId {
    let file = file.to_str().unwrap();
    let (ok, _, err) = cli(from, &["container", "export", &id.to_string(), "-o", file]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(to, &["--json", "container", "import", file, "--wait"]);
    assert!(ok, "{err}");
    let imported: serde_json::Value = serde_json::from_str(&out).unwrap();
    cloud48_engine::model::ContainerId(imported["result"]["container_id"].as_i64().unwrap())
}
