//! `balancer`: nginx in front of the environment's tomcats. It keeps the upstream list in its
//! state and, on every change, exec's a script in its container that rewrites the nginx config
//! and reloads nginx.

use cloud48_sdk::*;
use serde::{Deserialize, Serialize};

/// State of a balancer container.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// `ip:port` of every registered tomcat, in registration order.
    pub upstreams: Vec<String>,
    /// How many times nginx was reloaded.
    pub reloads: u32,
}

/// The balancer container type.
#[derive(Default)]
pub struct Balancer;

/// Port the tomcats serve on.
pub const TOMCAT_PORT: u16 = 8080;

/// Rewrites the upstream block from its arguments and reloads nginx (CIS layer).
pub const WRITE_UPSTREAMS: &str = r#"# cloud48: rewrite the nginx upstreams and reload nginx
set -e
conf=/etc/nginx/conf.d/cloud48-upstreams.conf
{
  echo "upstream cloud48_app {"
  if [ "$#" -eq 0 ]; then echo "  server 127.0.0.1:9 down;"; fi
  for u in "$@"; do echo "  server $u;"; done
  echo "}"
} > "$conf.tmp"
mv "$conf.tmp" "$conf"
nginx -s reload
"#;

fn rewrite(ctx: &Context, mut state: State) -> Outcome {
    state.reloads += 1;
    let args: Vec<&str> = state.upstreams.iter().map(String::as_str).collect();
    Outcome::allow()
        .with_action(Action::exec(ctx.container.id, WRITE_UPSTREAMS, &args))
        .with_json_state(&state)
}

fn upstream(m: &Member) -> Option<String> {
    (type_name(&m.type_id) == "tomcat")
        .then(|| m.ip.as_ref().map(|ip| format!("{ip}:{TOMCAT_PORT}")))?
}

impl ContainerType for Balancer {
    fn metadata(&self) -> Metadata {
        Metadata::new("balancer", "0.1.0", 20, Resources::new(500, 256, 512))
            .described("nginx load balancer for the environment's tomcats")
    }

    fn initial_state(&self) -> Vec<u8> {
        serde_json::to_vec(&State::default()).expect("serializes")
    }

    fn before_it_is_added(&self, ctx: &Context) -> Outcome {
        if ctx.members_of_type("balancer").count() > 0 {
            return Outcome::deny("this environment already has a balancer");
        }
        Outcome::allow()
    }

    fn after_it_is_added(&self, ctx: &Context) -> Outcome {
        let upstreams = ctx
            .environment
            .members
            .iter()
            .filter_map(upstream)
            .collect();
        rewrite(
            ctx,
            State {
                upstreams,
                reloads: 0,
            },
        )
    }

    fn after_other_is_added(&self, ctx: &Context, other: &Member) -> Outcome {
        let Some(u) = upstream(other) else {
            return Outcome::allow();
        };
        let mut state: State = ctx.json_state();
        if state.upstreams.contains(&u) {
            return Outcome::allow();
        }
        state.upstreams.push(u);
        rewrite(ctx, state)
    }

    fn after_other_is_removed(&self, ctx: &Context, other: &Member) -> Outcome {
        let Some(u) = upstream(other) else {
            return Outcome::allow();
        };
        let mut state: State = ctx.json_state();
        if !state.upstreams.contains(&u) {
            return Outcome::allow();
        }
        state.upstreams.retain(|x| *x != u);
        rewrite(ctx, state)
    }

    fn is_down(&self, ctx: &Context, _cause: &DownCause) -> Outcome {
        Outcome::allow().with_action(Action::ReplaceContainer(ctx.container.id))
    }
}

export_container_type!(Balancer);

#[cfg(test)]
mod tests {
    //! The seed scenario and the reference types' rules, natively through the SDK harness.

    use super::*;
    use cloud48_plugin_mysql::Mysql;
    use cloud48_plugin_tomcat::Tomcat;
    use cloud48_sdk::testing::{NativeHooks, Platform};

    fn platform() -> Platform<NativeHooks> {
        Platform::with_native(
            NativeHooks::default()
                .with::<Tomcat>()
                .with::<Balancer>()
                .with::<Mysql>(),
        )
    }

    #[test]
    fn seed_scenario_second_tomcat_brings_a_balancer_that_registers_both() {
        let mut p = platform();
        let t1 = p.add("tomcat").unwrap();
        assert!(
            p.ids_of("balancer").is_empty(),
            "one tomcat needs no balancer"
        );
        let t2 = p.add("tomcat").unwrap();
        let lb = p.ids_of("balancer")[0];
        assert!(lb < t2, "the balancer was added before the second tomcat");
        let ips: std::collections::HashMap<i64, String> = p
            .members()
            .into_iter()
            .map(|m| (m.id, m.ip.unwrap()))
            .collect();
        let ip = |id: i64| ips[&id].clone();
        let state = p.inspect(lb);
        assert_eq!(
            state["upstreams"],
            serde_json::json!([format!("{}:8080", ip(t1)), format!("{}:8080", ip(t2))])
        );
        assert_eq!(state["reloads"], 2);
        assert_eq!(p.execs.len(), 2);
        assert_eq!(p.execs[0].args, vec![format!("{}:8080", ip(t1))]);
        assert!(
            p.execs
                .iter()
                .all(|e| e.container == lb && e.script == WRITE_UPSTREAMS)
        );

        p.remove(t1).unwrap();
        let state = p.inspect(lb);
        assert_eq!(
            state["upstreams"],
            serde_json::json!([format!("{}:8080", ip(t2))])
        );
        assert_eq!(
            p.execs.last().unwrap().args,
            vec![format!("{}:8080", ip(t2))]
        );
    }

    #[test]
    fn only_one_balancer_and_one_database_per_environment() {
        let mut p = platform();
        p.add("balancer").unwrap();
        assert_eq!(
            p.add("balancer").unwrap_err(),
            "this environment already has a balancer"
        );
        p.add("mysql").unwrap();
        assert_eq!(
            p.add("mysql").unwrap_err(),
            "this environment already has a mysql database"
        );
    }

    #[test]
    fn tomcats_receive_the_database_address() {
        let mut p = platform();
        let db = p.add("mysql").unwrap();
        let t = p.add("tomcat").unwrap();
        let db_ip = p
            .members()
            .iter()
            .find(|m| m.id == db)
            .unwrap()
            .ip
            .clone()
            .unwrap();
        assert_eq!(p.inspect(t)["database"], db_ip);
        assert!(
            p.execs
                .iter()
                .any(|e| e.container == t && e.args == vec![db_ip.clone()])
        );
        assert!(p.remove(db).unwrap_err().contains("use this database"));
    }

    #[test]
    fn a_crashed_balancer_asks_for_a_replacement_that_registers_every_tomcat() {
        let mut p = platform();
        p.add("tomcat").unwrap();
        p.add("tomcat").unwrap();
        let lb = p.ids_of("balancer")[0];
        let server = p
            .members()
            .iter()
            .find(|m| m.id == lb)
            .unwrap()
            .server
            .clone()
            .unwrap();
        p.crash_server(&server).unwrap();
        assert!(p.log.iter().any(|l| l == &format!("balancer#{lb}:is-down")));
        assert_eq!(p.illegal.iter().map(|m| m.id).collect::<Vec<_>>(), vec![lb]);
        let new = p.ids_of("balancer")[0];
        assert_ne!(new, lb);
        let new_member = p.members().into_iter().find(|m| m.id == new).unwrap();
        assert_ne!(
            new_member.server.as_deref(),
            Some(server.as_str()),
            "the replacement runs elsewhere"
        );
        assert_eq!(
            p.inspect(new)["upstreams"].as_array().unwrap().len(),
            2,
            "every tomcat is registered again"
        );
    }

    #[test]
    fn a_member_its_type_keeps_through_a_crash_gets_is_up_when_its_server_is_back() {
        let mut p = platform();
        let db = p.add("mysql").unwrap();
        let server = p.members()[0].server.clone().unwrap();
        p.crash_server(&server).unwrap();
        // mysql asks for no replacement: it stays, not running, until its server is back.
        assert_eq!(p.ids_of("mysql"), vec![db]);
        assert_eq!(p.members()[0].status, Status::Stopped);
        p.recover_server(&server).unwrap();
        assert_eq!(p.members()[0].status, Status::Running);
        let calls: Vec<&String> = p.log.iter().filter(|l| l.starts_with("mysql#")).collect();
        assert_eq!(
            calls,
            [
                &"mysql#0:before-it-is-added".to_string(),
                &format!("mysql#{db}:after-it-is-added"),
                &format!("mysql#{db}:is-down"),
                &format!("mysql#{db}:is-up"),
            ]
        );
        // Nothing to bring back on a server that did not crash.
        p.recover_server("s3").unwrap();
        assert_eq!(p.log.iter().filter(|l| l.ends_with(":is-up")).count(), 1);
    }

    #[test]
    fn core_start_and_stop_notify_every_member_that_is_not_down_in_priority_order() {
        let mut p = platform();
        let db = p.add("mysql").unwrap();
        let web = p.add("tomcat").unwrap();
        p.start_core().unwrap();
        p.stop_core().unwrap();
        let db_server = p.members()[0].server.clone().unwrap();
        p.crash_server(&db_server).unwrap();
        p.start_core().unwrap();
        let cc: Vec<&String> = p.log.iter().filter(|l| l.contains("-cc-")).collect();
        assert_eq!(
            cc,
            [
                &format!("mysql#{db}:after-cc-start"),
                &format!("tomcat#{web}:after-cc-start"),
                &format!("mysql#{db}:before-cc-stop"),
                &format!("tomcat#{web}:before-cc-stop"),
                &format!("tomcat#{web}:after-cc-start"),
            ],
            "the down database is left out"
        );
    }

    #[test]
    fn environments_are_apart_and_a_crash_reaches_every_one() {
        let mut p = platform();
        p.add("tomcat").unwrap();
        p.use_environment("shop");
        assert_eq!(p.environment(), "shop");
        assert!(p.members().is_empty(), "a new environment starts empty");
        let first = p.add("tomcat").unwrap();
        assert!(
            p.ids_of("balancer").is_empty(),
            "the tomcat of the other environment is not a member here"
        );
        p.add("tomcat").unwrap();
        let lb = p.ids_of("balancer")[0];
        p.use_environment("test");
        assert_eq!(
            p.ids_of("tomcat"),
            vec![1],
            "ids are unique on the platform"
        );
        assert!(p.ids_of("balancer").is_empty());
        // The balancer's server crashes: only the environment that has one hears of it.
        p.use_environment("shop");
        let server = p
            .members()
            .into_iter()
            .find(|m| m.id == lb)
            .unwrap()
            .server
            .unwrap();
        p.use_environment("test");
        p.crash_server(&server).unwrap();
        assert_eq!(p.environment(), "test", "back in the current environment");
        assert!(p.log.iter().any(|l| l == &format!("balancer#{lb}:is-down")));
        p.use_environment("shop");
        assert_ne!(
            p.ids_of("balancer"),
            vec![lb],
            "replaced in its own environment"
        );
        assert!(p.ids_of("tomcat").contains(&first));
    }

    #[test]
    fn hooks_run_in_the_documented_order() {
        let mut p = platform();
        let db = p.add("mysql").unwrap();
        let t1 = p.add("tomcat").unwrap();
        p.log.clear();
        p.add("balancer").unwrap();
        assert_eq!(
            p.log[..3],
            [
                "balancer#0:before-it-is-added".to_string(),
                format!("mysql#{db}:before-other-is-added"),
                format!("tomcat#{t1}:before-other-is-added"),
            ]
        );
    }
}
