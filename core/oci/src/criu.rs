//! Whether CRIU can checkpoint processes on this machine: the `criu` runc calls, asked for its
//! version and made to checkpoint a throwaway process. Its own `check` is not enough: Debian
//! bookworm's CRIU 3.17 passes it on kernels whose vDSO it then cannot dump.

use std::path::Path;
use std::process::{Command, Stdio};

/// `Ok(version)` when CRIU checkpoints a process here (using `scratch`, an empty directory,
/// for its files), else why not, with what to do.
pub fn criu_works(scratch: &Path) -> Result<String, String> {
    let version = Command::new("criu")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
        })
        .ok_or("CRIU is not installed (it checkpoints and restores running containers; Cloud48's .ci/run builds CRIU 4.2.1 from Debian's source package)")?;
    std::fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    // A process of a session of its own, which CRIU ends once it is written.
    let mut child = Command::new("setsid")
        .args(["sleep", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start a process to checkpoint: {e}"))?;
    let dumped = Command::new("criu")
        .args(["dump", "--tree", &child.id().to_string(), "--images-dir"])
        .arg(scratch)
        .args(["--log-file", "dump.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(scratch.join("dump.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(scratch);
    match dumped {
        Ok(s) if s.success() => Ok(version),
        Ok(_) => {
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
                .take(3)
                .collect();
            Err(format!(
                "CRIU {version} cannot checkpoint a process on this kernel ({}); CRIU 4.2.1 or later can",
                errors.join(" | ")
            ))
        }
        Err(e) => Err(format!("cannot run criu: {e}")),
    }
}
