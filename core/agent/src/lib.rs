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

/// Sends a heartbeat to the core every `period` until the task is dropped. Failures are logged
/// when they start and when they end, not on every beat.
pub async fn heartbeats(
    agent: Arc<AgentService>,
    core_url: String,
    token: String,
    period: Duration,
) {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client without TLS builds");
    let url = format!("{}/v1/agents/heartbeat", core_url.trim_end_matches('/'));
    let mut failing = false;
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
        };
        let sent = client
            .post(&url)
            .bearer_auth(&token)
            .json(&beat)
            .send()
            .await;
        let problem = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => {
                let status = r.status();
                Some(format!(
                    "core answered {status}: {}",
                    r.text().await.unwrap_or_default()
                ))
            }
            Err(e) => Some(e.to_string()),
        };
        match problem {
            Some(p) if !failing => {
                tracing::warn!(core = %core_url, problem = %p, "heartbeats are failing");
                failing = true;
            }
            None if failing => {
                tracing::info!(core = %core_url, "heartbeats reach the core again");
                failing = false;
            }
            _ => {}
        }
    }
}
