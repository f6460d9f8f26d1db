//! `cloud48 env ...`: its subcommands and what each asks the core.

use super::*;

/// `env` subcommands.
#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// Create an empty environment.
    Create {
        /// Name: 1-63 of a-z, 0-9, '-'.
        name: String,
        /// A parameter of the environment, NAME=VALUE, that its members' container types may
        /// read (repeat for several).
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Project (name or id) it and its members belong to; default: `default`.
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Add a new container of a type to an environment.
    Add {
        /// Environment name or id.
        env: String,
        #[command(flatten)]
        new: NewContainerArgs,
        /// A parameter of the new container, NAME=VALUE (repeat for several; `plugin show TYPE`
        /// lists them and their defaults).
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Remove (and destroy) a member.
    Remove {
        /// Environment name or id.
        env: String,
        /// Container id.
        container: i64,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Start every member (ascending priority).
    Start {
        /// Environment name or id.
        env: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Stop every member (descending priority).
    Stop {
        /// Environment name or id.
        env: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Suspend every member (descending priority).
    Suspend {
        /// Environment name or id.
        env: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Resume every member (ascending priority).
    Resume {
        /// Environment name or id.
        env: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Destroy every member, then the environment.
    Destroy {
        /// Environment name or id.
        env: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Clone an environment: every member is copied (state and disk) onto servers placement
    /// chooses, and the add hooks re-run so that the copy is wired to itself.
    Clone {
        /// Source environment name or id.
        source: String,
        /// Name of the copy.
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// List environments.
    List {
        /// Include destroyed ones.
        #[arg(long)]
        all: bool,
        /// Only in this project (name or id).
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show an environment and its members.
    Show {
        /// Environment name or id.
        env: String,
    },
}

pub(super) async fn env(client: &Client, out: Out, cmd: EnvCmd) -> Result<()> {
    match cmd {
        EnvCmd::Create {
            name,
            params,
            project,
            wait,
        } => {
            let params: std::collections::BTreeMap<String, String> = params.into_iter().collect();
            let a = client
                .submit(
                    "/v1/environments",
                    Some(&json!({ "name": name, "params": params, "project": project })),
                )
                .await?;
            out.accepted(client, a, wait, &format!("creating environment {name}"))
                .await
        }
        EnvCmd::Add {
            env,
            new,
            params,
            wait,
        } => {
            let req = AddContainer {
                type_id: new.type_id.clone(),
                requirements: new.requirements(client).await?,
                server: new.on.clone(),
                params: params.into_iter().collect(),
            };
            let a = client
                .submit(
                    &format!("/v1/environments/{}/containers", enc(&env)),
                    Some(&req),
                )
                .await?;
            out.accepted(
                client,
                a,
                wait,
                &format!("adding a {} container to {env}", new.type_id),
            )
            .await
        }
        EnvCmd::Remove {
            env,
            container,
            wait,
        } => {
            let a = client
                .submit::<()>(
                    &format!("/v1/environments/{}/containers/{container}", enc(&env)),
                    None,
                )
                .await?;
            out.accepted(
                client,
                a,
                wait,
                &format!("removing container {container} from {env}"),
            )
            .await
        }
        EnvCmd::Start { env, wait } => env_op(client, out, "start", &env, wait).await,
        EnvCmd::Stop { env, wait } => env_op(client, out, "stop", &env, wait).await,
        EnvCmd::Suspend { env, wait } => env_op(client, out, "suspend", &env, wait).await,
        EnvCmd::Resume { env, wait } => env_op(client, out, "resume", &env, wait).await,
        EnvCmd::Destroy { env, wait } => env_op(client, out, "destroy", &env, wait).await,
        EnvCmd::List { all, project, page } => {
            let only = project.map_or_else(String::new, |p| format!("&project={}", enc(&p)));
            let path = format!("/v1/environments?all={all}{only}");
            out.list::<Environment>(client, &path, page, output::environments)
                .await
        }
        EnvCmd::Clone { source, name, wait } => {
            let a = client
                .submit(
                    &format!("/v1/environments/{}/clone", enc(&source)),
                    Some(&json!({ "name": name })),
                )
                .await?;
            out.accepted(
                client,
                a,
                wait,
                &format!("cloning environment {source} into {name}"),
            )
            .await
        }
        EnvCmd::Show { env } => {
            let e: Environment = client
                .get(&format!("/v1/environments/{}", enc(&env)))
                .await?;
            out.show(&e, || output::environment(&e));
            Ok(())
        }
    }
}
