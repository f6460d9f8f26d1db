//! Flexible configuration: one TOML file with `${NAME}` / `${NAME:default}` placeholders,
//! environment variables and command-line flags, with the precedence flag > env > file > default.
//!
//! Every setting is declared once in `SETTINGS` (key, environment variable, flag, default).
//! Placeholders resolve from other keys of the file (`${server.data_dir}`) or from the
//! environment (`${HOME}`). An unknown key, a bad value or an unresolved placeholder is an error
//! naming the key and the file line. Named components read their own section (`database`,
//! `queue`, `drivers.sim`, `health`, `collector`, `rebalancer`, `placement`, `plugins`, `auth`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{Anonymous, AuthConfig, Role, UserRecord};
use crate::core::CoreConfig;

mod declared;
mod file;

use declared::SETTINGS;
use file::{check, line_of, resolve, walk};

/// A configuration error with the place it comes from.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// A line of the config file.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag(v) => write!(f, "flag {v}"),
        }
    }
}

/// One effective setting.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The value (after placeholder resolution).
    pub value: String,
    /// Where it came from.
    pub source: Source,
    /// Shown masked.
    pub secret: bool,
}

/// A user declared in the config file.
#[derive(Debug, Clone)]
struct FileUser {
    record: UserRecord,
    source: Source,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    entries: BTreeMap<&'static str, Entry>,
    users: Vec<FileUser>,
}

/// Raw values read from a file: key -> (value, line).
type FileValues = HashMap<String, (String, usize)>;

/// Per `[[users]]` table: its keys with (value, line), and the table's line.
type UserTables = Vec<(HashMap<String, (String, usize)>, usize)>;

/// Every declared setting: its key, its flag of `cloud48 serve` ("" for secrets, which only
/// come from the environment or the file) and its default.
pub fn declared() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    SETTINGS.iter().map(|s| (s.key, s.flag, s.default))
}

impl Settings {
    /// Loads the effective configuration from an optional file, the environment (`env`) and
    /// flags (`flags`: key -> value).
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &BTreeMap<&'static str, String>,
    ) -> Result<Settings, ConfigError> {
        let mut values = FileValues::new();
        let mut raw_users = Vec::new();
        let path = file.map(Path::to_path_buf).unwrap_or_default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            let doc = toml_edit::Document::parse(text.clone()).map_err(|e| {
                let line = e.span().map_or(0, |s| line_of(&text, s.start));
                ConfigError(format!(
                    "{}:{line}: not valid TOML: {}",
                    path.display(),
                    e.message()
                ))
            })?;
            walk(&text, path, "", doc.as_table(), &mut values, &mut raw_users)?;
        }
        let mut entries = BTreeMap::new();
        for spec in SETTINGS {
            let (value, source) = if let Some(v) = flags.get(spec.key) {
                (v.clone(), Source::Flag(spec.flag.to_string()))
            } else if let Some(v) = env(spec.env) {
                (v, Source::Env(spec.env.to_string()))
            } else if let Some((raw, line)) = values.get(spec.key) {
                let source = Source::File {
                    path: path.clone(),
                    line: *line,
                };
                let v = resolve(raw, spec.key, &values, env, 0)
                    .map_err(|m| ConfigError(format!("{source}: {m}")))?;
                (v, source)
            } else {
                (spec.default.to_string(), Source::Default)
            };
            check(spec, &value).map_err(|m| {
                ConfigError(format!(
                    "{source}: bad value for {}: {m}",
                    spec.key,
                    source = source
                ))
            })?;
            entries.insert(
                spec.key,
                Entry {
                    value,
                    source,
                    secret: spec.secret,
                },
            );
        }
        let mut settings = Settings {
            entries,
            users: Vec::new(),
        };
        settings.check_together()?;
        let realm = settings.get("auth.realm").to_string();
        for (fields, line) in raw_users {
            let source = Source::File {
                path: path.clone(),
                line,
            };
            let field = |name: &str| -> Result<Option<String>, ConfigError> {
                match fields.get(name) {
                    None => Ok(None),
                    Some((raw, l)) => resolve(raw, &format!("auth.users.{name}"), &values, env, 0)
                        .map(Some)
                        .map_err(|m| ConfigError(format!("{}:{l}: {m}", path.display()))),
                }
            };
            for f in fields.keys() {
                if !["name", "role", "password", "ha1_md5", "ha1_sha256"].contains(&f.as_str()) {
                    return Err(ConfigError(format!(
                        "{source}: unknown key 'auth.users.{f}' (a user has name, role and either password or ha1_md5 + ha1_sha256)"
                    )));
                }
            }
            let name = field("name")?
                .ok_or_else(|| ConfigError(format!("{source}: a user needs a name")))?;
            crate::auth::validate_user_name(&name)
                .map_err(|m| ConfigError(format!("{source}: {m}")))?;
            let role: Role = field("role")?
                .ok_or_else(|| {
                    ConfigError(format!(
                        "{source}: user {name} needs a role (admin, operator or viewer)"
                    ))
                })?
                .parse()
                .map_err(|m| ConfigError(format!("{source}: user {name}: {m}")))?;
            let record = match (field("password")?, field("ha1_md5")?, field("ha1_sha256")?) {
                (Some(p), None, None) => UserRecord::with_password(&name, role, &realm, &p),
                (None, Some(md5), Some(sha)) => UserRecord {
                    name: name.clone(),
                    role,
                    ha1_md5: md5,
                    ha1_sha256: sha,
                },
                _ => {
                    return Err(ConfigError(format!(
                        "{source}: user {name} needs either password or both ha1_md5 and ha1_sha256"
                    )));
                }
            };
            settings.users.push(FileUser { record, source });
        }
        Ok(settings)
    }

    /// Settings that make sense only together: a server's grace period must hold two
    /// heartbeat periods, or a server is judged down when one beat comes late. The refusal
    /// names the setting that was given (the grace period when both were).
    fn check_together(&self) -> Result<(), ConfigError> {
        let (beat, grace) = (
            self.count("health.heartbeat_ms"),
            self.count("health.grace_ms"),
        );
        if grace >= beat.saturating_mul(2) {
            return Ok(());
        }
        let grace_source = &self.entries["health.grace_ms"].source;
        let beat_source = &self.entries["health.heartbeat_ms"].source;
        let (source, key) = if *grace_source == Source::Default && *beat_source != Source::Default {
            (beat_source, "health.heartbeat_ms")
        } else {
            (grace_source, "health.grace_ms")
        };
        Err(ConfigError(format!(
            "{source}: bad value for {key}: the grace period (health.grace_ms = {grace} ms) must \
             hold two heartbeat periods (health.heartbeat_ms = {beat} ms), or a server is judged \
             down when one beat comes late; give a grace period of at least {} ms or a shorter \
             heartbeat period",
            beat.saturating_mul(2)
        )))
    }

    /// The value of a declared key.
    pub fn get(&self, key: &str) -> &str {
        &self
            .entries
            .get(key)
            .unwrap_or_else(|| panic!("undeclared setting {key}"))
            .value
    }

    fn count(&self, key: &str) -> u64 {
        self.get(key).parse().expect("checked at load")
    }

    fn weight(&self, key: &str) -> f64 {
        self.get(key).parse().expect("checked at load")
    }

    /// Every setting in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, &Entry)> {
        self.entries.iter().map(|(k, v)| (*k, v))
    }

    /// The `server.listen` address.
    pub fn listen(&self) -> std::net::SocketAddr {
        self.get("server.listen").parse().expect("checked at load")
    }

    /// The core's configuration (sections `server`, `database`, `queue`, `drivers.sim`).
    pub fn core(&self) -> CoreConfig {
        let mut c = CoreConfig::new(self.get("server.data_dir"));
        let url = self.get("database.url");
        c.database_url = (!url.is_empty()).then(|| url.to_string());
        c.db_connections = self.count("database.connections") as u32;
        // Each within its declared range (checked at load).
        c.queue.workers = self.count("queue.workers") as usize;
        c.queue.backoff_base = Duration::from_millis(self.count("queue.retry_base_ms"));
        c.queue.max_attempts = self.count("queue.max_attempts") as i32;
        c.queue.lease = Duration::from_millis(self.count("queue.lease_ms"));
        c.cluster.duty_lease = Duration::from_millis(self.count("cluster.duty_lease_ms"));
        // Default: the listen address, unless it is a wildcard that names no host.
        let url = self.get("cluster.advertise_url");
        let listen = self.listen();
        c.cluster.advertise_url = if !url.is_empty() {
            // Checked at load; without the slash agents would double.
            Some(crate::model::base_url(url).unwrap_or_else(|_| url.to_string()))
        } else {
            (!listen.ip().is_unspecified()).then(|| format!("http://{listen}"))
        };
        c.sim_servers = self.count("drivers.sim.servers") as u32;
        c.sim_latency = Duration::from_millis(self.count("drivers.sim.latency_ms"));
        c.health.heartbeat = Duration::from_millis(self.count("health.heartbeat_ms"));
        c.health.grace = Duration::from_millis(self.count("health.grace_ms"));
        c.health.check = Duration::from_millis(self.count("health.check_ms"));
        c.health.collector = Duration::from_secs(self.count("collector.interval_secs"));
        c.events_retention = Duration::from_secs(self.count("events.retention_secs"));
        c.health.rebalance_spread = self.count("rebalancer.spread_percent");
        c.health.rebalance_batch = self.count("rebalancer.batch") as usize;
        c.placement.weights = crate::placement::Weights {
            cpu: self.weight("placement.weight_cpu"),
            memory: self.weight("placement.weight_memory"),
            disk: self.weight("placement.weight_disk"),
            image: self.weight("placement.weight_image"),
        };
        c.placement.dummy_ttl = Some(Duration::from_secs(self.count("placement.dummy_ttl_secs")));
        c.placement.view_max_age = Some(Duration::from_millis(
            self.count("placement.view_max_age_ms"),
        ));
        let token = self.get("agents.token");
        c.agent_token = (!token.is_empty()).then(|| token.to_string());
        let token = self.get("metrics.token");
        c.metrics_token = (!token.is_empty()).then(|| token.to_string());
        c.auth = self.auth();
        c.plugin_limits.deadline = Duration::from_millis(self.count("plugins.deadline_ms"));
        c.plugin_limits.memory = (self.count("plugins.memory_mb") as usize) << 20;
        c
    }

    /// The `auth` section.
    pub fn auth(&self) -> AuthConfig {
        AuthConfig {
            realm: self.get("auth.realm").to_string(),
            anonymous: self
                .get("auth.anonymous")
                .parse()
                .unwrap_or(Anonymous::Read),
            anonymous_read: crate::auth::Family::parse_list(self.get("auth.anonymous_read"))
                .expect("checked when loaded"),
            nonce_ttl: Duration::from_secs(self.count("auth.nonce_ttl_secs")),
            users: self.users.iter().map(|u| u.record.clone()).collect(),
        }
    }

    /// What `config show --json` prints: every setting (secrets masked) with its source, and
    /// the users of the file (without passwords).
    pub fn show_json(&self) -> serde_json::Value {
        let settings: Vec<serde_json::Value> = self
            .entries()
            .map(|(key, e)| {
                let value = if e.secret && !e.value.is_empty() {
                    mask(&e.value)
                } else {
                    e.value.clone()
                };
                serde_json::json!({ "key": key, "value": value, "source": e.source.to_string() })
            })
            .collect();
        let users: Vec<serde_json::Value> = self
            .users
            .iter()
            .map(|u| {
                serde_json::json!({
                    "name": u.record.name,
                    "role": u.record.role.to_string(),
                    "source": u.source.to_string(),
                })
            })
            .collect();
        serde_json::json!({ "settings": settings, "users": users })
    }

    /// The effective configuration as text, secrets masked, with the source of each value.
    pub fn show(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
            .set_header(vec!["KEY", "VALUE", "SOURCE"]);
        for (key, e) in self.entries() {
            let value = if e.secret && !e.value.is_empty() {
                mask(&e.value)
            } else {
                e.value.clone()
            };
            t.add_row(vec![key.to_string(), value, e.source.to_string()]);
        }
        for u in &self.users {
            t.add_row(vec![
                format!("auth.users.{}", u.record.name),
                format!("role {}, password ****", u.record.role),
                u.source.to_string(),
            ]);
        }
        t.to_string()
    }
}

/// Masks a secret; URLs keep their scheme and host so the operator can tell which one it is.
fn mask(value: &str) -> String {
    match value.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let host = host.split('/').next().unwrap_or("");
            format!("{scheme}://****@{host}/****")
        }
        None => "****".into(),
    }
}

/// The environment of the process, for `Settings::load`.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(pairs: &[(&str, &str)]) -> FileValues {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), (v.to_string(), 1)))
            .collect()
    }

    fn env(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/ada".to_string())
    }

    #[test]
    fn placeholders_take_keys_then_the_environment_then_their_default() {
        let f = file(&[("data", "${HOME_DIR}/c48"), ("name", "core-${region:eu}")]);
        assert_eq!(
            resolve("${data}/db", "k", &f, &env, 0).unwrap(),
            "/home/ada/c48/db"
        );
        assert_eq!(resolve("${name}", "k", &f, &env, 0).unwrap(), "core-eu");
        assert_eq!(
            resolve("${HOME_DIR:/tmp}", "k", &f, &env, 0).unwrap(),
            "/home/ada"
        );
        assert_eq!(
            resolve("cost $$5, $x", "k", &f, &env, 0).unwrap(),
            "cost $5, $x"
        );
    }

    #[test]
    fn a_placeholder_that_cannot_resolve_says_how_to_fix_it() {
        let f = file(&[("a", "${b}"), ("b", "${a}")]);
        let e = resolve("${MISSING}", "auth.realm", &f, &env, 0).unwrap_err();
        assert!(
            e.contains("${MISSING} in auth.realm") && e.contains("${MISSING:value}"),
            "{e}"
        );
        assert!(
            resolve("${a}", "k", &f, &env, 0)
                .unwrap_err()
                .contains("cycle")
        );
        assert!(
            resolve("${open", "k", &f, &env, 0)
                .unwrap_err()
                .contains("unclosed")
        );
    }

    #[test]
    fn a_grace_period_shorter_than_two_heartbeats_is_refused_naming_what_was_given() {
        let flags = |beat: &str, grace: &str| {
            BTreeMap::from([
                ("health.heartbeat_ms", beat.to_string()),
                ("health.grace_ms", grace.to_string()),
            ])
        };
        let none = |_: &str| None;
        let e = Settings::load(None, &none, &flags("500", "400")).unwrap_err();
        assert!(
            e.0.starts_with("flag --grace-ms: bad value for health.grace_ms")
                && e.0.contains("at least 1000 ms"),
            "{}",
            e.0
        );
        assert!(Settings::load(None, &none, &flags("500", "999")).is_err());
        let ok = Settings::load(None, &none, &flags("500", "1000")).unwrap();
        assert_eq!(ok.core().health.grace, Duration::from_millis(1000));
        assert!(Settings::load(None, &none, &BTreeMap::new()).is_ok());
        // Only the heartbeat given (the grace period is the default 2000 ms): it is named.
        let beat = BTreeMap::from([("health.heartbeat_ms", "5000".to_string())]);
        let e = Settings::load(None, &none, &beat).unwrap_err();
        assert!(
            e.0.starts_with("flag --heartbeat-ms: bad value for health.heartbeat_ms"),
            "{}",
            e.0
        );
    }

    /// The URL a core tells agents it listens at must be one (it was shown as given, and
    /// agents were told "not a url").
    #[test]
    fn an_advertised_url_that_is_not_one_is_refused() {
        let none = |_: &str| None;
        let flag = |url: &str| BTreeMap::from([("cluster.advertise_url", url.to_string())]);
        let e = Settings::load(None, &none, &flag("not a url")).unwrap_err();
        assert!(
            e.0.contains("cluster.advertise_url") && e.0.contains("is not an http:// URL"),
            "{}",
            e.0
        );
        let ok = Settings::load(None, &none, &flag("http://10.0.0.1:4848/")).unwrap();
        assert_eq!(
            ok.core().cluster.advertise_url.as_deref(),
            Some("http://10.0.0.1:4848")
        );
    }

    /// A value the core cannot work with (no workers, a lease shorter than its renewal
    /// period, a percentage past 100) is refused naming the range; it was taken, shown as
    /// given, and quietly raised.
    #[test]
    fn values_out_of_their_range_are_refused_with_the_range() {
        let none = |_: &str| None;
        for (key, value, range) in [
            ("queue.workers", "0", "from 1 to"),
            ("queue.lease_ms", "1", "from 300 to"),
            ("database.connections", "1", "from 2 to"),
            ("rebalancer.spread_percent", "101", "from 0 to 100"),
        ] {
            let given = BTreeMap::from([(key, value.to_string())]);
            let e = Settings::load(None, &none, &given).unwrap_err();
            assert!(
                e.0.contains(&format!("bad value for {key}"))
                    && e.0.contains(&format!("{value} is out of range"))
                    && e.0.contains(range),
                "{}",
                e.0
            );
        }
        // An agents token agents would refuse (shorter than 16 characters).
        let env = |name: &str| (name == "CLOUD48_AGENT_TOKEN").then(|| "short".to_string());
        let e = Settings::load(None, &env, &BTreeMap::new()).unwrap_err();
        assert!(
            e.0.contains("bad value for agents.token") && e.0.contains("shorter than 16"),
            "{}",
            e.0
        );
        let ok = BTreeMap::from([("queue.workers", "1".to_string())]);
        assert_eq!(
            Settings::load(None, &none, &ok)
                .unwrap()
                .core()
                .queue
                .workers,
            1
        );
    }

    #[test]
    fn secrets_are_masked_but_urls_keep_their_host() {
        assert_eq!(mask("s3cret"), "****");
        assert_eq!(
            mask("postgres://u:pw@db.example:5432/c48"),
            "postgres://****@db.example:5432/****"
        );
    }
}
