//! The agent's spool and export routes against a simulated server.

use super::*;
use cloud48_driver::sim::{SimLatency, SimServer};
use cloud48_driver::{GuestImage, GuestSpec};
use cloud48_model::Resources;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "a-token-of-at-least-some-length";

/// An agent over a sim server holding a stopped guest `g` whose disk is `disk`, exported;
/// returns its URL, the export id, the agent and the directory of its spool (removed when
/// dropped).
async fn exported(disk: &[u8]) -> (String, String, Arc<AgentService>, tempfile::TempDir) {
    let sim = SimServer::new(
        "s1",
        1,
        Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
            disk_mb: 1024,
        },
        SimLatency::uniform(std::time::Duration::ZERO),
    );
    let spec = GuestSpec {
        avoid: Vec::new(),
        guest_id: "g".into(),
        type_id: "plain".into(),
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 64,
            disk_mb: 64,
        },
        ip: None,
        workload: Default::default(),
    };
    let image = GuestImage {
        type_id: "plain".into(),
        data: disk.to_vec(),
    };
    sim.import(&spec, &image).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let info = AgentInfo {
        name: "s1".into(),
        url: url.clone(),
        driver: "sim".into(),
        capabilities: sim.capabilities(),
        labels: vec![],
        subnet: None,
        addresses: None,
        heartbeats: None,
        id: None,
        take_over: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentService::new(Arc::new(sim), TOKEN, info, &dir.path().join("spool")).unwrap();
    let progress: Progress = Arc::default();
    let OpOutput::Export { export, bytes } = agent.export_guest("g", &progress).await.unwrap()
    else {
        panic!("an export was expected");
    };
    assert_eq!(bytes, disk.len() as u64);
    let router = agent.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, export, agent, dir)
}

/// A proxy to `upstream` that cuts its first connection after `cut` bytes of the answer;
/// returns its URL and the count of connections.
async fn cutting_proxy(upstream: &str, cut: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let mut server = TcpStream::connect(&upstream).await.unwrap();
            tokio::spawn(async move {
                if n > 0 {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut sent = 0;
                    let mut buf = vec![0u8; 8192];
                    while sent < cut {
                        let n = sr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        let n = n.min(cut - sent);
                        cw.write_all(&buf[..n]).await.unwrap();
                        sent += n;
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    (url, count)
}

#[tokio::test]
async fn a_pull_cut_off_resumes_where_it_stopped_and_gets_every_byte() {
    let disk: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let (url, export, _agent, dir) = exported(&disk).await;
    let (proxy, connections) = cutting_proxy(&url, 1 << 20).await;
    let to = dir.path().join("pulled");
    let mut heard = 0;
    let size = crate::remote::pull_export(
        &reqwest::Client::new(),
        &proxy,
        &export,
        TOKEN,
        &to,
        |got, _| heard = got,
    )
    .await
    .unwrap();
    assert_eq!(size, disk.len() as u64);
    assert_eq!(heard, size, "progress heard the last byte");
    assert!(std::fs::read(&to).unwrap() == disk, "every byte, in order");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one cut connection, one resumed"
    );
    let _ = std::fs::remove_file(&to);
}

#[tokio::test]
async fn an_export_answers_ranges_and_refuses_one_past_its_end() {
    let disk = b"0123456789".repeat(100);
    let (url, export, _agent, _dir) = exported(&disk).await;
    let client = reqwest::Client::new();
    let get = |range: &str| {
        client
            .get(format!("{url}/v1/exports/{export}"))
            .bearer_auth(TOKEN)
            .header(header::RANGE, range)
            .send()
    };
    let tail = get("bytes=990-").await.unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.headers()[header::CONTENT_RANGE], "bytes 990-999/1000");
    assert_eq!(&tail.bytes().await.unwrap()[..], b"0123456789");
    let past = get("bytes=1001-").await.unwrap();
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert!(past.text().await.unwrap().contains("has 1000 bytes"));
    let missing = client
        .get(format!("{url}/v1/exports/nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
