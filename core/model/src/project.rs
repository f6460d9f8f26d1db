//! Projects: what a project may use (its quota), what it uses, and who may act in it.

use serde::{Deserialize, Serialize};

use crate::Resources;

/// The most a project's live containers may use together; a `None` figure is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Containers (every one not destroyed or failed, creating ones included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<u64>,
    /// CPU in thousandths of a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Disk in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

impl Quota {
    /// True when no figure is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == Quota::default()
    }
}

/// What a project's live containers use together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    /// Containers not destroyed or failed.
    pub containers: u64,
    /// What they reserve.
    #[serde(flatten)]
    pub resources: Resources,
}

impl Usage {
    /// The usage of `n` containers that each reserve `each`.
    pub fn of(n: u64, each: &Resources) -> Usage {
        Usage {
            containers: n,
            resources: each.times(n),
        }
    }

    /// This usage plus `other`.
    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            containers: self.containers + other.containers,
            resources: Resources {
                cpu_millis: self.resources.cpu_millis + other.resources.cpu_millis,
                memory_mb: self.resources.memory_mb + other.resources.memory_mb,
                disk_mb: self.resources.disk_mb + other.resources.disk_mb,
            },
        }
    }

    /// Why `more` does not fit in `quota` on top of this usage (`None`: it fits), naming
    /// every figure that would pass its limit with what is used and what is asked.
    pub fn refuse(&self, more: &Usage, quota: &Quota) -> Option<String> {
        let after = self.plus(more);
        let figures = [
            (
                "containers",
                quota.containers,
                self.containers,
                more.containers,
                after.containers,
            ),
            (
                "cpu_millis",
                quota.cpu_millis,
                self.resources.cpu_millis,
                more.resources.cpu_millis,
                after.resources.cpu_millis,
            ),
            (
                "memory_mb",
                quota.memory_mb,
                self.resources.memory_mb,
                more.resources.memory_mb,
                after.resources.memory_mb,
            ),
            (
                "disk_mb",
                quota.disk_mb,
                self.resources.disk_mb,
                more.resources.disk_mb,
                after.resources.disk_mb,
            ),
        ];
        let over: Vec<String> = figures
            .iter()
            .filter_map(|(name, limit, used, asked, total)| {
                let limit = (*limit)?;
                (*asked > 0 && *total > limit)
                    .then(|| format!("{name}: {used} used + {asked} asked > {limit} allowed"))
            })
            .collect();
        (!over.is_empty()).then(|| over.join(", "))
    }
}

/// A user's role in one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProjectMember {
    /// User name.
    pub user: String,
    /// `viewer` (reads the project) or `operator` (also acts in it).
    pub role: String,
}

/// A project as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Project {
    /// Identifier.
    pub id: i64,
    /// Unique name (1-63 of a-z, 0-9, '-').
    pub name: String,
    /// Its limits.
    pub quota: Quota,
    /// What its live containers use now.
    pub usage: Usage,
    /// Users with a role in it (global admins, operators and viewers act in every project).
    pub members: Vec<ProjectMember>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(n: u64, cpu: u64, mem: u64) -> Usage {
        Usage {
            containers: n,
            resources: Resources {
                cpu_millis: cpu,
                memory_mb: mem,
                disk_mb: 0,
            },
        }
    }

    #[test]
    fn a_quota_refuses_only_the_figures_a_request_would_pass() {
        let quota = Quota {
            containers: Some(3),
            memory_mb: Some(1024),
            ..Quota::default()
        };
        let used = usage(2, 5000, 512);
        // One more of 512 MiB fits exactly; cpu is unlimited.
        assert_eq!(used.refuse(&usage(1, 9000, 512), &quota), None);
        let why = used.refuse(&usage(2, 0, 1024), &quota).expect("refused");
        assert!(
            why.contains("containers: 2 used + 2 asked > 3 allowed"),
            "{why}"
        );
        assert!(
            why.contains("memory_mb: 512 used + 1024 asked > 1024 allowed"),
            "{why}"
        );
        assert!(!why.contains("cpu"), "{why}");
        // A project already over its quota (lowered after the fact) may still shrink.
        let over = usage(5, 0, 4096);
        assert_eq!(over.refuse(&usage(0, 0, 0), &quota), None);
        assert!(Quota::default().is_unlimited() && !quota.is_unlimited());
    }
}
