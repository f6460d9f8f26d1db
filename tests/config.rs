//! Configuration: precedence, placeholders, every error, masking; users from the CLI.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cloud48_engine::config::{Settings, Source};

use crate::common::binary;

fn load(
    file: Option<&str>,
    env: &[(&str, &str)],
    flags: &[(&'static str, &str)],
) -> Result<Settings, String> {
    let dir = crate::common::tempdir();
    let path = dir.path().join("cloud48.toml");
    if let Some(text) = file {
        std::fs::write(&path, text).unwrap();
    }
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let flags: BTreeMap<&'static str, String> =
        flags.iter().map(|(k, v)| (*k, v.to_string())).collect();
    Settings::load(
        file.map(|_| path.as_path()),
        &|name| env.get(name).cloned(),
        &flags,
    )
    .map_err(|e| e.to_string().replace(&path.display().to_string(), "FILE"))
}

fn source(s: &Settings, key: &str) -> String {
    s.entries()
        .find(|(k, _)| *k == key)
        .unwrap()
        .1
        .source
        .to_string()
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let file = "[queue]\nworkers = 3\n";
    let env = [("CLOUD48_WORKERS", "5")];
    let s = load(Some(file), &env, &[("queue.workers", "7")]).unwrap();
    assert_eq!(
        (s.get("queue.workers"), source(&s, "queue.workers").as_str()),
        ("7", "flag --workers")
    );
    let s = load(Some(file), &env, &[]).unwrap();
    assert_eq!(
        (s.get("queue.workers"), source(&s, "queue.workers").as_str()),
        ("5", "env CLOUD48_WORKERS")
    );
    let s = load(Some(file), &[], &[]).unwrap();
    assert_eq!(s.get("queue.workers"), "3");
    assert!(
        source(&s, "queue.workers").ends_with(":2"),
        "{}",
        source(&s, "queue.workers")
    );
    let s = load(None, &[], &[]).unwrap();
    assert_eq!(
        (s.get("queue.workers"), source(&s, "queue.workers").as_str()),
        ("256", "default")
    );
    assert_eq!(s.core().queue.workers, 256);
    assert_eq!(
        s.get("auth.anonymous"),
        "read",
        "anonymous access is read-only by default"
    );
    assert_eq!(
        s.listen().to_string(),
        "127.0.0.1:4848",
        "the core binds to loopback by default"
    );
}

#[test]
fn placeholders_resolve_from_other_keys_and_the_environment_with_defaults() {
    let file = r#"
[server]
data_dir = "${BASE:/var/lib}/cloud48"
[database]
url = "sqlite://${server.data_dir}/other.db"
[auth]
realm = "${REALM}"
nonce_ttl_secs = "${TTL:60}"
"#;
    let s = load(Some(file), &[("REALM", "prod"), ("BASE", "/srv")], &[]).unwrap();
    assert_eq!(s.get("server.data_dir"), "/srv/cloud48");
    assert_eq!(s.get("database.url"), "sqlite:///srv/cloud48/other.db");
    assert_eq!(s.get("auth.realm"), "prod");
    assert_eq!(s.get("auth.nonce_ttl_secs"), "60");
    let s = load(Some(file), &[("REALM", "x")], &[]).unwrap();
    assert_eq!(
        s.get("server.data_dir"),
        "/var/lib/cloud48",
        "the default applies when BASE is unset"
    );
    let s = load(
        Some("[auth]\nrealm = \"cost $$5 ${R}\"\n"),
        &[("R", "now")],
        &[],
    )
    .unwrap();
    assert_eq!(s.get("auth.realm"), "cost $5 now");
}

#[test]
fn every_config_error_names_the_key_and_the_line() {
    let cases: &[(&str, &str)] = &[
        (
            "[queue]\nworkers = 2\nwrokers = 3\n",
            "FILE:3: unknown key 'queue.wrokers'",
        ),
        (
            "[queue]\n\nworkers = \"many\"\n",
            "FILE:3: bad value for queue.workers: 'many' is not a whole number",
        ),
        (
            "[server]\nlisten = \"everywhere\"\n",
            "FILE:2: bad value for server.listen",
        ),
        (
            "[auth]\nanonymous = \"sometimes\"\n",
            "FILE:2: bad value for auth.anonymous: 'sometimes' is not one of none, read, full",
        ),
        (
            "[auth]\nrealm = \"${NOPE}\"\n",
            "FILE:2: unresolved placeholder ${NOPE} in auth.realm",
        ),
        ("[auth]\nrealm = \"${auth.realm}\"\n", "cycle"),
        ("[queue\nworkers = 1\n", "FILE:1: not valid TOML"),
        (
            "[queue]\nworkers = [1]\n",
            "FILE:2: queue.workers must be a string or a number",
        ),
        (
            "[[auth.users]]\nname = \"bob\"\npassword = \"x\"\n",
            "user bob needs a role",
        ),
        (
            "[[auth.users]]\nname = \"bob\"\nrole = \"king\"\npassword = \"x\"\n",
            "unknown role 'king'",
        ),
        (
            "[[auth.users]]\nname = \"bob\"\nrole = \"admin\"\n",
            "needs either password or both ha1_md5 and ha1_sha256",
        ),
        (
            "[[auth.users]]\nname = \"bob\"\nrole = \"admin\"\npasswd = \"x\"\n",
            "unknown key 'auth.users.passwd'",
        ),
    ];
    for (file, want) in cases {
        let err = load(Some(file), &[], &[])
            .err()
            .unwrap_or_else(|| panic!("accepted: {file}"));
        assert!(err.contains(want), "for {file:?}: '{err}' lacks '{want}'");
    }
    let err = load(None, &[("CLOUD48_WORKERS", "-1")], &[]).err().unwrap();
    assert!(
        err.contains("env CLOUD48_WORKERS: bad value for queue.workers"),
        "{err}"
    );
    let err = load(None, &[], &[("queue.workers", "x")]).err().unwrap();
    assert!(err.contains("flag --workers"), "{err}");
}

#[test]
fn config_show_masks_secrets_and_tells_sources() {
    let file = "[database]\nurl = \"postgres://c48:hunter2@db.example:5432/cloud48\"\n[[auth.users]]\nname = \"ada\"\nrole = \"admin\"\npassword = \"${ADA_PASSWORD}\"\n";
    let s = load(Some(file), &[("ADA_PASSWORD", "s3cret-s3cret")], &[]).unwrap();
    let text = s.show();
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(
        text.contains("postgres://****@db.example:5432/****"),
        "{text}"
    );
    assert!(
        text.contains("auth.users.ada") && text.contains("role admin"),
        "{text}"
    );
    assert!(text.contains("cloud48.toml:2"), "{text}");
    assert_eq!(s.auth().users[0].name, "ada");
    assert_ne!(s.auth().users[0].ha1_sha256, "s3cret-s3cret");
    assert!(matches!(
        s.entries().next().unwrap().1.source,
        Source::Default | Source::File { .. }
    ));
}

fn run_env(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (bool, String, String) {
    let out = std::process::Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_added_with_the_cli_sign_in_with_their_role() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();
    let (ok, _, err) = run_env(
        &[
            "user",
            "add",
            "bob",
            "--role",
            "viewer",
            "--data-dir",
            &data_s,
        ],
        &[("CLOUD48_NEW_PASSWORD", "bobs-password")],
        dir.path(),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run_env(
        &[
            "user",
            "add",
            "olga",
            "--role",
            "operator",
            "--data-dir",
            &data_s,
        ],
        &[("CLOUD48_NEW_PASSWORD", "short")],
        dir.path(),
    );
    assert!(!ok && err.contains("at least 8 characters"), "{err}");
    let (ok, _, _) = run_env(
        &[
            "user",
            "add",
            "olga",
            "--role",
            "operator",
            "--data-dir",
            &data_s,
        ],
        &[("CLOUD48_NEW_PASSWORD", "olgas-password")],
        dir.path(),
    );
    assert!(ok);
    let (ok, out, _) = run_env(&["user", "list", "--data-dir", &data_s], &[], dir.path());
    assert!(
        ok && out.contains("bob") && out.contains("viewer") && out.contains("olga"),
        "{out}"
    );

    let serve = crate::common::serve(&data, &[]).await;
    let url = serve.url.clone();
    let cwd = dir.path().to_path_buf();
    let call = move |args: Vec<String>, env: Vec<(&'static str, String)>| {
        let url = url.clone();
        let cwd = cwd.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut full = vec!["--server".to_string(), url];
                full.extend(args);
                let refs: Vec<&str> = full.iter().map(String::as_str).collect();
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                run_env(&refs, &env, &cwd)
            })
            .await
            .unwrap()
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (ok, _, err) = call(s(&["env", "create", "web"]), vec![]).await;
    assert!(
        !ok && err.contains("sign in with --user NAME"),
        "ok={ok} err={err}"
    );
    let (ok, _, err) = call(
        s(&["--user", "bob", "env", "create", "web"]),
        vec![("CLOUD48_PASSWORD", "bobs-password".into())],
    )
    .await;
    assert!(
        !ok && err.contains("this needs role operator; user 'bob' has role viewer"),
        "{err}"
    );
    let (ok, _, err) = call(
        s(&["--user", "bob", "env", "create", "web"]),
        vec![("CLOUD48_PASSWORD", "wrong-password".into())],
    )
    .await;
    assert!(
        !ok && err.contains("authentication as 'bob' failed"),
        "{err}"
    );
    let creds = dir.path().join("creds.toml");
    std::fs::write(&creds, "user = \"olga\"\npassword = \"olgas-password\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = call(
        s(&[
            "--credentials",
            creds.to_str().unwrap(),
            "env",
            "create",
            "web",
            "--wait",
        ]),
        vec![],
    )
    .await;
    assert!(ok, "{err}");
    // A file others may read is used, with a warning saying the fix.
    assert!(
        err.contains("may be read by other users") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Commands are not for anonymous eyes (auth.anonymous_read: fleet, environments).
    let (ok, _, err) = call(s(&["command", "show", "1"]), vec![]).await;
    assert!(
        !ok && err.contains("may read only fleet, environments"),
        "{err}"
    );
    let (ok, out, _) = call(
        s(&[
            "--credentials",
            creds.to_str().unwrap(),
            "command",
            "show",
            "1",
        ]),
        vec![],
    )
    .await;
    assert!(ok && out.contains("requested by: olga"), "{out}");
    // passwd replaces the password; remove ends the account.
    let (ok, _, err) = run_env(
        &["user", "passwd", "olga", "--data-dir", &data_s],
        &[("CLOUD48_NEW_PASSWORD", "olgas-new-password")],
        dir.path(),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = call(
        s(&[
            "--credentials",
            creds.to_str().unwrap(),
            "env",
            "create",
            "web2",
        ]),
        vec![],
    )
    .await;
    assert!(
        !ok && err.contains("authentication as 'olga' failed"),
        "the old password no longer works: {err}"
    );
    let (ok, _, err) = call(
        s(&["--user", "olga", "env", "create", "web2"]),
        vec![("CLOUD48_PASSWORD", "olgas-new-password".into())],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = run_env(
        &["user", "remove", "olga", "--data-dir", &data_s],
        &[],
        dir.path(),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = call(
        s(&["--user", "olga", "env", "create", "web3"]),
        vec![("CLOUD48_PASSWORD", "olgas-new-password".into())],
    )
    .await;
    assert!(!ok && err.contains("wrong user name or password"), "{err}");
    let (ok, _, err) = run_env(
        &["user", "remove", "olga", "--data-dir", &data_s],
        &[],
        dir.path(),
    );
    assert!(!ok && err.contains("user 'olga' does not exist"), "{err}");
    drop(serve);
}

#[test]
fn config_show_through_the_binary_reports_the_file_line() {
    let dir = crate::common::tempdir();
    std::fs::write(
        dir.path().join("cloud48.toml"),
        "# cloud48\n[queue]\nworkers = 12\n",
    )
    .unwrap();
    let (ok, out, err) = run_env(&["config", "show", "--sim-servers", "2"], &[], dir.path());
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.contains("queue.workers")).unwrap();
    assert!(
        line.contains("12") && line.contains("cloud48.toml:3"),
        "{line}"
    );
    let line = out
        .lines()
        .find(|l| l.contains("drivers.sim.servers"))
        .unwrap();
    assert!(line.contains("flag --sim-servers"), "{line}");
    // --json gives the same facts as JSON.
    let (ok, out, err) = run_env(&["--json", "config", "show"], &[], dir.path());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let workers = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "queue.workers")
        .unwrap();
    assert_eq!(workers["value"], "12");
    assert!(
        workers["source"]
            .as_str()
            .unwrap()
            .contains("cloud48.toml:3"),
        "{workers}"
    );
    std::fs::write(dir.path().join("cloud48.toml"), "[queue]\nworker = 12\n").unwrap();
    let (ok, _, err) = run_env(&["serve"], &[], dir.path());
    assert!(
        !ok && err.contains("cloud48.toml:2: unknown key 'queue.worker'"),
        "{err}"
    );
}

#[test]
fn placement_weights_are_decimals_from_the_file_the_environment_or_a_flag() {
    let s = load(None, &[], &[]).unwrap();
    let w = s.core().placement.weights;
    assert_eq!((w.cpu, w.memory, w.disk), (1.0, 1.0, 0.5));
    assert_eq!(s.get("placement.weight_disk"), "0.5");
    let s = load(
        Some("[placement]\nweight_disk = 0.25\nweight_cpu = 2\n"),
        &[("CLOUD48_WEIGHT_MEMORY", "0")],
        &[],
    )
    .unwrap();
    let w = s.core().placement.weights;
    assert_eq!((w.cpu, w.memory, w.disk), (2.0, 0.0, 0.25));
    for bad in ["-1", "lots", "1001", "NaN"] {
        let err = load(None, &[("CLOUD48_WEIGHT_CPU", bad)], &[]).unwrap_err();
        assert!(
            err.contains("placement.weight_cpu") && err.contains("not a weight"),
            "{bad}: {err}"
        );
    }
}
