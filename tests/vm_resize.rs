//! A running VM given new resources (`update`): memory and CPUs plugged in, which the guest
//! sees; CPUs taken off line and memory given back; what was plugged in carried across a live
//! migration; what it cannot have while it runs refused with the reason and nothing changed;
//! its next boot made of its resources alone. Real QEMU (TCG here).

use std::time::{Duration, Instant};

use cloud48_engine::driver::{Driver, DriverError, GuestSpec};
use cloud48_engine::model::Resources;
use cloud48_qemu::QemuDriver;

use crate::vm::{factory, move_live, same_network, source, spec, web_vm};

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

async fn resources(d: &dyn Driver, guest: &str) -> Resources {
    d.status(guest).await.unwrap().unwrap().resources
}

#[tokio::test]
async fn a_running_vm_grows_and_shrinks_in_place_and_keeps_what_was_plugged_when_it_moves_live() {
    let _one = crate::common::HEAVY.lock().await;
    let (f, _sweep) = factory('r', 90, source().await);
    let d0 = QemuDriver::open(same_network(&f, 90, 0)).await.unwrap();
    // A roomier server: what a VM may grow to was set where it booted.
    let mut roomy = same_network(&f, 90, 1);
    roomy.capacity = Some(Resources {
        cpu_millis: 8000,
        memory_mb: 8192,
        disk_mb: 20_000,
    });
    let d1 = QemuDriver::open(roomy).await.unwrap();
    let info = d0
        .create(&GuestSpec {
            resources: res(1000, 256),
            ..spec("vm-r", web_vm())
        })
        .await
        .unwrap();
    let ip = info.ip.unwrap();
    d0.start("vm-r").await.unwrap();
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
    let shrunk = memory_until(&d0, "vm-r", "256 MiB less", |m| m + 200 <= grown).await;
    // And the CPU back on line: nothing new plugged in.
    d0.update("vm-r", &res(2000, 512)).await.unwrap();
    assert_eq!(seen(&d0, "vm-r").await.0, 2);

    // Live to another server: its QEMU starts with the memory region and the CPU, or the VM's
    // state would not fit; the guest keeps both.
    move_live(&d0, &d1, "vm-r", &ip).await;
    d0.destroy("vm-r").await.unwrap();
    let (cpus, moved) = seen(&d1, "vm-r").await;
    assert_eq!(cpus, 2);
    assert!(moved.abs_diff(shrunk) < 64, "{shrunk} MiB -> {moved} MiB");
    // It grows on there.
    d1.update("vm-r", &res(2000, 1024)).await.unwrap();
    memory_until(&d1, "vm-r", "grown past 900 MiB", |m| m >= 900).await;

    // Past what it booted with room for (its first server's size): refused with the reason,
    // though this server has room; nothing changes.
    for (ask, why) in [
        (res(2000, 6000), "may have 4096 MiB at most"),
        (res(6000, 1024), "it may have 4 at most"),
    ] {
        let refused = d1.update("vm-r", &ask).await.unwrap_err();
        assert!(matches!(refused, DriverError::Permanent(_)), "{refused:?}");
        let text = refused.to_string();
        assert!(
            text.contains(why) && text.contains("stop and start it"),
            "{text}"
        );
        assert_eq!(resources(&d1, "vm-r").await, res(2000, 1024));
    }
    assert_eq!(seen(&d1, "vm-r").await.0, 2);
    // More than the server has: refused as past its capacity.
    let over = d1.update("vm-r", &res(9000, 512)).await.unwrap_err();
    assert!(matches!(over, DriverError::Capacity { .. }), "{over:?}");

    // Its next boot is made of its resources alone, with room to grow to this server.
    d1.update("vm-r", &res(3000, 512)).await.unwrap();
    d1.stop("vm-r").await.unwrap();
    d1.start("vm-r").await.unwrap();
    let (cpus, rebooted) = seen(&d1, "vm-r").await;
    assert_eq!(cpus, 3);
    assert!(
        rebooted.abs_diff(booted + 256) < 64,
        "{booted} -> {rebooted}"
    );
    d1.update("vm-r", &res(6000, 512)).await.unwrap();
    assert_eq!(seen(&d1, "vm-r").await.0, 6);
    d1.destroy("vm-r").await.unwrap();
}
