//! Constructors and builders of the SDK's types, and the readers hooks use on a `Context`.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::{
    Action, AddRequest, Check, Context, Endpoint, ExecRequest, HookError, Image, Member, Metadata,
    Outcome, ParamKind, ParamSpec, Placement, Protocol, Readiness, Resources, Verdict, Volume,
    WIT_VERSION, Workload, type_name,
};

impl Metadata {
    /// Metadata for the current WIT version, with no workload and no parameters.
    pub fn new(name: &str, version: &str, priority: i32, requirements: Resources) -> Self {
        Metadata {
            name: name.into(),
            version: version.into(),
            wit_version: WIT_VERSION.into(),
            priority,
            requirements,
            placement: Placement::default(),
            description: String::new(),
            workload: Workload::default(),
            params: Vec::new(),
        }
    }
    /// With a one-line description.
    pub fn described(mut self, description: &str) -> Self {
        self.description = description.into();
        self
    }
    /// With what runs inside.
    pub fn with_workload(mut self, workload: Workload) -> Self {
        self.workload = workload;
        self
    }
    /// New containers of this type avoid servers that run a member of the same type in their
    /// environment (anti-affinity), unless the user asks otherwise.
    pub fn spread(mut self) -> Self {
        self.placement.spread = true;
        self
    }
    /// New containers of this type go only to servers with this label.
    pub fn on_label(mut self, label: &str) -> Self {
        self.placement.labels.push(label.into());
        self
    }
    /// With one more parameter.
    pub fn with_param(mut self, param: ParamSpec) -> Self {
        self.params.push(param);
        self
    }
}

impl Workload {
    /// A workload running `command` (program and arguments).
    pub fn command<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        Workload {
            command: command.into_iter().map(Into::into).collect(),
            ..Workload::default()
        }
    }
    /// From this image (`sha256:...` digest, or none for the newest the core holds).
    pub fn from_image(mut self, reference: &str, digest: Option<&str>) -> Self {
        self.image = Some(Image {
            reference: reference.into(),
            digest: digest.map(Into::into),
        });
        self
    }
    /// With an environment variable (`${param}` in the value is filled in).
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
    /// In this working directory.
    pub fn in_dir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.into());
        self
    }
    /// Listening on `port` as endpoint `name`.
    pub fn with_endpoint(mut self, name: &str, port: u16, protocol: Protocol) -> Self {
        self.endpoints.push(Endpoint {
            name: name.into(),
            port,
            protocol,
        });
        self
    }
    /// Ready when `check` passes (every 200 ms, up to 150 attempts).
    pub fn ready_when(mut self, check: Check) -> Self {
        self.readiness = Some(Readiness {
            check,
            interval_ms: 200,
            retries: 150,
        });
        self
    }
    /// With `path` as the container's own volume `name`.
    pub fn with_volume(mut self, name: &str, path: &str) -> Self {
        self.volumes.push(Volume {
            name: name.into(),
            path: path.into(),
        });
        self
    }
}

impl ParamSpec {
    fn new(name: &str, kind: ParamKind, default: Option<String>, description: &str) -> Self {
        ParamSpec {
            name: name.into(),
            kind,
            default,
            description: description.into(),
            settable: false,
        }
    }
    /// A text parameter with a default.
    pub fn text(name: &str, default: &str, description: &str) -> Self {
        Self::new(name, ParamKind::Text, Some(default.into()), description)
    }
    /// An integer parameter with a default.
    pub fn integer(name: &str, default: i64, description: &str) -> Self {
        Self::new(
            name,
            ParamKind::Integer,
            Some(default.to_string()),
            description,
        )
    }
    /// A boolean parameter with a default.
    pub fn boolean(name: &str, default: bool, description: &str) -> Self {
        Self::new(
            name,
            ParamKind::Boolean,
            Some(default.to_string()),
            description,
        )
    }
    /// A parameter of `kind` that must be given.
    pub fn required(name: &str, kind: ParamKind, description: &str) -> Self {
        Self::new(name, kind, None, description)
    }
    /// Other members' hooks may change it (`Action::set_params`).
    pub fn settable(mut self) -> Self {
        self.settable = true;
        self
    }
}

impl Resources {
    /// CPU in thousandths of a core, memory and disk in MiB.
    pub fn new(cpu_millis: u64, memory_mb: u64, disk_mb: u64) -> Self {
        Resources {
            cpu_millis,
            memory_mb,
            disk_mb,
        }
    }
}

impl Outcome {
    /// Allow, no actions, state unchanged.
    pub fn allow() -> Self {
        Outcome {
            verdict: Verdict::Allow,
            actions: Vec::new(),
            new_state: None,
        }
    }
    /// Deny with a reason the user sees.
    pub fn deny(reason: impl Into<String>) -> Self {
        Outcome {
            verdict: Verdict::Deny(reason.into()),
            actions: Vec::new(),
            new_state: None,
        }
    }
    /// Adds an action.
    pub fn with_action(mut self, action: Action) -> Self {
        self.actions.push(action);
        self
    }
    /// Sets a new state blob.
    pub fn with_state(mut self, state: Vec<u8>) -> Self {
        self.new_state = Some(state);
        self
    }
    /// Sets a new state serialized as JSON.
    pub fn with_json_state<T: serde::Serialize>(self, state: &T) -> Self {
        self.with_state(serde_json::to_vec(state).expect("state serializes"))
    }
}

impl HookError {
    /// A failure retrying does not cure: the command fails with `message`.
    pub fn fail(message: impl Into<String>) -> Self {
        HookError {
            message: message.into(),
            retryable: false,
        }
    }
    /// A failure that may pass later: the core retries the step with backoff.
    pub fn retry(message: impl Into<String>) -> Self {
        HookError {
            message: message.into(),
            retryable: true,
        }
    }
}

impl Action {
    /// Run `script` with `args` in container `container`.
    pub fn exec(container: i64, script: &str, args: &[&str]) -> Action {
        Action::Exec(ExecRequest {
            container,
            script: script.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            tag: None,
        })
    }
    /// Run `script` and deliver its result to this container's `after_exec` under `tag`.
    pub fn exec_tagged(container: i64, script: &str, args: &[&str], tag: &str) -> Action {
        Action::Exec(ExecRequest {
            container,
            script: script.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            tag: Some(tag.into()),
        })
    }
    /// Add a container of `type_name` with its defaults before going on.
    pub fn add(type_name: &str) -> Action {
        Action::AddContainer(AddRequest::of(type_name))
    }
    /// Change parameters of member `container` (settable ones only).
    pub fn set_params(container: i64, params: &[(&str, &str)]) -> Action {
        Action::SetParams {
            container,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

impl AddRequest {
    /// A container of `type_name` with its defaults, anywhere.
    pub fn of(type_name: &str) -> Self {
        AddRequest {
            type_id: type_name.into(),
            params: BTreeMap::new(),
            resources: None,
            placement: Placement::default(),
        }
    }
    /// With a parameter.
    pub fn param(mut self, name: &str, value: impl ToString) -> Self {
        self.params.insert(name.into(), value.to_string());
        self
    }
    /// With these resources instead of the type's defaults.
    pub fn resources(mut self, r: Resources) -> Self {
        self.resources = Some(r);
        self
    }
    /// Not on a server that runs a member of the same type in this environment.
    pub fn spread(mut self) -> Self {
        self.placement.spread = true;
        self
    }
    /// Not on server `name`.
    pub fn avoid(mut self, server: &str) -> Self {
        self.placement.avoid_servers.push(server.into());
        self
    }
    /// As an action.
    pub fn action(self) -> Action {
        Action::AddContainer(self)
    }
}

impl From<AddRequest> for Action {
    fn from(r: AddRequest) -> Self {
        Action::AddContainer(r)
    }
}

impl Member {
    /// The port of endpoint `name`, if its type declares it.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.port)
    }
    /// `ip:port` of endpoint `name`, once the member has an address.
    pub fn address(&self, endpoint: &str) -> Option<String> {
        Some(format!("{}:{}", self.ip.as_ref()?, self.port(endpoint)?))
    }
    /// Its parameter `name`, parsed.
    pub fn param<T: FromStr>(&self, name: &str) -> Result<T, HookError> {
        let raw = self.params.get(name).ok_or_else(|| {
            HookError::fail(format!(
                "container {} ({}) has no parameter '{name}'",
                self.id, self.type_id
            ))
        })?;
        raw.parse().map_err(|_| {
            HookError::fail(format!(
                "parameter '{name}' of container {} is '{raw}', which does not parse as {}",
                self.id,
                std::any::type_name::<T>()
            ))
        })
    }
}

impl Context {
    /// Members whose type name (before `@`) is `name`.
    pub fn members_of_type<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.environment
            .members
            .iter()
            .filter(move |m| type_name(&m.type_id) == name)
    }
    /// The container's own parameter `name`, parsed (`?` turns a missing or malformed one into
    /// the hook's error).
    pub fn param<T: FromStr>(&self, name: &str) -> Result<T, HookError> {
        self.container.param(name)
    }
    /// The environment's parameter `name`.
    pub fn environment_param(&self, name: &str) -> Option<&str> {
        self.environment.params.get(name).map(String::as_str)
    }
    /// The state parsed as JSON, or `T::default()` when empty or unreadable.
    pub fn json_state<T: serde::de::DeserializeOwned + Default>(&self) -> T {
        serde_json::from_slice(&self.state).unwrap_or_default()
    }
}
