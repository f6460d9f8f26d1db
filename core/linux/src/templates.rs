//! What runs inside a container: the workload its type declares, made into a launch plan.
//!
//! A workload whose image the server can run runs on its own root (see `images`); this module
//! plans the others, which run on the server's own files. Its declared command runs when the
//! server has the program; a workload that names an image whose program the server lacks, on a
//! server that runs no images, runs a stand-in instead, this program's `guest-http` answering on
//! its first endpoint (so that environments wire up and can be tested without images); a
//! workload without an image whose program is missing fails to start with the package to
//! install. A type that declares nothing runs an idle process.
//! The volumes are the private directories (paths inside the container that are its own, kept
//! in its directory on the server, so clone and migration carry them). In the command,
//! `{id}` and `{ip}` are replaced by the container's id and address.

use std::collections::BTreeMap;

use cloud48_model::Workload;

use crate::ready::Probe;

/// How a container is launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Main command and arguments.
    pub command: Vec<String>,
    /// Environment variables of the main process.
    pub env: Vec<(String, String)>,
    /// Working directory inside the container (`/` when none).
    pub workdir: Option<String>,
    /// Absolute paths inside the container that are private to it.
    pub private_dirs: Vec<String>,
    /// What tells the container is ready.
    pub probe: Probe,
    /// True when this is the stand-in for an image the driver cannot run.
    pub stand_in: bool,
}

/// Where scripts of the CIS layer keep their files when the type declares no volume.
const DEFAULT_PRIVATE: &str = "/etc/cloud48";

/// The launch plan of `w`; `exe` is this program (for the stand-in) and `installed` says
/// whether the server has a program.
pub fn from_workload(w: &Workload, exe: &str, installed: impl Fn(&str) -> bool) -> Template {
    let mut private_dirs: Vec<String> = w.volumes.iter().map(|v| v.path.clone()).collect();
    if private_dirs.is_empty() {
        private_dirs.push(DEFAULT_PRIVATE.into());
    }
    if w.is_empty() {
        return Template {
            command: vec!["sleep".into(), "infinity".into()],
            env: Vec::new(),
            workdir: None,
            private_dirs,
            probe: Probe::Running,
            stand_in: false,
        };
    }
    let runnable = w.command.first().is_some_and(|p| installed(p));
    if w.image.is_some() && !runnable {
        let port = w.endpoints.first().map(|e| e.port);
        let mut command = vec![exe.to_string(), "guest-http".into()];
        match port {
            Some(p) => command.extend([
                "--listen".into(),
                format!("0.0.0.0:{p}"),
                "--answer".into(),
                "{id}".into(),
            ]),
            None => command = vec!["sleep".into(), "infinity".into()],
        }
        return Template {
            command,
            env: w.env.clone(),
            workdir: None,
            private_dirs,
            probe: port.map_or(Probe::Running, Probe::Tcp),
            stand_in: true,
        };
    }
    Template {
        command: w.command.clone(),
        env: w.env.clone(),
        workdir: w.workdir.clone(),
        private_dirs,
        probe: Probe::of(w),
        stand_in: false,
    }
}

/// `{id}` and `{ip}` in `s` replaced.
pub fn fill(s: &str, vars: &BTreeMap<&str, String>) -> String {
    vars.iter()
        .fold(s.to_string(), |s, (k, v)| s.replace(&format!("{{{k}}}"), v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud48_model::{Check, Endpoint, ImageRef, Protocol, Readiness, Volume};

    fn workload(program: &str, image: bool) -> Workload {
        Workload {
            image: image.then(|| ImageRef {
                reference: "cloud48/tomcat".into(),
                digest: None,
            }),
            command: vec![program.into(), "run".into()],
            env: vec![("CATALINA_OPTS".into(), "-Xmx512m".into())],
            workdir: Some("/srv".into()),
            endpoints: vec![Endpoint {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Http,
            }],
            readiness: Some(Readiness {
                check: Check::Http {
                    endpoint: "http".into(),
                    path: "/".into(),
                },
                interval_ms: 100,
                retries: 10,
            }),
            volumes: vec![Volume {
                name: "config".into(),
                path: "/etc/cloud48".into(),
            }],
        }
    }

    #[test]
    fn a_declared_command_the_server_has_runs_as_declared() {
        let t = from_workload(&workload("catalina.sh", true), "/c48", |_| true);
        assert_eq!(t.command, ["catalina.sh", "run"]);
        assert_eq!(t.probe.port(), Some(8080));
        assert_eq!(t.private_dirs, ["/etc/cloud48"]);
        assert_eq!(t.workdir.as_deref(), Some("/srv"));
        assert!(!t.stand_in);
    }

    #[test]
    fn an_image_whose_program_is_missing_runs_a_stand_in_on_its_first_endpoint() {
        let t = from_workload(&workload("catalina.sh", true), "/c48", |_| false);
        assert_eq!(
            t.command,
            [
                "/c48",
                "guest-http",
                "--listen",
                "0.0.0.0:8080",
                "--answer",
                "{id}"
            ]
        );
        assert!(t.stand_in);
        assert_eq!(t.probe.port(), Some(8080));
        // Without an image, the declared command is what runs (and fails if it is missing).
        let t = from_workload(&workload("catalina.sh", false), "/c48", |_| false);
        assert_eq!(t.command[0], "catalina.sh");
    }

    #[test]
    fn a_type_that_declares_nothing_idles_with_a_private_directory_for_its_scripts() {
        let t = from_workload(&Workload::default(), "/c48", |_| true);
        assert_eq!(t.command, ["sleep", "infinity"]);
        assert_eq!(t.private_dirs, [DEFAULT_PRIVATE]);
        let vars = BTreeMap::from([("id", "g1".to_string()), ("ip", "10.0.0.2".into())]);
        assert_eq!(fill("{id}@{ip}:{port}", &vars), "g1@10.0.0.2:{port}");
    }
}
