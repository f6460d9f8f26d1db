//! The CLI through the real binary against a real `cloud48 serve`.

use serde_json::{Value, json};

use crate::common::cli;

/// `cloud48 serve` with two simulated servers and anonymous access, as these tests use it.
async fn serve_two_sims(dir: &std::path::Path) -> crate::common::ServeProcess {
    crate::common::serve(
        &dir.join("data"),
        &["--sim-servers", "2", "--anonymous", "full"],
    )
    .await
}

/// Runs the CLI against `url` off the async runtime: (exit ok, stdout, stderr).
async fn run_cli(url: String, args: Vec<&'static str>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || cli(&url, &args))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tour_through_the_real_binary() {
    let dir = crate::common::tempdir();
    let serve = serve_two_sims(dir.path()).await;
    let url = serve.url.clone();
    let run = |args: Vec<&'static str>| run_cli(url.clone(), args);

    let (ok, out, err) = run(vec!["--json", "env", "create", "web", "--wait"]).await;
    assert!(ok, "{err}");
    let cmd: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cmd["status"], "succeeded");

    let (ok, out, err) = run(vec![
        "--json", "env", "add", "web", "--type", "plain", "--wait",
    ])
    .await;
    assert!(ok, "{err}");
    let cmd: Value = serde_json::from_str(&out).unwrap();
    let id = cmd["result"]["container_id"].as_i64().unwrap();

    let (ok, out, _) = run(vec!["--json", "container", "list"]).await;
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    let c = &list[0];
    for field in ["id", "type", "status", "server", "ip", "environment"] {
        assert!(c.get(field).is_some(), "container JSON lacks {field}: {c}");
    }
    assert_eq!(c["id"], id);
    assert_eq!(c["environment"], "web");
    assert_eq!(c["status"], "running");

    let (ok, out, _) = run(vec!["env", "show", "web"]).await;
    assert!(ok);
    assert!(
        out.contains("environment web") && out.contains("running") && out.contains("1 member)"),
        "{out}"
    );

    // A type's details say what runs in its containers and which parameters it takes.
    let (ok, out, err) = run(vec!["plugin", "show", "redis"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("image:") && out.contains("replicas (integer, default"),
        "{out}"
    );

    // The event log, replayed from its start: the servers came up, then the environment's story.
    let (ok, out, err) = run(vec![
        "events",
        "--after",
        "0",
        "--topic",
        "server,environment",
        "--count",
        "4",
    ])
    .await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("#1 ") && lines[0].contains(" server 1 up sim"),
        "{out}"
    );
    assert!(lines[2].contains(" environment 1 creating web"), "{out}");
    assert!(lines[3].contains(" environment 1 active web"), "{out}");
    let object: &'static str = format!("container:{id}").leak();
    let (ok, out, err) = run(vec![
        "--json", "events", "--after", "0", "--object", object, "--count", "1",
    ])
    .await;
    assert!(ok, "{err}");
    let first: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&first["topic"], &first["object_id"], &first["action"]),
        (&json!("container"), &json!(id), &json!("creating"))
    );

    let (ok, out, _) = run(vec!["--json", "command", "list"]).await;
    assert!(ok);
    let cmds: Value = serde_json::from_str(&out).unwrap();
    for field in ["id", "kind", "status", "parent", "error"] {
        assert!(cmds[0].get(field).is_some(), "command JSON lacks {field}");
    }
    assert!(
        cmds.as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "container.create" && c["parent"].is_i64())
    );

    let (ok, out, _) = run(vec!["server", "list"]).await;
    assert!(ok);
    assert!(out.contains("sim-1") && out.contains("sim-2"));

    let (ok, out, err) = run(vec!["container", "stop", "1", "--wait"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("succeeded"));

    // Errors: one clear line, non-zero exit.
    // A stop of a stopped container is accepted, then fails when it runs: with --wait, one line.
    let (ok, _, err) = run(vec!["container", "stop", "1", "--wait"]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("failed: container 1 is stopped"), "{err}");
    let (ok, _, err) = run(vec!["container", "show", "999"]).await;
    assert!(!ok);
    assert!(err.contains("container 999 does not exist"), "{err}");
    let (ok, _, err) = run(vec!["env", "create", "Bad_Name"]).await;
    assert!(!ok);
    assert!(err.contains("not a valid name"), "{err}");

    // A batch that places fewer than asked fails with a one-line summary and a non-zero exit.
    let args = [
        "container",
        "create",
        "--type",
        "plain",
        "--count",
        "5",
        "--cpu-millis",
        "10000",
        "--memory-mb",
        "64",
        "--disk-mb",
        "64",
        "--wait",
    ];
    let (ok, _, err) = run(args.to_vec()).await;
    assert!(!ok, "a partial batch must fail");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("failed: placed 2 of 5: ") && err.contains("cpu_millis"),
        "{err}"
    );
    let (ok, out, err) = run(vec!["container", "purge"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("purged 3 failed containers"), "{out}");

    // A queued command can be cancelled from the CLI; a finished one cannot.
    let (ok, _, err) = run(vec!["command", "cancel", "1"]).await;
    assert!(!ok);
    assert!(err.contains("only queued commands"), "{err}");
}

#[tokio::test]
async fn the_cli_says_clearly_when_no_core_answers() {
    let port = crate::common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (ok, _, err) = run_cli(url.clone(), vec!["env", "list"]).await;
    assert!(!ok);
    assert!(
        err.contains("cannot reach the core") && err.contains("cloud48 serve"),
        "{err}"
    );
    // An empty name is said as such, before any request.
    let (ok, _, err) = run_cli(url, vec!["env", "show", ""]).await;
    assert!(!ok);
    assert!(err.contains("a name or id given is empty"), "{err}");
}

#[test]
fn output_into_a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = crate::common::tempdir();
    // The reading end is gone before the command writes: like `cloud48 … | head -0`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(crate::common::binary())
        .args(["config", "show"])
        .current_dir(dir.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_flags_fill_in_the_types_defaults_and_refuse_what_is_not_positive() {
    let dir = crate::common::tempdir();
    let serve = crate::common::serve(
        &dir.path().join("data"),
        &["--sim-servers", "2", "--anonymous", "full"],
    )
    .await;
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(&serve.url, args));
    // The requirements a container created with `flags` got.
    let created = |flags: &[&str]| {
        let create = [&["--json", "container", "create"], flags].concat();
        let (ok, out, err) = run(&create);
        assert!(ok, "{err}");
        let id = serde_json::from_str::<Value>(&out).unwrap()["object_id"].clone();
        let (ok, out, _) = run(&["--json", "container", "show", &id.to_string()]);
        assert!(ok);
        let r = serde_json::from_str::<Value>(&out).unwrap()["requirements"].clone();
        let figures = [&r["cpu_millis"], &r["memory_mb"], &r["disk_mb"]].map(|v| v.as_u64());
        (figures, r)
    };
    // One resource flag with --spread: the others come from the type (tomcat: 1000 / 2048).
    let (figures, r) = created(&["--type", "tomcat", "--spread", "--memory-mb", "512"]);
    assert_eq!(figures, [Some(1000), Some(512), Some(2048)], "{r}");
    assert_eq!(r["spread"], true);
    // The built-in type has no plugin to ask: its defaults (500 / 1024) fill the rest.
    let (figures, r) = created(&["--type", "plain", "--label", "pool=a", "--memory-mb", "512"]);
    assert_eq!(figures, [Some(500), Some(512), Some(1024)], "{r}");
    assert_eq!(r["labels"], serde_json::json!(["pool=a"]));
    for (flag, value, says) in [
        ("--cpu-millis", "-5", "not above zero"),
        ("--memory-mb", "0", "not above zero"),
        ("--disk-mb", "lots", "not a whole number"),
    ] {
        let (ok, _, err) = run(&["container", "create", "--type", "tomcat", flag, value]);
        assert!(!ok && err.contains(says) && err.contains(flag), "{err}");
    }
}

#[test]
fn user_commands_outside_a_core_directory_say_where_they_looked() {
    let dir = crate::common::tempdir();
    let out = std::process::Command::new(crate::common::binary())
        .args(["user", "list"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no core database at") && err.contains("--data-dir"),
        "{err}"
    );
    // Nothing was created by looking, nor by adding a user where no core runs.
    let out = std::process::Command::new(crate::common::binary())
        .args(["user", "add", "zed", "--role", "viewer"])
        .env("CLOUD48_NEW_PASSWORD", "zeds-password")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no core database at") && err.contains("name its new data directory"),
        "{err}"
    );
    assert!(!dir.path().join("cloud48-data").join("cloud48.db").exists());
    // Its help offers where the database is, not the serving core's settings.
    let out = std::process::Command::new(crate::common::binary())
        .args(["user", "add", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--data-dir") && help.contains("--realm"),
        "{help}"
    );
    assert!(
        !help.contains("--workers") && !help.contains("--weight-cpu"),
        "{help}"
    );
}

/// `--wait` whose core dies says which command it waited for and how to follow it (the
/// command goes on: another core resumes it, or this one when it restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_cut_off_by_its_core_names_the_command_to_follow() {
    let dir = crate::common::tempdir();
    let mut core = crate::common::serve(
        &dir.path().join("core"),
        &[
            "--sim-servers",
            "1",
            "--sim-latency-ms",
            "4000",
            "--anonymous",
            "full",
        ],
    )
    .await;
    let waiting = tokio::spawn(run_cli(
        core.url.clone(),
        vec!["container", "create", "--type", "plain", "--wait"],
    ));
    let client = cloud48_core::cli::Client::new(&core.url);
    crate::common::eventually("the create runs", || async {
        let list: Vec<cloud48_engine::model::Command> = client.get("/v1/commands").await.ok()?;
        list.into_iter()
            .find(|c| c.status == cloud48_engine::model::CommandStatus::Running)
    })
    .await;
    core.kill9();
    let (ok, _, err) = waiting.await.unwrap();
    assert!(!ok);
    assert!(
        err.contains("stopped waiting for command 1, which goes on")
            && err.contains("cloud48 command wait 1"),
        "{err}"
    );
}

/// The CLI pointed at a node agent's URL says so, instead of blaming the sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pointed_at_an_agent_says_it_is_not_a_core() {
    let driver = std::sync::Arc::new(cloud48_engine::driver::sim::SimServer::new(
        "a",
        1,
        Default::default(),
        cloud48_engine::driver::sim::SimLatency::uniform(std::time::Duration::ZERO),
    ));
    let (_, url) = crate::agent::serve_agent("a", driver).await;
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || crate::common::cli(&url, &["server", "list"]))
            .await
            .unwrap();
    assert!(!ok);
    assert!(
        err.contains("is a node agent (`cloud48 agent`), not a core")
            && !err.contains("authentication"),
        "{err}"
    );
}

/// `cloud48 agent` without `--core` sends no heartbeats but serves: a core that is asked to
/// add it hears from it why it should not (it would be judged down at once).
#[tokio::test]
async fn an_agent_without_cores_serves_and_says_it_sends_no_heartbeats() {
    use tokio::io::AsyncBufReadExt;
    let dir = crate::common::tempdir();
    let tc = crate::common::TestCore::start(crate::common::Opts {
        sim_servers: 0,
        agent_token: Some(crate::agent::TOKEN.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    let mut agent = tokio::process::Command::new(crate::common::binary())
        .args([
            "agent", "--driver", "sim", "--name", "added", "--listen", &listen,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .env("CLOUD48_AGENT_TOKEN", crate::agent::TOKEN)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stderr.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("listening on") {
            break;
        }
    }
    let refused = tc
        .core
        .agents()
        .add(&format!("http://{listen}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("sends no heartbeats (it was started without --core)"),
        "the agent answered: {refused}"
    );
    assert!(agent.try_wait().unwrap().is_none(), "the agent serves on");
}

/// `cloud48 agent --core` pointed at a core that refuses it (here: one with no agents.token)
/// stops with the core's reason instead of serving nothing while it retries.
#[tokio::test]
async fn an_agent_the_core_refuses_stops_with_the_reason() {
    let dir = crate::common::tempdir();
    let core = crate::common::serve(&dir.path().join("core"), &[]).await;
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    let mut agent = tokio::process::Command::new(crate::common::binary())
        .args([
            "agent", "--driver", "sim", "--name", "lonely", "--listen", &listen,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .args(["--core", &core.url])
        .env("CLOUD48_AGENT_TOKEN", "a-token-of-sixteen-chars")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), agent.wait())
        .await
        .expect("the refused agent stops")
        .unwrap();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut agent.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "the core at {} refused this agent (409)",
            core.url
        )) && err.contains("this core has no agents.token")
            && err.contains("this run of the agent was not accepted"),
        "{err}"
    );
}

/// `agent --import-image` on a server that runs no images is refused with why, before the
/// agent starts.
#[test]
fn an_agent_that_runs_no_images_refuses_to_import_one() {
    let dir = crate::common::tempdir();
    let out = std::process::Command::new(crate::common::binary())
        .args([
            "agent",
            "--driver",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("agent"))
        .arg("--import-image")
        .arg(dir.path().join("web.tar"))
        .env("CLOUD48_AGENT_TOKEN", "a-token-of-sixteen-chars")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--import-image: this server runs no images (the sim driver runs no images)"),
        "{err}"
    );
}

/// `agent --import-image` takes every image of an OCI layout into the server's store through
/// its driver, and says so; a file that is not there stops the agent with the path.
#[tokio::test]
async fn an_agent_imports_images_from_files_at_start() {
    use tokio::io::AsyncBufReadExt;
    let dir = crate::common::tempdir();
    let prefix = crate::linux::unique_prefix('m');
    let _sweep = crate::linux::Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let (_, image) = crate::images::layout(dir.path(), "test/boot:1", 1);
    let layout = dir.path().join("layout");
    let agent = |file: &std::path::Path| {
        let mut c = tokio::process::Command::new(crate::common::binary());
        c.args(["agent", "--driver", "qemu", "--listen", "127.0.0.1:0"])
            .args(["--subnet", "10.242.97.0/24", "--prefix", &prefix])
            .args(["--bridge", &format!("{prefix}br0"), "--data-dir"])
            .arg(dir.path().join("agent"))
            .arg("--import-image")
            .arg(file)
            .env("CLOUD48_AGENT_TOKEN", "a-token-of-sixteen-chars")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let mut child = agent(&layout).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let said = format!(
        "imported test/boot:1@{} from {}",
        image.digest,
        layout.display()
    );
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let done = line.contains(&said);
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains(&said)),
        "the agent never said it imported: {seen:?}"
    );
    child.kill().await.unwrap();
    let held = cloud48_engine::images::Store::open_server(&dir.path().join("agent")).unwrap();
    assert_eq!(
        held.show("test/boot:1").unwrap().summary.digest,
        image.digest
    );

    let missing = dir.path().join("missing.tar");
    let out = agent(&missing).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--import-image {}", missing.display()))
            && err.contains("cannot import"),
        "{err}"
    );
}

/// Shell completions name every subcommand, for each shell.
#[test]
fn completion_scripts_know_the_subcommands() {
    for (shell, marker) in [
        ("bash", "_cloud48()"),
        ("zsh", "#compdef cloud48"),
        ("fish", "complete -c cloud48"),
    ] {
        let out = std::process::Command::new(crate::common::binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script}");
        for sub in ["container", "events", "audit", "watch"] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    let out = std::process::Command::new(crate::common::binary())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}

/// `container list` streams a list longer than a page (1,000): JSON stays one array holding
/// every container once, in id order; for people, a table per page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_list_streams_a_list_longer_than_a_page() {
    let dir = crate::common::tempdir();
    let serve = serve_two_sims(dir.path()).await;
    let url = serve.url.clone();
    let run = |args: Vec<&'static str>| run_cli(url.clone(), args);
    let (ok, _, err) = run(vec![
        "container",
        "create",
        "--type",
        "plain",
        "--count",
        "1500",
        "--cpu-millis",
        "1",
        "--memory-mb",
        "1",
        "--disk-mb",
        "1",
        "--wait",
    ])
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = run(vec!["--json", "container", "list"]).await;
    assert!(ok, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).expect("one JSON array");
    let ids: Vec<i64> = list.iter().map(|c| c["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), 1500);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in order, none twice"
    );
    let (ok, out, err) = run(vec!["container", "list"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.matches("ENVIRONMENT").count(), 2, "a table per page");
    assert_eq!(out.matches(" plain ").count(), 1500);
    // One page at a time, each telling where the next starts.
    let (ok, out, err) = run(vec!["--json", "container", "list", "--limit", "2"]).await;
    assert!(ok, "{err}");
    let page: Vec<Value> = serde_json::from_str(&out).unwrap();
    let first: Vec<i64> = page.iter().map(|c| c["id"].as_i64().unwrap()).collect();
    assert_eq!(first, ids[..2]);
    let after = first[1].to_string();
    assert!(
        err.contains(&format!("list the next page with --after {after}")),
        "{err}"
    );
    let after: &'static str = Box::leak(after.into_boxed_str());
    let (ok, out, _) = run(vec![
        "--json",
        "container",
        "list",
        "--limit",
        "2",
        "--after",
        after,
    ])
    .await;
    assert!(ok);
    let page: Vec<Value> = serde_json::from_str(&out).unwrap();
    let second: Vec<i64> = page.iter().map(|c| c["id"].as_i64().unwrap()).collect();
    assert_eq!(second, ids[2..4]);
}

/// A core started where another core already listens is told apart from it: waiting for it
/// does not take the other's answers for its own (tests and benchmarks start cores on ports
/// picked moments before, which another process can take meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_core_never_takes_another_core_s_answer_for_its_own() {
    let dir = crate::common::tempdir();
    let first = serve_two_sims(dir.path()).await;
    let listen = first.url.trim_start_matches("http://").to_string();
    let second = dir.path().join("second");
    let mut late = cloud48_core::serving::ServeProcess::spawn_at(
        std::path::Path::new(crate::common::binary()),
        &second,
        &listen,
        &["--sim-servers", "2", "--anonymous", "full"],
    )
    .unwrap();
    let err = late.health(true).await.unwrap_err().to_string();
    assert!(
        err.contains(&listen) && err.contains("another process holds the port"),
        "{err}"
    );
}

/// A core whose picked port another process takes before the core listens is started again
/// on another port, and waiting for it ends with the core itself answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_whose_port_is_taken_meanwhile_starts_again_on_another() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let mut serve = cloud48_core::serving::ServeProcess::spawn(
        std::path::Path::new(crate::common::binary()),
        &data,
        &["--sim-servers", "1", "--anonymous", "full"],
    )
    .unwrap();
    let taken = serve.url.clone();
    // The core opens its database before it listens: the port is taken long before that.
    let squatter = std::net::TcpListener::bind(taken.trim_start_matches("http://"))
        .expect("the port is taken before the core listens on it");
    std::thread::spawn(move || {
        // Accept and hang up at once: no answer the core could be mistaken for.
        for conn in squatter.incoming() {
            drop(conn);
        }
    });
    serve.health(true).await.unwrap();
    assert_ne!(serve.url, taken);
    let answer: Value = reqwest::get(format!("{}/v1/health", serve.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let node = std::fs::read_to_string(data.join("node-id")).unwrap();
    assert_eq!(answer["node"], node.trim());
}

/// A core that cannot listen leaves no data directory of its own making behind.
#[test]
fn serve_on_a_busy_port_fails_without_creating_its_data_directory() {
    let dir = crate::common::tempdir();
    let data = dir.path().join("data");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = busy.local_addr().unwrap().to_string();
    let out = std::process::Command::new(crate::common::binary())
        .args(["serve", "--listen", &listen, "--data-dir"])
        .arg(&data)
        .args(["--sim-servers", "1", "--anonymous", "full"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");
    assert!(!data.exists(), "{} was left behind", data.display());
}

/// An export that is refused (or breaks off) leaves the file it was to write as it was, and
/// no partial file beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_export_keeps_the_file_it_was_to_replace() {
    let dir = crate::common::tempdir();
    let serve = serve_two_sims(dir.path()).await;
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(&serve.url, args));
    let (ok, out, err) = run(&["--json", "container", "create", "--type", "plain", "--wait"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["target_id"].to_string();
    let keep = dir.path().join("keep.tar");
    std::fs::write(&keep, b"an earlier export").unwrap();
    let file = keep.to_str().unwrap();
    // Running (409), then no such container (404).
    for (what, says) in [(id.as_str(), "stop it first"), ("9999", "does not exist")] {
        let (ok, _, err) = run(&["container", "export", what, "-o", file]);
        assert!(!ok && err.contains(says), "{err}");
        assert_eq!(std::fs::read(&keep).unwrap(), b"an earlier export");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Stopped, it is exported over the old file.
    let (ok, _, err) = run(&["container", "stop", &id, "--wait"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["container", "export", &id, "-o", file]);
    assert!(ok, "{err}");
    assert_ne!(std::fs::read(&keep).unwrap(), b"an earlier export");
}

/// The database holds the users' Digest hashes and the secrets' key: a core makes it, and a
/// data directory it creates, readable by their owner only, and closes a database others
/// could read; a directory that was there keeps its mode (it may be shared on purpose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = crate::common::tempdir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(shared.join("cloud48.db"), b"").unwrap();
    std::fs::set_permissions(
        shared.join("cloud48.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let new = dir.path().join("new").join("data");
    for (data, dir_mode) in [(shared, 0o755), (new, 0o700)] {
        let mut config = cloud48_engine::CoreConfig::new(&data);
        config.sim_servers = 1;
        config.plugin_cache = Some(std::env::temp_dir().join("cloud48-test-plugin-cache"));
        let core = cloud48_engine::Core::open(config).await.unwrap();
        assert_eq!(mode(&data), dir_mode, "{}", data.display());
        assert_eq!(mode(&data.join("cloud48.db")), 0o600, "{}", data.display());
        core.stop(std::time::Duration::ZERO).await;
    }
}

/// `watch env` follows an environment until it is destroyed, then ends with its last view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_env_ends_when_the_environment_is_destroyed() {
    let dir = crate::common::tempdir();
    let serve = serve_two_sims(dir.path()).await;
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(&serve.url, args));
    let (ok, _, err) = run(&["env", "create", "brief", "--wait"]);
    assert!(ok, "{err}");
    let mut watch = tokio::process::Command::new(crate::common::binary())
        .args(["--server", &serve.url, "--json", "watch", "env", "brief"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    // Its first view: the stream is live.
    let first = lines.next_line().await.unwrap().expect("a first view");
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["status"],
        "active"
    );
    let (ok, _, err) = run(&["env", "destroy", "brief", "--wait"]);
    assert!(ok, "{err}");
    let mut last = first;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            last = line;
        }
        watch.wait().await.unwrap()
    })
    .await
    .expect("watch ends once the environment is destroyed");
    assert!(ended.success());
    assert_eq!(
        serde_json::from_str::<Value>(&last).unwrap()["status"],
        "destroyed"
    );
}
