//! `cloud48 audit`: lists the audit trail, newest first.

use anyhow::Result;
use clap::Args;

use super::Out;
use super::client::Client;
use cloud48_engine::model::AuditEntry;

/// Options of `cloud48 audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only the changes of this user (as the trail names them; `--user` is who signs in).
    #[arg(long, value_name = "USER")]
    pub who: Option<String>,
    /// Only changes of paths starting with this (e.g. /v1/servers).
    #[arg(long)]
    pub object: Option<String>,
    /// At most this many, newest first (1-1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub limit: u64,
    /// Only entries older than this one (the next page; its id is said on standard error
    /// when there are more).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    pub before: Option<i64>,
}

/// Prints the trail as a table (or JSON).
pub async fn list(client: &Client, out: Out, args: AuditArgs) -> Result<()> {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut q = vec![format!("limit={}", args.limit)];
    if let Some(u) = &args.who {
        q.push(format!("who={}", enc(u)));
    }
    if let Some(o) = &args.object {
        q.push(format!("object={}", enc(o)));
    }
    if let Some(b) = args.before {
        q.push(format!("before={b}"));
    }
    let (list, next) = client
        .page::<AuditEntry>(&format!("/v1/audit?{}", q.join("&")))
        .await?;
    out.show(&list, || table(&list));
    super::say_next_page(next.as_deref());
    Ok(())
}

fn table(list: &[AuditEntry]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["ID", "AT (UTC)", "WHO", "WHAT", "OUTCOME"]);
    for e in list {
        let outcome = match (&e.command_id, &e.message, e.status) {
            (Some(c), _, s) => format!("{s}: command {c}"),
            (None, Some(m), 0) => format!("failed: {m}"),
            (None, Some(m), s) => format!("{s}: {m}"),
            (None, None, 0) => "done".into(),
            (None, None, s) => s.to_string(),
        };
        t.add_row(vec![
            e.id.to_string(),
            chrono::DateTime::from_timestamp_millis(e.at).map_or_else(
                || e.at.to_string(),
                |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
            ),
            match &e.address {
                Some(a) => format!("{} from {a}", e.who),
                None => e.who.clone(),
            },
            match &e.request {
                Some(r) => {
                    let r: String = r.chars().take(160).collect();
                    format!("{} {} {r}", e.action, e.object)
                }
                None => format!("{} {}", e.action, e.object),
            },
            outcome,
        ]);
    }
    t.to_string()
}
