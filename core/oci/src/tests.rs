//! A real container: a Debian image built by recipe, unpacked with shifted owners, an overlay,
//! a bundle, runc, a network namespace with a veth; then what it serves, what it may write and
//! the limits it runs under are checked from the host.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloud48_image::{Builder, DEFAULT_MIRROR, Store};

use crate::*;

fn cache_dir() -> PathBuf {
    std::env::var_os("CLOUD48_CACHE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/var/cache/cloud48".into())
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth from the host into a container's network namespace, removed on drop.
struct Net {
    host_if: String,
}

impl Net {
    /// Moves one end of a new veth into the network namespace of `pid` with address
    /// 10.99.`subnet`.2, the other on the host with .1.
    fn attach(tag: &str, subnet: u8, pid: i32) -> Net {
        let net = Net {
            host_if: format!("c48o{tag}"),
        };
        let peer = format!("c48p{tag}");
        let _ = Command::new("ip")
            .args(["link", "del", &net.host_if])
            .status();
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &pid.to_string()]);
        ip(&[
            "addr",
            "add",
            &format!("10.99.{subnet}.1/30"),
            "dev",
            &net.host_if,
        ]);
        ip(&["link", "set", &net.host_if, "up"]);
        let inside = |args: &[&str]| {
            let out = Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "ip"])
                .args(args)
                .output()
                .expect("nsenter runs");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        inside(&["addr", "add", &format!("10.99.{subnet}.2/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// A container run by runc, deleted and unmounted on drop.
struct Running {
    runc: Runc,
    id: String,
    merged: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.runc.delete(&self.id, true);
        let _ = unmount(&self.merged);
    }
}

const SERVER: &str = r#"use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!";
while (my $c = $s->accept) {
    open(my $f, '<', '/srv/page'); my $p = <$f>; close $f;
    open(my $h, '<', '/proc/sys/kernel/hostname'); my $n = <$h>; close $h;
    chomp $p; chomp $n;
    print $c "page=$p uid=$< host=$n\n";
    close $c;
}"#;

fn answer(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) =
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))
        {
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            return text;
        }
        assert!(Instant::now() < deadline, "nothing answered on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn host_uid(pid: i32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The memory cgroup v1 limit of `pid`, if the memory controller is mounted as v1.
fn memory_limit(pid: i32) -> Option<u64> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))?;
    let text =
        fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")).ok()?;
    text.trim().parse().ok()
}

#[test]
fn an_image_runs_under_runc_on_its_own_root_in_its_own_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("server.toml");
    fs::write(
        &recipe,
        format!(
            "name = \"test/perl-server\"\ncommand = [\"perl\", \"-e\", {}]\n[files.\"/srv/page\"]\ncontent = \"from-the-image\\n\"\n",
            toml_string(SERVER)
        ),
    )
    .unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let (image, _) = Builder::new(cache_dir(), DEFAULT_MIRROR)
        .build(&recipe, &store, &mut |_| {})
        .unwrap();
    let details = store.show(image.digest.as_str()).unwrap();

    let rootfs = dir.path().join("rootfs");
    unpack(&store, &details, &rootfs, DEFAULT_ID_MAP.host).unwrap();
    assert!(rootfs.join("srv/page").is_file());
    assert!(!dir.path().join("rootfs.partial").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(rootfs.join("srv/page")).unwrap().uid(),
        DEFAULT_ID_MAP.host
    );

    let c = dir.path().join("c1");
    let (upper, work, merged) = (c.join("upper"), c.join("work"), c.join("merged"));
    fs::create_dir_all(&upper).unwrap();
    std::os::unix::fs::chown(&upper, Some(DEFAULT_ID_MAP.host), Some(DEFAULT_ID_MAP.host)).unwrap();
    mount_overlay(&rootfs, &upper, &work, &merged).unwrap();
    let tag = format!("{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 200) as u8 + 20;
    let runc = Runc::new(dir.path().join("runc")).unwrap();
    let id = format!("c48-test-{tag}");
    let bundle = Bundle {
        rootfs: merged.clone(),
        args: details.cmd.clone(),
        env: details.env.clone(),
        cwd: "/".into(),
        hostname: "c48-test".into(),
        netns: None,
        id_map: DEFAULT_ID_MAP,
        memory_mb: 256,
        cpu_millis: 500,
        pids: 64,
        binds: vec![],
        cgroup: format!("/cloud48-test/{id}"),
        criu_config: None,
    };
    bundle.write(&c.join("bundle")).unwrap();
    let pid = runc
        .create(&id, &c.join("bundle"), &c.join("log"), DEFAULT_ID_MAP.host)
        .unwrap();
    let running = Running {
        runc: runc.clone(),
        id: id.clone(),
        merged: merged.clone(),
    };
    let net = Net::attach(&tag, subnet, pid);
    runc.start(&id).unwrap();

    // It serves from its own root, in its own network and UTS namespaces, as its own root.
    let addr = format!("10.99.{subnet}.2:8080");
    let text = answer(&addr);
    assert_eq!(
        text.trim(),
        "page=from-the-image uid=0 host=c48-test",
        "{text}"
    );
    let state = runc.state(&id).unwrap().unwrap();
    assert_eq!(state.status, RuncStatus::Running);
    // Root inside is an unprivileged user outside.
    assert_eq!(host_uid(state.pid), DEFAULT_ID_MAP.host);
    // The memory limit is enforced by its cgroup (v1 on this project's machines).
    if Path::new("/sys/fs/cgroup/memory").is_dir() {
        assert_eq!(memory_limit(state.pid), Some(256 << 20));
    }

    // What it writes lands in its upper directory, not in the image or on the host.
    let out = runc
        .exec(
            &id,
            &[
                "sh".into(),
                "-c".into(),
                "echo mine > /srv/written && cat /proc/self/uid_map".into(),
            ],
            &[],
        )
        .unwrap();
    assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let map: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(map, ["0", "100000", "65536"]);
    assert_eq!(
        fs::read_to_string(upper.join("srv/written")).unwrap(),
        "mine\n"
    );
    assert!(!rootfs.join("srv/written").exists());
    assert!(!Path::new("/srv/written").exists());
    // Its root cannot write what the host's root owns: /proc/sys is read-only inside.
    let out = runc
        .exec(
            &id,
            &[
                "sh".into(),
                "-c".into(),
                "echo x > /proc/sys/kernel/hostname".into(),
            ],
            &[],
        )
        .unwrap();
    assert_ne!(out.code, 0);

    runc.pause(&id).unwrap();
    assert_eq!(runc.state(&id).unwrap().unwrap().status, RuncStatus::Paused);
    runc.resume(&id).unwrap();
    runc.kill(&id, "KILL", true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while runc.state(&id).unwrap().unwrap().status != RuncStatus::Stopped {
        assert!(Instant::now() < deadline, "the container did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(running);
    assert!(runc.state(&id).unwrap().is_none());
    assert!(!is_mounted(&merged));
    drop(net);
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}
