//! `cloud48 project`: projects, their quotas and who has a role in them.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::Out;
use super::client::Client;
use cloud48_engine::model::{Project, Quota};

/// `project` subcommands.
#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    /// Create a project (admins).
    Create {
        /// Name: 1-63 of a-z, 0-9, '-' (not only digits).
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// List the projects you may read, with what they use and allow.
    List,
    /// Show a project: quota, usage and members.
    Show {
        /// Project name or id.
        project: String,
    },
    /// Change a project's quota (admins); figures not named stay as they are.
    Quota {
        /// Project name or id.
        project: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Give a user a role in a project (admins): viewer reads it, operator also acts in it.
    Grant {
        /// Project name or id.
        project: String,
        /// User name (`cloud48 user add NAME --role member` makes a user with no rights of
        /// its own).
        #[arg(value_name = "USER")]
        member: String,
        /// viewer or operator.
        role: String,
    },
    /// Take a user's role in a project away (admins).
    Revoke {
        /// Project name or id.
        project: String,
        /// User name.
        #[arg(value_name = "USER")]
        member: String,
    },
    /// Remove an empty project (admins).
    Rm {
        /// Project name or id.
        project: String,
    },
}

/// A quota's figures on the command line: a number, or `none` for unlimited.
#[derive(Debug, Args, Default)]
pub struct QuotaArgs {
    /// Most containers (not destroyed or failed), or `none`.
    #[arg(long, value_name = "N|none", allow_negative_numbers = true, value_parser = limit)]
    containers: Option<Limit>,
    /// Most CPU in thousandths of a core, or `none`.
    #[arg(long, value_name = "N|none", allow_negative_numbers = true, value_parser = limit)]
    cpu_millis: Option<Limit>,
    /// Most memory in MiB, or `none`.
    #[arg(long, value_name = "N|none", allow_negative_numbers = true, value_parser = limit)]
    memory_mb: Option<Limit>,
    /// Most disk in MiB, or `none`.
    #[arg(long, value_name = "N|none", allow_negative_numbers = true, value_parser = limit)]
    disk_mb: Option<Limit>,
}

/// One figure of a quota as given: a number, or none (unlimited).
#[derive(Debug, Clone, Copy)]
struct Limit(Option<u64>);

fn limit(text: &str) -> Result<Limit, String> {
    if text == "none" {
        return Ok(Limit(None));
    }
    match text.parse::<i128>() {
        Ok(n) if (0..=i128::from(u64::MAX)).contains(&n) => Ok(Limit(Some(n as u64))),
        Ok(_) => Err(format!(
            "'{text}' is below zero: give 0 or more (or `none` for unlimited)"
        )),
        Err(_) => Err(format!(
            "'{text}' is not a whole number (or `none` for unlimited)"
        )),
    }
}

impl QuotaArgs {
    fn any(&self) -> bool {
        self.containers.is_some()
            || self.cpu_millis.is_some()
            || self.memory_mb.is_some()
            || self.disk_mb.is_some()
    }

    /// `base` with the figures named here replaced.
    fn over(&self, base: Quota) -> Quota {
        Quota {
            containers: self.containers.map_or(base.containers, |l| l.0),
            cpu_millis: self.cpu_millis.map_or(base.cpu_millis, |l| l.0),
            memory_mb: self.memory_mb.map_or(base.memory_mb, |l| l.0),
            disk_mb: self.disk_mb.map_or(base.disk_mb, |l| l.0),
        }
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Runs a `project` subcommand.
pub async fn project(client: &Client, out: Out, cmd: ProjectCmd) -> Result<()> {
    let one = |p: Project| -> Result<()> {
        out.show(&p, || detail(&p));
        Ok(())
    };
    match cmd {
        ProjectCmd::Create { name, quota } => {
            let quota = quota.over(Quota::default());
            one(client
                .post("/v1/projects", &json!({ "name": name, "quota": quota }))
                .await?)
        }
        ProjectCmd::List => {
            let list: Vec<Project> = client.get("/v1/projects").await?;
            out.show(&list, || table(&list));
            Ok(())
        }
        ProjectCmd::Show { project } => one(client
            .get(&format!("/v1/projects/{}", enc(&project)))
            .await?),
        ProjectCmd::Quota { project, quota } => {
            if !quota.any() {
                bail!("name at least one of --containers, --cpu-millis, --memory-mb, --disk-mb");
            }
            let path = format!("/v1/projects/{}", enc(&project));
            let current: Project = client.get(&path).await?;
            let quota = quota.over(current.quota);
            one(client.put(&format!("{path}/quota"), &quota).await?)
        }
        ProjectCmd::Grant {
            project,
            member,
            role,
        } => {
            let path = format!("/v1/projects/{}/members/{}", enc(&project), enc(&member));
            one(client.put(&path, &json!({ "role": role })).await?)
        }
        ProjectCmd::Revoke { project, member } => {
            let path = format!("/v1/projects/{}/members/{}", enc(&project), enc(&member));
            one(client.delete(&path).await?)
        }
        ProjectCmd::Rm { project } => {
            client
                .delete_empty(&format!("/v1/projects/{}", enc(&project)))
                .await?;
            if !out.json {
                println!("project {project} removed");
            }
            Ok(())
        }
    }
}

/// `used / allowed` of one figure.
fn of(used: u64, limit: Option<u64>) -> String {
    match limit {
        Some(l) => format!("{used} / {l}"),
        None => used.to_string(),
    }
}

fn table(list: &[Project]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec![
            "ID",
            "NAME",
            "CONTAINERS",
            "CPU (m)",
            "MEMORY (MiB)",
            "DISK (MiB)",
            "MEMBERS",
        ]);
    for p in list {
        let (u, q) = (&p.usage, &p.quota);
        t.add_row(vec![
            p.id.to_string(),
            p.name.clone(),
            of(u.containers, q.containers),
            of(u.resources.cpu_millis, q.cpu_millis),
            of(u.resources.memory_mb, q.memory_mb),
            of(u.resources.disk_mb, q.disk_mb),
            p.members.len().to_string(),
        ]);
    }
    t.to_string()
}

fn detail(p: &Project) -> String {
    let mut text = table(std::slice::from_ref(p));
    if p.members.is_empty() {
        text.push_str("\nno members (global admins, operators and viewers act in every project)");
    }
    for m in &p.members {
        text.push_str(&format!("\n{}: {}", m.user, m.role));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_figure_is_a_whole_number_of_0_or_more_or_none() {
        assert_eq!(limit("5").unwrap().0, Some(5));
        assert_eq!(limit("none").unwrap().0, None);
        assert!(limit("-5").unwrap_err().contains("below zero"));
        assert!(limit("lots").unwrap_err().contains("not a whole number"));
    }
}
