//! `balancer`: nginx in front of the environment's tomcats. It keeps the upstream list (each
//! tomcat's `http` endpoint) in its state and, on every change, exec's a script in its container
//! that rewrites the nginx upstreams with the balancing algorithm of its `algorithm` parameter
//! and reloads nginx. Its workload runs nginx in the foreground on a configuration it writes
//! itself at start.

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

/// The endpoint of the application servers it balances.
pub const UPSTREAM_ENDPOINT: &str = "http";

/// Writes nginx's main configuration (unless the container already has one) and runs nginx in
/// the foreground: the balancer's workload.
pub const START_NGINX: &str = r#"set -e
mkdir -p /etc/nginx/conf.d /var/lib/nginx /var/log/nginx /run
if ! grep -qs '^# cloud48 balancer' /etc/nginx/nginx.conf; then
cat > /etc/nginx/nginx.conf <<'EOF'
# cloud48 balancer
worker_processes 1;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log warn;
events { worker_connections 512; }
http {
  access_log off;
  client_body_temp_path /var/lib/nginx/body;
  proxy_temp_path /var/lib/nginx/proxy;
  fastcgi_temp_path /var/lib/nginx/fastcgi;
  uwsgi_temp_path /var/lib/nginx/uwsgi;
  scgi_temp_path /var/lib/nginx/scgi;
  include /etc/nginx/conf.d/*.conf;
  server {
    listen 80;
    location / {
      proxy_pass http://cloud48_app;
      # The client's Host, not the upstream's name (Tomcat refuses `cloud48_app`: no '_').
      proxy_set_header Host $host;
      proxy_connect_timeout 1s;
      proxy_next_upstream error timeout http_502 http_503 http_504;
    }
  }
}
EOF
fi
conf=/etc/nginx/conf.d/cloud48-upstreams.conf
[ -f "$conf" ] || printf 'upstream cloud48_app {\n  server 127.0.0.1:9 down;\n}\n' > "$conf"
exec nginx -g 'daemon off;'
"#;

/// Rewrites the upstream block from its arguments (`ip:port` of every upstream) and reloads
/// nginx (CIS layer); `@ALGORITHM@` is the balancing algorithm (see [`write_upstreams`]).
pub const WRITE_UPSTREAMS: &str = r#"# cloud48: rewrite the nginx upstreams and reload nginx
set -e
conf=/etc/nginx/conf.d/cloud48-upstreams.conf
algorithm=@ALGORITHM@
{
  echo "upstream cloud48_app {"
  case "$algorithm" in
    least-conn) echo "  least_conn;" ;;
    ip-hash) echo "  ip_hash;" ;;
  esac
  if [ "$#" -eq 0 ]; then echo "  server 127.0.0.1:9 down;"; fi
  for u in "$@"; do echo "  server $u;"; done
  echo "}"
} > "$conf.tmp"
mv "$conf.tmp" "$conf"
nginx -s reload
"#;

/// The balancing algorithms the `algorithm` parameter takes.
pub const ALGORITHMS: &[&str] = &["round-robin", "least-conn", "ip-hash"];

/// The upstream script for `algorithm` (one of [`ALGORITHMS`]; anything else is refused).
pub fn write_upstreams(algorithm: &str) -> Result<String, HookError> {
    if !ALGORITHMS.contains(&algorithm) {
        return Err(HookError::fail(format!(
            "algorithm '{algorithm}' is not one of {}",
            ALGORITHMS.join(", ")
        )));
    }
    Ok(WRITE_UPSTREAMS.replace("@ALGORITHM@", algorithm))
}

fn rewrite(ctx: &Context, mut state: State) -> HookResult {
    let script = write_upstreams(&ctx.param::<String>("algorithm")?)?;
    state.reloads += 1;
    let args: Vec<&str> = state.upstreams.iter().map(String::as_str).collect();
    Ok(Outcome::allow()
        .with_action(Action::exec(ctx.container.id, &script, &args))
        .with_json_state(&state))
}

/// The `ip:port` a tomcat serves on, from its `http` endpoint.
fn upstream(m: &Member) -> Option<String> {
    (type_name(&m.type_id) == "tomcat").then(|| m.address(UPSTREAM_ENDPOINT))?
}

impl ContainerType for Balancer {
    fn metadata(&self) -> Metadata {
        Metadata::new("balancer", "1.0.0", 20, Resources::new(500, 256, 512))
            .described("nginx load balancer for the environment's tomcats")
            .with_workload(
                Workload::command(["/bin/sh", "-c", START_NGINX])
                    .from_image("cloud48/nginx", None)
                    .with_endpoint("http", 80, Protocol::Http)
                    .ready_when(Check::Tcp("http".into()))
                    .with_volume("config", "/etc/nginx")
                    .with_volume("cache", "/var/lib/nginx")
                    .with_volume("logs", "/var/log/nginx")
                    .with_volume("run", "/run"),
            )
            .with_param(ParamSpec::text(
                "algorithm",
                "round-robin",
                "how requests are spread: round-robin, least-conn or ip-hash",
            ))
    }

    fn initial_state(&self) -> Vec<u8> {
        serde_json::to_vec(&State::default()).expect("serializes")
    }

    fn before_it_is_added(&self, ctx: &Context) -> HookResult {
        let algorithm: String = ctx.param("algorithm")?;
        if !ALGORITHMS.contains(&algorithm.as_str()) {
            return Ok(Outcome::deny(format!(
                "algorithm '{algorithm}' is not one of {}",
                ALGORITHMS.join(", ")
            )));
        }
        if ctx.members_of_type("balancer").count() > 0 {
            return Ok(Outcome::deny("this environment already has a balancer"));
        }
        Ok(Outcome::allow())
    }

    fn after_it_is_added(&self, ctx: &Context) -> HookResult {
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

    fn after_other_is_added(&self, ctx: &Context, other: &Member) -> HookResult {
        let Some(u) = upstream(other) else {
            return Ok(Outcome::allow());
        };
        let mut state: State = ctx.json_state();
        if state.upstreams.contains(&u) {
            return Ok(Outcome::allow());
        }
        state.upstreams.push(u);
        rewrite(ctx, state)
    }

    fn after_other_is_removed(&self, ctx: &Context, other: &Member) -> HookResult {
        let Some(u) = upstream(other) else {
            return Ok(Outcome::allow());
        };
        let mut state: State = ctx.json_state();
        if !state.upstreams.contains(&u) {
            return Ok(Outcome::allow());
        }
        state.upstreams.retain(|x| *x != u);
        rewrite(ctx, state)
    }

    fn is_down(&self, ctx: &Context, _cause: &DownCause) -> HookResult {
        Ok(Outcome::allow().with_action(Action::ReplaceContainer(ctx.container.id)))
    }

    /// States of 0.x balancers are this version's (the upstream list and reload count).
    fn migrate_state(&self, _from_version: &str, ctx: &Context) -> Result<Vec<u8>, String> {
        serde_json::from_slice::<State>(&ctx.state)
            .map_err(|e| format!("unreadable balancer state: {e}"))?;
        Ok(ctx.state.clone())
    }
}

export_container_type!(Balancer);

#[cfg(test)]
mod tests {
    //! The seed scenario and the reference types' rules, natively through the SDK harness.

    use super::*;
    use cloud48_plugin_mysql::Mysql;
    use cloud48_plugin_redis::Redis;
    use cloud48_plugin_tomcat::Tomcat;
    use cloud48_sdk::testing::{NativeHooks, Platform};

    fn platform() -> Platform<NativeHooks> {
        Platform::with_native(
            NativeHooks::default()
                .with::<Tomcat>()
                .with::<Balancer>()
                .with::<Mysql>()
                .with::<Redis>(),
        )
    }

    fn member(p: &Platform<NativeHooks>, id: i64) -> Member {
        p.members().into_iter().find(|m| m.id == id).unwrap()
    }

    #[test]
    fn redis_replicas_spread_attach_and_take_over_when_the_primary_fails() {
        let mut p = platform();
        let primary = p
            .add_request(AddRequest::of("redis").param("replicas", 1))
            .unwrap();
        let replica = p
            .ids_of("redis")
            .into_iter()
            .find(|&id| id != primary)
            .unwrap();
        let (pm, rm) = (member(&p, primary), member(&p, replica));
        assert_ne!(pm.server, rm.server, "the replica is spread");
        assert_eq!(rm.params["role"], "replica");
        let primary_addr = pm.address("redis").unwrap();
        assert_eq!(
            p.inspect(replica)["follows"],
            primary_addr,
            "after-exec saw it attach"
        );
        let web = p.add("tomcat").unwrap();
        assert_eq!(p.inspect(web)["sessions"], primary_addr);

        p.execs.clear();
        p.crash_server(pm.server.as_deref().unwrap()).unwrap();
        assert_eq!(
            p.params_of(replica)["role"],
            "primary",
            "the replica took over"
        );
        let promotions: Vec<_> = p
            .execs
            .iter()
            .filter(|e| e.script == cloud48_plugin_redis::PROMOTE)
            .collect();
        assert_eq!(promotions.len(), 1);
        assert_eq!(promotions[0].container, replica);
        let new_addr = member(&p, replica).address("redis").unwrap();
        assert_eq!(
            p.inspect(web)["sessions"],
            new_addr,
            "the tomcat follows the new primary"
        );
        let sessions = p
            .execs
            .iter()
            .filter(|e| e.container == web && e.script == cloud48_plugin_tomcat::CONFIGURE_SESSIONS)
            .count();
        assert_eq!(sessions, 1, "re-pointed once");
        // The old primary is replaced by a replica of the new one, on the third server.
        assert_eq!(
            p.illegal.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![primary]
        );
        let new = p
            .ids_of("redis")
            .into_iter()
            .find(|&id| id != replica)
            .unwrap();
        assert_eq!(p.params_of(new)["role"], "replica");
        assert_eq!(p.inspect(new)["follows"], new_addr);
        let servers: std::collections::BTreeSet<_> = p
            .members()
            .into_iter()
            .filter(|m| m.type_id.starts_with("redis"))
            .map(|m| m.server)
            .collect();
        assert_eq!(servers.len(), 2);
        assert!(
            p.log
                .iter()
                .any(|l| l == &format!("tomcat#{web}:after-other-is-down")),
            "{:?}",
            p.log
        );
    }

    #[test]
    fn a_second_redis_primary_is_denied_and_a_replica_needs_one() {
        let mut p = platform();
        let e = p
            .add_request(AddRequest::of("redis").param("role", "replica"))
            .unwrap_err();
        assert!(e.contains("needs a running redis primary"), "{e}");
        p.add_request(AddRequest::of("redis").param("replicas", 0))
            .unwrap();
        let e = p.add("redis").unwrap_err();
        assert!(e.contains("already the redis primary"), "{e}");
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
        let script = write_upstreams("round-robin").unwrap();
        assert!(
            p.execs
                .iter()
                .all(|e| e.container == lb && e.script == script)
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
    fn the_algorithm_parameter_reaches_the_script_and_a_bad_one_is_denied() {
        let mut p = platform();
        let t = p.add("tomcat").unwrap();
        let lb = p
            .add_request(AddRequest::of("balancer").param("algorithm", "least-conn"))
            .unwrap();
        let last = p.execs.last().unwrap();
        assert_eq!(last.container, lb);
        assert!(
            last.script.contains("algorithm=least-conn"),
            "{}",
            last.script
        );
        assert_eq!(p.params_of(lb)["algorithm"], "least-conn");
        assert!(last.args[0].ends_with(":8080"), "{t}: {:?}", last.args);
        let mut q = platform();
        let e = q
            .add_request(AddRequest::of("balancer").param("algorithm", "random"))
            .unwrap_err();
        assert!(e.contains("not one of"), "{e}");
        let e = q
            .add_request(AddRequest::of("balancer").param("weight", "1"))
            .unwrap_err();
        assert!(e.contains("no parameter 'weight'"), "{e}");
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
        let url = format!("jdbc:mysql://{db_ip}:3306/app?user=app");
        assert_eq!(p.inspect(t)["database"], url);
        assert!(
            p.execs
                .iter()
                .any(|e| e.container == t && e.args == vec![url.clone()])
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
        assert_eq!(p.members()[0].status, Status::Down);
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

    /// The tomcat as released before WIT 0.2.0: it kept the database's bare address (here,
    /// the environment's `legacy-db` parameter stands for a database that is gone).
    #[derive(Default)]
    struct TomcatV0;

    impl ContainerType for TomcatV0 {
        fn metadata(&self) -> Metadata {
            Metadata::new("tomcat", "0.2.0", 50, Resources::new(1000, 1024, 2048))
        }
        fn after_it_is_added(&self, ctx: &Context) -> HookResult {
            let db = ctx
                .members_of_type("mysql")
                .find_map(|m| m.ip.clone())
                .or_else(|| ctx.environment_param("legacy-db").map(String::from));
            Ok(Outcome::allow().with_json_state(&serde_json::json!({ "database": db })))
        }
    }

    fn old_platform() -> Platform<NativeHooks> {
        Platform::with_native(NativeHooks::default().with::<TomcatV0>().with::<Mysql>())
    }

    #[test]
    fn an_upgrade_to_tomcat_1_converts_every_state_or_none() {
        let mut p = old_platform();
        let db = p.add("mysql").unwrap();
        let web = p.add("tomcat").unwrap();
        let ip = member(&p, db).ip.unwrap();
        assert_eq!(p.inspect(web)["database"], ip.as_str());
        assert_eq!(p.upgrade::<Tomcat>(), Ok(1));
        assert_eq!(member(&p, web).type_id, "tomcat@1.0.0");
        // The parameters 1.0 declares, with their defaults, as the core gives them.
        assert_eq!(
            member(&p, web).params.get("heap-mb").map(String::as_str),
            Some("512")
        );
        assert_eq!(
            p.inspect(web)["database"],
            format!("jdbc:mysql://{ip}:3306/app?user=app")
        );

        // One 0.x state names a database that is not a member: nothing moves.
        let mut q = old_platform();
        q.add("mysql").unwrap();
        let fine = q.add("tomcat").unwrap();
        q.use_environment("old");
        q.set_environment_param("legacy-db", "10.9.9.9");
        let stale = q.add("tomcat").unwrap();
        let err = q.upgrade::<Tomcat>().unwrap_err();
        assert!(
            err.contains(&format!("container {stale}")) && err.contains("10.9.9.9"),
            "{err}"
        );
        assert_eq!(member(&q, stale).type_id, "tomcat@0.2.0");
        q.use_environment("test");
        assert_eq!(member(&q, fine).type_id, "tomcat@0.2.0", "none moved");
        // The old version is still the one that runs.
        let again = q.add("tomcat").unwrap();
        assert_eq!(member(&q, again).type_id, "tomcat@0.2.0");
    }
}
