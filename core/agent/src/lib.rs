//! The node agent (`cloud48 agent`): the VSH layer of one server. It serves the agent protocol
//! over its driver (linux or sim) and sends heartbeats with load figures to the core, the first
//! of which registers the server.

pub mod cli;
pub mod images;
pub mod protocol;
pub mod ranged;
pub mod remote;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

pub use server::AgentService;

use self::protocol::Heartbeat;

/// The cores an agent knows, in the order it tries them: those it was given, then those the
/// cores told it about. Heartbeats go to the current one; when it fails, the next is tried.
#[derive(Debug, Clone)]
pub struct CoreList {
    urls: Vec<String>,
    current: usize,
}

impl CoreList {
    /// The cores given on the command line (at least one).
    pub fn new(urls: Vec<String>) -> Self {
        let mut list = CoreList {
            urls: Vec::new(),
            current: 0,
        };
        list.learn(urls);
        list
    }

    /// The URL heartbeats go to now.
    pub fn current(&self) -> &str {
        &self.urls[self.current]
    }

    /// Every core, the current one first, then the others in order.
    pub fn rotation(&self) -> Vec<(usize, String)> {
        (0..self.urls.len())
            .map(|i| (self.current + i) % self.urls.len())
            .map(|i| (i, self.urls[i].clone()))
            .collect()
    }

    /// The core at `index` answered: it stays current.
    pub fn answered(&mut self, index: usize) {
        self.current = index;
    }

    /// Adds cores this agent did not know (a core's answer lists the cluster's cores).
    pub fn learn(&mut self, urls: impl IntoIterator<Item = String>) {
        for url in urls {
            let url = url.trim_end_matches('/').to_string();
            if !url.is_empty() && !self.urls.contains(&url) {
                self.urls.push(url);
            }
        }
    }

    /// Every known core.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }
}

/// What a core answers a heartbeat.
#[derive(Debug, serde::Deserialize)]
struct BeatAnswer {
    /// The cores of the cluster (older cores do not say).
    #[serde(default)]
    cores: Vec<String>,
}

/// Sends a heartbeat every `period` until the task is dropped, to the first core of `cores`
/// that answers (the one that answered last is tried first), learning the cluster's other
/// cores from the answers. Failures are logged when they start and when they end, not on every
/// beat. Returns only when a core refuses the agent (a 4xx: a wrong token, a name or subnet
/// another server has) before any core has accepted one of this run's heartbeats: retrying
/// would not change the answer. Once registered, refusals are retried
/// (a live agent keeps trying while an operator mends the core's settings).
pub async fn heartbeats(
    agent: Arc<AgentService>,
    cores: Vec<String>,
    token: String,
    period: Duration,
) -> Refused {
    let cores = Arc::new(std::sync::Mutex::new(CoreList::new(cores)));
    heartbeats_over(agent, cores, token, period).await
}

/// Beats in a row on which every core that answered refused an agent not yet accepted, after
/// which it stops.
const REFUSED_BEATS: u32 = 3;

/// The cores an agent knows, shared by its heartbeats (which learn new ones from the answers)
/// and its image pulls (which fail over to the next core as heartbeats do).
pub type SharedCores = Arc<std::sync::Mutex<CoreList>>;

/// Why no core would register an agent: the core and its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the core at {core} refused this agent ({status}): {reason}")]
pub struct Refused {
    /// The core that refused.
    pub core: String,
    /// Its HTTP status.
    pub status: u16,
    /// What it said.
    pub reason: String,
}

/// `heartbeats` over a list of cores others read too.
pub async fn heartbeats_over(
    agent: Arc<AgentService>,
    cores: SharedCores,
    token: String,
    period: Duration,
) -> Refused {
    let mut registered = false;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client without TLS builds");
    let mut failing = false;
    let mut refused_beats = 0;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stats = match agent.driver().stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read load figures; no heartbeat sent");
                continue;
            }
        };
        let beat = Heartbeat {
            agent: agent.info().clone(),
            stats,
            period_ms: Some(period.as_millis() as u64),
        };
        let (before, rotation) = {
            let cores = cores.lock().unwrap();
            (cores.current().to_string(), cores.rotation())
        };
        let mut problems = Vec::new();
        // The first refusal of this beat before this agent was ever accepted. It stops when no
        // core accepted it and the cores that answered refused it, three beats in a row: a
        // core whose view differs (say one started with another token) may be alone in
        // refusing, and another core may be unreachable for a moment.
        let mut refused = None;
        for (index, core) in rotation {
            let sent = client
                .post(format!("{core}/v1/agents/heartbeat"))
                .bearer_auth(&token)
                .json(&beat)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let answer = r.json::<BeatAnswer>().await;
                    let mut cores = cores.lock().unwrap();
                    if let Ok(answer) = answer {
                        cores.learn(answer.cores);
                    }
                    cores.answered(index);
                    problems.clear();
                    registered = true;
                    agent.mark_accepted();
                    break;
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    // A refusal: a wrong token, a name or subnet taken (a proxy's timeout or
                    // throttling is not one).
                    let refusal = status.is_client_error()
                        && status != reqwest::StatusCode::REQUEST_TIMEOUT
                        && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
                    problems.push(format!(
                        "{core} answered {status}: {}",
                        refusal_reason(&body)
                    ));
                    if refusal && !registered {
                        refused.get_or_insert(Refused {
                            core,
                            status: status.as_u16(),
                            reason: refusal_reason(&body),
                        });
                        continue;
                    }
                    if refusal {
                        break;
                    }
                }
                Err(e) => problems.push(format!("{core}: {}", cloud48_model::with_causes(&e))),
            }
        }
        match refused {
            Some(first) if !registered => {
                refused_beats += 1;
                if refused_beats >= REFUSED_BEATS {
                    return first;
                }
            }
            _ => refused_beats = 0,
        }
        let now = cores.lock().unwrap().current().to_string();
        if problems.is_empty() && now != before {
            tracing::warn!(from = %before, to = %now, "heartbeats go to another core");
        }
        match problems.is_empty() {
            false if !failing => {
                tracing::warn!(problem = %problems.join("; "), "heartbeats are failing");
                failing = true;
            }
            true if failing => {
                tracing::info!(core = %now, "heartbeats reach a core again");
                failing = false;
            }
            _ => {}
        }
    }
}

/// The message of a core's JSON error body (`{"error": {"message": "..."}}`), else the body
/// as it came, on one line and cut at 200 characters (a server that is no core may answer a
/// whole HTML page: "is this URL a Cloud48 core?").
fn refusal_reason(body: &str) -> String {
    if let Some(m) = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_string))
    {
        return m;
    }
    let line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!(
            "{}... (not a Cloud48 core's answer: is this URL a core's?)",
            &line[..cut]
        ),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::CoreList;

    /// A refusal says the core's message; another server's page comes on one line, cut.
    #[test]
    fn a_refusal_is_the_core_s_message_or_a_line_of_the_body() {
        assert_eq!(
            super::refusal_reason(r#"{"error":{"message":"wrong token"}}"#),
            "wrong token"
        );
        let page = format!("<html>\n<body>{}</body>\n</html>", "x".repeat(500));
        let said = super::refusal_reason(&page);
        assert!(
            said.starts_with("<html> <body>xxx") && said.ends_with("is this URL a core's?)"),
            "{said}"
        );
        assert!(said.chars().count() < 300, "{said}");
        assert_eq!(super::refusal_reason("  busy \n"), "busy");
    }

    #[test]
    fn a_refusal_says_the_cores_message() {
        let body = r#"{"error":{"code":"conflict","message":"server name a is taken by the live agent at http://x:1; give this agent another --name"}}"#;
        assert_eq!(
            super::refusal_reason(body),
            "server name a is taken by the live agent at http://x:1; give this agent another --name"
        );
        assert_eq!(super::refusal_reason(" not found\n"), "not found");
    }

    #[test]
    fn a_core_list_tries_the_last_core_that_answered_first_and_learns_new_ones() {
        let mut list = CoreList::new(vec!["http://a:1/".into(), "http://b:1".into()]);
        assert_eq!(list.current(), "http://a:1");
        list.learn([
            "http://b:1".to_string(),
            "http://c:1".to_string(),
            String::new(),
        ]);
        assert_eq!(list.urls(), ["http://a:1", "http://b:1", "http://c:1"]);
        list.answered(1);
        let order: Vec<String> = list.rotation().into_iter().map(|(_, u)| u).collect();
        assert_eq!(order, ["http://b:1", "http://c:1", "http://a:1"]);
        assert_eq!(list.rotation()[0].0, 1);
    }
}
