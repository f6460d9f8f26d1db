//! The driver trait on a simulated server.

use super::*;

#[async_trait]
impl Driver for SimServer {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            suspend: true,
            exec: true,
            migrate: true,
            update: true,
            images: false,
            live_migrate: false,
            simulated: true,
            vm: None,
        }
    }

    async fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        let _busy = self.enter("create", Some(&spec.guest_id)).await?;
        self.insert(spec, Vec::new(), "create")
    }

    async fn start(&self, guest_id: &str) -> Result<(), DriverError> {
        let _busy = self.enter("start", Some(guest_id)).await?;
        self.transition(
            guest_id,
            "start",
            &[GuestState::Stopped],
            GuestState::Running,
        )
    }

    async fn stop(&self, guest_id: &str) -> Result<(), DriverError> {
        let _busy = self.enter("stop", Some(guest_id)).await?;
        self.transition(
            guest_id,
            "stop",
            &[GuestState::Running, GuestState::Suspended],
            GuestState::Stopped,
        )
    }

    async fn suspend(&self, guest_id: &str) -> Result<(), DriverError> {
        let _busy = self.enter("suspend", Some(guest_id)).await?;
        self.transition(
            guest_id,
            "suspend",
            &[GuestState::Running],
            GuestState::Suspended,
        )
    }

    async fn resume(&self, guest_id: &str) -> Result<(), DriverError> {
        let _busy = self.enter("resume", Some(guest_id)).await?;
        self.transition(
            guest_id,
            "resume",
            &[GuestState::Suspended],
            GuestState::Running,
        )
    }

    async fn reboot(&self, guest_id: &str) -> Result<(), DriverError> {
        let _busy = self.enter("reboot", Some(guest_id)).await?;
        self.transition(
            guest_id,
            "reboot",
            &[GuestState::Running],
            GuestState::Running,
        )
    }

    async fn destroy(&self, guest_id: &str) -> Result<(), DriverError> {
        let _busy = self.enter("destroy", Some(guest_id)).await?;
        let mut state = self.state.lock().unwrap();
        if state.guests.remove(guest_id).is_some() {
            self.save(&mut state, guest_id)?;
        }
        Ok(())
    }

    async fn update(&self, guest_id: &str, resources: &Resources) -> Result<(), DriverError> {
        let _busy = self.enter("update", Some(guest_id)).await?;
        let mut state = self.state.lock().unwrap();
        let current = state
            .guests
            .get(guest_id)
            .ok_or_else(|| DriverError::NotFound(guest_id.to_string()))?
            .info
            .resources;
        if current == *resources {
            return Ok(());
        }
        let growth = resources.minus(&current);
        self.check_capacity(&state, &growth)?;
        let guest = state.guests.get_mut(guest_id).expect("checked above");
        guest.info.resources = *resources;
        guest.operations.push("update".into());
        self.save(&mut state, guest_id)
    }

    async fn export(&self, guest_id: &str) -> Result<GuestImage, DriverError> {
        let _busy = self.enter("export", Some(guest_id)).await?;
        let state = self.state.lock().unwrap();
        let guest = state
            .guests
            .get(guest_id)
            .ok_or_else(|| DriverError::NotFound(guest_id.to_string()))?;
        if guest.info.state != GuestState::Stopped {
            return Err(DriverError::InvalidState {
                guest: guest_id.to_string(),
                state: guest.info.state,
                operation: "export".into(),
            });
        }
        Ok(GuestImage {
            type_id: guest.type_id.clone(),
            data: guest.disk.clone(),
        })
    }

    async fn import(&self, spec: &GuestSpec, image: &GuestImage) -> Result<GuestInfo, DriverError> {
        let _busy = self.enter("import", Some(&spec.guest_id)).await?;
        self.insert(spec, image.data.clone(), "import")
    }

    async fn exec(
        &self,
        guest_id: &str,
        script: &str,
        args: &[String],
    ) -> Result<ExecOutput, DriverError> {
        let _busy = self.enter("exec", Some(guest_id)).await?;
        let mut state = self.state.lock().unwrap();
        let guest = state
            .guests
            .get_mut(guest_id)
            .ok_or_else(|| DriverError::NotFound(guest_id.to_string()))?;
        if guest.info.state != GuestState::Running {
            return Err(DriverError::InvalidState {
                guest: guest_id.to_string(),
                state: guest.info.state,
                operation: "exec".into(),
            });
        }
        guest.execs.push(ExecRecord {
            script: script.to_string(),
            args: args.to_vec(),
        });
        self.save(&mut state, guest_id)?;
        Ok(ExecOutput {
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
        })
    }

    async fn status(&self, guest_id: &str) -> Result<Option<GuestInfo>, DriverError> {
        let _busy = self.enter("status", None).await?;
        Ok(self
            .state
            .lock()
            .unwrap()
            .guests
            .get(guest_id)
            .map(|g| g.info.clone()))
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        let _busy = self.enter("list", None).await?;
        Ok(self
            .state
            .lock()
            .unwrap()
            .guests
            .values()
            .map(|g| g.info.clone())
            .collect())
    }

    /// A simulated guest has no process; its log is its history of operations and scripts.
    async fn logs(&self, guest_id: &str) -> Result<String, DriverError> {
        let state = self.state.lock().unwrap();
        let guest = state
            .guests
            .get(guest_id)
            .ok_or_else(|| DriverError::NotFound(guest_id.to_string()))?;
        let mut out: Vec<String> = guest
            .operations
            .iter()
            .map(|o| format!("sim: {o}"))
            .collect();
        out.extend(guest.execs.iter().map(|e| {
            format!(
                "sim: exec {} {:?}",
                e.script.lines().next().unwrap_or_default(),
                e.args
            )
        }));
        Ok(out.join("\n"))
    }

    async fn stats(&self) -> Result<ServerStats, DriverError> {
        // The figures of a heartbeat, without simulated latency: an agent's heartbeats carry
        // them, and a slow server is slow to act, not to say that it is alive.
        self.heartbeat().ok_or_else(|| DriverError::Unreachable {
            server: self.name.clone(),
            message: "simulated crash".into(),
        })
    }
}
