//! The core's metrics in the Prometheus text format (`GET /metrics`), with `prometheus-client`.
//!
//! What the core measures as it works (how long commands waited for a worker, hook calls,
//! every database statement) is recorded as it happens in the `Recorder` the queue holds; what
//! it counts (servers, commands, containers) is read when scraped: servers from memory, the
//! active part of the queue from its index, and the containers and finished commands from a
//! census that is at most `CENSUS_EVERY` old and taken off the scrape's path, so that a scrape
//! stays cheap with a million containers.
//!
//! Invariant: a scrape never waits for a census except the very first.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use serde::Deserialize;

use crate::core::{Core, CoreError};
use crate::queue::store;

/// The content type of what `render` returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How old the census of containers and finished commands may be.
const CENSUS_EVERY: Duration = Duration::from_secs(10);

/// 0.5 ms to about 16 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookCall {
    r#type: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    status: String,
    r#type: String,
    project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectFigure {
    project: String,
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerName {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

/// Counts of the big tables.
#[derive(Debug, Clone, Default)]
struct Census {
    /// (status, type, project, count).
    containers: Vec<(String, String, i64, i64)>,
    /// Projects with a quota: (project, quota, usage).
    quotas: Vec<(i64, crate::model::Quota, crate::model::Usage)>,
    /// Finished commands: (status, count).
    finished: Vec<(String, i64)>,
    taken: Option<Instant>,
}

/// What the core measures as it works; cheap to record into from any task.
pub struct Recorder {
    queue_wait: Family<Kind, Histogram, fn() -> Histogram>,
    hooks: Family<HookCall, Histogram, fn() -> Histogram>,
    statements: Histogram,
    failed_statements: Counter,
    census: Mutex<Census>,
    counting: AtomicBool,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            queue_wait: Family::new_with_constructor(seconds),
            hooks: Family::new_with_constructor(seconds),
            statements: seconds(),
            failed_statements: Counter::default(),
            census: Mutex::default(),
            counting: AtomicBool::new(false),
        }
    }
}

impl Recorder {
    /// A command of `kind` was claimed `waited_ms` after it could run.
    pub fn queue_wait(&self, kind: &str, waited_ms: i64) {
        self.queue_wait
            .get_or_create(&Kind { kind: kind.into() })
            .observe(waited_ms.max(0) as f64 / 1000.0);
    }

    /// A hook of a container type ran.
    pub fn hook(&self, type_id: &str, hook: &str, took: Duration) {
        self.hooks
            .get_or_create(&HookCall {
                r#type: crate::model::type_name(type_id).into(),
                hook: hook.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// A database statement ran (sea-orm's metric callback).
    pub fn statement(&self, took: Duration, failed: bool) {
        self.statements.observe(took.as_secs_f64());
        if failed {
            self.failed_statements.inc();
        }
    }

    /// The census, taken now if there is none yet, else as it is, with a new one started in
    /// the background when it is old.
    async fn census(self: &std::sync::Arc<Self>, db: &DatabaseConnection) -> Census {
        let current = self.census.lock().unwrap().clone();
        match current.taken {
            None => {
                let fresh = take_census(db).await.unwrap_or_default();
                *self.census.lock().unwrap() = fresh.clone();
                fresh
            }
            Some(at) => {
                if at.elapsed() >= CENSUS_EVERY && !self.counting.swap(true, Ordering::SeqCst) {
                    let (me, db) = (self.clone(), db.clone());
                    tokio::spawn(async move {
                        match take_census(&db).await {
                            Ok(c) => *me.census.lock().unwrap() = c,
                            Err(e) => {
                                tracing::warn!(error = %e, "counting containers for /metrics failed")
                            }
                        }
                        me.counting.store(false, Ordering::SeqCst);
                    });
                }
                current
            }
        }
    }
}

async fn take_census(db: &DatabaseConnection) -> Result<Census, CoreError> {
    let containers: Vec<(String, String, i64, i64)> = store::json_rows(
        db,
        "status, type_id, project_id, n",
        "(SELECT status, type_id, project_id, COUNT(*) AS n FROM containers \
          GROUP BY status, type_id, project_id) AS c",
        vec![],
    )
    .await?;
    // Usage sums requirements container by container: only for projects with a quota, whose
    // containers it bounds.
    let mut quotas = Vec::new();
    for p in crate::projects::limited_quotas(db).await? {
        let used = crate::projects::usage(db, p.0, None).await?;
        quotas.push((p.0, p.1, used));
    }
    let finished: Vec<(String, i64)> = store::json_rows(
        db,
        "status, n",
        "(SELECT status, COUNT(*) AS n FROM commands \
          WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY status) AS c",
        vec![],
    )
    .await?;
    Ok(Census {
        containers,
        quotas,
        finished,
        taken: Some(Instant::now()),
    })
}

/// Commands queued, running and waiting (read through the queue's status index).
async fn active_commands<C: ConnectionTrait>(db: &C) -> Result<Vec<(String, i64)>, DbErr> {
    store::json_rows(
        db,
        "status, n",
        "(SELECT status, COUNT(*) AS n FROM commands \
          WHERE status IN ('queued', 'running', 'waiting') GROUP BY status) AS c",
        vec![],
    )
    .await
}

#[derive(Deserialize)]
struct ServerRow(i64, String);

/// The containers of the census by status, type and project, and each limited project's quota
/// and usage by resource; `only`: just these projects'.
fn project_families(
    reg: &mut Registry,
    census: &Census,
    names: &std::collections::HashMap<i64, String>,
    only: Option<&[i64]>,
) {
    let shown = |p: i64| only.is_none_or(|o| o.contains(&p));
    let name = |p: i64| names.get(&p).cloned().unwrap_or_else(|| p.to_string());
    let containers = Family::<ContainerLabels, Gauge>::default();
    for (status, ty, project, n) in &census.containers {
        if shown(*project) {
            containers
                .get_or_create(&ContainerLabels {
                    status: status.clone(),
                    r#type: ty.clone(),
                    project: name(*project),
                })
                .set(*n);
        }
    }
    reg.register(
        "containers",
        "Containers by status, type and project, as of the census",
        containers,
    );
    let (limits, used) = (
        Family::<ProjectFigure, Gauge>::default(),
        Family::<ProjectFigure, Gauge>::default(),
    );
    for (project, quota, usage) in census.quotas.iter().filter(|q| shown(q.0)) {
        let figures = [
            ("containers", quota.containers, usage.containers),
            ("cpu_millis", quota.cpu_millis, usage.resources.cpu_millis),
            ("memory_mb", quota.memory_mb, usage.resources.memory_mb),
            ("disk_mb", quota.disk_mb, usage.resources.disk_mb),
        ];
        for (resource, limit, n) in figures {
            let label = ProjectFigure {
                project: name(*project),
                resource: resource.into(),
            };
            if let Some(l) = limit {
                limits.get_or_create(&label).set(l as i64);
            }
            used.get_or_create(&label).set(n as i64);
        }
    }
    reg.register(
        "project_quota",
        "What a project with a quota may use, by resource (unlimited ones left out)",
        limits,
    );
    reg.register(
        "project_usage",
        "What the live containers of a project with a quota use, by resource, as of the census",
        used,
    );
}

/// The metrics of `core`, in the Prometheus text format; `only`: a caller limited to these
/// projects sees just their containers and quotas.
pub async fn render(core: &Core, only: Option<&[i64]>) -> Result<String, CoreError> {
    let rec = core.queue().recorder();
    let db = core.db();
    // The census reads whole tables: on its own connection, never in the core's way.
    let census = rec.census(core.reader()).await;
    let names = crate::projects::names(db).await?;
    let mut reg = Registry::with_prefix("cloud48");
    project_families(&mut reg, &census, &names, only);
    if only.is_some() {
        return encode(&reg);
    }
    let active = active_commands(db).await?;
    let names: Vec<ServerRow> = store::json_rows(db, "id, name", "servers", vec![]).await?;
    let name_of = |id: i64| {
        names
            .iter()
            .find(|r| r.0 == id)
            .map_or_else(|| id.to_string(), |r| r.1.clone())
    };

    reg.register(
        "queue_wait_seconds",
        "Time from a command being able to run to a worker claiming it, by command kind",
        rec.queue_wait.clone(),
    );
    reg.register(
        "hook_seconds",
        "Time a container type's hook took, by type and hook",
        rec.hooks.clone(),
    );
    reg.register(
        "database_statement_seconds",
        "Time each database statement took",
        rec.statements.clone(),
    );
    reg.register(
        "database_statement_failures",
        "Database statements that returned an error",
        rec.failed_statements.clone(),
    );

    let commands = Family::<Status, Gauge>::default();
    for (status, n) in active.iter().chain(&census.finished) {
        commands
            .get_or_create(&Status {
                status: status.clone(),
            })
            .set(*n);
    }
    reg.register(
        "commands",
        "Commands by status (finished ones as of the census)",
        commands,
    );
    let depth = Gauge::<i64>::default();
    depth.set(
        active
            .iter()
            .find(|(s, _)| s == "queued")
            .map_or(0, |(_, n)| *n),
    );
    reg.register(
        "queue_depth",
        "Commands queued (waiting for a worker, a lock or a retry)",
        depth,
    );

    let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    age.set(census.taken.map_or(0.0, |t| t.elapsed().as_secs_f64()));
    reg.register(
        "census_age_seconds",
        "Age of the census the container and finished-command counts come from",
        age,
    );

    let servers = Family::<Status, Gauge>::default();
    let heartbeat = Family::<ServerName, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let now = core.queue().now_ms();
    for s in core.placement().snapshot() {
        let status = match (s.up, s.draining) {
            (false, _) => "down",
            (true, true) => "draining",
            (true, false) => "up",
        };
        servers
            .get_or_create(&Status {
                status: status.into(),
            })
            .inc();
        if let Some(beat) = core.health().last(s.id) {
            heartbeat
                .get_or_create(&ServerName {
                    server: name_of(s.id),
                })
                .set((now - beat.at).max(0) as f64 / 1000.0);
        }
    }
    reg.register("servers", "Servers by status", servers);
    reg.register(
        "heartbeat_age_seconds",
        "Time since each server's last heartbeat",
        heartbeat,
    );

    let (placed, refused) = core.placement().decisions();
    let decisions = Family::<Outcome, Counter>::default();
    decisions
        .get_or_create(&Outcome {
            outcome: "placed".into(),
        })
        .inc_by(placed);
    decisions
        .get_or_create(&Outcome {
            outcome: "no_room".into(),
        })
        .inc_by(refused);
    reg.register(
        "placement_decisions",
        "Placement decisions since the core started, by outcome",
        decisions,
    );

    let listeners = Gauge::<i64>::default();
    listeners.set(core.events().listeners() as i64);
    reg.register(
        "event_listeners",
        "Clients following the event stream",
        listeners,
    );
    let waiters = Gauge::<i64>::default();
    waiters.set(core.queue().waiting() as i64);
    reg.register(
        "command_waiters",
        "Requests waiting for a command to finish (?wait=)",
        waiters,
    );

    encode(&reg)
}

fn encode(reg: &Registry) -> Result<String, CoreError> {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, reg)
        .map_err(|e| CoreError::Setup(format!("encoding the metrics failed: {e}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_recorded_is_labelled_by_kind_type_and_hook() {
        let rec = Recorder::default();
        rec.queue_wait("container.create", 1500);
        rec.hook("tomcat@0.2.0", "after-start", Duration::from_millis(3));
        rec.statement(Duration::from_micros(200), true);
        let mut reg = Registry::with_prefix("cloud48");
        reg.register("queue_wait_seconds", "w", rec.queue_wait.clone());
        reg.register("hook_seconds", "h", rec.hooks.clone());
        reg.register(
            "database_statement_failures",
            "f",
            rec.failed_statements.clone(),
        );
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("cloud48_queue_wait_seconds_sum{kind=\"container.create\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("cloud48_hook_seconds_count{type=\"tomcat\",hook=\"after-start\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cloud48_database_statement_failures_total 1"),
            "{text}"
        );
    }
}
