//! `cloud48 cluster`: the cores sharing the database, and which core holds each duty.

use anyhow::Result;

use super::Out;
use super::client::Client;
use cloud48_api::cluster::Cluster;

/// Prints the cores and the duties' holders as a table (or JSON).
pub async fn show(client: &Client, out: Out) -> Result<()> {
    let cluster: Cluster = client.get("/v1/cluster").await?;
    out.show(&cluster, || table(&cluster));
    Ok(())
}

fn table(cluster: &Cluster) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["CORE", "URL", "STATUS", "LAST SEEN", "DUTIES"]);
    for c in &cluster.cores {
        let duties: Vec<&str> = cluster
            .duties
            .iter()
            .filter(|d| d.core == c.node)
            .map(|d| d.duty.as_str())
            .collect();
        t.add_row(vec![
            if c.this {
                format!("{} (this one)", c.node)
            } else {
                c.node.clone()
            },
            c.url.clone().unwrap_or_else(|| "-".into()),
            if c.running {
                "running".into()
            } else {
                "silent (stopped?)".to_string()
            },
            format!("{:.1} s ago", c.silent_ms as f64 / 1000.0),
            if duties.is_empty() {
                "-".into()
            } else {
                duties.join(", ")
            },
        ]);
    }
    t.to_string()
}
