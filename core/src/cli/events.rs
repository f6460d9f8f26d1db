//! `cloud48 events`: follows the core's event stream (`GET /v1/events`), reconnecting after
//! the last event seen when a connection ends.

use anyhow::Result;
use clap::Args;

use super::Out;
use super::client::Client;
use super::output;
use cloud48_engine::events::Delivery;

/// Options of `cloud48 events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only these topics: command, container, server, environment (repeat the flag or separate
    /// with commas).
    #[arg(long, value_delimiter = ',')]
    pub topic: Vec<String>,
    /// Only the events of one object and of commands on it, as TOPIC:ID (e.g. container:5).
    #[arg(long)]
    pub object: Option<String>,
    /// Only the events of one environment (id or name), of its containers and of commands on it.
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Only the events of one project (name or id): its environments, containers and commands.
    #[arg(long)]
    pub project: Option<String>,
    /// Start after this event id, replaying what the core still keeps (default: from now on).
    #[arg(long, allow_negative_numbers = true, value_parser = event_id)]
    pub after: Option<i64>,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

impl EventsArgs {
    fn path(&self, after: Option<i64>) -> String {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let mut q = Vec::new();
        if !self.topic.is_empty() {
            q.push(format!("topic={}", enc(&self.topic.join(","))));
        }
        if let Some(o) = &self.object {
            q.push(format!("object={}", enc(o)));
        }
        if let Some(e) = &self.environment {
            q.push(format!("environment={}", enc(e)));
        }
        if let Some(p) = &self.project {
            q.push(format!("project={}", enc(p)));
        }
        if let Some(a) = after {
            q.push(format!("after={a}"));
        }
        if q.is_empty() {
            "/v1/events".into()
        } else {
            format!("/v1/events?{}", q.join("&"))
        }
    }
}

/// Prints events as they come (one JSON object per line with `--json`).
pub async fn follow(client: &Client, out: Out, args: EventsArgs) -> Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let mut shown = 0u64;
    let mut last = args.after;
    client
        .follow(
            args.after,
            |after| args.path(after),
            async |delivery| {
                let e = match delivery {
                    Delivery::Ready(after) => {
                        last = Some(after);
                        return Ok(None);
                    }
                    Delivery::Event(e) => e,
                };
                last = Some(e.id);
                if out.json {
                    println!("{}", e.json());
                } else {
                    println!("{}", output::printable(&output::event(&e)));
                }
                shown += 1;
                Ok(args.count.is_some_and(|c| shown >= c).then_some(()))
            },
        )
        .await
        .map_err(|e| lost(e, last.map(|a| format!("cloud48 events --after {a} ..."))))
}

/// `e`, when it says the core was lost, with how to go on from where the stream was.
fn lost(e: anyhow::Error, again: Option<String>) -> anyhow::Error {
    if !super::client::cut_off(&e) {
        return e;
    }
    let again = again.map_or(String::new(), |a| format!(" with `{a}`"));
    e.context(format!(
        "the event stream ended: its core stopped or the connection broke; go on{again} \
         (with several cores, --server naming another one)"
    ))
}

/// `cloud48 watch ...`: a live view redrawn at each event of what it shows.
#[derive(Debug, clap::Subcommand)]
pub enum WatchCmd {
    /// An environment and its members, redrawn whenever one of them changes.
    Env {
        /// Environment name or id.
        name: String,
    },
}

/// Redraws the view at each event until interrupted or the environment is destroyed (or,
/// with `--json`, prints the object once per change, one JSON document per line).
pub async fn watch(client: &Client, out: Out, cmd: WatchCmd) -> Result<()> {
    use std::io::IsTerminal;
    let WatchCmd::Env { name } = cmd;
    let path = format!(
        "/v1/environments/{}",
        form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
    );
    // The environment by id, so that the stream follows it even if it is renamed or its
    // name is taken again after it is destroyed.
    let env: cloud48_engine::model::Environment = client.get(&path).await?;
    let terminal = std::io::stdout().is_terminal();
    let path = |after: Option<i64>| match after {
        Some(a) => format!("/v1/events?environment={}&after={a}", env.id),
        None => format!("/v1/events?environment={}", env.id),
    };
    client
        .follow(None, path, async |_| {
            let now: cloud48_engine::model::Environment =
                client.get(&format!("/v1/environments/{}", env.id)).await?;
            if out.json {
                println!("{}", serde_json::to_string(&now)?);
            } else {
                if terminal {
                    // Clear the screen and go home, as `watch` does.
                    print!("\x1b[2J\x1b[H");
                }
                println!("{}\n", output::printable(&output::environment(&now)));
            }
            // A destroyed environment changes no more: the watch ends with its last view.
            let gone = now.status == cloud48_engine::model::EnvironmentStatus::Destroyed;
            Ok(gone.then_some(()))
        })
        .await
        .map_err(|e| lost(e, Some(format!("cloud48 watch env {name}"))))
}

/// An event id: 0 or more.
fn event_id(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        Ok(_) => Err(format!("{text} is not an event id: ids are 0 or more")),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_carries_every_filter_encoded() {
        let args = EventsArgs {
            topic: vec!["command".into(), "server".into()],
            object: Some("container:5".into()),
            environment: Some("shop a".into()),
            project: Some("lab".into()),
            after: None,
            count: None,
        };
        assert_eq!(
            args.path(Some(42)),
            "/v1/events?topic=command%2Cserver&object=container%3A5&environment=shop+a&project=lab&after=42"
        );
        let bare = EventsArgs {
            topic: vec![],
            object: None,
            environment: None,
            project: None,
            after: None,
            count: None,
        };
        assert_eq!(bare.path(None), "/v1/events");
    }

    #[test]
    fn a_negative_event_id_is_refused_saying_what_ids_are() {
        assert_eq!(event_id("7"), Ok(7));
        assert!(event_id("-3").unwrap_err().contains("ids are 0 or more"));
        assert!(event_id("x").unwrap_err().contains("not a whole number"));
    }
}
