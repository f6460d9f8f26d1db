//! Container templates: what runs inside a container of each type.
//!
//! A template names the main command, the private directories (paths inside the container that
//! are the container's own, kept in its directory on the server, so clone and migration carry
//! them), files seeded into them, and a TCP port that answers once the software is ready.
//! In commands and files, `{id}`, `{ip}` and `{exe}` (this program) are replaced.

use std::collections::BTreeMap;

/// What runs inside containers of one type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Main command and arguments.
    pub command: Vec<String>,
    /// Absolute paths inside the container that are private to it.
    #[serde(default)]
    pub private_dirs: Vec<String>,
    /// Files written into the private directories when the container is created.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// TCP port that accepts connections once the container is ready (its health check).
    #[serde(default)]
    pub ready_port: Option<u16>,
}

/// Reads templates from TOML, one table per type name:
///
/// ```toml
/// [redis]
/// command = ["redis-server", "--port", "6379", "--dir", "/var/lib/redis"]
/// private_dirs = ["/var/lib/redis"]
/// ready_port = 6379
/// ```
pub fn parse_templates(text: &str) -> Result<BTreeMap<String, Template>, String> {
    let templates: BTreeMap<String, Template> =
        toml_edit::de::from_str(text).map_err(|e| e.to_string())?;
    for (name, t) in &templates {
        if t.command.is_empty() || t.command[0].is_empty() {
            return Err(format!("template {name}: command must name a program"));
        }
        for d in t.private_dirs.iter().chain(t.files.keys()) {
            if !d.starts_with('/') || d.contains("..") || d.contains(char::is_whitespace) {
                return Err(format!(
                    "template {name}: '{d}' must be an absolute path without '..' or spaces"
                ));
            }
        }
        for f in t.files.keys() {
            if !t
                .private_dirs
                .iter()
                .any(|d| f.starts_with(&format!("{}/", d.trim_end_matches('/'))))
            {
                return Err(format!(
                    "template {name}: file '{f}' must lie in one of its private_dirs, or it would not be visible inside"
                ));
            }
        }
    }
    Ok(templates)
}

const NGINX_CONF: &str = "# cloud48 balancer
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
      proxy_connect_timeout 1s;
      proxy_next_upstream error timeout http_502 http_503 http_504;
    }
  }
}
";

const NO_UPSTREAMS: &str = "upstream cloud48_app {\n  server 127.0.0.1:9 down;\n}\n";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A small HTTP server (this program's `guest-http`) that answers every request with the
/// container id.
fn echo_server(port: u16) -> Template {
    Template {
        command: strings(&[
            "{exe}",
            "guest-http",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--answer",
            "{id}",
        ]),
        private_dirs: strings(&["/etc/cloud48"]),
        files: BTreeMap::new(),
        ready_port: Some(port),
    }
}

/// The template of a container type (by type name, without version); types without their own
/// template run an idle process.
pub fn template_for(type_name: &str) -> Template {
    match type_name {
        "balancer" => Template {
            command: strings(&["nginx", "-g", "daemon off;"]),
            private_dirs: strings(&["/etc/nginx", "/var/lib/nginx", "/var/log/nginx", "/run"]),
            files: BTreeMap::from([
                ("/etc/nginx/nginx.conf".to_string(), NGINX_CONF.to_string()),
                (
                    "/etc/nginx/conf.d/cloud48-upstreams.conf".to_string(),
                    NO_UPSTREAMS.to_string(),
                ),
            ]),
            ready_port: Some(80),
        },
        "tomcat" => echo_server(8080),
        "mysql" => echo_server(3306),
        _ => Template {
            command: strings(&["sleep", "infinity"]),
            private_dirs: strings(&["/etc/cloud48"]),
            files: BTreeMap::new(),
            ready_port: None,
        },
    }
}
