//! ContainerManager: lifecycle commands, logs, secrets and exec of single containers (exports
//! and imports in `transfer.rs`).

use super::*;

impl<'a> ContainerManager<'a> {
    pub(crate) fn new(svc: &'a Services) -> Self {
        ContainerManager { svc }
    }

    /// Why `row` cannot migrate live to `to` (a server id, or any when `None`): a server
    /// whose driver does not move running guests (VMs on qemu servers move; OS containers
    /// that run their image move between linux servers where CRIU works), said with what to
    /// do instead.
    fn live_refusal(&self, row: &container::Model, to: Option<i64>) -> Option<CoreError> {
        let fleet = self.svc.fleet();
        let cannot = |server: Option<i64>| match server.and_then(|s| fleet.named_driver(s)) {
            Some((d, _)) if d.capabilities().live_migrate => None,
            Some((_, name)) => Some(format!("server {name}")),
            None => Some("its server".to_string()),
        };
        let Some(which) = cannot(row.server_id).or_else(|| to.and_then(|t| cannot(Some(t)))) else {
            return self.network_refusal(row.id, row.server_id?, to);
        };
        Some(CoreError::Conflict(format!(
            "container {} cannot migrate live: {which} reports no live migration (virtual machines on qemu servers move while they run, and containers that run their image on linux servers where CRIU works; the server's agent log says why not); migrate without --live: the container stops while its files are copied and starts on the target with the same address where the network allows",
            row.id
        )))
    }

    /// Why a guest on server `from` cannot move live to `to` (any when `None`) for want of a
    /// shared network: it keeps its address, so the target must be on the source's bridge
    /// and subnet.
    fn network_refusal(&self, id: i64, from: i64, to: Option<i64>) -> Option<CoreError> {
        let fleet = self.svc.fleet();
        let peers = fleet.network_peers(from).unwrap_or_default();
        let name = |s: i64| fleet.named_driver(s).map_or(format!("#{s}"), |(_, n)| n);
        let why = match to {
            Some(t) if !peers.contains(&t) => format!(
                "server {} is not on the network of server {}",
                name(t),
                name(from)
            ),
            None if peers.is_empty() => {
                format!(
                    "server {} shares its network with no other server",
                    name(from)
                )
            }
            _ => return None,
        };
        Some(CoreError::Conflict(format!(
            "container {id} cannot migrate live: {why}; a live move keeps the container's address, so source and target must share one bridge and subnet (agents started with the same --subnet and their own --addresses range); migrate without --live to move it cold (it gets an address on the target's network)"
        )))
    }

    /// Submits `cmd` for container `id`; returns the command id.
    pub async fn run(
        &self,
        cmd: ContainerCommand,
        id: ContainerId,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let id = id.0;
        let db = self.svc.db();
        let row = load_container(db, id).await?;
        // The status is checked when the command runs, after the commands queued before it on
        // this container (stop then start, submitted back to back, ends running). Only what can
        // never run is refused now: a container that no longer exists on any server.
        let status = parse_status(row.id, &row.status)?;
        if status.is_gone() && !matches!(cmd, ContainerCommand::Destroy {}) {
            check_status(id, status, cmd.kind().as_str(), cmd.allowed_from())
                .map_err(CoreError::Conflict)?;
        }
        // A member that serves leaves its environment through `environment.remove`: its peers
        // are told (a balancer drops its upstream) and may refuse (a database still in use).
        // One that is down can tell no one and is given up directly.
        if matches!(cmd, ContainerCommand::Destroy {})
            && status.is_member()
            && status != ContainerStatus::Down
            && let Some(env) = row.environment_id
            && let Some(env) = environment::Entity::find_by_id(env).one(db).await?
            && env.status != EnvironmentStatus::Destroyed.as_str()
        {
            return Err(CoreError::Conflict(format!(
                "container {id} is a member of environment '{name}': remove it with \
                 `cloud48 env remove {name} {id}` (DELETE /v1/environments/{name}/containers/{id}), \
                 so that the other members are told and may refuse",
                name = env.name
            )));
        }
        let params = match &cmd {
            ContainerCommand::Update { resources } => {
                resources
                    .validate()
                    .map_err(|m| CoreError::invalid("resources", m))?;
                // More than its server has at all can never be given where it is (unless a
                // command before this one, a migration, moves it: checked when it runs).
                if let Some(sid) = row.server_id
                    && !migration_pending(db, id).await?
                    && let Some(s) = server::Entity::find_by_id(sid).one(db).await?
                    && let Some((what, asked, has)) = beyond_server(resources, &s)
                {
                    return Err(CoreError::invalid(
                        "resources",
                        format!(
                            "container {id} cannot have {what} {asked}: its server {} has \
                             {has} in all; ask for {has} at most, or first move it to a larger \
                             server (`cloud48 container migrate {id} --to SERVER`)",
                            s.name
                        ),
                    ));
                }
                // What it asks beyond what it has counts against its project's quota.
                let had = requirements_of_row(&row)?.resources;
                let more = Usage {
                    containers: 0,
                    resources: Resources {
                        cpu_millis: resources.cpu_millis.saturating_sub(had.cpu_millis),
                        memory_mb: resources.memory_mb.saturating_sub(had.memory_mb),
                        disk_mb: resources.disk_mb.saturating_sub(had.disk_mb),
                    },
                };
                crate::projects::check(db, row.project_id, &more, None).await?;
                crate::commands::params::to_value(crate::commands::params::Update {
                    resources: *resources,
                })
            }
            ContainerCommand::Clone { server } => {
                let each = requirements_of_row(&row)?.resources;
                crate::projects::check(db, row.project_id, &Usage::of(1, &each), None).await?;
                let server_id = match server {
                    Some(name) => Some(server_by_name(db, "server", name).await?.id),
                    None => None,
                };
                crate::commands::params::to_value(crate::commands::params::Clone { server_id })
            }
            ContainerCommand::Migrate { to: None, live } => {
                if *live && let Some(refused) = self.live_refusal(&row, None) {
                    return Err(refused);
                }
                crate::commands::params::to_value(crate::commands::params::Migrate {
                    to: None,
                    live: *live,
                    leave: None,
                })
            }
            ContainerCommand::Migrate { to: Some(to), live } => {
                let target = server_by_name(db, "to", to).await?;
                if Some(target.id) == row.server_id {
                    return Err(CoreError::invalid(
                        "to",
                        format!("container {id} is already on server {to}; name another server"),
                    ));
                }
                if target.status != "up" {
                    return Err(CoreError::Conflict(format!(
                        "server {to} is {}; migrate to a server that is up",
                        target.status
                    )));
                }
                if *live && let Some(refused) = self.live_refusal(&row, Some(target.id)) {
                    return Err(refused);
                }
                crate::commands::params::to_value(crate::commands::params::Migrate {
                    to: Some(target.id),
                    live: *live,
                    leave: None,
                })
            }
            _ => crate::commands::params::to_value(crate::commands::params::NoParams {}),
        };
        let command = NewCommand {
            project: None,
            kind: cmd.kind(),
            target: Some(Target::Container(id)),
            params,
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(command).await?)
    }

    /// Creates a standalone container (not in an environment); returns (command, container).
    pub async fn create(
        &self,
        req: &CreateContainer,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        let project = crate::projects::named(self.svc.db(), req.project.as_deref()).await?;
        let new = prepare_container(
            self.svc,
            &req.type_id,
            req.server.as_deref(),
            req.requirements.clone(),
            (None, project.id),
            None,
        )
        .await?;
        let (cmd, id) = self
            .svc
            .creates()
            .submit(new.row, new.server_id, requested_by)
            .await?;
        Ok((cmd, ContainerId(id)))
    }

    /// Creates `count` containers of one type with one `container.create_many` command (the
    /// fast path for many containers: batched placement and writes); returns the command,
    /// whose result lists the containers that failed. Each container is placed on its own and
    /// fails alone.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn create_many(
        &self,
        req: &CreateContainer,
        count: u32,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        if !(1..=MAX_BATCH).contains(&count) {
            return Err(CoreError::invalid(
                "count",
                format!("must be 1-{MAX_BATCH}; submit larger numbers as several batches"),
            ));
        }
        let (ty, requirements, server_id) = checked_new(
            self.svc,
            &req.type_id,
            req.server.as_deref(),
            req.requirements.clone(),
        )
        .await?;
        let project = crate::projects::named(self.svc.db(), req.project.as_deref()).await?;
        let more = Usage::of(u64::from(count), &requirements.resources);
        crate::projects::check(self.svc.db(), project.id, &more, None).await?;
        let text = serde_json::to_string(&requirements).expect("serializable");
        // The rows (and their plugin's initial states) are made before the transaction holds
        // the database connection.
        let mut rows: Vec<container::ActiveModel> = (0..count)
            .map(|_| creating_row(self.svc, ty.as_ref(), &text, None, project.id))
            .collect::<Result<_, _>>()?;
        let txn = self.svc.db().begin().await?;
        let command = NewCommand {
            project: Some(project.id),
            kind: crate::model::CommandKind::ContainerCreateMany,
            target: None,
            params: crate::commands::params::to_value(crate::commands::params::CreateMany {
                type_id: ty.type_id().to_string(),
                count,
                server_id,
                requirements,
                start: true,
            }),
            requested_by: requested_by.to_string(),
        };
        let cmd = self
            .svc
            .queue()
            .enqueue_in(&txn, vec![command], None)
            .await?[0];
        // Each container is locked by its batch from the start.
        for row in &mut rows {
            row.locked_by = Set(Some(cmd));
        }
        while !rows.is_empty() {
            let chunk: Vec<_> = rows.drain(..rows.len().min(500)).collect();
            container::Entity::insert_many(chunk)
                .exec_without_returning(&txn)
                .await?;
        }
        // Guest ids in the format of `guest_id_for`, in one statement.
        let prefix = guest_id_prefix(self.svc.platform_name());
        txn.execute_raw(crate::queue::store::sql(
            &txn,
            "UPDATE containers SET guest_id = $1 || CAST(id AS TEXT) WHERE locked_by = $2 AND guest_id = ''",
            vec![prefix.into(), cmd.into()],
        ))
        .await?;
        txn.commit().await?;
        self.svc.queue().wake();
        Ok(CommandId(cmd))
    }

    /// Persists the `container.create` of a new container `id` in `txn` and commits;
    /// returns (command, container).
    pub(super) async fn submit_create(
        &self,
        txn: sea_orm::DatabaseTransaction,
        id: i64,
        params: crate::commands::params::Create,
        requested_by: &str,
    ) -> Result<(CommandId, ContainerId), CoreError> {
        let command = NewCommand {
            project: None,
            kind: crate::model::CommandKind::ContainerCreate,
            target: Some(Target::Container(id)),
            params: crate::commands::params::to_value(params),
            requested_by: requested_by.to_string(),
        };
        let ids = self
            .svc
            .queue()
            .enqueue_in(&txn, vec![command], None)
            .await?;
        txn.commit().await?;
        self.svc.queue().wake();
        Ok((CommandId(ids[0]), ContainerId(id)))
    }

    /// The recent output (stdout and stderr) of a container's main process.
    pub async fn logs(&self, id: ContainerId) -> Result<String, CoreError> {
        let id = id.0;
        let (driver, server, row) = self.guest(id).await?;
        driver
            .logs(&row.guest_id)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))
    }

    /// The value of secret `name` as container `id` receives it (see `crate::secrets`): only
    /// a secret its type's workload names, so that a mistyped name is an error, not a value.
    pub async fn secret(&self, id: ContainerId, name: &str) -> Result<String, CoreError> {
        let row = load_container(self.svc.db(), id.0).await?;
        let named = self
            .svc
            .types()
            .get(&row.type_id)
            .map(|t| t.workload().secrets())
            .unwrap_or_default();
        if !named.contains(name) {
            let known = if named.is_empty() {
                "it receives none".to_string()
            } else {
                format!(
                    "it receives: {}",
                    named.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(CoreError::NotFound(format!(
                "container {id} ({}) receives no secret '{name}'; {known}",
                row.type_id
            )));
        }
        Ok(self.svc.secret(
            crate::secrets::SecretScope::of(row.environment_id, row.id),
            name,
        ))
    }

    /// Runs a command inside a running container (an operator's shell; not a persisted command:
    /// it changes nothing the core keeps). `command[0]` is the program, the rest its arguments.
    pub async fn exec(
        &self,
        id: ContainerId,
        command: &[String],
    ) -> Result<crate::driver::ExecOutput, CoreError> {
        let id = id.0;
        if command.is_empty() || command[0].is_empty() {
            return Err(CoreError::invalid(
                "command",
                "give the program to run and its arguments, e.g. [\"cat\", \"/etc/hostname\"]",
            ));
        }
        let (driver, server, row) = self.guest(id).await?;
        if driver.capabilities().simulated {
            return Err(CoreError::Conflict(format!(
                "container {id} is on simulated server {server}, where no process runs: exec needs a real server (a node agent with --driver linux)"
            )));
        }
        driver
            .exec(&row.guest_id, "exec \"$@\"", command)
            .await
            .map_err(|e| CoreError::Conflict(format!("server {server}: {e}")))
    }

    /// Containers matching `query`, by id.
    /// `only`: just in these projects (what a caller limited to some projects may read).
    pub async fn find(
        &self,
        query: &ContainerQuery,
        only: Option<&[i64]>,
    ) -> Result<Vec<Container>, CoreError> {
        let db = self.svc.db();
        let mut q = container::Entity::find();
        if let Some(p) = &query.project {
            let p = crate::projects::filter_within(db, p, only).await?;
            q = q.filter(container::Column::ProjectId.eq(p));
        }
        if let Some(ids) = only {
            q = q.filter(container::Column::ProjectId.is_in(ids.to_vec()));
        }
        if let Some(env) = &query.environment {
            let env = find_environment(db, env).await.map_err(|e| match e {
                CoreError::NotFound(m) => CoreError::invalid("environment", m),
                e => e,
            })?;
            q = q.filter(container::Column::EnvironmentId.eq(env.id));
        }
        if let Some(s) = query.status {
            q = q.filter(container::Column::Status.eq(s.as_str()));
        } else if !query.all {
            q = q.filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]));
        }
        if let Some(name) = &query.server {
            let s = server_by_name(db, "server", name).await?;
            q = q.filter(container::Column::ServerId.eq(s.id));
        }
        if let Some(t) = &query.type_id {
            q = q.filter(of_type(t));
        }
        if let Some(after) = query.after {
            q = q.filter(container::Column::Id.gt(after.0));
        }
        let rows = q
            .order_by_asc(container::Column::Id)
            .limit(page_size(query.limit))
            .all(db)
            .await?;
        // A type nothing is installed as and no container has is a mistyped name, not an
        // empty answer (a removed type's containers still list, whatever their status).
        if let Some(t) = &query.type_id
            && rows.is_empty()
            && query.after.is_none()
            && let Err(m) = self.svc.types().require(t)
        {
            let any = container::Entity::find().filter(of_type(t)).one(db).await?;
            if any.is_none() {
                return Err(CoreError::invalid("type", m));
            }
        }
        to_views(self.svc, rows).await
    }

    /// Deletes failed containers (a create that did not complete) that no command holds and no
    /// reservation names. The guest of one that reached a server is destroyed there first; one
    /// whose server cannot be reached is kept, so the collector can still find its guest.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    pub async fn purge(&self) -> Result<PurgeReport, CoreError> {
        let db = self.svc.db();
        let rows = container::Entity::find()
            .filter(container::Column::Status.eq(ContainerStatus::Failed.as_str()))
            .filter(container::Column::LockedBy.is_null())
            .order_by_asc(container::Column::Id)
            .all(db)
            .await?;
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        // Driver calls first, then one transaction.
        for row in rows {
            if let Some(server_id) = row.server_id {
                let Some((driver, name)) = self.svc.fleet().named_driver(server_id) else {
                    kept.push(format!(
                        "container {}: server #{server_id} has no driver in this core",
                        row.id
                    ));
                    continue;
                };
                if let Err(e) = driver.destroy(&row.guest_id).await {
                    kept.push(format!("container {}: server {name}: {e}", row.id));
                    continue;
                }
            }
            gone.push(row.id);
        }
        let txn = db.begin().await?;
        let mut purged = 0;
        for chunk in gone.chunks(500) {
            // Still failed and unlocked now, and no reservation names them.
            let held = crate::placement::reserved_for(&txn, chunk).await?;
            use sea_orm::QuerySelect;
            let ids: Vec<i64> = container::Entity::find()
                .select_only()
                .column(container::Column::Id)
                .filter(container::Column::Id.is_in(chunk.iter().copied()))
                .filter(container::Column::Status.eq(ContainerStatus::Failed.as_str()))
                .filter(container::Column::LockedBy.is_null())
                .into_tuple::<i64>()
                .all(&txn)
                .await?
                .into_iter()
                .filter(|id| !held.contains(id))
                .collect();
            purged += container::Entity::delete_many()
                .filter(container::Column::Id.is_in(ids.iter().copied()))
                .exec(&txn)
                .await?
                .rows_affected;
            origin_identity::Entity::delete_many()
                .filter(origin_identity::Column::ContainerId.is_in(ids))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(PurgeReport { purged, kept })
    }

    /// One container.
    pub async fn get_by_id(&self, id: ContainerId) -> Result<Container, CoreError> {
        let id = id.0;
        let row = load_container(self.svc.db(), id).await?;
        let state = row.state.clone();
        let mut views = to_views(self.svc, vec![row]).await?;
        let mut view = views.pop().expect("one row in, one view out");
        if let Some(ty) = self.svc.types().get(&view.type_id) {
            view.inspect = Some(match ty.inspect(&state) {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            });
        }
        let execs = self
            .svc
            .queue()
            .list(&crate::queue::CommandFilter {
                target_type: Some("container".into()),
                target_id: Some(id),
                limit: Some(1000),
                ..Default::default()
            })
            .await?;
        view.execs = execs
            .into_iter()
            .rev()
            .filter(|c| c.kind == "container.exec")
            .map(|c| ExecSummary {
                command_id: c.id,
                status: c.status,
                script: script_title(c.params["script"].as_str().unwrap_or_default()),
                args: serde_json::from_value(c.params["args"].clone()).unwrap_or_default(),
            })
            .collect();
        if let Some(o) = origin_identity::Entity::find()
            .filter(origin_identity::Column::ContainerId.eq(id))
            .one(self.svc.db())
            .await?
        {
            view.origin = Some(OriginIdentity {
                origin_platform: o.origin_platform,
                origin_container_id: o.origin_container_id,
                guest_id: o.guest_id,
            });
        }
        Ok(view)
    }

    /// Locks container `id` for command `cmd`; false when another command holds it.
    pub async fn get(&self, id: ContainerId, cmd: CommandId) -> Result<bool, CoreError> {
        let id = id.0;
        Ok(self.svc.queue().lock(Target::Container(id), cmd).await?)
    }

    /// Unlocks container `id` if `cmd` holds it.
    pub async fn put(&self, id: ContainerId, cmd: CommandId) -> Result<(), CoreError> {
        let id = id.0;
        Ok(self.svc.queue().unlock(Target::Container(id), cmd).await?)
    }
}

/// The first figure of `r` beyond what server `s` has in all: (name, asked, the server's).
fn beyond_server(r: &Resources, s: &server::Model) -> Option<(&'static str, u64, u64)> {
    [
        ("cpu_millis", r.cpu_millis, s.cpu_millis),
        ("memory_mb", r.memory_mb, s.memory_mb),
        ("disk_mb", r.disk_mb, s.disk_mb),
    ]
    .into_iter()
    .map(|(what, asked, has)| (what, asked, u64::try_from(has).unwrap_or(0)))
    .find(|(_, asked, has)| asked > has)
}

/// Containers of type `t`: a `name@version`, or every version of a bare name.
fn of_type(t: &str) -> sea_orm::Condition {
    let exact = container::Column::TypeId.eq(t);
    if t.contains('@') {
        sea_orm::Condition::all().add(exact)
    } else {
        sea_orm::Condition::any()
            .add(exact)
            .add(container::Column::TypeId.starts_with(format!("{t}@")))
    }
}

/// Whether a migration of container `id` is queued or under way.
async fn migration_pending(db: &sea_orm::DatabaseConnection, id: i64) -> Result<bool, CoreError> {
    use sea_orm::PaginatorTrait;
    let n = crate::entities::command::Entity::find()
        .filter(crate::entities::command::Column::Kind.eq(CommandKind::ContainerMigrate.as_str()))
        .filter(crate::entities::command::Column::TargetType.eq("container"))
        .filter(crate::entities::command::Column::TargetId.eq(id))
        .filter(
            crate::entities::command::Column::Status.is_in(
                [
                    CommandStatus::Queued,
                    CommandStatus::Running,
                    CommandStatus::Waiting,
                ]
                .map(|s| s.as_str()),
            ),
        )
        .count(db)
        .await?;
    Ok(n > 0)
}
