//! A VM's QEMU process: started (booting, or waiting for an incoming migration), watched until
//! its guest agent answers and its workload is ready, read (pid file, QMP run state) and ended
//! (the guest powered off through its agent, then QMP `quit`, then SIGKILL).

use std::path::Path;
use std::time::{Duration, Instant};

use cloud48_driver::{DriverError, GuestState, ServerStats, activity};
use cloud48_linux::images::{process_args, process_env};
use cloud48_linux::network;
use cloud48_linux::ready::Probe;
use cloud48_linux::tail;
use cloud48_model::Resources;

use crate::machine::{self, Accel, Launch, files};
use crate::{LOG_TAIL, QemuDriver, Record, UP_MARKER, control, permanent, qemu_binary, shape};

/// How much longer than its type declares a workload may take to become ready under TCG.
const TCG_SLOWDOWN: u32 = 10;

/// What a VM whose workload never became ready is asked (through its guest agent), so that the
/// error tells a workload that is not running from one that listens elsewhere or a network that
/// is not up: its addresses, whether the workload runs, the TCP ports it listens on.
const INSIDE: &str = r#"echo "addresses: $(ip -4 -o addr show 2>&1 | awk '{printf "%s %s ", $2, $4}')"
pid=$(cat /run/cloud48-workload.pid 2>/dev/null)
if [ -z "$pid" ]; then echo "workload: never started"
elif kill -0 "$pid" 2>/dev/null; then echo "workload: runs (pid $pid)"
else echo "workload: ended"; fi
echo "listening on tcp: $(awk 'NR > 1 && $4 == "0A" { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | while read -r p; do printf '%d ' "0x$p"; done)"
"#;

impl QemuDriver {
    /// QEMU's pid for `guest` when its process runs (the pid file's process must be the QEMU
    /// of this guest's directory).
    pub(crate) fn pid(&self, guest: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.file(guest, files::PID))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mine = self.file(guest, files::QMP);
        String::from_utf8_lossy(&cmdline)
            .contains(&*mine.to_string_lossy())
            .then_some(pid)
    }

    /// The guest's state: from its QEMU's run state when one runs. A QEMU that sent its VM
    /// away (`postmigrate`) or waits to receive one (`inmigrate`) runs no VM: stopped.
    pub(crate) async fn state(&self, guest: &str) -> GuestState {
        if self.pid(guest).is_none() {
            return GuestState::Stopped;
        }
        match control::run_state(&self.file(guest, files::QMP))
            .await
            .as_deref()
        {
            Ok("paused") | Ok("suspended") => GuestState::Suspended,
            Ok("postmigrate") | Ok("inmigrate") | Ok("prelaunch") => GuestState::Stopped,
            _ => GuestState::Running,
        }
    }

    /// Boots the guest of `r` and waits until it is up and ready.
    pub(crate) async fn launch(&self, r: &Record) -> Result<(), DriverError> {
        // It boots with its resources, and room to grow to this server's size while it runs
        // where the server allows it.
        let mut r = r.clone();
        r.shape = Some(if self.cfg.grow_live {
            shape::boot(&r.spec.resources, &self.capacity)
        } else {
            shape::fixed(&r.spec.resources)
        });
        self.keep(&r)?;
        let r = &r;
        self.spawn(r, false).await?;
        activity::report(&format!(
            "booting VM {} under {}",
            r.spec.guest_id, self.accel
        ));
        self.wait_booted(r).await
    }

    /// Starts QEMU for the guest of `r`: booting, or (`incoming`) paused, waiting for a live
    /// migration.
    pub(crate) async fn spawn(&self, r: &Record, incoming: bool) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let base = self.base_of(r).await?;
        let dir = self.dir(guest);
        let w = &r.spec.workload;
        let script = machine::run_script(
            &process_args(&w.command, &base.details),
            &process_env(&base.details, &w.env, guest),
            w.workdir.as_deref().or(base.details.workdir.as_deref()),
        );
        tokio::fs::write(dir.join(files::RUN), script)
            .await
            .map_err(permanent)?;
        for f in [files::CONSOLE, files::QMP, files::QGA, files::PID] {
            let _ = tokio::fs::remove_file(dir.join(f)).await;
        }
        let tap = self.tap(guest);
        self.make_tap(&tap).await?;
        let launch = Launch {
            guest: guest.clone(),
            dir: dir.clone(),
            kernel: base.kernel.clone(),
            initrd: base.initrd.clone(),
            disk: dir.join(files::DISK),
            tap: tap.clone(),
            ip: r.ip,
            prefix: self.cfg.subnet.prefix,
            gateway: self.cfg.subnet.gateway(),
            shape: r
                .shape
                .clone()
                .unwrap_or_else(|| shape::fixed(&r.spec.resources)),
            accel: self.accel,
            machine_type: r.machine_type.clone().unwrap_or_else(|| "q35".into()),
            run_script: dir.join(files::RUN),
            incoming,
        };
        let out = tokio::process::Command::new(qemu_binary())
            .args(machine::args(&launch))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| permanent(format!("cannot run {}: {e}", qemu_binary())))?;
        if !out.status.success() {
            let _ = network::run("ip", &["link", "del", &tap]).await;
            return Err(permanent(format!(
                "QEMU did not start guest {guest} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn make_tap(&self, tap: &str) -> Result<(), DriverError> {
        let _ = network::run("ip", &["link", "del", tap]).await;
        network::run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])
            .await
            .map_err(permanent)?;
        if let Err(e) = network::run(
            "ip",
            &["link", "set", tap, "master", &self.cfg.bridge, "up"],
        )
        .await
        {
            let _ = network::run("ip", &["link", "del", tap]).await;
            return Err(permanent(e));
        }
        Ok(())
    }

    /// Waits until the guest init says it is up and the guest agent answers, then until the
    /// workload passes its readiness check; stops the VM and says why when it does not.
    async fn wait_booted(&self, r: &Record) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let console = self.file(guest, files::CONSOLE);
        let qga = self.file(guest, files::QGA);
        let started = Instant::now();
        let deadline = started + self.cfg.boot_timeout;
        let failed = async |why: String| {
            let _ = self.halt(guest, false).await;
            Err(permanent(format!(
                "VM {guest} {why}; its console ends with:\n{}",
                tail(&console, 2048).trim_end()
            )))
        };
        loop {
            if self.pid(guest).is_none() {
                return failed("stopped while booting".into()).await;
            }
            let up = tail(&console, LOG_TAIL).contains(UP_MARKER);
            if up
                && control::ga_ping(&qga, Duration::from_secs(10))
                    .await
                    .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                let hint = match self.accel {
                    Accel::Kvm => {
                        " under KVM: the boot made no progress (a /dev/kvm that cannot run this guest's kernel stalls it; start the agent with --accel tcg)"
                    }
                    Accel::Tcg => " under TCG",
                };
                return failed(format!(
                    "did not boot within {:?}{hint}",
                    self.cfg.boot_timeout
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::debug!(%guest, elapsed = ?started.elapsed(), "a VM booted");
        let probe = Probe::of(&r.spec.workload);
        if probe == Probe::Running {
            return Ok(());
        }
        let declared = r
            .spec
            .workload
            .readiness
            .as_ref()
            .map(|x| Duration::from_millis(u64::from(x.interval_ms) * u64::from(x.retries)))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        // A type's window is for software at native speed; emulated, it runs about ten times
        // slower (a JVM's start, a first page compiled).
        let window = match self.accel {
            Accel::Kvm => declared,
            Accel::Tcg => declared * TCG_SLOWDOWN,
        };
        let deadline = Instant::now() + window;
        loop {
            let last = match probe.check(r.ip).await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if self.pid(guest).is_none() || Instant::now() > deadline {
                let inside =
                    match control::ga_exec(&qga, INSIDE, &[], Duration::from_secs(10)).await {
                        Ok(out) => out.stdout.trim_end().replace('\n', "; "),
                        Err(e) => format!("the guest agent could not say ({e})"),
                    };
                return failed(format!(
                    "did not become ready within {window:?} under {} ({last}); inside the guest: {inside}",
                    self.accel
                ))
                .await;
            }
            tokio::time::sleep(probe.pause().max(Duration::from_millis(50))).await;
        }
    }

    /// Ends the guest's QEMU: gracefully (the guest powers off, its workload told first) when
    /// `graceful`, then by QMP `quit`, then by SIGKILL. Removes its tap device.
    pub(crate) async fn halt(&self, guest: &str, graceful: bool) -> Result<(), DriverError> {
        let qmp = self.file(guest, files::QMP);
        if let Some(pid) = self.pid(guest) {
            let state = control::run_state(&qmp).await.unwrap_or_default();
            // Only a VM that runs (or is merely paused) can power itself off.
            if graceful && (state == "running" || state == "paused") {
                if state == "paused" {
                    let _ = control::qmp(&qmp, qapi::qmp::cont {}).await;
                }
                match control::ga_shutdown(&self.file(guest, files::QGA), false).await {
                    Ok(()) => {
                        let _ = self.exited(pid, self.cfg.stop_grace).await;
                    }
                    Err(e) => {
                        tracing::warn!(%guest, error = %e, "the guest agent did not take the shutdown; ending QEMU")
                    }
                }
            }
            if self.pid(guest).is_some() {
                let _ = control::qmp(&qmp, qapi::qmp::quit {}).await;
                if !self.exited(pid, Duration::from_secs(5)).await {
                    // SAFETY: kill has no memory preconditions; pid is QEMU's (checked above).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    if !self.exited(pid, Duration::from_secs(5)).await {
                        return Err(DriverError::Transient(format!(
                            "QEMU of guest {guest} (pid {pid}) does not end"
                        )));
                    }
                }
            }
        }
        let _ = network::run("ip", &["link", "del", &self.tap(guest)]).await;
        Ok(())
    }

    /// Whether process `pid` ends within `limit`.
    pub(crate) async fn exited(&self, pid: i32, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub(crate) async fn server_stats(&self) -> Result<ServerStats, DriverError> {
        let ids: Vec<String> = self.guests.lock().unwrap().keys().cloned().collect();
        let (mut memory, mut ticks, mut disk) = (0u64, 0u64, 0u64);
        for id in &ids {
            if let Some(pid) = self.pid(id) {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Fields after the command's closing parenthesis: utime and stime are 12th and
                // 13th there, rss the 22nd (pages).
                let fields: Vec<u64> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| {
                        rest.split_whitespace()
                            .map(|f| f.parse().unwrap_or(0))
                            .collect()
                    })
                    .unwrap_or_default();
                ticks +=
                    fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
                memory += fields.get(21).copied().unwrap_or(0) * 4096;
            }
            disk += std::fs::metadata(self.file(id, files::DISK))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        // Clock ticks are 1/100 s on Linux.
        let cpu_ns = ticks * 10_000_000;
        let cpu_millis = cloud48_linux::cpu_rate(&self.cpu_sample, cpu_ns);
        Ok(ServerStats {
            capacity: self.capacity,
            allocated: self.allocated(),
            guests: ids.len() as u64,
            used: Some(Resources {
                cpu_millis,
                memory_mb: memory >> 20,
                disk_mb: disk >> 20,
            }),
            images: self.images.held(),
        })
    }
}
