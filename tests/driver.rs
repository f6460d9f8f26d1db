//! The driver conformance suite on every driver, and the sim driver's own features.

use std::time::Duration;

use cloud48_engine::driver::conformance::{self, DriverFactory};
use cloud48_engine::driver::sim::{SimLatency, SimServer};
use cloud48_engine::driver::{Driver, DriverError, GuestSpec, GuestState};
use cloud48_engine::model::Resources;

struct SimFactory;

fn capacity() -> Resources {
    Resources {
        cpu_millis: 4000,
        memory_mb: 4096,
        disk_mb: 10_000,
    }
}

impl DriverFactory for SimFactory {
    type Driver = SimServer;
    async fn make(&self, n: u32) -> SimServer {
        SimServer::new(
            &format!("conf-{n}"),
            n + 1,
            capacity(),
            SimLatency::default(),
        )
    }
}

fn spec(id: &str) -> GuestSpec {
    GuestSpec {
        avoid: Vec::new(),
        guest_id: id.into(),
        type_id: "plain".into(),
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 100,
            disk_mb: 100,
        },
        ip: None,
        workload: Default::default(),
    }
}

#[tokio::test]
async fn sim_driver_passes_the_conformance_suite() {
    let failures = conformance::run(&SimFactory).await;
    assert!(failures.is_empty(), "conformance failures: {failures:#?}");
}

#[tokio::test]
async fn conformance_suite_catches_a_driver_that_is_not_idempotent() {
    /// A sim wrapper whose create refuses existing guests: the suite must notice.
    struct Strict(SimServer);
    #[async_trait::async_trait]
    impl Driver for Strict {
        fn kind(&self) -> &'static str {
            "strict"
        }
        fn capabilities(&self) -> cloud48_engine::driver::Capabilities {
            self.0.capabilities()
        }
        async fn create(
            &self,
            s: &GuestSpec,
        ) -> Result<cloud48_engine::driver::GuestInfo, DriverError> {
            if self.0.status(&s.guest_id).await?.is_some() {
                return Err(DriverError::Permanent("exists".into()));
            }
            self.0.create(s).await
        }
        async fn start(&self, g: &str) -> Result<(), DriverError> {
            self.0.start(g).await
        }
        async fn stop(&self, g: &str) -> Result<(), DriverError> {
            self.0.stop(g).await
        }
        async fn suspend(&self, g: &str) -> Result<(), DriverError> {
            self.0.suspend(g).await
        }
        async fn resume(&self, g: &str) -> Result<(), DriverError> {
            self.0.resume(g).await
        }
        async fn reboot(&self, g: &str) -> Result<(), DriverError> {
            self.0.reboot(g).await
        }
        async fn destroy(&self, g: &str) -> Result<(), DriverError> {
            self.0.destroy(g).await
        }
        async fn update(&self, g: &str, r: &Resources) -> Result<(), DriverError> {
            self.0.update(g, r).await
        }
        async fn export(&self, g: &str) -> Result<cloud48_engine::driver::GuestImage, DriverError> {
            self.0.export(g).await
        }
        async fn import(
            &self,
            s: &GuestSpec,
            i: &cloud48_engine::driver::GuestImage,
        ) -> Result<cloud48_engine::driver::GuestInfo, DriverError> {
            self.0.import(s, i).await
        }
        async fn exec(
            &self,
            g: &str,
            s: &str,
            a: &[String],
        ) -> Result<cloud48_engine::driver::ExecOutput, DriverError> {
            self.0.exec(g, s, a).await
        }
        async fn status(
            &self,
            g: &str,
        ) -> Result<Option<cloud48_engine::driver::GuestInfo>, DriverError> {
            self.0.status(g).await
        }
        async fn list(&self) -> Result<Vec<cloud48_engine::driver::GuestInfo>, DriverError> {
            self.0.list().await
        }
        async fn stats(&self) -> Result<cloud48_engine::driver::ServerStats, DriverError> {
            self.0.stats().await
        }
    }
    struct StrictFactory;
    impl DriverFactory for StrictFactory {
        type Driver = Strict;
        async fn make(&self, n: u32) -> Strict {
            Strict(SimServer::new(
                "strict",
                n + 1,
                capacity(),
                SimLatency::default(),
            ))
        }
    }
    let failures = conformance::run(&StrictFactory).await;
    assert!(
        failures.iter().any(|f| f.starts_with("lifecycle")),
        "the suite must report the non-idempotent create, got {failures:?}"
    );
}

#[tokio::test]
async fn sim_crash_makes_the_server_unreachable_until_it_recovers() {
    let sim = SimServer::new("s", 1, capacity(), SimLatency::default());
    sim.create(&spec("g")).await.unwrap();
    sim.crash();
    let err = sim.start("g").await.unwrap_err();
    assert!(matches!(err, DriverError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    sim.recover();
    sim.start("g").await.unwrap();
    assert_eq!(sim.guest("g").unwrap().info.state, GuestState::Running);
}

#[tokio::test]
async fn sim_injected_failures_hit_only_the_named_operation_and_count_down() {
    let sim = SimServer::new("s", 1, capacity(), SimLatency::default());
    sim.create(&spec("g")).await.unwrap();
    sim.fail_next("start", 2, DriverError::Transient("flaky".into()));
    sim.stop("g").await.unwrap();
    assert_eq!(
        sim.start("g").await,
        Err(DriverError::Transient("flaky".into()))
    );
    assert_eq!(
        sim.start("g").await,
        Err(DriverError::Transient("flaky".into()))
    );
    sim.start("g").await.unwrap();
    assert_eq!(sim.guest("g").unwrap().operations, vec!["create", "start"]);
}

#[tokio::test]
async fn sim_records_exec_scripts_and_assigns_distinct_ips() {
    let sim = SimServer::new("s", 7, capacity(), SimLatency::default());
    let a = sim.create(&spec("a")).await.unwrap();
    let b = sim.create(&spec("b")).await.unwrap();
    assert_ne!(a.ip, b.ip);
    sim.start("a").await.unwrap();
    sim.exec("a", "nginx -s reload", &["x".into()])
        .await
        .unwrap();
    let g = sim.guest("a").unwrap();
    assert_eq!(g.execs.len(), 1);
    assert_eq!(g.execs[0].script, "nginx -s reload");
    assert_eq!(g.execs[0].args, vec!["x".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn sim_latency_is_applied_per_operation() {
    let mut latency = SimLatency::uniform(Duration::from_millis(10));
    latency
        .per_operation
        .insert("create".into(), Duration::from_secs(5));
    let sim = SimServer::new("s", 1, capacity(), latency);
    let t0 = tokio::time::Instant::now();
    sim.create(&spec("g")).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    let t1 = tokio::time::Instant::now();
    sim.start("g").await.unwrap();
    assert_eq!(t1.elapsed(), Duration::from_millis(10));
}

#[tokio::test]
async fn sim_state_file_survives_a_restart_and_corruption_is_an_error() {
    let dir = crate::common::tempdir();
    let path = dir.path().join("s.json");
    {
        let sim = SimServer::new("s", 1, capacity(), SimLatency::default())
            .with_state_file(path.clone())
            .unwrap();
        sim.create(&spec("g")).await.unwrap();
        sim.start("g").await.unwrap();
    }
    let sim = SimServer::new("s", 1, capacity(), SimLatency::default())
        .with_state_file(path.clone())
        .unwrap();
    assert_eq!(sim.guest("g").unwrap().info.state, GuestState::Running);
    std::fs::write(&path, b"{not json").unwrap();
    let err = SimServer::new("s", 1, capacity(), SimLatency::default())
        .with_state_file(path)
        .err()
        .expect("a corrupt state file is refused");
    assert!(err.to_string().contains("corrupt sim state"), "{err}");
}
