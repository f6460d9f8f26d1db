//! Container-type plugins: install, list, show, upgrade and remove WASM components, and the
//! bundled reference plugins installed on a core's first start.
//!
//! Invariants: an installed plugin version is a row of `plugins` (with its component) and a type
//! `name@version` in the registry; a version is removed only when no live container uses it;
//! an upgrade moves every container to the new version in one transaction.

pub use cloud48_plugin_host::{harness, host};

use std::sync::Arc;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, Set,
    TransactionTrait,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use utoipa::ToSchema;

pub use cloud48_plugin_host::{Limits, PluginHost, PluginMeta, WasmPlugin};

use crate::core::CoreError;
use crate::entities::{container, plugin, plugin_upload};
use crate::model::{ContainerStatus, now_ms};
use cloud48_plugin_host::types::TypeRegistry;

/// Where this build put the test plugins (the integration tests install them): the hostile
/// plugins, then the same claiming a WIT version the host does not support, a newer version
/// with a new parameter (with a default), and the variants below.
#[doc(hidden)]
pub const TEST_PLUGINS: &str = env!("CLOUD48_TEST_PLUGINS");
#[doc(hidden)]
pub const TEST_PLUGINS_FUTURE: &str = env!("CLOUD48_TEST_PLUGINS_FUTURE");
#[doc(hidden)]
pub const TEST_PLUGINS_NEWER: &str = env!("CLOUD48_TEST_PLUGINS_NEWER");
/// The hostile plugin as 0.1.2 with a new required parameter.
#[doc(hidden)]
pub const TEST_PLUGINS_REQUIRED: &str = env!("CLOUD48_TEST_PLUGINS_REQUIRED");
/// The hostile plugin whose `initial-state` traps.
#[doc(hidden)]
pub const TEST_PLUGINS_INITIAL_TRAP: &str = env!("CLOUD48_TEST_PLUGINS_INITIAL_TRAP");
/// The hostile plugin whose `initial-state` returns 2 MiB.
#[doc(hidden)]
pub const TEST_PLUGINS_INITIAL_HUGE: &str = env!("CLOUD48_TEST_PLUGINS_INITIAL_HUGE");

/// The reference plugins built from `plugins/` and embedded in the binary.
pub const BUNDLED: &[(&str, &[u8])] = &[
    (
        "tomcat",
        include_bytes!(concat!(env!("OUT_DIR"), "/tomcat.wasm")),
    ),
    (
        "balancer",
        include_bytes!(concat!(env!("OUT_DIR"), "/balancer.wasm")),
    ),
    (
        "mysql",
        include_bytes!(concat!(env!("OUT_DIR"), "/mysql.wasm")),
    ),
    (
        "redis",
        include_bytes!(concat!(env!("OUT_DIR"), "/redis.wasm")),
    ),
];

/// An installed plugin version as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PluginInfo {
    /// Type id of its containers: `name@version`.
    pub type_id: String,
    /// What the plugin says about itself.
    #[serde(flatten)]
    pub meta: PluginMeta,
    /// SHA-256 of the component.
    pub sha256: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// Live containers of this version.
    pub containers: u64,
    /// Install time, milliseconds since the Unix epoch.
    pub installed_at: i64,
}

/// Manages the installed plugins of a core.
pub struct PluginManager<'a> {
    db: &'a DatabaseConnection,
    host: &'a Arc<PluginHost>,
    types: &'a TypeRegistry,
}

fn invalid(m: impl Into<String>) -> CoreError {
    CoreError::invalid("component", m)
}

impl<'a> PluginManager<'a> {
    /// A manager over the core's database, plugin host and type registry.
    pub fn new(
        db: &'a DatabaseConnection,
        host: &'a Arc<PluginHost>,
        types: &'a TypeRegistry,
    ) -> Self {
        PluginManager { db, host, types }
    }

    /// Loads every installed plugin into the registry (at start).
    pub async fn load_all(&self) -> Result<(), CoreError> {
        for row in plugin::Entity::find().all(self.db).await? {
            match self.host.load(&row.wasm) {
                Ok(p) => self.types.register(Arc::new(p)),
                Err(e) => {
                    tracing::error!(plugin = %row.name, version = %row.version, error = %e, "cannot load an installed plugin; its containers cannot run hooks")
                }
            }
        }
        Ok(())
    }

    /// Installs a component; refuses an invalid one, an incompatible WIT version or a version
    /// that is already installed, and a second version of a plugin (that is an upgrade).
    ///
    /// The check and the insert are one transaction that other installs wait for (PostgreSQL:
    /// an advisory lock across cores; SQLite: the insert comes first and takes the database's
    /// write lock), so two installs of a plugin not yet installed, in different versions, leave
    /// one installed and refuse the other.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: the component was loaded before it"
    )]
    pub async fn install(&self, wasm: &[u8]) -> Result<PluginInfo, CoreError> {
        let loaded = self.host.load(wasm).map_err(|e| invalid(e.to_string()))?;
        let meta = loaded.meta().clone();
        check_description(&meta)?;
        let sha = hex::encode(sha2::Sha256::digest(wasm));
        // Most refusals are found without writing the component.
        if let Some(refusal) = refusal(&meta, &sha, &self.rows(&meta.name).await?) {
            return Err(refusal);
        }
        let txn = self.db.begin().await?;
        if self.db.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            let wait = std::time::Duration::from_secs(10);
            crate::cluster::xact_lock(&txn, INSTALL_LOCK, wait, |waited| {
                format!("waited {waited} for another plugin install to finish; try again")
            })
            .await?;
        }
        let row = match Self::insert_row(&txn, wasm, &meta).await {
            Ok(row) => row,
            // The same version went in meanwhile: say so as the check above would have.
            Err(e)
                if matches!(
                    e.sql_err(),
                    Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
                ) =>
            {
                drop(txn);
                let rows = self.rows(&meta.name).await?;
                return Err(refusal(&meta, &sha, &rows).unwrap_or_else(|| {
                    CoreError::Conflict(format!(
                        "plugin {}@{} was being installed or removed meanwhile; try again",
                        meta.name, meta.version
                    ))
                }));
            }
            Err(e) => return Err(e.into()),
        };
        let others: Vec<plugin::Model> = plugin::Entity::find()
            .filter(plugin::Column::Name.eq(&meta.name))
            .filter(plugin::Column::Id.ne(row.id))
            .order_by_desc(plugin::Column::Id)
            .all(&txn)
            .await?;
        if let Some(refusal) = refusal(&meta, &sha, &others) {
            txn.rollback().await?;
            return Err(refusal);
        }
        txn.commit().await?;
        self.types.register(Arc::new(loaded));
        self.info(row).await
    }

    /// Writes the row of an installed plugin version.
    pub(crate) async fn insert_row<C: sea_orm::ConnectionTrait>(
        conn: &C,
        wasm: &[u8],
        meta: &PluginMeta,
    ) -> Result<plugin::Model, sea_orm::DbErr> {
        plugin::ActiveModel {
            name: Set(meta.name.clone()),
            version: Set(meta.version.clone()),
            wit_version: Set(meta.wit_version.clone()),
            priority: Set(meta.priority),
            description: Set(meta.description.clone()),
            requirements: Set(serde_json::to_string(&meta.requirements).expect("serializable")),
            sha256: Set(hex::encode(sha2::Sha256::digest(wasm))),
            wasm: Set(wasm.to_vec()),
            installed_at: Set(now_ms()),
            ..Default::default()
        }
        .insert(conn)
        .await
    }

    async fn rows(&self, name: &str) -> Result<Vec<plugin::Model>, CoreError> {
        Ok(plugin::Entity::find()
            .filter(plugin::Column::Name.eq(name))
            .order_by_desc(plugin::Column::Id)
            .all(self.db)
            .await?)
    }

    async fn live_containers(&self, type_id: &str) -> Result<Vec<container::Model>, CoreError> {
        Ok(container::Entity::find()
            .filter(container::Column::TypeId.eq(type_id))
            .filter(container::Column::Status.is_not_in([
                ContainerStatus::Destroyed.as_str(),
                ContainerStatus::Failed.as_str(),
            ]))
            .all(self.db)
            .await?)
    }

    async fn info(&self, row: plugin::Model) -> Result<PluginInfo, CoreError> {
        let type_id = format!("{}@{}", row.name, row.version);
        let ty = self.types.get(&type_id);
        let containers = self.live_containers(&type_id).await?.len() as u64;
        Ok(PluginInfo {
            type_id,
            meta: PluginMeta {
                name: row.name,
                version: row.version,
                wit_version: row.wit_version,
                priority: row.priority,
                description: row.description,
                requirements: serde_json::from_str(&row.requirements).unwrap_or_default(),
                workload: ty.as_ref().map(|t| t.workload()).unwrap_or_default(),
                params: ty.as_ref().map(|t| t.param_specs()).unwrap_or_default(),
            },
            sha256: row.sha256,
            size: row.wasm.len(),
            containers,
            installed_at: row.installed_at,
        })
    }

    /// Every installed plugin version, by name.
    pub async fn list(&self) -> Result<Vec<PluginInfo>, CoreError> {
        let rows = plugin::Entity::find()
            .order_by_asc(plugin::Column::Name)
            .all(self.db)
            .await?;
        let mut out = Vec::new();
        for r in rows {
            out.push(self.info(r).await?);
        }
        Ok(out)
    }

    /// One plugin by name (newest version) or `name@version`.
    pub async fn show(&self, key: &str) -> Result<PluginInfo, CoreError> {
        let (name, version) = key
            .split_once('@')
            .map_or((key, None), |(n, v)| (n, Some(v)));
        let rows = self.rows(name).await?;
        let row = rows
            .into_iter()
            .find(|r| version.is_none_or(|v| v == r.version))
            .ok_or_else(|| {
                CoreError::NotFound(format!(
                    "plugin '{key}' is not installed (see `cloud48 plugin list`)"
                ))
            })?;
        self.info(row).await
    }

    /// Removes a plugin (all its versions); refuses while containers use it.
    pub async fn remove(&self, name: &str) -> Result<(), CoreError> {
        // `name@version`, as `plugin show` takes it: the version installed.
        let (name, version) = match name.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (name, None),
        };
        let rows = self.rows(name).await?;
        if rows.is_empty() {
            let builtin = self.types.get(name).is_some();
            return Err(CoreError::NotFound(if builtin {
                format!("'{name}' is a built-in type, not a plugin: it cannot be removed")
            } else {
                format!("plugin '{name}' is not installed")
            }));
        }
        if let Some(v) = version
            && !rows.iter().any(|r| r.version == v)
        {
            return Err(CoreError::NotFound(format!(
                "plugin {name} is installed in version {}, not {v}",
                rows[0].version
            )));
        }
        // Containers made before types were recorded with their version carry the bare name.
        let versions = rows.iter().map(|r| format!("{}@{}", r.name, r.version));
        for type_id in versions.chain([name.to_string()]) {
            let n = self.live_containers(&type_id).await?.len();
            if n > 0 {
                return Err(CoreError::Conflict(format!(
                    "{n} container(s) of type {type_id} exist; destroy them before removing the plugin"
                )));
            }
        }
        plugin::Entity::delete_many()
            .filter(plugin::Column::Name.eq(name))
            .exec(self.db)
            .await?;
        for r in rows {
            self.types.unregister(&format!("{}@{}", r.name, r.version));
        }
        Ok(())
    }

    /// Converts the state of container `c` for `new` with its `migrate-state`, giving it the
    /// container's context (its environment's members and parameters); a refusal names the
    /// container.
    pub(crate) async fn migrate_one(
        &self,
        new: &WasmPlugin,
        from: &str,
        c: &container::Model,
    ) -> Result<Vec<u8>, CoreError> {
        use crate::types::{EnvironmentView, HookContext};
        let refused = |m: String| {
            CoreError::Conflict(format!(
                "container {} ({}@{from}) cannot move to {}: {m}; nothing was changed",
                c.id,
                new.meta().name,
                new.meta().version
            ))
        };
        let env = match c.environment_id {
            Some(id) => {
                crate::entities::environment::Entity::find_by_id(id)
                    .one(self.db)
                    .await?
            }
            None => None,
        };
        let (members, env_params) = match &env {
            Some(e) => (
                crate::commands::environment_members(self.types, self.db, e.id)
                    .await
                    .map_err(|e| refused(e.to_string()))?,
                serde_json::from_str(&e.params).unwrap_or_default(),
            ),
            None => (Vec::new(), Default::default()),
        };
        let me = members
            .iter()
            .find(|m| m.id.0 == c.id)
            .cloned()
            .map_or_else(|| crate::commands::container_view(self.types, c), Ok)
            .map_err(|e| refused(e.to_string()))?;
        let environment = EnvironmentView {
            id: env.as_ref().map_or(0, |e| e.id),
            name: env.as_ref().map_or(String::new(), |e| e.name.clone()),
            members: members.into_iter().filter(|m| m.id.0 != c.id).collect(),
            params: env_params,
        };
        let ctx = HookContext {
            container: &me,
            environment: &environment,
            state: &c.state,
        };
        new.migrate_state(from, &ctx).map_err(|e| refused(e.cause))
    }

    /// Checks that `wasm` is a newer version of installed plugin `name` and queues its
    /// upgrade, a `plugin.upgrade` command that moves every container of the installed version
    /// to it (see `commands::plugin`). Any newer version may take over, a major version bump
    /// included, when its `migrate-state` accepts the state of every container; the command
    /// fails, naming the container and the reason, and changes nothing when one is refused.
    #[expect(
        clippy::disallowed_methods,
        reason = "database work only: the component was loaded before it"
    )]
    pub async fn submit_upgrade(
        &self,
        queue: &crate::queue::Queue,
        name: &str,
        wasm: &[u8],
        requested_by: &str,
    ) -> Result<crate::model::CommandId, CoreError> {
        let loaded = self.host.load(wasm).map_err(|e| invalid(e.to_string()))?;
        let meta = loaded.meta().clone();
        check_description(&meta)?;
        if meta.name != name {
            let installed = !self.rows(name).await?.is_empty();
            return Err(if installed {
                invalid(format!(
                    "the component is plugin '{}', not '{name}'; upgrade it under its own name",
                    meta.name
                ))
            } else {
                CoreError::NotFound(format!(
                    "plugin '{name}' is not installed (and the component is plugin '{}', which \
                     `cloud48 plugin install` or `cloud48 plugin upgrade {}` takes)",
                    meta.name, meta.name
                ))
            });
        }
        let old = self
            .rows(&meta.name)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                CoreError::NotFound(format!(
                    "plugin {} is not installed; use `cloud48 plugin install`",
                    meta.name
                ))
            })?;
        let from = semver::Version::parse(&old.version).map_err(|e| invalid(e.to_string()))?;
        let to = semver::Version::parse(&meta.version).map_err(|e| invalid(e.to_string()))?;
        if to == from {
            return Err(CoreError::Conflict(format!(
                "{}@{} is the version installed: an upgrade needs a higher version; give the \
                 new build one (its metadata's version)",
                meta.name, meta.version
            )));
        }
        if to < from {
            return Err(CoreError::Conflict(format!(
                "{}@{} is not newer than the installed {}: {}",
                meta.name,
                meta.version,
                old.version,
                no_downgrade(&meta.name)
            )));
        }
        let sha256 = hex::encode(sha2::Sha256::digest(wasm));
        let txn = self.db.begin().await?;
        if plugin_upload::Entity::find_by_id(sha256.clone())
            .one(&txn)
            .await?
            .is_none()
        {
            plugin_upload::ActiveModel {
                sha256: Set(sha256.clone()),
                wasm: Set(wasm.to_vec()),
                created_at: Set(now_ms()),
            }
            .insert(&txn)
            .await?;
        }
        let cmd = crate::queue::NewCommand {
            project: None,
            kind: crate::model::CommandKind::PluginUpgrade,
            target: None,
            params: crate::commands::params::to_value(crate::commands::params::PluginUpgrade {
                name: meta.name.clone(),
                from: old.version.clone(),
                sha256,
            }),
            requested_by: requested_by.to_string(),
        };
        let ids = queue.enqueue_in(&txn, vec![cmd], None).await?;
        txn.commit().await?;
        queue.wake();
        Ok(crate::model::CommandId(ids[0]))
    }

    /// Installs the bundled plugins once, on the first start of a platform.
    pub async fn bootstrap(&self, platform_id: i64) -> Result<(), CoreError> {
        use crate::entities::platform;
        let p = platform::Entity::find_by_id(platform_id)
            .one(self.db)
            .await?;
        if p.as_ref().is_some_and(|p| p.plugins_bootstrapped) {
            return Ok(());
        }
        for (name, wasm) in BUNDLED {
            if !self.rows(name).await?.is_empty() {
                continue;
            }
            let loaded = self
                .host
                .load(wasm)
                .map_err(|e| CoreError::Setup(format!("bundled plugin {name}: {e}")))?;
            let meta = loaded.meta().clone();
            Self::insert_row(self.db, wasm, &meta).await?;
            self.types.register(Arc::new(loaded));
            tracing::info!(plugin = %meta.name, version = %meta.version, "installed a bundled plugin");
        }
        if let Some(p) = p {
            let mut am: platform::ActiveModel = p.into();
            am.plugins_bootstrapped = Set(true);
            am.update(self.db).await?;
        }
        Ok(())
    }
}

/// Most characters of a new plugin's description (plugins installed before keep theirs).
pub const MAX_DESCRIPTION: usize = 200;

/// Refuses a description that is not one short line: tables and listings show it whole.
fn check_description(meta: &PluginMeta) -> Result<(), CoreError> {
    let chars = meta.description.chars().count();
    let control = meta.description.contains(char::is_control);
    if chars > MAX_DESCRIPTION || control {
        return Err(invalid(format!(
            "description: one line of at most {MAX_DESCRIPTION} characters without control \
             characters (this one has {chars} characters{}); shorten it in the plugin's metadata",
            if control {
                ", control characters among them"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// How to go back to an older version of plugin `name`: upgrades only move forward.
fn no_downgrade(name: &str) -> String {
    format!(
        "upgrades only move forward (its containers' state was written by the newer version); to \
         go back, remove the plugin once no container uses it (`cloud48 plugin remove {name}`), \
         then install the older one"
    )
}

/// The key of the PostgreSQL advisory lock an install holds while it checks and inserts.
const INSTALL_LOCK: i64 = 0x0c10_0d48_1257;

/// Why plugin `meta` (component digest `sha`) cannot be installed beside the installed
/// versions `rows` of its name (newest first), if it cannot.
fn refusal(meta: &PluginMeta, sha: &str, rows: &[plugin::Model]) -> Option<CoreError> {
    if let Some(same) = rows.iter().find(|r| r.version == meta.version) {
        return Some(CoreError::Conflict(if same.sha256 == sha {
            format!(
                "plugin {}@{} is already installed: nothing to do (a newer version goes in with `cloud48 plugin upgrade {} FILE`)",
                meta.name, meta.version, meta.name
            )
        } else {
            format!(
                "plugin {}@{} is installed from another build (sha256 {}, this one {sha}): \
                 one version is one build; give the new build a higher version and \
                 upgrade to it (`cloud48 plugin upgrade {} FILE`)",
                meta.name, meta.version, same.sha256, meta.name
            )
        }));
    }
    let r = rows.first()?;
    let newer = semver::Version::parse(&meta.version)
        .ok()
        .zip(semver::Version::parse(&r.version).ok())
        .is_some_and(|(new, old)| new > old);
    Some(CoreError::Conflict(if newer {
        format!(
            "plugin {} is installed in version {}; use `cloud48 plugin upgrade {} FILE` to move to {}",
            meta.name, r.version, meta.name, meta.version
        )
    } else {
        format!(
            "plugin {} is installed in version {}, newer than {}: {}",
            meta.name,
            r.version,
            meta.version,
            no_downgrade(&meta.name)
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ContainerType;

    #[test]
    fn a_description_is_one_short_line() {
        let host = cloud48_plugin_host::PluginHost::new(None, Default::default()).unwrap();
        let mut meta = host.load(BUNDLED[0].1).unwrap().meta().clone();
        assert!(check_description(&meta).is_ok());
        meta.description = "x".repeat(MAX_DESCRIPTION + 1);
        let err = check_description(&meta).unwrap_err().to_string();
        assert!(
            err.contains("at most 200 characters") && err.contains("has 201"),
            "{err}"
        );
        meta.description = "red\u{1b}[31m".into();
        let err = check_description(&meta).unwrap_err().to_string();
        assert!(err.contains("control characters among them"), "{err}");
    }

    /// A plugin that imports no randomness gives every new container the same initial state,
    /// so its `initial-state` runs once; one that imports randomness is asked every time.
    #[test]
    fn initial_state_runs_once_only_for_deterministic_plugins() {
        let host = cloud48_plugin_host::PluginHost::new(None, Default::default()).unwrap();
        let tomcat = host.load(BUNDLED[0].1).unwrap();
        assert_eq!(tomcat.meta().name, "tomcat");
        assert!(tomcat.is_deterministic());
        let before = tomcat.instances();
        let first = tomcat.initial_state().unwrap();
        assert!(!first.is_empty(), "tomcat's initial state is its JSON");
        assert_eq!(tomcat.initial_state().unwrap(), first);
        assert_eq!(tomcat.instances() - before, 1, "asked once, then kept");

        let wasm = std::fs::read(format!("{TEST_PLUGINS}/cloud48_plugin_hostile.wasm")).unwrap();
        let hostile = host.load(&wasm).unwrap();
        assert!(!hostile.is_deterministic(), "it imports wasi:random");
        let before = hostile.instances();
        assert_eq!(hostile.initial_state().unwrap(), b"v0");
        assert_eq!(hostile.initial_state().unwrap(), b"v0");
        assert_eq!(hostile.instances() - before, 2, "asked every time");
    }
}
