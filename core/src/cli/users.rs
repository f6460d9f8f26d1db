//! `cloud48 user ...`: users in the core's own database, changed on the core's machine
//! (each change recorded in the audit trail as the operating-system user who made it).

use super::*;

/// `user` subcommands: they act on the database named by the configuration.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user; the password comes from CLOUD48_NEW_PASSWORD or a prompt.
    Add {
        /// User name.
        name: String,
        /// admin, operator or viewer (each over every project), or member (only the roles
        /// `cloud48 project grant` gives it).
        #[arg(long)]
        role: String,
        #[command(flatten)]
        core: DatabaseArgs,
    },
    /// List users.
    List {
        #[command(flatten)]
        core: DatabaseArgs,
    },
    /// Remove a user.
    Remove {
        /// User name.
        name: String,
        #[command(flatten)]
        core: DatabaseArgs,
    },
    /// Change a user's password (from CLOUD48_NEW_PASSWORD or a prompt).
    Passwd {
        /// User name.
        name: String,
        #[command(flatten)]
        core: DatabaseArgs,
    },
}

/// Records a change made with the command line on the core's machine in the audit trail, as
/// the operating-system user who ran it.
async fn local_audit<T, E: std::fmt::Display>(
    db: &sea_orm::DatabaseConnection,
    what: String,
    outcome: &std::result::Result<T, E>,
) -> Result<()> {
    let who = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        // SAFETY: getuid has no preconditions.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }));
    let entry = cloud48_engine::model::AuditEntry {
        id: 0,
        at: 0,
        who: format!("{who} (local)"),
        address: None,
        action: "cli".into(),
        object: what,
        status: 0,
        command_id: None,
        message: outcome.as_ref().err().map(ToString::to_string),
        request: None,
    };
    cloud48_engine::audit::record(db, &entry)
        .await
        .context("the change was made, but recording it in the audit trail failed")
}

fn new_password(name: &str) -> Result<String> {
    if let Ok(p) = std::env::var("CLOUD48_NEW_PASSWORD") {
        return Ok(p);
    }
    let first = rpassword::prompt_password(format!("new password for {name}: "))
        .context("no password: set CLOUD48_NEW_PASSWORD or run in a terminal to be prompted")?;
    let second = rpassword::prompt_password("repeat it: ")?;
    if first != second {
        bail!("the two passwords differ");
    }
    Ok(first)
}

pub(super) async fn users(out: Out, cmd: UserCmd) -> Result<()> {
    let core_args = match &cmd {
        UserCmd::Add { core, .. }
        | UserCmd::List { core }
        | UserCmd::Remove { core, .. }
        | UserCmd::Passwd { core, .. } => core.clone(),
    };
    let settings = core_args.settings()?;
    let config = settings.core();
    let sqlite = config.data_dir.join("cloud48.db");
    if config.database_url.is_none() && !sqlite.exists() {
        let hint = "run this in the directory where `cloud48 serve` runs, or give its --data-dir or --database-url (user commands work on the core's database, not through --server); to add users before a core's first start, name its new data directory with --data-dir";
        // A new database only where one was asked for: not in whatever directory this runs.
        let named = settings.entries().any(|(key, e)| {
            key == "server.data_dir" && e.source != cloud48_engine::config::Source::Default
        });
        if matches!(cmd, UserCmd::Add { .. }) && named {
            eprintln!(
                "note: there is no core database at {} yet; creating it ({hint})",
                sqlite.display()
            );
        } else {
            bail!("there is no core database at {}: {hint}", sqlite.display());
        }
    }
    let db = cloud48_engine::core::connect(&config).await?;
    let store = cloud48_engine::auth::UserStore::new(&db, &config.auth.realm);
    match cmd {
        UserCmd::Add { name, role, .. } => {
            let role: cloud48_engine::auth::Role = role.parse().map_err(anyhow::Error::msg)?;
            cloud48_engine::auth::validate_user_name(&name).map_err(anyhow::Error::msg)?;
            let password = new_password(&name)?;
            let done = store.add(&name, role, &password).await;
            local_audit(&db, format!("user add {name} {role}"), &done).await?;
            done.map_err(anyhow::Error::msg)?;
            println!("user {name} added with role {role}");
        }
        UserCmd::Passwd { name, .. } => {
            let password = new_password(&name)?;
            let done = store.passwd(&name, &password).await;
            local_audit(&db, format!("user passwd {name}"), &done).await?;
            done.map_err(anyhow::Error::msg)?;
            println!("password of {name} changed");
        }
        UserCmd::Remove { name, .. } => {
            let done = store.remove(&name).await;
            local_audit(&db, format!("user remove {name}"), &done).await?;
            done.map_err(anyhow::Error::msg)?;
            println!("user {name} removed");
        }
        UserCmd::List { .. } => {
            let list = store.list().await.map_err(anyhow::Error::msg)?;
            out.show(&list, || {
                let mut t = comfy_table::Table::new();
                t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
                    .set_header(vec!["NAME", "ROLE"]);
                for u in &list {
                    t.add_row(vec![u.name.clone(), u.role.to_string()]);
                }
                for u in &config.auth.users {
                    t.add_row(vec![u.name.clone(), format!("{} (config file)", u.role)]);
                }
                t.to_string()
            });
        }
    }
    Ok(())
}
