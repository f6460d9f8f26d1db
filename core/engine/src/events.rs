//! The event stream: what `GET /v1/events` and `cloud48 events` show.
//!
//! Events are rows of the `events` table, appended by database triggers in the transaction of
//! each status change (see the `m0013_events` migration), so every core of a cluster sees the
//! same log. One publisher per core reads new rows (every `POLL` while anyone listens) and
//! broadcasts them; a subscriber first reads what it missed from the table, then follows the
//! broadcast, falling back to the table when it lags.
//!
//! Invariants: the publisher broadcasts events in increasing id order and never skips a
//! committed one, except a gap in ids that stays unfilled for `GAP_WAIT` (PostgreSQL allots ids
//! before commit, so a lower id may commit later; an id of a rolled-back transaction never
//! does); a subscriber sees each event that matches its filter once, in id order.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};

use crate::model::{Event, Topic};
use crate::queue::store;

/// How often the publisher reads new events while someone listens.
const POLL: Duration = Duration::from_millis(25);
/// How long the publisher waits for a gap in ids to fill before it passes over it.
const GAP_WAIT: Duration = Duration::from_secs(2);
/// Events read from the table at once.
const PAGE: u64 = 1000;
/// Events a slow subscriber may fall behind the broadcast before it reads from the table.
const CHANNEL: usize = 8192;

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only these topics (empty: every topic).
    pub topics: Vec<Topic>,
    /// Only events of this object.
    pub object: Option<(Topic, i64)>,
    /// Only events of this environment: the environment itself, its containers and commands
    /// on the environment.
    pub environment: Option<i64>,
    /// Only events of these projects (`None`: all) ...
    pub projects: Option<Vec<i64>>,
    /// ... and, with `projects`, the servers' events too (which belong to no project).
    pub fleet: bool,
}

impl EventFilter {
    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &Event) -> bool {
        if !self.topics.is_empty() && !self.topics.contains(&e.topic) {
            return false;
        }
        if let Some((topic, id)) = self.object
            && (e.topic != topic || e.object_id != id)
            && e.related != Some(format!("{topic}:{id}"))
        {
            return false;
        }
        if let Some(env) = self.environment {
            let own = e.topic == Topic::Environment && e.object_id == env;
            if !own && e.related != Some(format!("environment:{env}")) {
                return false;
            }
        }
        if let Some(projects) = &self.projects {
            return match e.project_id {
                Some(p) => projects.contains(&p),
                None => self.fleet && e.topic == Topic::Server,
            };
        }
        true
    }

    /// Parses `container:5` (for `object`).
    pub fn parse_object(text: &str) -> Result<(Topic, i64), String> {
        let (topic, id) = text.split_once(':').ok_or_else(|| {
            format!("object '{text}' must be TOPIC:ID, such as container:5 or server:2")
        })?;
        let topic: Topic = topic.parse()?;
        let id = id
            .parse()
            .map_err(|_| format!("object '{text}': '{id}' is not an id"))?;
        Ok((topic, id))
    }
}

#[derive(Deserialize)]
struct Row {
    id: i64,
    at: i64,
    topic: String,
    object_id: i64,
    action: String,
    kind: Option<String>,
    related_type: Option<String>,
    related_id: Option<i64>,
    server_id: Option<i64>,
    requested_by: Option<String>,
    #[serde(default)]
    project_id: Option<i64>,
    #[serde(default)]
    reason: Option<String>,
}

impl Row {
    fn event(self) -> Option<Event> {
        Some(Event {
            id: self.id,
            at: self.at,
            topic: self.topic.parse().ok()?,
            object_id: self.object_id,
            action: self.action,
            kind: self.kind,
            related: match (self.related_type, self.related_id) {
                (Some(t), Some(i)) => Some(format!("{t}:{i}")),
                _ => None,
            },
            server_id: self.server_id,
            by: self.requested_by,
            project_id: self.project_id,
            reason: self.reason,
        })
    }
}

/// Events with an id above `after` and at most `upto`, in id order, at most `PAGE`.
pub async fn read<C: ConnectionTrait>(db: &C, after: i64, upto: i64) -> Result<Vec<Event>, DbErr> {
    let rows: Vec<Row> = store::json_objects(
        db,
        &[
            "id",
            "at",
            "topic",
            "object_id",
            "action",
            "kind",
            "related_type",
            "related_id",
            "server_id",
            "requested_by",
            "project_id",
            "reason",
        ],
        &format!("(SELECT * FROM events WHERE id > $1 AND id <= $2 ORDER BY id LIMIT {PAGE}) AS e"),
        vec![after.into(), upto.into()],
    )
    .await?;
    let mut events: Vec<Event> = rows.into_iter().filter_map(Row::event).collect();
    events.sort_by_key(|e| e.id);
    Ok(events)
}

/// The highest event id (0 when there is none).
pub async fn latest<C: ConnectionTrait>(db: &C) -> Result<i64, DbErr> {
    let row = db
        .query_one_raw(store::sql(
            db,
            "SELECT COALESCE(MAX(id), 0) AS id FROM events",
            vec![],
        ))
        .await?;
    Ok(match row {
        Some(r) => r.try_get::<i64>("", "id")?,
        None => 0,
    })
}

/// Deletes events older than `before` (milliseconds since the epoch); returns how many. Ids
/// follow time (the clock of one database), so the cut is the first id, from the oldest, whose
/// event is recent: found by walking the primary key over just the events to delete.
pub async fn forget<C: ConnectionTrait>(db: &C, before: i64) -> Result<u64, DbErr> {
    Ok(db
        .execute_raw(store::sql(
            db,
            "DELETE FROM events WHERE id < COALESCE( \
               (SELECT id FROM events WHERE at >= $1 ORDER BY id LIMIT 1), \
               (SELECT MAX(id) + 1 FROM events))",
            vec![before.into()],
        ))
        .await?
        .rows_affected())
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// First: the subscription is live and starts after this event id (so a client that
    /// reconnects with it misses nothing).
    Ready(i64),
    /// An event that passed the filter.
    Event(Arc<Shared>),
}

/// An event as it is handed to every subscriber: its JSON, and its Server-Sent Events message,
/// are encoded once, not once per subscriber (a thousand subscribers share one encoding).
#[derive(Debug, PartialEq, Eq)]
pub struct Shared {
    event: Event,
    json: String,
    /// The SSE message, made by the first subscriber that sends it.
    sse: OnceLock<Bytes>,
}

impl Shared {
    /// `event`, encoded.
    pub fn new(event: Event) -> Arc<Shared> {
        // An `Event` has only strings and numbers: encoding cannot fail.
        let json = serde_json::to_string(&event).unwrap_or_default();
        Arc::new(Shared {
            event,
            json,
            sse: OnceLock::new(),
        })
    }

    /// An event received as JSON (a client of the stream), keeping the text.
    pub fn decode(json: String) -> Result<Arc<Shared>, serde_json::Error> {
        let event = serde_json::from_str(&json)?;
        Ok(Arc::new(Shared {
            event,
            json,
            sse: OnceLock::new(),
        }))
    }

    /// The event as JSON.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The event as one Server-Sent Events message (`id`, `event` its topic, `data` its JSON),
    /// shared by every subscriber that sends it.
    pub fn sse(&self) -> Bytes {
        self.sse
            .get_or_init(|| sse_message(Some(self.event.id), self.event.topic.as_str(), &self.json))
            .clone()
    }
}

/// One Server-Sent Events message: `id` (if any), `event`, and `data` on as many `data:` lines
/// as it has lines, ended by a blank line.
pub fn sse_message(id: Option<i64>, event: &str, data: &str) -> Bytes {
    use std::fmt::Write;
    let mut out = String::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    let _ = writeln!(out, "event: {event}");
    // A line ends at "\r\n", "\r" or "\n", as the SSE parser reads it.
    for line in data.replace("\r\n", "\n").split(['\r', '\n']) {
        let _ = writeln!(out, "data: {line}");
    }
    out.push('\n');
    Bytes::from(out)
}

impl std::ops::Deref for Shared {
    type Target = Event;
    fn deref(&self) -> &Event {
        &self.event
    }
}

/// The event stream of a core; cheap to clone.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    tx: broadcast::Sender<Arc<Shared>>,
    /// Every event up to this id was broadcast (or passed over, with no one listening); -1
    /// until the publisher first ran.
    published: watch::Sender<i64>,
}

impl Events {
    /// The stream of `db`'s events; nothing is read until `publish` runs.
    pub fn new(db: DatabaseConnection) -> Self {
        Events {
            inner: Arc::new(Inner {
                db,
                tx: broadcast::channel(CHANNEL).0,
                published: watch::Sender::new(-1),
            }),
        }
    }

    /// Runs the publisher until the task is aborted.
    pub async fn publish(self) {
        let mut gap: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self
                .publish_once(&mut gap, tokio::time::Instant::now())
                .await
            {
                tracing::warn!(error = %e, "reading the event log failed");
            }
        }
    }

    /// Broadcasts what was committed since the last pass; `now` dates a gap in ids.
    async fn publish_once(
        &self,
        gap: &mut Option<tokio::time::Instant>,
        now: tokio::time::Instant,
    ) -> Result<(), DbErr> {
        let inner = &self.inner;
        let mut cursor = *inner.published.borrow();
        if cursor < 0 || inner.tx.receiver_count() == 0 {
            // No one listens: nothing to send, and nothing to hold back for. Never backwards:
            // once retention has emptied the table, its highest id reads 0.
            let now = latest(&inner.db).await?;
            inner.published.send_replace(cursor.max(now));
            *gap = None;
            return Ok(());
        }
        loop {
            let page = read(&inner.db, cursor, i64::MAX).await?;
            let full = page.len() as u64 >= PAGE;
            for e in page {
                if e.id != cursor + 1 {
                    let since = *gap.get_or_insert(now);
                    if now.duration_since(since) < GAP_WAIT {
                        inner.published.send_replace(cursor);
                        return Ok(());
                    }
                }
                *gap = None;
                cursor = e.id;
                let _ = inner.tx.send(Shared::new(e));
            }
            inner.published.send_replace(cursor);
            if !full {
                return Ok(());
            }
        }
    }

    /// The events that pass `filter`, after id `after` (those still kept in the table first) or,
    /// without it, from now on; then new ones as they are published.
    pub fn subscribe(
        &self,
        after: Option<i64>,
        filter: EventFilter,
    ) -> impl Stream<Item = Result<Delivery, DbErr>> + Send + use<> {
        let inner = self.inner.clone();
        let mut rx = inner.tx.subscribe();
        async_stream::try_stream! {
            // Wait until the publisher has run once, so `published` means something.
            let mut published = inner.published.subscribe();
            let now = published.wait_for(|p| *p >= 0).await.map(|p| *p);
            let now = now.map_err(|_| DbErr::Custom("the event publisher stopped".into()))?;
            // A resume point past the newest event (from another database, or mistyped)
            // starts at the newest, as `Ready` says: it would otherwise skip every new event.
            let mut sent = after.map_or(now, |a| a.clamp(0, now));
            yield Delivery::Ready(sent);
            loop {
                // From the table, up to what the publisher has broadcast.
                let upto = *inner.published.borrow();
                while sent < upto {
                    let page = read(&inner.db, sent, upto).await?;
                    let Some(last) = page.last().map(|e| e.id) else { break };
                    for e in page {
                        if filter.matches(&e) {
                            yield Delivery::Event(Shared::new(e));
                        }
                    }
                    sent = last;
                }
                sent = sent.max(upto);
                // Then live, until this subscriber falls behind.
                loop {
                    match rx.recv().await {
                        Ok(e) if e.id <= sent => continue,
                        Ok(e) => {
                            sent = e.id;
                            if filter.matches(&e) {
                                yield Delivery::Event(e);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        }
    }

    /// Subscribers listening now.
    pub fn listeners(&self) -> usize {
        self.inner.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: Topic, object_id: i64, related: Option<&str>) -> Event {
        Event {
            id: 1,
            at: 0,
            topic,
            object_id,
            action: "running".into(),
            kind: None,
            related: related.map(str::to_string),
            server_id: None,
            by: None,
            project_id: (topic != Topic::Server).then_some(1),
            reason: None,
        }
    }

    #[test]
    fn a_filter_keeps_its_topics_its_object_and_its_environment() {
        let all = EventFilter::default();
        let c5 = event(Topic::Container, 5, Some("environment:2"));
        let cmd = event(Topic::Command, 9, Some("container:5"));
        let env2 = event(Topic::Environment, 2, None);
        let s1 = event(Topic::Server, 1, None);
        assert!([&c5, &cmd, &env2, &s1].iter().all(|e| all.matches(e)));

        let servers = EventFilter {
            topics: vec![Topic::Server],
            ..Default::default()
        };
        assert!(servers.matches(&s1) && !servers.matches(&c5));

        let object = EventFilter {
            object: Some(EventFilter::parse_object("container:5").unwrap()),
            ..Default::default()
        };
        assert!(object.matches(&c5), "the container itself");
        assert!(object.matches(&cmd), "a command on it");
        assert!(!object.matches(&env2));

        let env = EventFilter {
            environment: Some(2),
            ..Default::default()
        };
        assert!(env.matches(&env2) && env.matches(&c5));
        assert!(!env.matches(&s1) && !env.matches(&cmd));

        // A caller limited to projects sees theirs and the servers'; naming a project drops
        // the servers' events, which belong to none.
        let other = Event {
            project_id: Some(2),
            ..c5.clone()
        };
        let mine = EventFilter {
            projects: Some(vec![1]),
            fleet: true,
            ..Default::default()
        };
        assert!(mine.matches(&c5) && mine.matches(&cmd) && mine.matches(&s1));
        assert!(!mine.matches(&other));
        let fleetless = Event {
            project_id: None,
            ..cmd.clone()
        };
        assert!(
            !mine.matches(&fleetless),
            "a fleet-wide command is not a project's"
        );
        let named = EventFilter {
            fleet: false,
            ..mine
        };
        assert!(named.matches(&c5) && !named.matches(&s1));
    }

    async fn memory_db() -> DatabaseConnection {
        use migrations::sea_orm_migration::MigratorTrait;
        let mut opts = sea_orm::ConnectOptions::new("sqlite::memory:");
        opts.max_connections(1).min_connections(1);
        let db = sea_orm::Database::connect(opts).await.unwrap();
        migrations::Migrator::up(&db, None).await.unwrap();
        db
    }

    async fn insert(db: &DatabaseConnection, id: i64) {
        insert_at(db, id, 0).await
    }

    async fn insert_at(db: &DatabaseConnection, id: i64, at: i64) {
        db.execute_unprepared(&format!(
            "INSERT INTO events (id, at, topic, object_id, action) \
             VALUES ({id}, {at}, 'server', {id}, 'up')"
        ))
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn retention_forgets_the_oldest_events_up_to_the_first_recent_one() {
        let db = memory_db().await;
        assert_eq!(forget(&db, 100).await.unwrap(), 0, "an empty log");
        for (id, at) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            insert_at(&db, id, at).await;
        }
        assert_eq!(forget(&db, 25).await.unwrap(), 2);
        let left: Vec<i64> = read(&db, 0, i64::MAX)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(left, [3, 4]);
        assert_eq!(forget(&db, 1000).await.unwrap(), 2, "all of them");
        // Ids never go back, even once every event is gone (AUTOINCREMENT): a client resuming
        // after id 4 must not miss the next event.
        db.execute_unprepared(
            "INSERT INTO events (at, topic, object_id, action) VALUES (50, 'server', 1, 'up')",
        )
        .await
        .unwrap();
        assert_eq!(latest(&db).await.unwrap(), 5);
    }

    #[test]
    fn an_sse_message_puts_each_line_of_its_data_on_a_data_line() {
        assert_eq!(
            &sse_message(Some(7), "command", "{}")[..],
            b"id: 7\nevent: command\ndata: {}\n\n"
        );
        assert_eq!(
            &sse_message(None, "error", "one\r\ntwo\rthree\n")[..],
            b"event: error\ndata: one\ndata: two\ndata: three\ndata: \n\n"
        );
        let e = Shared::new(Event {
            id: 9,
            ..event(Topic::Server, 1, None)
        });
        let text = String::from_utf8(e.sse().to_vec()).unwrap();
        assert_eq!(
            text,
            format!("id: 9\nevent: server\ndata: {}\n\n", e.json())
        );
    }

    fn received(rx: &mut broadcast::Receiver<Arc<Shared>>) -> Vec<i64> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|e| e.id)).collect()
    }

    #[tokio::test]
    async fn the_publisher_holds_back_behind_a_gap_until_it_fills_or_times_out() {
        let db = memory_db().await;
        let events = Events::new(db.clone());
        let mut rx = events.inner.tx.subscribe();
        let t0 = tokio::time::Instant::now();
        let mut gap = None;
        events.publish_once(&mut gap, t0).await.unwrap();
        assert_eq!(*events.inner.published.borrow(), 0, "an empty log");

        for id in [1, 2, 4] {
            insert(&db, id).await;
        }
        events.publish_once(&mut gap, t0).await.unwrap();
        assert_eq!(received(&mut rx), [1, 2], "4 waits for 3");
        assert_eq!(*events.inner.published.borrow(), 2);

        // 3 commits late: it goes out before 4.
        insert(&db, 3).await;
        events
            .publish_once(&mut gap, t0 + GAP_WAIT / 2)
            .await
            .unwrap();
        assert_eq!(received(&mut rx), [3, 4]);

        // With no one listening, an emptied table does not take the cursor back.
        drop(rx);
        db.execute_unprepared("DELETE FROM events").await.unwrap();
        events.publish_once(&mut gap, t0).await.unwrap();
        assert_eq!(*events.inner.published.borrow(), 4);
        let mut rx = events.inner.tx.subscribe();

        // 5 never comes (its transaction rolled back): 6 goes out once the gap is old enough.
        insert(&db, 6).await;
        events.publish_once(&mut gap, t0 + GAP_WAIT).await.unwrap();
        assert_eq!(received(&mut rx), Vec::<i64>::new());
        events
            .publish_once(&mut gap, t0 + GAP_WAIT * 2 + Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(received(&mut rx), [6]);
        assert_eq!(*events.inner.published.borrow(), 6);
    }

    #[tokio::test]
    async fn triggers_log_each_status_change_once() {
        let db = memory_db().await;
        let run = |sql: &'static str| {
            let db = db.clone();
            async move { db.execute_unprepared(sql).await.unwrap() }
        };
        run(
            "INSERT INTO servers (id, platform_id, name, driver, status, cpu_millis, memory_mb, \
             disk_mb, labels, created_at) VALUES (7, 1, 's', 'sim', 'up', 1, 1, 1, '[]', 0)",
        )
        .await;
        run("UPDATE servers SET status = 'down' WHERE id = 7").await;
        run("UPDATE servers SET status = 'down', labels = '[\"x\"]' WHERE id = 7").await;
        run("UPDATE servers SET status = 'up' WHERE id = 7").await;
        let log = read(&db, 0, i64::MAX).await.unwrap();
        let actions: Vec<(&str, i64, Option<i64>)> = log
            .iter()
            .map(|e| (e.action.as_str(), e.object_id, e.server_id))
            .collect();
        assert_eq!(
            actions,
            [("up", 7, Some(7)), ("down", 7, Some(7)), ("up", 7, Some(7))],
            "an update that leaves the status alone is no event"
        );
        assert!(log.windows(2).all(|w| w[0].id < w[1].id));
        assert!(
            log.iter()
                .all(|e| e.topic == Topic::Server && e.kind.as_deref() == Some("sim"))
        );
        assert_eq!(latest(&db).await.unwrap(), log[2].id);
    }

    #[test]
    fn a_bad_object_says_what_is_expected() {
        let e = EventFilter::parse_object("container").unwrap_err();
        assert!(e.contains("TOPIC:ID"), "{e}");
        let e = EventFilter::parse_object("vm:3").unwrap_err();
        assert!(e.contains("unknown Topic 'vm'"), "{e}");
        let e = EventFilter::parse_object("server:x").unwrap_err();
        assert!(e.contains("'x' is not an id"), "{e}");
    }
}
