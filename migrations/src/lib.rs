//! Database schema of Cloud48, as sea-orm migrations.
//!
//! The same migrations run on SQLite (the embedded default) and PostgreSQL.
//! Invariant: a released migration is never edited; schema changes add a new one.

pub use sea_orm_migration;
use sea_orm_migration::prelude::*;

mod event_triggers;
mod m0001_initial;
mod m0002_users;
mod m0003_plugins;
mod m0004_command_targets;
mod m0005_placement;
mod m0006_container_locks;
mod m0007_dummy_commands;
mod m0008_container_ips;
mod m0009_pending_scripts;
mod m0010_params;
mod m0011_plugin_uploads;
mod m0012_command_logs;
mod m0013_events;
mod m0014_audit;
mod m0015_server_subnets;
mod m0016_projects;
mod m0017_cluster;
mod m0018_illegal_index;
mod m0019_server_addresses;
mod m0020_platform_secret;
mod m0021_postgres_writes;
mod m0022_events_planned_once;
mod m0023_work_notify_names_core;
mod m0024_room_for_updates;
mod m0025_what_and_why;
mod m0026_event_reasons;
mod m0027_agent_identity;
mod m0028_down_index;
mod m0029_owed_notices;
mod m0030_address_slots;
mod m0031_core_instances;

/// All migrations of Cloud48, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_users::Migration),
            Box::new(m0003_plugins::Migration),
            Box::new(m0004_command_targets::Migration),
            Box::new(m0005_placement::Migration),
            Box::new(m0006_container_locks::Migration),
            Box::new(m0007_dummy_commands::Migration),
            Box::new(m0008_container_ips::Migration),
            Box::new(m0009_pending_scripts::Migration),
            Box::new(m0010_params::Migration),
            Box::new(m0011_plugin_uploads::Migration),
            Box::new(m0012_command_logs::Migration),
            Box::new(m0013_events::Migration),
            Box::new(m0014_audit::Migration),
            Box::new(m0015_server_subnets::Migration),
            Box::new(m0016_projects::Migration),
            Box::new(m0017_cluster::Migration),
            Box::new(m0018_illegal_index::Migration),
            Box::new(m0019_server_addresses::Migration),
            Box::new(m0020_platform_secret::Migration),
            Box::new(m0021_postgres_writes::Migration),
            Box::new(m0022_events_planned_once::Migration),
            Box::new(m0023_work_notify_names_core::Migration),
            Box::new(m0024_room_for_updates::Migration),
            Box::new(m0025_what_and_why::Migration),
            Box::new(m0026_event_reasons::Migration),
            Box::new(m0027_agent_identity::Migration),
            Box::new(m0028_down_index::Migration),
            Box::new(m0029_owed_notices::Migration),
            Box::new(m0030_address_slots::Migration),
            Box::new(m0031_core_instances::Migration),
        ]
    }
}
