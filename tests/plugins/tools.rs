//! The plugin vendor's tools: the SDK's harness on the compiled plugins, released WIT 0.1.0
//! components, `cloud48 plugin test` and `cloud48 plugin new`.

use super::*;

#[test]
fn the_sdk_harness_runs_the_seed_scenario_against_the_compiled_plugins() {
    seed_scenario_on(|name| test_plugin(cloud48_engine::plugins::TEST_PLUGINS, name));
}

/// The reference plugins as released for WIT 0.1.0 (checked in, never rebuilt: see
/// `tests/fixtures/README.md`) keep running the seed scenario unchanged in this core.
#[test]
fn the_released_wit_0_1_0_plugins_still_run_the_seed_scenario() {
    let host = cloud48_engine::plugins::PluginHost::new(None, Default::default()).unwrap();
    for name in ["tomcat", "balancer", "mysql"] {
        let meta = host.load(&wit_0_1_0_fixture(name)).unwrap().meta().clone();
        assert_eq!(
            (meta.name.as_str(), meta.wit_version.as_str()),
            (name, "0.1.0")
        );
    }
    seed_scenario_on(wit_0_1_0_fixture);
}

fn wit_0_1_0_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/wit-0.1.0")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The seed scenario (two tomcats, a balancer, a database, a crash of the balancer's server)
/// through the SDK's testing platform, over the plugins `wasm` gives by type name.
fn seed_scenario_on(wasm: impl Fn(&str) -> Vec<u8>) {
    use cloud48_engine::plugins::harness::WasmHooks;
    use cloud48_sdk::testing::Platform;
    let host = cloud48_engine::plugins::PluginHost::new(None, Default::default()).unwrap();
    let mut hooks = WasmHooks::default();
    for name in ["tomcat", "balancer", "mysql"] {
        hooks = hooks.with(host.load(&wasm(name)).unwrap());
    }
    let mut p = Platform::new(hooks);
    let t1 = p.add("tomcat").unwrap();
    p.log.clear();
    let t2 = p.add("tomcat").unwrap();
    let lb = p.ids_of("balancer")[0];
    assert!(lb < t2);
    // The compiled plugins' hooks run in the documented order: the new container first, then the
    // members by ascending priority (the balancer, priority 20, before the tomcat, priority 50).
    assert_eq!(
        p.log,
        [
            "tomcat#0:before-it-is-added".to_string(),
            format!("tomcat#{t1}:before-other-is-added"),
            "balancer#0:before-it-is-added".to_string(),
            format!("tomcat#{t1}:before-other-is-added"),
            format!("balancer#{lb}:after-it-is-added"),
            format!("tomcat#{t1}:after-other-is-added"),
            format!("tomcat#{t2}:after-it-is-added"),
            format!("balancer#{lb}:after-other-is-added"),
            format!("tomcat#{t1}:after-other-is-added"),
        ]
    );
    let state = p.inspect(lb);
    assert_eq!(state["upstreams"].as_array().unwrap().len(), 2);
    assert_eq!(p.execs.len(), 2);
    p.remove(t1).unwrap();
    assert_eq!(p.inspect(lb)["upstreams"].as_array().unwrap().len(), 1);
    let db = p.add("mysql").unwrap();
    assert_eq!(
        p.add("mysql").unwrap_err(),
        "this environment already has a mysql database"
    );
    assert!(p.inspect(t2)["database"].is_string());
    assert!(p.remove(db).unwrap_err().contains("use this database"));
    let server = p
        .members()
        .into_iter()
        .find(|m| m.id == lb)
        .unwrap()
        .server
        .unwrap();
    p.crash_server(&server).unwrap();
    assert_eq!(p.illegal.len(), 1, "the crashed balancer was replaced");
    let new = p.ids_of("balancer")[0];
    assert_eq!(
        p.inspect(new)["upstreams"].as_array().unwrap().len(),
        1,
        "the replacement registered the tomcat"
    );
}

fn run_bin(args: &[&str], cwd: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(crate::common::binary())
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn plugin_test_runs_scenario_files_and_fails_on_a_broken_expectation() {
    let dir = crate::common::tempdir();
    let balancer = format!(
        "{}/cloud48_plugin_balancer.wasm",
        cloud48_engine::plugins::TEST_PLUGINS
    );
    std::fs::write(
        dir.path().join("seed.toml"),
        r#"
[[step]]
add = "tomcat"
[[step]]
add = "tomcat"
expect_members = ["balancer", "tomcat", "tomcat"]
expect_execs = 2
expect_state = { id = 2, pointer = "/reloads", value = 2 }
[[step]]
remove = 1
expect_state = { id = 2, pointer = "/upstreams/0", value = "10.0.0.4:8080" }
[[step]]
add = "balancer"
expect_deny = "already has a balancer"
"#,
    )
    .unwrap();
    let (ok, out, err) = run_bin(&["plugin", "test", &balancer, "seed.toml"], dir.path(), &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("scenario passed: 4 steps"), "{out}");
    // A crash and a recovery, and the exec a step made: its container and arguments.
    std::fs::write(
        dir.path().join("outage.toml"),
        r#"
[[step]]
add = "mysql"
[[step]]
add = "tomcat"
expect_last_exec = { container = 2, args = ["jdbc:mysql://10.0.0.2:3306/app?user=app"], script_contains = "database" }
[[step]]
crash = "s1"
expect_members = ["mysql", "tomcat"]
[[step]]
recover = "s1"
expect_members = ["mysql", "tomcat"]
[[step]]
core = "stop"
[[step]]
core = "start"
expect_execs = 1
"#,
    )
    .unwrap();
    let (ok, out, err) = run_bin(
        &["plugin", "test", &balancer, "outage.toml"],
        dir.path(),
        &[],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("✓ step 4: recover s1 back"), "{out}");
    assert!(out.contains("✓ step 6: core start notified"), "{out}");
    // Two environments: each sees only its own members.
    std::fs::write(
        dir.path().join("two.toml"),
        r#"
[[step]]
add = "tomcat"
[[step]]
environment = "shop"
add = "tomcat"
expect_members = ["tomcat"]
[[step]]
add = "tomcat"
expect_members = ["balancer", "tomcat", "tomcat"]
[[step]]
environment = "test"
expect_members = ["tomcat"]
"#,
    )
    .unwrap();
    let (ok, out, err) = run_bin(&["plugin", "test", &balancer, "two.toml"], dir.path(), &[]);
    assert!(ok, "{out}{err}");
    std::fs::write(
        dir.path().join("wrong-exec.toml"),
        "[[step]]\nadd = \"mysql\"\n[[step]]\nadd = \"tomcat\"\nexpect_last_exec = { container = 1, args = [] }\n",
    )
    .unwrap();
    let (ok, _, err) = run_bin(
        &["plugin", "test", &balancer, "wrong-exec.toml"],
        dir.path(),
        &[],
    );
    assert!(
        !ok && err.contains("the last script ran in container 2"),
        "{err}"
    );
    // Parameters: given at add, checked by the type, visible to expectations.
    std::fs::write(
        dir.path().join("params.toml"),
        "[[step]]\nadd = \"balancer\"\nparams = { algorithm = \"least-conn\" }\nexpect_params = { id = 1, name = \"algorithm\", value = \"least-conn\" }\n[[step]]\nenvironment = \"other\"\nadd = \"balancer\"\nparams = { algorithm = \"random\" }\nexpect_deny = \"not one of\"\n",
    )
    .unwrap();
    let (ok, out, err) = run_bin(
        &["plugin", "test", &balancer, "params.toml"],
        dir.path(),
        &[],
    );
    assert!(ok && out.contains("scenario passed: 2 steps"), "{out}{err}");
    // Upgrades: every container of the type moves with its state converted, or none.
    let hostile = format!(
        "{}/cloud48_plugin_hostile.wasm",
        cloud48_engine::plugins::TEST_PLUGINS
    );
    let newer = format!(
        "{}/cloud48_plugin_hostile.wasm",
        cloud48_engine::plugins::TEST_PLUGINS_NEWER
    );
    std::fs::write(
        dir.path().join("upgrade.toml"),
        format!(
            "bundled = []\n[[step]]\nadd = \"hostile\"\n[[step]]\nenvironment = \"keep\"\nadd = \"hostile\"\n[[step]]\nupgrade = \"{newer}\"\nexpect_deny = \"keep their version\"\n[[step]]\nremove = 2\n[[step]]\nenvironment = \"test\"\nupgrade = \"{newer}\"\nexpect_state = {{ id = 1, pointer = \"/bytes\", value = 15 }}\n"
        ),
    )
    .unwrap();
    let (ok, out, err) = run_bin(
        &["plugin", "test", &hostile, "upgrade.toml"],
        dir.path(),
        &[],
    );
    assert!(
        ok && out.contains("step 3: upgrade to") && out.contains("to hostile@0.1.1"),
        "{out}{err}"
    );
    // `upgrade = FILE` is relative to the scenario file, not to where the command runs.
    let sub = dir.path().join("scenarios");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(&newer, sub.join("newer.wasm")).unwrap();
    std::fs::write(
        sub.join("relative.toml"),
        "bundled = []\n[[step]]\nadd = \"hostile\"\n[[step]]\nupgrade = \"newer.wasm\"\n",
    )
    .unwrap();
    let (ok, out, err) = run_bin(
        &["plugin", "test", &hostile, "scenarios/relative.toml"],
        dir.path(),
        &[],
    );
    assert!(ok && out.contains("to hostile@0.1.1"), "{out}{err}");
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[step]]\nadd = \"tomcat\"\nexpect_execs = 5\n",
    )
    .unwrap();
    let (ok, _, err) = run_bin(&["plugin", "test", &balancer, "bad.toml"], dir.path(), &[]);
    assert!(
        !ok && err.contains("step 1 (add tomcat): 0 scripts were exec'd, expected 5"),
        "{err}"
    );
    // For tools: the same failure as JSON on stdout, and still a non-zero exit.
    let (ok, out, _) = run_bin(
        &["--json", "plugin", "test", &balancer, "bad.toml"],
        dir.path(),
        &[],
    );
    assert!(!ok);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["passed"], false, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("0 scripts were exec'd, expected 5"),
        "{report}"
    );
    std::fs::write(
        dir.path().join("typo.toml"),
        "[[step]]\nadd = \"tomcat\"\nexpect_exec = 5\n",
    )
    .unwrap();
    let (ok, _, err) = run_bin(&["plugin", "test", &balancer, "typo.toml"], dir.path(), &[]);
    assert!(!ok && err.contains("not a valid scenario"), "{err}");
}

#[test]
fn plugin_new_scaffolds_a_crate_that_builds_and_passes_its_own_scenario() {
    let dir = crate::common::tempdir();
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");
    // Names a plugin could never be installed under are refused before anything is written.
    for (taken, why) in [
        ("plain", "built-in type's name"),
        ("tomcat", "bundled type's name"),
    ] {
        let (ok, _, err) = run_bin(&["plugin", "new", taken, "--sdk", sdk], dir.path(), &[]);
        assert!(!ok && err.contains(why), "{err}");
        assert!(!dir.path().join(taken).exists());
    }
    let (ok, out, err) = run_bin(&["plugin", "new", "cache", "--sdk", sdk], dir.path(), &[]);
    assert!(ok, "{err}");
    assert!(out.contains("cargo test"), "{out}");
    let krate = dir.path().join("cache");
    // The crate names the SDK relative to itself, never by a path of this machine.
    let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    let sdk_line = manifest
        .lines()
        .find(|l| l.starts_with("cloud48-sdk"))
        .unwrap();
    assert!(sdk_line.contains("path = \"../"), "{sdk_line}");
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/scaffold-test");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&cargo)
            .args(args)
            .current_dir(&krate)
            .env("CARGO_TARGET_DIR", target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["test", "--quiet"]);
    run(&["build", "--release", "--quiet", "--target", "wasm32-wasip2"]);
    let wasm = format!("{target}/wasm32-wasip2/release/cloud48_plugin_cache.wasm");
    let (ok, out, err) = run_bin(&["plugin", "test", &wasm, "scenario.toml"], &krate, &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("scenario passed: 3 steps"), "{out}");
    let (ok, out, err) = run_bin(
        &["--json", "plugin", "test", &wasm, "scenario.toml"],
        &krate,
        &[],
    );
    assert!(ok, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["steps"].as_array().unwrap().len(), 3, "{report}");
    let (ok, _, err) = run_bin(&["plugin", "new", "cache", "--sdk", sdk], dir.path(), &[]);
    assert!(!ok && err.contains("exists already"), "{err}");
}
