//! A `cloud48 serve` child process, for the benchmarks and the tests that run the real binary.

use std::path::Path;
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
}

impl ServeProcess {
    /// Starts `exe serve` on a free loopback port with `data` as its data directory and `extra`
    /// flags; does not wait for it (see `health`).
    pub fn spawn(exe: &Path, data: &Path, extra: &[&str]) -> Result<ServeProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Self::spawn_at(exe, data, &format!("127.0.0.1:{port}"), extra)
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
        })
    }

    /// Waits until `GET /v1/health` answers at all (`ready`: until it answers 200, every
    /// command resumed and every server reconciled); at most 120 s.
    pub async fn health(&mut self, ready: bool) -> Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = http.get(format!("{}/v1/health", self.url)).send().await
                && (!ready || r.status().is_success())
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
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
