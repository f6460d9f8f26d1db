//! `tomcat`: an application server. The second tomcat of an environment asks for a balancer
//! first; a tomcat in an environment with a database is configured with the database's `mysql`
//! endpoint, database name and user (its password is the environment's secret `mysql`, which
//! the core gives the database and the tomcats alike); a tomcat in an environment with redis keeps its sessions on the
//! redis primary and follows a failover; a tomcat whose server goes down asks for a replacement
//! on another server.

use cloud48_sdk::*;
use serde::{Deserialize, Serialize};

/// State of a tomcat container.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// JDBC URL of the environment's database, once configured.
    pub database: Option<String>,
    /// `ip:port` of the redis primary that keeps the sessions, once configured.
    #[serde(default)]
    pub sessions: Option<String>,
}

/// The tomcat container type.
#[derive(Default)]
pub struct Tomcat;

/// Script that points the application at a database (CIS layer): `$1` is the JDBC URL.
pub const CONFIGURE_DATASOURCE: &str = "# cloud48: point the application at the database\nset -e\nmkdir -p /etc/cloud48\necho \"$1\" > /etc/cloud48/datasource\n";

/// Script that points the session store at a redis primary: `$1` is `ip:port`.
pub const CONFIGURE_SESSIONS: &str = "# cloud48: keep sessions in redis\nset -e\nmkdir -p /etc/cloud48\necho \"$1\" > /etc/cloud48/sessions\n";

/// The JDBC URL of a database member: its `mysql` endpoint, `database` and `user` parameters (a
/// mysql built for WIT 0.1.0 declares none: port 3306 and database `app`, what it ran; the
/// application's user is then `app`).
fn jdbc(db: &Member) -> Result<Option<String>, HookError> {
    let Some(ip) = &db.ip else {
        return Ok(None);
    };
    let port = db.port(MYSQL_ENDPOINT).unwrap_or(3306);
    let name = match db.params.get("database") {
        Some(_) => db.param::<String>("database")?,
        None => "app".to_string(),
    };
    let user = match db.params.get("user") {
        Some(_) => format!("?user={}", db.param::<String>("user")?),
        None => String::new(),
    };
    Ok(Some(format!("jdbc:mysql://{ip}:{port}/{name}{user}")))
}

/// The endpoint the mysql type declares (named here so that tomcat does not link mysql).
const MYSQL_ENDPOINT: &str = "mysql";

/// Points the datasource at `url` unless it already is: the script to run, `state` updated.
fn datasource(ctx: &Context, url: String, state: &mut State) -> Option<Action> {
    if state.database.as_deref() == Some(url.as_str()) {
        return None;
    }
    let exec = Action::exec(ctx.container.id, CONFIGURE_DATASOURCE, &[&url]);
    state.database = Some(url);
    Some(exec)
}

/// Points the session store at `primary` unless it already is: the script, `state` updated.
fn sessions(ctx: &Context, primary: &Member, state: &mut State) -> Option<Action> {
    let addr = primary.address("redis")?;
    if state.sessions.as_deref() == Some(addr.as_str()) {
        return None;
    }
    let exec = Action::exec(ctx.container.id, CONFIGURE_SESSIONS, &[&addr]);
    state.sessions = Some(addr);
    Some(exec)
}

/// The scripts to run and the new state, or a plain allow when nothing changed.
fn outcome(actions: Vec<Action>, state: &State) -> Outcome {
    if actions.is_empty() {
        return Outcome::allow();
    }
    let mut out = Outcome::allow().with_json_state(state);
    out.actions = actions;
    out
}

/// The redis primary that serves once `gone` is down: the running redis with role `primary`,
/// or, when `gone` was the primary, the replica the redis type promotes (the running one with
/// the lowest id).
pub fn redis_primary<'a>(ctx: &'a Context, gone: Option<&Member>) -> Option<&'a Member> {
    let live = |m: &&Member| m.status == Status::Running && Some(m.id) != gone.map(|g| g.id);
    let primary = ctx
        .members_of_type("redis")
        .filter(live)
        .find(|m| m.params.get("role").map(String::as_str) == Some("primary"));
    primary.or_else(|| {
        ctx.members_of_type("redis")
            .filter(live)
            .min_by_key(|m| m.id)
    })
}

impl ContainerType for Tomcat {
    fn metadata(&self) -> Metadata {
        Metadata::new("tomcat", "1.0.0", 50, Resources::new(1000, 1024, 2048))
            .described("application server; asks for a balancer when a second one joins")
            .with_workload(
                Workload::command(["catalina.sh", "run"])
                    .from_image("cloud48/tomcat", None)
                    .with_env("CATALINA_OPTS", "-Xmx${heap-mb}m")
                    .with_env("CLOUD48_CONTEXT_PATH", "${context-path}")
                    .with_env("CLOUD48_DB_PASSWORD", "${secret:mysql}")
                    .with_endpoint("http", 8080, Protocol::Http)
                    .ready_when(Check::Http("http".into(), "${context-path}".into()))
                    .with_volume("config", "/etc/cloud48"),
            )
            .with_param(ParamSpec::integer("heap-mb", 512, "Java heap size in MiB"))
            .with_param(ParamSpec::text(
                "context-path",
                "/",
                "path the application is served under",
            ))
    }

    fn initial_state(&self) -> Vec<u8> {
        serde_json::to_vec(&State::default()).expect("serializes")
    }

    fn before_it_is_added(&self, ctx: &Context) -> HookResult {
        let heap: i64 = ctx.param("heap-mb")?;
        if !(64..=65536).contains(&heap) {
            return Ok(Outcome::deny(format!(
                "heap-mb {heap} must be between 64 and 65536"
            )));
        }
        let tomcats = ctx.members_of_type("tomcat").count();
        let balancers = ctx.members_of_type("balancer").count();
        if tomcats >= 1 && balancers == 0 {
            return Ok(Outcome::allow().with_action(Action::add("balancer")));
        }
        Ok(Outcome::allow())
    }

    fn after_it_is_added(&self, ctx: &Context) -> HookResult {
        let mut state: State = ctx.json_state();
        let mut actions = Vec::new();
        if let Some(db) = ctx.members_of_type("mysql").next()
            && let Some(url) = jdbc(db)?
        {
            actions.extend(datasource(ctx, url, &mut state));
        }
        if let Some(primary) = redis_primary(ctx, None) {
            actions.extend(sessions(ctx, primary, &mut state));
        }
        Ok(outcome(actions, &state))
    }

    fn after_other_is_added(&self, ctx: &Context, other: &Member) -> HookResult {
        let mut state: State = ctx.json_state();
        let action = match type_name(&other.type_id) {
            "mysql" => match jdbc(other)? {
                Some(url) => datasource(ctx, url, &mut state),
                None => None,
            },
            "redis" => redis_primary(ctx, None).and_then(|p| sessions(ctx, p, &mut state)),
            _ => None,
        };
        Ok(outcome(action.into_iter().collect(), &state))
    }

    fn after_other_is_down(&self, ctx: &Context, other: &Member, _: &DownCause) -> HookResult {
        let mut state: State = ctx.json_state();
        if type_name(&other.type_id) != "redis"
            || state.sessions.is_none()
            || state.sessions != other.address("redis")
        {
            return Ok(Outcome::allow());
        }
        let action = redis_primary(ctx, Some(other)).and_then(|p| sessions(ctx, p, &mut state));
        Ok(outcome(action.into_iter().collect(), &state))
    }

    fn after_other_is_removed(&self, ctx: &Context, other: &Member) -> HookResult {
        let mut state: State = ctx.json_state();
        if type_name(&other.type_id) == "mysql" && state.database.is_some() {
            state.database = None;
            return Ok(Outcome::allow().with_json_state(&state));
        }
        Ok(Outcome::allow())
    }

    fn is_down(&self, ctx: &Context, _cause: &DownCause) -> HookResult {
        Ok(Outcome::allow().with_action(Action::ReplaceContainer(ctx.container.id)))
    }

    /// 0.x states hold the database's bare IP; this version keeps the JDBC URL. The address is
    /// rebuilt from the environment's database member (the reason `migrate-state` sees it).
    fn migrate_state(&self, from_version: &str, ctx: &Context) -> Result<Vec<u8>, String> {
        if !from_version.starts_with("0.") {
            return Ok(ctx.state.clone());
        }
        #[derive(Deserialize)]
        struct Old {
            database: Option<String>,
        }
        let old: Old = serde_json::from_slice(&ctx.state)
            .map_err(|e| format!("unreadable tomcat {from_version} state: {e}"))?;
        let database = match old.database {
            None => None,
            Some(ip) => {
                let db = ctx
                    .members_of_type("mysql")
                    .find(|m| m.ip.as_deref() == Some(ip.as_str()))
                    .ok_or_else(|| {
                        format!("its database {ip} is not a member of the environment any more")
                    })?;
                let name = db.params.get("database").map_or("app", String::as_str);
                let user = db
                    .params
                    .get("user")
                    .map_or(String::new(), |u| format!("?user={u}"));
                Some(format!("jdbc:mysql://{ip}:3306/{name}{user}"))
            }
        };
        serde_json::to_vec(&State {
            database,
            sessions: None,
        })
        .map_err(|e| e.to_string())
    }
}

export_container_type!(Tomcat);
