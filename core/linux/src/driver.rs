//! The driver trait on OS containers.

use super::*;

#[async_trait]
impl Driver for LinuxDriver {
    fn kind(&self) -> &'static str {
        "linux"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend: true,
            exec: true,
            migrate: true,
            update: true,
            images: self.images.is_some(),
            live_migrate: self.live_host().is_some(),
            simulated: false,
            vm: None,
        }
    }

    async fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        validate_id(&spec.guest_id)?;
        let _held = self.hold(&spec.guest_id).await;
        if let Ok(r) = self.record(&spec.guest_id) {
            return Ok(self.info(&r));
        }
        let image = self.image_for(spec).await?;
        if image.is_some() {
            // Its own files are its overlay's upper directory, owned by its root.
            return self.make_guest(spec, image, own_root).await;
        }
        let t = self.template(spec);
        self.make_guest(spec, None, move |fs| {
            for d in &t.private_dirs {
                std::fs::create_dir_all(fs.join(d.trim_start_matches('/'))).map_err(permanent)?;
            }
            Ok(())
        })
        .await
    }

    async fn start(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.record(guest_id)?;
        match self.state(guest_id) {
            // Launched by an earlier call that did not see it through (the agent restarted
            // while it waited): started once its workload is ready, as a launch is.
            GuestState::Running => {
                self.wait_ready(&r, &crate::ready::Probe::of(&r.spec.workload), None, None)
                    .await
            }
            GuestState::Suspended => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state: GuestState::Suspended,
                operation: "start".into(),
            }),
            GuestState::Stopped => self.launch(&r).await,
        }
    }

    async fn stop(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        self.halt(guest_id).await
    }

    async fn suspend(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        match self.state(guest_id) {
            GuestState::Suspended => Ok(()),
            GuestState::Running => self.cgroups.freeze(guest_id, true).await.map_err(permanent),
            s => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state: s,
                operation: "suspend".into(),
            }),
        }
    }

    async fn resume(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        self.record(guest_id)?;
        match self.state(guest_id) {
            GuestState::Running => Ok(()),
            GuestState::Suspended => self
                .cgroups
                .freeze(guest_id, false)
                .await
                .map_err(permanent),
            s => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state: s,
                operation: "resume".into(),
            }),
        }
    }

    async fn reboot(&self, guest_id: &str) -> Result<(), DriverError> {
        let _held = self.hold(guest_id).await;
        let r = self.record(guest_id)?;
        match self.state(guest_id) {
            GuestState::Running => {
                self.halt(guest_id).await?;
                self.launch(&r).await
            }
            s => Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state: s,
                operation: "reboot".into(),
            }),
        }
    }

    async fn destroy(&self, guest_id: &str) -> Result<(), DriverError> {
        // A copy being received live stops being received.
        self.receiving.lock().unwrap().remove(guest_id);
        let _held = self.hold(guest_id).await;
        if self.record(guest_id).is_err() {
            return Ok(());
        }
        self.halt(guest_id).await?;
        self.cgroups.remove(guest_id);
        tokio::fs::remove_dir_all(self.dir(guest_id))
            .await
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(permanent)?;
        self.guests.lock().unwrap().remove(guest_id);
        Ok(())
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
        self.cgroups.limit(guest_id, resources).map_err(permanent)?;
        r.spec.resources = *resources;
        self.save(&r)
    }

    async fn export(&self, guest_id: &str) -> Result<GuestImage, DriverError> {
        let _held = self.hold(guest_id).await;
        let (r, fs) = self.exportable(guest_id)?;
        let data = tokio::task::spawn_blocking(move || images::archive_upper(&fs, Vec::new()))
            .await
            .map_err(permanent)?
            .map_err(|e| permanent(format!("cannot archive the directory of {guest_id}: {e}")))?;
        Ok(GuestImage {
            type_id: r.spec.type_id,
            data,
        })
    }

    async fn export_to(&self, guest_id: &str, to: &Path) -> Result<u64, DriverError> {
        let _held = self.hold(guest_id).await;
        let (_, fs) = self.exportable(guest_id)?;
        let to = to.to_path_buf();
        tokio::task::spawn_blocking(move || images::archive_upper_to_file(&fs, &to))
            .await
            .map_err(permanent)?
            .map_err(|e| permanent(format!("cannot archive the directory of {guest_id}: {e}")))
    }

    async fn import(&self, spec: &GuestSpec, image: &GuestImage) -> Result<GuestInfo, DriverError> {
        let data = image.data.clone();
        self.import_with(spec, move |fs| images::unpack_upper(&data[..], fs))
            .await
    }

    async fn import_from(&self, spec: &GuestSpec, from: &Path) -> Result<GuestInfo, DriverError> {
        let from = from.to_path_buf();
        self.import_with(spec, move |fs| {
            let file = std::fs::File::open(&from)
                .map_err(|e| permanent(format!("cannot read {}: {e}", from.display())))?;
            images::unpack_upper(file, fs)
        })
        .await
    }

    async fn exec(
        &self,
        guest_id: &str,
        script: &str,
        args: &[String],
    ) -> Result<ExecOutput, DriverError> {
        let _held = self.hold(guest_id).await;
        let runs_image = self.record(guest_id)?.image.is_some();
        let state = self.state(guest_id);
        let (GuestState::Running, Some(pid)) = (state, self.init_pid(guest_id)) else {
            return Err(DriverError::InvalidState {
                guest: guest_id.into(),
                state,
                operation: "exec".into(),
            });
        };
        let mut command = match (&self.images, runs_image) {
            (Some(images), true) => {
                let argv: Vec<String> = ["sh", "-c", script, "c48-exec"]
                    .into_iter()
                    .map(String::from)
                    .chain(args.iter().cloned())
                    .collect();
                Command::from(images.runc.exec_command(
                    guest_id,
                    &argv,
                    &[format!("CLOUD48_CONTAINER={guest_id}")],
                ))
            }
            _ => {
                let procs: Vec<String> = self
                    .cgroups
                    .procs_files(guest_id)
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(JOIN)
                    .arg("c48-join")
                    .args(args)
                    .env("C48_PROCS", procs.join(" "))
                    .env("C48_PID", pid.to_string())
                    .env("C48_SCRIPT", script)
                    .env("CLOUD48_CONTAINER", guest_id);
                c
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| permanent(format!("cannot exec in {guest_id}: {e}")))?;
        let group = child.id();
        let out = match tokio::time::timeout(EXEC_TIMEOUT, child.wait_with_output()).await {
            Ok(out) => out.map_err(|e| permanent(format!("cannot exec in {guest_id}: {e}")))?,
            Err(_) => {
                if let Some(g) = group {
                    // SAFETY: killpg has no memory preconditions.
                    unsafe { libc::killpg(g as i32, libc::SIGKILL) };
                }
                return Err(permanent(format!(
                    "exec in {guest_id} did not finish within {} s and was killed",
                    EXEC_TIMEOUT.as_secs()
                )));
            }
        };
        let text =
            |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(EXEC_OUTPUT_MAX)]).into_owned();
        Ok(ExecOutput {
            exit_code: out.status.code().unwrap_or(-1),
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
        })
    }

    async fn status(&self, guest_id: &str) -> Result<Option<GuestInfo>, DriverError> {
        Ok(self
            .guests
            .lock()
            .unwrap()
            .get(guest_id)
            .cloned()
            .map(|r| self.info(&r)))
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        let records: Vec<Record> = self.guests.lock().unwrap().values().cloned().collect();
        Ok(records.iter().map(|r| self.info(r)).collect())
    }

    async fn stats(&self) -> Result<ServerStats, DriverError> {
        let ids: Vec<String> = self.guests.lock().unwrap().keys().cloned().collect();
        let (mut memory, mut cpu_ns) = (0u64, 0u64);
        for id in &ids {
            let (m, c) = self.cgroups.usage(id);
            memory += m;
            cpu_ns += c;
        }
        let cpu_millis = cpu_rate(&self.cpu_sample, cpu_ns);
        Ok(ServerStats {
            capacity: self.capacity,
            allocated: self.allocated(),
            guests: ids.len() as u64,
            used: Some(Resources {
                cpu_millis,
                memory_mb: memory >> 20,
                disk_mb: self.disk_used().await >> 20,
            }),
            images: self.images.as_ref().map(|i| i.held()).unwrap_or_default(),
        })
    }

    async fn live_offer(&self, guest_id: &str) -> Result<LiveOffer, DriverError> {
        self.offer(guest_id).await
    }

    async fn live_receive(
        &self,
        spec: &GuestSpec,
        offer: &LiveOffer,
    ) -> Result<LiveTarget, DriverError> {
        self.receive(spec, offer).await
    }

    async fn live_send(
        &self,
        guest_id: &str,
        target: &LiveTarget,
    ) -> Result<LiveReport, DriverError> {
        self.send(guest_id, target).await
    }

    async fn live_finish(&self, guest_id: &str) -> Result<(), DriverError> {
        self.finish(guest_id).await
    }

    async fn logs(&self, guest_id: &str) -> Result<String, DriverError> {
        self.record(guest_id)?;
        Ok(tail(&self.dir(guest_id).join("console.log"), LOG_TAIL))
    }

    async fn fetch_image(
        &self,
        from: &cloud48_driver::ImageOrigin,
        image: Option<&str>,
    ) -> Result<Vec<String>, DriverError> {
        let images = self
            .images
            .as_ref()
            .ok_or_else(|| DriverError::Unsupported {
                driver: self.kind().into(),
                operation: "images (this agent runs with --images off or without runc)".into(),
            })?;
        images.fetch_from(from, image).await
    }
}
