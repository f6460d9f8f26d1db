//! Human tables and JSON output.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;

use cloud48_engine::model::{
    Command, Container, ContainerStatus, Environment, Event, Server, Topic,
};

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

/// `text` for a terminal: control characters other than newlines and tabs (escape sequences
/// in a plugin's messages or logs that would recolour, clear or rewrite the screen) shown as
/// escapes (`\u{1b}`), not sent to it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.into();
    }
    // Lines ended CRLF (a plugin's log written on Windows) read as lines.
    text.replace("\r\n", "\n")
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Prints a value as pretty JSON.
pub fn json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A table of containers.
pub fn containers(list: &[Container]) -> String {
    let mut t = table(&[
        "ID",
        "TYPE",
        "STATUS",
        "SERVER",
        "IP",
        "ENVIRONMENT",
        "CPU",
        "MEM MB",
        "DISK MB",
    ]);
    for c in list {
        let r = &c.requirements.resources;
        t.add_row(vec![
            c.id.to_string(),
            c.type_id.clone(),
            c.status.to_string(),
            opt(&c.server),
            opt(&c.ip),
            opt(&c.environment),
            format!("{:.2}", r.cpu_millis as f64 / 1000.0),
            r.memory_mb.to_string(),
            r.disk_mb.to_string(),
        ]);
    }
    t.to_string()
}

/// Details of one container.
pub fn container(c: &Container) -> String {
    let mut lines = vec![
        format!("container {}  ({})", c.id, c.type_id),
        match &c.status_reason {
            Some(why) => format!("  status:      {} ({why})", c.status),
            None => format!("  status:      {}", c.status),
        },
        format!("  server:      {}", opt(&c.server)),
        format!("  ip:          {}", opt(&c.ip)),
        format!("  environment: {}", opt(&c.environment)),
        format!("  guest id:    {}", c.guest_id),
        format!("  priority:    {}", c.priority),
        format!(
            "  resources:   cpu {:.2}, memory {} MB, disk {} MB",
            c.requirements.resources.cpu_millis as f64 / 1000.0,
            c.requirements.resources.memory_mb,
            c.requirements.resources.disk_mb
        ),
        format!("  state:       {} bytes", c.state_bytes),
    ];
    if !c.requirements.labels.is_empty() {
        lines.push(format!(
            "  labels:      {}",
            c.requirements.labels.join(", ")
        ));
    }
    if !c.params.is_empty() {
        let params: Vec<String> = c.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push(format!("  params:      {}", params.join(", ")));
    }
    if let Some(l) = c.locked_by {
        lines.push(format!("  locked by:   command {l}"));
    }
    if let Some(i) = &c.inspect {
        lines.push(format!("  type state:  {i}"));
    }
    if !c.execs.is_empty() {
        lines.push(format!("  scripts run: {}", c.execs.len()));
        for e in &c.execs {
            lines.push(format!(
                "    command {} {}: {} {}",
                e.command_id,
                e.status,
                e.script,
                e.args.join(" ")
            ));
        }
    }
    if let Some(o) = &c.origin {
        lines.push(format!(
            "  origin:      platform {}, container {}, guest {}",
            o.origin_platform, o.origin_container_id, o.guest_id
        ));
    }
    lines.join("\n")
}

/// A table of environments.
pub fn environments(list: &[Environment]) -> String {
    let mut t = table(&["ID", "NAME", "PROJECT", "STATUS", "MEMBERS", "LOCKED BY"]);
    for e in list {
        t.add_row(vec![
            e.id.to_string(),
            e.name.clone(),
            e.project.clone(),
            e.status.to_string(),
            e.members.len().to_string(),
            opt(&e.locked_by),
        ]);
    }
    t.to_string()
}

/// Details of one environment with its members.
pub fn environment(e: &Environment) -> String {
    let mut out = format!(
        "environment {}  (id {}, project {}, {}, {} member{})\n",
        e.name,
        e.id,
        e.project,
        e.status,
        e.members.len(),
        if e.members.len() == 1 { "" } else { "s" }
    );
    if !e.params.is_empty() {
        let params: Vec<String> = e.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("params: {}\n", params.join(", ")));
    }
    if !e.members.is_empty() {
        let mut t = table(&["ID", "TYPE", "PRIORITY", "STATUS", "SERVER", "IP"]);
        for c in &e.members {
            let status = match c.status {
                ContainerStatus::Down => "DOWN (server unreachable)".to_string(),
                ContainerStatus::Illegal => {
                    "ILLEGAL (replaced; collected when its server is back)".to_string()
                }
                other => other.to_string(),
            };
            t.add_row(vec![
                c.id.to_string(),
                c.type_id.clone(),
                c.priority.to_string(),
                status,
                opt(&c.server),
                opt(&c.ip),
            ]);
        }
        out.push_str(&t.to_string());
    }
    out
}

/// A table of servers.
pub fn servers(list: &[Server]) -> String {
    let mut t = table(&[
        "ID",
        "NAME",
        "DRIVER",
        "STATUS",
        "CONTAINERS",
        "CPU RESERVED/TOTAL",
        "MEM MB RESERVED/TOTAL",
        "DISK MB RESERVED/TOTAL",
        "MEASURED USE",
        "LAST HEARTBEAT",
        "CAPABILITIES",
        "NETWORK",
    ]);
    let now = cloud48_engine::model::now_ms();
    for s in list {
        let status = if s.draining {
            format!("{} (draining)", s.status)
        } else {
            s.status.to_string()
        };
        let beat = s.last_heartbeat.map_or("never".to_string(), |t| {
            format!("{:.1} s ago", (now - t).max(0) as f64 / 1000.0)
        });
        let containers = if s.dummies > 0 {
            format!(
                "{} (+{} reserved)",
                s.containers - s.dummies.min(s.containers),
                s.dummies
            )
        } else {
            s.containers.to_string()
        };
        t.add_row(vec![
            s.id.to_string(),
            s.name.clone(),
            s.driver.clone(),
            status,
            containers,
            format!(
                "{:.1}/{:.1}",
                s.allocated.cpu_millis as f64 / 1000.0,
                s.capacity.cpu_millis as f64 / 1000.0
            ),
            format!("{}/{}", s.allocated.memory_mb, s.capacity.memory_mb),
            format!("{}/{}", s.allocated.disk_mb, s.capacity.disk_mb),
            s.load
                .as_ref()
                .and_then(|l| l.used)
                .map_or("-".to_string(), |u| {
                    format!(
                        "{:.2} cpu, {} MB mem, {} MB disk",
                        u.cpu_millis as f64 / 1000.0,
                        u.memory_mb,
                        u.disk_mb
                    )
                }),
            beat,
            s.capabilities.join(" "),
            match (&s.subnet, &s.addresses) {
                (Some(net), Some(range)) => format!("{net} ({range})"),
                (Some(net), None) => net.clone(),
                _ => "-".to_string(),
            },
        ]);
    }
    t.to_string()
}

/// Most characters of a command's error or wait a table row shows.
const NOTE_CHARS: usize = 100;

/// At most `n` characters of `text` on one line, with `…` where it was cut.
fn cut(text: &str, n: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= n {
        return line;
    }
    let kept: String = line.chars().take(n - 1).collect();
    format!("{kept}…")
}

/// A table of commands.
pub fn commands(list: &[Command]) -> String {
    let mut t = table(&[
        "ID",
        "KIND",
        "STATUS",
        "TARGET",
        "PARENT",
        "STEP",
        "BY",
        "ERROR / WAITING ON",
    ]);
    for c in list {
        let target = match (&c.target_type, c.target_id) {
            (Some(t), Some(id)) => format!("{t} {id}"),
            _ => "-".into(),
        };
        // A row per command: a long error (a chain of hook actions can run to thousands of
        // characters) is cut here; `command show ID` has it whole.
        let note = c
            .error
            .as_deref()
            .or(c.waiting_on.as_deref())
            .map_or(String::new(), |n| cut(n, NOTE_CHARS));
        t.add_row(vec![
            c.id.to_string(),
            c.kind.clone(),
            c.status.to_string(),
            target,
            opt(&c.parent),
            c.step.to_string(),
            c.requested_by.clone(),
            note,
        ]);
    }
    t.to_string()
}

/// Details of one plugin: what it is, what runs in its containers, the parameters it takes.
pub fn plugin(p: &cloud48_engine::plugins::PluginInfo) -> String {
    let (m, r) = (&p.meta, &p.meta.requirements.resources);
    let mut lines = vec![
        format!("plugin {}", p.type_id),
        format!("  description:  {}", m.description),
        format!("  priority:     {}", m.priority),
        format!("  WIT version:  {}", m.wit_version),
        format!(
            "  requirements: cpu {:.2}, memory {} MB, disk {} MB",
            r.cpu_millis as f64 / 1000.0,
            r.memory_mb,
            r.disk_mb
        ),
    ];
    let w = &m.workload;
    if w.is_default() {
        lines.push("  workload:     none declared (the server's idle default)".into());
    } else {
        let image = w
            .image
            .as_ref()
            .map_or("the server's own files".into(), |i| match &i.digest {
                Some(d) => format!("{}@{d}", i.reference),
                None => i.reference.clone(),
            });
        lines.push(format!("  image:        {image}"));
        if !w.command.is_empty() {
            lines.push(format!("  command:      {}", w.command.join(" ")));
        }
        if !w.endpoints.is_empty() {
            let e: Vec<String> = w
                .endpoints
                .iter()
                .map(|e| format!("{} {}/{:?}", e.name, e.port, e.protocol).to_lowercase())
                .collect();
            lines.push(format!("  endpoints:    {}", e.join(", ")));
        }
        if !w.volumes.is_empty() {
            let v: Vec<String> = w
                .volumes
                .iter()
                .map(|v| format!("{} {}", v.name, v.path))
                .collect();
            lines.push(format!("  volumes:      {}", v.join(", ")));
        }
    }
    if m.params.is_empty() {
        lines.push("  parameters:   none".into());
    } else {
        lines.push("  parameters:   (--param NAME=VALUE)".into());
        for s in &m.params {
            let default = s
                .default
                .as_deref()
                .map_or("required".to_string(), |d| format!("default {d:?}"));
            let settable = if s.settable {
                ", hooks may change it"
            } else {
                ""
            };
            lines.push(format!(
                "    {} ({}, {default}{settable}): {}",
                s.name,
                format!("{:?}", s.kind).to_lowercase(),
                s.description
            ));
        }
    }
    lines.push(format!("  containers:   {}", p.containers));
    lines.push(format!("  sha256:       {}", p.sha256));
    lines.push(format!("  size:         {} bytes", p.size));
    lines.join("\n")
}

/// A command's parameters for people: the bytes of an image (`data`, such as an upload's
/// reference) as text where they are text, else as their length.
fn readable_params(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let bytes = |a: &[Value]| -> Option<Vec<u8>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect()
    };
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let shown = match v {
                        Value::Array(a) if k == "data" => match bytes(a) {
                            Some(b) => match String::from_utf8(b) {
                                Ok(text) if !text.chars().any(char::is_control) => {
                                    Value::String(text)
                                }
                                _ => Value::String(format!("<{} bytes>", a.len())),
                            },
                            None => readable_params(v),
                        },
                        _ => readable_params(v),
                    };
                    (k.clone(), shown)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(readable_params).collect()),
        other => other.clone(),
    }
}

/// Details of one command.
pub fn command(c: &Command) -> String {
    let mut lines = vec![
        format!("command {}  ({})", c.id, c.kind),
        format!("  status:       {}", c.status),
        match (&c.target_type, c.target_id) {
            (Some(kind), Some(id)) => format!("  target:       {kind} {id}"),
            _ => "  target:       -".to_string(),
        },
        format!("  parent:       {}", opt(&c.parent)),
        format!("  step:         {}", c.step),
        format!("  retries:      {}", c.attempts),
        format!("  requested by: {}", c.requested_by),
        format!("  params:       {}", readable_params(&c.params)),
    ];
    if let Some(r) = &c.result {
        lines.push(format!("  result:       {}", result_line(r)));
    }
    if let Some(w) = &c.waiting_on {
        lines.push(format!("  waiting on:   {w}"));
    }
    if let Some(e) = &c.error {
        lines.push(format!("  error:        {e}"));
    }
    if !c.log.is_empty() {
        lines.push("  plugin log:".into());
        for l in &c.log {
            let who = l
                .container
                .map_or("new container".to_string(), |c| format!("container {c}"));
            lines.push(format!("    {who} {}: {}", l.level, l.message));
        }
    }
    lines.join("\n")
}

/// A command's result on one line: a batch's list of failed containers is summed up (all of
/// them are in `--json`).
fn result_line(r: &serde_json::Value) -> String {
    match r.get("failed").and_then(|f| f.as_array()) {
        Some(failed) if failed.len() > 3 => {
            let first = &failed[0];
            format!(
                "created {}, failed {} (first: container {}: {}); --json lists each",
                r["created"],
                failed.len(),
                first[0],
                first[1].as_str().unwrap_or_default()
            )
        }
        _ => r.to_string(),
    }
}

/// One event on one line: `#41 16:20:01.114 command 12 succeeded container.create on
/// container:5 by admin`.
pub fn event(e: &Event) -> String {
    let ms = e.at.rem_euclid(86_400_000);
    let mut line = format!(
        "#{} {:02}:{:02}:{:02}.{:03} {} {} {}",
        e.id,
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000,
        e.topic,
        e.object_id,
        e.action
    );
    if let Some(k) = &e.kind {
        line.push_str(&format!(" {k}"));
    }
    if let Some(r) = &e.related {
        let word = if e.topic == Topic::Command {
            "on"
        } else {
            "in"
        };
        line.push_str(&format!(" {word} {r}"));
    }
    if let (Some(s), Topic::Container) = (e.server_id, e.topic) {
        line.push_str(&format!(" on server {s}"));
    }
    if let Some(by) = &e.by {
        line.push_str(&format!(" by {by}"));
    }
    if let Some(why) = &e.reason {
        // One event, one line: a reason's own line breaks are spaces.
        line.push_str(&format!(
            ": {}",
            why.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::printable;
    use serde_json::json;

    #[test]
    fn a_long_note_is_cut_to_one_line() {
        assert_eq!(super::cut("short\nnote", 100), "short note");
        let long = "x".repeat(300);
        let cut = super::cut(&long, 100);
        assert_eq!(cut.chars().count(), 100);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn control_characters_reach_the_terminal_as_escapes() {
        assert_eq!(printable("a\nb\tc"), "a\nb\tc");
        assert_eq!(printable("a\r\nb\u{7}"), "a\nb\\u{7}");
        assert_eq!(
            printable("x\u{1b}[2Jred\u{7}\r\0end"),
            "x\\u{1b}[2Jred\\u{7}\\r\\u{0}end"
        );
    }

    #[test]
    fn a_long_batch_result_is_summed_up() {
        let failed: Vec<_> = (4..10).map(|id| json!([id, "no room"])).collect();
        let line = super::result_line(&json!({ "created": 3, "failed": failed }));
        assert_eq!(
            line,
            "created 3, failed 6 (first: container 4: no room); --json lists each"
        );
        let short = json!({ "created": 3, "failed": [[4, "no room"]] });
        assert_eq!(super::result_line(&short), short.to_string());
    }

    #[test]
    fn an_image_s_bytes_read_as_text_or_as_their_length() {
        let upload: Vec<u8> = b"cloud48-core-upload:91f2".to_vec();
        let params = json!({
            "image": { "type_id": "plain", "data": upload },
            "disk": { "data": [0, 159, 146, 150] },
            "servers": [3, 4],
        });
        assert_eq!(
            super::readable_params(&params),
            json!({
                "image": { "type_id": "plain", "data": "cloud48-core-upload:91f2" },
                "disk": { "data": "<4 bytes>" },
                "servers": [3, 4],
            })
        );
    }

    #[test]
    fn an_event_reads_as_one_line() {
        let e = cloud48_engine::model::Event {
            id: 41,
            at: 1_764_000_001_114,
            topic: cloud48_engine::model::Topic::Command,
            object_id: 12,
            action: "succeeded".into(),
            kind: Some("container.create".into()),
            related: Some("container:5".into()),
            server_id: None,
            by: Some("admin".into()),
            project_id: Some(1),
            reason: None,
        };
        assert_eq!(
            super::event(&e),
            "#41 16:00:01.114 command 12 succeeded container.create on container:5 by admin"
        );
        let failed = cloud48_engine::model::Event {
            action: "failed".into(),
            reason: Some("server sim-1 lacks room\nmigrate it first".into()),
            ..e
        };
        assert!(
            super::event(&failed).ends_with("by admin: server sim-1 lacks room migrate it first"),
            "{}",
            super::event(&failed)
        );
    }
}
