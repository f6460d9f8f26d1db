//! A guest's processes: launching its init into its namespaces and cgroups, waiting until its
//! software is ready, and halting it (SIGTERM to its processes, SIGKILL to what is left after
//! the grace period).

use super::*;

/// The init of every guest (PID 1 of its PID namespace): mounts its private directories,
/// runs the main command and forwards SIGTERM to it.
const GUEST_INIT: &str = r#"set -e
hostname "$C48_HOSTNAME"
for d in $C48_PRIVATE; do mkdir -p "$d"; mount --bind "$C48_FS$d" "$d"; done
# The program may live under /tmp, which the private /tmp hides: hold it open and run it
# through its descriptor.
prog=$(command -v "$1")
shift
case "$prog" in /tmp/*) exec 9<"$prog"; prog=/proc/self/fd/9;; esac
mount -t tmpfs -o size=64m tmpfs /tmp
cd "$C48_WORKDIR" || { echo "cloud48: working directory $C48_WORKDIR does not exist" >&2; exit 112; }
# Set up: the driver counts the guest as started (and lets exec in) only from here, so that
# nothing joins its mount namespace before its private directories are mounted.
echo up >&3
exec 3>&-
set +e
"$prog" "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM
wait $child
wait $child
"#;

/// The file, in a guest's directory, its init writes once its mounts are made.
const SET_UP: &str = "set-up";

/// Joins the guest's cgroups, then its namespaces are made and `GUEST_INIT` runs inside.
const LAUNCH: &str = r#"for f in $C48_PROCS; do echo $$ > "$f" || exit 111; done
exec 3>"$C48_UP"
exec ip netns exec "$C48_NETNS" unshare --pid --fork --kill-child --mount --uts --mount-proc --propagation private sh -c "$C48_INIT" c48-init "$@""#;

/// Joins the guest's cgroups, then its namespaces, and runs a script there.
pub(super) const JOIN: &str = r#"for f in $C48_PROCS; do echo $$ > "$f" || exit 111; done
exec nsenter -t "$C48_PID" -m -u -n -p -- sh -c "$C48_SCRIPT" c48-exec "$@""#;

impl LinuxDriver {
    /// Processes of the guest inside its PID namespace (not the launcher outside it).
    pub(super) fn inner_pids(&self, guest: &str) -> Vec<i32> {
        let own = std::fs::read_link("/proc/self/ns/pid").ok();
        self.cgroups
            .pids(guest)
            .into_iter()
            .filter(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok() != own)
            .collect()
    }

    /// The guest's PID 1 (its init), as seen from the host.
    pub(super) fn init_pid(&self, guest: &str) -> Option<i32> {
        self.cgroups.pids(guest).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines().find(|l| l.starts_with("NSpid:")).map(|l| {
                        l.split_whitespace().last() == Some("1") && l.split_whitespace().count() > 2
                    })
                })
                .unwrap_or(false)
        })
    }

    pub(super) async fn wait_empty(&self, guest: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.cgroups.pids(guest).is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.cgroups.pids(guest).is_empty()
    }

    /// Stops every process of the guest (graceful, then forced) and removes its network.
    pub(super) async fn halt(&self, guest: &str) -> Result<(), DriverError> {
        if self.cgroups.frozen(guest) {
            self.cgroups.freeze(guest, false).await.map_err(permanent)?;
        }
        if !self.cgroups.pids(guest).is_empty() {
            signal_all(self.inner_pids(guest), libc::SIGTERM);
            if !self.wait_empty(guest, self.cfg.stop_grace).await {
                signal_all(self.cgroups.pids(guest), libc::SIGKILL);
                if !self.wait_empty(guest, Duration::from_secs(10)).await {
                    return Err(DriverError::Transient(format!(
                        "processes of {guest} survived SIGKILL; try again"
                    )));
                }
            }
        }
        network::detach(&GuestNet::new(&self.cfg.prefix, guest)).await;
        // A checkpoint of it is stale once it stopped.
        let _ = tokio::fs::remove_dir_all(self.dir(guest).join("live")).await;
        let record = self.guests.lock().unwrap().get(guest).cloned();
        if let (Some(images), Some(r)) = (&self.images, record)
            && r.image.is_some()
        {
            // runc's record of it and its overlay go; runc removed its cgroups with it, which
            // the driver keeps for every guest it has.
            let (runc, merged, id) = (
                images.runc.clone(),
                self.dir(guest).join("merged"),
                guest.to_string(),
            );
            tokio::task::spawn_blocking(move || {
                runc.delete(&id, true)?;
                cloud48_oci::unmount(&merged)
            })
            .await
            .map_err(permanent)?
            .map_err(|e| DriverError::Transient(format!("cannot clean up after {guest}: {e}")))?;
            self.cgroups
                .create(guest, &r.spec.resources)
                .map_err(permanent)?;
        }
        Ok(())
    }

    pub(super) async fn launch(&self, r: &Record) -> Result<(), DriverError> {
        if let Some(digest) = &r.image {
            return self.launch_image(r, digest).await;
        }
        let guest = &r.spec.guest_id;
        let t = self.template(&r.spec);
        let vars = BTreeMap::from([("id", guest.to_string()), ("ip", r.ip.to_string())]);
        let command: Vec<String> = t
            .command
            .iter()
            .map(|s| templates::fill(s, &vars))
            .collect();
        if t.stand_in {
            tracing::info!(guest = %guest, image = ?r.spec.workload.image.as_ref().map(|i| &i.reference), "this server runs no images: a stand-in listens on the workload's endpoint");
        }
        if find_program(&command[0]).is_none() {
            return Err(DriverError::Permanent(format!(
                "{} is not installed on server {}; containers of type {} need it (Debian: apt-get install {})",
                command[0],
                self.cfg.name,
                r.spec.type_id,
                network::package_of(&command[0])
            )));
        }
        let net = GuestNet::new(&self.cfg.prefix, guest);
        network::attach(&net, &self.cfg.bridge, &self.cfg.subnet, r.ip)
            .await
            .map_err(permanent)?;
        let dir = self.dir(guest);
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("console.log"))
            .and_then(|f| Ok((f.try_clone()?, f)))
        {
            Ok(files) => files,
            Err(e) => {
                network::detach(&net).await;
                return Err(permanent(format!("cannot open the log of {guest}: {e}")));
            }
        };
        let procs: Vec<String> = self
            .cgroups
            .procs_files(guest)
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let up = dir.join(SET_UP);
        if let Err(e) = std::fs::remove_file(&up)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            network::detach(&net).await;
            return Err(permanent(format!("cannot reset {}: {e}", up.display())));
        }
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(LAUNCH)
            .arg("c48-launch")
            .args(&command)
            .envs(t.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("C48_WORKDIR", t.workdir.as_deref().unwrap_or("/"))
            .env("C48_PROCS", procs.join(" "))
            .env("C48_NETNS", &net.netns)
            .env("C48_INIT", GUEST_INIT)
            .env("C48_HOSTNAME", guest.chars().take(63).collect::<String>())
            .env("C48_PRIVATE", t.private_dirs.join(" "))
            .env("C48_FS", dir.join("fs"))
            .env("C48_UP", &up)
            .env("CLOUD48_CONTAINER", guest)
            .current_dir(dir.join("fs"))
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                network::detach(&net).await;
                return Err(permanent(format!("cannot launch {guest}: {e}")));
            }
        };
        // Reap the launcher whenever it ends.
        let pid = child.id();
        tokio::spawn(async move {
            let _ = child.wait().await;
            tracing::debug!(?pid, "a guest launcher ended");
        });
        self.wait_ready(r, &t.probe, pid, Some(&up)).await
    }

    /// Waits until the guest runs, has said it is set up (in `set_up`, when given) and passes
    /// its readiness `probe`; stops it and says why when it does not in time or when its
    /// processes are gone (and its `launcher`, if any, ended).
    pub(super) async fn wait_ready(
        &self,
        r: &Record,
        probe: &ready::Probe,
        launcher: Option<u32>,
        set_up: Option<&Path>,
    ) -> Result<(), DriverError> {
        let guest = &r.spec.guest_id;
        let dir = self.dir(guest);
        let declared = r
            .spec
            .workload
            .readiness
            .as_ref()
            .map(|x| Duration::from_millis(u64::from(x.interval_ms) * u64::from(x.retries)))
            .unwrap_or_default();
        let deadline = Instant::now() + READY_TIMEOUT.max(declared);
        let mut last = String::from("its processes did not start");
        loop {
            let said_up = set_up.is_none_or(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0));
            if !said_up {
                last = "its init did not finish mounting its private directories".into();
            } else if !self.inner_pids(guest).is_empty() {
                match probe.check(r.ip).await {
                    Ok(()) => return Ok(()),
                    Err(why) => last = why,
                }
            }
            let launcher_gone = launcher.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists());
            let ended = launcher_gone && self.cgroups.pids(guest).is_empty();
            if Instant::now() > deadline || ended {
                let _ = self.halt(guest).await;
                let why = if ended { "its processes ended" } else { &last };
                return Err(DriverError::Permanent(format!(
                    "container {guest} did not become ready ({why}); its output ends with:\n{}",
                    tail(&dir.join("console.log"), 2048)
                )));
            }
            tokio::time::sleep(probe.pause()).await;
        }
    }
}

pub(super) fn signal_all(pids: Vec<i32>, signal: i32) {
    for p in pids {
        // SAFETY: kill has no memory preconditions; a stale pid only yields ESRCH.
        unsafe { libc::kill(p, signal) };
    }
}
