//! The pure parts of a VM's memory and CPUs: how it boots so that it can grow while it runs
//! (a virtio-mem region up to its server's memory, more possible CPUs than it starts with),
//! QEMU's arguments for a shape, and the plan that gives a running VM new resources (memory
//! plugged into or out of the region, CPUs plugged in, CPUs taken on or off line in the guest,
//! the balloon set) or says why it cannot.
//!
//! Memory grows through virtio-mem rather than DIMMs: its region exists from boot, so a VM
//! that grew moves live with the same command line; QEMU 10.0 under TCG aborts in its dirty
//! tracking (`tlb_reset_dirty_range_all`) migrating a VM with a DIMM plugged in while it ran.

use cloud48_driver::MachineShape;
use cloud48_model::Resources;

/// The least memory a VM gets, MiB.
pub const LEAST_MEMORY_MB: u64 = 128;
/// Memory is plugged in steps of this size (virtio-mem's block size on x86), MiB.
pub const MEMORY_STEP_MB: u64 = 2;
/// The id of the virtio-mem device memory is plugged into.
pub const MEMORY_DEVICE: &str = "vmem0";
/// A q35 machine with more vCPUs needs interrupt remapping.
const MOST_VCPUS: u64 = 255;

/// Memory a VM with `r` gets, MiB.
pub fn memory_of(r: &Resources) -> u64 {
    r.memory_mb.max(LEAST_MEMORY_MB)
}

/// Virtual CPUs a VM with `r` gets: one per started thousand millis.
pub fn vcpus_of(r: &Resources) -> u64 {
    r.cpu_millis.div_ceil(1000).clamp(1, MOST_VCPUS)
}

/// How a VM with `r` boots on a server of `capacity`: room to grow to the server's size while
/// it runs.
pub fn boot(r: &Resources, capacity: &Resources) -> MachineShape {
    let (memory, vcpus) = (memory_of(r), vcpus_of(r));
    // The region is whole steps.
    let region = (capacity.memory_mb.max(memory) - memory) / MEMORY_STEP_MB * MEMORY_STEP_MB;
    MachineShape {
        boot_memory_mb: memory,
        max_memory_mb: memory + region,
        boot_vcpus: vcpus,
        max_vcpus: vcpus_of(capacity).max(vcpus),
        plugged_memory_mb: 0,
        cpus: Vec::new(),
    }
}

/// The shape of a VM that booted with `r` and no room to grow: as if its server were its size.
pub fn fixed(r: &Resources) -> MachineShape {
    boot(r, r)
}

/// QEMU's memory and CPU arguments for `s`, its plugged devices among them.
pub fn args(s: &MachineShape) -> Vec<String> {
    let region = s.max_memory_mb.saturating_sub(s.boot_memory_mb);
    let mut a = vec!["-m".to_string()];
    a.push(if region > 0 {
        format!("{}M,maxmem={}M", s.boot_memory_mb, s.max_memory_mb)
    } else {
        format!("{}M", s.boot_memory_mb)
    });
    a.push("-smp".into());
    a.push(if s.max_vcpus > s.boot_vcpus {
        format!("{},maxcpus={}", s.boot_vcpus, s.max_vcpus)
    } else {
        s.boot_vcpus.to_string()
    });
    if region > 0 {
        // Host memory is taken only as the guest uses what is plugged in.
        a.extend([
            "-object".into(),
            format!("memory-backend-ram,id={MEMORY_DEVICE}-ram,size={region}M,reserve=off"),
            "-device".into(),
            format!(
                "virtio-mem-pci,id={MEMORY_DEVICE},memdev={MEMORY_DEVICE}-ram,requested-size={}M",
                s.plugged_memory_mb
            ),
        ]);
    }
    for c in &s.cpus {
        let mut device = format!("{},id={}", c.driver, c.id);
        for (name, index) in &c.place {
            device.push_str(&format!(",{name}={index}"));
        }
        a.extend(["-device".into(), device]);
    }
    a
}

/// What gives a running VM of shape `s` the resources `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resize {
    /// Memory plugged into its region, after, MiB.
    pub plugged_memory_mb: u64,
    /// How many more CPUs to plug in.
    pub plug_cpus: u64,
    /// The vCPUs the guest runs on, after: the first this many are online.
    pub online: u64,
    /// The memory the guest keeps (the balloon gives back what it has beyond), MiB.
    pub memory_mb: u64,
}

/// Plans giving running `guest`, of shape `s`, the resources `to`; or why it cannot have them
/// while it runs (nothing is changed then).
pub fn plan(guest: &str, s: &MachineShape, to: &Resources) -> Result<Resize, String> {
    let (memory, vcpus) = (memory_of(to), vcpus_of(to));
    let restart = "or stop and start it to boot with what it asks for";
    if memory > s.max_memory_mb {
        return Err(format!(
            "VM {guest} cannot grow to {memory} MiB while it runs: {}; ask for {} MiB at most, \
             {restart}",
            if s.max_memory_mb == s.boot_memory_mb {
                "it booted without room to grow".to_string()
            } else {
                format!("it may have {} MiB at most", s.max_memory_mb)
            },
            s.max_memory_mb
        ));
    }
    if vcpus > s.max_vcpus {
        return Err(format!(
            "VM {guest} cannot run on {vcpus} vCPUs while it runs: it may have {} at most; ask \
             for {} CPU millis at most, {restart}",
            s.max_vcpus,
            s.max_vcpus * 1000
        ));
    }
    let plugged =
        (memory.saturating_sub(s.boot_memory_mb)).div_ceil(MEMORY_STEP_MB) * MEMORY_STEP_MB;
    Ok(Resize {
        plugged_memory_mb: plugged.min(s.max_memory_mb - s.boot_memory_mb),
        plug_cpus: vcpus.saturating_sub(s.boot_vcpus + s.cpus.len() as u64),
        online: vcpus,
        memory_mb: memory,
    })
}

/// The id of the `n`th CPU plugged in.
pub fn cpu_id(n: usize) -> String {
    format!("cpu{n}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud48_driver::PluggedCpu;

    fn res(cpu_millis: u64, memory_mb: u64) -> Resources {
        Resources {
            cpu_millis,
            memory_mb,
            disk_mb: 1000,
        }
    }

    #[test]
    fn a_vm_boots_with_room_to_grow_to_its_server() {
        let s = boot(&res(1500, 256), &res(4000, 4096));
        assert_eq!((s.boot_memory_mb, s.max_memory_mb), (256, 4096));
        assert_eq!((s.boot_vcpus, s.max_vcpus), (2, 4));
        assert_eq!(
            args(&s).join(" "),
            "-m 256M,maxmem=4096M -smp 2,maxcpus=4 \
             -object memory-backend-ram,id=vmem0-ram,size=3840M,reserve=off \
             -device virtio-mem-pci,id=vmem0,memdev=vmem0-ram,requested-size=0M"
        );
        // A VM the size of its server has nowhere to grow.
        let full = boot(&res(4000, 4096), &res(4000, 4096));
        assert_eq!(args(&full).join(" "), "-m 4096M -smp 4");
        assert_eq!(args(&fixed(&res(10, 64))).join(" "), "-m 128M -smp 1");
    }

    #[test]
    fn what_was_plugged_is_on_the_command_line_of_a_migration_target() {
        let mut s = boot(&res(1000, 256), &res(4000, 1280));
        s.plugged_memory_mb = 512;
        s.cpus.push(PluggedCpu {
            id: "cpu0".into(),
            driver: "max-x86_64-cpu".into(),
            place: vec![("socket-id".into(), 1), ("core-id".into(), 0)],
        });
        let a = args(&s).join(" ");
        assert!(a.contains("virtio-mem-pci,id=vmem0,memdev=vmem0-ram,requested-size=512M"));
        assert!(a.ends_with("-device max-x86_64-cpu,id=cpu0,socket-id=1,core-id=0"));
    }

    #[test]
    fn a_running_vm_grows_into_its_region_and_gives_back_by_balloon() {
        let mut s = boot(&res(1000, 256), &res(4000, 4096));
        let grow = plan("vm", &s, &res(2000, 601)).unwrap();
        assert_eq!(
            (
                grow.plugged_memory_mb,
                grow.plug_cpus,
                grow.online,
                grow.memory_mb
            ),
            (346, 1, 2, 601)
        );
        s.plugged_memory_mb = 346;
        s.cpus.push(PluggedCpu {
            id: "cpu0".into(),
            driver: "t".into(),
            place: vec![],
        });
        // Less: unplugged from the region, a CPU off line.
        let shrink = plan("vm", &s, &res(1000, 300)).unwrap();
        assert_eq!(
            (shrink.plugged_memory_mb, shrink.plug_cpus, shrink.online),
            (44, 0, 1)
        );
        // Below what it booted with: the balloon.
        let least = plan("vm", &s, &res(1000, 200)).unwrap();
        assert_eq!((least.plugged_memory_mb, least.memory_mb), (0, 200));
        // The CPU back on line: nothing new plugged in.
        assert_eq!(plan("vm", &s, &res(2000, 256)).unwrap().plug_cpus, 0);
    }

    #[test]
    fn what_a_running_vm_cannot_have_is_refused_with_the_reason() {
        let s = boot(&res(1000, 256), &res(4000, 1024));
        let big = plan("vm", &s, &res(1000, 1100)).unwrap_err();
        assert!(big.contains("may have 1024 MiB at most"), "{big}");
        let cpus = plan("vm", &s, &res(5000, 256)).unwrap_err();
        assert!(cpus.contains("4 at most"), "{cpus}");
        let old = plan("vm", &fixed(&res(1000, 256)), &res(1000, 512)).unwrap_err();
        assert!(old.contains("booted without room to grow"), "{old}");
        assert!(old.contains("stop and start it"), "{old}");
    }
}
