//! An agent's bridge on the host (`cloud48 agent --driver linux`, as root): a run the core
//! refuses gives back what it changed on it, and the gateway address an earlier run with
//! another `--subnet` put there goes once a core accepts the new one; an operator's address
//! on the bridge stays.

use std::path::Path;
use std::time::Duration;

use crate::linux::{Sweep, interface, unique_prefix};

/// `cloud48 agent` over the linux driver, its standard error in `DIR/NAME.log`.
fn agent(
    dir: &Path,
    run: &str,
    prefix: &str,
    bridge: &str,
    subnet: &str,
    core: &str,
) -> tokio::process::Child {
    let log = std::fs::File::create(dir.join(format!("{run}.log"))).unwrap();
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    tokio::process::Command::new(crate::common::binary())
        .args(["agent", "--driver", "linux", "--images", "off"])
        .args(["--name", &format!("{prefix}-node"), "--listen", &listen])
        .args(["--prefix", &format!("{prefix}0"), "--bridge", bridge])
        .args(["--subnet", subnet, "--core", core, "--heartbeat-ms", "200"])
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .env("CLOUD48_AGENT_TOKEN", super::TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits for a run the core refuses to stop, and returns what it said.
async fn refused(dir: &Path, run: &str, mut child: tokio::process::Child) -> String {
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the refused agent stops")
        .unwrap();
    let said = std::fs::read_to_string(dir.join(format!("{run}.log"))).unwrap();
    assert!(
        !status.success() && said.contains("this run of the agent was not accepted"),
        "{said}"
    );
    said
}

/// The addresses the agent recorded as its own, by bridge.
fn recorded(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("agent").join("bridges.json"))
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_else(|_| serde_json::json!({}))
}

/// Whether interface `name` is up.
fn up(name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", name])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    shown[0]["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP"))
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// Regression (an operator's trial): an agent the core refused left the gateway address of
/// its subnet on its bridge, and the host's route for that range pointed at the bridge of an
/// agent that had stopped. A refused run removes the bridge it created, or on an operator's
/// bridge the address and MAC address it set (and it is down again, as it was), and keeps the
/// operator's address.
#[tokio::test]
async fn an_agent_the_core_refuses_gives_back_what_it_changed_on_its_bridge() {
    let prefix = unique_prefix('g');
    let (new, old) = (format!("{prefix}br0"), format!("{prefix}br1"));
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![new.clone(), old.clone()],
    };
    let dir = crate::common::tempdir();
    let dir = dir.path();
    // A core without agents.token refuses every agent (409).
    let core = crate::common::serve(&dir.join("core"), &[]).await;

    let run = agent(dir, "new", &prefix, &new, "10.244.201.0/24", &core.url);
    refused(dir, "new", run).await;
    assert_eq!(interface(&new), None, "the bridge it created is gone");

    ip(&["link", "add", &old, "type", "bridge"]);
    ip(&["addr", "add", "10.244.202.5/24", "dev", &old]);
    let before = interface(&old).unwrap();
    let run = agent(dir, "old", &prefix, &old, "10.244.202.128/25", &core.url);
    refused(dir, "old", run).await;
    assert_eq!(
        interface(&old),
        Some(before),
        "the operator's bridge is as it was"
    );
    assert!(!up(&old), "down, as the operator left it");
    assert_eq!(recorded(dir), serde_json::json!({}));
}

/// Regression (an operator's trial): an agent restarted with another `--subnet` added the new
/// gateway address to its bridge and kept the old one. The old one, recorded as the agent's,
/// goes once a core accepts the new subnet; a run the core refuses (its containers may still
/// hold addresses of the old subnet) leaves it. An operator's address stays throughout.
#[tokio::test]
async fn an_agent_back_with_another_subnet_takes_its_old_gateway_off_its_bridge_once_accepted() {
    let prefix = unique_prefix('h');
    let bridge = format!("{prefix}br0");
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![bridge.clone()],
    };
    let tc = crate::common::TestCore::start(super::agent_opts())
        .await
        .unwrap();
    let dir = crate::common::tempdir();
    let dir = dir.path();
    let refusing = crate::common::serve(&dir.join("core"), &[]).await;
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["addr", "add", "10.244.205.5/24", "dev", &bridge]);
    let addresses = || {
        let mut a = interface(&bridge).unwrap().1;
        a.sort();
        a
    };

    let mut first = agent(dir, "first", &prefix, &bridge, "10.244.206.0/24", &tc.url);
    crate::common::eventually("the first run recorded its gateway address", || async {
        (recorded(dir) == serde_json::json!({ &bridge: ["10.244.206.1/24"] })).then_some(())
    })
    .await;
    first.kill().await.unwrap();
    assert_eq!(addresses(), ["10.244.205.5/24", "10.244.206.1/24"]);

    let run = agent(
        dir,
        "refused",
        &prefix,
        &bridge,
        "10.244.207.0/24",
        &refusing.url,
    );
    refused(dir, "refused", run).await;
    assert_eq!(
        addresses(),
        ["10.244.205.5/24", "10.244.206.1/24"],
        "a refused run leaves the old gateway and takes its new one off"
    );
    assert_eq!(
        interface(&bridge).unwrap().0,
        "02:48:0a:f4:ce:01",
        "the MAC address of the old gateway"
    );

    let mut accepted = agent(
        dir,
        "accepted",
        &prefix,
        &bridge,
        "10.244.207.0/24",
        &tc.url,
    );
    crate::common::eventually("the old gateway address is gone", || async {
        (addresses() == ["10.244.205.5/24", "10.244.207.1/24"]).then_some(())
    })
    .await;
    assert_eq!(
        recorded(dir),
        serde_json::json!({ &bridge: ["10.244.207.1/24"] })
    );
    accepted.kill().await.unwrap();
}
