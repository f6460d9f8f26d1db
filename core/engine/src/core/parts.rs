//! The parts of a running core, as its API, command line and tests reach them.

use super::*;

impl Core {
    /// Placement's view of the servers.
    pub fn placement(&self) -> &crate::placement::PlacementCache {
        self.services().placement()
    }

    /// The configuration the core runs with.
    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    /// A new upload: its id and its directory, made (`container import` of an archive).
    pub fn new_upload(&self) -> Result<(String, PathBuf), CoreError> {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let dir = self.services().upload(&id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| CoreError::Setup(format!("cannot create {}: {e}", dir.display())))?;
        Ok((id, dir))
    }

    /// The disk of upload `id`, if `id` is an upload id (32 hex digits) and it is here.
    pub fn upload_disk(&self, id: &str) -> Option<PathBuf> {
        let valid = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let disk = self.services().upload(id).join(crate::export_archive::DISK);
        (valid && disk.is_file()).then_some(disk)
    }

    /// The image store.
    pub fn images(&self) -> &Arc<cloud48_image::Store> {
        &self.inner.images
    }

    /// Installed plugins.
    pub fn plugins(&self) -> crate::plugins::PluginManager<'_> {
        crate::plugins::PluginManager::new(self.db(), &self.inner.plugin_host, self.types())
    }

    /// Access control.
    pub fn auth(&self) -> &crate::auth::Authenticator {
        &self.inner.auth
    }

    /// The command queue.
    pub fn queue(&self) -> &Queue {
        self.services().queue()
    }

    /// The database connection.
    pub fn db(&self) -> &DatabaseConnection {
        self.services().db()
    }

    /// The drivers of the servers.
    pub fn fleet(&self) -> &Fleet {
        self.services().fleet()
    }

    /// The container types.
    pub fn types(&self) -> &TypeRegistry {
        self.services().types()
    }

    /// Heartbeats received by this core.
    pub fn health(&self) -> &Health {
        self.services().health()
    }

    /// The health monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.inner.monitor
    }

    /// The collector.
    pub fn collector(&self) -> &Collector {
        &self.inner.collector
    }

    /// The rebalancer.
    pub fn rebalancer(&self) -> &Rebalancer {
        &self.inner.rebalancer
    }

    /// The connection for long reads that must not hold up the core's work.
    pub fn reader(&self) -> &DatabaseConnection {
        &self.inner.reader
    }

    /// The event stream.
    pub fn events(&self) -> &crate::events::Events {
        &self.inner.events
    }

    /// The registry of node agents.
    pub fn agents(&self) -> &Agents {
        &self.inner.agents
    }

    /// This core's view of the cluster of cores (duties, shared heartbeats).
    pub fn cluster(&self) -> &crate::cluster::Cluster {
        &self.inner.cluster
    }

    /// The local platform.
    pub fn platform_name(&self) -> &str {
        &self.inner.platform.name
    }

    /// What commands and managers act through.
    pub fn services(&self) -> &Services {
        &self.inner.services
    }

    /// The ContainerManager.
    pub fn containers(&self) -> ContainerManager<'_> {
        ContainerManager::new(self.services())
    }

    /// The EnvironmentManager.
    pub fn environments(&self) -> EnvironmentManager<'_> {
        EnvironmentManager::new(self.services())
    }

    /// Projects and their grants.
    pub fn projects(&self) -> crate::projects::ProjectManager<'_> {
        crate::projects::ProjectManager::new(self.services(), &self.inner.auth)
    }

    /// Servers.
    pub fn servers(&self) -> ServerManager<'_> {
        ServerManager::new(self.services())
    }
}
