//! Several environments on the fake platform: the current one and the parked others.

use std::collections::BTreeMap;

use super::{Hooks, Platform};

impl<H: Hooks> Platform<H> {
    /// Makes `name` the environment later calls act on, creating it (empty) the first time.
    /// Hooks only ever see their own environment's members; ids are unique on the platform.
    pub fn use_environment(&mut self, name: &str) {
        if self.env.1 == name {
            return;
        }
        let next = match self.parked.iter().position(|(_, n, _, _)| n == name) {
            Some(i) => self.parked.remove(i),
            None => {
                let id = self
                    .parked
                    .iter()
                    .map(|e| e.0)
                    .max()
                    .unwrap_or(0)
                    .max(self.env.0)
                    + 1;
                (id, name.to_string(), BTreeMap::new(), Vec::new())
            }
        };
        let members = std::mem::replace(&mut self.members, next.3);
        let params = std::mem::replace(&mut self.env_params, next.2);
        let (id, name) = std::mem::replace(&mut self.env, (next.0, next.1));
        self.parked.push((id, name, params, members));
    }

    /// The current environment's name.
    pub fn environment(&self) -> &str {
        &self.env.1
    }

    /// Runs `f` in each environment in turn (by id), then comes back to the current one: for
    /// events of the whole platform (a server crash, the core starting).
    pub(super) fn in_every_environment(
        &mut self,
        mut f: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        let current = self.env.1.clone();
        let mut all: Vec<(i64, String)> = self
            .parked
            .iter()
            .map(|(id, n, _, _)| (*id, n.clone()))
            .chain([self.env.clone()])
            .collect();
        all.sort();
        let mut result = Ok(());
        for (_, name) in all {
            self.use_environment(&name);
            result = f(self);
            if result.is_err() {
                break;
            }
        }
        self.use_environment(&current);
        result
    }
}
