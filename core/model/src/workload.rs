//! What runs inside a container, as its type declares it (WIT 0.2.0 `workload`), and the
//! parameters a container of a type takes. The core passes both to the driver in the create spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A container's parameters by name (values as text, checked against their `ParamSpec`).
pub type Params = BTreeMap<String, String>;

/// Transport of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// HTTP over TCP.
    Http,
}

/// A named port the workload listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Endpoint {
    /// Name, unique within the type.
    pub name: String,
    /// Port inside the container.
    pub port: u16,
    /// Transport.
    pub protocol: Protocol,
}

/// What tells that the workload is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Check {
    /// Ready once running.
    None,
    /// A TCP connection to the named endpoint succeeds.
    Tcp {
        /// Endpoint name.
        endpoint: String,
    },
    /// An HTTP GET of `path` on the named endpoint answers 2xx or 3xx.
    Http {
        /// Endpoint name.
        endpoint: String,
        /// Path, e.g. `/health`.
        path: String,
    },
    /// This command, run inside the container, exits 0.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
}

/// A readiness check and its timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Readiness {
    /// What to check.
    pub check: Check,
    /// Milliseconds between attempts.
    pub interval_ms: u32,
    /// Attempts before the container counts as not ready.
    pub retries: u32,
}

/// A path whose content belongs to the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Volume {
    /// Name, unique within the type.
    pub name: String,
    /// Absolute path inside the container.
    pub path: String,
}

/// An image reference and the digest that pins it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageRef {
    /// Reference, e.g. `cloud48/nginx:1.22`.
    pub reference: String,
    /// `sha256:...`; none: the newest image of the reference the core holds.
    pub digest: Option<String>,
}

/// What runs in a container of a type. Empty (the default) for types that declare none (WIT
/// 0.1.0 plugins, the built-in `plain`): the driver runs its idle default.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct Workload {
    /// Its image; none runs the command on the server's own files.
    pub image: Option<ImageRef>,
    /// Program and arguments; `${name}` is replaced by parameter `name`.
    pub command: Vec<String>,
    /// Environment variables as `[name, value]` pairs; `${name}` in values is replaced by
    /// parameter `name`.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Vec<String>>))]
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Ports it listens on.
    pub endpoints: Vec<Endpoint>,
    /// When it is ready.
    pub readiness: Option<Readiness>,
    /// Paths whose content is the container's own.
    pub volumes: Vec<Volume>,
}

impl Workload {
    /// True when nothing at all is declared (no image, command, endpoint, volume, ...).
    pub fn is_default(&self) -> bool {
        *self == Workload::default()
    }

    /// True when the type declares nothing to run.
    pub fn is_empty(&self) -> bool {
        self.image.is_none() && self.command.is_empty()
    }

    /// The texts placeholders are filled in: command, environment values, readiness check
    /// (HTTP path, exec command).
    fn texts(&self) -> impl Iterator<Item = &String> {
        let check = self.readiness.as_ref().map(|r| &r.check);
        let path = match check {
            Some(Check::Http { path, .. }) => Some(path),
            _ => None,
        };
        let exec = match check {
            Some(Check::Exec { command }) => command.as_slice(),
            _ => &[],
        };
        (self.command.iter())
            .chain(self.env.iter().map(|(_, v)| v))
            .chain(path)
            .chain(exec)
    }

    /// Names of the secrets the workload receives: `${secret:NAME}` placeholders (their
    /// values come from the core, per environment; see the engine's `secrets`).
    pub fn secrets(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for text in self.texts() {
            let mut rest = text.as_str();
            while let Some(start) = rest.find(SECRET_PLACEHOLDER) {
                rest = &rest[start + SECRET_PLACEHOLDER.len()..];
                if let Some(end) = rest.find('}') {
                    out.insert(rest[..end].to_string());
                    rest = &rest[end + 1..];
                }
            }
        }
        out
    }

    /// Checks names, paths and references; says which entry is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for name in self.secrets() {
            crate::validate_name(&name)
                .map_err(|m| format!("secret placeholder '${{secret:{name}}}': {m}"))?;
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &self.endpoints {
            crate::validate_name(&e.name).map_err(|m| format!("endpoint name: {m}"))?;
            if !names.insert(&e.name) {
                return Err(format!("endpoint '{}' is declared twice", e.name));
            }
            if e.port == 0 {
                return Err(format!("endpoint '{}': port 0 is not a port", e.name));
            }
        }
        if let Some(r) = &self.readiness {
            let endpoint = match &r.check {
                Check::Tcp { endpoint } | Check::Http { endpoint, .. } => Some(endpoint),
                Check::None | Check::Exec { .. } => None,
            };
            if let Some(name) = endpoint
                && !self.endpoints.iter().any(|e| &e.name == name)
            {
                return Err(format!(
                    "the readiness check names endpoint '{name}', which the workload does not declare"
                ));
            }
            if let Check::Exec { command } = &r.check
                && command.is_empty()
            {
                return Err("the readiness check runs an empty command".into());
            }
        }
        let mut volumes = std::collections::BTreeSet::new();
        for v in &self.volumes {
            crate::validate_name(&v.name).map_err(|m| format!("volume name: {m}"))?;
            if !volumes.insert(&v.name) {
                return Err(format!("volume '{}' is declared twice", v.name));
            }
            if !v.path.starts_with('/') || v.path.split('/').any(|p| p == "..") {
                return Err(format!(
                    "volume '{}': '{}' is not an absolute path without '..'",
                    v.name, v.path
                ));
            }
        }
        if let Some(i) = &self.image {
            if i.reference.trim().is_empty() {
                return Err("the image reference is empty".into());
            }
            if let Some(d) = &i.digest
                && !(d.len() == 71
                    && d.starts_with("sha256:")
                    && d[7..].bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!(
                    "image digest '{d}' is not sha256: followed by 64 hex digits"
                ));
            }
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("environment variable name '{k}' is not valid"));
            }
        }
        Ok(())
    }

    /// This workload with `${name}` in the command, environment values and readiness check
    /// (HTTP path, exec command) replaced by the parameters (an unknown placeholder stays as
    /// written).
    pub fn with_params(&self, params: &Params) -> Workload {
        let fill = |s: &String| substitute(s, params);
        let readiness = self.readiness.as_ref().map(|r| Readiness {
            check: match &r.check {
                Check::Http { endpoint, path } => Check::Http {
                    endpoint: endpoint.clone(),
                    path: fill(path),
                },
                Check::Exec { command } => Check::Exec {
                    command: command.iter().map(fill).collect(),
                },
                other => other.clone(),
            },
            ..r.clone()
        });
        Workload {
            command: self.command.iter().map(fill).collect(),
            env: self.env.iter().map(|(k, v)| (k.clone(), fill(v))).collect(),
            readiness,
            ..self.clone()
        }
    }
}

/// How a workload names a secret it receives: `${secret:NAME}`.
pub const SECRET_PLACEHOLDER: &str = "${secret:";

/// The key of secret `name` in the values `Workload::with_params` fills in (no parameter name
/// has a colon, so the two never meet).
pub fn secret_param(name: &str) -> String {
    format!("secret:{name}")
}

fn substitute(s: &str, params: &Params) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) if params.contains_key(&after[..end]) => {
                out.push_str(&params[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Kind of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    /// Any text.
    Text,
    /// A decimal integer (i64).
    Integer,
    /// `true` or `false`.
    Boolean,
}

/// One parameter a container of a type takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ParamSpec {
    /// Name (also the `${name}` placeholder in the workload).
    pub name: String,
    /// Kind of value.
    pub kind: ParamKind,
    /// Value when none is given; none makes the parameter required.
    pub default: Option<String>,
    /// One line for humans.
    pub description: String,
    /// Whether another member's hook may change it (`set-params`).
    pub settable: bool,
}

impl ParamSpec {
    /// Checks `value` against the kind; says what is expected otherwise.
    pub fn check(&self, value: &str) -> Result<(), String> {
        if self.kind == ParamKind::Integer
            && let Err(e) = value.parse::<i64>()
            && matches!(
                e.kind(),
                std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow
            )
        {
            return Err(format!(
                "parameter '{}' is a decimal integer from {} to {}, not '{value}'",
                self.name,
                i64::MIN,
                i64::MAX
            ));
        }
        let ok = match self.kind {
            ParamKind::Text => !value.contains('\0'),
            ParamKind::Integer => value.parse::<i64>().is_ok(),
            ParamKind::Boolean => matches!(value, "true" | "false"),
        };
        if ok {
            return Ok(());
        }
        let expected = match self.kind {
            ParamKind::Text => "text without NUL bytes",
            ParamKind::Integer => "a decimal integer",
            ParamKind::Boolean => "true or false",
        };
        Err(format!(
            "parameter '{}' must be {expected}, not '{value}'",
            self.name
        ))
    }
}

/// Checks a type's parameter schema: valid unique names, defaults of the declared kind.
pub fn validate_schema(specs: &[ParamSpec]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for s in specs {
        crate::validate_name(&s.name).map_err(|m| format!("parameter name: {m}"))?;
        if !names.insert(&s.name) {
            return Err(format!("parameter '{}' is declared twice", s.name));
        }
        if let Some(d) = &s.default {
            s.check(d).map_err(|m| format!("default: {m}"))?;
        }
    }
    Ok(())
}

/// The full parameters of a new container: `given` checked against `specs`, defaults filled
/// in. Names an unknown parameter (with the known ones), a bad value or a missing required one.
pub fn resolve_params(specs: &[ParamSpec], given: &Params) -> Result<Params, String> {
    for name in given.keys() {
        if !specs.iter().any(|s| &s.name == name) {
            let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(if known.is_empty() {
                format!("unknown parameter '{name}': this type takes no parameters")
            } else {
                format!(
                    "unknown parameter '{name}' (this type takes: {})",
                    known.join(", ")
                )
            });
        }
    }
    filled(specs, given, |s| {
        format!(
            "parameter '{}' is required ({}); give it as {}=VALUE",
            s.name, s.description, s.name
        )
    })
}

/// A value for every parameter of `specs`: from `values`, or its default (each checked),
/// `missing` saying why where there is neither; values of undeclared names are left out.
fn filled(
    specs: &[ParamSpec],
    values: &Params,
    missing: impl Fn(&ParamSpec) -> String,
) -> Result<Params, String> {
    let mut out = Params::new();
    for s in specs {
        let v = values
            .get(&s.name)
            .or(s.default.as_ref())
            .ok_or_else(|| missing(s))?;
        s.check(v)?;
        out.insert(s.name.clone(), v.clone());
    }
    Ok(out)
}

/// The parameters of a container moving to a version of its type that declares `specs`: its
/// values of the parameters still declared (each checked against the new declaration), the
/// defaults of new ones; parameters no longer declared are dropped. A new parameter without a
/// default has no value for the containers that exist: refused, naming it.
pub fn upgrade_params(specs: &[ParamSpec], current: &Params) -> Result<Params, String> {
    filled(specs, current, |s| {
        format!(
            "the new version requires parameter '{}' ({}), which containers made before it do \
             not have: give it a default in the new version",
            s.name, s.description
        )
    })
}

/// `current` with `changes` applied, where every changed parameter exists and is `settable`
/// (a hook of another member changes it).
pub fn apply_settable(
    specs: &[ParamSpec],
    current: &Params,
    changes: &Params,
) -> Result<Params, String> {
    let mut out = current.clone();
    for (name, value) in changes {
        let spec = specs
            .iter()
            .find(|s| &s.name == name)
            .ok_or_else(|| format!("the type has no parameter '{name}'"))?;
        if !spec.settable {
            return Err(format!(
                "parameter '{name}' is not settable by other members"
            ));
        }
        spec.check(value)?;
        out.insert(name.clone(), value.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: ParamKind, default: Option<&str>) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            kind,
            default: default.map(Into::into),
            description: format!("the {name}"),
            settable: name == "primary",
        }
    }

    fn params(kv: &[(&str, &str)]) -> Params {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_take_defaults_and_refuse_unknown_missing_and_mistyped_values() {
        let specs = [
            spec("heap-mb", ParamKind::Integer, Some("256")),
            spec("db", ParamKind::Text, None),
            spec("primary", ParamKind::Text, Some("")),
        ];
        let got = resolve_params(&specs, &params(&[("db", "shop")])).unwrap();
        assert_eq!(
            got,
            params(&[("heap-mb", "256"), ("db", "shop"), ("primary", "")])
        );
        let e = resolve_params(&specs, &params(&[])).unwrap_err();
        assert!(
            e.contains("'db' is required") && e.contains("db=VALUE"),
            "{e}"
        );
        let e = resolve_params(&specs, &params(&[("db", "x"), ("heap", "1")])).unwrap_err();
        assert!(
            e.contains("unknown parameter 'heap'") && e.contains("heap-mb"),
            "{e}"
        );
        let e = resolve_params(&specs, &params(&[("db", "x"), ("heap-mb", "big")])).unwrap_err();
        assert!(e.contains("decimal integer") && e.contains("big"), "{e}");
        let huge = "99999999999999999999";
        let e = resolve_params(&specs, &params(&[("db", "x"), ("heap-mb", huge)])).unwrap_err();
        assert!(e.contains(&format!("to {}, not '{huge}'", i64::MAX)), "{e}");
        assert!(validate_schema(&[spec("on", ParamKind::Boolean, Some("yes"))]).is_err());
        let twice = [
            spec("a", ParamKind::Text, None),
            spec("a", ParamKind::Text, None),
        ];
        assert!(validate_schema(&twice).unwrap_err().contains("twice"));
    }

    #[test]
    fn an_upgrade_keeps_values_fills_new_defaults_drops_the_undeclared_and_refuses_new_required() {
        let specs = [
            spec("heap", ParamKind::Integer, Some("256")),
            spec("size", ParamKind::Integer, Some("64")),
        ];
        let out = upgrade_params(&specs, &params(&[("heap", "512"), ("gone", "x")])).unwrap();
        assert_eq!(out, params(&[("heap", "512"), ("size", "64")]));
        let needed = [spec("needed", ParamKind::Text, None)];
        let err = upgrade_params(&needed, &Params::new()).unwrap_err();
        assert!(
            err.contains("requires parameter 'needed'") && err.contains("give it a default"),
            "{err}"
        );
        // A value the new declaration does not accept is named.
        let err = upgrade_params(&specs, &params(&[("heap", "lots")])).unwrap_err();
        assert!(
            err.contains("parameter 'heap' must be a decimal integer"),
            "{err}"
        );
    }

    #[test]
    fn only_settable_parameters_change_through_set_params() {
        let specs = [
            spec("db", ParamKind::Text, None),
            spec("primary", ParamKind::Text, Some("")),
        ];
        let current = params(&[("db", "shop"), ("primary", "")]);
        let next = apply_settable(&specs, &current, &params(&[("primary", "10.0.0.2")])).unwrap();
        assert_eq!(next["primary"], "10.0.0.2");
        let e = apply_settable(&specs, &current, &params(&[("db", "other")])).unwrap_err();
        assert!(e.contains("not settable"), "{e}");
        assert!(apply_settable(&specs, &current, &params(&[("x", "1")])).is_err());
    }

    #[test]
    fn placeholders_are_filled_from_parameters_and_unknown_ones_stay() {
        let w = Workload {
            command: vec!["java".into(), "-Xmx${heap-mb}m".into(), "${nope}".into()],
            env: vec![("CTX".into(), "/${path}/${path}".into())],
            readiness: Some(Readiness {
                check: Check::Http {
                    endpoint: "http".into(),
                    path: "/${path}/health".into(),
                },
                interval_ms: 100,
                retries: 10,
            }),
            ..Workload::default()
        };
        let p = params(&[("heap-mb", "512"), ("path", "app")]);
        let w = w.with_params(&p);
        assert_eq!(w.command, ["java", "-Xmx512m", "${nope}"]);
        assert_eq!(w.env[0].1, "/app/app");
        assert!(
            matches!(&w.readiness.as_ref().unwrap().check, Check::Http { path, .. } if path == "/app/health")
        );
        assert_eq!(substitute("a${b", &p), "a${b");
    }

    #[test]
    fn secrets_are_named_by_placeholders_and_filled_like_parameters() {
        let w = Workload {
            command: vec!["db".into(), "--key=${secret:api}".into()],
            env: vec![("PW".into(), "${secret:db}${secret:db}".into())],
            readiness: Some(Readiness {
                check: Check::Exec {
                    command: vec!["ping".into(), "${secret:check}".into(), "${secret:".into()],
                },
                interval_ms: 100,
                retries: 10,
            }),
            ..Workload::default()
        };
        let names: Vec<String> = w.secrets().into_iter().collect();
        assert_eq!(names, ["api", "check", "db"]);
        w.validate().unwrap();
        let p = params(&[(&secret_param("db"), "s3"), ("heap-mb", "1")]);
        let filled = w.with_params(&p);
        assert_eq!(filled.env[0].1, "s3s3");
        assert_eq!(filled.command[1], "--key=${secret:api}");
        let bad = Workload {
            env: vec![("PW".into(), "${secret:Bad Name}".into())],
            ..Workload::default()
        };
        let e = bad.validate().unwrap_err();
        assert!(e.contains("${secret:Bad Name}"), "{e}");
    }

    #[test]
    fn a_workload_names_only_endpoints_it_declares() {
        let mut w = Workload {
            command: vec!["nginx".into()],
            endpoints: vec![Endpoint {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            readiness: Some(Readiness {
                check: Check::Http {
                    endpoint: "http".into(),
                    path: "/".into(),
                },
                interval_ms: 100,
                retries: 50,
            }),
            ..Workload::default()
        };
        w.validate().unwrap();
        w.readiness.as_mut().unwrap().check = Check::Tcp {
            endpoint: "admin".into(),
        };
        assert!(w.validate().unwrap_err().contains("'admin'"));
        w.readiness = None;
        w.volumes.push(Volume {
            name: "data".into(),
            path: "../etc".into(),
        });
        assert!(w.validate().unwrap_err().contains("absolute"));
        w.volumes.clear();
        w.image = Some(ImageRef {
            reference: "cloud48/nginx".into(),
            digest: Some("sha256:abc".into()),
        });
        assert!(w.validate().unwrap_err().contains("64 hex"));
    }
}
