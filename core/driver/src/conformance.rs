//! The conformance suite every driver must pass.
//!
//! `run` exercises the whole `Driver` contract (lifecycle, idempotency, errors, optional
//! capabilities, export/import between two servers, a live move between two servers of one
//! network where the driver says it moves guests live) against fresh driver instances and
//! returns every violation found. A driver's test calls it and asserts the list is empty.

use std::future::Future;

use super::{Driver, DriverError, GuestSpec, GuestState};
use cloud48_model::{Resources, Workload};

/// Makes fresh, empty driver instances with enough capacity for a few small guests.
pub trait DriverFactory {
    /// The driver type made.
    type Driver: Driver;
    /// A fresh driver (a new empty server); `n` distinguishes instances of one run.
    fn make(&self, n: u32) -> impl Future<Output = Self::Driver>;
    /// What the suite's guests run (by default nothing declared: the driver's idle default).
    fn workload(&self) -> Workload {
        Workload::default()
    }
    /// A fresh server on the network of server 0 (a guest moving live between them keeps its
    /// address); drivers that move guests live must have one, the others need not.
    fn peer(&self) -> impl Future<Output = Option<Self::Driver>> {
        async { None }
    }
}

fn spec(w: &Workload, guest: &str) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: guest.to_string(),
        type_id: "plain".into(),
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 64,
            disk_mb: 64,
        },
        ip: None,
        workload: w.clone(),
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

async fn state_of(d: &dyn Driver, guest: &str) -> Result<Option<GuestState>, String> {
    Ok(d.status(guest)
        .await
        .map_err(|e| format!("status({guest}): {e}"))?
        .map(|i| i.state))
}

async fn lifecycle(d: &dyn Driver, w: &Workload) -> Result<(), String> {
    let info = d
        .create(&spec(w, "conf-a"))
        .await
        .map_err(|e| format!("create: {e}"))?;
    ensure!(
        info.state == GuestState::Stopped,
        "a created guest must be stopped, got {}",
        info.state
    );
    ensure!(info.ip.is_some(), "a created guest must have an IP");
    let again = d
        .create(&spec(w, "conf-a"))
        .await
        .map_err(|e| format!("second create: {e}"))?;
    ensure!(
        again.ip == info.ip,
        "create of an existing guest id must return the existing guest"
    );
    let listed = d.list().await.map_err(|e| format!("list: {e}"))?;
    ensure!(
        listed.iter().filter(|g| g.guest_id == "conf-a").count() == 1,
        "list must show the guest exactly once after two creates, got {listed:?}"
    );
    d.start("conf-a").await.map_err(|e| format!("start: {e}"))?;
    ensure!(
        state_of(d, "conf-a").await? == Some(GuestState::Running),
        "start must run the guest"
    );
    d.start("conf-a")
        .await
        .map_err(|e| format!("start of a running guest must succeed: {e}"))?;
    d.reboot("conf-a")
        .await
        .map_err(|e| format!("reboot: {e}"))?;
    ensure!(
        state_of(d, "conf-a").await? == Some(GuestState::Running),
        "reboot must leave the guest running"
    );
    d.stop("conf-a").await.map_err(|e| format!("stop: {e}"))?;
    ensure!(
        state_of(d, "conf-a").await? == Some(GuestState::Stopped),
        "stop must stop the guest"
    );
    d.stop("conf-a")
        .await
        .map_err(|e| format!("stop of a stopped guest must succeed: {e}"))?;
    d.destroy("conf-a")
        .await
        .map_err(|e| format!("destroy: {e}"))?;
    ensure!(
        state_of(d, "conf-a").await?.is_none(),
        "destroy must remove the guest"
    );
    d.destroy("conf-a")
        .await
        .map_err(|e| format!("destroy of a missing guest must succeed: {e}"))?;
    Ok(())
}

async fn suspend_resume(d: &dyn Driver, w: &Workload) -> Result<(), String> {
    d.create(&spec(w, "conf-s"))
        .await
        .map_err(|e| format!("create: {e}"))?;
    if !d.capabilities().suspend {
        let err = d.suspend("conf-s").await;
        ensure!(
            matches!(err, Err(DriverError::Unsupported { .. })),
            "suspend without the capability must answer Unsupported, got {err:?}"
        );
        return d.destroy("conf-s").await.map_err(|e| e.to_string());
    }
    let err = d.suspend("conf-s").await;
    ensure!(
        matches!(err, Err(DriverError::InvalidState { .. })),
        "suspend of a stopped guest must answer InvalidState, got {err:?}"
    );
    d.start("conf-s").await.map_err(|e| format!("start: {e}"))?;
    d.suspend("conf-s")
        .await
        .map_err(|e| format!("suspend: {e}"))?;
    ensure!(
        state_of(d, "conf-s").await? == Some(GuestState::Suspended),
        "suspend must freeze the guest"
    );
    d.resume("conf-s")
        .await
        .map_err(|e| format!("resume: {e}"))?;
    ensure!(
        state_of(d, "conf-s").await? == Some(GuestState::Running),
        "resume must thaw the guest"
    );
    d.destroy("conf-s")
        .await
        .map_err(|e| format!("destroy of a running guest: {e}"))?;
    Ok(())
}

async fn exec_and_update(d: &dyn Driver, w: &Workload) -> Result<(), String> {
    d.create(&spec(w, "conf-e"))
        .await
        .map_err(|e| format!("create: {e}"))?;
    d.start("conf-e").await.map_err(|e| format!("start: {e}"))?;
    if d.capabilities().exec {
        let out = d
            .exec("conf-e", "exit 0", &["x".into()])
            .await
            .map_err(|e| format!("exec: {e}"))?;
        ensure!(
            out.exit_code == 0,
            "exec of 'exit 0' must exit 0, got {}",
            out.exit_code
        );
    } else {
        let err = d.exec("conf-e", "true", &[]).await;
        ensure!(
            matches!(err, Err(DriverError::Unsupported { .. })),
            "exec without the capability must answer Unsupported"
        );
    }
    if d.capabilities().update {
        let bigger = Resources {
            cpu_millis: 200,
            memory_mb: 128,
            disk_mb: 64,
        };
        d.update("conf-e", &bigger)
            .await
            .map_err(|e| format!("update: {e}"))?;
        let info = d
            .status("conf-e")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("guest vanished after update")?;
        ensure!(
            info.resources == bigger,
            "update must change the resources, got {:?}",
            info.resources
        );
        let stats = d.stats().await.map_err(|e| format!("stats: {e}"))?;
        ensure!(
            stats.allocated.memory_mb >= 128,
            "stats must count the updated reservation"
        );
        let huge = Resources {
            cpu_millis: u64::MAX / 4,
            memory_mb: 1,
            disk_mb: 1,
        };
        let err = d.update("conf-e", &huge).await;
        ensure!(
            matches!(err, Err(DriverError::Capacity { .. })),
            "an update past capacity must answer Capacity, got {err:?}"
        );
    }
    d.destroy("conf-e")
        .await
        .map_err(|e| format!("destroy: {e}"))?;
    Ok(())
}

async fn unknown_guest(d: &dyn Driver) -> Result<(), String> {
    for (op, result) in [
        ("start", d.start("conf-missing").await),
        ("stop", d.stop("conf-missing").await),
        ("reboot", d.reboot("conf-missing").await),
    ] {
        ensure!(
            matches!(result, Err(DriverError::NotFound(_))),
            "{op} of an unknown guest must answer NotFound, got {result:?}"
        );
    }
    ensure!(
        state_of(d, "conf-missing").await?.is_none(),
        "status of an unknown guest must be None"
    );
    Ok(())
}

async fn capacity(d: &dyn Driver, w: &Workload) -> Result<(), String> {
    let stats = d.stats().await.map_err(|e| format!("stats: {e}"))?;
    let mut too_big = spec(w, "conf-big");
    too_big.resources.memory_mb = stats.capacity.memory_mb + 1;
    let err = d.create(&too_big).await;
    ensure!(
        matches!(err, Err(DriverError::Capacity { .. })),
        "a guest larger than the server must answer Capacity, got {err:?}"
    );
    ensure!(
        state_of(d, "conf-big").await?.is_none(),
        "a refused create must leave nothing behind"
    );
    Ok(())
}

async fn migrate(source: &dyn Driver, target: &dyn Driver, w: &Workload) -> Result<(), String> {
    if !source.capabilities().migrate {
        let err = source.export("conf-m").await;
        ensure!(
            matches!(err, Err(DriverError::Unsupported { .. })),
            "export without the capability must answer Unsupported"
        );
        return Ok(());
    }
    move_guest(source, target, w, "conf-m", Transfer::Memory).await?;
    move_guest(source, target, w, "conf-s", Transfer::File).await
}

/// How a guest travels in `move_guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    /// `export` and `import`.
    Memory,
    /// `export_to` a file and `import_from` it.
    File,
}

/// Moves a running guest from `source` to `target`: stop, export, import (twice: the second
/// must return the first), start there, destroy on the source.
async fn move_guest(
    source: &dyn Driver,
    target: &dyn Driver,
    w: &Workload,
    guest: &str,
    how: Transfer,
) -> Result<(), String> {
    let file = std::env::temp_dir().join(format!(
        "cloud48-conformance-{}-{guest}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    let export = async |g: &str| match how {
        Transfer::Memory => source.export(g).await.map(Some),
        Transfer::File => {
            let size = source.export_to(g, &file).await?;
            let on_disk = std::fs::metadata(&file).map(|m| m.len()).ok();
            if on_disk != Some(size) {
                return Err(DriverError::Permanent(format!(
                    "export_to said {size} bytes, the file has {on_disk:?}"
                )));
            }
            Ok(None)
        }
    };
    let import = async |image: &Option<super::GuestImage>| match image {
        Some(image) => target.import(&spec(w, guest), image).await,
        None => target.import_from(&spec(w, guest), &file).await,
    };
    let result = async {
        source
            .create(&spec(w, guest))
            .await
            .map_err(|e| format!("create: {e}"))?;
        source
            .start(guest)
            .await
            .map_err(|e| format!("start: {e}"))?;
        let err = export(guest).await;
        ensure!(
            matches!(err, Err(DriverError::InvalidState { .. })),
            "{how:?} export of a running guest must answer InvalidState, got {err:?}"
        );
        source.stop(guest).await.map_err(|e| format!("stop: {e}"))?;
        let image = export(guest)
            .await
            .map_err(|e| format!("{how:?} export: {e}"))?;
        let imported = import(&image)
            .await
            .map_err(|e| format!("{how:?} import: {e}"))?;
        ensure!(
            imported.state == GuestState::Stopped,
            "an imported guest must be stopped"
        );
        let again = import(&image)
            .await
            .map_err(|e| format!("second {how:?} import: {e}"))?;
        ensure!(
            again.ip == imported.ip,
            "import of an existing guest id must return the existing guest"
        );
        target
            .start(guest)
            .await
            .map_err(|e| format!("start after import: {e}"))?;
        source
            .destroy(guest)
            .await
            .map_err(|e| format!("destroy on source: {e}"))?;
        ensure!(
            state_of(target, guest).await? == Some(GuestState::Running),
            "the imported guest must run on the target"
        );
        target
            .destroy(guest)
            .await
            .map_err(|e| format!("destroy on target: {e}"))?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&file);
    result
}

/// Moves a running guest live from `source` to `peer` (a server of its network): the target
/// holds it stopped until `live_finish`, then it runs there with its address and is stopped
/// on the source. A driver without the capability must refuse to offer one.
async fn live(source: &dyn Driver, peer: Option<&dyn Driver>, w: &Workload) -> Result<(), String> {
    let guest = "conf-l";
    let result = async {
        let info = source
            .create(&spec(w, guest))
            .await
            .map_err(|e| format!("create: {e}"))?;
        source
            .start(guest)
            .await
            .map_err(|e| format!("start: {e}"))?;
        if !source.capabilities().live_migrate {
            ensure!(
                source.live_offer(guest).await.is_err(),
                "live_offer without the live_migrate capability must fail"
            );
            return Ok(());
        }
        let Some(peer) = peer else {
            return Err(
                "the driver moves guests live, but its factory gives no server on its network (DriverFactory::peer)"
                    .to_string(),
            );
        };
        let offer = source
            .live_offer(guest)
            .await
            .map_err(|e| format!("live_offer: {e}"))?;
        let keep = GuestSpec {
            ip: info.ip.clone(),
            ..spec(w, guest)
        };
        let target = peer
            .live_receive(&keep, &offer)
            .await
            .map_err(|e| format!("live_receive: {e}"))?;
        ensure!(
            state_of(peer, guest).await? == Some(GuestState::Stopped),
            "a guest being received must exist, not running, until live_finish"
        );
        source
            .live_send(guest, &target)
            .await
            .map_err(|e| format!("live_send: {e}"))?;
        peer.live_finish(guest)
            .await
            .map_err(|e| format!("live_finish: {e}"))?;
        peer.live_finish(guest)
            .await
            .map_err(|e| format!("a repeated live_finish must succeed: {e}"))?;
        ensure!(
            state_of(source, guest).await? == Some(GuestState::Stopped),
            "after live_send the source's guest must be stopped"
        );
        let moved = peer
            .status(guest)
            .await
            .map_err(|e| format!("status on the target: {e}"))?;
        ensure!(
            moved.as_ref().map(|g| g.state) == Some(GuestState::Running),
            "after live_finish the guest must run on the target"
        );
        ensure!(
            moved.and_then(|g| g.ip) == info.ip,
            "a guest moved live must keep its address"
        );
        Ok(())
    }
    .await;
    let _ = source.destroy(guest).await;
    if let Some(peer) = peer {
        let _ = peer.destroy(guest).await;
    }
    result
}

/// Runs the whole suite; returns one message per failed check (empty when the driver conforms).
pub async fn run<F: DriverFactory>(factory: &F) -> Vec<String> {
    let mut failures = Vec::new();
    let w = factory.workload();
    let d = factory.make(0).await;
    for (name, result) in [
        ("lifecycle", lifecycle(&d, &w).await),
        ("suspend_resume", suspend_resume(&d, &w).await),
        ("exec_and_update", exec_and_update(&d, &w).await),
        ("unknown_guest", unknown_guest(&d).await),
        ("capacity", capacity(&d, &w).await),
    ] {
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    }
    let target = factory.make(1).await;
    if let Err(e) = migrate(&d, &target, &w).await {
        failures.push(format!("migrate: {e}"));
    }
    let peer = factory.peer().await;
    if let Err(e) = live(&d, peer.as_ref().map(|p| p as &dyn Driver), &w).await {
        failures.push(format!("live: {e}"));
    }
    failures
}
