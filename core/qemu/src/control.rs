//! Talking to a running VM: QMP (QEMU's own control socket) and the guest agent inside it,
//! through the `qapi` crate's typed commands. Every exchange opens its own connection (QEMU
//! serves one client per socket at a time; the driver holds each guest's lock while it talks)
//! and is bounded in time, so a hung QEMU or guest never blocks a caller forever.

use std::path::Path;
use std::time::Duration;

use qapi::futures::{QgaStreamTokio, QmpStreamTokio};
use qapi::{qga, qmp};

use cloud48_driver::ExecOutput;

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
