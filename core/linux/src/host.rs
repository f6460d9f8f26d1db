//! What both drivers of this machine share about the host: admission of guests against the
//! server's capacity, the machine's capacity, finding programs, reading guest records, CPU rates
//! and log tails.

use super::*;

/// The address of a new guest of `spec` on server `server` of `capacity`, handing out
/// `network`, beside the guests it holds (`held`: each one's resources and address), once it is
/// known to fit. Both drivers decide under their guests' lock with it, so concurrent creates
/// never share an address or over-commit.
pub fn admit(
    server: &str,
    capacity: &Resources,
    network: (&Subnet, Option<network::AddressRange>),
    held: impl Iterator<Item = (Resources, Ipv4Addr)>,
    spec: &GuestSpec,
) -> Result<Ipv4Addr, DriverError> {
    let mut wanted = spec.resources;
    let mut used = Vec::new();
    for (resources, ip) in held {
        wanted = wanted.plus(&resources);
        used.push(ip);
    }
    if !wanted.fits_in(capacity) {
        return Err(over_capacity(server, capacity, wanted));
    }
    let (subnet, range) = network;
    network::pick_address(subnet, range, &used, spec.ip.as_deref(), &spec.avoid).map_err(
        |message| DriverError::Capacity {
            server: server.to_string(),
            message,
        },
    )
}

/// Whether server `server` of `capacity`, `allocated` to its guests, has room for one of them
/// to go from `from` to `to`. Both drivers' `update` decide with it under the guest's hold.
pub fn admit_resize(
    server: &str,
    capacity: &Resources,
    allocated: Resources,
    from: &Resources,
    to: &Resources,
) -> Result<(), DriverError> {
    let wanted = allocated.minus(from).plus(to);
    if wanted.fits_in(capacity) {
        Ok(())
    } else {
        Err(over_capacity(server, capacity, wanted))
    }
}

/// Server `server` of `capacity` refusing what would take `wanted` of it in all.
fn over_capacity(server: &str, capacity: &Resources, wanted: Resources) -> DriverError {
    DriverError::Capacity {
        server: server.to_string(),
        message: format!("{wanted:?} would exceed the capacity {capacity:?}"),
    }
}

pub(super) fn allocated_in(guests: &BTreeMap<String, Record>) -> Resources {
    guests
        .values()
        .fold(Resources::default(), |acc, r| acc.plus(&r.spec.resources))
}

/// Guest ids become directory, cgroup and host names.
pub(super) fn validate_id(id: &str) -> Result<(), DriverError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || id.starts_with('.')
    {
        return Err(DriverError::Permanent(format!(
            "guest id '{id}' must be 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Where `program` is: itself when it is a path, else the first match on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The guest records (`DIR/ID/guest.json`) under `dir`, which is created if missing; an
/// unreadable record is skipped with a warning.
pub fn read_records<R: serde::de::DeserializeOwned>(dir: &Path) -> Result<Vec<R>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        let file = entry.path().join("guest.json");
        match std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<R>(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => records.push(r),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "skipping an unreadable guest record")
            }
        }
    }
    Ok(records)
}

/// Millicores used since the previous sample in `last`, from a running total of CPU time
/// (`cpu_ns`); 0 on the first sample.
pub fn cpu_rate(last: &Mutex<Option<(Instant, u64)>>, cpu_ns: u64) -> u64 {
    let now = Instant::now();
    let mut last = last.lock().unwrap();
    let millis = match *last {
        Some((at, before)) if now > at => {
            cpu_ns.saturating_sub(before) * 1000 / (now - at).as_nanos().max(1) as u64
        }
        _ => 0,
    };
    *last = Some((now, cpu_ns));
    millis
}

/// The last `max` bytes of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Cpu, memory and disk of this machine.
pub fn machine_capacity(data_dir: &Path) -> Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let memory_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let disk_mb = {
        let c = std::ffi::CString::new(data_dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0 {
            (s.f_blocks as u64 * s.f_frsize as u64) >> 20
        } else {
            0
        }
    };
    Resources {
        cpu_millis: cpus * 1000,
        memory_mb: memory_kb / 1024,
        disk_mb,
    }
}
