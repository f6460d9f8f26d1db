//! `cloud48 plugin new NAME`: a new container-type crate that builds and passes its own tests.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

fn render(template: &str, name: &str, sdk: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{crate}}", &name.replace('-', "_"))
        .replace("{{Type}}", &camel(name))
        .replace("{{sdk}}", sdk)
}

fn camel(name: &str) -> String {
    name.split('-')
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

const CARGO: &str = r#"[package]
name = "cloud48-plugin-{{name}}"
version = "0.1.0"
edition = "2024"

# A plugin crate of its own, outside any other workspace.
[workspace]

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
cloud48-sdk = { path = "{{sdk}}" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

# Every hook runs in a fresh instance: whole-program-optimised code runs it faster.
[profile.release]
opt-level = 3
lto = true
codegen-units = 1
"#;

const TOOLCHAIN: &str = r#"[toolchain]
channel = "stable"
targets = ["wasm32-wasip2"]
"#;

const LIB: &str = r#"//! `{{name}}`: a Cloud48 container type.

use cloud48_sdk::*;
use serde::{Deserialize, Serialize};

/// What a `{{name}}` container remembers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Ids of the members it has seen join.
    pub seen: Vec<i64>,
}

/// The `{{name}}` container type.
#[derive(Default)]
pub struct {{Type}};

impl ContainerType for {{Type}} {
    fn metadata(&self) -> Metadata {
        Metadata::new("{{name}}", "0.1.0", 40, Resources::new(500, 256, 1024))
            .described("describe {{name}} here")
            // What runs inside: the command (or an image), its endpoints and readiness.
            .with_workload(Workload::command(["sleep", "infinity"]))
    }

    fn initial_state(&self) -> Vec<u8> {
        serde_json::to_vec(&State::default()).expect("serializes")
    }

    fn before_it_is_added(&self, ctx: &Context) -> HookResult {
        if ctx.members_of_type("{{name}}").count() > 0 {
            return Ok(Outcome::deny("one {{name}} per environment"));
        }
        Ok(Outcome::allow())
    }

    fn after_other_is_added(&self, ctx: &Context, other: &Member) -> HookResult {
        let mut state: State = ctx.json_state();
        state.seen.push(other.id);
        Ok(Outcome::allow().with_json_state(&state))
    }
}

export_container_type!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;
    use cloud48_sdk::testing::{NativeHooks, Platform};

    #[test]
    fn one_per_environment_and_it_remembers_who_joined() {
        let mut p = Platform::with_native(NativeHooks::default().with::<{{Type}}>());
        let id = p.add("{{name}}").unwrap();
        assert_eq!(p.add("{{name}}").unwrap_err(), "one {{name}} per environment");
        assert_eq!(p.inspect(id)["seen"], serde_json::json!([]));
    }
}
"#;

const SCENARIO: &str = r#"# Run with: cloud48 plugin test target/wasm32-wasip2/release/cloud48_plugin_{{crate}}.wasm scenario.toml
bundled = ["tomcat"]

[[step]]
add = "{{name}}"
expect_members = ["{{name}}"]

[[step]]
add = "{{name}}"
expect_deny = "one {{name}} per environment"

[[step]]
add = "tomcat"
expect_state = { id = 1, pointer = "/seen", value = [2] }
"#;

/// `to` as a path relative to the directory `from` (both absolute).
fn relative(to: &Path, from: &Path) -> PathBuf {
    let (to, from): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = from[common..]
        .iter()
        .map(|_| Component::ParentDir)
        .collect();
    path.extend(&to[common..]);
    if path.as_os_str().is_empty() {
        path.push(".");
    }
    path
}

/// Creates the crate; prints the next steps.
pub fn new_plugin(name: &str, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> Result<()> {
    cloud48_engine::model::validate_name(name).map_err(anyhow::Error::msg)?;
    // A plugin is installed under its name: the built-in type's and the bundled ones' are taken.
    if name == "plain" {
        bail!("'plain' is the built-in type's name: a plugin cannot take it; choose another name");
    }
    if cloud48_engine::plugins::BUNDLED
        .iter()
        .any(|(b, _)| *b == name)
    {
        bail!(
            "'{name}' is a bundled type's name: a plugin of that name could only replace it by \
             an upgrade of a higher version; choose another name (or start from the bundled \
             one's source in the repository's plugins/{name})"
        );
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        bail!("{} exists already; choose another --dir", dir.display());
    }
    let sdk = match sdk {
        Some(p) => p,
        None => {
            let built_with = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk"));
            if !built_with.join("Cargo.toml").exists() {
                bail!(
                    "cannot find the cloud48-sdk crate: pass --sdk PATH (or set CLOUD48_SDK_PATH)"
                );
            }
            built_with
        }
    };
    let sdk = std::fs::canonicalize(&sdk)
        .with_context(|| format!("cannot find the SDK at {}", sdk.display()))?;
    if !sdk.join("Cargo.toml").exists() {
        bail!(
            "{} is not the cloud48-sdk crate (no Cargo.toml)",
            sdk.display()
        );
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // The new crate names the SDK relative to itself, so it can move with the SDK's checkout
    // and holds no path of this machine.
    let krate =
        std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let sdk = relative(&sdk, &krate);
    let sdk_text = sdk.to_str().context("the SDK path is not UTF-8")?;
    for (file, template) in [
        ("Cargo.toml", CARGO),
        ("rust-toolchain.toml", TOOLCHAIN),
        ("src/lib.rs", LIB),
        ("scenario.toml", SCENARIO),
    ] {
        std::fs::write(dir.join(file), render(template, name, sdk_text))
            .with_context(|| format!("cannot write {file}"))?;
    }
    println!("created {}; next:", dir.display());
    println!("  cd {}", dir.display());
    println!("  cargo test                                     # native scenario test");
    println!("  cargo build --release --target wasm32-wasip2  # the component");
    println!(
        "  cloud48 plugin test target/wasm32-wasip2/release/cloud48_plugin_{}.wasm scenario.toml",
        name.replace('-', "_")
    );
    println!(
        "  cloud48 plugin install target/wasm32-wasip2/release/cloud48_plugin_{}.wasm",
        name.replace('-', "_")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_relative_to_a_directory_climbs_to_the_common_part() {
        let rel = |to: &str, from: &str| relative(Path::new(to), Path::new(from));
        assert_eq!(
            rel("/w/repo/sdk", "/tmp/x/cache"),
            Path::new("../../../w/repo/sdk")
        );
        assert_eq!(
            rel("/w/repo/sdk", "/w/repo/plugins/cache"),
            Path::new("../../sdk")
        );
        assert_eq!(rel("/w/repo/sdk", "/w/repo"), Path::new("sdk"));
        assert_eq!(rel("/w/repo", "/w/repo"), Path::new("."));
    }
}
