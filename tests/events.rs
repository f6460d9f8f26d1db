//! The event stream (`GET /v1/events`, `cloud48 events`): every status change, in order, on
//! SQLite and PostgreSQL; resumable after the last id; filtered by topic and object; shown
//! only to those who may read what it describes; forgotten after the retention window.

use std::pin::Pin;
use std::time::Duration;

use cloud48_core::cli::{Client, Credentials};
use cloud48_engine::auth::{Anonymous, AuthConfig, Role, UserRecord};
use cloud48_engine::events::Delivery;
use cloud48_engine::model::{CommandId, Event, Topic};
use futures::{Stream, StreamExt};
use serde_json::json;

use crate::common::{ManualClock, Opts, TestCore};

type Events = Pin<Box<dyn Stream<Item = anyhow::Result<Delivery>> + Send>>;

/// Opens a stream at `path`; returns it with the id it starts after.
pub(crate) async fn open(client: &Client, path: &str) -> (Events, i64) {
    let mut s: Events = Box::pin(client.events(path).await.unwrap());
    match next(&mut s).await {
        Delivery::Ready(after) => (s, after),
        other => panic!("a stream starts with its ready message, not {other:?}"),
    }
}

async fn next(s: &mut Events) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("an event within 30 s")
        .expect("the stream goes on")
        .unwrap()
}

/// Events from `s` up to and including the first that `last` accepts.
pub(crate) async fn until(s: &mut Events, last: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        if let Delivery::Event(e) = next(s).await {
            let done = last(&e);
            seen.push(Event::clone(&e));
            if done {
                return seen;
            }
        }
    }
}

fn of(seen: &[Event], topic: Topic, id: i64) -> Vec<String> {
    seen.iter()
        .filter(|e| e.topic == topic && e.object_id == id)
        .map(|e| e.action.clone())
        .collect()
}

async fn a_container_s_life_is_told_in_order_and_a_stream_resumes(t: &TestCore) {
    let (mut all, start) = open(&t.client, "/v1/events").await;
    let (mut containers, _) = open(&t.client, "/v1/events?topic=container").await;
    let a: serde_json::Value = t
        .client
        .post("/v1/containers", &json!({ "type": "plain" }))
        .await
        .unwrap();
    let cmd = a["command_id"].as_i64().unwrap();
    let id = t.created(cmd).await.0;
    let seen = until(&mut all, |e| {
        e.topic == Topic::Command && e.object_id == cmd && e.action == "succeeded"
    })
    .await;
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id), "{seen:?}");
    assert!(seen[0].id > start);
    let told = of(&seen, Topic::Command, cmd);
    assert_eq!(told.first().map(String::as_str), Some("queued"), "{told:?}");
    assert!(told.contains(&"running".to_string()), "{told:?}");
    let queued = seen
        .iter()
        .find(|e| e.topic == Topic::Command && e.object_id == cmd)
        .unwrap();
    assert_eq!(queued.kind.as_deref(), Some("container.create"));
    assert_eq!(queued.by.as_deref(), Some("anonymous"));
    // The container: created, then running on a server.
    let life = until(&mut containers, |e| {
        e.object_id == id && e.action == "running"
    })
    .await;
    assert!(life.iter().all(|e| e.topic == Topic::Container), "{life:?}");
    assert_eq!(of(&life, Topic::Container, id)[0], "creating");
    assert!(life.last().unwrap().server_id.is_some());
    assert_eq!(life.last().unwrap().kind.as_deref(), Some("plain"));

    // A stream opened after the first event replays the rest exactly.
    let (mut again, after) = open(&t.client, &format!("/v1/events?after={}", seen[0].id)).await;
    assert_eq!(after, seen[0].id);
    let last = seen.last().unwrap().id;
    let replayed = until(&mut again, |e| e.id >= last).await;
    assert_eq!(replayed, seen[1..]);

    // A resume point past the newest event starts at the newest, and new events come.
    let (mut ahead, after) = open(&t.client, "/v1/events?after=999999999").await;
    assert!(after >= last && after < 999999999, "{after}");

    // One object, and the commands on it: a stop of the container.
    let (mut one, _) = open(&t.client, &format!("/v1/events?object=container:{id}")).await;
    let stop: serde_json::Value = t
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "stop" }),
        )
        .await
        .unwrap();
    let stop = stop["command_id"].as_i64().unwrap();
    t.ok(stop).await;
    let told = until(&mut one, |e| {
        e.topic == Topic::Container && e.action == "stopped"
    })
    .await;
    assert!(
        told.iter()
            .all(|e| e.object_id == id || e.related.as_deref() == Some(&format!("container:{id}"))),
        "{told:?}"
    );
    assert!(of(&told, Topic::Command, stop).contains(&"running".to_string()));
    let heard = until(&mut ahead, |e| {
        e.topic == Topic::Command && e.object_id == stop
    })
    .await;
    assert!(heard.iter().all(|e| e.id > after), "{heard:?}");

    // A create that no server can take fails; the events of the command and of the container
    // say why, without another request.
    let (mut containers, _) = open(&t.client, "/v1/events?topic=container").await;
    let big: serde_json::Value = t
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "plain", "requirements": {
                "cpu_millis": 1, "memory_mb": 1u64 << 30, "disk_mb": 1 } }),
        )
        .await
        .unwrap();
    let (cmd, cid) = (
        big["command_id"].as_i64().unwrap(),
        big["object_id"].as_i64().unwrap(),
    );
    let failed = until(&mut all, |e| {
        e.topic == Topic::Command && e.object_id == cmd && e.action == "failed"
    })
    .await;
    let why = failed.last().unwrap().reason.clone().unwrap_or_default();
    assert!(why.contains("no server fits"), "{failed:?}");
    let gone = until(&mut containers, |e| {
        e.object_id == cid && e.action == "failed"
    })
    .await;
    let why = gone.last().unwrap().reason.clone().unwrap_or_default();
    assert!(
        why.contains(&format!("command {cmd}")) && why.contains("no server fits"),
        "{gone:?}"
    );
    assert!(
        of(&gone, Topic::Container, cid)
            .iter()
            .all(|a| a != "running"),
        "{gone:?}"
    );
}

#[tokio::test]
async fn a_container_s_life_is_told_in_order_and_a_stream_resumes_on_sqlite() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    a_container_s_life_is_told_in_order_and_a_stream_resumes(&t).await;
}

#[tokio::test]
async fn a_container_s_life_is_told_in_order_and_a_stream_resumes_on_postgres() {
    let Some(t) = TestCore::start(Opts {
        postgres: true,
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    a_container_s_life_is_told_in_order_and_a_stream_resumes(&t).await;
}

#[tokio::test]
async fn a_caller_sees_only_the_topics_it_may_read() {
    let realm = "cloud48";
    let t = TestCore::start(Opts {
        auth: AuthConfig {
            realm: realm.into(),
            anonymous: Anonymous::Read,
            users: vec![UserRecord::with_password(
                "otto",
                Role::Operator,
                realm,
                "secret",
            )],
            ..AuthConfig::default()
        },
        ..Opts::default()
    })
    .await
    .unwrap();
    let otto = Client::new(&t.url).with_credentials(Credentials {
        user: "otto".into(),
        password: "secret".into(),
    });
    let anonymous = Client::new(&t.url);
    // Anonymous callers read fleet and environments by default: not commands. The refusal is
    // a 401 with a challenge, so that a client with credentials (`curl --digest`) signs in.
    let resp = reqwest::get(format!("{}/v1/events?topic=command", t.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Digest ")
    );
    let refused = anonymous
        .events("/v1/events?topic=command")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("HTTP 401"), "{refused}");
    assert!(refused.contains("anonymous_read"), "{refused}");
    let (mut anon, _) = open(&anonymous, "/v1/events").await;
    let (mut full, _) = open(&otto, "/v1/events").await;
    let a: cloud48_engine::model::Accepted = otto
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    let env = a.object_id.unwrap();
    t.ok(a.command_id).await;
    let active = |e: &Event| e.topic == Topic::Environment && e.action == "active";
    let everything = until(&mut full, active).await;
    assert!(
        everything.iter().any(|e| e.topic == Topic::Command),
        "otto sees the command: {everything:?} of {:?}",
        cloud48_engine::events::read(t.core.db(), 0, i64::MAX)
            .await
            .unwrap()
    );
    let shown = until(&mut anon, active).await;
    assert!(
        shown.iter().all(|e| e.topic == Topic::Environment),
        "anonymous sees only the environment: {shown:?}"
    );
    assert_eq!(
        of(&shown, Topic::Environment, env).last().unwrap(),
        "active"
    );
    assert_eq!(shown.last().unwrap().kind.as_deref(), Some("shop"));
}

/// Events ready together leave in one chunk, not in one write each (with a thousand
/// subscribers, a burst is otherwise a thousand writes per event): a stream opened after id 0
/// replays what the table holds at once. The body is plain Server-Sent Events.
#[tokio::test]
async fn events_ready_together_leave_in_one_chunk() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let queue = t.core.queue();
    let ids = queue
        .enqueue_in(t.core.db(), vec![crate::common::noop(); 20], None)
        .await
        .unwrap();
    queue.wake();
    for id in ids {
        let done = queue.wait(CommandId(id), Duration::from_secs(30)).await;
        assert!(done.unwrap().status.is_terminal());
    }
    let mut resp = reqwest::get(format!("{}/v1/events?topic=command&after=0", t.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let (mut seen, mut most, mut text) = (0, 0, String::new());
    while seen < 60 {
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .expect("a chunk within 30 s")
            .unwrap()
            .expect("the stream goes on");
        let chunk = String::from_utf8(chunk.to_vec()).unwrap();
        let n = chunk.matches("event: command\n").count();
        (seen, most) = (seen + n, most.max(n));
        text.push_str(&chunk);
    }
    assert!(most > 1, "every event came alone: {text}");
    assert!(
        text.starts_with("id: 0\nevent: ready\ndata: 0\n\nid: "),
        "{text}"
    );
    assert!(text.contains("\nevent: command\ndata: {\"id\":"), "{text}");
}

#[tokio::test]
async fn bad_filters_are_refused_with_what_to_write() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    for (query, says) in [
        (
            "topic=vm",
            "unknown topic 'vm' (expected one of: command, container, server, environment)",
        ),
        ("object=vm:5", "object 'vm:5': unknown topic 'vm'"),
        ("object=container", "TOPIC:ID"),
        ("environment=nowhere", "nowhere"),
        (
            "since=3",
            "unknown query parameter 'since': GET /v1/events takes only ",
        ),
        ("object=container:99999", "container 99999 does not exist"),
        ("object=server:99999", "does not exist"),
    ] {
        let e = t
            .client
            .events(&format!("/v1/events?{query}"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{query} is refused"))
            .to_string();
        assert!(e.contains(says), "{query}: {e}");
    }
    for bad in ["yesterday", "-5"] {
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/events", t.url))
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 422, "{bad}");
        assert!(
            resp.text().await.unwrap().contains("Last-Event-ID"),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn the_collector_forgets_events_older_than_the_window() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = ManualClock::at(now);
    let t = TestCore::start(Opts {
        clock: Some(clock.clone()),
        ..Opts::default()
    })
    .await
    .unwrap();
    let a: serde_json::Value = t
        .client
        .post("/v1/containers", &json!({ "type": "plain" }))
        .await
        .unwrap();
    t.created(CommandId(a["command_id"].as_i64().unwrap()))
        .await;
    let db = t.core.db();
    let kept = cloud48_engine::events::read(db, 0, i64::MAX).await.unwrap();
    assert!(!kept.is_empty());
    let report = t.core.collector().collect(None).await.unwrap();
    assert_eq!(report.events, 0, "a fresh event stays");
    clock.advance(24 * 3600 * 1000 + 60_000);
    let report = t.core.collector().collect(None).await.unwrap();
    assert!(report.events >= kept.len() as u64, "{report:?}");
    assert_eq!(
        cloud48_engine::events::read(db, 0, i64::MAX).await.unwrap(),
        Vec::<Event>::new()
    );
}

/// On PostgreSQL the events are written by statement triggers: rows inserted or changed
/// together by one statement are each told, in id order, and an update that changes no
/// status tells nothing.
#[tokio::test]
async fn rows_changed_together_are_each_told_in_order_on_postgres() {
    use sea_orm::ConnectionTrait;
    let Some(t) = TestCore::start(Opts {
        postgres: true,
        ..Opts::default()
    })
    .await
    else {
        return;
    };
    let db = t.core.db();
    let before = cloud48_engine::events::latest(db).await.unwrap();
    // Three commands due in the far future, so that no core claims them.
    let row = "('noop', 'queued', NULL, NULL, NULL, '{}', '{}', 0, 0, 9000000000000000, 'events-test', 1, NULL)";
    let ids: Vec<i64> = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!(
                "INSERT INTO commands (kind, status, target_type, target_id, parent_id, params, \
                 progress, step, attempts, run_after, requested_by, created_at, project_id) \
                 VALUES {row}, {row}, {row} RETURNING id"
            ),
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<i64>("", "id").unwrap())
        .collect();
    let mut ids = ids;
    ids.sort_unstable();
    let [a, b, c] = ids[..] else {
        panic!("three ids: {ids:?}")
    };
    for sql in [
        // Two change status in one statement (listed out of order).
        format!("UPDATE commands SET status = 'cancelled' WHERE id IN ({c}, {a})"),
        // No status changes.
        format!("UPDATE commands SET progress = '{{\"x\": 1}}' WHERE id = {b}"),
        format!("UPDATE commands SET status = status WHERE id IN ({a}, {b}, {c})"),
    ] {
        db.execute_unprepared(&sql).await.unwrap();
    }
    let told: Vec<Event> = cloud48_engine::events::read(db, before, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.topic == Topic::Command && ids.contains(&e.object_id))
        .collect();
    let actions: Vec<(i64, &str)> = told
        .iter()
        .map(|e| (e.object_id, e.action.as_str()))
        .collect();
    let want = [
        (a, "queued"),
        (b, "queued"),
        (c, "queued"),
        (a, "cancelled"),
        (c, "cancelled"),
    ];
    assert_eq!(actions, want);
    let by: Vec<Option<&str>> = told.iter().map(|e| e.by.as_deref()).collect();
    assert!(by.iter().all(|b| *b == Some("events-test")), "{by:?}");
}

/// A core stopped (SIGTERM) while a client follows its event stream ends the stream and exits;
/// it had waited for the client to hang up, keeping its duties all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_core_ends_its_event_streams_and_exits() {
    let dir = crate::common::tempdir();
    let mut serve = crate::common::serve(dir.path(), &["--anonymous", "full"]).await;
    let (mut events, _) = open(&Client::new(&serve.url), "/v1/events").await;
    let pid = serve.child.id() as i32;
    // SAFETY: signalling the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    // Well within the 10 s a stopping core waits for other open requests: ended, not cut.
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(Ok(_)) = events.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended");
    let status = crate::common::eventually("the core exits", || {
        let exited = serve.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status}");
}
