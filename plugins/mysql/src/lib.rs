//! `mysql`: the environment's database (MariaDB). One per environment; tomcats pick up its
//! `mysql` endpoint and the database and user named by its parameters. The user's password is
//! the environment's secret `mysql` (`${secret:mysql}`): the core gives the same value to the
//! tomcats of the environment, and an operator reads it with `cloud48 container secret ID
//! mysql`.

use cloud48_sdk::*;

/// The mysql container type.
#[derive(Default)]
pub struct Mysql;

/// The endpoint clients connect to.
pub const ENDPOINT: &str = "mysql";

/// The password of the database user: the environment's secret `mysql`.
pub const SECRET: &str = "${secret:mysql}";

impl ContainerType for Mysql {
    fn metadata(&self) -> Metadata {
        Metadata::new("mysql", "1.0.0", 10, Resources::new(1000, 2048, 10240))
            .described("database; tomcats of its environment receive its address")
            .with_workload(
                Workload::command(["mariadbd", "--user=mysql", "--bind-address=0.0.0.0"])
                    .from_image("cloud48/mariadb", None)
                    .with_env("MARIADB_DATABASE", "${database}")
                    .with_env("MARIADB_USER", "${user}")
                    .with_env("MARIADB_PASSWORD", SECRET)
                    .with_endpoint(ENDPOINT, 3306, Protocol::Tcp)
                    .ready_when(Check::Tcp(ENDPOINT.into()))
                    .with_volume("data", "/var/lib/mysql"),
            )
            .with_param(ParamSpec::text(
                "database",
                "app",
                "name of the application database",
            ))
            .with_param(ParamSpec::text(
                "user",
                "app",
                "user the application connects as",
            ))
    }

    fn before_it_is_added(&self, ctx: &Context) -> HookResult {
        if ctx.members_of_type("mysql").count() > 0 {
            return Ok(Outcome::deny(
                "this environment already has a mysql database",
            ));
        }
        Ok(Outcome::allow())
    }

    fn before_it_is_removed(&self, ctx: &Context) -> HookResult {
        let users = ctx.members_of_type("tomcat").count();
        if users > 0 {
            return Ok(Outcome::deny(format!(
                "{users} tomcat container(s) use this database; remove them first"
            )));
        }
        Ok(Outcome::allow())
    }
}

export_container_type!(Mysql);
