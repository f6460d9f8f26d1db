//! The audit trail: every request that changes something or tries to (who, from where, what,
//! the outcome and the command), changes made with the command line on the core's machine,
//! listed for admins only, and append-only in the database itself.

use cloud48_core::cli::{Client, Credentials};
use cloud48_engine::auth::{Anonymous, AuthConfig, Role, UserRecord};
use cloud48_engine::model::{Accepted, AuditEntry};
use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::common::{Opts, TestCore};

fn as_user(t: &TestCore, user: &str, password: &str) -> Client {
    Client::new(&t.url).with_credentials(Credentials {
        user: user.into(),
        password: password.into(),
    })
}

#[tokio::test]
async fn every_change_and_every_refusal_is_recorded_and_never_rewritten() {
    let realm = "cloud48";
    let t = TestCore::start(Opts {
        auth: AuthConfig {
            realm: realm.into(),
            anonymous: Anonymous::Read,
            users: vec![
                UserRecord::with_password("vera", Role::Viewer, realm, "pw"),
                UserRecord::with_password("otto", Role::Operator, realm, "pw"),
                UserRecord::with_password("ada", Role::Admin, realm, "pw"),
            ],
            ..AuthConfig::default()
        },
        ..Opts::default()
    })
    .await
    .unwrap();
    let (vera, otto, ada) = (
        as_user(&t, "vera", "pw"),
        as_user(&t, "otto", "pw"),
        as_user(&t, "ada", "pw"),
    );
    let a: Accepted = otto
        .post("/v1/environments", &json!({ "name": "shop" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let refused = vera
        .post::<_, Accepted>("/v1/environments", &json!({ "name": "mine" }))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("HTTP 403"), "{refused}");
    let bad = as_user(&t, "otto", "guess")
        .post::<_, Accepted>("/v1/environments", &json!({ "name": "x" }))
        .await;
    assert!(bad.is_err());
    let _: serde_json::Value = ada
        .post("/v1/servers/sim-1/drain", &json!({}))
        .await
        .unwrap();
    // Reads are not changes.
    let _: Vec<serde_json::Value> = otto.get("/v1/environments").await.unwrap();

    // The trail is an admin's.
    let e = otto
        .get::<Vec<AuditEntry>>("/v1/audit")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 403") && e.contains("admin"), "{e}");
    let trail: Vec<AuditEntry> = ada.get("/v1/audit").await.unwrap();
    let seen: Vec<(&str, &str, &str, u16)> = trail
        .iter()
        .map(|e| {
            (
                e.who.as_str(),
                e.action.as_str(),
                e.object.as_str(),
                e.status,
            )
        })
        .collect();
    // Newest first, no reads, no challenge answered to a request without credentials (the
    // client retries a wrong password once: the protocol's stale-nonce case).
    let (first, rest) = seen.split_first().unwrap();
    let (last, middle) = rest.split_last().unwrap();
    assert_eq!(
        *first,
        ("ada", "POST", "/v1/servers/sim-1/drain", 200),
        "{seen:?}"
    );
    assert_eq!(*last, ("otto", "POST", "/v1/environments", 202), "{seen:?}");
    assert_eq!(
        middle[middle.len() - 1],
        ("vera", "POST", "/v1/environments", 403)
    );
    let wrong = &middle[..middle.len() - 1];
    assert!(
        !wrong.is_empty()
            && wrong
                .iter()
                .all(|w| *w == ("otto", "POST", "/v1/environments", 401)),
        "{seen:?}"
    );
    let (created, denied) = (&trail[trail.len() - 1], &trail[trail.len() - 2]);
    assert_eq!(created.command_id, Some(a.command_id.0));
    assert!(
        denied.message.as_deref().unwrap().contains("role"),
        "{trail:?}"
    );
    assert_eq!(created.address.as_deref(), Some("127.0.0.1"));
    // What was asked is on record, and the refused attempt's too.
    assert_eq!(created.request.as_deref(), Some(r#"{"name":"shop"}"#));
    assert_eq!(denied.request.as_deref(), Some(r#"{"name":"mine"}"#));
    assert!(
        trail
            .windows(2)
            .all(|w| w[0].id > w[1].id && w[0].at >= w[1].at)
    );

    let otto_s: Vec<AuditEntry> = ada.get("/v1/audit?who=otto").await.unwrap();
    assert_eq!(otto_s.len(), wrong.len() + 1);
    let servers: Vec<AuditEntry> = ada.get("/v1/audit?object=/v1/servers").await.unwrap();
    assert_eq!(servers.len(), 1);
    let page: Vec<AuditEntry> = ada
        .get(&format!("/v1/audit?limit=2&before={}", trail[0].id))
        .await
        .unwrap();
    assert_eq!(page, trail[1..3]);

    // Append-only, whoever holds the database.
    for sql in ["UPDATE audit SET who = 'nobody'", "DELETE FROM audit"] {
        let e = t.core.db().execute_unprepared(sql).await.unwrap_err();
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
    let again: Vec<AuditEntry> = ada.get("/v1/audit").await.unwrap();
    assert_eq!(
        again, trail,
        "the listings were reads; nothing was rewritten"
    );
}

#[tokio::test]
async fn users_changed_on_the_core_s_machine_are_recorded_as_its_local_user() {
    let t = TestCore::start(Opts::default()).await.unwrap();
    let out = std::process::Command::new(crate::common::binary())
        .args(["user", "add", "vera", "--role", "viewer", "--data-dir"])
        .arg(t._dir.path())
        .env("CLOUD48_NEW_PASSWORD", "correct horse")
        .env_remove("SUDO_USER")
        .env("USER", "opsmith")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(crate::common::binary())
        .args(["user", "remove", "nobody", "--data-dir"])
        .arg(t._dir.path())
        .env_remove("SUDO_USER")
        .env("USER", "opsmith")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let trail: Vec<AuditEntry> = t.client.get("/v1/audit").await.unwrap();
    let local: Vec<(&str, &str, &str, bool)> = trail
        .iter()
        .map(|e| {
            (
                e.who.as_str(),
                e.action.as_str(),
                e.object.as_str(),
                e.message.is_some(),
            )
        })
        .collect();
    assert_eq!(
        local,
        [
            ("opsmith (local)", "cli", "user remove nobody", true),
            ("opsmith (local)", "cli", "user add vera viewer", false),
        ]
    );
    // The CLI's filter by who (`--user` is who signs in).
    let url = t.url.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        crate::common::cli(&url, &["--json", "audit", "--who", "opsmith (local)"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let listed: Vec<AuditEntry> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2, "{out}");
}
