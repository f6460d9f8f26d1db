//! `GET /metrics`: the Prometheus text format, with what the core did (queue waits, hook calls,
//! database statements, placement) and what it holds (servers, commands, containers); read by
//! viewers, by anonymous callers only when allowed, and by scrapers with the metrics token.

use cloud48_engine::auth::{Anonymous, AuthConfig, Family, Role, UserRecord};
use serde_json::json;

use crate::common::{Opts, TestCore};

async fn scrape(t: &TestCore, bearer: Option<&str>) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(format!("{}/metrics", t.url));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, kind, resp.text().await.unwrap())
}

/// The value of the sample whose line starts with `series` followed by a space.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_tell_what_the_core_did_and_holds() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let a: serde_json::Value = t
        .client
        .post("/v1/environments", &json!({ "name": "web" }))
        .await
        .unwrap();
    t.ok(a["command_id"].as_i64().unwrap()).await;
    let a: serde_json::Value = t
        .client
        .post(
            "/v1/environments/web/containers",
            &json!({ "type": "tomcat" }),
        )
        .await
        .unwrap();
    t.ok(a["command_id"].as_i64().unwrap()).await;

    let (status, kind, text) = scrape(&t, None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    for (series, expected) in [
        ("cloud48_servers{status=\"up\"}", 3.0),
        ("cloud48_queue_depth", 0.0),
        ("cloud48_placement_decisions_total{outcome=\"placed\"}", 1.0),
        (
            "cloud48_queue_wait_seconds_count{kind=\"environment.create\"}",
            1.0,
        ),
        // environment.create, environment.add and its child container.create.
        ("cloud48_commands{status=\"succeeded\"}", 3.0),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series} in:\n{text}");
    }
    assert!(
        text.lines().any(
            |l| l.starts_with("cloud48_containers{status=\"running\",type=\"tomcat")
                && l.contains(",project=\"default\"} 1")
        ),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("cloud48_hook_seconds_count{type=\"tomcat\",")),
        "hook calls are timed: {text}"
    );
    assert!(
        value(&text, "cloud48_database_statement_seconds_count").unwrap() > 10.0,
        "{text}"
    );
    assert!(text.contains("# TYPE cloud48_queue_wait_seconds histogram"));
}

#[tokio::test]
async fn metrics_are_read_by_viewers_or_with_the_metrics_token() {
    let realm = "cloud48";
    let users = vec![UserRecord::with_password("vera", Role::Viewer, realm, "pw")];
    let t = TestCore::start(Opts {
        auth: AuthConfig {
            realm: realm.into(),
            anonymous: Anonymous::Read,
            users: users.clone(),
            ..AuthConfig::default()
        },
        metrics_token: Some("scrape-me".into()),
        ..Opts::default()
    })
    .await
    .unwrap();
    let (status, _, text) = scrape(&t, None).await;
    assert_eq!(
        status, 401,
        "anonymous callers read fleet and environments only: {text}"
    );
    assert!(text.contains("anonymous_read"), "{text}");
    assert_eq!(scrape(&t, Some("wrong")).await.0, 401);
    let (status, _, text) = scrape(&t, Some("scrape-me")).await;
    assert_eq!(status, 200);
    assert!(text.contains("cloud48_servers{status=\"up\"} 3"), "{text}");
    let vera =
        cloud48_core::cli::Client::new(&t.url).with_credentials(cloud48_core::cli::Credentials {
            user: "vera".into(),
            password: "pw".into(),
        });
    assert!(
        vera.get_text("/metrics")
            .await
            .unwrap()
            .contains("cloud48_servers")
    );

    // An operator may open the metrics to anonymous callers.
    let open = TestCore::start(Opts {
        auth: AuthConfig {
            realm: realm.into(),
            anonymous: Anonymous::Read,
            anonymous_read: vec![Family::Fleet, Family::Metrics],
            users,
            ..AuthConfig::default()
        },
        ..Opts::default()
    })
    .await
    .unwrap();
    assert_eq!(scrape(&open, None).await.0, 200);
}
