//! What the command handlers and the managers use, handed to them explicitly: the database and
//! queue they commit through, the servers' drivers, placement's view of the servers, the
//! container types, the heartbeats, this platform's name (it prefixes guest ids) and the two
//! settings they read. Neither authentication, nor the plugin host, nor the background
//! services are reachable from here.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;

use crate::fleet::Fleet;
use crate::health::Health;
use crate::placement::PlacementCache;
use crate::queue::Queue;
use crate::submitter::CreateSubmitter;
use crate::types::TypeRegistry;

/// The parts commands and managers act through; cheap to clone.
#[derive(Clone)]
pub struct Services {
    db: DatabaseConnection,
    queue: Queue,
    fleet: Arc<Fleet>,
    placement: Arc<PlacementCache>,
    types: TypeRegistry,
    health: Arc<Health>,
    platform: Arc<str>,
    platform_id: i64,
    dummy_ttl: Duration,
    agent_token: Option<Arc<str>>,
    secret_key: crate::secrets::SecretKey,
    uploads: std::path::PathBuf,
    creates: CreateSubmitter,
    plugin_host: Arc<crate::plugins::PluginHost>,
}

/// The settings commands read.
pub struct Settings {
    /// This platform's name.
    pub platform: String,
    /// This platform's id.
    pub platform_id: i64,
    /// Lifetime of a capacity reservation whose command did not finish first.
    pub dummy_ttl: Duration,
    /// The token of the node agents (migrations between agents present it).
    pub agent_token: Option<String>,
    /// The key containers' secrets derive from.
    pub secret_key: crate::secrets::SecretKey,
    /// Where containers uploaded to this core wait for their import (`ID/disk`).
    pub uploads: std::path::PathBuf,
    /// The WASM host of the container types.
    pub plugin_host: Arc<crate::plugins::PluginHost>,
}

impl Services {
    /// Services over these parts (inside a tokio runtime: single creates are written by a
    /// task of their own, see `submitter`).
    pub fn new(
        db: DatabaseConnection,
        queue: Queue,
        fleet: Arc<Fleet>,
        placement: Arc<PlacementCache>,
        types: TypeRegistry,
        health: Arc<Health>,
        settings: Settings,
    ) -> Self {
        let creates = CreateSubmitter::start(db.clone(), queue.clone(), settings.platform.clone());
        Services {
            db,
            queue,
            fleet,
            placement,
            types,
            health,
            platform: settings.platform.into(),
            platform_id: settings.platform_id,
            dummy_ttl: settings.dummy_ttl,
            agent_token: settings.agent_token.map(Into::into),
            secret_key: settings.secret_key,
            uploads: settings.uploads,
            creates,
            plugin_host: settings.plugin_host,
        }
    }

    /// The WASM host of the container types.
    pub fn plugin_host(&self) -> &Arc<crate::plugins::PluginHost> {
        &self.plugin_host
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The command queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The drivers of the servers.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Placement's view of the servers.
    pub fn placement(&self) -> &PlacementCache {
        &self.placement
    }

    /// Placement's view, to keep (a step's writes update it as they commit).
    pub fn placement_shared(&self) -> Arc<PlacementCache> {
        self.placement.clone()
    }

    /// The container types.
    pub fn types(&self) -> &TypeRegistry {
        &self.types
    }

    /// Heartbeats received by this core.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// This platform's name.
    pub fn platform_name(&self) -> &str {
        &self.platform
    }

    /// This platform's id.
    pub fn platform_id(&self) -> i64 {
        self.platform_id
    }

    /// The value of secret `name` in `scope` (see `crate::secrets`).
    pub fn secret(&self, scope: crate::secrets::SecretScope, name: &str) -> String {
        self.secret_key.derive(scope, name)
    }

    /// The directory of upload `id` (a container uploaded for import: `disk` in it).
    pub fn upload(&self, id: &str) -> std::path::PathBuf {
        self.uploads.join(id)
    }

    /// Lifetime of a capacity reservation in milliseconds.
    pub fn dummy_ttl_ms(&self) -> i64 {
        self.dummy_ttl.as_millis() as i64
    }

    /// Where single container creates are written, grouped with concurrent ones.
    pub(crate) fn creates(&self) -> &CreateSubmitter {
        &self.creates
    }

    /// Single container creates written since the core started, and the transactions that
    /// wrote them (concurrent creates share one).
    pub fn creates_written(&self) -> (u64, u64) {
        self.creates.written()
    }

    /// The agents' token ("" when none is set: agents then refuse the request, saying why).
    pub fn agent_token(&self) -> &str {
        self.agent_token.as_deref().unwrap_or_default()
    }
}
