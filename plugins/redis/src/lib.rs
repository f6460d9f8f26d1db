//! `redis`: a primary with replicas on other servers, and failover. The first redis of an
//! environment is the primary and asks for `replicas` more (role `replica`, spread so that no
//! two share a server); a replica attaches to the primary with a tagged exec whose result comes
//! back in `after-exec`. When the primary goes down, the running replica with the lowest id
//! promotes itself, re-attaches the other replicas and has the old primary replaced by a new
//! replica; every script runs once, from that one replica's hook.

use cloud48_sdk::*;

/// The redis container type.
#[derive(Default)]
pub struct Redis;

/// Port of the `redis` endpoint.
pub const PORT: u16 = 6379;

/// Makes this redis a replica of `$1:$2`.
pub const ATTACH: &str =
    "# cloud48: follow a redis primary\nset -e\nredis-cli -p 6379 replicaof \"$1\" \"$2\"\n";

/// Makes this redis the primary.
pub const PROMOTE: &str =
    "# cloud48: become the redis primary\nset -e\nredis-cli -p 6379 replicaof no one\n";

/// Tag of the attach script's result: `attach IP:PORT`.
const ATTACH_TAG: &str = "attach ";

/// State of a redis container.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct State {
    /// `ip:port` of the primary it follows, once attached (none for the primary).
    pub follows: Option<String>,
}

fn role(m: &Member) -> &str {
    m.params.get("role").map_or("", String::as_str)
}

fn primary(ctx: &Context) -> Option<&Member> {
    ctx.members_of_type("redis")
        .find(|m| role(m) == "primary" && m.status == Status::Running)
}

fn attach(replica: i64, primary: &Member) -> Option<Action> {
    let ip = primary.ip.as_deref()?;
    let port = primary.port("redis")?.to_string();
    let tag = format!("{ATTACH_TAG}{ip}:{port}");
    Some(Action::exec_tagged(replica, ATTACH, &[ip, &port], &tag))
}

impl ContainerType for Redis {
    fn metadata(&self) -> Metadata {
        Metadata::new("redis", "1.0.0", 40, Resources::new(500, 512, 1024))
            .described("redis primary with spread replicas and automatic failover")
            .spread()
            .with_workload(
                Workload::command([
                    "redis-server",
                    "--port",
                    "6379",
                    "--dir",
                    "/var/lib/redis",
                    "--protected-mode",
                    "no",
                ])
                .from_image("cloud48/redis", None)
                .with_endpoint("redis", PORT, Protocol::Tcp)
                .ready_when(Check::Exec(vec!["redis-cli".into(), "ping".into()]))
                .with_volume("data", "/var/lib/redis"),
            )
            .with_param(
                ParamSpec::text("role", "primary", "primary or replica (set on failover)")
                    .settable(),
            )
            .with_param(ParamSpec::integer(
                "replicas",
                2,
                "replicas the primary asks for, each on its own server",
            ))
    }

    fn before_it_is_added(&self, ctx: &Context) -> HookResult {
        let me: String = ctx.param("role")?;
        let replicas: i64 = ctx.param("replicas")?;
        if !(0..=8).contains(&replicas) {
            return Ok(Outcome::deny(format!(
                "replicas must be between 0 and 8, not {replicas}"
            )));
        }
        match (me.as_str(), primary(ctx)) {
            ("primary", Some(p)) => Ok(Outcome::deny(format!(
                "container {} is already the redis primary; add replicas with role=replica",
                p.id
            ))),
            ("replica", None) => Ok(Outcome::deny(
                "a replica needs a running redis primary in the environment",
            )),
            ("primary" | "replica", _) => Ok(Outcome::allow()),
            (other, _) => Ok(Outcome::deny(format!(
                "role must be primary or replica, not '{other}'"
            ))),
        }
    }

    fn after_it_is_added(&self, ctx: &Context) -> HookResult {
        if ctx.param::<String>("role")? == "primary" {
            let n: i64 = ctx.param("replicas")?;
            let mut out = Outcome::allow();
            for _ in 0..n {
                let replica = AddRequest::of("redis").param("role", "replica");
                out = out.with_action(replica.action());
            }
            return Ok(out);
        }
        let p = primary(ctx).ok_or_else(|| HookError::retry("the redis primary is not running"))?;
        Ok(Outcome::allow().with_action(
            attach(ctx.container.id, p)
                .ok_or_else(|| HookError::fail("the primary has no address"))?,
        ))
    }

    fn initial_state(&self) -> Vec<u8> {
        serde_json::to_vec(&State::default()).expect("serializes")
    }

    fn after_exec(&self, ctx: &Context, result: &ExecResult) -> HookResult {
        let Some(primary) = result.tag.strip_prefix(ATTACH_TAG) else {
            return Ok(Outcome::allow());
        };
        if result.exit_code != 0 {
            return Err(HookError::fail(format!(
                "replica {} could not follow its primary (exit {}): {}",
                result.container,
                result.exit_code,
                result.stderr.trim()
            )));
        }
        log(
            Level::Info,
            format!("replica {} follows {primary}", result.container),
        );
        if result.container != ctx.container.id {
            // A replica this (new) primary re-attached: its own state is not ours to write.
            return Ok(Outcome::allow());
        }
        Ok(Outcome::allow().with_json_state(&State {
            follows: Some(primary.to_string()),
        }))
    }

    fn after_other_is_down(&self, ctx: &Context, other: &Member, _: &DownCause) -> HookResult {
        if type_name(&other.type_id) != "redis" {
            return Ok(Outcome::allow());
        }
        let me = ctx.container.id;
        if role(other) == "replica" {
            // The primary keeps the number of replicas.
            return Ok(if ctx.param::<String>("role")? == "primary" {
                Outcome::allow().with_action(Action::ReplaceContainer(other.id))
            } else {
                Outcome::allow()
            });
        }
        // The primary is down: the running replica with the lowest id takes over.
        let heir = ctx
            .members_of_type("redis")
            .chain(std::iter::once(&ctx.container))
            .filter(|m| m.id != other.id && m.status == Status::Running)
            .map(|m| m.id)
            .min();
        if heir != Some(me) {
            return Ok(Outcome::allow());
        }
        log(
            Level::Warn,
            format!("primary {} is down; replica {me} takes over", other.id),
        );
        let mut out = Outcome::allow()
            .with_json_state(&State::default())
            .with_action(Action::exec(me, PROMOTE, &[]))
            .with_action(Action::set_params(me, &[("role", "primary")]))
            .with_action(Action::set_params(other.id, &[("role", "replica")]));
        for r in ctx.members_of_type("redis") {
            if r.id != other.id
                && r.status == Status::Running
                && let Some(a) = attach(r.id, &ctx.container)
            {
                out = out.with_action(a);
            }
        }
        Ok(out.with_action(Action::ReplaceContainer(other.id)))
    }
}

export_container_type!(Redis);
