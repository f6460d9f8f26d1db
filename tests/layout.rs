//! The workspace's crate boundaries, read from `cargo metadata`: the node agent and the model
//! link neither wasmtime nor a database, and only the plugin host depends on wasmtime.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

/// The resolved dependency graph: package name → names of its normal (non-dev, non-build)
/// dependencies, read once for all the tests here.
fn graph() -> &'static HashMap<String, Vec<String>> {
    static GRAPH: std::sync::OnceLock<HashMap<String, Vec<String>>> = std::sync::OnceLock::new();
    GRAPH.get_or_init(read_graph)
}

fn read_graph() -> HashMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This machine's dependencies only: they are the ones downloaded, so no network is needed.
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let rustc = String::from_utf8(rustc.stdout).unwrap();
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc names its host");
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut graph = HashMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| names[d["pkg"].as_str().unwrap()].to_string())
            .collect();
        graph.insert(names[node["id"].as_str().unwrap()].to_string(), deps);
    }
    graph
}

/// Every package `root` links, itself excluded.
fn closure(graph: &HashMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(p) = todo.pop() {
        for d in graph.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_agent_and_the_model_link_neither_wasmtime_nor_a_database() {
    let graph = graph();
    for krate in [
        "cloud48-agent",
        "cloud48-model",
        "cloud48-driver",
        "cloud48-linux",
        "cloud48-image",
    ] {
        assert!(graph.contains_key(krate), "{krate} is not in the workspace");
        let linked = closure(graph, krate);
        for banned in ["wasmtime", "sea-orm", "sqlx", "cloud48-plugin-host"] {
            assert!(!linked.contains(banned), "{krate} links {banned}");
        }
    }
    // The engine knows nothing of the REST API or the command line (the agent it drives servers
    // through carries its own options).
    let engine = closure(graph, "cloud48-engine");
    for banned in ["cloud48-api", "cloud48", "utoipa-axum"] {
        assert!(!engine.contains(banned), "cloud48-engine links {banned}");
    }
    // The image store is plain files: no async runtime, no HTTP (agents and the core wrap it).
    let image = closure(graph, "cloud48-image");
    for banned in ["tokio", "hyper", "reqwest"] {
        assert!(!image.contains(banned), "cloud48-image links {banned}");
    }
    // The test can fail: the core does link both.
    let core = closure(graph, "cloud48");
    assert!(
        core.contains("wasmtime") && core.contains("sea-orm"),
        "the core should link wasmtime and sea-orm"
    );
}

#[test]
fn only_the_plugin_host_depends_on_wasmtime_directly() {
    let graph = graph();
    let direct: BTreeSet<&str> = graph
        .iter()
        .filter(|(name, deps)| {
            name.starts_with("cloud48") && deps.iter().any(|d| d.starts_with("wasmtime"))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(direct, BTreeSet::from(["cloud48-plugin-host"]));
}
