//! `mysql`: the environment's database. One per environment; tomcats pick up its address.

use cloud48_sdk::*;

/// The mysql container type.
#[derive(Default)]
pub struct Mysql;

impl ContainerType for Mysql {
    fn metadata(&self) -> Metadata {
        Metadata::new("mysql", "0.1.0", 10, Resources::new(1000, 2048, 10240))
            .described("database; tomcats of its environment receive its address")
    }

    fn before_it_is_added(&self, ctx: &Context) -> Outcome {
        if ctx.members_of_type("mysql").count() > 0 {
            return Outcome::deny("this environment already has a mysql database");
        }
        Outcome::allow()
    }

    fn before_it_is_removed(&self, ctx: &Context) -> Outcome {
        let users = ctx.members_of_type("tomcat").count();
        if users > 0 {
            return Outcome::deny(format!(
                "{users} tomcat container(s) use this database; remove them first"
            ));
        }
        Outcome::allow()
    }
}

export_container_type!(Mysql);
