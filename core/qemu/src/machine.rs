//! The pure parts of a virtual machine: which accelerator runs it, its MAC address, QEMU's
//! command line and the script its guest init runs as the workload.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub use cloud48_driver::{Accel, MachineModel, MachineShape};

use crate::shape;

/// What the operator asks for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when this machine can run guests with it, else TCG (said at start).
    #[default]
    Auto,
    /// KVM or nothing: the driver refuses to start where KVM cannot run guests.
    Kvm,
    /// TCG even where KVM works.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!("'{s}' is not an accelerator: use auto, kvm or tcg")),
        }
    }
}

/// Why KVM cannot run stock guests here, or `None` when it can: `/dev/kvm` must open for
/// reading and writing, and the CPU must show hardware virtualization (`vmx` or `svm`; a
/// paravirtual `/dev/kvm` without them cannot boot stock kernels).
pub fn kvm_unusable(cpuinfo: &str, dev_kvm: Result<(), String>) -> Option<String> {
    if let Err(e) = dev_kvm {
        return Some(format!("/dev/kvm cannot be opened: {e}"));
    }
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    (!hardware).then(|| {
        "the CPU shows no hardware virtualization (no vmx or svm flag): this /dev/kvm is \
         paravirtual and cannot boot stock guest kernels"
            .to_string()
    })
}

/// The accelerator for `choice`, given why KVM is unusable (if it is).
pub fn choose(choice: AccelChoice, kvm_unusable: Option<String>) -> Result<Accel, String> {
    match (choice, kvm_unusable) {
        (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
        (_, None) => Ok(Accel::Kvm),
        (AccelChoice::Auto, Some(_)) => Ok(Accel::Tcg),
        (AccelChoice::Kvm, Some(why)) => Err(format!(
            "--accel kvm was asked for, but KVM cannot run guests on this server: {why}; \
             use --accel tcg (far slower) or a server with hardware virtualization"
        )),
    }
}

/// The machine types QEMU's `-machine help` lists, and the versioned type its `q35` alias
/// stands for (what a new VM is given, so that its machine stays the same wherever it moves).
pub fn machine_types(help: &str) -> (Vec<String>, Option<String>) {
    let mut types = Vec::new();
    let mut q35 = None;
    for line in help.lines().skip_while(|l| l.starts_with("Supported")) {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if name == "q35" {
            q35 = line
                .split("(alias of ")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(str::to_string);
        }
        types.push(name.to_string());
    }
    (types, q35)
}

/// The CPU a VM gets under `accel`: `max` when emulated, under KVM the host's CPU model (from
/// `/proc/cpuinfo`), which a live migration's target must share.
pub fn cpu_of(accel: Accel, cpuinfo: &str) -> String {
    match accel {
        Accel::Tcg => "max".into(),
        Accel::Kvm => {
            let model = cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(str::trim)
                .unwrap_or("unknown");
            format!("host ({model})")
        }
    }
}

/// Why a server whose machine is `here` and whose QEMU knows `types` cannot take a VM whose
/// machine is `offered` live, or `Ok` when it can.
pub fn compatible(
    offered: &MachineModel,
    here: &MachineModel,
    types: &[String],
) -> Result<(), String> {
    if offered.accel != here.accel {
        return Err(format!(
            "the VM runs under {} with CPU {} and this server runs VMs under {} with CPU {}:              its CPU cannot stay the same across the move; migrate it without --live (it              restarts on this server's CPU)",
            offered.accel, offered.cpu, here.accel, here.cpu
        ));
    }
    if offered.cpu != here.cpu {
        return Err(format!(
            "the VM's CPU is {} and this server's is {}: a VM given its host's CPU moves live              only between servers with the same CPU model; migrate it without --live",
            offered.cpu, here.cpu
        ));
    }
    if !types.contains(&offered.machine_type) {
        return Err(format!(
            "the VM's machine type {} is unknown to this server's QEMU (its newest is {}):              upgrade QEMU here to the source's version or newer, or migrate without --live",
            offered.machine_type, here.machine_type
        ));
    }
    Ok(())
}

/// The MAC address of the VM at `ip` (derived from the address, as every guest's is).
pub use cloud48_linux::network::guest_mac as mac_of;

/// Everything QEMU's command line says about one VM.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Guest id (QEMU's `-name`, the guest's host name).
    pub guest: String,
    /// The guest's directory: sockets, console log, pid file (absolute).
    pub dir: PathBuf,
    /// Kernel and initramfs of its image.
    pub kernel: PathBuf,
    /// Initramfs of its image.
    pub initrd: PathBuf,
    /// Its own disk (a qcow2 overlay of its image's disk; absolute).
    pub disk: PathBuf,
    /// Host tap device on the bridge.
    pub tap: String,
    /// Address, prefix length and gateway.
    pub ip: Ipv4Addr,
    /// Prefix length of its subnet.
    pub prefix: u8,
    /// The bridge's address.
    pub gateway: Ipv4Addr,
    /// Its memory and CPUs.
    pub shape: MachineShape,
    /// Accelerator.
    pub accel: Accel,
    /// QEMU's machine type (versioned, e.g. `pc-q35-10.0`; `q35`: this QEMU's newest).
    pub machine_type: String,
    /// The workload script handed to the guest init.
    pub run_script: PathBuf,
    /// Waits for an incoming migration instead of booting (`-incoming defer`).
    pub incoming: bool,
}

/// Files of a guest's directory.
pub mod files {
    /// QMP socket.
    pub const QMP: &str = "qmp.sock";
    /// Guest agent socket.
    pub const QGA: &str = "qga.sock";
    /// Serial console (the guest's and its workload's output).
    pub const CONSOLE: &str = "console.log";
    /// QEMU's pid.
    pub const PID: &str = "qemu.pid";
    /// The workload script.
    pub const RUN: &str = "run.sh";
    /// Its disk.
    pub const DISK: &str = "disk.qcow2";
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// QEMU's arguments for `l`. Paths are absolute (a daemonized QEMU's relative paths break
/// migration); every device has a fixed id, so a migration target built from the same launch
/// matches its source.
pub fn args(l: &Launch) -> Vec<String> {
    let file = |name: &str| path(&l.dir.join(name));
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", l.guest),
        "-machine".into(),
        format!("{},accel={}", l.machine_type, l.accel),
        "-cpu".into(),
        match l.accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        },
        "-nodefaults".into(),
        // A guest that reboots on its own (a kernel panic) ends: the driver sees it stopped.
        "-no-reboot".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-kernel".into(),
        path(&l.kernel),
        "-initrd".into(),
        path(&l.initrd),
        "-append".into(),
        // Memory plugged in while it runs goes on line at once, partly movable so that it can
        // be given back; a small bounce buffer (the memory region beyond 4 GiB would otherwise
        // make the kernel set 64 MiB aside, the whole of a small VM's memory).
        format!(
            "root=/dev/vda rootfstype=ext4 rw console=ttyS0 quiet net.ifnames=0 panic=-1 \
             memhp_default_state=online memory_hotplug.online_policy=auto-movable swiotlb=2048 \
             init=/sbin/cloud48-init cloud48.ip={}/{} cloud48.gw={} \
             cloud48.name={}",
            l.ip, l.prefix, l.gateway, l.guest
        ),
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=file0,cache.direct=off",
            path(&l.disk)
        ),
        "-blockdev".into(),
        "driver=qcow2,file=file0,node-name=disk0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vda".into(),
        "-netdev".into(),
        format!("tap,id=net0,ifname={},script=no,downscript=no", l.tap),
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,id=nic0,mac={}", mac_of(l.ip)),
        "-device".into(),
        "virtio-balloon-pci,id=balloon0".into(),
        "-chardev".into(),
        format!(
            "socket,id=qga0,path={},server=on,wait=off",
            file(files::QGA)
        ),
        "-device".into(),
        "virtio-serial-pci,id=serial0".into(),
        "-device".into(),
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            file(files::QMP)
        ),
        "-mon".into(),
        "chardev=qmp0,mode=control".into(),
        "-chardev".into(),
        format!("file,id=con0,path={}", file(files::CONSOLE)),
        "-serial".into(),
        "chardev:con0".into(),
        "-fw_cfg".into(),
        format!("name=opt/cloud48/run,file={}", path(&l.run_script)),
        "-pidfile".into(),
        file(files::PID),
        "-daemonize".into(),
    ];
    a.extend(shape::args(&l.shape));
    if l.incoming {
        // Paused once the migration is in, until the source has let go of the disk.
        a.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    }
    a
}

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The workload script the guest init runs: the environment, the working directory, then the
/// process (`exec`, so that a stop's SIGTERM reaches it). An empty process idles.
pub fn run_script(process: &[String], env: &[String], workdir: Option<&str>) -> String {
    let mut s =
        String::from("#!/bin/sh\n# Written by the qemu driver: the container's workload.\n");
    for e in env {
        if let Some((k, v)) = e.split_once('=')
            && !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            s.push_str(&format!("export {k}={}\n", quote(v)));
        }
    }
    if let Some(dir) = workdir {
        s.push_str(&format!(
            "cd {} || {{ echo \"cloud48: working directory {} does not exist\" >&2; exit 112; }}\n",
            quote(dir),
            dir.replace(['"', '`', '$', '\\'], "")
        ));
    }
    if process.is_empty() {
        s.push_str("exec sleep infinity\n");
    } else {
        let words: Vec<String> = process.iter().map(|w| quote(w)).collect();
        s.push_str(&format!("exec {}\n", words.join(" ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_used_only_where_it_can_run_guests() {
        let hw = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let pv = "processor\t: 0\nflags\t\t: fpu vme sse hypervisor\n";
        assert_eq!(kvm_unusable(hw, Ok(())), None);
        assert!(kvm_unusable(pv, Ok(())).unwrap().contains("paravirtual"));
        assert!(
            kvm_unusable(hw, Err("Permission denied".into()))
                .unwrap()
                .contains("Permission denied")
        );
        assert_eq!(choose(AccelChoice::Auto, None), Ok(Accel::Kvm));
        assert_eq!(choose(AccelChoice::Auto, Some("x".into())), Ok(Accel::Tcg));
        assert_eq!(choose(AccelChoice::Tcg, None), Ok(Accel::Tcg));
        let refused = choose(AccelChoice::Kvm, Some("no vmx".into())).unwrap_err();
        assert!(refused.contains("no vmx") && refused.contains("--accel tcg"));
        assert!(
            "fast"
                .parse::<AccelChoice>()
                .unwrap_err()
                .contains("auto, kvm or tcg")
        );
    }

    #[test]
    fn the_mac_follows_the_address() {
        assert_eq!(mac_of(Ipv4Addr::new(10, 48, 1, 5)), "52:54:0a:30:01:05");
        assert_ne!(
            mac_of(Ipv4Addr::new(10, 48, 1, 5)),
            mac_of(Ipv4Addr::new(10, 48, 2, 5))
        );
    }

    #[test]
    fn the_workload_script_quotes_what_it_is_given() {
        let s = run_script(
            &[
                "nginx".into(),
                "-g".into(),
                "daemon off;".into(),
                "it's".into(),
            ],
            &["A=1 2".into(), "BAD KEY=x".into(), "PATH=/bin".into()],
            Some("/srv/x"),
        );
        assert!(s.contains("export A='1 2'\n"));
        assert!(!s.contains("BAD"));
        assert!(s.contains("cd '/srv/x' ||"));
        assert!(s.contains(r#"exec 'nginx' '-g' 'daemon off;' 'it'\''s'"#));
        assert!(run_script(&[], &[], None).ends_with("exec sleep infinity\n"));
    }

    #[test]
    fn the_command_line_names_absolute_files_and_fixed_devices() {
        let l = Launch {
            guest: "c7".into(),
            dir: "/d/guests/c7".into(),
            kernel: "/d/vm/k".into(),
            initrd: "/d/vm/i".into(),
            disk: "/d/guests/c7/disk.qcow2".into(),
            tap: "c48ab12cd34h".into(),
            ip: Ipv4Addr::new(10, 48, 1, 5),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 48, 1, 1),
            shape: shape::boot(
                &cloud48_model::Resources {
                    cpu_millis: 2000,
                    memory_mb: 256,
                    disk_mb: 1,
                },
                &cloud48_model::Resources {
                    cpu_millis: 2000,
                    memory_mb: 256,
                    disk_mb: 1,
                },
            ),
            accel: Accel::Tcg,
            machine_type: "pc-q35-10.0".into(),
            run_script: "/d/guests/c7/run.sh".into(),
            incoming: false,
        };
        let a = args(&l).join(" ");
        assert!(a.contains("-machine pc-q35-10.0,accel=tcg -cpu max -nodefaults"));
        assert!(a.contains("-m 256M -smp 2"));
        assert!(a.contains("cloud48.ip=10.48.1.5/24 cloud48.gw=10.48.1.1 cloud48.name=c7"));
        assert!(a.contains("filename=/d/guests/c7/disk.qcow2"));
        assert!(a.contains("mac=52:54:0a:30:01:05"));
        assert!(a.contains("path=/d/guests/c7/qmp.sock"));
        assert!(!a.contains("-incoming"));
        let target = args(&Launch {
            incoming: true,
            ..l
        });
        assert_eq!(target[target.len() - 2..], ["-incoming", "defer"]);
    }

    #[test]
    fn a_target_takes_a_vm_live_only_on_the_same_machine() {
        let help = "Supported machines are:\nmicrovm              microvm (i386)\n\
                    pc-q35-9.2           Standard PC (Q35 + ICH9, 2009)\n\
                    q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n\
                    pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n\
                    none                 empty machine\n";
        let (types, q35) = machine_types(help);
        assert_eq!(q35.as_deref(), Some("pc-q35-10.0"));
        assert!(types.iter().any(|t| t == "pc-q35-9.2"));
        assert!(!types.iter().any(|t| t == "Supported"));
        let cpuinfo = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n";
        assert_eq!(cpu_of(Accel::Tcg, cpuinfo), "max");
        assert_eq!(
            cpu_of(Accel::Kvm, cpuinfo),
            "host (Intel(R) Xeon(R) Gold 6338)"
        );
        let model = |t: &str, accel: Accel, cpu: &str| MachineModel {
            machine_type: t.into(),
            accel,
            cpu: cpu.into(),
        };
        let here = model("pc-q35-10.0", Accel::Tcg, "max");
        // An older machine type this QEMU still knows: the same machine.
        assert_eq!(
            compatible(&model("pc-q35-9.2", Accel::Tcg, "max"), &here, &types),
            Ok(())
        );
        let newer = compatible(&model("pc-q35-11.0", Accel::Tcg, "max"), &here, &types);
        assert!(newer.unwrap_err().contains("pc-q35-11.0 is unknown"));
        let kvm = compatible(&model("pc-q35-9.2", Accel::Kvm, "host (x)"), &here, &types);
        assert!(kvm.unwrap_err().contains("under kvm"));
        let kvm_here = model("pc-q35-10.0", Accel::Kvm, "host (a)");
        let other_cpu = compatible(
            &model("pc-q35-9.2", Accel::Kvm, "host (b)"),
            &kvm_here,
            &types,
        );
        assert!(other_cpu.unwrap_err().contains("same CPU model"));
    }
}
