//! Containers that run their image on their own root (the linux driver with images: runc, an
//! overlay per container, a user namespace): the driver conformance suite on them, locally and
//! behind agents, and what such a container is, seen from the host — its files, its user, what it writes, what moves
//! with it to another server, and the error when its image cannot be had. Needs root, runc and
//! debootstrap (the test image is built by recipe, cached in /var/cache/cloud48).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud48_engine::driver::conformance::{self, DriverFactory};
use cloud48_engine::driver::linux::{ImagesConfig, LinuxDriver};
use cloud48_engine::driver::remote::{RemoteDriver, RemoteTimeouts};
use cloud48_engine::driver::{Driver, DriverError, GuestSpec, GuestState};
use cloud48_engine::images::{Builder, DEFAULT_MIRROR, Store};
use cloud48_engine::model::{Check, Endpoint, ImageRef, Protocol, Readiness, Workload};
use tokio::io::AsyncReadExt;

use crate::linux::{Sweep, config, unique_prefix};

/// Answers every connection on 8080 with the page the image holds, the host name and the uid.
const SERVER: &str = r#"use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!";
while (my $c = $s->accept) {
    my $p = 'none';
    if (open(my $f, '<', '/srv/page')) { $p = <$f>; close $f; chomp $p; }
    open(my $h, '<', '/proc/sys/kernel/hostname'); my $n = <$h>; close $h; chomp $n;
    print $c "page=$p uid=$< host=$n\n";
    close $c;
}"#;

static IMAGE: tokio::sync::OnceCell<(PathBuf, Arc<Store>)> = tokio::sync::OnceCell::const_new();

/// The "core's" store with `test/web` built in it (once per test run).
pub async fn source() -> Arc<Store> {
    IMAGE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let dir = crate::common::scratch_dir("images");
                let recipe = dir.join("web.toml");
                std::fs::write(
                    &recipe,
                    format!(
                        "name = \"test/web\"\ncommand = [\"perl\", \"-e\", {}]\nports = [\"8080/tcp\"]\n[files.\"/srv/page\"]\ncontent = \"from-the-image\\n\"\n",
                        serde_json::to_string(SERVER).unwrap()
                    ),
                )
                .unwrap();
                let store = Store::open(dir.join("store")).unwrap();
                let cache = std::env::var_os("CLOUD48_CACHE_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| "/var/cache/cloud48".into());
                Builder::new(cache, DEFAULT_MIRROR)
                    .build(&recipe, &store, &mut |_| {})
                    .expect("the test image builds (debootstrap installed, Debian's mirror reachable)");
                (dir, Arc::new(store))
            })
            .await
            .unwrap()
        })
        .await
        .1
        .clone()
}

/// The image's own program (no command declared), its `http` endpoint, ready when it answers.
pub fn web() -> Workload {
    Workload {
        image: Some(ImageRef {
            reference: "test/web".into(),
            digest: None,
        }),
        endpoints: vec![Endpoint {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
        readiness: Some(Readiness {
            check: Check::Tcp {
                endpoint: "http".into(),
            },
            interval_ms: 100,
            retries: 100,
        }),
        ..Workload::default()
    }
}

pub async fn open(dir: &Path, prefix: &str, net: u32, n: u32, source: Arc<Store>) -> LinuxDriver {
    open_with(dir, prefix, net, n, source, None).await
}

async fn open_with(
    dir: &Path,
    prefix: &str,
    net: u32,
    n: u32,
    source: Arc<Store>,
    cache_bytes: Option<u64>,
) -> LinuxDriver {
    let mut cfg = config(dir, prefix, net, n);
    cfg.images = Some(ImagesConfig {
        source: Some(source),
        peers: None,
        cache_bytes,
        migration_host: Some("127.0.0.1".into()),
    });
    LinuxDriver::open(cfg)
        .await
        .expect("the linux driver opens (run the tests as root)")
}

/// Server `n` of a test on network `net`: servers given the same `net` share one bridge and
/// subnet (server 0's of `open`), each handing out a range of it of its own, so a container
/// moving live between them keeps its address.
pub async fn on_network(
    dir: &Path,
    prefix: &str,
    net: u32,
    n: u32,
    source: Arc<Store>,
) -> LinuxDriver {
    let mut cfg = config(dir, prefix, net, 0);
    cfg.name = format!("{prefix}-{n}");
    cfg.data_dir = dir.join(format!("server-{n}"));
    cfg.prefix = format!("{prefix}{n}");
    cfg.bridge = format!("{prefix}br{net}");
    // Each gives addresses of a range of its own, as agents sharing a network must.
    let first = 10 + n * 20;
    cfg.addresses = Some(
        format!("10.241.{net}.{first}-10.241.{net}.{}", first + 19)
            .parse()
            .unwrap(),
    );
    cfg.images = Some(ImagesConfig {
        source: Some(source),
        peers: None,
        cache_bytes: None,
        migration_host: Some("127.0.0.1".into()),
    });
    LinuxDriver::open(cfg)
        .await
        .expect("the linux driver opens (run the tests as root)")
}

struct ImageFactory {
    dir: tempfile::TempDir,
    prefix: String,
    source: Arc<Store>,
    net: u32,
}

impl ImageFactory {
    /// Servers on network `net` (the first, where a container moves live, shared with `peer`).
    async fn server(&self, n: u32) -> LinuxDriver {
        on_network(
            self.dir.path(),
            &self.prefix,
            self.net + n,
            n,
            self.source.clone(),
        )
        .await
    }
}

impl DriverFactory for ImageFactory {
    type Driver = LinuxDriver;
    async fn make(&self, n: u32) -> LinuxDriver {
        self.server(n).await
    }
    fn workload(&self) -> Workload {
        web()
    }
    async fn peer(&self) -> Option<LinuxDriver> {
        Some(
            on_network(
                self.dir.path(),
                &self.prefix,
                self.net,
                9,
                self.source.clone(),
            )
            .await,
        )
    }
}

#[tokio::test]
async fn linux_driver_running_images_passes_the_conformance_suite() {
    let source = source().await;
    let prefix = unique_prefix('i');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br60"), format!("{prefix}br61")],
    };
    let factory = ImageFactory {
        dir: crate::common::tempdir(),
        prefix,
        source,
        net: 60,
    };
    let failures = conformance::run(&factory).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

/// The same servers behind their agents, reached through the remote driver.
struct RemoteImageFactory(ImageFactory);

impl RemoteImageFactory {
    async fn behind_agent(&self, d: LinuxDriver, n: u32) -> RemoteDriver {
        let name = format!("{}-{n}", self.0.prefix);
        let caps = d.capabilities();
        let (_, url) = crate::agent::serve_agent(&name, Arc::new(d)).await;
        let r = RemoteDriver::new(&name, &url, crate::agent::TOKEN, RemoteTimeouts::default());
        // What the agent tells the core when it registers.
        r.set_capabilities(caps);
        r
    }
}

impl DriverFactory for RemoteImageFactory {
    type Driver = RemoteDriver;
    async fn make(&self, n: u32) -> RemoteDriver {
        let d = self.0.make(n).await;
        self.behind_agent(d, n).await
    }
    fn workload(&self) -> Workload {
        web()
    }
    async fn peer(&self) -> Option<RemoteDriver> {
        let d = self.0.peer().await?;
        Some(self.behind_agent(d, 9).await)
    }
}

#[tokio::test]
async fn image_containers_behind_agents_pass_the_conformance_suite() {
    let source = source().await;
    let prefix = unique_prefix('r');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br62"), format!("{prefix}br63")],
    };
    let factory = RemoteImageFactory(ImageFactory {
        dir: crate::common::tempdir(),
        prefix,
        source,
        net: 62,
    });
    let failures = conformance::run(&factory).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

pub fn spec(id: &str, workload: Workload) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: id.into(),
        type_id: "web".into(),
        resources: cloud48_engine::model::Resources {
            cpu_millis: 500,
            memory_mb: 128,
            disk_mb: 64,
        },
        ip: None,
        workload,
    }
}

pub async fn answer(ip: &str) -> String {
    let addr = (ip.parse::<Ipv4Addr>().unwrap(), 8080);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.trim().to_string()
}

pub async fn sh(d: &LinuxDriver, guest: &str, script: &str) -> (i32, String) {
    let out = d.exec(guest, script, &[]).await.unwrap();
    (
        out.exit_code,
        format!("{}{}", out.stdout, out.stderr).trim().to_string(),
    )
}

pub fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*path))
}

pub fn runc_knows(prefix: &str, guest: &str) -> bool {
    std::process::Command::new("runc")
        .args([
            "--root",
            &format!("/run/cloud48-runc/{prefix}"),
            "state",
            guest,
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn a_container_runs_its_image_on_its_own_root_and_takes_its_files_along() {
    let source = source().await;
    let prefix = unique_prefix('j');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0"), format!("{prefix}br1")],
    };
    let dir = crate::common::tempdir();
    let d = open(dir.path(), &prefix, 70, 0, source.clone()).await;
    assert!(d.capabilities().images);

    // Made: the image was pulled into the server's own store and nothing runs yet.
    let info = d.create(&spec("web-a", web())).await.unwrap();
    assert_eq!(info.state, GuestState::Stopped);
    let pulled = Store::open(dir.path().join("server-0/images"))
        .unwrap()
        .list()
        .unwrap();
    assert_eq!(pulled.len(), 1);
    assert_eq!(
        pulled[0].name.as_ref().map(|n| n.to_string()).as_deref(),
        Some("test/web:latest")
    );

    // It serves from the image's files, under its own host name, as root in its namespace —
    // which is an unprivileged id on the server.
    d.start("web-a").await.unwrap();
    let ip = info.ip.unwrap();
    assert_eq!(answer(&ip).await, "page=from-the-image uid=0 host=web-a");
    let (code, map) = sh(&d, "web-a", "cat /proc/self/uid_map").await;
    assert_eq!(code, 0, "{map}");
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );
    // The server's files are not its files.
    let marker = dir.path().join("host-marker");
    std::fs::write(&marker, "host").unwrap();
    let (code, _) = sh(&d, "web-a", &format!("test ! -e {}", marker.display())).await;
    assert_eq!(code, 0, "the container sees the server's files");

    // What it writes and removes lands in its own upper directory, not in the image.
    let (code, out) = sh(&d, "web-a", "echo mine > /srv/written && rm /srv/page").await;
    assert_eq!(code, 0, "{out}");
    let upper = dir.path().join("server-0/guests/web-a/fs");
    assert_eq!(
        std::fs::read_to_string(upper.join("srv/written")).unwrap(),
        "mine\n"
    );
    assert_eq!(answer(&ip).await, "page=none uid=0 host=web-a");

    // Another container of the same image sees the image's files, not the first one's; and
    // root inside cannot write what the server's root owns.
    let other = d.create(&spec("web-b", web())).await.unwrap();
    d.start("web-b").await.unwrap();
    assert_eq!(
        answer(other.ip.as_deref().unwrap()).await,
        "page=from-the-image uid=0 host=web-b"
    );
    let (code, _) = sh(&d, "web-b", "test ! -e /srv/written").await;
    assert_eq!(code, 0, "web-b sees what web-a wrote");
    let (code, _) = sh(&d, "web-b", "echo x > /proc/sys/kernel/hostname").await;
    assert_ne!(code, 0, "root inside wrote the server's kernel settings");
    d.destroy("web-b").await.unwrap();

    // Frozen and thawed by its cgroup.
    d.suspend("web-a").await.unwrap();
    assert_eq!(
        d.status("web-a").await.unwrap().unwrap().state,
        GuestState::Suspended
    );
    d.resume("web-a").await.unwrap();

    // A restarted agent finds it running, from its record and the kernel, and drives it (exec
    // through runc here, stop and start below).
    drop(d);
    let d = open(dir.path(), &prefix, 70, 0, source.clone()).await;
    assert_eq!(
        d.status("web-a").await.unwrap().unwrap().state,
        GuestState::Running
    );
    assert_eq!(answer(&ip).await, "page=none uid=0 host=web-a");
    let (code, written) = sh(&d, "web-a", "cat /srv/written").await;
    assert_eq!((code, written.as_str()), (0, "mine"));

    // Stopped: no process, no overlay, no runc container; started again, its files are kept.
    d.stop("web-a").await.unwrap();
    assert_eq!(
        d.status("web-a").await.unwrap().unwrap().state,
        GuestState::Stopped
    );
    assert!(!mounted(&dir.path().join("server-0/guests/web-a/merged")));
    assert!(!runc_knows(&format!("{prefix}0"), "web-a"));
    d.start("web-a").await.unwrap();
    let (_, written) = sh(&d, "web-a", "cat /srv/written").await;
    assert_eq!(written, "mine");
    d.stop("web-a").await.unwrap();

    // Exported and imported on another server (whose store pulls the image itself): the
    // file it wrote and the one it removed travel with it.
    let image = d.export("web-a").await.unwrap();
    let target = open(dir.path(), &prefix, 70, 1, source.clone()).await;
    let moved = target.import(&spec("web-a", web()), &image).await.unwrap();
    target.start("web-a").await.unwrap();
    let moved_ip = moved.ip.unwrap();
    assert_eq!(answer(&moved_ip).await, "page=none uid=0 host=web-a");
    let (_, written) = sh(&target, "web-a", "cat /srv/written").await;
    assert_eq!(written, "mine");

    // Destroyed: nothing of it is left on either server.
    for (n, server) in [(0, &d), (1, &target)] {
        server.destroy("web-a").await.unwrap();
        assert!(server.status("web-a").await.unwrap().is_none());
        assert!(!dir.path().join(format!("server-{n}/guests/web-a")).exists());
        assert!(!runc_knows(&format!("{prefix}{n}"), "web-a"));
    }
}

#[tokio::test]
async fn an_image_the_server_cannot_get_is_a_clear_error_and_leaves_no_container() {
    let source = source().await;
    let prefix = unique_prefix('k');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    let d = open(dir.path(), &prefix, 80, 0, source).await;
    let mut w = web();
    w.image = Some(ImageRef {
        reference: "test/absent".into(),
        digest: None,
    });
    let err = d.create(&spec("web-x", w)).await.unwrap_err();
    assert!(matches!(err, DriverError::Permanent(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("test/absent") && text.contains("cannot pull"),
        "{text}"
    );
    assert!(d.status("web-x").await.unwrap().is_none());
    assert!(!dir.path().join("server-0/guests/web-x").exists());
}

#[tokio::test]
async fn a_full_image_cache_drops_the_least_recently_used_image_no_container_runs() {
    let source = source().await;
    // A second, tiny image beside test/web (never run: creating a container prepares it).
    let tiny = {
        let dir = crate::common::tempdir();
        std::fs::create_dir_all(dir.path().join("srv")).unwrap();
        std::fs::write(dir.path().join("srv/tiny"), "tiny").unwrap();
        let layer = source.write_layer_from_dir(dir.path()).unwrap();
        source
            .commit(
                &"test/tiny".parse().unwrap(),
                &[layer],
                &cloud48_engine::images::NewImage {
                    cmd: vec!["/bin/true".into()],
                    ..Default::default()
                },
            )
            .unwrap()
    };
    let prefix = unique_prefix('m');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    // One byte: every image not in use is over the bound.
    let d = open_with(dir.path(), &prefix, 90, 0, source, Some(1)).await;
    d.create(&spec("web-1", web())).await.unwrap();
    let held = d.stats().await.unwrap().images;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].starts_with("test/web:latest@sha256:"), "{held:?}");
    // In use, it stays although the cache is over its bound.
    assert!(
        Store::open(dir.path().join("server-0/images"))
            .unwrap()
            .show("test/web")
            .is_ok()
    );

    d.destroy("web-1").await.unwrap();
    let mut w = web();
    w.image = Some(ImageRef {
        reference: "test/tiny".into(),
        digest: None,
    });
    d.create(&spec("tiny-1", w)).await.unwrap();
    // No container runs test/web any more: it went, store and unpacked root alike.
    let held = d.stats().await.unwrap().images;
    assert_eq!(held, [format!("test/tiny:latest@{}", tiny.digest)]);
    let store = Store::open(dir.path().join("server-0/images")).unwrap();
    assert!(store.show("test/web").is_err());
    let roots: Vec<_> = std::fs::read_dir(dir.path().join("server-0/rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(roots, [tiny.digest.hex().to_string()]);
    d.destroy("tiny-1").await.unwrap();
}

/// A tmpfs of `mb` MiB mounted at `at` until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mb: u32) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {} (run as root)", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_a_clear_error_naming_the_image_and_leaves_nothing_half_made() {
    let source = source().await;
    let prefix = unique_prefix('f');
    let _sweep = Sweep {
        prefix: prefix.clone(),
        bridges: vec![format!("{prefix}br0")],
    };
    let dir = crate::common::tempdir();
    // The server's whole data directory has room for less than the image.
    let _disk = Tmpfs::mount(&dir.path().join("server-0"), 8);
    let d = open(dir.path(), &prefix, 84, 0, source).await;
    let err = d.create(&spec("web-f", web())).await.unwrap_err();
    assert!(matches!(err, DriverError::Permanent(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("test/web") && text.contains("No space left on device"),
        "{text}"
    );
    assert!(d.status("web-f").await.unwrap().is_none());
    assert!(!dir.path().join("server-0/guests/web-f").exists());
    // The store names no image and keeps no partial blob.
    let store = Store::open(dir.path().join("server-0/images")).unwrap();
    assert!(store.list().unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("server-0/images/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
