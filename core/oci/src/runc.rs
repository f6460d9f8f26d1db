//! runc, driven through its command line (Debian's `runc` package): run detached, state,
//! signals, pause and resume, exec, delete, and checkpoint and restore through CRIU.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::OciError;

/// What runc says of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuncStatus {
    /// Created, its process not started.
    Created,
    /// Its process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its process exited.
    Stopped,
}

/// A container's state: its status and, while it has one, the host pid of its first process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuncState {
    /// Status.
    pub status: RuncStatus,
    /// Host pid of its init process (0 once stopped).
    pub pid: i32,
}

/// runc with its state directory.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

/// The output of a command run in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed).
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

impl Runc {
    /// runc from `PATH`, keeping its state in `root`; refuses, naming the package, if runc is
    /// not installed.
    pub fn new(root: impl Into<PathBuf>) -> Result<Runc, OciError> {
        let runc = Runc {
            binary: PathBuf::from("runc"),
            root: root.into(),
        };
        let out = Command::new(&runc.binary).arg("--version").output();
        match out {
            Ok(o) if o.status.success() => Ok(runc),
            _ => Err(OciError::Runtime(
                "runc is not installed or does not run: install it (Debian: apt-get install runc)"
                    .into(),
            )),
        }
    }

    /// runc's version line.
    pub fn version(&self) -> String {
        Command::new(&self.binary)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c
    }

    fn run(&self, mut c: Command, what: &str) -> Result<Vec<u8>, OciError> {
        let out = c
            .stdin(Stdio::null())
            .output()
            .map_err(|e| OciError::Runtime(format!("{what}: cannot run runc: {e}")))?;
        if !out.status.success() {
            return Err(OciError::Runtime(format!(
                "{what}: runc failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }

    /// Creates container `id` from the bundle in `bundle` without starting its process (its
    /// namespaces exist: the caller can set up its network through the returned pid); its
    /// process's output is appended to `log` (see [`piped_stdio`]) and its streams belong to
    /// `owner` (its root's host uid), who may open them again (nginx logs to `/dev/stdout`).
    pub fn create(&self, id: &str, bundle: &Path, log: &Path, owner: u32) -> Result<i32, OciError> {
        let mut c = self.logged(log);
        c.args(["create", "--bundle"]).arg(bundle).arg(id);
        self.run_piped(c, id, (log, owner), "creating")
    }

    /// Checkpoints running container `id` with CRIU into `images` (`work` takes CRIU's log):
    /// its processes stop once their state is written; on failure they run on.
    pub fn checkpoint(&self, id: &str, images: &Path, work: &Path) -> Result<(), OciError> {
        let mut c = self.command();
        c.args(["checkpoint", "--image-path"])
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg(id);
        self.run(c, &format!("checkpointing {id}"))
            .map(drop)
            .map_err(|e| with_criu_log(e, work, "dump.log"))
    }

    /// Restores container `id` from CRIU's `images` with the bundle in `bundle` (its root
    /// mounted where the bundle says) and leaves it running in a new, empty network namespace
    /// for the caller to wire; returns its first process's pid. Its output goes on to `log`,
    /// its streams belong to `owner` (as at `create`).
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        images: &Path,
        work: &Path,
        (log, owner): (&Path, u32),
    ) -> Result<i32, OciError> {
        let mut c = self.logged(log);
        c.args(["restore", "--detach", "--image-path"])
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg("--bundle")
            .arg(bundle)
            .arg(id);
        self.run_piped(c, id, (log, owner), "restoring")
            .map_err(|e| with_criu_log(e, work, "restore.log"))
    }

    /// runc writing its own complaints to `runc.log` beside the container's `log`.
    fn logged(&self, log: &Path) -> Command {
        let mut c = self.command();
        c.arg("--log").arg(log.with_file_name("runc.log"));
        c
    }

    /// Runs runc command `c` (from `logged`) that makes container `id`, its process's streams
    /// pipes owned by `owner` to a relay appending to `log`; returns the container's pid.
    fn run_piped(
        &self,
        mut c: Command,
        id: &str,
        (log, owner): (&Path, u32),
        what: &str,
    ) -> Result<i32, OciError> {
        let runc_log = log.with_file_name("runc.log");
        std::fs::write(&runc_log, "")
            .map_err(OciError::io(format!("emptying {}", runc_log.display())))?;
        let (stdin, out) = piped_stdio(log, owner)?;
        let err = out
            .try_clone()
            .map_err(OciError::io("duplicating the container's output pipe"))?;
        let outcome = c
            .stdin(stdin)
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| OciError::Runtime(format!("{what} {id}: cannot run runc: {e}")))?;
        if !outcome.success() {
            let tail = std::fs::read_to_string(&runc_log).unwrap_or_default();
            let tail: Vec<&str> = tail
                .lines()
                .rev()
                .filter(|l| !l.contains("level=warning"))
                .take(5)
                .collect();
            return Err(OciError::Runtime(format!(
                "{what} {id}: runc failed ({outcome}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        match self.state(id)? {
            Some(s) if s.pid > 0 => Ok(s.pid),
            _ => Err(OciError::Runtime(format!(
                "{what} {id}: runc reports no process for it"
            ))),
        }
    }

    /// Starts the process of a created container.
    pub fn start(&self, id: &str) -> Result<(), OciError> {
        let mut c = self.command();
        c.args(["start", id]);
        self.run(c, &format!("starting {id}")).map(drop)
    }

    /// The state of container `id`, or `None` if runc does not know it.
    pub fn state(&self, id: &str) -> Result<Option<RuncState>, OciError> {
        let mut c = self.command();
        c.args(["state", id]);
        let out = c
            .stdin(Stdio::null())
            .output()
            .map_err(|e| OciError::Runtime(format!("state of {id}: cannot run runc: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("does not exist") || err.contains("not exist") {
                return Ok(None);
            }
            return Err(OciError::Runtime(format!(
                "state of {id}: runc failed: {}",
                err.trim()
            )));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            OciError::Runtime(format!("state of {id}: runc's answer is not JSON: {e}"))
        })?;
        let status = match v["status"].as_str() {
            Some("created") => RuncStatus::Created,
            Some("running") => RuncStatus::Running,
            Some("paused") => RuncStatus::Paused,
            _ => RuncStatus::Stopped,
        };
        Ok(Some(RuncState {
            status,
            pid: v["pid"].as_i64().unwrap_or(0) as i32,
        }))
    }

    /// Sends `signal` (`TERM`, `KILL`) to the container's processes (all of them with `all`).
    pub fn kill(&self, id: &str, signal: &str, all: bool) -> Result<(), OciError> {
        let mut c = self.command();
        c.arg("kill");
        if all {
            c.arg("--all");
        }
        c.args([id, signal]);
        self.run(c, &format!("signalling {id}")).map(drop)
    }

    /// Freezes the container.
    pub fn pause(&self, id: &str) -> Result<(), OciError> {
        let mut c = self.command();
        c.args(["pause", id]);
        self.run(c, &format!("pausing {id}")).map(drop)
    }

    /// Thaws the container.
    pub fn resume(&self, id: &str) -> Result<(), OciError> {
        let mut c = self.command();
        c.args(["resume", id]);
        self.run(c, &format!("resuming {id}")).map(drop)
    }

    /// Runs `args` inside the running container, as its root, and waits for it.
    pub fn exec(&self, id: &str, args: &[String], env: &[String]) -> Result<ExecOutput, OciError> {
        let out = self
            .exec_command(id, args, env)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| OciError::Runtime(format!("exec in {id}: cannot run runc: {e}")))?;
        use std::os::unix::process::ExitStatusExt;
        let code = out
            .status
            .code()
            .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
        Ok(ExecOutput {
            code,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// The `runc exec` command that runs `args` inside container `id`, for a caller that runs
    /// it itself (with a timeout, say).
    pub fn exec_command(&self, id: &str, args: &[String], env: &[String]) -> Command {
        let mut c = self.command();
        c.arg("exec");
        for e in env {
            c.arg("--env").arg(e);
        }
        c.arg(id).args(args);
        c
    }

    /// Removes container `id` (killing it first with `force`); an unknown id is not an error.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), OciError> {
        if self.state(id)?.is_none() {
            return Ok(());
        }
        let mut c = self.command();
        c.arg("delete");
        if force {
            c.arg("--force");
        }
        c.arg(id);
        self.run(c, &format!("deleting {id}")).map(drop)
    }
}

/// The standard streams of a container's first process: input an empty pipe, output (both
/// streams) a pipe whose other end a relay process appends to `log`. Pipes, not files: CRIU
/// can checkpoint a process whose streams are pipes (runc hands the restored one new ones),
/// not one holding a file of the host. The relay (`cat`, in a session of its own) outlives
/// the agent and ends when the container's last process does.
fn piped_stdio(
    log: &Path,
    owner: u32,
) -> Result<(std::io::PipeReader, std::io::PipeWriter), OciError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(OciError::io(format!("opening {}", log.display())))?;
    let (stdin, _closed) = std::io::pipe().map_err(OciError::io("making a pipe"))?;
    let (relay_in, out) = std::io::pipe().map_err(OciError::io("making a pipe"))?;
    for pipe in [
        std::os::fd::AsFd::as_fd(&stdin),
        std::os::fd::AsFd::as_fd(&out),
    ] {
        std::os::unix::fs::fchown(pipe, Some(owner), Some(owner))
            .map_err(OciError::io("giving the container its streams"))?;
    }
    let status = Command::new("setsid")
        .args(["--fork", "cat"])
        .stdin(relay_in)
        .stdout(file)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            OciError::Runtime(format!(
                "cannot start the relay of the container's output (setsid, Debian: util-linux): {e}"
            ))
        })?;
    if !status.success() {
        return Err(OciError::Runtime(format!(
            "the relay of the container's output did not start ({status})"
        )));
    }
    Ok((stdin, out))
}

/// `e` with the last lines of CRIU's log `name` in `work`, where CRIU says why it failed.
fn with_criu_log(e: OciError, work: &Path, name: &str) -> OciError {
    let log = std::fs::read_to_string(work.join(name)).unwrap_or_default();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .take(5)
        .collect();
    if errors.is_empty() {
        return e;
    }
    OciError::Runtime(format!("{e}; CRIU says: {}", errors.join(" | ")))
}
