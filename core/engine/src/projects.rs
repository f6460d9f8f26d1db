//! Projects: environments and containers (and their commands and events) belong to one;
//! users get a role per project; a project's quota bounds what its live containers use
//! together, checked when a command is submitted and again when it makes containers.
//!
//! Invariant: project 1 is `default`, has no quota unless an admin sets one, cannot be
//! removed, and holds every object made before projects existed.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use crate::auth::Role;
use crate::core::CoreError;
use crate::entities::{container, environment, project, project_grant};
use crate::model::{
    ContainerStatus, EnvironmentStatus, Project, ProjectMember, Quota, Requirements, Usage, now_ms,
    validate_name,
};
use crate::services::Services;

/// The project of everything made without naming one.
pub const DEFAULT: i64 = 1;

/// Projects and grants.
pub struct ProjectManager<'a> {
    svc: &'a Services,
    auth: &'a crate::auth::Authenticator,
}

fn limit(v: Option<u64>) -> Option<i64> {
    v.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

/// Refuses figures the database cannot hold (more than `i64::MAX`, as the schema's int64 says).
fn validate(quota: &Quota) -> Result<(), CoreError> {
    let figures = [
        ("containers", quota.containers),
        ("cpu_millis", quota.cpu_millis),
        ("memory_mb", quota.memory_mb),
        ("disk_mb", quota.disk_mb),
    ];
    for (name, v) in figures {
        if v.is_some_and(|n| i64::try_from(n).is_err()) {
            return Err(CoreError::invalid(
                "quota",
                format!("{name}: at most {} (leave it out for no limit)", i64::MAX),
            ));
        }
    }
    Ok(())
}

fn quota_of(row: &project::Model) -> Quota {
    let get = |v: Option<i64>| v.map(|n| n.max(0) as u64);
    Quota {
        containers: get(row.max_containers),
        cpu_millis: get(row.max_cpu_millis),
        memory_mb: get(row.max_memory_mb),
        disk_mb: get(row.max_disk_mb),
    }
}

/// The project named or numbered `key`.
pub async fn find<C: ConnectionTrait>(conn: &C, key: &str) -> Result<project::Model, CoreError> {
    let found = match key.parse::<i64>() {
        Ok(id) => project::Entity::find_by_id(id).one(conn).await?,
        Err(_) => {
            project::Entity::find()
                .filter(project::Column::Name.eq(key))
                .one(conn)
                .await?
        }
    };
    found.ok_or_else(|| {
        CoreError::NotFound(format!(
            "project '{key}' does not exist (see `cloud48 project list`)"
        ))
    })
}

/// The project a request names (`None`: `default`), as a field error when it does not exist.
pub async fn named<C: ConnectionTrait>(
    conn: &C,
    key: Option<&str>,
) -> Result<project::Model, CoreError> {
    match key {
        None => find(conn, &DEFAULT.to_string()).await,
        Some(k) => find(conn, k)
            .await
            .map_err(|e| CoreError::invalid("project", e.to_string())),
    }
}

/// The projects that limit something, with their quotas.
pub async fn limited_quotas<C: ConnectionTrait>(conn: &C) -> Result<Vec<(i64, Quota)>, CoreError> {
    Ok(project::Entity::find()
        .all(conn)
        .await?
        .iter()
        .map(|p| (p.id, quota_of(p)))
        .filter(|(_, q)| !q.is_unlimited())
        .collect())
}

/// The projects that limit something (their creates check the quota one by one).
pub async fn limited<C: ConnectionTrait>(conn: &C) -> Result<Vec<i64>, CoreError> {
    Ok(limited_quotas(conn)
        .await?
        .into_iter()
        .map(|(p, _)| p)
        .collect())
}

/// The project a list is filtered by (a field error when it does not exist).
pub async fn filter<C: ConnectionTrait>(conn: &C, key: &str) -> Result<i64, CoreError> {
    filter_within(conn, key, None).await
}

/// `filter`, for a caller who may read only the projects `readable` (all: `None`): one it may
/// not read is refused as one that does not exist, so that a filter tells no one which
/// projects exist beyond theirs.
pub async fn filter_within<C: ConnectionTrait>(
    conn: &C,
    key: &str,
    readable: Option<&[i64]>,
) -> Result<i64, CoreError> {
    let missing = || {
        CoreError::invalid(
            "project",
            format!("project '{key}' does not exist (see `cloud48 project list`)"),
        )
    };
    let id = find(conn, key).await.map_err(|_| missing())?.id;
    if readable.is_some_and(|r| !r.contains(&id)) {
        return Err(missing());
    }
    Ok(id)
}

/// Names of all projects by id (few: read whole).
pub async fn names<C: ConnectionTrait>(conn: &C) -> Result<HashMap<i64, String>, CoreError> {
    Ok(project::Entity::find()
        .all(conn)
        .await?
        .into_iter()
        .map(|p| (p.id, p.name))
        .collect())
}

/// What the live containers of `project` use; with `before`, only those with a smaller id
/// (the containers that were asked for first).
pub async fn usage<C: ConnectionTrait>(
    conn: &C,
    project: i64,
    before: Option<i64>,
) -> Result<Usage, CoreError> {
    let mut q = container::Entity::find()
        .filter(container::Column::ProjectId.eq(project))
        .filter(container::Column::Status.is_not_in([
            ContainerStatus::Destroyed.as_str(),
            ContainerStatus::Failed.as_str(),
        ]));
    if let Some(b) = before {
        q = q.filter(container::Column::Id.lt(b));
    }
    let rows: Vec<(i64, String)> = q
        .select_only()
        .column(container::Column::Id)
        .column(container::Column::Requirements)
        .into_tuple()
        .all(conn)
        .await?;
    let mut total = Usage::default();
    for (id, text) in rows {
        let r: Requirements = serde_json::from_str(&text).map_err(|e| {
            CoreError::Corrupt(format!("container {id}: unreadable requirements: {e}"))
        })?;
        total = total.plus(&Usage::of(1, &r.resources));
    }
    Ok(total.plus(&growth(conn, project, before).await?))
}

/// What running updates of the project's live containers (all, or those before container
/// `before`) reserved to grow them and have not yet written to them: their growth dummies.
/// Counted in the usage, so that two updates running at once cannot each fit in what is left.
async fn growth<C: ConnectionTrait>(
    conn: &C,
    project: i64,
    before: Option<i64>,
) -> Result<Usage, CoreError> {
    let mut text = String::from(
        "SELECT CAST(COALESCE(SUM(d.cpu_millis), 0) AS BIGINT) AS cpu, \
         CAST(COALESCE(SUM(d.memory_mb), 0) AS BIGINT) AS memory, \
         CAST(COALESCE(SUM(d.disk_mb), 0) AS BIGINT) AS disk \
         FROM dummies d JOIN containers c ON c.id = d.container_id \
         JOIN commands k ON k.id = d.command_id \
         WHERE c.project_id = $1 AND k.kind = 'container.update' \
         AND c.status NOT IN ('destroyed', 'failed')",
    );
    let mut values = vec![project.into()];
    if let Some(b) = before {
        text.push_str(" AND c.id < $2");
        values.push(b.into());
    }
    let row = conn
        .query_one_raw(crate::queue::store::sql(conn, &text, values))
        .await?
        .ok_or_else(|| CoreError::Corrupt("a sum answered no row".into()))?;
    let sum = |column: &str| -> Result<u64, CoreError> {
        Ok(row.try_get::<i64>("", column)?.max(0) as u64)
    };
    Ok(Usage {
        containers: 0,
        resources: crate::model::Resources {
            cpu_millis: sum("cpu")?,
            memory_mb: sum("memory")?,
            disk_mb: sum("disk")?,
        },
    })
}

/// `check` for a command that, in `txn`, writes what it checked only after the check (an
/// update's growth, a clone's copy): the project's quota is held until `txn` ends, so that a
/// check and the reservation it allows are seen whole by the next one (two running at once
/// each fitted in what was left).
pub async fn check_held<C: ConnectionTrait>(
    txn: &C,
    project: i64,
    more: &Usage,
) -> Result<(), CoreError> {
    hold_quota(txn, project).await?;
    check(txn, project, more, None).await
}

/// Holds the quota of `project` until `txn` ends (on PostgreSQL a lock of its row; SQLite
/// runs one transaction at a time).
async fn hold_quota<C: ConnectionTrait>(txn: &C, project: i64) -> Result<(), CoreError> {
    if txn.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
        txn.query_one_raw(crate::queue::store::sql(
            txn,
            "SELECT id FROM projects WHERE id = $1 FOR UPDATE",
            vec![project.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Refuses `more` when it does not fit in the quota of `project` on top of what its live
/// containers use (with `before`, only those asked for before container `before`: the check a
/// command makes when it runs, so that of two racing submissions the earlier one wins).
pub async fn check<C: ConnectionTrait>(
    conn: &C,
    project: i64,
    more: &Usage,
    before: Option<i64>,
) -> Result<(), CoreError> {
    let row = project::Entity::find_by_id(project)
        .one(conn)
        .await?
        .ok_or_else(|| CoreError::Corrupt(format!("project {project} does not exist")))?;
    let quota = quota_of(&row);
    if quota.is_unlimited() {
        return Ok(());
    }
    let used = usage(conn, project, before).await?;
    match used.refuse(more, &quota) {
        None => Ok(()),
        Some(why) => Err(CoreError::Conflict(format!(
            "this would take project '{}' over its quota ({why}); raise it (`cloud48 project \
             quota {} ...`) or destroy containers in it",
            row.name, row.name
        ))),
    }
}

impl<'a> ProjectManager<'a> {
    pub(crate) fn new(svc: &'a Services, auth: &'a crate::auth::Authenticator) -> Self {
        ProjectManager { svc, auth }
    }

    /// Creates a project.
    pub async fn create(&self, name: &str, quota: &Quota) -> Result<Project, CoreError> {
        validate_name(name).map_err(|m| CoreError::invalid("name", m))?;
        validate(quota)?;
        let db = self.svc.db();
        if let Ok(p) = find(db, name).await {
            return Err(CoreError::Conflict(format!(
                "a project named '{name}' already exists (id {}); choose another name",
                p.id
            )));
        }
        let row = project::ActiveModel {
            name: Set(name.to_string()),
            max_containers: Set(limit(quota.containers)),
            max_cpu_millis: Set(limit(quota.cpu_millis)),
            max_memory_mb: Set(limit(quota.memory_mb)),
            max_disk_mb: Set(limit(quota.disk_mb)),
            created_at: Set(now_ms()),
            ..Default::default()
        }
        .insert(db)
        .await?;
        self.view(row).await
    }

    /// Projects by id; `only`: just these.
    pub async fn list(&self, only: Option<&[i64]>) -> Result<Vec<Project>, CoreError> {
        let mut q = project::Entity::find().order_by_asc(project::Column::Id);
        if let Some(ids) = only {
            q = q.filter(project::Column::Id.is_in(ids.to_vec()));
        }
        let mut out = Vec::new();
        for row in q.all(self.svc.db()).await? {
            out.push(self.view(row).await?);
        }
        Ok(out)
    }

    /// One project (by id or name).
    pub async fn get(&self, key: &str) -> Result<Project, CoreError> {
        let row = find(self.svc.db(), key).await?;
        self.view(row).await
    }

    /// Replaces the quota of a project (a project already over a lowered quota keeps its
    /// containers; it may only shrink until it fits).
    pub async fn set_quota(&self, key: &str, quota: &Quota) -> Result<Project, CoreError> {
        validate(quota)?;
        let row = find(self.svc.db(), key).await?;
        let mut active: project::ActiveModel = row.into();
        active.max_containers = Set(limit(quota.containers));
        active.max_cpu_millis = Set(limit(quota.cpu_millis));
        active.max_memory_mb = Set(limit(quota.memory_mb));
        active.max_disk_mb = Set(limit(quota.disk_mb));
        let row = active.update(self.svc.db()).await?;
        self.view(row).await
    }

    /// Removes an empty project (no live environment or container) and its grants.
    pub async fn remove(&self, key: &str) -> Result<(), CoreError> {
        let db = self.svc.db();
        let row = find(db, key).await?;
        if row.id == DEFAULT {
            return Err(CoreError::Conflict(
                "the project 'default' cannot be removed: it holds what names no project".into(),
            ));
        }
        let envs = environment::Entity::find()
            .filter(environment::Column::ProjectId.eq(row.id))
            .filter(environment::Column::Status.ne(EnvironmentStatus::Destroyed.as_str()))
            .count(db)
            .await?;
        let used = usage(db, row.id, None).await?;
        if envs > 0 || used.containers > 0 {
            return Err(CoreError::Conflict(format!(
                "project '{}' still has {envs} environment(s) and {} container(s); destroy them first",
                row.name, used.containers
            )));
        }
        project_grant::Entity::delete_many()
            .filter(project_grant::Column::ProjectId.eq(row.id))
            .exec(db)
            .await?;
        project::Entity::delete_by_id(row.id).exec(db).await?;
        Ok(())
    }

    /// Gives `user` role `role` (viewer or operator) in a project, replacing a former grant.
    pub async fn grant(
        &self,
        key: &str,
        user_name: &str,
        role: Role,
    ) -> Result<Project, CoreError> {
        if !matches!(role, Role::Viewer | Role::Operator) {
            return Err(CoreError::invalid(
                "role",
                format!(
                    "a project role is viewer or operator, not {role}; admins are global (a user's own role)"
                ),
            ));
        }
        let db = self.svc.db();
        let row = find(db, key).await?;
        let asked = crate::auth::Principal::User {
            name: user_name.to_string(),
            role: Role::Member,
        };
        let Some(crate::auth::Principal::User { role: global, .. }) =
            self.auth.current(&asked).await?
        else {
            return Err(CoreError::invalid(
                "user",
                format!("user '{user_name}' does not exist (see `cloud48 user list`)"),
            ));
        };
        if global >= role {
            return Err(CoreError::invalid(
                "role",
                format!(
                    "user '{user_name}' has the global role {global}, which reaches every project: a project role of {role} would change nothing (give project roles to users of role member, or above their global role)"
                ),
            ));
        }
        project_grant::Entity::delete_many()
            .filter(project_grant::Column::ProjectId.eq(row.id))
            .filter(project_grant::Column::UserName.eq(user_name))
            .exec(db)
            .await?;
        project_grant::ActiveModel {
            project_id: Set(row.id),
            user_name: Set(user_name.to_string()),
            role: Set(role.to_string()),
        }
        .insert(db)
        .await?;
        self.view(row).await
    }

    /// Takes `user`'s role in a project away.
    pub async fn revoke(&self, key: &str, user_name: &str) -> Result<Project, CoreError> {
        let db = self.svc.db();
        let row = find(db, key).await?;
        let gone = project_grant::Entity::delete_many()
            .filter(project_grant::Column::ProjectId.eq(row.id))
            .filter(project_grant::Column::UserName.eq(user_name))
            .exec(db)
            .await?;
        if gone.rows_affected == 0 {
            return Err(CoreError::NotFound(format!(
                "user '{user_name}' has no role in project '{}'",
                row.name
            )));
        }
        self.view(row).await
    }

    async fn view(&self, row: project::Model) -> Result<Project, CoreError> {
        let db = self.svc.db();
        let usage = usage(db, row.id, None).await?;
        let grants = project_grant::Entity::find()
            .filter(project_grant::Column::ProjectId.eq(row.id))
            .all(db)
            .await?;
        let mut members: Vec<ProjectMember> = grants
            .into_iter()
            .map(|g| ProjectMember {
                user: g.user_name,
                role: g.role,
            })
            .collect();
        members.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(Project {
            id: row.id,
            quota: quota_of(&row),
            name: row.name,
            usage,
            members,
            created_at: row.created_at,
        })
    }
}

/// The roles a user holds per project (project id → (name, role)).
pub async fn grants_of<C: ConnectionTrait>(
    conn: &C,
    user_name: &str,
) -> Result<BTreeMap<i64, (String, Role)>, sea_orm::DbErr> {
    let grants = project_grant::Entity::find()
        .filter(project_grant::Column::UserName.eq(user_name))
        .all(conn)
        .await?;
    if grants.is_empty() {
        return Ok(BTreeMap::new());
    }
    let names: HashMap<i64, String> = project::Entity::find()
        .all(conn)
        .await?
        .into_iter()
        .map(|p| (p.id, p.name))
        .collect();
    Ok(grants
        .into_iter()
        .filter_map(|g| {
            let role = g.role.parse().ok()?;
            Some((g.project_id, (names.get(&g.project_id)?.clone(), role)))
        })
        .collect())
}

/// An object a request names, whose project decides who may touch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    /// An environment by id or name.
    Environment(String),
    /// A container by id.
    Container(i64),
    /// A command by id.
    Command(i64),
    /// A project by id or name.
    Project(String),
}

impl std::fmt::Display for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owned::Environment(k) => write!(f, "environment '{k}'"),
            Owned::Container(id) => write!(f, "container {id}"),
            Owned::Command(id) => write!(f, "command {id}"),
            Owned::Project(k) => write!(f, "project '{k}'"),
        }
    }
}

/// The project of `object`; `None` when it does not exist or belongs to no project (a
/// fleet-wide command).
pub async fn project_of<C: ConnectionTrait>(
    conn: &C,
    object: &Owned,
) -> Result<Option<i64>, CoreError> {
    use crate::entities::command;
    Ok(match object {
        Owned::Environment(key) => match crate::managers::find_environment(conn, key).await {
            Ok(e) => Some(e.project_id),
            Err(CoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        },
        Owned::Container(id) => container::Entity::find_by_id(*id)
            .one(conn)
            .await?
            .map(|c| c.project_id),
        Owned::Command(id) => command::Entity::find_by_id(*id)
            .one(conn)
            .await?
            .and_then(|c| c.project_id),
        Owned::Project(key) => match find(conn, key).await {
            Ok(p) => Some(p.id),
            Err(CoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        },
    })
}
