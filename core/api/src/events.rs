//! `GET /v1/events`: the event log as Server-Sent Events, resumable with `Last-Event-ID`.
//!
//! A caller sees the topics whose objects it may read (an anonymous caller, those of the
//! families in `auth.anonymous_read`): a command's event tells no more than the command does.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::{ApiError, ApiQuery, ErrorBody};
use cloud48_engine::auth::{AuthError, Authenticator, Family, Principal, Role, Scope};
use cloud48_engine::core::Core;
use cloud48_engine::events::{Delivery, EventFilter, sse_message};
use cloud48_engine::model::{Event, Topic};
use cloud48_engine::projects::Owned;

/// Which events to stream.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only these topics, comma-separated: `command`, `container`, `server`, `environment`.
    pub topic: Option<String>,
    /// Only the events of one object, and of commands on it: `container:5`, `server:2`.
    pub object: Option<String>,
    /// Only the events of one environment (id or name), of its containers and of commands on it.
    pub environment: Option<String>,
    /// Only the events of one project (name or id): its environments, containers and commands.
    pub project: Option<String>,
    /// Start after this event id (as the `Last-Event-ID` header does); without either, the
    /// stream starts now.
    #[serde(default, deserialize_with = "cloud48_engine::managers::cursor")]
    pub after: Option<i64>,
}

/// The family whose readers may see a topic's events.
fn family(topic: Topic) -> Family {
    match topic {
        Topic::Command => Family::Commands,
        Topic::Container => Family::Containers,
        Topic::Server => Family::Fleet,
        Topic::Environment => Family::Environments,
    }
}

/// The topics a caller may follow, decided once by the access layer (`readable`), with why the
/// others are refused.
#[derive(Debug, Clone)]
pub(crate) struct Readable {
    topics: Vec<Topic>,
    /// Why a topic the caller may not follow is refused (the first such).
    refusal: Option<AuthError>,
    /// Where the caller may read (a caller limited to some projects sees their events and the
    /// servers').
    pub(crate) scope: Scope,
}

/// The topics `who` may follow; the first refusal when it may follow none.
pub(crate) async fn readable(auth: &Authenticator, who: &Principal) -> Result<Readable, AuthError> {
    let mut out = Readable {
        topics: Vec::new(),
        refusal: None,
        scope: Scope::All,
    };
    let mut first = None;
    for topic in Topic::ALL {
        match auth.scope(who, Role::Viewer, Some(family(*topic))).await {
            Ok(scope) => {
                out.topics.push(*topic);
                if scope != Scope::All {
                    out.scope = scope;
                }
            }
            Err(e) => {
                out.refusal.get_or_insert_with(|| e.clone());
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) if out.topics.is_empty() => Err(e),
        _ => Ok(out),
    }
}

/// A topic that is not one, with the topics there are.
fn unknown_topic(topic: &str) -> String {
    let known: Vec<&str> = Topic::ALL.iter().map(Topic::as_str).collect();
    format!(
        "unknown topic '{topic}' (expected one of: {})",
        known.join(", ")
    )
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        message,
        Some(field),
    )
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, content_type = "text/event-stream", body = Event,
            description = "Server-Sent Events. First `event: ready` whose `id` (and `data`) is the id the stream starts after; then one per event: `id` the event id, `event` its topic, `data` the event as JSON; `event: error` if the log cannot be read (the stream ends). A comment after 15 s without a message keeps the connection open; events ready together come in one chunk."),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn stream_events(
    State(core): State<Core>,
    Extension(readable): Extension<Readable>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> Result<Response, ApiError> {
    let asked: Vec<Topic> = match &q.topic {
        None => Topic::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<Topic>()
                    .map_err(|_| invalid("topic", unknown_topic(t)))
            })
            .collect::<Result<_, _>>()?,
    };
    let topics: Vec<Topic> = asked
        .iter()
        .copied()
        .filter(|t| readable.topics.contains(t))
        .collect();
    if topics.is_empty() {
        return Err(match (&readable.refusal, asked.is_empty()) {
            (_, true) | (None, false) => invalid(
                "topic",
                "no topic named; name some of command, container, server, environment".into(),
            ),
            // Anonymous: a 401 with a challenge, so that a client with credentials signs in.
            (Some(why), false) => {
                return Ok(crate::access::refuse(
                    &core,
                    why.clone(),
                    crate::access::quiet(&headers),
                ));
            }
        });
    }
    let object = q
        .object
        .as_deref()
        .map(|o| match o.split_once(':') {
            Some((t, _)) if t.parse::<Topic>().is_err() => {
                Err(format!("object '{o}': {}", unknown_topic(t)))
            }
            _ => EventFilter::parse_object(o),
        })
        .transpose()
        .map_err(|e| invalid("object", e))?;
    // One that does not exist and one the caller may not read are refused alike.
    let environment = match &q.environment {
        Some(env) => {
            let hidden = || {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("environment '{env}' does not exist in the projects you may read"),
                    Some("environment"),
                )
            };
            let id = match core.environments().get_by_id(env).await {
                Ok(e) => e.id.0,
                Err(cloud48_engine::CoreError::NotFound(_)) => return Err(hidden()),
                Err(e) => return Err(e.into()),
            };
            let owned = Owned::Environment(id.to_string());
            visible(&core, &readable, &owned, "environment")
                .await
                .map_err(|_| hidden())?;
            Some(id)
        }
        None => None,
    };
    // An object that does not exist, or that the caller may not read, is said so: a stream
    // for it would never tell anything.
    match object {
        Some((Topic::Container, id)) => {
            visible(&core, &readable, &Owned::Container(id), "object").await?;
        }
        Some((Topic::Environment, id)) => {
            let owned = Owned::Environment(id.to_string());
            visible(&core, &readable, &owned, "object").await?;
        }
        Some((Topic::Server, id)) => {
            core.servers().get(&id.to_string()).await?;
        }
        Some((Topic::Command, _)) | None => {}
    }
    // A caller limited to some projects sees theirs (and the servers'); `project` narrows.
    let projects = match &q.project {
        Some(p) => {
            let within = readable.scope.readable();
            Some(vec![
                cloud48_engine::projects::filter_within(core.db(), p, within.as_deref()).await?,
            ])
        }
        None => readable.scope.readable(),
    };
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|id| *id >= 0)
                .ok_or_else(|| {
                    invalid(
                        "Last-Event-ID",
                        "the Last-Event-ID header must be an event id (a number, 0 or more)".into(),
                    )
                })?,
        ),
        None => None,
    };
    let filter = EventFilter {
        topics,
        object,
        environment,
        fleet: q.project.is_none(),
        projects,
    };
    let messages = core
        .events()
        .subscribe(resume.or(q.after), filter)
        .map(|r| match r {
            Ok(Delivery::Ready(after)) => sse_message(Some(after), "ready", &after.to_string()),
            Ok(Delivery::Event(e)) => e.sse(),
            Err(e) => sse_message(
                None,
                "error",
                &format!("the event log could not be read: {e}"),
            ),
        });
    let messages = rechecked(core.clone(), who, readable, messages).take_until(core.closing());
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(batched(messages)),
    )
        .into_response())
}

/// Refuses (404) a filter on `object` when it does not exist or lies outside the projects
/// the caller may read.
async fn visible(
    core: &Core,
    readable: &Readable,
    object: &Owned,
    field: &str,
) -> Result<(), ApiError> {
    let project = cloud48_engine::projects::project_of(core.db(), object).await?;
    let seen = project.is_some_and(|p| readable.scope.readable().is_none_or(|r| r.contains(&p)));
    if seen {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{object} does not exist in the projects you may read"),
        Some(field),
    ))
}

/// How long a stream goes on delivering before the caller's rights are read again.
const RECHECK: Duration = Duration::from_secs(5);

/// `messages`, ended with an `error` message once the caller may no longer read all it could
/// when the stream opened (a project role or topic lost, the user removed; see `changed`):
/// checked before a delivery at most every `RECHECK`, so a revocation stops the stream within
/// that.
fn rechecked(
    core: Core,
    who: Principal,
    opened: Readable,
    messages: impl Stream<Item = Bytes> + Send + 'static,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let state = (Box::pin(messages), tokio::time::Instant::now(), false);
    futures::stream::unfold(state, move |(mut messages, mut checked, ended)| {
        let (core, who, opened) = (core.clone(), who.clone(), opened.clone());
        async move {
            if ended {
                return None;
            }
            let message = messages.next().await?;
            if checked.elapsed() >= RECHECK {
                checked = tokio::time::Instant::now();
                if let Some(why) = changed(&core, &who, &opened).await {
                    let end = sse_message(None, "error", &why);
                    return Some((end, (messages, checked, true)));
                }
            }
            Some((message, (messages, checked, false)))
        }
    })
}

/// Why the caller may no longer read all the stream shows it, if so: a topic or a project
/// lost, the user removed. Gaining rights changes nothing here (the stream shows what it
/// showed); a database that cannot be read now is asked again at the next check.
async fn changed(core: &Core, who: &Principal, opened: &Readable) -> Option<String> {
    let auth = core.auth();
    let now = match auth.current(who).await {
        Ok(Some(now)) => now,
        Ok(None) => return Some(format!("user '{}' no longer exists", who.audit_name())),
        Err(_) => return None,
    };
    let lost = "this caller may no longer read all this stream shows; open it again";
    let Ok(r) = readable(auth, &now).await else {
        return Some(lost.into());
    };
    let topics_kept = opened.topics.iter().all(|t| r.topics.contains(t));
    let projects_kept = match (opened.scope.readable(), r.scope.readable()) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(before), Some(now)) => before.iter().all(|p| now.contains(p)),
    };
    (!(topics_kept && projects_kept)).then(|| lost.into())
}

/// Messages sent in one chunk at most.
const BATCH: usize = 1024;
/// A comment is sent after this long without a message, to keep the connection open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The messages of `messages` in chunks of those ready at once (a burst is one write per
/// subscriber, not one per event), and a comment after `KEEP_ALIVE` of silence.
fn batched(
    messages: impl Stream<Item = Bytes> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let chunks = Box::pin(messages.ready_chunks(BATCH));
    futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = match tokio::time::timeout(KEEP_ALIVE, chunks.next()).await {
            Err(_) => Bytes::from_static(b":\n\n"),
            Ok(None) => return None,
            Ok(Some(mut one)) if one.len() == 1 => one.pop().unwrap_or_default(),
            Ok(Some(many)) => {
                let mut out = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
                for m in many {
                    out.extend_from_slice(&m);
                }
                out.freeze()
            }
        };
        Some((Ok(chunk), chunks))
    })
}
