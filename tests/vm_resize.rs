//! A running VM given new resources (`update`): on a server that lets VMs grow while they run,
//! memory and CPUs plugged in, which the guest sees, CPUs taken off line and memory given back,
//! and its next boot made of its resources alone; on one that does not (the default), more
//! refused with the reason and nothing changed, less given back. Real QEMU (TCG here).

use std::time::{Duration, Instant};

use cloud48_engine::driver::{Driver, DriverError, GuestSpec};
use cloud48_engine::model::Resources;
use cloud48_qemu::QemuDriver;

use crate::vm::{factory, same_network, source, spec, web_vm};

fn res(cpu_millis: u64, memory_mb: u64) -> Resources {
    Resources {
        cpu_millis,
        memory_mb,
        disk_mb: 2048,
    }
}

/// What the guest runs on: (online CPUs, MemTotal in MiB), as its own kernel says.
async fn seen(d: &dyn Driver, guest: &str) -> (u64, u64) {
    let out = d
        .exec(
            guest,
            "nproc; awk '/^MemTotal/ { print int($2 / 1024) }' /proc/meminfo",
            &[],
        )
        .await
        .unwrap();
    let v: Vec<u64> = out
        .stdout
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 2, "{out:?}");
    (v[0], v[1])
}

/// Waits until the guest's MemTotal satisfies `ok` (the balloon works at the guest's pace).
async fn memory_until(d: &dyn Driver, guest: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    // Its own loop: each look is a guest-agent exec (a third of a second under TCG), paced so as
    // not to load the guest whose balloon it waits for, and a timeout says what was seen.
    let started = Instant::now();
    loop {
        let (_, mib) = seen(d, guest).await;
        if ok(mib) {
            return mib;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the guest's memory is {mib} MiB, not {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates and starts `guest` with one vCPU and 256 MiB.
async fn boot_small(d: &dyn Driver, guest: &str) {
    try_boot_small(d, guest).await.unwrap();
}

async fn try_boot_small(d: &dyn Driver, guest: &str) -> Result<(), DriverError> {
    d.create(&GuestSpec {
        resources: res(1000, 256),
        ..spec(guest, web_vm())
    })
    .await?;
    d.start(guest).await
}

/// `boot_small` on a server that lets VMs grow. Once, in CI, such a boot under TCG came up with
/// its workload never answering; its cause is not known (not reproduced in 80 boots since; the
/// error now says what the guest saw). A workaround, not a fix: it gets a second try, as this
/// test is about growing a VM that runs, and both failures are reported if the second fails.
async fn boot_growable(d: &dyn Driver, guest: &str) {
    if let Err(first) = try_boot_small(d, guest).await {
        eprintln!("the first boot of {guest} failed, trying once more: {first}");
        d.destroy(guest).await.unwrap();
        if let Err(again) = try_boot_small(d, guest).await {
            panic!("{guest} did not boot twice: {first}\nthen: {again}");
        }
    }
}

async fn resources(d: &dyn Driver, guest: &str) -> Resources {
    d.status(guest).await.unwrap().unwrap().resources
}

#[tokio::test]
async fn a_running_vm_grows_and_shrinks_in_place_where_its_server_lets_it() {
    let _one = crate::common::HEAVY.lock().await;
    let (f, _sweep) = factory('g', 90, source().await);
    let mut growing = same_network(&f, 90, 0);
    growing.grow_live = true;
    let d0 = QemuDriver::open(growing).await.unwrap();
    boot_growable(&d0, "vm-r").await;
    let (cpus, booted) = seen(&d0, "vm-r").await;
    assert_eq!(cpus, 1);

    // More: memory plugged in and a CPU, both taken by the guest.
    d0.update("vm-r", &res(2000, 768)).await.unwrap();
    assert_eq!(seen(&d0, "vm-r").await.0, 2);
    let grown = memory_until(&d0, "vm-r", "512 MiB more", |m| m >= booted + 450).await;
    assert_eq!(resources(&d0, "vm-r").await, res(2000, 768));

    // Less: a CPU off line, memory given back.
    d0.update("vm-r", &res(1000, 512)).await.unwrap();
    assert_eq!(seen(&d0, "vm-r").await.0, 1);
    memory_until(&d0, "vm-r", "256 MiB less", |m| m + 200 <= grown).await;
    // And the CPU back on line: nothing new plugged in.
    d0.update("vm-r", &res(2000, 512)).await.unwrap();
    assert_eq!(seen(&d0, "vm-r").await.0, 2);
    // More than the server has: refused as past its capacity.
    let over = d0.update("vm-r", &res(9000, 512)).await.unwrap_err();
    assert!(matches!(over, DriverError::Capacity { .. }), "{over:?}");

    // Its next boot is made of its resources alone.
    d0.update("vm-r", &res(3000, 512)).await.unwrap();
    d0.stop("vm-r").await.unwrap();
    d0.start("vm-r").await.unwrap();
    let (cpus, rebooted) = seen(&d0, "vm-r").await;
    assert_eq!(cpus, 3);
    assert!(
        rebooted.abs_diff(booted + 256) < 64,
        "{booted} -> {rebooted}"
    );
    d0.destroy("vm-r").await.unwrap();

    // A server that does not let VMs grow while they run (the default): more is refused with
    // the reason and nothing changes; less is given back.
    let d1 = QemuDriver::open(same_network(&f, 90, 1)).await.unwrap();
    boot_small(&d1, "vm-f").await;
    for (ask, why) in [
        (res(1000, 512), "booted without room to grow"),
        (res(2000, 256), "it may have 1 at most"),
    ] {
        let refused = d1.update("vm-f", &ask).await.unwrap_err();
        assert!(matches!(refused, DriverError::Permanent(_)), "{refused:?}");
        let text = refused.to_string();
        assert!(
            text.contains(why) && text.contains("stop and start it"),
            "{text}"
        );
        assert_eq!(resources(&d1, "vm-f").await, res(1000, 256));
    }
    let (_, before) = seen(&d1, "vm-f").await;
    d1.update("vm-f", &res(1000, 160)).await.unwrap();
    memory_until(&d1, "vm-f", "96 MiB less", |m| m + 80 <= before).await;
    d1.destroy("vm-f").await.unwrap();
}
