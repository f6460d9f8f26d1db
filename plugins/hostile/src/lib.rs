//! A container type that misbehaves on purpose, for the plugin host's sandbox tests. What it does
//! in `before-it-is-added` depends on the environment's name:
//! `loop` spins forever, `bomb` allocates until memory runs out, `trap` logs a line and panics,
//! `huge` returns a 2 MiB state, `spam` asks for 10,000 actions, `fail` (after logging a line)
//! and `retry` return a hook error, `chatty`
//! logs 1,000 lines, `random` keeps 8 random bytes as its state (so the plugin imports WASI's
//! randomness, and the host runs each of its calls afresh); anything else is allowed. In an
//! environment named `stray`, `after-it-is-added` asks to remove a container that is no member.
//! Built with `HOSTILE_WIT=x.y.z` it claims that WIT version (to test install refusals); built with
//! `HOSTILE_VERSION=x.y.z` it is that version and migrates states by prefixing `from->to:`,
//! except in an environment named `keep`, whose containers it refuses to migrate. Built with
//! `HOSTILE_PARAMS=default` it declares parameter `size` (default 64), with `=required` a
//! parameter `needed` without a default (to test what an upgrade gives existing containers);
//! built with `HOSTILE_INITIAL=trap` its `initial-state` panics, with `=huge` it returns 2 MiB.

use cloud48_sdk::*;

/// The hostile type.
#[derive(Default)]
pub struct Hostile;

impl ContainerType for Hostile {
    fn metadata(&self) -> Metadata {
        let version = option_env!("HOSTILE_VERSION").unwrap_or("0.1.0");
        let mut m = Metadata::new("hostile", version, 99, Resources::new(100, 64, 64));
        if let Some(w) = option_env!("HOSTILE_WIT") {
            m.wit_version = w.into();
        }
        match option_env!("HOSTILE_PARAMS") {
            Some("default") => m = m.with_param(ParamSpec::integer("size", 64, "a size")),
            Some("required") => {
                m = m.with_param(ParamSpec::required(
                    "needed",
                    ParamKind::Text,
                    "a value without a default",
                ))
            }
            _ => {}
        }
        m.described("misbehaves on purpose")
    }

    fn initial_state(&self) -> Vec<u8> {
        match option_env!("HOSTILE_INITIAL") {
            Some("trap") => panic!("hostile initial-state panics on purpose"),
            Some("huge") => vec![7u8; 2 << 20],
            _ => b"v0".to_vec(),
        }
    }

    fn migrate_state(&self, from_version: &str, ctx: &Context) -> Result<Vec<u8>, String> {
        if ctx.environment.name == "keep" {
            return Err(format!(
                "containers of environment '{}' keep their version",
                ctx.environment.name
            ));
        }
        let to = option_env!("HOSTILE_VERSION").unwrap_or("0.1.0");
        let mut out = format!("{from_version}->{to}:").into_bytes();
        out.extend(&ctx.state);
        Ok(out)
    }

    fn before_it_is_added(&self, ctx: &Context) -> HookResult {
        match ctx.environment.name.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => {
                log(Level::Warn, "about to panic");
                panic!("hostile plugin panics on purpose")
            }
            "random" => {
                use std::hash::{BuildHasher, Hasher};
                let seed = std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish();
                Ok(Outcome::allow().with_state(seed.to_le_bytes().to_vec()))
            }
            "huge" => Ok(Outcome::allow().with_state(vec![7u8; 2 << 20])),
            "fail" => {
                log(Level::Error, "no licence key");
                Err(HookError::fail("hostile plugin refuses to work"))
            }
            "retry" => Err(HookError::retry("hostile plugin asks to be retried")),
            "chatty" => {
                for i in 0..1000 {
                    log(Level::Info, format!("line {i}"));
                }
                Ok(Outcome::allow())
            }
            "spam" => {
                let mut o = Outcome::allow();
                for _ in 0..10_000 {
                    o = o.with_action(Action::add("hostile"));
                }
                Ok(o)
            }
            _ => Ok(Outcome::allow()),
        }
    }

    /// In an environment named `stray`, once added, asks for what the core refuses: the
    /// removal of a container that is no member.
    fn after_it_is_added(&self, ctx: &Context) -> HookResult {
        if ctx.environment.name == "stray" {
            return Ok(Outcome::allow().with_action(Action::RemoveContainer(999_999)));
        }
        Ok(Outcome::allow())
    }
}

export_container_type!(Hostile);
