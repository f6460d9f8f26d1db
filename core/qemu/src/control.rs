//! Talking to a running VM: QMP (QEMU's own control socket) and the guest agent inside it,
//! through the `qapi` crate's typed commands. Every exchange opens its own connection (QEMU
//! serves one client per socket at a time; the driver holds each guest's lock while it talks)
//! and is bounded in time, so a hung QEMU or guest never blocks a caller forever.

use std::path::Path;
use std::time::Duration;

use qapi::futures::{QgaStreamTokio, QmpStreamTokio};
use qapi::{qga, qmp};

use cloud48_driver::{ExecOutput, PluggedCpu};

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one QMP command on the socket `sock`.
pub async fn qmp<C>(sock: &Path, command: C) -> Result<C::Ok, String>
where
    C: qmp::QmpCommand + qapi::Command + Send + 'static,
{
    let exchange = async {
        // An event QEMU emitted as the previous client left may still be queued for the
        // socket, ahead of the greeting: such a connection is dropped and opened again (the
        // command is sent only on a connection that greeted properly).
        let mut attempt = 0;
        let mut stream = loop {
            attempt += 1;
            let opened = match QmpStreamTokio::open_uds(sock).await {
                Ok(stream) => stream.negotiate().await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(stream) => break stream,
                Err(e) if attempt < 5 && e.kind() != std::io::ErrorKind::NotFound => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(format!(
                        "cannot reach QEMU's control socket {}: {e}",
                        sock.display()
                    ));
                }
            }
        };
        stream
            .execute(command)
            .await
            .map_err(|e| format!("QMP {}: {e}", C::NAME))
    };
    tokio::time::timeout(QMP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("QMP {} did not answer within {QMP_TIMEOUT:?}", C::NAME))?
}

/// The VM's run state as QMP names it (`running`, `paused`, `inmigrate`, ...).
pub async fn run_state(sock: &Path) -> Result<String, String> {
    let status = qmp(sock, qmp::query_status {}).await?;
    Ok(serde_json::to_value(status.status)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default())
}

/// Whether the VM is paused (`stop`ped), as QMP says.
pub async fn paused(sock: &Path) -> Result<bool, String> {
    Ok(run_state(sock).await? == "paused")
}

/// Runs one guest agent command, waiting at most `wait`.
async fn ga<C>(sock: &Path, command: C, wait: Duration) -> Result<C::Ok, String>
where
    C: qga::QgaCommand + qapi::Command + Send + 'static,
{
    let exchange = async {
        let mut stream = QgaStreamTokio::open_uds(sock).await.map_err(|e| {
            format!(
                "cannot reach the guest agent's socket {}: {e}",
                sock.display()
            )
        })?;
        stream
            .execute(command)
            .await
            .map_err(|e| format!("guest agent {}: {e}", C::NAME))
    };
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| format!("the guest agent did not answer {} within {wait:?}", C::NAME))?
}

/// Whether the guest agent answers within `wait`.
pub async fn ga_ping(sock: &Path, wait: Duration) -> Result<(), String> {
    ga(sock, qga::guest_ping {}, wait).await.map(|_| ())
}

/// Asks the guest to power off (or reboot): its `/sbin/shutdown` ends the workload, then the
/// kernel powers off. The agent does not answer a shutdown that succeeds.
pub async fn ga_shutdown(sock: &Path, reboot: bool) -> Result<(), String> {
    let mode = if reboot {
        qga::GuestShutdownMode::Reboot
    } else {
        qga::GuestShutdownMode::Powerdown
    };
    match ga(
        sock,
        qga::guest_shutdown { mode: Some(mode) },
        Duration::from_secs(2),
    )
    .await
    {
        Ok(_) => Ok(()),
        // No answer is the normal case: the guest is going down.
        Err(e) if e.contains("did not answer") || e.contains("EOF") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs `script` with `args` under `/bin/sh` in the guest (`guest-exec`), polling
/// `guest-exec-status` until it ends or `limit` passes.
pub async fn ga_exec(
    sock: &Path,
    script: &str,
    args: &[String],
    limit: Duration,
) -> Result<ExecOutput, String> {
    let mut arg = vec!["-c".to_string(), script.to_string(), "cloud48-exec".into()];
    arg.extend(args.iter().cloned());
    let started = ga(
        sock,
        qga::guest_exec {
            path: "/bin/sh".into(),
            arg: Some(arg),
            env: None,
            input_data: None,
            capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
        },
        Duration::from_secs(10),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(10);
    loop {
        let status = ga(
            sock,
            qga::guest_exec_status { pid: started.pid },
            Duration::from_secs(10),
        )
        .await?;
        if status.exited {
            let text =
                |b: Option<Vec<u8>>| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned();
            return Ok(ExecOutput {
                exit_code: status
                    .exitcode
                    .map(|c| c as i32)
                    .or(status.signal.map(|s| 128 + s as i32))
                    .unwrap_or(-1),
                stdout: text(status.out_data),
                stderr: text(status.err_data),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the script still runs after {limit:?} (guest pid {})",
                started.pid
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The guest's virtual CPUs as its agent sees them: (logical id, online, may be taken off line).
pub async fn ga_vcpus(sock: &Path) -> Result<Vec<(i64, bool, bool)>, String> {
    let cpus = ga(sock, qga::guest_get_vcpus {}, Duration::from_secs(10)).await?;
    Ok(cpus
        .into_iter()
        .map(|c| (c.logical_id, c.online, c.can_offline.unwrap_or(false)))
        .collect())
}

/// Takes the guest's CPUs `(logical id, online)` on or off line through its agent.
pub async fn ga_set_vcpus(sock: &Path, cpus: &[(i64, bool)]) -> Result<(), String> {
    let vcpus = cpus
        .iter()
        .map(|&(logical_id, online)| qga::GuestLogicalProcessor {
            logical_id,
            online,
            can_offline: None,
        })
        .collect::<Vec<_>>();
    let wanted = vcpus.len() as i64;
    let done = ga(
        sock,
        qga::guest_set_vcpus { vcpus },
        Duration::from_secs(30),
    )
    .await?;
    if done < wanted {
        return Err(format!(
            "the guest changed {done} of the {wanted} CPUs asked (its kernel refused the rest)"
        ));
    }
    Ok(())
}

/// The VM's virtio-mem device `id`: (memory asked to be plugged in, memory plugged in), MiB;
/// nothing without one.
async fn virtio_mem(sock: &Path, id: &str) -> Result<(u64, u64), String> {
    let devices = qmp(sock, qmp::query_memory_devices {}).await?;
    Ok(devices
        .into_iter()
        .find_map(|d| match d {
            qmp::MemoryDeviceInfo::virtio_mem(m) if m.data.id.as_deref() == Some(id) => {
                Some((m.data.requested_size >> 20, m.data.size >> 20))
            }
            _ => None,
        })
        .unwrap_or((0, 0)))
}

/// Memory the VM's virtio-mem device `id` is asked to have plugged in, MiB (0 without one).
pub async fn plugged_memory(sock: &Path, id: &str) -> Result<u64, String> {
    Ok(virtio_mem(sock, id).await?.0)
}

/// Memory the guest has plugged in through the VM's virtio-mem device `id`, MiB.
pub async fn memory_present(sock: &Path, id: &str) -> Result<u64, String> {
    Ok(virtio_mem(sock, id).await?.1)
}

/// Asks the VM's virtio-mem device `id` to have `mb` MiB plugged in (the guest plugs memory in
/// or out to match, at its pace).
pub async fn plug_memory(sock: &Path, id: &str, mb: u64) -> Result<(), String> {
    qmp(
        sock,
        qmp::qom_set {
            path: format!("/machine/peripheral/{id}"),
            property: "requested-size".into(),
            value: serde_json::Value::from(mb << 20),
        },
    )
    .await
    .map(|_| ())
}

/// The VM's CPU places as QEMU lists them: the CPUs plugged in with an id (not those it booted
/// with), and the places still free, each as (QEMU's CPU type, place).
pub async fn cpu_places(sock: &Path) -> Result<CpuPlaces, String> {
    let cpus = qmp(sock, qmp::query_hotpluggable_cpus {}).await?;
    let mut places = CpuPlaces::default();
    for c in cpus {
        let p = &c.props;
        let place: Vec<(String, i64)> = [
            ("node-id", p.node_id),
            ("drawer-id", p.drawer_id),
            ("book-id", p.book_id),
            ("socket-id", p.socket_id),
            ("die-id", p.die_id),
            ("cluster-id", p.cluster_id),
            ("module-id", p.module_id),
            ("core-id", p.core_id),
            ("thread-id", p.thread_id),
        ]
        .into_iter()
        .filter_map(|(name, index)| Some((name.to_string(), index?)))
        .collect();
        match c.qom_path.as_deref() {
            None => places.free.push((c.type_, place)),
            Some(path) => {
                if let Some(id) = path.strip_prefix("/machine/peripheral/") {
                    places.plugged.push(PluggedCpu {
                        id: id.to_string(),
                        driver: c.type_,
                        place,
                    });
                }
            }
        }
    }
    // QEMU lists the last place first.
    places
        .free
        .sort_by(|a, b| a.1.iter().map(|p| p.1).cmp(b.1.iter().map(|p| p.1)));
    places.plugged.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(places)
}

/// CPU places of a running VM.
#[derive(Debug, Default)]
pub struct CpuPlaces {
    /// CPUs plugged in with an id since it booted.
    pub plugged: Vec<PluggedCpu>,
    /// Free places, first first: (QEMU's CPU type, place).
    pub free: Vec<(String, Vec<(String, i64)>)>,
}
