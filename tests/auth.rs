//! HTTP Digest authentication, anonymous access and roles.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use cloud48_core::cli::{Client, Credentials};
use cloud48_engine::auth::{
    Anonymous, AuthConfig, AuthError, Authenticator, Family, Principal, Role, UserRecord,
};
use cloud48_engine::model::{Accepted, Command};
use cloud48_engine::queue::Clock;
use serde_json::json;

use crate::common::{Opts, TestCore};

const PASSWORD: &str = "correct horse";

fn users_config(anonymous: Anonymous) -> AuthConfig {
    let realm = "cloud48";
    AuthConfig {
        realm: realm.into(),
        anonymous,
        nonce_ttl: Duration::from_secs(300),
        users: vec![
            UserRecord::with_password("vera", Role::Viewer, realm, PASSWORD),
            UserRecord::with_password("otto", Role::Operator, realm, PASSWORD),
            UserRecord::with_password("ada", Role::Admin, realm, PASSWORD),
        ],
        ..AuthConfig::default()
    }
}

async fn core_with_users() -> TestCore {
    TestCore::start(Opts {
        auth: users_config(Anonymous::Read),
        ..Opts::default()
    })
    .await
    .unwrap()
}

fn as_user(t: &TestCore, user: &str, password: &str) -> Client {
    Client::new(&t.url).with_credentials(Credentials {
        user: user.into(),
        password: password.into(),
    })
}

/// Sends a request with a hand-made Authorization header; returns status and WWW-Authenticate values.
async fn send(
    t: &TestCore,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> (u16, Vec<String>, String) {
    let mut req =
        reqwest::Client::new().request(method.parse().unwrap(), format!("{}{path}", t.url));
    if method == "POST" {
        req = req
            .header("content-type", "application/json")
            .body("{\"name\": \"env-x\"}");
    }
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let challenges = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    (status, challenges, resp.text().await.unwrap())
}

/// Answers a challenge as `user` for `method path`.
fn answer(
    challenge: &str,
    user: &str,
    password: &str,
    method: &str,
    path: &str,
) -> (digest_auth::WwwAuthenticateHeader, String) {
    let mut prompt = digest_auth::parse(challenge).unwrap();
    let ctx = digest_auth::AuthContext::new_with_method(
        user,
        password,
        path,
        Option::<&[u8]>::None,
        digest_auth::HttpMethod::from(method),
    );
    let header = prompt.respond(&ctx).unwrap().to_string();
    (prompt, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_authenticates_with_digest_sha256_and_md5() {
    let t = core_with_users().await;
    let url = format!("{}/v1/environments", t.url);
    let creds = format!("otto:{PASSWORD}");
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-v",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--digest",
            "-u",
            &creds,
        ])
        .args([
            "-H",
            "content-type: application/json",
            "-d",
            "{\"name\": \"web\"}",
            &url,
        ])
        .output()
        .await
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "202",
        "curl --digest as an operator"
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        trace
            .lines()
            .any(|l| l.starts_with("> Authorization: Digest") && l.contains("algorithm=SHA-256")),
        "curl answered the SHA-256 challenge: {trace}"
    );
    let url = format!("{}/v1/environments", t.url);
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--digest",
            "-u",
            "otto:wrong",
            "-H",
            "content-type: application/json",
            "-d",
            "{\"name\": \"x\"}",
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // MD5, for old clients: answer the MD5 challenge by hand.
    let (status, challenges, _) = send(&t, "POST", "/v1/environments", None).await;
    assert_eq!(status, 401);
    assert!(
        challenges[0].contains("algorithm=SHA-256") && challenges[1].contains("algorithm=MD5"),
        "{challenges:?}"
    );
    let (_, header) = answer(&challenges[1], "otto", PASSWORD, "POST", "/v1/environments");
    assert!(header.contains("algorithm=MD5"));
    let (status, _, body) = send(&t, "POST", "/v1/environments", Some(&header)).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_names_the_user_who_asked() {
    let t = core_with_users().await;
    let a: Accepted = as_user(&t, "otto", PASSWORD)
        .post("/v1/environments", &json!({ "name": "audited" }))
        .await
        .unwrap();
    let cmd: Command = as_user(&t, "vera", PASSWORD)
        .get(&format!("/v1/commands/{}", a.command_id))
        .await
        .unwrap();
    assert_eq!(cmd.requested_by, "otto");
    assert!(cmd.created_at > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_replay_and_tampered_uri_are_refused() {
    let t = core_with_users().await;
    let err = as_user(&t, "otto", "nope")
        .post::<_, Accepted>("/v1/environments", &json!({ "name": "a" }))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("authentication as 'otto' failed: wrong user name or password"),
        "{err}"
    );
    let err = as_user(&t, "mallory", PASSWORD)
        .post::<_, Accepted>("/v1/environments", &json!({ "name": "a" }))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("wrong user name or password"),
        "{err}"
    );

    let (_, challenges, _) = send(&t, "POST", "/v1/environments", None).await;
    let (_, header) = answer(&challenges[0], "otto", PASSWORD, "POST", "/v1/environments");
    let (status, _, _) = send(&t, "POST", "/v1/environments", Some(&header)).await;
    assert_eq!(status, 202);
    let (status, _, body) = send(&t, "POST", "/v1/environments", Some(&header)).await;
    assert_eq!(status, 401, "a replayed request must be refused");
    assert!(body.contains("replayed request"), "{body}");

    let (_, header) = answer(&challenges[0], "otto", PASSWORD, "POST", "/v1/environments");
    let (status, _, body) = send(&t, "POST", "/v1/environments/env-x/stop", Some(&header)).await;
    assert_eq!(
        status, 401,
        "credentials for one URI must not work for another"
    );
    assert!(body.contains("another URI"), "{body}");

    let forged = header.replace(&digest_auth::parse(&challenges[0]).unwrap().nonce, "00ff");
    let (status, _, _) = send(&t, "POST", "/v1/environments", Some(&forged)).await;
    assert_eq!(status, 401);
    let list: Vec<Command> = as_user(&t, "vera", PASSWORD)
        .get("/v1/commands")
        .await
        .unwrap();
    assert_eq!(
        list.len(),
        1,
        "only the one authenticated request created a command"
    );
}

/// A clock the test moves by hand.
struct ManualClock(AtomicI64);
impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn an_expired_nonce_with_right_credentials_is_answered_stale() {
    let scratch = crate::common::ScratchDb::create(false).await.unwrap();
    let db = scratch.db.clone();
    let clock = Arc::new(ManualClock(AtomicI64::new(1_000_000)));
    let mut config = users_config(Anonymous::Read);
    config.nonce_ttl = Duration::from_secs(60);
    let auth = Authenticator::new(config, db, clock.clone());
    let challenge = auth.challenges(false)[0].clone();
    let (mut prompt, header) = answer(&challenge, "otto", PASSWORD, "GET", "/v1/servers");
    assert_eq!(
        auth.authenticate("GET", "/v1/servers", &header, None).await,
        Ok(Principal::User {
            name: "otto".into(),
            role: Role::Operator
        })
    );
    clock.0.fetch_add(61_000, Ordering::SeqCst);
    let ctx = digest_auth::AuthContext::new_with_method(
        "otto",
        PASSWORD,
        "/v1/servers",
        Option::<&[u8]>::None,
        digest_auth::HttpMethod::GET,
    );
    let later = prompt.respond(&ctx).unwrap().to_string();
    match auth.authenticate("GET", "/v1/servers", &later, None).await {
        Err(AuthError::Unauthorized { stale: true, .. }) => {}
        other => panic!("expected a stale nonce, got {other:?}"),
    }
    assert!(auth.challenges(true)[0].contains("stale=true"));
    let wrong = answer(&challenge, "otto", "bad password", "GET", "/v1/servers").1;
    match auth.authenticate("GET", "/v1/servers", &wrong, None).await {
        Err(AuthError::Unauthorized { stale: false, .. }) => {}
        other => panic!("a wrong password is not merely stale: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_reads_by_default_and_cannot_change_anything() {
    let t = TestCore::start(Opts {
        auth: AuthConfig::default(),
        ..Opts::default()
    })
    .await
    .unwrap();
    let (status, _, _) = send(&t, "GET", "/v1/environments", None).await;
    assert_eq!(status, 200);
    let (status, challenges, body) = send(&t, "POST", "/v1/environments", None).await;
    assert_eq!(
        status, 403,
        "with no users configured, signing in cannot help: {body}"
    );
    assert!(challenges.is_empty());
    assert!(body.contains("cloud48 user add"), "{body}");

    let t = core_with_users().await;
    let (status, challenges, body) = send(&t, "POST", "/v1/environments", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(challenges.len(), 2);
    assert!(body.contains("needs role operator"), "{body}");
    let (status, _, _) = send(&t, "GET", "/v1/servers", None).await;
    assert_eq!(status, 200, "anonymous read stays allowed when users exist");
    let (status, _, body) = send(&t, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200, "the API's description is public: {body}");
    let (status, challenges, body) = send(&t, "GET", "/v1/containers", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(challenges.len(), 2);
    assert!(
        body.contains("anonymous requests may read only fleet, environments (auth.anonymous_read)"),
        "{body}"
    );
}

/// Regression (hardening): anonymous users exported any stopped container and read any
/// container's logs, making the core pull them from agents. Export needs an operator; what
/// anonymous requests read is configured per endpoint family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_users_cannot_export_or_read_logs_and_read_only_the_configured_families() {
    let t = TestCore::start(Opts {
        auth: AuthConfig::default(),
        ..Opts::default()
    })
    .await
    .unwrap();
    // Made through the core (anonymous requests cannot create); then stopped.
    let (cmd, container) = t
        .core
        .containers()
        .create(&crate::common::plain(None), "test")
        .await
        .unwrap();
    t.ok(cmd).await;
    let stop = t
        .core
        .containers()
        .run(
            cloud48_engine::managers::ContainerCommand::Stop {},
            container,
            "test",
        )
        .await
        .unwrap();
    t.ok(stop).await;
    for path in [
        format!("/v1/containers/{container}/export"),
        format!("/v1/containers/{container}/logs"),
        format!("/v1/containers/{container}"),
        "/v1/commands".to_string(),
    ] {
        let (status, _, body) = send(&t, "GET", &path, None).await;
        assert_eq!(status, 403, "GET {path}: {body}");
    }
    let (status, _, _) = send(&t, "GET", "/v1/environments", None).await;
    assert_eq!(status, 200);

    // Families are configurable: containers and commands opened, the fleet closed; exports and
    // logs (which the core pulls from an agent) stay closed whatever the list says.
    let t2 = TestCore::start(Opts {
        auth: AuthConfig {
            anonymous_read: vec![Family::Containers, Family::Commands],
            ..AuthConfig::default()
        },
        ..Opts::default()
    })
    .await
    .unwrap();
    let (status, _, body) = send(&t2, "GET", "/v1/containers", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(&t2, "GET", "/v1/servers", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("may read only containers, commands"),
        "{body}"
    );
    for path in ["/v1/containers/1/export", "/v1/containers/1/logs"] {
        let (status, _, _) = send(&t2, "GET", path, None).await;
        assert_eq!(status, 403, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_against_each_endpoint_family() {
    let t = core_with_users().await;
    let a: Accepted = as_user(&t, "ada", PASSWORD)
        .post("/v1/containers", &json!({ "type": "plain" }))
        .await
        .unwrap();
    t.ok(a.command_id).await;
    let container = a.object_id.unwrap();
    // (method, path, body) per family; expected status per (anonymous, viewer, operator, admin).
    // Anonymous requests read fleet and environment summaries only (the default).
    let families: Vec<(&str, String, Option<serde_json::Value>, [u16; 4])> = vec![
        ("GET", "/v1/environments".into(), None, [200, 200, 200, 200]),
        (
            "GET",
            format!("/v1/containers/{container}"),
            None,
            [401, 200, 200, 200],
        ),
        ("GET", "/v1/containers".into(), None, [401, 200, 200, 200]),
        (
            "GET",
            format!("/v1/containers/{container}/logs"),
            None,
            [401, 200, 200, 200],
        ),
        // An export is a copy of the disk: operators only (the container runs, hence 409).
        (
            "GET",
            format!("/v1/containers/{container}/export"),
            None,
            [401, 403, 409, 409],
        ),
        ("GET", "/v1/commands".into(), None, [401, 200, 200, 200]),
        (
            "GET",
            format!("/v1/commands/{}", a.command_id),
            None,
            [401, 200, 200, 200],
        ),
        ("GET", "/v1/plugins".into(), None, [401, 200, 200, 200]),
        ("GET", "/v1/servers".into(), None, [200, 200, 200, 200]),
        (
            "POST",
            "/v1/environments".into(),
            Some(json!({ "name": "fam" })),
            [401, 403, 202, 409],
        ),
        (
            "POST",
            format!("/v1/containers/{container}/actions"),
            Some(json!({ "op": "reboot" })),
            [401, 403, 202, 202],
        ),
        (
            "POST",
            format!("/v1/commands/{}/cancel", a.command_id),
            Some(json!({})),
            [401, 403, 409, 409],
        ),
        (
            "POST",
            "/v1/servers".into(),
            Some(json!({})),
            [401, 403, 403, 422],
        ),
        // exec is a root shell in the container: admins only (an admin passes, and the
        // simulated server then answers that nothing runs there: 409).
        (
            "POST",
            format!("/v1/containers/{container}/exec"),
            Some(json!({ "command": ["true"] })),
            [401, 403, 403, 409],
        ),
    ];
    let http = reqwest::Client::new();
    for (method, path, body, expected) in families {
        for (i, who) in [None, Some("vera"), Some("otto"), Some("ada")]
            .into_iter()
            .enumerate()
        {
            let status = match who {
                None => {
                    let mut req = http.request(method.parse().unwrap(), format!("{}{path}", t.url));
                    if let Some(b) = &body {
                        req = req.json(b);
                    }
                    req.send().await.unwrap().status().as_u16()
                }
                Some(user) => {
                    let client = as_user(&t, user, PASSWORD);
                    let result = match &body {
                        Some(b) => client.post::<_, serde_json::Value>(&path, b).await,
                        None => client.get::<serde_json::Value>(&path).await,
                    };
                    match result {
                        Ok(_) if method == "GET" || path.ends_with("/cancel") => 200,
                        Ok(_) => 202,
                        Err(e) => {
                            let text = e.to_string();
                            let code = text.rsplit("HTTP ").next().unwrap().trim_end_matches(')');
                            code.parse()
                                .unwrap_or_else(|_| panic!("no status in '{text}'"))
                        }
                    }
                }
            };
            assert_eq!(status, expected[i], "{method} {path} as {who:?}");
        }
    }
}

/// One signed-in attempt at `GET /v1/containers` as `user` from loopback address `from`:
/// status, `Retry-After` and body.
async fn attempt(
    t: &TestCore,
    from: &str,
    user: &str,
    password: &str,
) -> (u16, Option<u64>, String) {
    let path = "/v1/containers";
    let (_, challenges, _) = send(t, "GET", path, None).await;
    let sha = challenges.iter().find(|c| c.contains("SHA-256")).unwrap();
    let (_, header) = answer(sha, user, password, "GET", path);
    let resp = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
        .get(format!("{}{path}", t.url))
        .header("authorization", header)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry, resp.text().await.unwrap())
}

/// Regression (hardening): 200 wrong passwords went through at about 2,550 guesses/s with no
/// delay, no 429 and no lockout. Past five free failures each one blocks its user name and its
/// address for twice as long (429 with `Retry-After`, credentials unchecked); a user's block
/// stops growing at 30 s, so the real user, from another address, gets in soon after an
/// attack, while the attacker's address stays blocked longer and longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_back_off_exponentially_then_429_without_a_long_lockout() {
    let clock = crate::common::ManualClock::at(1_000_000);
    let t = TestCore::start(Opts {
        auth: users_config(Anonymous::Read),
        clock: Some(clock.clone()),
        ..Opts::default()
    })
    .await
    .unwrap();
    let (attacker, owner) = ("127.0.0.2", "127.0.0.3");
    for i in 0..6 {
        let (status, retry, body) = attempt(&t, attacker, "vera", "guess").await;
        assert_eq!((status, retry), (401, None), "attempt {i}: {body}");
        assert!(body.contains("wrong user name or password"), "{body}");
    }
    // Blocked for 500 ms: even the right password is not checked now, from any address.
    let (status, retry, body) = attempt(&t, owner, "vera", PASSWORD).await;
    assert_eq!((status, retry), (429, Some(1)), "{body}");
    assert!(
        body.contains("too many failed sign-ins for user 'vera'"),
        "{body}"
    );
    clock.advance(500);
    // Each further failure doubles the block: 1 s, 2 s, 4 s, ...
    for expected in [1, 2, 4, 8, 16, 32] {
        let (status, _, body) = attempt(&t, attacker, "vera", "guess").await;
        assert_eq!(status, 401, "{body}");
        let (status, retry, body) = attempt(&t, attacker, "vera", "guess").await;
        assert_eq!((status, retry), (429, Some(expected)), "{body}");
        clock.advance(expected as i64 * 1000);
    }
    // The user's block stopped at 30 s: the owner gets in and starts afresh; the attacker's
    // address (64 s now) stays blocked, under any name.
    let (status, _, body) = attempt(&t, attacker, "vera", "guess").await;
    assert_eq!(status, 401, "{body}");
    clock.advance(30_000);
    let (status, _, body) = attempt(&t, owner, "vera", PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = attempt(&t, owner, "vera", "typo").await;
    assert_eq!(
        status, 401,
        "one typo after a success is not blocked: {body}"
    );
    let (status, retry, body) = attempt(&t, attacker, "otto", PASSWORD).await;
    assert_eq!((status, retry), (429, Some(34)), "{body}");
    assert!(body.contains("for this address"), "{body}");
    // Another user, from a clean address, is never blocked by failures on vera's name.
    let (status, _, body) = attempt(&t, owner, "otto", PASSWORD).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_cannot_be_removed_while_other_users_remain() {
    let t = TestCore::start(Opts {
        paused: true,
        ..Opts::default()
    })
    .await
    .unwrap();
    let db = t.core.db().clone();
    let users = cloud48_engine::auth::UserStore::new(&db, "cloud48");
    users.add("ada", Role::Admin, "password-ada").await.unwrap();
    users
        .add("vera", Role::Viewer, "password-vera")
        .await
        .unwrap();
    let err = users.remove("ada").await.unwrap_err();
    assert!(err.contains("last admin"), "{err}");
    users.add("bob", Role::Admin, "password-bob").await.unwrap();
    users.remove("ada").await.unwrap();
    // With no other user left, the last one may go (the core is back to its first-run state).
    users.remove("vera").await.unwrap();
    users.remove("bob").await.unwrap();
    assert!(users.list().await.unwrap().is_empty());
}
