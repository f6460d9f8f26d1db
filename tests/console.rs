//! The web console: its files and sign-in endpoints over HTTP, and its pages driven in Debian's
//! Chromium by Playwright (`tests/console/console.spec.mjs`, with screenshots of the main pages
//! compared against `tests/console/screenshots/`).

use std::path::{Path, PathBuf};

use cloud48_engine::auth::{Anonymous, AuthConfig, Role, UserRecord};
use cloud48_engine::managers::AddContainer;

use crate::common::{Opts, TestCore};

const REALM: &str = "cloud48";

/// A heartbeat older than this is past the console core's grace period.
const GRACE_MS: u64 = 300;

async fn console_core() -> TestCore {
    TestCore::start(Opts {
        sim_servers: 4,
        agent_token: Some(crate::agent::TOKEN.into()),
        health: cloud48_engine::core::HealthConfig {
            background: false,
            grace: std::time::Duration::from_millis(GRACE_MS),
            ..Default::default()
        },
        auth: AuthConfig {
            realm: REALM.into(),
            anonymous: Anonymous::Read,
            users: vec![
                UserRecord::with_password("ada", Role::Admin, REALM, "ada-password"),
                UserRecord::with_password("vera", Role::Viewer, REALM, "vera-password"),
            ],
            ..AuthConfig::default()
        },
        ..Opts::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_console_s_files_are_public_and_sign_in_needs_a_user() {
    let t = console_core().await;
    let http = reqwest::Client::new();
    let page = http.get(format!("{}/", t.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let tag = page.headers()["etag"].clone();
    assert!(page.text().await.unwrap().contains("/console/console.js"));
    let again = http
        .get(format!("{}/console/console.js", t.url))
        .header("If-None-Match", tag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "the browser's copy is still good");
    let missing = http
        .get(format!("{}/console/nope.js", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope.js")
    );

    // Anyone may ask who they are; signing in answers with the Digest challenge.
    let me: serde_json::Value = http
        .get(format!("{}/v1/whoami", t.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"], serde_json::Value::Null);
    assert_eq!(
        me["anonymous_read"],
        serde_json::json!(["fleet", "environments"])
    );
    let challenge = http
        .get(format!("{}/v1/sign-in", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 401);
    assert!(
        challenge.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Digest ")
    );
    let ada =
        cloud48_core::cli::Client::new(&t.url).with_credentials(cloud48_core::cli::Credentials {
            user: "ada".into(),
            password: "ada-password".into(),
        });
    let me: serde_json::Value = ada.get("/v1/sign-in").await.unwrap();
    assert_eq!(
        (me["user"].as_str(), me["role"].as_str()),
        (Some("ada"), Some("admin"))
    );
}

/// `tests/console/` with its npm packages installed (`npm ci` on first use).
fn playwright_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/console");
    if !dir.join("node_modules/@playwright/test").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm runs (install Node.js: apt-get install nodejs npm)");
        assert!(status.success(), "npm ci in tests/console failed");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "the console tests need Debian's Chromium at {chromium} (apt-get install chromium; `bash .ci/run` does)"
    );
    let t = console_core().await;
    // The environment the pages show: two tomcats, and the balancer the second asked for.
    let envs = t.core.environments();
    let (create, _) = envs.create("shop", "ada").await.unwrap();
    t.ok(create).await;
    for _ in 0..2 {
        let add = AddContainer {
            type_id: "tomcat".into(),
            requirements: None,
            server: None,
            params: Default::default(),
        };
        t.ok(envs.add("shop", &add, "ada").await.unwrap()).await;
    }

    // A node agent's server whose agent is gone: down, for the console to remove.
    let name = "node-gone";
    let (_agent, agent_url) =
        crate::agent::serve_agent(name, crate::agent::sim(name, std::time::Duration::ZERO)).await;
    let id = t.core.agents().add(&agent_url).await.unwrap();
    crate::common::eventually("node-gone silent past the grace period", || async {
        (t.core.health().age(id).unwrap_or(i64::MAX) > GRACE_MS as i64).then_some(())
    })
    .await;
    assert!(
        t.core
            .monitor()
            .mark_down(id, "its agent is gone")
            .await
            .unwrap()
    );

    let dir = playwright_dir();
    let out = crate::common::tempdir();
    let url = t.url.clone();
    // CONSOLE_UPDATE_SCREENSHOTS=1 rewrites the reference screenshots (after a change to the
    // pages: look at them before committing).
    let update = std::env::var("CONSOLE_UPDATE_SCREENSHOTS").as_deref() == Ok("1");
    let run = tokio::process::Command::new("npx")
        .args(["playwright", "test"])
        .args(update.then_some("--update-snapshots"))
        .current_dir(&dir)
        .env("CONSOLE_URL", &url)
        .env("CONSOLE_OUT", out.path())
        .env("CHROMIUM", &chromium)
        .env("ADA_PASSWORD", "ada-password")
        .env("VERA_PASSWORD", "vera-password")
        .env("CI", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("npx runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        // Keep what Playwright wrote (screenshots that differ, their diffs) for a look.
        let kept = std::env::temp_dir().join("cloud48-console-failure");
        let _ = std::fs::remove_dir_all(&kept);
        let _ = std::process::Command::new("cp")
            .arg("-r")
            .arg(out.path())
            .arg(&kept)
            .status();
        panic!(
            "the console's browser tests failed (artifacts in {}):\n{stdout}\n{stderr}",
            kept.display()
        );
    }
    assert!(
        stdout.contains("5 passed"),
        "every browser test ran:\n{stdout}"
    );
}
