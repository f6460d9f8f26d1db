//! `cloud48 image …`: the core's image store from the command line, and `image build`, which
//! builds a recipe on this machine and uploads the image.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use cloud48_engine::images::{Builder, DEFAULT_MIRROR, ImageDetails, ImageSummary, Removed};

use super::client::Client;
use super::{Out, enc};

/// `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import images from an OCI archive (`podman save --format oci-archive`, `skopeo copy …
    /// oci-archive:FILE`; plain or gzip) or an OCI layout directory (admin). Every blob is
    /// verified; a corrupt or truncated source is refused and nothing of it is kept.
    Import {
        /// The archive file or layout directory.
        source: PathBuf,
        /// Name the image takes (`repository[:tag]`, tag `latest` by default); without it each
        /// image keeps the name its source gives it.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the core's images.
    List,
    /// Show an image: its config, process and layers.
    Show {
        /// Name (`cloud48/nginx`, `cloud48/nginx:1.0`) or manifest digest (or its first 12 hex
        /// digits).
        image: String,
    },
    /// Remove an image and every blob no other image uses (admin). Refused while an
    /// installed container type names it, unless --force.
    Rm {
        /// Name or manifest digest.
        image: String,
        /// Remove it even though container types name it.
        #[arg(long)]
        force: bool,
    },
    /// Build a Debian-based image from a recipe on this machine (root, debootstrap), then
    /// upload it to the core. Builds are cached by the recipe's hash; a cold build of a base
    /// takes one to two minutes, packages add about a minute.
    Build {
        /// The recipe (TOML; see images/*.toml).
        recipe: PathBuf,
        /// Build cache: Debian packages, base root file systems and built images.
        #[arg(long, env = "CLOUD48_CACHE_DIR", default_value = "/var/cache/cloud48")]
        cache_dir: PathBuf,
        /// Debian mirror for debootstrap and apt.
        #[arg(long, env = "CLOUD48_DEBIAN_MIRROR", default_value = DEFAULT_MIRROR)]
        mirror: String,
        /// Build the virtual machine variant, named NAME-vm: the recipe's root file system
        /// with Debian's kernel and initramfs, QEMU's guest agent and Cloud48's guest init,
        /// for servers whose agent runs the qemu driver.
        #[arg(long)]
        vm: bool,
    },
}

/// Uploads the OCI layout `dir` (as an archive written to a temporary file) or the archive
/// `file` to the core.
async fn upload(client: &Client, source: &Path, name: Option<&str>) -> Result<Vec<ImageSummary>> {
    let path = match name {
        Some(n) => format!("/v1/images?name={}", enc(n)),
        None => "/v1/images".to_string(),
    };
    let meta =
        std::fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    if !meta.is_dir() {
        return client.post_file(&path, source, "application/x-tar").await;
    }
    let dir = source.to_path_buf();
    let tmp = std::env::temp_dir().join(format!("cloud48-upload-{}.tar", std::process::id()));
    let archive = tmp.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f = std::fs::File::create(&archive)
            .with_context(|| format!("creating {}", archive.display()))?;
        cloud48_engine::images::archive_layout(&dir, std::io::BufWriter::new(f))?;
        Ok(())
    })
    .await??;
    let result = client.post_file(&path, &tmp, "application/x-tar").await;
    let _ = std::fs::remove_file(&tmp);
    result
}

fn table(list: &[ImageSummary]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["NAME", "DIGEST", "ARCH", "LAYERS", "SIZE"]);
    for i in list {
        t.add_row(vec![
            i.name
                .as_ref()
                .map_or("<none>".to_string(), |n| n.to_string()),
            i.digest.short().to_string(),
            format!("{}/{}", i.os, i.architecture),
            i.layer_count.to_string(),
            size(i.size),
        ]);
    }
    t.to_string()
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

fn details(d: &ImageDetails) -> String {
    let s = &d.summary;
    let mut text = format!(
        "image {}\n  digest:      {}\n  platform:    {}/{}\n  size:        {}\n  created:     {}\n  entrypoint:  {:?}\n  command:     {:?}\n  workdir:     {}\n  ports:       {}\n  env:",
        s.name
            .as_ref()
            .map_or("<none>".to_string(), |n| n.to_string()),
        s.digest,
        s.os,
        s.architecture,
        size(s.size),
        s.created.as_deref().unwrap_or("-"),
        d.entrypoint,
        d.cmd,
        d.workdir.as_deref().unwrap_or("/"),
        d.exposed_ports.join(", "),
    );
    for e in &d.env {
        text.push_str(&format!("\n    {e}"));
    }
    text.push_str("\n  layers:");
    for l in &d.layers {
        text.push_str(&format!(
            "\n    {} {:>10}  {}",
            l.digest,
            size(l.size),
            l.media_type
        ));
    }
    text
}

pub(super) async fn image(client: &Client, out: Out, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Import { source, name } => {
            let list = upload(client, &source, name.as_deref()).await?;
            out.show(&list, || format!("imported:\n{}", table(&list)));
        }
        ImageCmd::List => {
            let list: Vec<ImageSummary> = client.get("/v1/images").await?;
            out.show(&list, || table(&list));
        }
        ImageCmd::Show { image } => {
            let d: ImageDetails = client.get(&format!("/v1/images/{}", enc(&image))).await?;
            out.show(&d, || details(&d));
        }
        ImageCmd::Rm { image, force } => {
            let force = if force { "?force=true" } else { "" };
            let r: Removed = client
                .delete(&format!("/v1/images/{}{force}", enc(&image)))
                .await?;
            out.show(&r, || {
                format!(
                    "removed {}; freed {} blobs ({})",
                    r.names.join(", "),
                    r.blobs,
                    size(r.bytes)
                )
            });
        }
        ImageCmd::Build {
            recipe,
            cache_dir,
            mirror,
            vm,
        } => {
            if !recipe.is_file() {
                bail!(
                    "no recipe at {}; see images/*.toml for examples",
                    recipe.display()
                );
            }
            let builder = Builder::new(cache_dir, mirror).vm(vm);
            let json = out.json;
            let (recipe_read, layout, cached) = tokio::task::spawn_blocking(move || {
                builder.prepare(&recipe, &mut |step| {
                    if !json {
                        eprintln!("  {step}");
                    }
                })
            })
            .await??;
            let name = recipe_read.name.to_string();
            let list = upload(client, &layout, Some(&name)).await?;
            out.show(&list, || {
                format!(
                    "{} {name}{}:\n{}",
                    if cached {
                        "uploaded"
                    } else {
                        "built and uploaded"
                    },
                    if cached {
                        " (from the build cache)"
                    } else {
                        ""
                    },
                    table(&list)
                )
            });
        }
    }
    Ok(())
}
