//! ServerManager: servers of the platform (drain, fault injection, images ahead of need).

use super::*;

/// What `ServerManager::drain` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrainReport {
    /// The drained server.
    pub server: String,
    /// The migrations submitted, one per container.
    pub commands: Vec<CommandId>,
    /// Containers that could not be migrated, with the reason.
    pub skipped: Vec<String>,
    /// Why the operation changed nothing, when it did not (undrain of a server that is not
    /// draining, fail of one crashed already, recover of one that is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged: Option<String>,
}

/// Servers of the platform.
pub struct ServerManager<'a> {
    svc: &'a Services,
}

/// The names `server list` shows for what a driver can do.
fn capability_names(c: &crate::driver::Capabilities) -> Vec<String> {
    [
        ("suspend", c.suspend),
        ("exec", c.exec),
        ("migrate", c.migrate),
        ("update", c.update),
        ("images", c.images),
        ("host-files", !c.images),
        ("live-migrate", c.live_migrate),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| name.to_string())
    .chain(c.vm.map(|accel| format!("vm-{accel}")))
    .collect()
}

impl<'a> ServerManager<'a> {
    pub(crate) fn new(svc: &'a Services) -> Self {
        ServerManager { svc }
    }

    /// Every server with its allocation, load and last heartbeat, by id.
    pub async fn list(&self) -> Result<Vec<Server>, CoreError> {
        let db = self.svc.db();
        let rows = server::Entity::find()
            .order_by_asc(server::Column::Id)
            .all(db)
            .await?;
        let dummies = crate::placement::dummy_counts(db).await?;
        Ok(rows
            .into_iter()
            .map(|s| {
                let beat = self.svc.health().last(s.id);
                let capabilities = self
                    .svc
                    .fleet()
                    .driver(s.id)
                    .map(|d| capability_names(&d.capabilities()))
                    .unwrap_or_default();
                Server {
                    capabilities,
                    id: ServerId(s.id),
                    status: s.status.parse().unwrap_or(ServerStatus::Down),
                    labels: serde_json::from_str(&s.labels).unwrap_or_default(),
                    last_heartbeat: beat.as_ref().map(|b| b.at).or(s.last_heartbeat),
                    load: beat.and_then(|b| b.load),
                    capacity: crate::placement::capacity_of(&s),
                    allocated: crate::placement::allocated_of(&s),
                    containers: s.alloc_containers.max(0) as u64,
                    dummies: dummies.get(&s.id).copied().unwrap_or(0) as u64,
                    draining: s.draining,
                    name: s.name,
                    driver: s.driver,
                    address: s.address,
                    subnet: s.subnet,
                    addresses: s.addresses,
                }
            })
            .collect())
    }

    /// Drains a server: placement puts nothing new there and every running or stopped
    /// container on it is migrated away (placement chooses where). `live`: running containers
    /// move while they run (virtual machines, to servers that can receive them); refused
    /// before anything changes when the server cannot send them so.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn drain(
        &self,
        key: &str,
        live: bool,
        requested_by: &str,
    ) -> Result<DrainReport, CoreError> {
        let db = self.svc.db();
        let s = server_by_name(db, "server", key).await?;
        if live {
            let can = self
                .svc
                .fleet()
                .driver(s.id)
                .is_some_and(|d| d.capabilities().live_migrate);
            if !can {
                return Err(CoreError::Conflict(format!(
                    "server {} cannot drain live: it reports no live migration (qemu servers move their virtual machines while they run, linux servers where CRIU works their image containers); drain without --live: running containers stop while their files are copied and start again on their new servers",
                    s.name
                )));
            }
            if self
                .svc
                .fleet()
                .network_peers(s.id)
                .unwrap_or_default()
                .is_empty()
            {
                return Err(CoreError::Conflict(format!(
                    "server {} cannot drain live: it shares its network with no other server, and a container moving live keeps its address (agents sharing a network start with the same --subnet and their own --addresses range); drain without --live: running containers stop while their files are copied and start again on their new servers with addresses of theirs",
                    s.name
                )));
            }
        }
        let txn = db.begin().await?;
        let mut am: server::ActiveModel = s.clone().into();
        am.draining = Set(true);
        am.update(&txn).await?;
        let rows = container::Entity::find()
            .filter(container::Column::ServerId.eq(s.id))
            .order_by_asc(container::Column::Id)
            .all(&txn)
            .await?;
        let mut commands = Vec::new();
        let mut skipped = Vec::new();
        for r in rows {
            match parse_status(r.id, &r.status)? {
                ContainerStatus::Running | ContainerStatus::Stopped => commands.push(NewCommand {
                    project: None,
                    kind: crate::model::CommandKind::ContainerMigrate,
                    target: Some(Target::Container(r.id)),
                    params: crate::commands::params::to_value(crate::commands::params::Migrate {
                        to: None,
                        live,
                        leave: Some(s.id),
                    }),
                    requested_by: requested_by.to_string(),
                }),
                st if st.is_gone() => {}
                st => skipped.push(format!(
                    "container {} is {st} and cannot be migrated: {}, then drain again",
                    r.id,
                    match st {
                        ContainerStatus::Suspended => "resume or stop it",
                        ContainerStatus::Down => "wait for its server, or replace it",
                        _ => "wait until the command acting on it ends",
                    }
                )),
            }
        }
        let ids = self.svc.queue().enqueue_in(&txn, commands, None).await?;
        txn.commit().await?;
        self.svc
            .placement()
            .set_status(s.id, s.status == "up", true);
        self.svc.queue().wake();
        Ok(DrainReport {
            server: s.name,
            commands: ids.into_iter().map(CommandId).collect(),
            skipped,
            unchanged: None,
        })
    }

    /// Ends a drain: placement may use the server again.
    /// False when it was not draining (nothing changed).
    pub async fn undrain(&self, key: &str) -> Result<bool, CoreError> {
        let db = self.svc.db();
        let s = server_by_name(db, "server", key).await?;
        if !s.draining {
            return Ok(false);
        }
        let up = s.status == "up";
        let id = s.id;
        let mut am: server::ActiveModel = s.into();
        am.draining = Set(false);
        am.update(db).await?;
        self.svc.placement().set_status(id, up, false);
        Ok(true)
    }

    /// Makes images present on server `key` ahead of need (placement then prefers it for
    /// containers of those images): `image` from the core, from server `peer`'s agent, or
    /// every image of `file` on the server. Says what the server holds of them.
    pub async fn fetch_image(
        &self,
        key: &str,
        image: Option<&str>,
        peer: Option<&str>,
        file: Option<&str>,
    ) -> Result<Vec<String>, CoreError> {
        let s = server_by_name(self.svc.db(), "server", key).await?;
        let from = match (peer, file) {
            (Some(_), Some(_)) => {
                return Err(CoreError::invalid(
                    "from_server",
                    "give an image's server or a file on the server, not both",
                ));
            }
            (None, Some(path)) if !path.starts_with('/') => {
                return Err(CoreError::invalid(
                    "file",
                    format!("'{path}' is not an absolute path on server {}", s.name),
                ));
            }
            (None, Some(path)) => crate::driver::ImageOrigin::File { path: path.into() },
            (Some(peer), None) => {
                let p = server_by_name(self.svc.db(), "from_server", peer).await?;
                match (p.driver == crate::fleet::RemoteFactory::KIND, p.address) {
                    (true, Some(url)) if p.id != s.id => crate::driver::ImageOrigin::Peer { url },
                    (true, Some(_)) => {
                        return Err(CoreError::invalid(
                            "from_server",
                            format!("server {} cannot fetch images from itself", s.name),
                        ));
                    }
                    _ => {
                        return Err(CoreError::invalid(
                            "from_server",
                            format!(
                                "server {} is not run by a node agent, so it serves no images",
                                p.name
                            ),
                        ));
                    }
                }
            }
            (None, None) => crate::driver::ImageOrigin::Core,
        };
        if image.is_none() && !matches!(from, crate::driver::ImageOrigin::File { .. }) {
            return Err(CoreError::invalid(
                "image",
                "name the image to fetch (a name such as cloud48/nginx, or a sha256: digest)",
            ));
        }
        let (driver, name) = self.svc.fleet().named_driver(s.id).ok_or_else(|| {
            CoreError::Conflict(format!("server {} has no driver in this core", s.name))
        })?;
        driver.fetch_image(&from, image).await.map_err(|e| match e {
            crate::driver::DriverError::Unsupported { .. } => CoreError::Conflict(format!(
                "server {name} runs no images (server show lists its capabilities): {e}"
            )),
            e => CoreError::Conflict(format!("server {name}: {e}")),
        })
    }

    /// Injects a crash into a simulated server (it stops answering and sending heartbeats);
    /// the health monitor marks it down after the grace period.
    /// False when it was crashed already.
    pub async fn fail(&self, key: &str) -> Result<bool, CoreError> {
        Ok(self.sim(key).await?.crash())
    }

    /// Ends an injected crash: heartbeats resume and the monitor brings the server back.
    /// False when it was not crashed.
    pub async fn recover(&self, key: &str) -> Result<bool, CoreError> {
        Ok(self.sim(key).await?.recover())
    }

    async fn sim(
        &self,
        key: &str,
    ) -> Result<std::sync::Arc<crate::driver::sim::SimServer>, CoreError> {
        // Fault injection is a rehearsal tool: a core without simulated servers has no such route.
        if self.svc.fleet().sims().is_empty() {
            return Err(CoreError::NotFound(
                "fault injection (server fail, server recover) exists only on a core that runs simulated servers (--sim-servers); use the real server's own tools".into(),
            ));
        }
        let s = server_by_name(self.svc.db(), "server", key).await?;
        self.svc.fleet().sim(s.id).ok_or_else(|| {
            CoreError::Conflict(format!(
                "server {} uses driver '{}'; only simulated servers can be failed and recovered on command",
                s.name, s.driver
            ))
        })
    }

    /// One server by name or id.
    pub async fn get(&self, key: &str) -> Result<Server, CoreError> {
        self.list()
            .await?
            .into_iter()
            .find(|s| s.name == key || s.id.to_string() == key)
            .ok_or_else(|| {
                CoreError::NotFound(format!(
                    "server '{key}' does not exist (see `cloud48 server list`)"
                ))
            })
    }
}
