//! Images: the core's store through the CLI and the REST API (import from a layout and from an
//! archive, corrupt uploads refused, blobs served with ranges, removal) and `image build`.

use std::path::Path;

use cloud48_engine::images::{ImageDetails, ImageSummary, NewImage, Store, archive_layout};
use serde_json::Value;

use crate::common::cli;

/// A one-layer image `name` in a new OCI layout under `dir`, its layer big enough to be cut.
pub fn layout(dir: &Path, name: &str, seed: u32) -> (Store, ImageSummary) {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("srv")).unwrap();
    let noise: String = (0..50_000u32)
        .map(|i| char::from(b'a' + ((i * 7 + seed) % 26) as u8))
        .collect();
    std::fs::write(rootfs.join("srv/data"), noise).unwrap();
    let store = Store::open(dir.join("layout")).unwrap();
    let layer = store.write_layer_from_dir(&rootfs).unwrap();
    let image = NewImage {
        cmd: vec!["/bin/true".into()],
        ..Default::default()
    };
    let summary = store
        .commit(&name.parse().unwrap(), &[layer], &image)
        .unwrap();
    (store, summary)
}

/// A core that accepts the fleet's agent token, holding a one-layer image `name` imported
/// through the CLI (the layout it came from, and its summary).
async fn core_holding(
    dir: &Path,
    name: &str,
    seed: u32,
) -> (crate::common::ServeProcess, Store, ImageSummary) {
    let config = dir.join("cloud48.toml");
    std::fs::write(
        &config,
        format!("[agents]\ntoken = \"{}\"\n", crate::agent::TOKEN),
    )
    .unwrap();
    let serve = crate::common::serve(
        &dir.join("data"),
        &["--config", config.to_str().unwrap(), "--anonymous", "full"],
    )
    .await;
    let (source, summary) = layout(dir, name, seed);
    let (ok, _, err) = run(
        &serve.url,
        &["image", "import", &source.root().display().to_string()],
    );
    assert!(ok, "{err}");
    (serve, source, summary)
}

fn run(url: &str, args: &[&str]) -> (bool, String, String) {
    tokio::task::block_in_place(|| cli(url, args))
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_imported_listed_served_and_removed_through_the_cli_and_api() {
    let dir = crate::common::tempdir();
    let serve = crate::common::serve(&dir.path().join("data"), &["--anonymous", "full"]).await;
    let url = serve.url.clone();
    let (source, summary) = layout(dir.path(), "test/app:1", 0);

    // From a layout directory, under another name.
    let dir_arg = source.root().display().to_string();
    let (ok, out, err) = run(
        &url,
        &[
            "--json",
            "image",
            "import",
            &dir_arg,
            "--name",
            "test/renamed",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)[0]["digest"], summary.digest.as_str());
    assert_eq!(json(&out)[0]["name"], "test/renamed:latest");

    // From an archive, keeping the name it carries.
    let archive = dir.path().join("app.tar");
    archive_layout(source.root(), std::fs::File::create(&archive).unwrap()).unwrap();
    let (ok, _, err) = run(&url, &["image", "import", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&url, &["--json", "image", "list"]);
    assert!(ok);
    let listed = json(&out);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["test/app:1", "test/renamed:latest"]);
    let (ok, out, _) = run(&url, &["image", "show", "test/app:1"]);
    assert!(
        ok && out.contains(summary.digest.as_str()) && out.contains("/bin/true"),
        "{out}"
    );

    // A corrupt archive (a byte of a layer the core does not have flipped) is refused and
    // changes nothing.
    let (other, _) = layout(&dir.path().join("other"), "test/other", 1);
    let other_archive = dir.path().join("other.tar");
    archive_layout(other.root(), std::fs::File::create(&other_archive).unwrap()).unwrap();
    let mut bytes = std::fs::read(&other_archive).unwrap();
    let other_layer = other.show("test/other").unwrap().layers[0].digest.clone();
    let layer = std::fs::read(other.blob_path(&other_layer)).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == &layer[layer.len() / 2..layer.len() / 2 + 64])
        .expect("the layer is in the archive");
    bytes[at] ^= 0xff;
    let corrupt = dir.path().join("corrupt.tar");
    std::fs::write(&corrupt, bytes).unwrap();
    let (ok, out, err) = run(
        &url,
        &[
            "image",
            "import",
            corrupt.to_str().unwrap(),
            "--name",
            "test/corrupt",
        ],
    );
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("does not match its digest") && err.contains("HTTP 422"),
        "{err}"
    );
    let (_, out, _) = run(&url, &["--json", "image", "list"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 2);

    // Agents pull blobs by digest, resuming with a range.
    let details: ImageDetails =
        serde_json::from_str(&run(&url, &["--json", "image", "show", "test/app:1"]).1).unwrap();
    let layer = std::fs::read(source.blob_path(&details.layers[0].digest)).unwrap();
    let http = reqwest::Client::new();
    let layer_digest = details.layers[0].digest.as_str();
    let whole = http
        .get(format!("{url}/v1/images/blobs/{layer_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap(), layer);
    let tail = http
        .get(format!("{url}/v1/images/blobs/{layer_digest}"))
        .header("Range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap(), layer[100..]);
    let bad = http
        .get(format!("{url}/v1/images/blobs/sha256:nothex"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("not a sha256 digest"));

    // The image an installed type names (the balancer's) is kept unless forced.
    let (ok, _, err) = run(
        &url,
        &["image", "import", &dir_arg, "--name", "cloud48/nginx"],
    );
    assert!(ok, "{err}");
    let short = summary.digest.as_str().trim_start_matches("sha256:")[..12].to_string();
    for what in ["cloud48/nginx", short.as_str()] {
        let (ok, _, err) = run(&url, &["image", "rm", what]);
        assert!(
            !ok && err.contains("container type(s) balancer@") && err.contains("--force"),
            "{what}: {err}"
        );
    }
    let (ok, out, err) = run(&url, &["image", "rm", "cloud48/nginx", "--force"]);
    assert!(
        ok && out.contains("removed cloud48/nginx:latest"),
        "{out}{err}"
    );

    // Removing one name keeps the blobs the other still uses; removing both frees them.
    let (ok, out, _) = run(&url, &["image", "rm", "test/renamed"]);
    assert!(ok && out.contains("freed 0 blobs"), "{out}");
    let (ok, out, _) = run(&url, &["image", "rm", "test/app:1"]);
    assert!(ok && out.contains("freed 3 blobs"), "{out}");
    let (ok, _, err) = run(&url, &["image", "show", "test/app:1"]);
    assert!(
        !ok && err.contains("no image 'test/app:1'") && err.contains("HTTP 404"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_build_makes_a_debian_image_and_uploads_it() {
    let dir = crate::common::tempdir();
    let serve = crate::common::serve(&dir.path().join("data"), &["--anonymous", "full"]).await;
    let recipe = dir.path().join("hello.toml");
    std::fs::write(
        &recipe,
        "name = \"test/hello\"\ncommand = [\"/bin/cat\", \"/srv/hello\"]\n[files.\"/srv/hello\"]\ncontent = \"hello\\n\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(&serve.url, &["image", "build", recipe.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("test/hello:latest"), "{out}");
    let (ok, out, _) = run(&serve.url, &["--json", "image", "show", "test/hello"]);
    assert!(ok);
    let details = json(&out);
    assert_eq!(details["cmd"][1], "/srv/hello");
    assert_eq!(details["os"], "linux");

    let (ok, _, err) = run(
        &serve.url,
        &[
            "image",
            "build",
            dir.path().join("missing.toml").to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("no recipe at"), "{err}");

    // A recipe whose step fails says which step and what it printed; no image is made.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "name = \"test/broken\"\ncommand = [\"/bin/true\"]\nrun = [\"echo cannot go on >&2; exit 3\"]\n",
    )
    .unwrap();
    let (ok, _, err) = run(&serve.url, &["image", "build", broken.to_str().unwrap()]);
    assert!(
        !ok && err.contains("failed") && err.contains("cannot go on"),
        "{err}"
    );
    let (ok, _, err) = run(&serve.url, &["image", "show", "test/broken"]);
    assert!(!ok && err.contains("HTTP 404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_read_images_with_the_agent_token_and_nothing_else() {
    let dir = crate::common::tempdir();
    let config = dir.path().join("cloud48.toml");
    std::fs::write(&config, "[agents]\ntoken = \"agent-secret-0123456789\"\n").unwrap();
    let serve = crate::common::serve(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let http = reqwest::Client::new();
    let blob = format!("{}/v1/images/blobs/sha256:{}", serve.url, "0".repeat(64));
    let with = |token: &str| {
        http.get(&blob)
            .header("Authorization", format!("Bearer {token}"))
            .send()
    };
    // The token gets through to the store (which has no such blob) ...
    let ok = with("agent-secret-0123456789").await.unwrap();
    assert_eq!(ok.status(), 404);
    assert!(ok.text().await.unwrap().contains("no blob"));
    // ... a wrong one, none, or the token on a write, does not.
    assert_eq!(with("wrong").await.unwrap().status(), 401);
    // (No users exist, so an anonymous read is refused with how to add one.)
    let anonymous = http.get(&blob).send().await.unwrap();
    assert_eq!(anonymous.status(), 403);
    assert!(
        anonymous
            .text()
            .await
            .unwrap()
            .contains("anonymous access is limited")
    );
    let write = http
        .post(format!("{}/v1/images", serve.url))
        .header("Authorization", "Bearer agent-secret-0123456789")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pulls_an_image_from_the_core_resuming_a_broken_off_blob() {
    use cloud48_engine::agent::images::CoreImages;
    use cloud48_engine::images::Source;
    let dir = crate::common::tempdir();
    let config = dir.path().join("cloud48.toml");
    std::fs::write(&config, "[agents]\ntoken = \"agent-secret-0123456789\"\n").unwrap();
    let serve = crate::common::serve(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap(), "--anonymous", "full"],
    )
    .await;
    let (source, summary) = layout(dir.path(), "test/pulled:1", 3);
    let layout_dir = source.root().display().to_string();
    let (ok, _, err) = run(&serve.url, &["image", "import", &layout_dir]);
    assert!(ok, "{err}");
    let layer = source.show(summary.digest.as_str()).unwrap().layers[0].clone();
    let blob = std::fs::read(source.blob_path(&layer.digest)).unwrap();

    // A pull that broke off halfway through the layer left its first half in `partial/`.
    let half = blob.len() / 2;
    let agent = Store::open(dir.path().join("agent")).unwrap();
    std::fs::create_dir_all(agent.root().join("partial")).unwrap();
    std::fs::write(
        agent.root().join("partial").join(layer.digest.hex()),
        &blob[..half],
    )
    .unwrap();
    let core = CoreImages::new(
        &serve.url,
        "agent-secret-0123456789",
        tokio::runtime::Handle::current(),
    );
    let (pulled, progress, agent, core) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let pulled = agent.pull(&core, "test/pulled:1", None, &mut |p| seen.push(p.clone()));
        (pulled, seen, agent, core)
    })
    .await
    .unwrap();
    let pulled = pulled.unwrap();
    assert_eq!(pulled.digest, summary.digest);
    assert_eq!(std::fs::read(agent.blob_path(&layer.digest)).unwrap(), blob);
    assert!(
        !agent
            .root()
            .join("partial")
            .join(layer.digest.hex())
            .exists()
    );
    let last = progress.last().unwrap();
    assert_eq!(last.done, last.total);

    // A blob read from an offset is the rest of it; an unknown image is a clear error.
    let tail = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        std::io::Read::read_to_end(
            &mut core.blob(&layer.digest, half as u64).unwrap(),
            &mut rest,
        )
        .unwrap();
        let missing = core.resolve("test/absent").unwrap_err().to_string();
        (rest, missing)
    })
    .await
    .unwrap();
    assert_eq!(tail.0, blob[half..]);
    assert!(
        tail.1.contains("test/absent") && tail.1.contains("404"),
        "{}",
        tail.1
    );

    // The wrong token gets nothing.
    let wrong = CoreImages::new(
        &serve.url,
        "wrong-token-0123456789",
        tokio::runtime::Handle::current(),
    );
    let err = tokio::task::spawn_blocking(move || {
        wrong.resolve("test/pulled:1").unwrap_err().to_string()
    })
    .await
    .unwrap();
    assert!(err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pulls_an_image_from_a_peer_that_holds_it() {
    use cloud48_engine::agent::images::CoreImages;
    use cloud48_engine::agent::protocol::Heartbeat;
    use cloud48_engine::driver::Driver;
    // The fleet's one token: the core's agents token, which peers accept too.
    const TOKEN: &str = crate::agent::TOKEN;
    let dir = crate::common::tempdir();
    let (serve, source, summary) = core_holding(dir.path(), "test/shared:1", 5).await;
    let layer = source.show(summary.digest.as_str()).unwrap().layers[0].clone();

    // A peer agent pulled the image from the core, serves its store, and says so in its
    // heartbeats.
    let peer_store = std::sync::Arc::new(Store::open(dir.path().join("peer")).unwrap());
    let pulling = (peer_store.clone(), serve.url.clone());
    tokio::task::spawn_blocking(move || {
        let core = CoreImages::new(&pulling.1, TOKEN, tokio::runtime::Handle::current());
        pulling
            .0
            .pull(
                &core,
                "test/shared:1",
                Some(&"test/shared:1".parse().unwrap()),
                &mut |_| {},
            )
            .unwrap();
    })
    .await
    .unwrap();
    let sim = std::sync::Arc::new(cloud48_engine::driver::sim::SimServer::new(
        "peer",
        7,
        cloud48_engine::model::Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
            disk_mb: 1024,
        },
        cloud48_engine::driver::sim::SimLatency::uniform(std::time::Duration::ZERO),
    ));
    let (agent, peer_url) = crate::agent::serve_agent("peer", sim.clone()).await;
    agent.serve_images(peer_store);
    let mut stats = sim.stats().await.unwrap();
    stats.images = vec![format!("test/shared:1@{}", summary.digest)];
    let beat = Heartbeat {
        agent: agent.info().clone(),
        stats,
        period_ms: None,
    };
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/agents/heartbeat", serve.url))
        .bearer_auth(TOKEN)
        .json(&beat)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let holders: Value = reqwest::Client::new()
        .get(format!("{}/v1/images/test%2Fshared:1/holders", serve.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(holders["holders"], serde_json::json!([peer_url]));

    // The core no longer has it: a new agent still gets it, whole and verified, from the peer.
    let (ok, _, err) = run(&serve.url, &["image", "rm", "test/shared:1"]);
    assert!(ok, "{err}");
    let fresh = Store::open(dir.path().join("fresh")).unwrap();
    let url = serve.url.clone();
    let (pulled, fresh) = tokio::task::spawn_blocking(move || {
        let source = CoreImages::new(&url, TOKEN, tokio::runtime::Handle::current())
            .for_agent("http://127.0.0.1:1");
        (
            fresh.pull(&source, "test/shared:1", None, &mut |_| {}),
            fresh,
        )
    })
    .await
    .unwrap();
    assert_eq!(pulled.unwrap().digest, summary.digest);
    assert_eq!(
        std::fs::read(fresh.blob_path(&layer.digest)).unwrap(),
        std::fs::read(source.blob_path(&layer.digest)).unwrap()
    );
    // An agent never pulls from itself: as the peer, it finds no holder and the core has none.
    let url = serve.url.clone();
    let own = agent.info().url.clone();
    let err = tokio::task::spawn_blocking(move || {
        let lonely = Store::open(crate::common::scratch_dir("lonely")).unwrap();
        let source =
            CoreImages::new(&url, TOKEN, tokio::runtime::Handle::current()).for_agent(&own);
        lonely
            .pull(&source, "test/shared:1", None, &mut |_| {})
            .unwrap_err()
            .to_string()
    })
    .await
    .unwrap();
    assert!(
        err.contains("test/shared:1") && err.contains("404"),
        "{err}"
    );
}

/// An agent that knows several cores (its heartbeats learned them) pulls an image from the next
/// one when the first is down; with none reachable, the error names the core it tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pulls_an_image_from_the_next_core_when_one_is_down() {
    use cloud48_engine::agent::CoreList;
    use cloud48_engine::agent::images::CoreImages;
    const TOKEN: &str = crate::agent::TOKEN;
    let dir = crate::common::tempdir();
    let (serve, _, summary) = core_holding(dir.path(), "test/failover:1", 9).await;
    // Nothing listens at the first core; the agent learned the second from a heartbeat answer.
    let dead = format!("http://127.0.0.1:{}", crate::common::free_port());
    let cores = std::sync::Arc::new(std::sync::Mutex::new(CoreList::new(vec![dead.clone()])));
    cores.lock().unwrap().learn([serve.url.clone()]);
    let pull = |cores, at: &str| {
        let store = Store::open(dir.path().join(at)).unwrap();
        tokio::task::spawn_blocking(move || {
            let source = CoreImages::over_cores(cores, TOKEN, tokio::runtime::Handle::current());
            store.pull(&source, "test/failover:1", None, &mut |_| {})
        })
    };
    let pulled = pull(cores, "agent").await.unwrap().unwrap();
    assert_eq!(pulled.digest, summary.digest);
    let alone = std::sync::Arc::new(std::sync::Mutex::new(CoreList::new(vec![dead.clone()])));
    let err = pull(alone, "lonely")
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dead), "{err}");
}
