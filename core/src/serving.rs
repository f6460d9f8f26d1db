//! A `cloud48 serve` child process, for the benchmarks and the tests that run the real binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A `cloud48 serve` child process, killed with SIGKILL when dropped. Its log (stderr) goes
/// next to the data directory (`DATA.log`).
pub struct ServeProcess {
    /// The process.
    pub child: Child,
    /// Where its API listens (a free loopback port).
    pub url: String,
    /// How it was started, to start it again on another port (`health`).
    exe: PathBuf,
    data: PathBuf,
    extra: Vec<String>,
    /// Whether its port was picked here (and another may be picked instead).
    picked: bool,
}

/// How many times `health` starts a core again on another port, each time its port turned
/// out to be taken.
const MOVES: u32 = 5;

impl ServeProcess {
    /// Starts `exe serve` on a free loopback port with `data` as its data directory and `extra`
    /// flags; does not wait for it (see `health`).
    pub fn spawn(exe: &Path, data: &Path, extra: &[&str]) -> Result<ServeProcess> {
        // The port is free now; another process may take it before the core listens on it,
        // which `health` finds out and mends.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut serve = Self::spawn_at(exe, data, &format!("127.0.0.1:{port}"), extra)?;
        serve.picked = true;
        Ok(serve)
    }

    /// Starts `exe serve` listening on `listen` (e.g. again where a killed one listened, so
    /// that its agents find it).
    pub fn spawn_at(exe: &Path, data: &Path, listen: &str, extra: &[&str]) -> Result<ServeProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .with_context(|| format!("cannot open the log next to {}", data.display()))?;
        let child = std::process::Command::new(exe)
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start `{} serve`", exe.display()))?;
        Ok(ServeProcess {
            child,
            url: format!("http://{listen}"),
            exe: exe.to_path_buf(),
            data: data.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            picked: false,
        })
    }

    /// Waits until `GET /v1/health` answers at all (`ready`: until it answers 200, every
    /// command resumed and every server reconciled); at most 120 s. Only this core's answer
    /// counts (its `node` is the one in its data directory): if another process answers on its
    /// port, or the core cannot listen there because another took the port meanwhile, a core
    /// whose port was picked by `spawn` starts again on another one (and `url` changes).
    pub async fn health(&mut self, ready: bool) -> Result<()> {
        // A process that accepts connections but never answers must not hold this up.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut moves = 0;
        loop {
            // Written when the core opens its data directory, before it listens.
            let mine = std::fs::read_to_string(self.data.join("node-id"))
                .ok()
                .map(|s| s.trim().to_string());
            if let Ok(r) = http.get(format!("{}/v1/health", self.url)).send().await {
                let up = r.status().is_success();
                let body: Option<serde_json::Value> = r.json().await.ok();
                let node = body.as_ref().and_then(|b| b["node"].as_str());
                match (&mine, node) {
                    (Some(mine), Some(node)) if mine == node => {
                        if !ready || up {
                            return Ok(());
                        }
                    }
                    (Some(_), _) => {
                        self.move_elsewhere(&mut moves, "another process answers there")?;
                        continue;
                    }
                    // Not named yet: whoever answers may not be this core.
                    (None, _) => {}
                }
            }
            if let Some(status) = self.child.try_wait()? {
                let log =
                    std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default();
                let listen = self.url.trim_start_matches("http://");
                if log.contains(&format!("cannot listen on {listen}")) {
                    self.move_elsewhere(&mut moves, "it could not listen there")?;
                    continue;
                }
                bail!("`cloud48 serve` exited ({status}); see its log next to the data directory");
            }
            if Instant::now() > deadline {
                bail!(
                    "`cloud48 serve` did not answer on {} within 120 s",
                    self.url
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Starts the core again on another free port, its port being someone else's (`why`).
    fn move_elsewhere(&mut self, moves: &mut u32, why: &str) -> Result<()> {
        if !self.picked || *moves >= MOVES {
            bail!(
                "`cloud48 serve` was to listen on {}, but {why}: another process holds the port",
                self.url
            );
        }
        *moves += 1;
        self.kill9();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        *self = Self::spawn(&self.exe, &self.data, &extra)?;
        Ok(())
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
