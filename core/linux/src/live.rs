//! Live migration of containers that run their image, through CRIU (`runc checkpoint` and
//! `runc restore`): the source sends the container's upper directory whole while it runs,
//! checkpoints it (its processes stop once their state is written), sends what changed in the
//! directory since (`delta.rs`) and then the checkpoint, each stream on a connection opened
//! with the target's secret; the target unpacks them, restores the container on the same
//! image, wires its network with the same address and says so. On any failure the source
//! restores the container where it was (or it never stopped), so exactly one runs.
//!
//! Invariants:
//! - A target's copy runs only once everything arrived whole; until then it is a stopped
//!   guest that destroy removes (the core does, for a failed move).
//! - The source's checkpoint stays until the move succeeded: a failed one restores from it,
//!   and so does the driver when it opens (its agent stopped in the middle of a send).

use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cloud48_driver::{DriverError, GuestSpec, GuestState, LiveOffer, LiveReport, LiveTarget};
use tokio::sync::watch;

use crate::network::{self, GuestNet, Subnet};
use crate::run_image::ready_root;
use crate::wire::{
    Counting, accept, answer, archive_flat, receive_into, receive_stream, secret, send_stream,
};
use crate::{LinuxDriver, Record, delta, images, permanent};

/// A guest a target is receiving: how it ends, and the task receiving it.
pub(crate) struct Receiving {
    outcome: watch::Receiver<Option<Result<(), String>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the target's receiving task needs of its driver.
struct Restore {
    guest: String,
    dir: PathBuf,
    lower: PathBuf,
    hosts: String,
    bundle: cloud48_oci::Bundle,
    runc: cloud48_oci::Runc,
    net: GuestNet,
    bridge: String,
    subnet: Subnet,
    ip: Ipv4Addr,
}

/// CRIU's options for this driver's containers, in the data directory (every container's
/// bundle names it, so runc hands it to CRIU at checkpoint and at restore).
pub(crate) const CRIU_CONFIG: &str = "criu.conf";

/// Writes `CRIU_CONFIG` into `data_dir`: connections open at the checkpoint are restored
/// closed (clients reconnect; without it one a peer had half-closed fails the restore), and
/// connections still waiting to be accepted are left behind (they would fail the checkpoint).
pub(crate) fn write_criu_config(data_dir: &Path) -> Result<(), String> {
    let path = data_dir.join(CRIU_CONFIG);
    std::fs::create_dir_all(data_dir)
        .and_then(|()| {
            std::fs::write(
                &path,
                "# Written by Cloud48's linux driver: TCP connections open at a live move's\n# checkpoint are restored closed; those not yet accepted are left behind.\ntcp-close\nskip-in-flight\n",
            )
        })
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The file that marks a checkpoint as this server's own guest's, taken to send it: one the
/// driver finds when it opens is restored (a target's received checkpoints have none).
const SENDING: &str = "sending";

/// Where a guest's checkpoint lives: `live/` (root's only) holding `images/` (which the
/// restored processes read before their user namespace maps them, so world-readable inside
/// a directory nobody else can enter) and `work/` (CRIU's logs).
fn checkpoint_dirs(dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let live = dir.join("live");
    let _ = std::fs::remove_dir_all(&live);
    std::fs::create_dir_all(&live)?;
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o700))?;
    let (images, work) = (live.join("images"), live.join("work"));
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(&work)?;
    Ok((images, work))
}

/// Opens the checkpoint in `images` to the restored processes: their root owns it, all may
/// read it.
fn open_checkpoint(images: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let owner = cloud48_oci::DEFAULT_ID_MAP.host;
    std::fs::set_permissions(images, std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::chown(images, Some(owner), Some(owner))?;
    for e in std::fs::read_dir(images)? {
        let p = e?.path();
        std::os::unix::fs::chown(&p, Some(owner), Some(owner))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

impl Restore {
    /// Receives the upper directory, then what changed in it since, then the checkpoint,
    /// restores the guest and wires it.
    async fn run(
        self,
        disk: tokio::net::TcpListener,
        memory: tokio::net::TcpListener,
        token: String,
    ) -> Result<(), String> {
        let fs = self.dir.join("fs");
        let into = fs.clone();
        receive_into(&disk, &token, "container's files", move |r| {
            images::unpack_upper(r, &into).map_err(|e| e.to_string())
        })
        .await?;
        receive_into(
            &disk,
            &token,
            "changes to the container's files",
            move |r| {
                let mut line = String::new();
                r.read_line(&mut line)
                    .map_err(|e| format!("reading what went: {e}"))?;
                let gone: Vec<PathBuf> = serde_json::from_str(&line)
                    .map_err(|e| format!("what went is not a list of paths: {e}"))?;
                delta::remove_gone(&fs, &gone)?;
                images::unpack_upper(r, &fs).map_err(|e| e.to_string())
            },
        )
        .await?;
        let conn = accept(&memory, "checkpoint").await?;
        let restore = std::sync::Arc::new(self);
        let r = restore.clone();
        let restored = tokio::task::spawn_blocking(move || {
            let conn = receive_stream(conn, &token, |reader| {
                let (images, _) = checkpoint_dirs(&r.dir).map_err(|e| e.to_string())?;
                let mut archive = tar::Archive::new(reader);
                archive
                    .unpack(&images)
                    .map_err(|e| format!("the checkpoint is not a valid archive: {e}"))?;
                open_checkpoint(&images).map_err(|e| e.to_string())
            })?;
            let pid = r
                .restore_process()
                .inspect_err(|e| answer(&conn, &Err(e.clone())))?;
            Ok::<_, String>((conn, pid))
        })
        .await
        .map_err(|e| e.to_string())??;
        let (conn, pid) = restored;
        let wired = network::attach_pid(
            &restore.net,
            &restore.bridge,
            &restore.subnet,
            restore.ip,
            pid,
        )
        .await
        .map_err(|e| format!("cannot wire the restored container: {e}"));
        let (runc, id, live) = (
            restore.runc.clone(),
            restore.guest.clone(),
            restore.dir.join("live"),
        );
        let failed = wired.is_err();
        let _ = tokio::task::spawn_blocking(move || {
            if failed {
                let _ = runc.delete(&id, true);
            }
            std::fs::remove_dir_all(live)
        })
        .await;
        answer(&conn, &wired);
        wired
    }

    /// Mounts the guest's root and restores its processes from the received checkpoint.
    fn restore_process(&self) -> Result<i32, String> {
        let live = self.dir.join("live");
        let _ = self.runc.delete(&self.guest, true);
        ready_root(&self.dir, &self.lower, &self.hosts, &self.bundle)
            .and_then(|()| {
                self.runc.restore(
                    &self.guest,
                    &self.dir.join("bundle"),
                    &live.join("images"),
                    &live.join("work"),
                    (&self.dir.join("console.log"), self.bundle.id_map.host),
                )
            })
            .map_err(|e| format!("cannot restore {} here: {e}", self.guest))
    }
}

impl LinuxDriver {
    /// The address peers send live migrations to, when this server can take and send them.
    pub(crate) fn live_host(&self) -> Option<&str> {
        match (&self.live, &self.cfg.images) {
            (Ok(_), Some(i)) => i.migration_host.as_deref(),
            _ => None,
        }
    }

    fn no_live_here(&self) -> DriverError {
        DriverError::Permanent(match (&self.live, self.images.is_some()) {
            (_, false) => format!(
                "server {} runs no images: only containers that run their image move live",
                self.cfg.name
            ),
            (Err(why), _) => format!(
                "server {} cannot move containers live: {why}",
                self.cfg.name
            ),
            (Ok(_), _) => format!(
                "server {} has no address for live migrations (the agent's --migration-address)",
                self.cfg.name
            ),
        })
    }

    pub(crate) async fn offer(&self, guest_id: &str) -> Result<LiveOffer, DriverError> {
        if self.live_host().is_none() {
            return Err(self.no_live_here());
        }
        let r = self.record(guest_id)?;
        let Some(image) = r.image.clone() else {
            return Err(permanent(format!(
                "container {guest_id} runs on the server's files, not an image of its own: it cannot move live"
            )));
        };
        match self.state(guest_id) {
            GuestState::Running => Ok(LiveOffer {
                image,
                disk_mb: r.spec.resources.disk_mb,
                machine: None,
                shape: None,
            }),
            state => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "live migration".into(),
            }),
        }
    }

    pub(crate) async fn receive(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        let Some(host) = self.live_host().map(str::to_string) else {
            return Err(self.no_live_here());
        };
        let guest = spec.guest_id.clone();
        let ip: Ipv4Addr = spec
            .ip
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| permanent(format!("moving {guest} live needs its address")))?;
        if !self.cfg.subnet.contains(ip) {
            return Err(permanent(format!(
                "server {} is on another network ({}): {guest} could not keep its address {ip}; move it to a server on its network, or without --live",
                self.cfg.name, self.cfg.subnet
            )));
        }
        // A leftover of an earlier attempt goes (a running copy is no leftover).
        self.receiving.lock().unwrap().remove(&guest);
        if self.record(&guest).is_ok() {
            if self.state(&guest) != GuestState::Stopped {
                return Err(permanent(format!(
                    "{guest} already runs on server {}",
                    self.cfg.name
                )));
            }
            cloud48_driver::Driver::destroy(self, &guest).await?;
        }
        cloud48_driver::Driver::create(self, spec).await?;
        let r = self.record(&guest)?;
        if r.image.as_deref() != Some(offer.image.as_str()) {
            let _ = cloud48_driver::Driver::destroy(self, &guest).await;
            return Err(permanent(format!(
                "{guest} runs image {} on its server, but its image here is {}: both servers must resolve its image alike",
                offer.image,
                r.image.as_deref().unwrap_or("none")
            )));
        }
        let restore = self.restore_of(&r, &offer.image).await?;
        let bind = |what: &str| {
            let host = host.clone();
            let what = what.to_string();
            async move {
                tokio::net::TcpListener::bind((host.as_str(), 0))
                    .await
                    .map_err(|e| permanent(format!("no port on {host} for the {what}: {e}")))
            }
        };
        let (disk, memory) = (bind("files").await?, bind("checkpoint").await?);
        let port =
            |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.port()).map_err(permanent);
        let target = LiveTarget {
            host,
            disk_port: port(&disk)?,
            memory_port: port(&memory)?,
            token: secret().map_err(permanent)?,
        };
        let (tx, outcome) = watch::channel(None);
        let token = target.token.clone();
        let name = guest.clone();
        let task = tokio::spawn(async move {
            let result = restore.run(disk, memory, token).await;
            if let Err(e) = &result {
                tracing::warn!(guest = %name, error = %e, "receiving a container live failed");
            }
            let _ = tx.send(Some(result));
        });
        self.receiving.lock().unwrap().insert(
            guest,
            Receiving {
                outcome,
                task: task.abort_handle(),
            },
        );
        Ok(target)
    }

    pub(crate) async fn send(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        let _held = self.hold(guest_id).await;
        self.offer(guest_id).await?;
        let started = Instant::now();
        let dir = self.dir(guest_id);
        // Its files, whole, while it runs (stamped first: what changes after is sent again).
        let (t, fs) = (target.clone(), dir.join("fs"));
        let first = tokio::task::spawn_blocking(move || {
            let before = delta::manifest(&fs)
                .map_err(|e| format!("cannot list the container's files: {e}"))?;
            let sent = send_stream(&t, t.disk_port, "container's files", |conn| {
                let mut counted = Counting(conn, 0);
                images::archive_upper(&fs, &mut counted)?;
                Ok(counted.1)
            })?;
            Ok::<_, String>((before, sent))
        })
        .await
        .map_err(permanent)?;
        let (before, first_bytes) = first
            .map_err(|e| permanent(format!("{e}; {guest_id} runs on here (it was not stopped)")))?;
        let stopped = Instant::now();
        let runc = self
            .images
            .as_ref()
            .map(|i| i.runc.clone())
            .ok_or_else(|| self.no_live_here())?;
        let (id, d) = (guest_id.to_string(), dir.clone());
        let checkpointed = tokio::task::spawn_blocking(move || {
            let (images, work) = checkpoint_dirs(&d).map_err(|e| e.to_string())?;
            std::fs::write(d.join("live").join(SENDING), b"").map_err(|e| e.to_string())?;
            runc.checkpoint(&id, &images, &work)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(permanent)?;
        if let Err(e) = checkpointed {
            // CRIU stops nothing before its checkpoint is whole.
            let state = self.state(guest_id);
            return Err(permanent(format!(
                "cannot checkpoint {guest_id} (it is {state} here): {e}"
            )));
        }
        let net = GuestNet::new(&self.cfg.prefix, guest_id);
        // Its address leaves this server with it.
        network::detach(&net).await;
        let (t, d) = (target.clone(), dir.clone());
        let sent = tokio::task::spawn_blocking(move || {
            let fs = d.join("fs");
            let changes = delta::delta(&fs, &before)
                .map_err(|e| format!("cannot list the container's files: {e}"))?;
            let disk = send_stream(
                &t,
                t.disk_port,
                "changes to the container's files",
                |conn| {
                    let mut gone =
                        serde_json::to_vec(&changes.gone).map_err(std::io::Error::other)?;
                    gone.push(b'\n');
                    let mut counted = Counting(conn, 0);
                    counted.write_all(&gone)?;
                    images::archive_entries(&fs, &changes.changed, &mut counted)?;
                    Ok(counted.1)
                },
            )?;
            let memory = send_stream(&t, t.memory_port, "checkpoint", |conn| {
                archive_flat(&d.join("live").join("images"), conn)
            })?;
            Ok::<_, String>((disk, memory))
        })
        .await
        .map_err(permanent)?;
        match sent {
            Ok((delta_bytes, memory_bytes)) => {
                let report = LiveReport {
                    total_ms: started.elapsed().as_millis() as u64,
                    downtime_ms: stopped.elapsed().as_millis() as u64,
                    memory_bytes,
                    disk_bytes: first_bytes + delta_bytes,
                };
                // Its runc record and overlay go, its record and files stay (stopped) until
                // destroyed: what a stop leaves.
                let _ = self.halt(guest_id).await;
                Ok(report)
            }
            Err(e) => match self.restore_here(guest_id).await {
                Ok(()) => Err(permanent(format!("{e}; {guest_id} runs on here"))),
                Err(again) => Err(permanent(format!(
                    "{e}; restoring {guest_id} here failed too ({again}): its checkpoint is kept in its directory"
                ))),
            },
        }
    }

    /// What restoring guest `r` on image `digest` here takes.
    async fn restore_of(&self, r: &Record, digest: &str) -> Result<Restore, DriverError> {
        let guest = &r.spec.guest_id;
        let (bundle, hosts, lower, runc) = self.image_bundle(r, digest).await?;
        Ok(Restore {
            guest: guest.clone(),
            dir: self.dir(guest),
            lower,
            hosts,
            bundle,
            runc,
            net: GuestNet::new(&self.cfg.prefix, guest),
            bridge: self.cfg.bridge.clone(),
            subnet: self.cfg.subnet,
            ip: r.ip,
        })
    }

    /// Restores the guest here from its own checkpoint (a move that failed after it stopped).
    async fn restore_here(&self, guest_id: &str) -> Result<(), String> {
        let r = self.record(guest_id).map_err(|e| e.to_string())?;
        let digest = r.image.clone().unwrap_or_default();
        let restore = self
            .restore_of(&r, &digest)
            .await
            .map_err(|e| e.to_string())?;
        let pid = tokio::task::spawn_blocking(move || {
            open_checkpoint(&restore.dir.join("live").join("images")).map_err(|e| e.to_string())?;
            restore.restore_process().map(|pid| (restore, pid))
        })
        .await
        .map_err(|e| e.to_string())??;
        let (restore, pid) = pid;
        network::attach_pid(
            &restore.net,
            &restore.bridge,
            &restore.subnet,
            restore.ip,
            pid,
        )
        .await?;
        // Its checkpoint is spent: it must never be restored again.
        let _ = tokio::fs::remove_dir_all(restore.dir.join("live")).await;
        Ok(())
    }

    /// Restores the guests this server was sending live when its agent stopped (checkpointed,
    /// so not running, their checkpoint kept): a move either finished, and the core removes
    /// the copy it no longer wants, or it did not, and the guest runs on here.
    pub(crate) async fn recover_sends(&self) {
        let sending: Vec<String> = self
            .guests
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.image.is_some())
            .map(|r| r.spec.guest_id.clone())
            .filter(|g| self.dir(g).join("live").join(SENDING).exists())
            .collect();
        for guest in sending {
            if self.state(&guest) != GuestState::Stopped {
                continue;
            }
            match self.restore_here(&guest).await {
                Ok(()) => {
                    tracing::info!(%guest, "restored a container whose live move was cut short")
                }
                Err(e) => {
                    tracing::warn!(%guest, error = %e, "cannot restore a container whose live move was cut short; start it again")
                }
            }
        }
    }

    pub(crate) async fn finish(&self, guest_id: &str) -> Result<(), DriverError> {
        let outcome = self
            .receiving
            .lock()
            .unwrap()
            .get(guest_id)
            .map(|r| r.outcome.clone());
        let Some(mut outcome) = outcome else {
            // Finished before (a repeated step), or nothing was received.
            return match self.state(guest_id) {
                GuestState::Running => Ok(()),
                _ => Err(permanent(format!(
                    "nothing was received for {guest_id} on server {}: move it again",
                    self.cfg.name
                ))),
            };
        };
        let ended = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| permanent(format!("receiving {guest_id} was abandoned")))?
            .clone()
            .expect("waited for it");
        self.receiving.lock().unwrap().remove(guest_id);
        ended.map_err(permanent)
    }
}
