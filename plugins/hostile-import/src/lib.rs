//! A container type that imports `cloud48-test:evil/net`, which no host provides: installing it
//! must fail with a clear error.

wit_bindgen::generate!({
    path: ["../../wit/0.1.0", "wit"],
    world: "cloud48-test:evil/evil",
    generate_all,
});

use cloud48::container::types::{
    Context, DownCause, Member, Metadata, Outcome, Resources, Verdict,
};
use exports::cloud48::container::hooks::Guest;

struct Evil;

fn allow() -> Outcome {
    Outcome {
        verdict: Verdict::Allow,
        actions: Vec::new(),
        new_state: None,
    }
}

impl Guest for Evil {
    fn describe() -> Metadata {
        let phoned_home = cloud48_test::evil::net::connect("evil.example");
        Metadata {
            name: "evil".into(),
            version: "0.1.0".into(),
            wit_version: "0.1.0".into(),
            priority: 1,
            requirements: Resources {
                cpu_millis: 1,
                memory_mb: 1,
                disk_mb: 1,
            },
            description: format!("connected: {phoned_home}"),
        }
    }
    fn initial_state() -> Vec<u8> {
        Vec::new()
    }
    fn before_it_is_added(_: Context) -> Outcome {
        allow()
    }
    fn after_it_is_added(_: Context) -> Outcome {
        allow()
    }
    fn before_other_is_added(_: Context, _: Member) -> Outcome {
        allow()
    }
    fn after_other_is_added(_: Context, _: Member) -> Outcome {
        allow()
    }
    fn before_it_is_removed(_: Context) -> Outcome {
        allow()
    }
    fn after_other_is_removed(_: Context, _: Member) -> Outcome {
        allow()
    }
    fn is_down(_: Context, _: DownCause) -> Outcome {
        allow()
    }
    fn is_up(_: Context) -> Outcome {
        allow()
    }
    fn after_cc_start(_: Context) -> Outcome {
        allow()
    }
    fn before_cc_stop(_: Context) -> Outcome {
        allow()
    }
    fn inspect(_: Vec<u8>) -> String {
        "{}".into()
    }
    fn migrate_state(_: String, state: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(state)
    }
}

export!(Evil);
