//! A loaded plugin as a container type: each hook a call on a fresh instance.

use super::*;

impl ContainerType for WasmPlugin {
    fn type_id(&self) -> &str {
        &self.type_id
    }

    fn priority(&self) -> i32 {
        self.meta.priority
    }

    fn default_requirements(&self) -> Requirements {
        self.meta.requirements.clone()
    }

    fn initial_state(&self) -> Result<Vec<u8>, TypeError> {
        // Called for every new container: a deterministic plugin's answer (it takes no input)
        // is the same every time, so it is asked once.
        if let Some(state) = self.initial.get() {
            return Ok(state.clone());
        }
        let raw = matches!(self.pre, Pre::V0_2_0(..));
        self.call_logged("initial-state", Params::new(), raw, |b, s| {
            match (b, &self.pre) {
                (Bindings::V0_1_0(b), _) => b.cloud48_container_hooks().call_initial_state(s),
                // SAFETY: `hooks` were found in this plugin's component, whose
                // `ContainerTypePre::new` in `load` type-checked its `initial-state`.
                (Bindings::Raw(instance), Pre::V0_2_0(_, hooks)) => unsafe {
                    v0_2_0::call_initial_state(instance, s, hooks)
                },
                _ => unreachable!("0.2.0 plugins run initial-state on raw instances"),
            }
        })
        .and_then(|(state, _)| {
            self.check_state("initial-state", &state)?;
            if self.deterministic {
                let _ = self.initial.set(state.clone());
            }
            Ok(state)
        })
    }

    fn workload(&self) -> Workload {
        self.meta.workload.clone()
    }

    fn endpoints(&self) -> Vec<cloud48_model::Endpoint> {
        self.meta.workload.endpoints.clone()
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        self.meta.params.clone()
    }

    fn handle(&self, hook: &Hook, ctx: &HookContext<'_>) -> Result<HookOutcome, TypeError> {
        let name = hook.name();
        let env_params = ctx.environment.params.clone();
        let (returned, logs) = match &self.pre {
            Pre::V0_1_0(_) => {
                let c = v0_1_0::context(ctx);
                self.call_logged(name, env_params, false, |b, s| match b {
                    Bindings::V0_1_0(b) => Ok(v0_1_0::call_hook(b, s, hook, &c)?
                        .map(v0_1_0::outcome)
                        .map(Ok)),
                    _ => unreachable!("instantiated from its own Pre"),
                })?
            }
            Pre::V0_2_0(_, hooks) => {
                let c = v0_2_0::context(ctx);
                self.call_logged(name, env_params, true, |b, s| {
                    let Bindings::Raw(instance) = b else {
                        unreachable!("hooks of 0.2.0 run on raw instances")
                    };
                    // SAFETY: `hooks` were found in this plugin's component, and `load`
                    // type-checked each of them against the types `call_hook` uses
                    // (`check_hooks`) before this plugin could be called.
                    let returned = unsafe { v0_2_0::call_hook(instance, s, hooks, hook, &c)? };
                    Ok(Some(
                        returned.map(v0_2_0::outcome).map_err(v0_2_0::hook_error),
                    ))
                })?
            }
        };
        let Some(returned) = returned else {
            return Ok(HookOutcome {
                logs,
                ..HookOutcome::allow()
            });
        };
        match self.checked(name, returned) {
            Ok(outcome) => Ok(HookOutcome { logs, ..outcome }),
            // What the hook logged before it failed goes with the failure.
            Err(e) => Err(TypeError { logs, ..e }),
        }
    }

    fn inspect(&self, state: &[u8]) -> Result<serde_json::Value, TypeError> {
        let text = self.call("inspect", Params::new(), |b, s| match b {
            Bindings::V0_1_0(b) => b.cloud48_container_hooks().call_inspect(s, state),
            Bindings::V0_2_0(b) => b.cloud48_container_hooks().call_inspect(s, state),
            Bindings::Raw(_) => unreachable!("raw instances only run hooks and initial-state"),
        })?;
        if text.len() > self.host.limits.max_output {
            return Err(self.error(
                "inspect",
                format!(
                    "returned {} bytes (limit {})",
                    text.len(),
                    self.host.limits.max_output
                ),
            ));
        }
        serde_json::from_str(&text)
            .map_err(|e| self.error("inspect", format!("returned invalid JSON: {e}")))
    }
}

/// What a hook returned: its verdict, actions and new state, or its own error (message, and
/// whether a retry may succeed).
type Returned = Result<(Verdict, Vec<HookAction>, Option<Vec<u8>>), (String, bool)>;

impl WasmPlugin {
    /// Checks what hook `name` returned against the limits: its own error, an oversized state,
    /// too many actions or an oversized exec request fail the call (the outcome's lines are
    /// the caller's to add).
    fn checked(&self, name: &str, returned: Returned) -> Result<HookOutcome, TypeError> {
        let (verdict, actions, new_state) = returned.map_err(|(message, retryable)| TypeError {
            retryable,
            ..self.error(name, format!("failed: {}", clip(&message, 1000)))
        })?;
        let limits = &self.host.limits;
        if let Some(s) = &new_state {
            self.check_state(name, s)?;
        }
        if actions.len() > limits.max_actions {
            return Err(self.error(
                name,
                format!(
                    "returned {} actions (limit {})",
                    actions.len(),
                    limits.max_actions
                ),
            ));
        }
        for a in &actions {
            if let HookAction::Exec { script, args, .. } = a {
                let size = script.len() + args.iter().map(String::len).sum::<usize>();
                if size > limits.max_output {
                    return Err(self.oversized(name, "an exec request", size));
                }
            }
        }
        let verdict = match verdict {
            Verdict::Deny(r) => Verdict::Deny(clip(&r, 1000)),
            allow => allow,
        };
        Ok(HookOutcome {
            verdict,
            actions,
            new_state,
            logs: Vec::new(),
        })
    }
}
