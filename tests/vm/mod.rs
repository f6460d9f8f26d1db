//! Virtual machines (the qemu driver): the conformance suite on it, locally and behind agents,
//! and what a VM is seen from the host — it boots its image's kernel, serves at its address,
//! runs scripts through its guest agent, outlives a restarted driver, and a VM that cannot be
//! had says why. Needs root, QEMU and debootstrap; the test image (`test/web-vm`) is built by
//! recipe with `--vm`, cached in /var/cache/cloud48. VMs run under TCG where KVM cannot run
//! guests (as on the project's machines). Live moves are in `live.rs`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloud48_engine::driver::conformance::{self, DriverFactory};
use cloud48_engine::driver::remote::{RemoteDriver, RemoteTimeouts};
use cloud48_engine::driver::{Driver, GuestSpec, GuestState, LiveOffer, MachineModel};
use cloud48_engine::images::{Builder, DEFAULT_MIRROR, Store};
use cloud48_engine::model::{Check, Endpoint, ImageRef, Protocol, Readiness, Resources, Workload};
use cloud48_qemu::machine::AccelChoice;
use cloud48_qemu::{QemuConfig, QemuDriver};
use tokio::io::AsyncReadExt;

use crate::linux::unique_prefix;

mod live;

/// Answers every connection on 8080 with the page the image holds and the host name.
const SERVER: &str = r#"use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!";
while (my $c = $s->accept) {
    my $p = 'none';
    if (open(my $f, '<', '/srv/page')) { $p = <$f>; close $f; chomp $p; }
    open(my $h, '<', '/proc/sys/kernel/hostname'); my $n = <$h>; close $h; chomp $n;
    print $c "page=$p host=$n\n";
    close $c;
}"#;

static IMAGE: tokio::sync::OnceCell<(PathBuf, Arc<Store>)> = tokio::sync::OnceCell::const_new();

pub fn cache_dir() -> PathBuf {
    std::env::var_os("CLOUD48_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/cloud48".into())
}

/// The "core's" store with `test/web` and `test/web-vm` built in it (once per test run).
pub async fn source() -> Arc<Store> {
    IMAGE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let dir = crate::common::scratch_dir("vm-images");
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
                for vm in [false, true] {
                    Builder::new(cache_dir(), DEFAULT_MIRROR)
                        .vm(vm)
                        .build(&recipe, &store, &mut |_| {})
                        .expect("the test images build (debootstrap installed, Debian's mirror reachable)");
                }
                // Two VM images that do not boot but make VMs (for the image cache's bound).
                for name in ["test/blank-vm", "test/other-vm"] {
                    blank_vm_image(&store, name);
                }
                // An OS container's image under a VM's name.
                let (_, layout, _) = Builder::new(cache_dir(), DEFAULT_MIRROR)
                    .prepare(&recipe, &mut |_| {})
                    .unwrap();
                store
                    .import_path(&layout, Some(&"test/fake-vm".parse().unwrap()))
                    .unwrap();
                (dir, Arc::new(store))
            })
            .await
            .unwrap()
        })
        .await
        .1
        .clone()
}

/// Writes into `store` a VM image `name` whose disk is empty (VMs can be made of it, not
/// booted): its layer holds what a VM image's does, and its name (so each is its own image).
fn blank_vm_image(store: &Store, name: &str) {
    let dir = crate::common::tempdir();
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.path().join("disk.qcow2"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    for (file, content) in [
        ("vmlinuz", ""),
        ("initrd.img", ""),
        ("size-mb", "16"),
        ("name", name),
    ] {
        std::fs::write(dir.path().join(file), content).unwrap();
    }
    let layer = store.write_layer_from_dir(dir.path()).unwrap();
    store
        .commit(&name.parse().unwrap(), &[layer], &Default::default())
        .unwrap();
}

/// The image's own program, its `http` endpoint, ready when it answers (a qemu server runs
/// the image's VM variant, `test/web-vm`).
pub fn web_vm() -> Workload {
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
            retries: 600,
        }),
        ..Workload::default()
    }
}

/// Ends what a test's VMs left behind: QEMU processes under its directory, its tap devices
/// and bridges.
pub struct VmSweep {
    dir: PathBuf,
    prefix: String,
}

impl VmSweep {
    /// Ends, when dropped, what VMs under `dir` and interfaces starting with `prefix` left.
    pub fn new(dir: &Path, prefix: &str) -> VmSweep {
        VmSweep {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
        }
    }
}

impl Drop for VmSweep {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-9", "-f"])
            .arg(self.dir.to_string_lossy().as_ref())
            .status();
        let links = std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .filter(|n| n.starts_with(&self.prefix))
        {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", name])
                .status();
        }
    }
}

/// The config of server `n` of `f` on one network shared by all its servers (a VM moving live
/// keeps its address): one bridge, one subnet `10.242.NET.0/24`.
pub fn same_network(f: &VmFactory, net: u32, n: u32) -> QemuConfig {
    let mut c = config(f.dir.path(), &f.prefix, net, n, f.source.clone());
    c.bridge = format!("{}br0", f.prefix);
    c.subnet = format!("10.242.{net}.0/24").parse().unwrap();
    // A range of it each, as agents sharing a network give.
    let first = 10 + n * 20;
    c.addresses = Some(
        format!("10.242.{net}.{first}-10.242.{net}.{}", first + 19)
            .parse()
            .unwrap(),
    );
    c
}

pub fn config(dir: &Path, prefix: &str, net: u32, n: u32, source: Arc<Store>) -> QemuConfig {
    QemuConfig {
        name: format!("{prefix}-{n}"),
        data_dir: dir.join(format!("server-{n}")),
        bridge: format!("{prefix}br{n}"),
        subnet: format!("10.242.{}.0/24", net + n).parse().unwrap(),
        addresses: None,
        image_cache_bytes: None,
        prefix: format!("{prefix}{n}"),
        capacity: Some(Resources {
            cpu_millis: 4000,
            memory_mb: 4096,
            disk_mb: 20_000,
        }),
        stop_grace: Duration::from_secs(30),
        boot_timeout: Duration::from_secs(240),
        accel: AccelChoice::Auto,
        source: Some(source),
        peers: None,
        migration_host: "127.0.0.1".into(),
        grow_live: false,
    }
}

async fn open(dir: &Path, prefix: &str, net: u32, n: u32, source: Arc<Store>) -> QemuDriver {
    QemuDriver::open(config(dir, prefix, net, n, source))
        .await
        .expect("the qemu driver opens (root, QEMU installed)")
}

pub struct VmFactory {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    net: u32,
    source: Arc<Store>,
}

impl DriverFactory for VmFactory {
    type Driver = QemuDriver;
    async fn make(&self, n: u32) -> QemuDriver {
        open(
            self.dir.path(),
            &self.prefix,
            self.net,
            n,
            self.source.clone(),
        )
        .await
    }
    fn workload(&self) -> Workload {
        web_vm()
    }
    async fn peer(&self) -> Option<QemuDriver> {
        Some(
            QemuDriver::open(same_network(self, self.net, 9))
                .await
                .expect("the qemu driver opens (root, QEMU installed)"),
        )
    }
}

pub fn factory(tag: char, net: u32, source: Arc<Store>) -> (VmFactory, VmSweep) {
    let prefix = unique_prefix(tag);
    let dir = crate::common::tempdir();
    let sweep = VmSweep {
        dir: dir.path().to_path_buf(),
        prefix: prefix.clone(),
    };
    (
        VmFactory {
            dir,
            prefix,
            net,
            source,
        },
        sweep,
    )
}

#[tokio::test]
async fn qemu_driver_passes_the_conformance_suite() {
    let _one = crate::common::HEAVY.lock().await;
    let (factory, _sweep) = factory('q', 10, source().await);
    let failures = conformance::run(&factory).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

/// The same servers behind their agents, reached through the remote driver.
struct RemoteVmFactory(VmFactory);

impl DriverFactory for RemoteVmFactory {
    type Driver = RemoteDriver;
    async fn make(&self, n: u32) -> RemoteDriver {
        let d = self.0.make(n).await;
        remote(&self.0, Arc::new(d), n).await
    }
    fn workload(&self) -> Workload {
        web_vm()
    }
    async fn peer(&self) -> Option<RemoteDriver> {
        let d = self.0.peer().await?;
        Some(remote(&self.0, Arc::new(d), 9).await)
    }
}

#[tokio::test]
async fn vms_behind_agents_pass_the_conformance_suite() {
    let _one = crate::common::HEAVY.lock().await;
    let (factory, _sweep) = factory('w', 20, source().await);
    let failures = conformance::run(&RemoteVmFactory(factory)).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

pub fn spec(id: &str, workload: Workload) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: id.into(),
        type_id: "web".into(),
        resources: Resources {
            cpu_millis: 1000,
            memory_mb: 256,
            disk_mb: 2048,
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

#[tokio::test]
async fn a_vm_boots_its_image_serves_runs_scripts_and_outlives_its_driver() {
    let _one = crate::common::HEAVY.lock().await;
    let (f, _sweep) = factory('b', 30, source().await);
    let d = f.make(0).await;
    let caps = d.capabilities();
    assert!(caps.vm.is_some() && caps.exec && caps.images);

    let info = d.create(&spec("vm-a", web_vm())).await.unwrap();
    assert_eq!(info.state, GuestState::Stopped);
    d.start("vm-a").await.unwrap();
    let ip = info.ip.unwrap();
    // Its own kernel and file system: the page from its image, its own host name.
    assert_eq!(answer(&ip).await, "page=from-the-image host=vm-a");
    let out = d
        .exec(
            "vm-a",
            "uname -r; test \"$1\" = two && echo args-ok; echo to-err >&2; exit 3",
            &["two".into()],
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3, "{out:?}");
    assert!(
        out.stdout.contains("amd64") && out.stdout.contains("args-ok"),
        "{out:?}"
    );
    assert_eq!(out.stderr.trim(), "to-err");
    // Its disk is its own and grew to the size it was given.
    let out = d
        .exec("vm-a", "echo kept > /srv/mine; df -m / | tail -1", &[])
        .await
        .unwrap();
    let size_mb: u64 = out
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(size_mb > 1500, "the root file system did not grow: {out:?}");
    assert!(d.logs("vm-a").await.unwrap().contains("cloud48: up"));

    // A restarted driver finds the VM running and controls it again.
    drop(d);
    let d = f.make(0).await;
    assert_eq!(
        d.status("vm-a").await.unwrap().map(|g| g.state),
        Some(GuestState::Running)
    );
    let out = d.exec("vm-a", "cat /srv/mine", &[]).await.unwrap();
    assert_eq!(out.stdout.trim(), "kept");

    // Suspended, it does not answer; resumed, it does.
    d.suspend("vm-a").await.unwrap();
    let paused = tokio::time::timeout(Duration::from_millis(500), answer(&ip)).await;
    assert!(paused.is_err(), "a suspended VM answered: {paused:?}");
    d.resume("vm-a").await.unwrap();
    assert_eq!(answer(&ip).await, "page=from-the-image host=vm-a");

    // Stopped and started again, its files are still there.
    d.stop("vm-a").await.unwrap();
    assert_eq!(
        d.status("vm-a").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
    d.start("vm-a").await.unwrap();
    let out = d.exec("vm-a", "cat /srv/mine", &[]).await.unwrap();
    assert_eq!(out.stdout.trim(), "kept");
    d.destroy("vm-a").await.unwrap();
    assert!(!f.dir.path().join("server-0/guests/vm-a").exists());
}

#[tokio::test]
async fn a_vm_that_cannot_be_had_says_why_and_leaves_nothing() {
    let _one = crate::common::HEAVY.lock().await;
    let source = source().await;
    let (f, _sweep) = factory('n', 40, source.clone());
    let d = f.make(0).await;

    // An image whose VM variant was never built.
    let mut plain = web_vm();
    plain.image = Some(ImageRef {
        reference: "test/absent".into(),
        digest: None,
    });
    let err = d
        .create(&spec("vm-x", plain))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test/absent-vm:latest") && err.contains("image build --vm"),
        "{err}"
    );
    // An image under a VM name that is no VM image: nothing to boot.
    let mut not_vm = web_vm();
    not_vm.image = Some(ImageRef {
        reference: "test/fake-vm".into(),
        digest: None,
    });
    let err = d
        .create(&spec("vm-w", not_vm))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a VM image") && err.contains("--vm"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(f.dir.path().join("server-0/vm-images"))
            .unwrap()
            .next()
            .is_none(),
        "a refused image left a base behind"
    );
    // A type that declares no image.
    let err = d
        .create(&spec("vm-y", Workload::default()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("declares no image"), "{err}");
    assert!(d.list().await.unwrap().is_empty());

    // A VM whose workload never becomes ready is stopped, and the error shows its console.
    let mut never = web_vm();
    never.command = vec![
        "sh".into(),
        "-c".into(),
        "echo waiting-forever; sleep 1000".into(),
    ];
    // A window of 1.5 s, ten times that under TCG: the workload has long started by then.
    never.readiness.as_mut().unwrap().retries = 15;
    d.create(&spec("vm-z", never)).await.unwrap();
    let err = d.start("vm-z").await.unwrap_err().to_string();
    assert!(err.contains("did not become ready"), "{err}");
    assert!(
        err.contains("waiting-forever"),
        "the console is not in the error: {err}"
    );
    // And what the guest itself saw: its address, its workload running, nothing on 8080.
    let inside = err
        .split("inside the guest:")
        .nth(1)
        .and_then(|s| s.split("; its console").next())
        .unwrap_or_default();
    assert!(
        inside.contains("eth0 10.242.") && inside.contains("workload: runs"),
        "the guest's view is not in the error: {err}"
    );
    assert!(!inside.contains("8080"), "{err}");
    assert_eq!(
        d.status("vm-z").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
    d.destroy("vm-z").await.unwrap();

    // A boot that does not finish in time is ended, with what its console showed.
    let mut cfg = config(f.dir.path(), &f.prefix, 40, 1, source);
    cfg.boot_timeout = Duration::from_secs(1);
    let d = QemuDriver::open(cfg).await.unwrap();
    d.create(&spec("vm-slow", web_vm())).await.unwrap();
    let err = d.start("vm-slow").await.unwrap_err().to_string();
    assert!(err.contains("did not boot within 1s"), "{err}");
    assert_eq!(
        d.status("vm-slow").await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
}

/// A client requesting `http://ip:8080/` back to back until stopped.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    answered: Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    pub fn start(ip: String) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let mut failed = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                // A request may wait out TCP's retransmissions while the VM switches over;
                // one that gets no answer at all fails.
                let attempt = tokio::time::timeout(Duration::from_secs(30), answer(&ip)).await;
                match attempt {
                    Ok(text) if text.starts_with("page=") => {
                        a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            failed
        });
        Load {
            stop,
            answered,
            task,
        }
    }

    /// Waits until `more` requests beyond those answered so far are answered.
    pub async fn answers(&self, more: u32) {
        let goal = self.answered.load(std::sync::atomic::Ordering::Relaxed) + more;
        crate::common::eventually("the client's requests are answered", || async {
            (self.answered.load(std::sync::atomic::Ordering::Relaxed) >= goal).then_some(())
        })
        .await;
    }

    /// Stops the client: (answers, failures).
    pub async fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let failed = self.task.await.unwrap();
        (
            self.answered.load(std::sync::atomic::Ordering::Relaxed),
            failed,
        )
    }
}

/// Moves running `guest` from `src` to `dst` live while a client keeps asking it.
pub async fn move_live(src: &dyn Driver, dst: &dyn Driver, guest: &str, ip: &str) {
    let client = Load::start(ip.to_string());
    client.answers(5).await;
    let offer = src.live_offer(guest).await.unwrap();
    let target = dst
        .live_receive(
            &GuestSpec {
                ip: Some(ip.to_string()),
                ..spec(guest, web_vm())
            },
            &offer,
        )
        .await
        .unwrap();
    let report = src.live_send(guest, &target).await.unwrap();
    dst.live_finish(guest).await.unwrap();
    // It answers from its new place too.
    client.answers(5).await;
    let (ok, failed) = client.finish().await;
    assert!(
        failed.is_empty(),
        "requests failed during the migration: {failed:?}"
    );
    assert!(ok > 10, "too few answers to judge: {ok}");
    assert!(report.memory_bytes > 0 && report.total_ms > 0, "{report:?}");
    assert_eq!(
        src.status(guest).await.unwrap().map(|g| g.state),
        Some(GuestState::Stopped)
    );
    assert_eq!(
        dst.status(guest).await.unwrap().map(|g| g.state),
        Some(GuestState::Running)
    );
}

/// A server's VM images take at most its bound: making a VM of a new image removes the least
/// recently used images no VM is made of, with their bases; an image a VM is made of stays
/// (its disk is an overlay of the image's), over the bound if need be.
#[tokio::test]
async fn a_full_vm_image_cache_drops_the_least_recently_used_image_no_vm_is_made_of() {
    let (f, _sweep) = factory('i', 80, source().await);
    let mut c = config(f.dir.path(), &f.prefix, 80, 0, f.source.clone());
    c.image_cache_bytes = Some(1);
    let base_dir = c.data_dir.join("vm-images");
    let d = QemuDriver::open(c).await.unwrap();
    let of = |name: &str| Workload {
        image: Some(ImageRef {
            reference: name.into(),
            digest: None,
        }),
        ..Workload::default()
    };
    let held = || {
        d.image_store()
            .list()
            .unwrap()
            .into_iter()
            .filter_map(|s| Some((s.name?.repository().to_string(), s.digest)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    d.create(&spec("x", of("test/blank"))).await.unwrap();
    d.create(&spec("a", web_vm())).await.unwrap();
    let both = held();
    assert!(
        both.contains_key("test/blank-vm") && both.contains_key("test/web-vm"),
        "{both:?}"
    );
    d.destroy("x").await.unwrap();
    d.create(&spec("y", of("test/other"))).await.unwrap();
    let now = held();
    assert!(!now.contains_key("test/blank-vm"), "{now:?}");
    assert!(!base_dir.join(both["test/blank-vm"].hex()).exists());
    assert!(
        now.contains_key("test/web-vm") && now.contains_key("test/other-vm"),
        "{now:?}"
    );
    assert!(base_dir.join(both["test/web-vm"].hex()).is_dir());
    d.teardown().await;
}

async fn remote(f: &VmFactory, d: Arc<QemuDriver>, n: u32) -> RemoteDriver {
    let name = format!("{}-{n}", f.prefix);
    let caps = d.capabilities();
    let (_, url) = crate::agent::serve_agent(&name, d).await;
    let r = RemoteDriver::new(&name, &url, crate::agent::TOKEN, RemoteTimeouts::default());
    // What the agent tells the core when it registers.
    r.set_capabilities(caps);
    r
}

/// A container type whose containers are the test VM image's web server.
pub struct VmWeb;

impl cloud48_engine::types::ContainerType for VmWeb {
    fn type_id(&self) -> &str {
        "vmweb"
    }
    fn priority(&self) -> i32 {
        10
    }
    fn default_requirements(&self) -> cloud48_engine::model::Requirements {
        cloud48_engine::model::Requirements {
            resources: Resources {
                cpu_millis: 1000,
                memory_mb: 256,
                disk_mb: 2048,
            },
            labels: Vec::new(),
            spread: false,
        }
    }
    fn workload(&self) -> Workload {
        web_vm()
    }
    fn handle(
        &self,
        _hook: &cloud48_engine::types::Hook,
        _ctx: &cloud48_engine::types::HookContext<'_>,
    ) -> Result<cloud48_engine::types::HookOutcome, cloud48_engine::types::TypeError> {
        Ok(cloud48_engine::types::HookOutcome::allow())
    }
}
