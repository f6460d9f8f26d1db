//! `tomcat`: an application server. The second tomcat of an environment asks for a balancer
//! first; a tomcat in an environment with a database is configured with the database's address;
//! a tomcat whose server goes down asks for a replacement on another server (0.2.0).

use cloud48_sdk::*;
use serde::{Deserialize, Serialize};

/// State of a tomcat container.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// Address of the environment's database, once configured.
    pub database: Option<String>,
}

/// The tomcat container type.
#[derive(Default)]
pub struct Tomcat;

/// Script that points the application at a database (CIS layer).
pub const CONFIGURE_DATASOURCE: &str = "# cloud48: point the application at the database\nset -e\nmkdir -p /etc/cloud48\necho \"jdbc:mysql://$1:3306/app\" > /etc/cloud48/datasource\n";

fn configure(ctx: &Context, db_ip: &str) -> Outcome {
    Outcome::allow()
        .with_action(Action::exec(
            ctx.container.id,
            CONFIGURE_DATASOURCE,
            &[db_ip],
        ))
        .with_json_state(&State {
            database: Some(db_ip.to_string()),
        })
}

impl ContainerType for Tomcat {
    fn metadata(&self) -> Metadata {
        Metadata::new("tomcat", "0.2.0", 50, Resources::new(1000, 1024, 2048))
            .described("application server; asks for a balancer when a second one joins")
    }

    fn initial_state(&self) -> Vec<u8> {
        serde_json::to_vec(&State::default()).expect("serializes")
    }

    fn before_it_is_added(&self, ctx: &Context) -> Outcome {
        let tomcats = ctx.members_of_type("tomcat").count();
        let balancers = ctx.members_of_type("balancer").count();
        if tomcats >= 1 && balancers == 0 {
            return Outcome::allow().with_action(Action::add("balancer"));
        }
        Outcome::allow()
    }

    fn after_it_is_added(&self, ctx: &Context) -> Outcome {
        match ctx.members_of_type("mysql").find_map(|m| m.ip.clone()) {
            Some(ip) => configure(ctx, &ip),
            None => Outcome::allow(),
        }
    }

    fn after_other_is_added(&self, ctx: &Context, other: &Member) -> Outcome {
        match (type_name(&other.type_id), &other.ip) {
            ("mysql", Some(ip)) => configure(ctx, ip),
            _ => Outcome::allow(),
        }
    }

    fn after_other_is_removed(&self, ctx: &Context, other: &Member) -> Outcome {
        let state: State = ctx.json_state();
        if type_name(&other.type_id) == "mysql" && state.database.is_some() {
            return Outcome::allow().with_json_state(&State { database: None });
        }
        Outcome::allow()
    }

    fn is_down(&self, ctx: &Context, _cause: &DownCause) -> Outcome {
        Outcome::allow().with_action(Action::ReplaceContainer(ctx.container.id))
    }
}

export_container_type!(Tomcat);
