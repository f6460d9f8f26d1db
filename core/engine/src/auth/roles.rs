//! Roles, what anonymous callers may do, and the endpoint families access is granted by.

use super::*;

/// What a user may do; each role includes the ones below it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Nothing of its own: reads and acts only in the projects where it is granted a role.
    Member,
    /// Read everything.
    Viewer,
    /// Also operate environments, containers and commands.
    Operator,
    /// Also manage servers, plugins and users.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Member => "member",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role '{s}' (expected admin, operator, viewer or member)"
            )),
        }
    }
}

/// What anonymous requests may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Nothing.
    None,
    /// Read (the default).
    Read,
    /// Everything: for local development only.
    Full,
}

impl std::str::FromStr for Anonymous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Anonymous::None),
            "read" => Ok(Anonymous::Read),
            "full" => Ok(Anonymous::Full),
            _ => Err(format!(
                "unknown anonymous access '{s}' (expected none, read or full)"
            )),
        }
    }
}

/// A family of endpoints, for what anonymous requests may read (`auth.anonymous_read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// Servers and their load (`/v1/servers`).
    Fleet,
    /// Environments and their members (`/v1/environments`).
    Environments,
    /// Containers (`/v1/containers`, without logs and export).
    Containers,
    /// Commands, with their parameters and results (exec output among them).
    Commands,
    /// Installed plugins.
    Plugins,
    /// The core's metrics (`/metrics`).
    Metrics,
}

impl Family {
    /// Every family, by its name in the configuration.
    pub const ALL: [(&'static str, Family); 6] = [
        ("fleet", Family::Fleet),
        ("environments", Family::Environments),
        ("containers", Family::Containers),
        ("commands", Family::Commands),
        ("plugins", Family::Plugins),
        ("metrics", Family::Metrics),
    ];

    /// What anonymous requests may read by default: fleet and environment summaries.
    pub const DEFAULT_ANONYMOUS: [Family; 2] = [Family::Fleet, Family::Environments];

    /// The family of a read of `path`; `None` for what anonymous requests never read: exports,
    /// secrets and logs (the core would pull them from an agent; what runs inside may print secrets),
    /// users, anything else.
    pub fn of(path: &str) -> Option<Family> {
        let under = |area: &str| path == area || path.starts_with(&format!("{area}/"));
        if under("/v1/servers") || under("/v1/cluster") {
            Some(Family::Fleet)
        } else if under("/v1/environments") {
            Some(Family::Environments)
        } else if under("/v1/containers") {
            if path.ends_with("/logs") || path.ends_with("/export") || path.contains("/secrets/") {
                None
            } else {
                Some(Family::Containers)
            }
        } else if under("/v1/commands") {
            Some(Family::Commands)
        } else if under("/v1/plugins") {
            Some(Family::Plugins)
        } else if path == "/metrics" {
            Some(Family::Metrics)
        } else {
            None
        }
    }

    /// The families named in a comma-separated list (`fleet,environments`); empty means none.
    pub fn parse_list(text: &str) -> Result<Vec<Family>, String> {
        let mut out = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some((_, f)) = Family::ALL.iter().find(|(n, _)| *n == name) else {
                let names: Vec<_> = Family::ALL.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown endpoint family '{name}' (expected some of: {})",
                    names.join(", ")
                ));
            };
            if !out.contains(f) {
                out.push(*f);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Family::ALL
            .iter()
            .find(|(_, x)| x == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}
