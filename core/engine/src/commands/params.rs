//! The typed parameters of every command, as they are stored in `commands.params`.
//!
//! Writers serialize these types (`to_value`) and steps read them back (`read`), so both sides
//! agree by construction. Every document carries its format version as `v`; a document without
//! one was written by Cloud48 0.1, whose format is version 1, so commands queued by the previous
//! release still run. A document that does not read (a wrong type, a missing field, a newer
//! version) fails its command with a message that names it; nothing is read as a default.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::driver::GuestImage;
use crate::entities::command;
use crate::model::{EnvironmentId, Requirements, Resources};

/// The version of the parameter documents this core writes and the newest it reads.
pub const VERSION: u32 = 1;

fn first_version() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// A parameter document with its format version.
#[derive(Debug, Serialize, Deserialize)]
struct Versioned<T> {
    #[serde(rename = "v", default = "first_version")]
    version: u32,
    #[serde(flatten)]
    params: T,
}

/// The JSON stored for `params`.
pub fn to_value<T: Serialize>(params: T) -> Value {
    serde_json::to_value(Versioned {
        version: VERSION,
        params,
    })
    .expect("parameters serialize")
}

/// Reads the parameters of `cmd` (already parsed as `value`) as `T`.
pub fn read<T: DeserializeOwned>(cmd: &command::Model, value: &Value) -> Result<T, String> {
    let what = |e: String| super::unreadable(cmd, "parameters", e);
    let doc = Versioned::<T>::deserialize(value).map_err(|e| what(e.to_string()))?;
    if doc.version > VERSION {
        return Err(what(format!(
            "they are version {}, this core reads up to version {VERSION}; upgrade this core",
            doc.version
        )));
    }
    Ok(doc.params)
}

/// `container.create` (also a child of `environment.add`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Create {
    /// The server the user named; placement chooses otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<i64>,
    /// A server to avoid (a replacement avoids its down original's server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avoid: Option<i64>,
    /// The container whose disk the new one copies (an environment clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<i64>,
    /// The disk to import (a container imported from another platform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<GuestImage>,
    /// Start the container once created.
    #[serde(default = "yes")]
    pub start: bool,
}

impl Create {
    /// A plain create, on `server_id` if given.
    pub fn on(server_id: Option<i64>) -> Self {
        Create {
            server_id,
            avoid: None,
            clone_of: None,
            image: None,
            start: true,
        }
    }

    /// True for a create the group executor can run with others: nothing but a server.
    pub fn is_plain(&self) -> bool {
        self.avoid.is_none() && self.clone_of.is_none() && self.image.is_none()
    }
}

/// `container.create_many`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateMany {
    /// The containers' type.
    #[serde(rename = "type")]
    pub type_id: String,
    /// How many.
    pub count: u32,
    /// The server the user named; placement chooses otherwise.
    #[serde(default)]
    pub server_id: Option<i64>,
    /// What each container needs.
    pub requirements: Requirements,
    /// Start the containers once created.
    #[serde(default = "yes")]
    pub start: bool,
}

/// `container.update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The new resources.
    pub resources: Resources,
}

/// `container.clone`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clone {
    /// The server of the copy; the source's by default.
    #[serde(default)]
    pub server_id: Option<i64>,
}

/// `container.migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migrate {
    /// The target server; placement chooses otherwise.
    #[serde(default)]
    pub to: Option<i64>,
    /// Without stopping it (a VM's memory and disk are sent while it runs).
    #[serde(default)]
    pub live: bool,
    /// Only off this server: a container no longer on it when the command runs stays where it
    /// is (a drain's and the rebalancer's moves, which a second drain or an earlier move would
    /// otherwise repeat from the server it went to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave: Option<i64>,
}

/// `container.exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    /// The script.
    pub script: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Set when a hook wants the result in its `after-exec` (the script's failure then does
    /// not fail the hook's command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `environment.add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Add {
    /// The new container's type.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Its requirements; the type's by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Requirements>,
    /// The server (name) the user named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// A server to avoid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avoid: Option<i64>,
    /// The member this one copies (an environment clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<i64>,
    /// Its parameters (the rest take the type's defaults).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub params: crate::model::Params,
}

impl Add {
    /// A new container of `type_id`, placed by placement.
    pub fn of_type(type_id: impl Into<String>) -> Self {
        Add {
            type_id: type_id.into(),
            requirements: None,
            server: None,
            avoid: None,
            clone_of: None,
            params: Default::default(),
        }
    }
}

/// `environment.remove` and `environment.replace`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The member removed or replaced.
    pub container_id: i64,
}

/// `environment.failover`, `environment.recover` and `environment.notify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notify {
    /// The members the event is about (down or back).
    #[serde(default)]
    pub containers: Vec<i64>,
    /// Why they are down.
    #[serde(default)]
    pub cause: Option<String>,
    /// What a `notify` tells (absent for `failover` and `recover`).
    #[serde(default)]
    pub hook: Option<NotifyHook>,
    /// `moved`: the address the members had before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_ip: Option<String>,
}

/// What an `environment.notify` tells every member (stored as `after-cc-start`,
/// `before-cc-stop`, `moved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyHook {
    /// The core started (`after-cc-start`).
    AfterCcStart,
    /// The core is stopping (`before-cc-stop`).
    BeforeCcStop,
    /// The members listed changed address (a migration to a server of another subnet); the
    /// others hear them leave with `previous_ip` and join with the new one.
    Moved,
}

/// `environment.create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateEnvironment {
    /// Its name.
    pub name: String,
}

/// `environment.clone`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneEnvironment {
    /// The copy.
    pub destination: EnvironmentId,
}

/// Commands without parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoParams {}

/// A stored command for unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::entities::command;

    /// Command 42 of `kind` at `step`, with no parameters.
    pub fn command(kind: &str, step: i32) -> command::Model {
        command::Model {
            id: 42,
            kind: kind.into(),
            status: "running".into(),
            target_type: None,
            target_id: None,
            parent_id: None,
            params: "{}".into(),
            progress: "{}".into(),
            step,
            result: None,
            error: None,
            waiting_on: None,
            attempts: 0,
            run_after: 0,
            lease_owner: None,
            lease_until: None,
            requested_by: "test".into(),
            created_at: 0,
            started_at: None,
            finished_at: None,
            project_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(params: &str) -> command::Model {
        command::Model {
            params: params.into(),
            ..tests_support::command("container.create", 0)
        }
    }

    fn read_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
        let c = cmd(text);
        read(&c, &serde_json::from_str(text).unwrap())
    }

    #[test]
    fn notify_hooks_read_as_the_strings_earlier_releases_stored() {
        for (text, hook) in [
            ("after-cc-start", NotifyHook::AfterCcStart),
            ("before-cc-stop", NotifyHook::BeforeCcStop),
            ("moved", NotifyHook::Moved),
        ] {
            let n: Notify = read_str(&format!(
                r#"{{"hook": "{text}", "previous_ip": "10.0.0.9"}}"#
            ))
            .unwrap();
            assert_eq!(n.hook, Some(hook));
            assert_eq!(serde_json::to_value(hook).unwrap(), text);
        }
        assert!(read_str::<Notify>(r#"{"hook": "reboot-everything"}"#).is_err());
    }

    #[test]
    fn parameters_written_by_the_previous_release_read_as_version_1() {
        let create: Create =
            read_str(r#"{"server_id": 3, "avoid": null, "clone_of": null}"#).unwrap();
        assert_eq!(create, Create::on(Some(3)));
        let many: CreateMany = read_str(
            r#"{"type": "plain", "count": 5, "server_id": null, "requirements": {"cpu_millis": 1, "memory_mb": 2, "disk_mb": 3}}"#,
        )
        .unwrap();
        assert_eq!(
            (many.count, many.start, many.requirements.resources.disk_mb),
            (5, true, 3)
        );
        let stop: NoParams = read_str("{}").unwrap();
        assert_eq!(stop, NoParams {});
    }

    #[test]
    fn what_is_written_reads_back() {
        let add = Add {
            avoid: Some(2),
            ..Add::of_type("tomcat")
        };
        let value = to_value(add.clone());
        assert_eq!(value["v"], VERSION);
        assert_eq!(value["type"], "tomcat");
        assert_eq!(read::<Add>(&cmd(""), &value).unwrap(), add);
    }

    #[test]
    fn unreadable_or_newer_parameters_are_errors_naming_the_command() {
        let e = read_str::<Update>(r#"{"resources": 12}"#).unwrap_err();
        assert!(
            e.starts_with("command 42 (container.create): unreadable parameters: "),
            "{e}"
        );
        let e = read_str::<Member>("{}").unwrap_err();
        assert!(e.contains("container_id"), "{e}");
        let e = read_str::<Create>(r#"{"v": 2}"#).unwrap_err();
        assert!(
            e.contains("version 2") && e.contains("upgrade this core"),
            "{e}"
        );
    }
}

/// `plugin.upgrade`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginUpgrade {
    /// The plugin's name.
    pub name: String,
    /// The installed version the containers move from.
    pub from: String,
    /// Content hash of the new component (kept in `plugin_uploads` until installed).
    pub sha256: String,
}
