//! Guests travel between agents as streams: a container with 1 GiB of its own files migrates
//! from one real agent to another (each in its own network namespace) with every byte intact,
//! while neither agent's memory grows by more than 64 MiB, and nothing stays in transit; then
//! it is exported through the core as an archive and uploaded back (refused: its own
//! platform's), leaving nothing on the core.
//! Needs root.

use std::time::Duration;

use cloud48_engine::managers::ContainerCommand;
use cloud48_engine::model::{CommandId, CommandStatus, ContainerId};
use serde_json::json;

use crate::agent::TOKEN;
use crate::common::TestCore;
use crate::linux::unique_prefix;
use cloud48_core::lab::Lab;

/// Resident and peak resident memory of a process, bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn sh(t: &TestCore, id: ContainerId, script: &str) -> String {
    let out: cloud48_engine::driver::ExecOutput = t
        .client
        .post(
            &format!("/v1/containers/{id}/exec"),
            &json!({ "command": ["sh", "-c", script] }),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    out.stdout
}

/// Files in a directory tree (not directories).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { files_under(&p) } else { vec![p] }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_with_a_gibibyte_of_files_migrates_as_a_stream_in_bounded_memory() {
    let prefix = unique_prefix('t');
    let mut lab = Lab::new(&prefix, 2, env!("CARGO_BIN_EXE_cloud48").into(), TOKEN)
        .expect("the lab builds (run as root)");
    let t = crate::real::lab_core().await;
    for i in [1, 2] {
        lab.start_agent(i, &t.url).unwrap();
    }
    crate::real::all_up(&t, 2).await;
    let a: serde_json::Value = t
        .client
        .post(
            "/v1/containers",
            &json!({
                "type": "plain",
                "server": "h1",
                "requirements": { "cpu_millis": 500, "memory_mb": 2048, "disk_mb": 2048 },
            }),
        )
        .await
        .unwrap();
    let id = t.created(a["command_id"].as_i64().unwrap()).await;
    // 1 GiB that does not compress, in the container's own directory.
    let sum = sh(
        &t,
        id,
        "head -c 1073741824 /dev/urandom > /etc/cloud48/bulk && sha256sum /etc/cloud48/bulk",
    )
    .await;

    let c0: cloud48_engine::model::Container =
        t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    let pids = [lab.agent_pid(1).unwrap(), lab.agent_pid(2).unwrap()];
    let before = pids.map(|p| memory(p).0);
    let a: serde_json::Value = t
        .client
        .post(
            &format!("/v1/containers/{id}/actions"),
            &json!({ "op": "migrate", "to": "h2" }),
        )
        .await
        .unwrap();
    let cmd = t
        .core
        .queue()
        .wait(
            CommandId(a["command_id"].as_i64().unwrap()),
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    assert_eq!(cmd.status, CommandStatus::Succeeded, "{cmd:?}");
    for (i, pid) in pids.iter().enumerate() {
        let (_, peak) = memory(*pid);
        let grew = peak.saturating_sub(before[i]);
        eprintln!(
            "agent h{}: {} MiB before, peak {} MiB",
            i + 1,
            before[i] >> 20,
            peak >> 20
        );
        assert!(
            grew <= 64 << 20,
            "agent h{} grew by {} MiB moving 1 GiB (peak {} MiB)",
            i + 1,
            grew >> 20,
            peak >> 20
        );
    }
    // The command told how the transfer went while it ran.
    let shown: cloud48_engine::model::Command = t
        .client
        .get(&format!("/v1/commands/{}", cmd.id))
        .await
        .unwrap();
    let said: Vec<&str> = shown.log.iter().map(|l| l.message.as_str()).collect();
    assert!(
        said.iter().any(|m| m.starts_with("server h1: archived ")
            && m.ends_with(&format!(" MiB of {}", c0.guest_id))),
        "the command's log reports the export: {said:?}"
    );
    assert!(
        said.iter().any(|m| m.starts_with("server h2: ")),
        "the command's log reports the import: {said:?}"
    );
    let c: cloud48_engine::model::Container =
        t.client.get(&format!("/v1/containers/{id}")).await.unwrap();
    assert_eq!(c.server.as_deref(), Some("h2"));
    assert_eq!(
        sh(&t, id, "sha256sum /etc/cloud48/bulk").await,
        sum,
        "every byte came along"
    );
    // Nothing stays in transit: the target removed what it pulled once imported, and had the
    // source drop its export.
    for (host, dir) in [(2, "imports"), (1, "exports")] {
        assert_eq!(
            files_under(&lab.agent_dir(host).join("spool").join(dir)),
            Vec::<std::path::PathBuf>::new(),
            "h{host}'s spool/{dir}"
        );
    }

    // Exported for another platform, the same gibibyte streams through the core into an
    // archive (a JSON export would have held it twice over in the core's memory); uploaded
    // back here it is read whole to the core's disk, refused (this platform's own export:
    // clone instead) and nothing of it stays.
    t.ok(crate::container::act(&t, id, ContainerCommand::Stop {}).await)
        .await;
    let dir = crate::common::tempdir();
    let file = dir.path().join("bulk.tar");
    let started = std::time::Instant::now();
    let (ok, _, err) = crate::common::cli(
        &t.url,
        &[
            "container",
            "export",
            &id.to_string(),
            "-o",
            file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let mut archive = tar::Archive::new(std::fs::File::open(&file).unwrap());
    let sizes: Vec<(String, u64)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path().unwrap().to_string_lossy().into_owned(), e.size())
        })
        .collect();
    let exported = started.elapsed();
    // The agent's copy went once the core had sent it all.
    assert_eq!(
        files_under(&lab.agent_dir(2).join("spool").join("exports")),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(sizes[0].0, "cloud48-export.json");
    assert!(sizes[1].0 == "disk" && sizes[1].1 > 1 << 30, "{sizes:?}");
    let started = std::time::Instant::now();
    let (ok, _, err) = crate::common::cli(&t.url, &["container", "import", file.to_str().unwrap()]);
    eprintln!(
        "export of {} MiB through the core: {} ms; upload back (read to disk, then refused): {} ms",
        sizes[1].1 >> 20,
        exported.as_millis(),
        started.elapsed().as_millis()
    );
    assert!(!ok && err.contains("container clone"), "{err}");
    assert_eq!(
        files_under(&t._dir.path().join("uploads")),
        Vec::<std::path::PathBuf>::new()
    );
}
