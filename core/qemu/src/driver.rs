//! The driver trait on QEMU virtual machines.

use super::*;

#[async_trait]
impl Driver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend: true,
            exec: true,
            migrate: true,
            update: true,
            images: true,
            live_migrate: true,
            simulated: false,
            vm: Some(self.accel),
        }
    }

    async fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        validate_id(&spec.guest_id)?;
        let _held = self.hold(&spec.guest_id).await;
        if let Ok(r) = self.record(&spec.guest_id) {
            let state = self.state(&r.spec.guest_id).await;
            return Ok(self.info(&r, state));
        }
        let base = self.base_for(spec).await?;
        let size = spec.resources.disk_mb;
        let digest = base.details.summary.digest.to_string();
        let machine_type = self.machine.machine_type.clone();
        self.make_guest(spec, &digest, &machine_type, async move |disk: PathBuf| {
            disks::overlay(&base, &disk, size).await
        })
        .await
    }

    async fn start(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.record(guest_id)?;
        match self.state(guest_id).await {
            GuestState::Running => Ok(()),
            GuestState::Suspended => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state: GuestState::Suspended,
                operation: "start".into(),
            }),
            GuestState::Stopped => {
                let qmp = self.file(guest_id, files::QMP);
                if self.pid(guest_id).is_some() {
                    if control::run_state(&qmp).await.as_deref() == Ok("postmigrate") {
                        // It sent itself away and the target did not take over: it goes on
                        // here, from its memory, as if it had never left.
                        let tap = self.tap(guest_id);
                        network::run("ip", &["link", "set", &tap, "master", &self.cfg.bridge])
                            .await
                            .map_err(permanent)?;
                        return control::qmp(&qmp, qapi::qmp::cont {})
                            .await
                            .map(|_| ())
                            .map_err(permanent);
                    }
                    // A QEMU that never ran this VM (an incoming migration that did not come).
                    self.halt(guest_id, false).await?;
                }
                self.launch(&r).await
            }
        }
    }

    async fn stop(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        self.halt(guest_id, true).await
    }

    async fn suspend(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        match self.state(guest_id).await {
            GuestState::Suspended => Ok(()),
            GuestState::Running => {
                control::qmp(&self.file(guest_id, files::QMP), qapi::qmp::stop {})
                    .await
                    .map(|_| ())
                    .map_err(permanent)
            }
            state => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "suspend".into(),
            }),
        }
    }

    async fn resume(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        match self.state(guest_id).await {
            GuestState::Running => Ok(()),
            GuestState::Suspended => {
                control::qmp(&self.file(guest_id, files::QMP), qapi::qmp::cont {})
                    .await
                    .map(|_| ())
                    .map_err(permanent)
            }
            state => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "resume".into(),
            }),
        }
    }

    async fn reboot(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.running(guest_id, "reboot").await?;
        self.halt(guest_id, true).await?;
        self.launch(&r).await
    }

    async fn destroy(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        if self.record(guest_id).is_err() {
            return Ok(());
        }
        self.remove(guest_id).await
    }

    async fn update(&self, guest_id: &str, resources: &Resources) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let mut r = self.record(guest_id)?;
        admit_resize(
            &self.cfg.name,
            &self.capacity,
            self.allocated(),
            &r.spec.resources,
            resources,
        )?;
        match self.state(guest_id).await {
            GuestState::Stopped => {}
            GuestState::Running => self.resize(&r, resources).await?,
            state => {
                return Err(DriverError::InvalidState {
                    guest: guest_id.into(),
                    state,
                    operation: "update (resume it first, or stop it)".into(),
                });
            }
        }
        r.spec.resources = *resources;
        self.keep(&r)
    }

    async fn export(&self, guest_id: &str) -> Result<GuestImage, DriverError> {
        let file = self.scratch();
        let size = self.export_to(guest_id, &file).await;
        let data = match size {
            Ok(_) => tokio::fs::read(&file).await.map_err(permanent),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&file).await;
        let r = self.record(guest_id)?;
        Ok(GuestImage {
            type_id: r.spec.type_id,
            data: data?,
        })
    }

    async fn import(&self, spec: &GuestSpec, image: &GuestImage) -> Result<GuestInfo, DriverError> {
        let file = self.scratch();
        tokio::fs::write(&file, &image.data)
            .await
            .map_err(permanent)?;
        let result = self.import_from(spec, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        result
    }

    async fn export_to(&self, guest_id: &str, to: &Path) -> Result<u64, DriverError> {
        self.export_file(guest_id, to).await
    }

    async fn import_from(&self, spec: &GuestSpec, from: &Path) -> Result<GuestInfo, DriverError> {
        self.import_file(spec, from).await
    }

    async fn exec(
        &self,
        guest_id: &str,
        script: &str,
        args: &[String],
    ) -> Result<ExecOutput, DriverError> {
        let _held = self.hold(guest_id).await;
        self.running(guest_id, "exec").await?;
        control::ga_exec(&self.file(guest_id, files::QGA), script, args, EXEC_LIMIT)
            .await
            .map_err(|e| permanent(format!("exec in VM {guest_id}: {e}")))
    }

    async fn status(&self, guest_id: &str) -> Result<Option<GuestInfo>, DriverError> {
        let Ok(r) = self.record(guest_id) else {
            return Ok(None);
        };
        let state = self.state(guest_id).await;
        Ok(Some(self.info(&r, state)))
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        use futures::StreamExt;
        // Each running VM is asked over its own QMP socket; several at once, so a list takes
        // about as long as the slowest answer, not the sum of them.
        let records: Vec<Record> = self.guests.lock().unwrap().values().cloned().collect();
        Ok(futures::stream::iter(records)
            .map(|r| async move {
                let state = self.state(&r.spec.guest_id).await;
                self.info(&r, state)
            })
            .buffered(LIST_FAN_OUT)
            .collect()
            .await)
    }

    async fn stats(&self) -> Result<ServerStats, DriverError> {
        self.server_stats().await
    }

    async fn logs(&self, guest_id: &str) -> Result<String, DriverError> {
        self.record(guest_id)?;
        Ok(tail(&self.file(guest_id, files::CONSOLE), LOG_TAIL))
    }

    async fn fetch_image(
        &self,
        from: &cloud48_driver::ImageOrigin,
        image: Option<&str>,
    ) -> Result<Vec<String>, DriverError> {
        self.images.fetch_from(from, image).await
    }

    async fn live_offer(&self, guest_id: &str) -> Result<LiveOffer, DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.running(guest_id, "live migration").await?;
        Ok(LiveOffer {
            machine: Some(MachineModel {
                machine_type: r
                    .machine_type
                    .clone()
                    .unwrap_or_else(|| self.machine.machine_type.clone()),
                ..self.machine.clone()
            }),
            shape: Some(self.shape_now(&r).await?),
            image: r.image,
            disk_mb: self.disk_size_mb(guest_id).await?,
        })
    }

    async fn live_receive(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        self.receive_live(spec, offer).await
    }

    async fn live_send(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        self.send_live(guest_id, target).await
    }

    async fn live_finish(&self, guest_id: &str) -> Result<(), DriverError> {
        self.finish_live(guest_id).await
    }
}
