//! Upgrades on the fake platform: a newer version of a type takes over its containers, with
//! their states converted by its `migrate_state`, all or none (as `plugin.upgrade` in the core).

use super::{Hooks, NativeHooks, Platform};
use crate::{ContainerType, Context, Metadata};

impl Platform<NativeHooks> {
    /// Upgrades a type to `T` as `cloud48 plugin upgrade` does: `T`'s `migrate_state` converts
    /// the state of every container of the old version, in every environment (each seeing its
    /// environment); all move or, at the first refusal (returned, naming the container), none
    /// and the old version stays. Returns how many moved.
    pub fn upgrade<T: ContainerType + 'static>(&mut self) -> Result<usize, String> {
        let meta = ContainerType::metadata(&T::default());
        let previous = self.hooks.insert::<T>();
        let from = previous
            .as_ref()
            .map(|t| t.metadata().version)
            .unwrap_or_default();
        let result =
            self.migrate_members(&meta, |hooks, ctx| hooks.migrate(&meta.name, &from, ctx));
        if result.is_err() {
            // All or nothing: the old version stays installed.
            self.hooks.put_back(&meta.name, previous);
        }
        result
    }
}

impl<H: Hooks> Platform<H> {
    /// Moves every member of `meta.name` (in every environment) to `meta`'s version, with the
    /// states `convert` returns; all or none.
    pub fn migrate_members(
        &mut self,
        meta: &Metadata,
        mut convert: impl FnMut(&H, &Context) -> Result<Vec<u8>, String>,
    ) -> Result<usize, String> {
        let current = self.env.1.clone();
        let mut names: Vec<String> = self.parked.iter().map(|e| e.1.clone()).collect();
        names.push(current.clone());
        let mut converted = Vec::new();
        for name in &names {
            self.use_environment(name);
            for m in self.members() {
                if crate::type_name(&m.type_id) != meta.name {
                    continue;
                }
                let ctx = self.context(m.id, None);
                match upgraded_params(meta, &m.params)
                    .and_then(|params| Ok((convert(&self.hooks, &ctx)?, params)))
                {
                    Ok((state, params)) => converted.push((name.clone(), m.id, state, params)),
                    Err(reason) => {
                        self.use_environment(&current);
                        return Err(format!(
                            "container {} ({}) cannot move to {}: {reason}",
                            m.id, m.type_id, meta.version
                        ));
                    }
                }
            }
        }
        let type_id = format!("{}@{}", meta.name, meta.version);
        let count = converted.len();
        for (name, id, state, params) in converted {
            self.use_environment(&name);
            if let Some(slot) = self.members.iter_mut().find(|s| s.member.id == id) {
                slot.member.type_id = type_id.clone();
                slot.member.params = params;
                slot.state = state;
            }
        }
        self.use_environment(&current);
        Ok(count)
    }
}

/// A member's parameters under `meta`, as the core gives them on an upgrade: its values of
/// those still declared, the defaults of new ones, none of those no longer declared; a new
/// parameter without a default is refused.
fn upgraded_params(
    meta: &Metadata,
    current: &std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    meta.params
        .iter()
        .map(|s| match current.get(&s.name).or(s.default.as_ref()) {
            Some(v) => Ok((s.name.clone(), v.clone())),
            None => Err(format!(
                "the new version requires parameter '{}' ({}), which containers made before it \
                 do not have: give it a default in the new version",
                s.name, s.description
            )),
        })
        .collect()
}
