//! Builds the bundled reference plugins (`plugins/*`) as WASM components for `wasm32-wasip2`,
//! so that `cargo build` produces them with no manual step. They are embedded in the binary and
//! installed on a core's first start.

use std::path::PathBuf;
use std::process::Command;

const PLUGINS: &[&str] = &["tomcat", "balancer", "mysql", "redis"];

fn build(
    root: &std::path::Path,
    target_dir: &std::path::Path,
    plugins: &[&str],
    env: &[(&str, &str)],
) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(target_dir)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3")
        // Whole-program optimisation: a hook's code runs in a fresh instance every time, and
        // `bench hooks` measured a 0.2.0 hook about 4 % faster with it.
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        // A small shadow stack keeps a plugin's memory (reset between hook calls) small.
        .env(
            "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS",
            "-C link-arg=-zstack-size=131072",
        );
    for p in plugins {
        cmd.args(["-p", &format!("cloud48-plugin-{p}")]);
    }
    // Do not leak the outer build's settings into the nested one.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "HOSTILE_WIT",
        "HOSTILE_VERSION",
        "HOSTILE_PARAMS",
        "HOSTILE_INITIAL",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().expect("cargo runs");
    if !status.success() {
        panic!(
            "building the plugins for wasm32-wasip2 failed; is the target installed? (rustup target add wasm32-wasip2)"
        );
    }
}

/// Installs the `wasm32-wasip2` standard library through rustup when it is missing (rustup
/// reads the target from `rust-toolchain.toml` only when it installs the toolchain itself).
fn ensure_target(root: &std::path::Path) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output();
    let installed = sysroot.ok().is_some_and(|o| {
        let root = String::from_utf8_lossy(&o.stdout).trim().to_string();
        std::path::Path::new(&root)
            .join("lib/rustlib/wasm32-wasip2")
            .exists()
    });
    if !installed {
        println!(
            "cargo:warning=installing the wasm32-wasip2 target with rustup (plugins are built for it)"
        );
        let _ = Command::new("rustup")
            .current_dir(root)
            .args(["target", "add", "wasm32-wasip2"])
            .status();
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    for dir in ["plugins", "sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // A target directory of its own: the outer build holds the lock of the normal one.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-plugins");
    ensure_target(&root);
    // Held until the end: another run of this script (another build of the same target
    // directory) would otherwise copy out a variant this one just built.
    std::fs::create_dir_all(&target_dir).expect("the plugins' target directory");
    let lock = std::fs::File::create(target_dir.join("variants.lock")).expect("a lock file");
    lock.lock().expect("the plugins' build lock");
    // The hostile test plugin in more variants, built in the same target directory (their
    // dependencies compiled once) and copied out: claiming a WIT version the host does not
    // support; as a newer compatible version with a new parameter (to test upgrades with state
    // migration and parameter defaults); as one with a new required parameter; with an
    // `initial-state` that traps or returns too much.
    let future_dir = target_dir.join("future-wit");
    let newer_dir = target_dir.join("newer");
    let required_dir = target_dir.join("required");
    let trap_dir = target_dir.join("initial-trap");
    let huge_dir = target_dir.join("initial-huge");
    let variants: [(&PathBuf, &[(&str, &str)]); 5] = [
        (&future_dir, &[("HOSTILE_WIT", "9.0.0")]),
        (
            &newer_dir,
            &[("HOSTILE_VERSION", "0.1.1"), ("HOSTILE_PARAMS", "default")],
        ),
        (
            &required_dir,
            &[("HOSTILE_VERSION", "0.1.2"), ("HOSTILE_PARAMS", "required")],
        ),
        (&trap_dir, &[("HOSTILE_INITIAL", "trap")]),
        (&huge_dir, &[("HOSTILE_INITIAL", "huge")]),
    ];
    for (dir, env) in variants {
        build(&root, &target_dir, &["hostile"], env);
        let release = dir.join("wasm32-wasip2/release");
        std::fs::create_dir_all(&release).expect("a directory for a plugin variant");
        let file = "cloud48_plugin_hostile.wasm";
        let from = target_dir.join("wasm32-wasip2/release").join(file);
        std::fs::copy(&from, release.join(file))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", from.display()));
    }
    // Last, so that the plain variant is the one left in the target directory.
    build(
        &root,
        &target_dir,
        &[PLUGINS, &["hostile", "hostile-import"]].concat(),
        &[],
    );
    for (var, dir) in [
        ("NEWER", &newer_dir),
        ("REQUIRED", &required_dir),
        ("INITIAL_TRAP", &trap_dir),
        ("INITIAL_HUGE", &huge_dir),
    ] {
        println!(
            "cargo:rustc-env=CLOUD48_TEST_PLUGINS_{var}={}",
            dir.join("wasm32-wasip2/release").display()
        );
    }
    // Test plugins are not embedded; the integration tests find them here.
    println!(
        "cargo:rustc-env=CLOUD48_TEST_PLUGINS={}",
        target_dir.join("wasm32-wasip2/release").display()
    );
    println!(
        "cargo:rustc-env=CLOUD48_TEST_PLUGINS_FUTURE={}",
        future_dir.join("wasm32-wasip2/release").display()
    );
    for p in PLUGINS {
        let file = format!("cloud48_plugin_{p}.wasm");
        let from = target_dir.join("wasm32-wasip2/release").join(&file);
        std::fs::copy(&from, out.join(format!("{p}.wasm")))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", from.display()));
    }
}
