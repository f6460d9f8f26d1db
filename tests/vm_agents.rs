//! Live migrations whose agents die: real agent processes (`cloud48 agent --driver qemu`) on
//! one network, the test core in this process with the VM image in its store. The source's
//! agent is killed (-9) while a VM moves, then the target's; each comes back at once. Wherever
//! the kill lands, the command ends with exactly one running VM, on the server the core names,
//! answering at its address, with nothing left on the other server and no dummy.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use cloud48_engine::driver::remote::{RemoteDriver, RemoteTimeouts};
use cloud48_engine::driver::{Driver, GuestState};
use cloud48_engine::model::{Command, CommandStatus, Container, ContainerStatus, Server};
use serde_json::json;

use crate::agent::TOKEN;
use crate::common::ServeProcess;
use crate::common::{Opts, TestCore, eventually};
use crate::vm::{Load, VmSweep, VmWeb, answer, factory, source};
use cloud48_engine::model::Accepted;

/// One agent process; `restart` kills it with SIGKILL and starts it again with the same
/// arguments (same address, directory and name).
struct Agent {
    name: String,
    url: String,
    data_dir: PathBuf,
    args: Vec<String>,
    child: Option<tokio::process::Child>,
}

impl Agent {
    /// Agent `n` of a test whose files are under `dir` and whose interfaces start with
    /// `prefix`; every agent of a test is on one network, `10.242.NET.0/24`.
    fn new(dir: &Path, prefix: &str, net: u32, n: u32, core_url: &str) -> Agent {
        let port = crate::common::free_port();
        let name = format!("{prefix}-{n}");
        let data_dir = dir.join(format!("server-{n}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let args = [
            "--driver",
            "qemu",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--core",
            core_url,
            "--name",
            &name,
            "--data-dir",
            &data_dir.to_string_lossy(),
            // One network for both: a VM moving live keeps its address.
            "--subnet",
            &format!("10.242.{net}.0/24"),
            // One network, a range of it each.
            "--addresses",
            &format!(
                "10.242.{net}.{}-10.242.{net}.{}",
                10 + 100 * n,
                99 + 100 * n
            ),
            "--bridge",
            &format!("{prefix}br0"),
            "--prefix",
            &format!("{prefix}{n}"),
            "--capacity",
            "4000,4096,20000",
            "--heartbeat-ms",
            "200",
            "--boot-timeout-secs",
            "240",
        ]
        .map(String::from)
        .to_vec();
        Agent {
            name,
            url: format!("http://127.0.0.1:{port}"),
            data_dir,
            args,
            child: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cloud48"))
            .arg("agent")
            .args(&self.args)
            .env("CLOUD48_AGENT_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the agent starts");
        self.child = Some(child);
    }

    async fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
        self.start();
    }

    /// What it wrote to its standard error.
    fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// The agent as the core reaches it (for looking at what it runs).
    fn remote(&self) -> RemoteDriver {
        RemoteDriver::new(&self.name, &self.url, TOKEN, RemoteTimeouts::default())
    }

    /// Returns once this server's QEMU for `guest` waits for it to arrive (its QMP socket
    /// exists): the source is about to send it. A first target pulls the image before.
    async fn waiting_for(&self, guest: &str) {
        let socket = self.data_dir.join(format!("guests/{guest}/qmp.sock"));
        let what = format!("server {} gets ready to receive the VM", self.name);
        crate::common::eventually_within(&what, std::time::Duration::from_secs(240), || async {
            socket.exists().then_some(())
        })
        .await;
    }
}

/// After a live move of `guest` from agent `from` to agent `to` ended as `done`: the core
/// says where the container is (`row`), it runs, and exactly that server runs its VM while
/// the other holds nothing of it; a failed move left it where it was and says why. Returns
/// the index of the agent that runs it.
async fn one_running_vm(
    agents: &[Agent],
    guest: &str,
    (from, to): (usize, usize),
    row: &Container,
    done: &Command,
) -> usize {
    assert_eq!(row.status, ContainerStatus::Running, "{done:?}");
    let now = agents
        .iter()
        .position(|a| Some(&a.name) == row.server.as_ref())
        .expect("the container is on one of the agents' servers");
    match done.status {
        CommandStatus::Succeeded => assert_eq!(now, to, "{done:?}"),
        _ => {
            assert_eq!(
                now, from,
                "a failed move leaves the VM where it was: {done:?}"
            );
            assert!(done.error.is_some(), "{done:?}");
        }
    }
    let states = eventually("every agent answers again", || async {
        let mut states = Vec::new();
        for a in agents {
            states.push(a.remote().status(guest).await.ok()?.map(|g| g.state));
        }
        Some(states)
    })
    .await;
    let mut expected = vec![None; agents.len()];
    expected[now] = Some(GuestState::Running);
    assert_eq!(states, expected, "{done:?}");
    now
}

/// Waits until every agent registered and is up (`servers` lists the core's servers); says
/// what the agents wrote when they do not.
async fn all_up<F, Fut>(agents: &[Agent], servers: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<Server>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let up = servers()
            .await
            .iter()
            .filter(|s| s.status == cloud48_engine::model::ServerStatus::Up)
            .count();
        if up == agents.len() {
            return;
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| format!("{}:\n{}", a.name, a.log()))
                .collect();
            panic!(
                "the agents did not register within 30 s:\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn no_dummy(servers: &[Server]) {
    for s in servers {
        assert_eq!(s.dummies, 0, "server {} keeps a dummy", s.name);
    }
}

#[tokio::test]
async fn a_live_migration_whose_source_or_target_agent_is_killed_leaves_one_running_vm() {
    let _one = crate::common::HEAVY.lock().await;
    let images = source().await;
    let (f, _sweep) = factory('k', 62, images.clone());
    let tc = TestCore::start(Opts {
        sim_servers: 0,
        agent_token: Some(TOKEN.into()),
        types: vec![Arc::new(VmWeb)],
        images_dir: Some(images.root().to_path_buf()),
        // Steps that fail while an agent is down are retried until it is back (about 10 s).
        max_attempts: 14,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut agents = [0, 1].map(|n| Agent::new(f.dir.path(), &f.prefix, 62, n, &tc.url));
    for a in &mut agents {
        a.start();
    }
    all_up(&agents, || async {
        tc.core.servers().list().await.unwrap()
    })
    .await;

    // The first VM pulls its image from the core and boots under TCG.
    let c = vm_on(&tc, &agents[0]).await;
    let (id, guest, ip) = (c.id, c.guest_id.clone(), c.ip.clone().unwrap());
    let client = Load::start(ip.clone());
    client.answers(3).await;

    let mut on = 0;
    for kill_source in [true, false] {
        let to = 1 - on;
        let command = move_live(&tc, id, &agents[to].name).await;
        // The moment the target's QEMU waits for the VM, the source is about to send it.
        agents[to].waiting_for(&guest).await;
        let victim = if kill_source { on } else { to };
        agents[victim].restart().await;
        let done = finished(&tc, command).await;

        let row = tc.core.containers().get_by_id(id).await.unwrap();
        let now = one_running_vm(&agents, &guest, (on, to), &row, &done).await;
        assert_eq!(
            answer(&ip).await,
            format!("page=from-the-image host={guest}")
        );
        no_dummy(&tc.core.servers().list().await.unwrap());
        on = now;
    }
    let (ok, _) = client.finish().await;
    assert!(ok > 3);

    // The VM, with an address of the first server's range, runs on the second: the first
    // does not hand that address out again.
    if on == 0 {
        let done = finished(&tc, move_live(&tc, id, &agents[1].name).await).await;
        assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    }
    let other = vm_on(&tc, &agents[0]).await;
    assert_ne!(other.ip.as_deref(), Some(ip.as_str()));
    assert_eq!(
        answer(other.ip.as_deref().unwrap()).await,
        format!("page=from-the-image host={}", other.guest_id)
    );
    assert_eq!(
        answer(&ip).await,
        format!("page=from-the-image host={guest}")
    );

    // A VM that does not answer on the target (its guest agent gone; a kernel that died on
    // arrival looks the same) is not taken over there: the move fails, the target's copy is
    // destroyed and the VM goes on where it was, from its memory.
    let exec = |command: serde_json::Value| {
        let client = tc.client.clone();
        async move {
            client
                .post::<_, serde_json::Value>(
                    &format!("/v1/containers/{id}/exec"),
                    &json!({ "command": command }),
                )
                .await
        }
    };
    let gone = "(sleep 1; kill $(cat /run/qemu-ga.pid)) </dev/null >/dev/null 2>&1 &";
    let out = exec(json!(["sh", "-c", gone])).await.unwrap();
    assert_eq!(out["exit_code"], 0, "{out}");
    crate::common::eventually_within(
        "the guest agent gone",
        std::time::Duration::from_secs(120),
        || async { exec(json!(["true"])).await.is_err().then_some(()) },
    )
    .await;
    let done = finished(&tc, move_live(&tc, id, &agents[0].name).await).await;
    assert_eq!(done.status, CommandStatus::Failed, "{done:?}");
    let error = done.error.clone().unwrap_or_default();
    assert!(error.contains("does not answer"), "{error}");
    let row = tc.core.containers().get_by_id(id).await.unwrap();
    assert_eq!(
        one_running_vm(&agents, &guest, (1, 0), &row, &done).await,
        1
    );
    assert_eq!(
        answer(&ip).await,
        format!("page=from-the-image host={guest}")
    );
    no_dummy(&tc.core.servers().list().await.unwrap());
}

/// A new container of the test VM type on `agent`'s server, once it runs.
async fn vm_on(tc: &TestCore, agent: &Agent) -> Container {
    let cmd: serde_json::Value = tc
        .client
        .post(
            "/v1/containers",
            &json!({ "type": "vmweb", "server": agent.name }),
        )
        .await
        .unwrap();
    let done = finished(tc, cmd["command_id"].as_i64().unwrap()).await;
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    let id = done.result.unwrap()["container_id"].as_i64().unwrap();
    tc.core
        .containers()
        .get_by_id(cloud48_engine::model::ContainerId(id))
        .await
        .unwrap()
}

/// Asks for a live move of container `id` to server `to`; returns the command's id.
async fn move_live(tc: &TestCore, id: cloud48_engine::model::ContainerId, to: &str) -> i64 {
    let a: serde_json::Value = tc
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "live": true, "to": to }),
        )
        .await
        .unwrap();
    a["command_id"].as_i64().unwrap()
}

/// Waits (up to 4 minutes) for a command to end.
async fn finished(tc: &TestCore, id: i64) -> Command {
    let cmd = tc
        .core
        .queue()
        .wait(
            cloud48_engine::model::CommandId(id),
            std::time::Duration::from_secs(240),
        )
        .await
        .expect("the command exists");
    assert!(
        cmd.status.is_terminal(),
        "command {id} did not end: {cmd:?}"
    );
    cmd
}

/// The real core, killed (-9) while a VM moves live between two agents and started again on
/// the same address: the command resumes from its last committed step (the VM is then sent,
/// being sent or not yet) and ends with exactly one running VM, where the core says it is.
/// The VM is the bundled balancer type's nginx (`cloud48/nginx-vm`, built into the core's
/// store).
#[tokio::test]
async fn a_live_migration_whose_core_is_killed_resumes_and_leaves_one_running_vm() {
    use cloud48_core::cli::Client;
    use cloud48_engine::images::{Builder, DEFAULT_MIRROR, Store};
    let _one = crate::common::HEAVY.lock().await;
    let dir = crate::common::tempdir();
    let prefix = crate::linux::unique_prefix('q');
    let _sweep = VmSweep::new(dir.path(), &prefix);
    let data = dir.path().join("core");
    let store = Store::open(data.join("images")).unwrap();
    tokio::task::spawn_blocking(move || {
        let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/nginx.toml");
        Builder::new(crate::vm::cache_dir(), DEFAULT_MIRROR)
            .vm(true)
            .build(&recipe, &store, &mut |_| {})
            .expect("the balancer's VM image builds")
    })
    .await
    .unwrap();
    let config = dir.path().join("core.toml");
    std::fs::write(&config, format!("[agents]\ntoken = \"{TOKEN}\"\n")).unwrap();
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    let config = config.to_string_lossy().into_owned();
    let flags = [
        "--config",
        &config,
        "--anonymous",
        "full",
        "--sim-servers",
        "0",
        "--lease-ms",
        "2000",
        "--plugin-deadline-ms",
        "2000",
    ];
    let start = || async {
        let mut core =
            ServeProcess::spawn_at(Path::new(crate::common::binary()), &data, &listen, &flags)
                .unwrap();
        core.health(true).await.expect("the core gets ready");
        core
    };
    let mut core = start().await;
    let client = Client::new(&core.url);
    let mut agents = [0, 1].map(|n| Agent::new(dir.path(), &prefix, 64, n, &core.url));
    for a in &mut agents {
        a.start();
    }
    let servers = || async { client.get::<Vec<Server>>("/v1/servers").await.unwrap() };
    all_up(&agents, servers).await;
    let a: Accepted = client
        .post(
            "/v1/containers",
            &json!({ "type": "balancer", "server": agents[0].name }),
        )
        .await
        .unwrap();
    let done = client.command(a.command_id, 240).await.unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded, "{done:?}");
    let id = done.result.unwrap()["container_id"].as_i64().unwrap();
    let c: Container = client.get(&format!("/v1/containers/{id}")).await.unwrap();
    let (guest, ip) = (c.guest_id.clone(), c.ip.clone().unwrap());

    let a: Accepted = client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "live": true, "to": agents[1].name }),
        )
        .await
        .unwrap();
    agents[1].waiting_for(&guest).await;
    core.kill9();
    core = start().await;
    let done = client.command(a.command_id, 240).await.unwrap();
    assert!(done.status.is_terminal(), "{done:?}");
    let row: Container = client.get(&format!("/v1/containers/{id}")).await.unwrap();
    one_running_vm(&agents, &guest, (0, 1), &row, &done).await;
    no_dummy(&servers().await);
    // nginx answers at the VM's address.
    let answered = reqwest::Client::new()
        .get(format!("http://{ip}/"))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await;
    assert!(answered.is_ok(), "{answered:?}");
    drop(core);
}
