//! The agent protocol: what the core's remote driver and a node agent say to each other.
//!
//! HTTP/1.1 with JSON bodies, every request carrying `Authorization: Bearer TOKEN`.
//! - `POST /v1/ops` with an [`OpRequest`]: a mutation. The answer is always `200` with an
//!   [`OpResponse`] (the driver's result or its typed error). The operation id makes a retry
//!   safe: the agent runs each id once and answers repeats with the first result, waiting for it
//!   if the first request is still running.
//! - `GET /v1/info`: [`AgentInfo`]. `GET /v1/stats`: load figures. `GET /v1/guests`: every guest.
//!   `GET /v1/guests/{id}`: one guest or `null`. `GET /v1/guests/{id}/logs`: its output.
//! - `GET /v1/ops/{id}`: progress of an operation ([`OpStatus`]).
//! - `GET /v1/exports/{export}`: an image made by an `export` operation (a snapshot of the
//!   stopped guest's directory, kept for a while); the importing agent pulls it (cold migration
//!   and cloning go agent to agent, and the source may run again meanwhile).
//! - Failures of the protocol itself (no token, malformed body, reused operation id) answer a
//!   4xx status with an [`ProtocolError`] body.
//!
//! The agent in turn sends `POST {core}/v1/agents/heartbeat` with a [`Heartbeat`] every
//! heartbeat period; the first one registers the server.

use serde::{Deserialize, Serialize};

use cloud48_driver::{
    Capabilities, DriverError, ExecOutput, GuestInfo, GuestSpec, LiveOffer, LiveReport, LiveTarget,
    ServerStats,
};
use cloud48_model::Resources;

/// A mutation of guests on the agent's server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `Driver::create`.
    Create { spec: GuestSpec },
    /// `Driver::start`.
    Start { guest: String },
    /// `Driver::stop`.
    Stop { guest: String },
    /// `Driver::suspend`.
    Suspend { guest: String },
    /// `Driver::resume`.
    Resume { guest: String },
    /// `Driver::reboot`.
    Reboot { guest: String },
    /// `Driver::destroy`.
    Destroy { guest: String },
    /// `Driver::update`.
    Update { guest: String, resources: Resources },
    /// `Driver::export` of a stopped guest: the agent keeps the image for a while under an
    /// export id, for another agent (or the core) to pull.
    Export { guest: String },
    /// `Driver::import`, from bytes in the request or pulled from another agent.
    Import {
        spec: GuestSpec,
        source: ImageSource,
    },
    /// `Driver::exec`.
    Exec {
        guest: String,
        script: String,
        args: Vec<String>,
    },
    /// `Driver::live_offer`.
    LiveOffer { guest: String },
    /// `Driver::live_receive`.
    LiveReceive { spec: GuestSpec, offer: LiveOffer },
    /// `Driver::live_send`.
    LiveSend { guest: String, target: LiveTarget },
    /// `Driver::live_finish`.
    LiveFinish { guest: String },
    /// `Driver::fetch_image`.
    FetchImage {
        from: cloud48_driver::ImageOrigin,
        image: Option<String>,
    },
}

/// Where an imported guest's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSource {
    /// The image travels in the request, hex-encoded.
    Inline { type_id: String, data_hex: String },
    /// The importing agent pulls `GET {url}/v1/exports/{export}` from the source agent.
    Agent {
        url: String,
        export: String,
        type_id: String,
    },
    /// The importing agent pulls `GET {core}/v1/exports/{export}` from the first of its cores
    /// that holds it (a container another platform exported, uploaded to a core).
    Core { export: String, type_id: String },
}

/// A mutation with the id that makes its retries safe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRequest {
    /// Chosen by the caller, unique per operation; 1-100 characters.
    pub id: String,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// What a successful operation returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OpOutput {
    /// Nothing to report.
    Done,
    /// The created or imported guest.
    Guest { guest: GuestInfo },
    /// The result of an exec.
    Exec { output: ExecOutput },
    /// An export kept by the agent.
    Export { export: String, bytes: u64 },
    /// What a live migration's target needs.
    LiveOffer { offer: LiveOffer },
    /// Where a live migration goes.
    LiveTarget { target: LiveTarget },
    /// How a live migration went.
    LiveReport { report: LiveReport },
    /// The images a fetch made present (`name@digest`).
    Images { images: Vec<String> },
}

/// The answer to an [`OpRequest`]: the driver's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResponse {
    /// The operation succeeded.
    Ok(OpOutput),
    /// The driver refused or failed.
    Err(DriverError),
}

impl From<Result<OpOutput, DriverError>> for OpResponse {
    fn from(r: Result<OpOutput, DriverError>) -> Self {
        match r {
            Ok(out) => OpResponse::Ok(out),
            Err(e) => OpResponse::Err(e),
        }
    }
}

impl From<OpResponse> for Result<OpOutput, DriverError> {
    fn from(r: OpResponse) -> Self {
        match r {
            OpResponse::Ok(out) => Ok(out),
            OpResponse::Err(e) => Err(e),
        }
    }
}

/// Progress of an operation (`GET /v1/ops/{id}`), for long ones such as imports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStatus {
    /// The operation id.
    pub id: String,
    /// True once the result is known (send the operation again to get it).
    pub done: bool,
    /// Time since it started.
    pub elapsed_ms: u64,
    /// What it last reported, e.g. `pulled 40 of 100 MiB from http://...`.
    pub progress: String,
}

/// A failure of the protocol itself (authentication, malformed requests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError {
    /// What was wrong and how to fix it.
    pub error: String,
}

/// What an agent says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Server name, unique on the platform.
    pub name: String,
    /// Address the core reaches the agent at.
    pub url: String,
    /// Kind of the agent's driver (`linux`, `sim`).
    pub driver: String,
    /// Optional operations the driver supports.
    pub capabilities: Capabilities,
    /// Labels of the server, for placement.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The subnet its containers' addresses come from (`10.48.1.0/24`); the core refuses an
    /// agent whose subnet overlaps another server's. Older agents do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The range of the subnet it hands out (`10.48.1.10-10.48.1.99`) when it shares its
    /// network with other servers, each with a range of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<String>,
    /// Whether it sends heartbeats (it was started with `--core`): the core refuses to add a
    /// server that never would, as it would be judged down. Older agents do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeats: Option<bool>,
    /// The id the agent made in its data directory at its first start: which agent (so which
    /// guests) a server's name stands for. Older agents do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its operator said it replaces the agent the server was run by (`--take-over`), whose
    /// guests are gone with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub take_over: bool,
}

/// A heartbeat from an agent to the core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Who is beating.
    pub agent: AgentInfo,
    /// Current load figures.
    pub stats: ServerStats,
    /// How often the agent beats, ms: the core refuses an agent that beats less often than
    /// twice in its grace period (its server would be judged down between two beats). Older
    /// agents do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_ms: Option<u64>,
}
