//! The qemu driver's side of live migration (`Driver::live_*`): a target guest made to wait
//! for its VM, the source's send, the target's take-over. The QMP choreography is `live.rs`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloud48_driver::{DriverError, GuestSpec, LiveOffer, LiveReport, LiveTarget, activity};
use cloud48_model::ImageRef;

use cloud48_linux::network;

use crate::machine::{self, files};
use crate::{QemuDriver, control, disks, live, permanent, shape, validate_id};

impl QemuDriver {
    pub(crate) async fn receive_live(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        validate_id(&spec.guest_id)?;
        let guest = &spec.guest_id;
        let _held = self.hold(guest).await;
        // The VM keeps its address (configured inside it): this server must be on its network.
        let ip = spec
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        if !ip.is_some_and(|ip| self.cfg.subnet.contains(ip)) {
            return Err(permanent(format!(
                "server {} cannot receive VM {guest} live: the VM keeps its address {} and this                  server's network is {}; migrate it without --live, or to a server on its network",
                self.cfg.name,
                spec.ip.as_deref().unwrap_or("(none)"),
                self.cfg.subnet
            )));
        }
        if let Some(offered) = &offer.machine {
            machine::compatible(offered, &self.machine, &self.machine_types).map_err(|why| {
                permanent(format!(
                    "server {} cannot receive VM {guest} live: {why}",
                    self.cfg.name
                ))
            })?;
        }
        let taken = self
            .guests
            .lock()
            .unwrap()
            .values()
            .any(|r| Some(r.ip) == ip && r.spec.guest_id != *guest);
        if taken {
            return Err(permanent(format!(
                "server {} cannot receive VM {guest} live: another guest here has its address {}",
                self.cfg.name,
                spec.ip.as_deref().unwrap_or_default()
            )));
        }
        if self.record(guest).is_ok() {
            // What an interrupted attempt left: the source still has the VM.
            self.remove(guest).await?;
        }
        let base = self
            .images
            .prepare(&ImageRef {
                reference: offer.image.clone(),
                digest: Some(offer.image.clone()),
            })
            .await?;
        let size = offer.disk_mb;
        let machine_type = offer.machine.as_ref().map_or_else(
            || self.machine.machine_type.clone(),
            |m| m.machine_type.clone(),
        );
        self.make_guest(
            spec,
            &offer.image,
            &machine_type,
            async move |disk: PathBuf| disks::overlay(&base, &disk, size).await,
        )
        .await?;
        let received = async {
            // Started with the devices the VM has on its source.
            let mut r = self.record(guest)?;
            r.shape = Some(
                offer
                    .shape
                    .clone()
                    .unwrap_or_else(|| shape::fixed(&spec.resources)),
            );
            self.keep(&r)?;
            self.spawn(&r, true).await?;
            live::receive(&self.file(guest, files::QMP), &self.cfg.migration_host)
                .await
                .map_err(|e| permanent(format!("VM {guest} cannot wait for its migration: {e}")))
        }
        .await;
        if received.is_err() {
            let _ = self.remove(guest).await;
        }
        received
    }

    pub(crate) async fn send_live(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        let _held = self.hold(guest_id).await;
        self.running(guest_id, "live migration").await?;
        let qmp = self.file(guest_id, files::QMP);
        let report = live::send(&qmp, guest_id, target)
            .await
            .map_err(|e| permanent(format!("live migration of VM {guest_id}: {e}")))?;
        activity::report(&format!(
            "VM {guest_id} sent in {} ms, paused {} ms for the last pass",
            report.total_ms, report.downtime_ms
        ));
        // The target holds it all; this QEMU stays, paused (`postmigrate`: stopped), until the
        // guest is destroyed here, or goes on if the target does not take over (`start`).
        // Off the bridge, so that the bridge forgets this port and floods the VM's frames to
        // every port, the target's among them, until the target announces itself.
        let _ = network::run("ip", &["link", "set", &self.tap(guest_id), "nomaster"]).await;
        Ok(report)
    }

    pub(crate) async fn finish_live(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        if self.pid(guest_id).is_none() {
            return Err(permanent(format!(
                "VM {guest_id} is not running here: its live migration did not reach this server"
            )));
        }
        let qmp = self.file(guest_id, files::QMP);
        // The source is done; this side may still be taking in the last bytes.
        let deadline = Instant::now() + Duration::from_secs(30);
        while control::run_state(&qmp).await.map_err(permanent)? == "inmigrate" {
            if Instant::now() > deadline {
                return Err(permanent(format!(
                    "VM {guest_id} is still receiving its migration after 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        live::received(&qmp).await.map_err(permanent)?;
        if control::paused(&qmp).await.map_err(permanent)? {
            control::qmp(&qmp, qapi::qmp::cont {})
                .await
                .map_err(permanent)?;
        }
        // Taken over only if the guest answers here: one whose kernel died on arrival (one
        // move in about fifty did under TCG with the growth shape) fails the move, so the
        // command destroys this copy and the source, paused with its memory whole, goes on.
        let qga = self.file(guest_id, files::QGA);
        answers(&qga, ARRIVAL_WAIT).await.map_err(|e| {
            permanent(format!(
                "VM {guest_id} arrived but does not answer here ({e}); it goes on where it was"
            ))
        })
    }
}

/// How long a VM that arrived by live migration has to answer its guest agent.
const ARRIVAL_WAIT: Duration = Duration::from_secs(10);

/// Waits until the guest agent behind `qga` answers a ping, trying again for at most `wait`.
async fn answers(qga: &std::path::Path, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match control::ga_ping(qga, left.min(Duration::from_secs(2))).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
