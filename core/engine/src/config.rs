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

/// A configuration error with the place it comes from.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// What kind of value a setting takes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Count,
    /// A decimal number from 0 to 1000 (placement weights).
    Weight,
    Address,
    Choice(&'static [&'static str]),
    /// A comma-separated list of endpoint families.
    Families,
}

/// One setting.
struct Spec {
    key: &'static str,
    env: &'static str,
    flag: &'static str,
    default: &'static str,
    secret: bool,
    kind: Kind,
}

const SETTINGS: &[Spec] = &[
    Spec {
        key: "server.listen",
        env: "CLOUD48_LISTEN",
        flag: "--listen",
        default: "127.0.0.1:4848",
        secret: false,
        kind: Kind::Address,
    },
    Spec {
        key: "server.data_dir",
        env: "CLOUD48_DATA_DIR",
        flag: "--data-dir",
        default: "./cloud48-data",
        secret: false,
        kind: Kind::Text,
    },
    Spec {
        key: "database.url",
        env: "CLOUD48_DATABASE_URL",
        flag: "--database-url",
        default: "",
        secret: true,
        kind: Kind::Text,
    },
    Spec {
        key: "database.connections",
        env: "CLOUD48_DB_CONNECTIONS",
        flag: "--db-connections",
        default: "5",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "queue.workers",
        env: "CLOUD48_WORKERS",
        flag: "--workers",
        default: "256",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "queue.retry_base_ms",
        env: "CLOUD48_RETRY_BASE_MS",
        flag: "--retry-base-ms",
        default: "200",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "queue.max_attempts",
        env: "CLOUD48_MAX_ATTEMPTS",
        flag: "--max-attempts",
        default: "5",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "queue.lease_ms",
        env: "CLOUD48_LEASE_MS",
        flag: "--lease-ms",
        default: "2000",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "cluster.duty_lease_ms",
        env: "CLOUD48_DUTY_LEASE_MS",
        flag: "--duty-lease-ms",
        default: "3000",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "cluster.advertise_url",
        env: "CLOUD48_ADVERTISE_URL",
        flag: "--advertise-url",
        default: "",
        secret: false,
        kind: Kind::Text,
    },
    Spec {
        key: "drivers.sim.servers",
        env: "CLOUD48_SIM_SERVERS",
        flag: "--sim-servers",
        default: "4",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "drivers.sim.latency_ms",
        env: "CLOUD48_SIM_LATENCY_MS",
        flag: "--sim-latency-ms",
        default: "0",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "health.heartbeat_ms",
        env: "CLOUD48_HEARTBEAT_MS",
        flag: "--heartbeat-ms",
        default: "500",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "health.grace_ms",
        env: "CLOUD48_GRACE_MS",
        flag: "--grace-ms",
        default: "2000",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "health.check_ms",
        env: "CLOUD48_HEALTH_CHECK_MS",
        flag: "--health-check-ms",
        default: "250",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "collector.interval_secs",
        env: "CLOUD48_COLLECTOR_SECS",
        flag: "--collector-secs",
        default: "30",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "events.retention_secs",
        env: "CLOUD48_EVENTS_RETENTION_SECS",
        flag: "--events-retention-secs",
        default: "86400",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "rebalancer.spread_percent",
        env: "CLOUD48_REBALANCE_SPREAD",
        flag: "--rebalance-spread",
        default: "0",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "rebalancer.batch",
        env: "CLOUD48_REBALANCE_BATCH",
        flag: "--rebalance-batch",
        default: "2",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "placement.weight_cpu",
        env: "CLOUD48_WEIGHT_CPU",
        flag: "--weight-cpu",
        default: "1",
        secret: false,
        kind: Kind::Weight,
    },
    Spec {
        key: "placement.weight_memory",
        env: "CLOUD48_WEIGHT_MEMORY",
        flag: "--weight-memory",
        default: "1",
        secret: false,
        kind: Kind::Weight,
    },
    Spec {
        key: "placement.weight_disk",
        env: "CLOUD48_WEIGHT_DISK",
        flag: "--weight-disk",
        default: "0.5",
        secret: false,
        kind: Kind::Weight,
    },
    Spec {
        key: "placement.weight_image",
        env: "CLOUD48_WEIGHT_IMAGE",
        flag: "--weight-image",
        default: "0.25",
        secret: false,
        kind: Kind::Weight,
    },
    Spec {
        key: "placement.dummy_ttl_secs",
        env: "CLOUD48_DUMMY_TTL_SECS",
        flag: "--dummy-ttl-secs",
        default: "600",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "plugins.deadline_ms",
        env: "CLOUD48_PLUGIN_DEADLINE_MS",
        flag: "--plugin-deadline-ms",
        default: "100",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "plugins.memory_mb",
        env: "CLOUD48_PLUGIN_MEMORY_MB",
        flag: "--plugin-memory-mb",
        default: "64",
        secret: false,
        kind: Kind::Count,
    },
    Spec {
        key: "auth.anonymous",
        env: "CLOUD48_ANONYMOUS",
        flag: "--anonymous",
        default: "read",
        secret: false,
        kind: Kind::Choice(&["none", "read", "full"]),
    },
    Spec {
        key: "auth.anonymous_read",
        env: "CLOUD48_ANONYMOUS_READ",
        flag: "--anonymous-read",
        default: "fleet,environments",
        secret: false,
        kind: Kind::Families,
    },
    Spec {
        key: "auth.realm",
        env: "CLOUD48_REALM",
        flag: "--realm",
        default: "cloud48",
        secret: false,
        kind: Kind::Text,
    },
    Spec {
        key: "metrics.token",
        env: "CLOUD48_METRICS_TOKEN",
        // A secret: no flag, so that it never shows in the process list.
        flag: "",
        default: "",
        secret: true,
        kind: Kind::Text,
    },
    Spec {
        key: "agents.token",
        env: "CLOUD48_AGENT_TOKEN",
        // A secret: no flag, so that it never shows in the process list.
        flag: "",
        default: "",
        secret: true,
        kind: Kind::Text,
    },
    Spec {
        key: "auth.nonce_ttl_secs",
        env: "CLOUD48_NONCE_TTL_SECS",
        flag: "--nonce-ttl-secs",
        default: "300",
        secret: false,
        kind: Kind::Count,
    },
];

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

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Raw values read from a file: key -> (value, line).
type FileValues = HashMap<String, (String, usize)>;

/// Per `[[users]]` table: its keys with (value, line), and the table's line.
type UserTables = Vec<(HashMap<String, (String, usize)>, usize)>;

fn walk(
    text: &str,
    path: &Path,
    prefix: &str,
    table: &dyn toml_edit::TableLike,
    out: &mut FileValues,
    users: &mut UserTables,
) -> Result<(), ConfigError> {
    for (name, item) in table.iter() {
        let key = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        let line = table
            .key(name)
            .and_then(|k| k.span())
            .or_else(|| item.span())
            .map_or(0, |s| line_of(text, s.start));
        let at = || format!("{}:{line}", path.display());
        if key == "auth.users" {
            let Some(array) = item.as_array_of_tables() else {
                return Err(ConfigError(format!(
                    "{}: auth.users must be written as [[auth.users]] tables",
                    at()
                )));
            };
            for t in array.iter() {
                let tline = t.span().map_or(line, |s| line_of(text, s.start));
                let mut fields = HashMap::new();
                for (field, v) in t.iter() {
                    let fline = t
                        .key(field)
                        .and_then(|k| k.span())
                        .map_or(tline, |s| line_of(text, s.start));
                    let Some(s) = v.as_str() else {
                        return Err(ConfigError(format!(
                            "{}:{fline}: auth.users.{field} must be a string",
                            path.display()
                        )));
                    };
                    fields.insert(field.to_string(), (s.to_string(), fline));
                }
                users.push((fields, tline));
            }
            continue;
        }
        if let Some(t) = item.as_table_like() {
            walk(text, path, &key, t, out, users)?;
            continue;
        }
        let Some(spec) = SETTINGS.iter().find(|s| s.key == key) else {
            let known: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
            return Err(ConfigError(format!(
                "{}: unknown key '{key}' (known keys: {}, auth.users)",
                at(),
                known.join(", ")
            )));
        };
        let value = match item.as_value() {
            Some(toml_edit::Value::String(s)) => s.value().clone(),
            Some(toml_edit::Value::Integer(i)) => i.value().to_string(),
            Some(toml_edit::Value::Float(f)) => f.value().to_string(),
            Some(toml_edit::Value::Boolean(b)) => b.value().to_string(),
            _ => {
                return Err(ConfigError(format!(
                    "{}: {} must be a string or a number",
                    at(),
                    spec.key
                )));
            }
        };
        out.insert(key, (value, line));
    }
    Ok(())
}

/// Resolves `${NAME}` and `${NAME:default}` in `raw` (`$$` is a literal `$`).
fn resolve(
    raw: &str,
    key: &str,
    file: &FileValues,
    env: &dyn Fn(&str) -> Option<String>,
    depth: usize,
) -> Result<String, String> {
    if depth > 10 {
        return Err(format!(
            "placeholders in {key} refer to each other in a cycle"
        ));
    }
    let mut out = String::new();
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            return Err(format!("unclosed placeholder '${{{body}' in {key}"));
        };
        let inner = &body[..end];
        let (name, default) = match inner.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let value = if let Some((v, _)) = file.get(name) {
            Some(resolve(v, name, file, env, depth + 1)?)
        } else {
            env(name)
        };
        match value.or_else(|| default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "unresolved placeholder ${{{name}}} in {key}: set the environment variable {name}, define the key {name}, or give a default as ${{{name}:value}}"
                ));
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every declared setting: its key, its flag of `cloud48 serve` ("" for secrets, which only
/// come from the environment or the file) and its default.
pub fn declared() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    SETTINGS.iter().map(|s| (s.key, s.flag, s.default))
}

fn check(spec: &Spec, value: &str) -> Result<(), String> {
    match spec.kind {
        Kind::Text => Ok(()),
        Kind::Count => value
            .parse::<u64>()
            .map(|_| ())
            .map_err(|_| format!("'{value}' is not a whole number")),
        Kind::Weight => match value.parse::<f64>() {
            Ok(w) if w.is_finite() && (0.0..=1000.0).contains(&w) => Ok(()),
            _ => Err(format!(
                "'{value}' is not a weight: give a decimal number from 0 to 1000, such as 0.5"
            )),
        },
        Kind::Address => value
            .parse::<std::net::SocketAddr>()
            .map(|_| ())
            .map_err(|_| format!("'{value}' is not an address like 127.0.0.1:4848")),
        Kind::Families => crate::auth::Family::parse_list(value).map(|_| ()),
        Kind::Choice(options) => {
            if options.contains(&value) {
                Ok(())
            } else {
                Err(format!("'{value}' is not one of {}", options.join(", ")))
            }
        }
    }
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
        c.queue.workers = (self.count("queue.workers") as usize).max(1);
        c.queue.backoff_base = Duration::from_millis(self.count("queue.retry_base_ms"));
        c.queue.max_attempts = (self.count("queue.max_attempts") as i32).max(1);
        c.queue.lease = Duration::from_millis(self.count("queue.lease_ms").max(300));
        c.cluster.duty_lease = Duration::from_millis(self.count("cluster.duty_lease_ms").max(300));
        // Default: the listen address, unless it is a wildcard that names no host.
        let url = self.get("cluster.advertise_url");
        let listen = self.listen();
        c.cluster.advertise_url = if !url.is_empty() {
            Some(url.to_string())
        } else {
            (!listen.ip().is_unspecified()).then(|| format!("http://{listen}"))
        };
        c.sim_servers = self.count("drivers.sim.servers") as u32;
        c.sim_latency = Duration::from_millis(self.count("drivers.sim.latency_ms"));
        c.health.heartbeat = Duration::from_millis(self.count("health.heartbeat_ms").max(10));
        c.health.grace = Duration::from_millis(self.count("health.grace_ms").max(10));
        c.health.check = Duration::from_millis(self.count("health.check_ms").max(10));
        c.health.collector = Duration::from_secs(self.count("collector.interval_secs").max(1));
        c.events_retention = Duration::from_secs(self.count("events.retention_secs").max(1));
        c.health.rebalance_spread = self.count("rebalancer.spread_percent").min(100);
        c.health.rebalance_batch = self.count("rebalancer.batch").max(1) as usize;
        c.placement.weights = crate::placement::Weights {
            cpu: self.weight("placement.weight_cpu"),
            memory: self.weight("placement.weight_memory"),
            disk: self.weight("placement.weight_disk"),
            image: self.weight("placement.weight_image"),
        };
        c.placement.dummy_ttl = Some(Duration::from_secs(
            self.count("placement.dummy_ttl_secs").max(1),
        ));
        let token = self.get("agents.token");
        c.agent_token = (!token.is_empty()).then(|| token.to_string());
        let token = self.get("metrics.token");
        c.metrics_token = (!token.is_empty()).then(|| token.to_string());
        c.auth = self.auth();
        c.plugin_limits.deadline = Duration::from_millis(self.count("plugins.deadline_ms").max(1));
        c.plugin_limits.memory = (self.count("plugins.memory_mb").clamp(1, 4096) as usize) << 20;
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
            nonce_ttl: Duration::from_secs(self.count("auth.nonce_ttl_secs").max(1)),
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
    fn secrets_are_masked_but_urls_keep_their_host() {
        assert_eq!(mask("s3cret"), "****");
        assert_eq!(
            mask("postgres://u:pw@db.example:5432/c48"),
            "postgres://****@db.example:5432/****"
        );
    }
}
