//! `cloud48 plugin ...`: its subcommands and what each asks the core.

use super::*;

/// `plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCmd {
    /// Install a WASM component as a new container type (admin).
    Install {
        /// The `.wasm` file.
        file: PathBuf,
    },
    /// List installed plugins.
    List,
    /// Show a plugin.
    Show {
        /// Name or name@version.
        name: String,
    },
    /// Install a newer compatible version and move every container to it (admin).
    Upgrade {
        /// Name of the installed plugin.
        name: String,
        /// The `.wasm` file of the new version.
        file: PathBuf,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Remove a plugin no container uses (admin).
    Remove {
        /// Name.
        name: String,
    },
    /// Run a scenario file against compiled plugins through the real plugin host (no core
    /// needed): `cloud48 plugin test FILE.wasm [FILE.wasm ...] SCENARIO.toml`. With `--json`:
    /// `{"passed": true, "steps": [...]}`, or `{"passed": false, "error": "..."}` and a non-zero
    /// exit.
    Test {
        /// The `.wasm` files to test (bundled plugins are available too), then the scenario
        /// file (TOML; see sdk/README.md).
        #[arg(required = true, num_args = 2.., value_names = ["FILE.wasm", "SCENARIO.toml"])]
        files: Vec<PathBuf>,
    },
    /// Create a new plugin crate that builds and passes its own scenario test.
    New {
        /// Type name of the new container type.
        name: String,
        /// Directory to create (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path of the cloud48-sdk crate to depend on.
        #[arg(long, env = "CLOUD48_SDK_PATH")]
        sdk: Option<PathBuf>,
    },
}

fn read_wasm(file: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !bytes.starts_with(b"\0asm") {
        bail!(
            "{} is not a WASM file (build plugins with `cargo build --release --target wasm32-wasip2`)",
            file.display()
        );
    }
    Ok(bytes)
}

pub(super) async fn plugin(client: &Client, out: Out, cmd: PluginCmd) -> Result<()> {
    use cloud48_engine::plugins::PluginInfo;
    match cmd {
        PluginCmd::Install { file } => {
            let info: PluginInfo = client
                .send_wasm(reqwest::Method::POST, "/v1/plugins", read_wasm(&file)?)
                .await?;
            out.show(&info, || {
                format!(
                    "installed {} (priority {}): {}",
                    info.type_id, info.meta.priority, info.meta.description
                )
            });
        }
        PluginCmd::Upgrade { name, file, wait } => {
            let wasm = read_wasm(&file)?;
            let a: Accepted = client
                .send_wasm(
                    reqwest::Method::PUT,
                    &format!("/v1/plugins/{}", enc(&name)),
                    wasm,
                )
                .await?;
            out.accepted(client, a, wait, &format!("upgrading plugin {name}"))
                .await?;
        }
        PluginCmd::List => {
            let list: Vec<PluginInfo> = client.get("/v1/plugins").await?;
            out.show(&list, || {
                let mut t = comfy_table::Table::new();
                t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
                    .set_header(vec![
                        "TYPE",
                        "PRIORITY",
                        "WIT",
                        "CONTAINERS",
                        "SIZE",
                        "DESCRIPTION",
                    ]);
                for p in &list {
                    t.add_row(vec![
                        p.type_id.clone(),
                        p.meta.priority.to_string(),
                        p.meta.wit_version.clone(),
                        p.containers.to_string(),
                        format!("{} KiB", p.size / 1024),
                        p.meta.description.clone(),
                    ]);
                }
                t.to_string()
            });
        }
        PluginCmd::Show { name } => {
            let p: PluginInfo = client.get(&format!("/v1/plugins/{}", enc(&name))).await?;
            out.show(&p, || output::plugin(&p));
        }
        PluginCmd::Test { mut files } => {
            let scenario = files.pop().expect("clap requires two arguments");
            if scenario.extension().and_then(|e| e.to_str()) != Some("toml") {
                bail!(
                    "the last argument must be the scenario file (.toml), got {}",
                    scenario.display()
                );
            }
            let text = std::fs::read_to_string(&scenario)
                .with_context(|| format!("cannot read {}", scenario.display()))?;
            let mut sc: cloud48_engine::plugins::harness::Scenario = toml_edit::de::from_str(&text)
                .with_context(|| format!("{} is not a valid scenario", scenario.display()))?;
            // A step's `upgrade = FILE` is a path relative to the scenario file, wherever the
            // command runs.
            let dir = scenario.parent().unwrap_or(std::path::Path::new(""));
            for path in sc.steps.iter_mut().filter_map(|s| s.upgrade.as_mut()) {
                if path.is_relative() {
                    *path = dir.join(&*path);
                }
            }
            let wasm = files
                .iter()
                .map(|f| read_wasm(f))
                .collect::<Result<Vec<_>>>()?;
            let report = std::thread::spawn(move || {
                let host = cloud48_engine::plugins::PluginHost::new(
                    None,
                    cloud48_engine::plugins::Limits::default(),
                )
                .map_err(|e| e.to_string())?;
                cloud48_engine::plugins::harness::run_scenario(
                    &host,
                    cloud48_engine::plugins::BUNDLED,
                    &wasm,
                    &sc,
                )
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the scenario thread panicked"))?;
            match report {
                Ok(lines) => {
                    let passed = serde_json::json!({ "passed": true, "steps": lines });
                    out.show(&passed, || {
                        let mut text = lines.join("\n");
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text + &format!("scenario passed: {} steps", lines.len())
                    });
                }
                Err(e) => {
                    if out.json {
                        out.show(
                            &serde_json::json!({ "passed": false, "error": e }),
                            String::new,
                        );
                    }
                    bail!("scenario failed: {e}")
                }
            }
        }
        PluginCmd::New { name, dir, sdk } => crate::scaffold::new_plugin(&name, dir, sdk)?,
        PluginCmd::Remove { name } => {
            client
                .delete_empty(&format!("/v1/plugins/{}", enc(&name)))
                .await?;
            out.show(&serde_json::json!({ "removed": name }), || {
                format!("plugin {name} removed")
            });
        }
    }
    Ok(())
}
