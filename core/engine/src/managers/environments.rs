//! EnvironmentManager: environments and their members.

use super::*;

/// An operation on a whole environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentOp {
    /// Start every stopped member, ascending priority.
    Start,
    /// Stop every running or suspended member, descending priority.
    Stop,
    /// Suspend every running member, descending priority.
    Suspend,
    /// Resume every suspended member, ascending priority.
    Resume,
    /// Destroy every member, descending priority, then the environment.
    Destroy,
}

impl EnvironmentOp {
    /// Command kind, e.g. `environment.start`.
    pub fn kind(&self) -> CommandKind {
        match self {
            EnvironmentOp::Start => CommandKind::EnvironmentStart,
            EnvironmentOp::Stop => CommandKind::EnvironmentStop,
            EnvironmentOp::Suspend => CommandKind::EnvironmentSuspend,
            EnvironmentOp::Resume => CommandKind::EnvironmentResume,
            EnvironmentOp::Destroy => CommandKind::EnvironmentDestroy,
        }
    }
}

/// Request to add a container to an environment.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddContainer {
    /// Container type id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Requirements; default: the type's.
    pub requirements: Option<Requirements>,
    /// Server name; default: chosen by placement.
    pub server: Option<String>,
    /// Parameters of the container (its type's schema; the rest take their defaults).
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub params: crate::model::Params,
}

/// The EnvironmentManager of the design notes: `run`, `find`, `get_by_id`, `get`, `put`.
pub struct EnvironmentManager<'a> {
    svc: &'a Services,
}

impl<'a> EnvironmentManager<'a> {
    pub(crate) fn new(svc: &'a Services) -> Self {
        EnvironmentManager { svc }
    }

    /// Creates an empty environment; returns (command, environment id).
    pub async fn create(
        &self,
        name: &str,
        requested_by: &str,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        self.create_with(name, &Default::default(), None, requested_by)
            .await
    }

    /// Creates an empty environment with parameters its members' types may read; returns
    /// (command, environment id).
    /// In `project` (name or id; default: `default`).
    pub async fn create_with(
        &self,
        name: &str,
        params: &crate::model::Params,
        project: Option<&str>,
        requested_by: &str,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        let project = crate::projects::named(self.svc.db(), project).await?.id;
        for (k, v) in params {
            validate_name(k)
                .map_err(|m| CoreError::invalid("params", format!("parameter name: {m}")))?;
            if v.contains('\0') || v.len() > 4096 {
                return Err(CoreError::invalid(
                    "params",
                    format!("parameter '{k}': a value is at most 4096 bytes of text without NUL"),
                ));
            }
        }
        let params = serde_json::to_string(params).expect("serializable");
        self.submit_new_with(name, params, project, |env| NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentCreate,
            target: Some(Target::Environment(env)),
            params: crate::commands::params::to_value(crate::commands::params::CreateEnvironment {
                name: name.to_string(),
            }),
            requested_by: requested_by.to_string(),
        })
        .await
    }

    /// Clones environment `source` into a new environment `name`: every member is cloned
    /// (state and disk, placed by the factory) and the add hooks re-run so that the copy is
    /// wired to itself. Returns (command, new environment id).
    pub async fn clone(
        &self,
        source: &str,
        name: &str,
        requested_by: &str,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        let src = self.active(source).await?;
        // The copy is in the source's project, whose quota must hold the copied members.
        let mut more = Usage::default();
        let members = container::Entity::find()
            .filter(container::Column::EnvironmentId.eq(src.id))
            .filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]))
            .all(self.svc.db())
            .await?;
        for m in &members {
            more = more.plus(&Usage::of(1, &requirements_of_row(m)?.resources));
        }
        if let Some(why) = unclonable(&src.name, &members) {
            return Err(CoreError::Conflict(why));
        }
        crate::projects::check(self.svc.db(), src.project_id, &more, None).await?;
        self.submit_new_with(name, "{}".into(), src.project_id, |env| NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentClone,
            target: Some(Target::Environment(src.id)),
            params: crate::commands::params::to_value(crate::commands::params::CloneEnvironment {
                destination: EnvironmentId(env),
            }),
            requested_by: requested_by.to_string(),
        })
        .await
    }

    /// Inserts a new environment `name` with parameters (JSON object) in `project` (status
    /// creating) and the command `make` returns for it, in one transaction.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: every driver or plugin call happens before it"
    )]
    async fn submit_new_with(
        &self,
        name: &str,
        params: String,
        project: i64,
        make: impl FnOnce(i64) -> NewCommand,
    ) -> Result<(CommandId, EnvironmentId), CoreError> {
        validate_name(name).map_err(|m| CoreError::invalid("name", m))?;
        let txn = self.svc.db().begin().await?;
        let exists = environment::Entity::find()
            .filter(environment::Column::Name.eq(name))
            .filter(environment::Column::Status.ne(EnvironmentStatus::Destroyed.as_str()))
            .one(&txn)
            .await?;
        if let Some(e) = exists {
            return Err(CoreError::Conflict(format!(
                "an environment named '{name}' already exists (id {}); choose another name",
                e.id
            )));
        }
        let now = now_ms();
        let env = environment::ActiveModel {
            name: Set(name.to_string()),
            status: Set(EnvironmentStatus::Creating.as_str().into()),
            locked_by: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
            params: Set(params),
            project_id: Set(project),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        let ids = self
            .svc
            .queue()
            .enqueue_in(&txn, vec![make(env.id)], None)
            .await?;
        txn.commit().await?;
        self.svc.queue().wake();
        Ok((CommandId(ids[0]), EnvironmentId(env.id)))
    }

    async fn active(&self, key: &str) -> Result<environment::Model, CoreError> {
        let env = find_environment(self.svc.db(), key).await?;
        if env.status == EnvironmentStatus::Destroyed.as_str() {
            return Err(CoreError::Conflict(format!(
                "environment '{}' is destroyed",
                env.name
            )));
        }
        Ok(env)
    }

    /// Adds a new container of a type; the command's result holds the container id.
    pub async fn add(
        &self,
        env: &str,
        req: &AddContainer,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let env = self.active(env).await?;
        let ty = self
            .svc
            .types()
            .require(&req.type_id)
            .map_err(|m| CoreError::invalid("type", m))?;
        if let Some(r) = &req.requirements {
            r.validate()
                .map_err(|m| CoreError::invalid("requirements", m))?;
        }
        if let Some(s) = &req.server {
            server_by_name(self.svc.db(), "server", s).await?;
        }
        cloud48_model::resolve_params(&ty.param_specs(), &req.params).map_err(|m| {
            CoreError::invalid("params", format!("container type {}: {m}", ty.type_id()))
        })?;
        let need = req
            .requirements
            .as_ref()
            .map_or_else(|| ty.default_requirements().resources, |r| r.resources);
        crate::projects::check(self.svc.db(), env.project_id, &Usage::of(1, &need), None).await?;
        let cmd = NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentAdd,
            target: Some(Target::Environment(env.id)),
            params: crate::commands::params::to_value(crate::commands::params::Add {
                requirements: req.requirements.clone(),
                server: req.server.clone(),
                params: req.params.clone(),
                ..crate::commands::params::Add::of_type(ty.type_id())
            }),
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(cmd).await?)
    }

    /// Removes (and destroys) a member.
    pub async fn remove(
        &self,
        env: &str,
        container: ContainerId,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let container = container.0;
        let env = self.active(env).await?;
        let row = load_container(self.svc.db(), container).await?;
        if row.environment_id != Some(env.id) || parse_status(row.id, &row.status)?.is_gone() {
            return Err(CoreError::NotFound(format!(
                "container {container} is not a member of environment '{}'",
                env.name
            )));
        }
        let cmd = NewCommand {
            project: None,
            kind: crate::model::CommandKind::EnvironmentRemove,
            target: Some(Target::Environment(env.id)),
            params: crate::commands::params::to_value(crate::commands::params::Member {
                container_id: container,
            }),
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(cmd).await?)
    }

    /// Runs an operation on the environment and its members (the `run` of the notes).
    pub async fn run(
        &self,
        op: EnvironmentOp,
        env: &str,
        requested_by: &str,
    ) -> Result<CommandId, CoreError> {
        let env = self.active(env).await?;
        let cmd = NewCommand {
            project: None,
            kind: op.kind(),
            target: Some(Target::Environment(env.id)),
            params: crate::commands::params::to_value(crate::commands::params::NoParams {}),
            requested_by: requested_by.to_string(),
        };
        Ok(self.svc.queue().enqueue(cmd).await?)
    }

    /// Environments, by id (destroyed ones only with `all`).
    /// Environments by ascending id: at most `limit` (at most `MAX_PAGE`) after id `after`.
    /// `project`: only in this one (name or id); `only`: just in these (what a caller limited to
    /// some projects may read).
    pub async fn find(
        &self,
        all: bool,
        after: Option<EnvironmentId>,
        limit: Option<u32>,
        project: Option<&str>,
        only: Option<&[i64]>,
    ) -> Result<Vec<Environment>, CoreError> {
        let mut q = environment::Entity::find();
        if let Some(p) = project {
            let p = crate::projects::filter_within(self.svc.db(), p, only).await?;
            q = q.filter(environment::Column::ProjectId.eq(p));
        }
        if let Some(ids) = only {
            q = q.filter(environment::Column::ProjectId.is_in(ids.to_vec()));
        }
        if !all {
            q = q.filter(environment::Column::Status.ne(EnvironmentStatus::Destroyed.as_str()));
        }
        if let Some(after) = after {
            q = q.filter(environment::Column::Id.gt(after.0));
        }
        let envs = q
            .order_by_asc(environment::Column::Id)
            .limit(page_size(limit))
            .all(self.svc.db())
            .await?;
        let mut out = Vec::with_capacity(envs.len());
        for e in envs {
            out.push(self.view(e).await?);
        }
        Ok(out)
    }

    /// One environment (by id or name) with its members.
    pub async fn get_by_id(&self, key: &str) -> Result<Environment, CoreError> {
        let env = find_environment(self.svc.db(), key).await?;
        self.view(env).await
    }

    async fn view(&self, env: environment::Model) -> Result<Environment, CoreError> {
        let rows = container::Entity::find()
            .filter(container::Column::EnvironmentId.eq(env.id))
            .filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]))
            .order_by_asc(container::Column::Id)
            .all(self.svc.db())
            .await?;
        let mut members = to_views(self.svc, rows).await?;
        members.sort_by_key(|m| (m.priority, m.id));
        let project = crate::projects::names(self.svc.db())
            .await?
            .remove(&env.project_id)
            .unwrap_or_default();
        Ok(Environment {
            id: EnvironmentId(env.id),
            project,
            name: env.name,
            status: env.status.parse().unwrap_or(EnvironmentStatus::Active),
            locked_by: env.locked_by.map(CommandId),
            members,
            params: serde_json::from_str(&env.params).unwrap_or_default(),
            created_at: env.created_at,
        })
    }

    /// Locks environment `id` for command `cmd`; false when another command holds it.
    pub async fn get(&self, id: EnvironmentId, cmd: CommandId) -> Result<bool, CoreError> {
        let id = id.0;
        Ok(self.svc.queue().lock(Target::Environment(id), cmd).await?)
    }

    /// Unlocks environment `id` if `cmd` holds it.
    pub async fn put(&self, id: EnvironmentId, cmd: CommandId) -> Result<(), CoreError> {
        let id = id.0;
        Ok(self
            .svc
            .queue()
            .unlock(Target::Environment(id), cmd)
            .await?)
    }
}

/// Why environment `name` cannot be cloned now, if it cannot: a member that is neither
/// running nor stopped (down, suspended, still being made) would be left out of the copy,
/// and the copy's members wired to it, in the source.
pub(crate) fn unclonable(name: &str, members: &[container::Model]) -> Option<String> {
    let odd: Vec<String> = members
        .iter()
        .filter_map(|m| {
            let status: ContainerStatus = m.status.parse().ok()?;
            (status.is_member()
                && !matches!(status, ContainerStatus::Running | ContainerStatus::Stopped))
            .then(|| format!("container {} ({}) is {status}", m.id, m.type_id))
        })
        .collect();
    (!odd.is_empty()).then(|| {
        format!(
            "environment '{name}' cannot be cloned now: {}; a copy must hold every member, \
             running or stopped (wait for a server to come back, start or resume the member, \
             or remove it from the environment), then clone again",
            odd.join(", ")
        )
    })
}
