//! Live migration between two QEMU processes, as libvirt does it without shared storage: the
//! target QEMU starts paused waiting for an incoming migration (`-incoming defer`) with an
//! empty overlay of the same image and exports that disk over NBD; the source mirrors its disk
//! there (`blockdev-mirror`, `sync: top`: only what the VM wrote, the image being on both;
//! `write-blocking`: once in sync every write reaches both), then migrates memory while the
//! VM runs; QEMU pauses it for the last pass (at most `DOWNTIME_LIMIT_MS`). The source then
//! ends its mirror and quits; the target stops its NBD server and continues.
//!
//! The commands below are QMP commands sent through `qapi`'s transport, declared here with
//! only the fields this driver uses, so that a newer QEMU's additions to their answers do not
//! break them.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use cloud48_driver::{LiveReport, LiveTarget, activity};

use crate::control::qmp;

/// The disk's node name in every VM (`machine::args`).
pub const DISK_NODE: &str = "disk0";
/// The name of the target's NBD export of that disk.
const EXPORT: &str = "disk0";
/// The source's node of the target's disk.
const TARGET_NODE: &str = "migration-target";
/// The source's mirror job.
const MIRROR_JOB: &str = "migration-mirror";
/// Most time the VM may be paused for the last pass, ms (QEMU's default is 300).
pub const DOWNTIME_LIMIT_MS: u64 = 50;
/// Longest a migration may take before it is cancelled.
const MIGRATION_LIMIT: Duration = Duration::from_secs(600);

macro_rules! qmp_command {
    ($(#[$meta:meta])* $name:ident = $wire:literal -> $ok:ty { $($body:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Serialize)]
        pub struct $name { $($body)* }
        impl qapi::Command for $name {
            const NAME: &'static str = $wire;
            const ALLOW_OOB: bool = false;
            type Ok = $ok;
        }
        impl qapi::qmp::QmpCommand for $name {}
    };
}

/// An address on TCP.
#[derive(Debug, Clone, Serialize)]
pub struct Inet {
    host: String,
    port: String,
}

/// `SocketAddressLegacy` of an address on TCP.
#[derive(Debug, Clone, Serialize)]
pub struct LegacyInet {
    #[serde(rename = "type")]
    kind: &'static str,
    data: Inet,
}

/// `SocketAddress` of an address on TCP.
#[derive(Debug, Clone, Serialize)]
pub struct FlatInet {
    #[serde(rename = "type")]
    kind: &'static str,
    host: String,
    port: String,
}

qmp_command!(
    /// Serves block exports over NBD on `addr`.
    NbdServerStart = "nbd-server-start" -> qapi::Empty { addr: LegacyInet }
);
qmp_command!(
    /// Stops the NBD server.
    NbdServerStop = "nbd-server-stop" -> qapi::Empty {}
);
qmp_command!(
    /// Exports a node over NBD.
    BlockExportAdd = "block-export-add" -> qapi::Empty {
        #[serde(rename = "type")]
        kind: &'static str,
        id: String,
        #[serde(rename = "node-name")]
        node_name: String,
        name: String,
        writable: bool,
    }
);
qmp_command!(
    /// Waits for an incoming migration on `uri`.
    MigrateIncoming = "migrate-incoming" -> qapi::Empty { uri: String }
);
qmp_command!(
    /// Opens a remote NBD export as a node.
    BlockdevAddNbd = "blockdev-add" -> qapi::Empty {
        driver: &'static str,
        #[serde(rename = "node-name")]
        node_name: String,
        server: FlatInet,
        export: String,
    }
);
qmp_command!(
    /// Removes a node.
    BlockdevDel = "blockdev-del" -> qapi::Empty {
        #[serde(rename = "node-name")]
        node_name: String,
    }
);
qmp_command!(
    /// Mirrors a node onto another.
    BlockdevMirror = "blockdev-mirror" -> qapi::Empty {
        #[serde(rename = "job-id")]
        job_id: String,
        device: String,
        target: String,
        sync: &'static str,
        #[serde(rename = "copy-mode")]
        copy_mode: &'static str,
    }
);
qmp_command!(
    /// The block jobs running.
    QueryBlockJobs = "query-block-jobs" -> Vec<BlockJob> {}
);
qmp_command!(
    /// Ends a block job (a ready mirror: leaving its target as it is).
    BlockJobCancel = "block-job-cancel" -> qapi::Empty {
        device: String,
        force: bool,
    }
);
qmp_command!(
    /// Sets migration parameters.
    MigrateSetParameters = "migrate-set-parameters" -> qapi::Empty {
        #[serde(rename = "downtime-limit")]
        downtime_limit: u64,
    }
);
qmp_command!(
    /// Starts migrating to `uri`.
    Migrate = "migrate" -> qapi::Empty { uri: String }
);
qmp_command!(
    /// The migration's state.
    QueryMigrate = "query-migrate" -> MigrationInfo {}
);
qmp_command!(
    /// Cancels the migration.
    MigrateCancel = "migrate_cancel" -> qapi::Empty {}
);

/// A block job, as far as this driver reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJob {
    /// Its id.
    pub device: String,
    /// Bytes to copy in all.
    #[serde(default)]
    pub len: u64,
    /// Bytes copied.
    #[serde(default)]
    pub offset: u64,
    /// In sync (a mirror).
    #[serde(default)]
    pub ready: bool,
}

/// A migration's state, as far as this driver reads it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// Memory figures.
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Time paused for the last pass, ms.
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Time in all, ms.
    #[serde(rename = "total-time", default)]
    pub total_time: Option<u64>,
    /// Why it failed.
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

/// Memory figures of a migration.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RamStats {
    /// Bytes sent.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes left.
    #[serde(default)]
    pub remaining: u64,
    /// Pages dirtied per second.
    #[serde(rename = "dirty-pages-rate", default)]
    pub dirty_pages_rate: u64,
}

/// Target side: serves the paused incoming VM's disk over NBD and waits for its memory, on
/// `host` and two ports chosen free.
pub async fn receive(qmp_sock: &Path, host: &str) -> Result<LiveTarget, String> {
    let disk_port = free_port(host)?;
    let memory_port = free_port(host)?;
    qmp(
        qmp_sock,
        NbdServerStart {
            addr: LegacyInet {
                kind: "inet",
                data: Inet {
                    host: host.into(),
                    port: disk_port.to_string(),
                },
            },
        },
    )
    .await?;
    qmp(
        qmp_sock,
        BlockExportAdd {
            kind: "nbd",
            id: "migration-export".into(),
            node_name: DISK_NODE.into(),
            name: EXPORT.into(),
            writable: true,
        },
    )
    .await?;
    qmp(
        qmp_sock,
        MigrateIncoming {
            uri: format!("tcp:{}:{memory_port}", bracket(host)),
        },
    )
    .await?;
    Ok(LiveTarget {
        host: host.into(),
        disk_port,
        memory_port,
        token: String::new(),
    })
}

/// Target side, once the source is done: stops serving the disk (the VM stays paused).
pub async fn received(qmp_sock: &Path) -> Result<(), String> {
    match qmp(qmp_sock, NbdServerStop {}).await {
        Ok(_) => Ok(()),
        // Stopped already (a repeated finish).
        Err(e) if e.contains("not running") => Ok(()),
        Err(e) => Err(e),
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// A TCP port free on `host` now (the kernel's choice).
fn free_port(host: &str) -> Result<u16, String> {
    std::net::TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on {host} for the migration: {e}"))
}

/// Source side: mirrors the disk to the target, migrates memory, and leaves the VM paused
/// here (`postmigrate`) with the target holding it all. On failure the VM runs here as
/// before and the mirror is gone.
pub async fn send(qmp_sock: &Path, guest: &str, target: &LiveTarget) -> Result<LiveReport, String> {
    let started = Instant::now();
    // What an interrupted send left (its agent killed while it ran): a migration, a mirror, a
    // connection to a target that may be gone.
    reset(qmp_sock).await;
    let result = send_steps(qmp_sock, guest, target).await;
    if result.is_err() {
        reset(qmp_sock).await;
    }
    let mut report = result?;
    report.total_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Leaves the source as it was before a send: no migration, no mirror, no remote node, and
/// running if a migration had paused it.
async fn reset(qmp_sock: &Path) {
    let _ = qmp(qmp_sock, MigrateCancel {}).await;
    let _ = qmp(
        qmp_sock,
        BlockJobCancel {
            device: MIRROR_JOB.into(),
            force: true,
        },
    )
    .await;
    for _ in 0..100 {
        match qmp(qmp_sock, QueryBlockJobs {}).await {
            Ok(jobs) if jobs.iter().any(|j| j.device == MIRROR_JOB) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => break,
        }
    }
    let _ = qmp(
        qmp_sock,
        BlockdevDel {
            node_name: TARGET_NODE.into(),
        },
    )
    .await;
    if crate::control::paused(qmp_sock).await.unwrap_or(false) {
        let _ = qmp(qmp_sock, qapi::qmp::cont {}).await;
    }
}

async fn send_steps(
    qmp_sock: &Path,
    guest: &str,
    target: &LiveTarget,
) -> Result<LiveReport, String> {
    qmp(
        qmp_sock,
        BlockdevAddNbd {
            driver: "nbd",
            node_name: TARGET_NODE.into(),
            server: FlatInet {
                kind: "inet",
                host: target.host.clone(),
                port: target.disk_port.to_string(),
            },
            export: EXPORT.into(),
        },
    )
    .await
    .map_err(|e| format!("cannot reach the target's disk: {e}"))?;
    qmp(
        qmp_sock,
        BlockdevMirror {
            job_id: MIRROR_JOB.into(),
            device: DISK_NODE.into(),
            target: TARGET_NODE.into(),
            sync: "top",
            copy_mode: "write-blocking",
        },
    )
    .await?;
    let deadline = Instant::now() + MIGRATION_LIMIT;
    let disk_bytes = loop {
        let jobs = qmp(qmp_sock, QueryBlockJobs {}).await?;
        let Some(job) = jobs.iter().find(|j| j.device == MIRROR_JOB) else {
            return Err("the disk's mirror ended before it was in sync".into());
        };
        if job.ready {
            break job.len;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the disk's mirror is not in sync after {MIGRATION_LIMIT:?}"
            ));
        }
        activity::report(&format!(
            "VM {guest}: disk {} of {} MiB sent",
            job.offset >> 20,
            job.len >> 20
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    qmp(
        qmp_sock,
        MigrateSetParameters {
            downtime_limit: DOWNTIME_LIMIT_MS,
        },
    )
    .await?;
    qmp(
        qmp_sock,
        Migrate {
            uri: format!("tcp:{}:{}", bracket(&target.host), target.memory_port),
        },
    )
    .await?;
    let mut last_report = Instant::now();
    let info = loop {
        let info = qmp(qmp_sock, QueryMigrate {}).await?;
        match info.status.as_deref() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err(format!(
                    "the memory's migration failed: {}",
                    info.error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into())
                ));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the migration did not complete within {MIGRATION_LIMIT:?}"
            ));
        }
        if last_report.elapsed() > Duration::from_millis(500)
            && let Some(ram) = &info.ram
        {
            last_report = Instant::now();
            activity::report(&format!(
                "VM {guest}: memory {} MiB sent, {} MiB left, {} pages dirtied/s",
                ram.transferred >> 20,
                ram.remaining >> 20,
                ram.dirty_pages_rate
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The VM is paused here now; every write reached the target (write-blocking). The mirror
    // ends leaving the target's disk as it is.
    qmp(
        qmp_sock,
        BlockJobCancel {
            device: MIRROR_JOB.into(),
            force: false,
        },
    )
    .await?;
    for _ in 0..500 {
        let jobs = qmp(qmp_sock, QueryBlockJobs {}).await?;
        if !jobs.iter().any(|j| j.device == MIRROR_JOB) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(LiveReport {
        total_ms: info.total_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
        memory_bytes: info.ram.map(|r| r.transferred).unwrap_or(0),
        disk_bytes,
    })
}
