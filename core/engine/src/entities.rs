//! sea-orm entities, one module per table of `migrations`.
//!
//! Invariant: only `store`-level code (queue, managers, core) touches these; the API and the
//! CLI see the types of `model`.

macro_rules! no_relations {
    () => {
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    };
}

/// Platforms: all servers governed by one core. Exactly one row is local.
pub mod platform {
    use sea_orm::entity::prelude::*;
    /// A platform row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "platforms")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub is_local: bool,
        pub created_at: i64,
        /// True once the bundled plugins were installed (first start).
        pub plugins_bootstrapped: bool,
        /// Hex of the key containers' secrets derive from (`crate::secrets`); set on the
        /// first start.
        pub secret: Option<String>,
    }
    no_relations!();
}

/// Servers (virtualization servers).
pub mod server {
    use sea_orm::entity::prelude::*;
    /// A server row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "servers")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub platform_id: i64,
        pub name: String,
        pub driver: String,
        pub address: Option<String>,
        pub status: String,
        pub cpu_millis: i64,
        pub memory_mb: i64,
        pub disk_mb: i64,
        /// JSON array of strings.
        pub labels: String,
        pub last_heartbeat: Option<i64>,
        pub created_at: i64,
        /// Sum of what its containers and dummies reserve (see `placement`).
        pub alloc_cpu_millis: i64,
        pub alloc_memory_mb: i64,
        pub alloc_disk_mb: i64,
        pub alloc_containers: i64,
        /// Placement puts nothing new on a draining server.
        pub draining: bool,
        /// The subnet its agent hands addresses from (`10.48.1.0/24`), when it said.
        pub subnet: Option<String>,
        /// The range of the subnet it hands out (`FIRST-LAST`), when it shares the network.
        pub addresses: Option<String>,
        /// The id of the agent that runs it (made in the agent's data directory), once known.
        pub agent_id: Option<String>,
        /// How many guests it can give an address (from `subnet` and `addresses`), when known:
        /// reservations never count more containers on it.
        pub address_slots: Option<i64>,
    }
    no_relations!();
}

/// Dummy containers: capacity reserved on a server for a container being created, cloned or
/// migrated there, until the real container replaces it or its deadline passes.
pub mod dummy {
    use sea_orm::entity::prelude::*;
    /// A dummy row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "dummies")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub server_id: i64,
        /// The container that will replace it.
        pub container_id: i64,
        /// The command that placed it; the dummy dies with it.
        pub command_id: Option<i64>,
        pub cpu_millis: i64,
        pub memory_mb: i64,
        pub disk_mb: i64,
        /// Milliseconds since the Unix epoch after which the collector removes it.
        pub deadline: i64,
        pub created_at: i64,
    }
    no_relations!();
}

/// Scripts waiting for their stopped or suspended container to run again.
pub mod pending_script {
    use sea_orm::entity::prelude::*;
    /// A pending script, run in id order.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "pending_scripts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub container_id: i64,
        pub script: String,
        /// JSON array of strings.
        pub args: String,
        pub created_at: i64,
    }
    no_relations!();
}

/// Environments.
pub mod environment {
    use sea_orm::entity::prelude::*;
    /// An environment row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "environments")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub status: String,
        /// Command holding the lock, if any.
        pub locked_by: Option<i64>,
        pub created_at: i64,
        pub updated_at: i64,
        /// JSON object of its parameters (strings), read by plugins.
        pub params: String,
        /// The project it belongs to.
        pub project_id: i64,
    }
    no_relations!();
}

/// Containers: type id + opaque state blob.
pub mod container {
    use sea_orm::entity::prelude::*;
    /// A container row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "containers")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub platform_id: i64,
        pub type_id: String,
        /// Opaque state blob owned by the container type.
        pub state: Vec<u8>,
        pub status: String,
        pub server_id: Option<i64>,
        pub environment_id: Option<i64>,
        pub guest_id: String,
        pub ip: Option<String>,
        /// JSON of `model::Requirements`.
        pub requirements: String,
        /// Command holding the lock, if any.
        pub locked_by: Option<i64>,
        pub created_at: i64,
        pub updated_at: i64,
        /// JSON object of its parameters (its type's schema, defaults filled in).
        pub params: String,
        /// The project it belongs to (its environment's, for a member).
        pub project_id: i64,
        /// Why it is in its status, where that does not say (why it failed).
        pub status_reason: Option<String>,
    }
    no_relations!();
}

/// Persisted commands: the queue.
pub mod command {
    use sea_orm::entity::prelude::*;
    /// A command row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
    #[sea_orm(table_name = "commands")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub kind: String,
        pub status: String,
        pub target_type: Option<String>,
        pub target_id: Option<i64>,
        pub parent_id: Option<i64>,
        /// JSON parameters.
        pub params: String,
        /// JSON progress written by each persisted step.
        pub progress: String,
        pub step: i32,
        pub result: Option<String>,
        pub error: Option<String>,
        pub waiting_on: Option<String>,
        pub attempts: i32,
        pub run_after: i64,
        pub lease_owner: Option<String>,
        pub lease_until: Option<i64>,
        pub requested_by: String,
        pub created_at: i64,
        pub started_at: Option<i64>,
        pub finished_at: Option<i64>,
        /// The project of its target (or its parent's); none for fleet-wide commands.
        #[serde(default)]
        pub project_id: Option<i64>,
    }
    no_relations!();
}

/// Projects: environments and containers belong to one; each may limit what they use.
pub mod project {
    use sea_orm::entity::prelude::*;
    /// A project row (a `None` limit: unlimited).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "projects")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub max_containers: Option<i64>,
        pub max_cpu_millis: Option<i64>,
        pub max_memory_mb: Option<i64>,
        pub max_disk_mb: Option<i64>,
        pub created_at: i64,
    }
    no_relations!();
}

/// A user's role in a project.
pub mod project_grant {
    use sea_orm::entity::prelude::*;
    /// A grant row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "project_grants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_name: String,
        pub role: String,
    }
    no_relations!();
}

/// Origin identity of containers migrated in from another platform.
pub mod origin_identity {
    use sea_orm::entity::prelude::*;
    /// An origin-identity row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "origin_identities")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub container_id: i64,
        pub origin_platform: String,
        pub origin_container_id: i64,
        pub guest_id: String,
        pub imported_at: i64,
    }
    no_relations!();
}

/// Users of the API (passwords only as HA1 hashes).
pub mod user {
    use sea_orm::entity::prelude::*;
    /// A user row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub role: String,
        pub ha1_md5: String,
        pub ha1_sha256: String,
        pub created_at: i64,
    }
    no_relations!();
}

/// Installed plugins: one row per plugin version, with its component.
pub mod plugin {
    use sea_orm::entity::prelude::*;
    /// A plugin row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugins")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub version: String,
        pub wit_version: String,
        pub priority: i32,
        pub description: String,
        /// JSON of `model::Requirements`.
        pub requirements: String,
        pub sha256: String,
        /// The WASM component.
        pub wasm: Vec<u8>,
        pub installed_at: i64,
    }
    no_relations!();
}

/// Components waiting for their `plugin.upgrade` command, by content hash.
pub mod plugin_upload {
    use sea_orm::entity::prelude::*;
    /// An uploaded component.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugin_uploads")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sha256: String,
        pub wasm: Vec<u8>,
        pub created_at: i64,
    }
    no_relations!();
}

/// Lines container-type plugins logged while a command ran their hooks.
pub mod command_log {
    use sea_orm::entity::prelude::*;
    /// A log line.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "command_logs")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub command_id: i64,
        pub container_id: Option<i64>,
        pub level: String,
        pub message: String,
        pub at: i64,
    }
    no_relations!();
}
