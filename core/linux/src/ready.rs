//! Readiness probes: what tells the driver that a started container serves.
//!
//! A type declares its check (`Check`); the driver probes the container's address until the
//! check passes or the start times out. A TCP check passes once a connection is accepted; an
//! HTTP check once `GET path` answers 2xx or 3xx (an application server accepts connections
//! well before its application is deployed, and answers 404 meanwhile).

use std::net::Ipv4Addr;
use std::time::Duration;

use cloud48_model::{Check, Workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe may take (a first JSP compile under load takes seconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// A readiness probe on a container's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Ready once its processes run.
    Running,
    /// Ready once this TCP port accepts a connection.
    Tcp(u16),
    /// Ready once `GET path` on this port answers 2xx or 3xx.
    Http {
        /// TCP port.
        port: u16,
        /// Request path, starting with `/`.
        path: String,
    },
}

impl Probe {
    /// The probe of `w`'s declared readiness check (an exec check is judged by the process
    /// running).
    pub fn of(w: &Workload) -> Probe {
        let port_of = |name: &str| w.endpoints.iter().find(|e| e.name == name).map(|e| e.port);
        match w.readiness.as_ref().map(|r| &r.check) {
            Some(Check::Tcp { endpoint }) => port_of(endpoint).map_or(Probe::Running, Probe::Tcp),
            Some(Check::Http { endpoint, path }) => {
                port_of(endpoint).map_or(Probe::Running, |port| Probe::Http {
                    port,
                    path: if path.starts_with('/') {
                        path.clone()
                    } else {
                        format!("/{path}")
                    },
                })
            }
            _ => Probe::Running,
        }
    }

    /// The port probed, if any.
    pub fn port(&self) -> Option<u16> {
        match self {
            Probe::Running => None,
            Probe::Tcp(port) | Probe::Http { port, .. } => Some(*port),
        }
    }

    /// How long to wait between two probes: a TCP connection is cheap, an HTTP request may run
    /// the application.
    pub fn pause(&self) -> Duration {
        match self {
            Probe::Http { .. } => Duration::from_millis(50),
            _ => Duration::from_millis(5),
        }
    }

    /// Whether the container at `ip` passes the probe now; `Err` says what it answered.
    pub async fn check(&self, ip: Ipv4Addr) -> Result<(), String> {
        let (port, path) = match self {
            Probe::Running => return Ok(()),
            Probe::Tcp(port) => (*port, None),
            Probe::Http { port, path } => (*port, Some(path)),
        };
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await {
                Ok(Ok(s)) => s,
                _ => return Err(format!("nothing answered on port {port}")),
            };
        let Some(path) = path else { return Ok(()) };
        match tokio::time::timeout(PROBE_TIMEOUT, http_status(stream, ip, path)).await {
            Ok(Ok(status)) if (200..400).contains(&status) => Ok(()),
            Ok(Ok(status)) => Err(format!("GET {path} on port {port} answered {status}")),
            Ok(Err(e)) => Err(format!("GET {path} on port {port} failed: {e}")),
            Err(_) => Err(format!(
                "GET {path} on port {port} did not answer in {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The status code of `GET path` sent on `stream`.
async fn http_status(mut stream: TcpStream, ip: Ipv4Addr, path: &str) -> std::io::Result<u16> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nUser-Agent: cloud48-probe\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    status_of(&head).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&head[..head.len().min(80)])
            ),
        )
    })
}

/// The status code in an HTTP status line (`HTTP/1.1 200 OK`).
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words
        .next()?
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud48_model::{Endpoint, Protocol, Readiness};
    use tokio::net::TcpListener;

    #[test]
    fn status_lines_are_read_and_anything_else_is_refused() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/1.0 404 Not Found\r\nServer: x"), Some(404));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 abc\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    #[test]
    fn the_probe_follows_the_declared_check() {
        let mut w = Workload {
            endpoints: vec![Endpoint {
                name: "web".into(),
                port: 8080,
                protocol: Protocol::Http,
            }],
            ..Workload::default()
        };
        assert_eq!(Probe::of(&w), Probe::Running);
        let check = |check| Readiness {
            check,
            interval_ms: 100,
            retries: 3,
        };
        w.readiness = Some(check(Check::Tcp {
            endpoint: "web".into(),
        }));
        assert_eq!(Probe::of(&w), Probe::Tcp(8080));
        w.readiness = Some(check(Check::Http {
            endpoint: "web".into(),
            path: "health".into(),
        }));
        assert_eq!(
            Probe::of(&w),
            Probe::Http {
                port: 8080,
                path: "/health".into()
            }
        );
        w.readiness = Some(check(Check::Http {
            endpoint: "missing".into(),
            path: "/".into(),
        }));
        assert_eq!(Probe::of(&w), Probe::Running);
    }

    /// A server that answers every connection with `status`, reporting the request line.
    async fn answering(status: &'static str) -> (u16, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let first = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .map(String::from);
                let _ = tx.send(first.unwrap_or_default()).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn an_http_probe_passes_on_success_only() {
        let (ok, mut requests) = answering("200 OK").await;
        let probe = Probe::Http {
            port: ok,
            path: "/app/".into(),
        };
        probe.check(Ipv4Addr::LOCALHOST).await.unwrap();
        assert_eq!(requests.recv().await.unwrap(), "GET /app/ HTTP/1.1");

        let (missing, _requests) = answering("404 Not Found").await;
        let probe = Probe::Http {
            port: missing,
            path: "/".into(),
        };
        let err = probe.check(Ipv4Addr::LOCALHOST).await.unwrap_err();
        assert!(err.contains("answered 404"), "{err}");
        // A TCP probe of the same server passes: it accepts connections.
        Probe::Tcp(missing)
            .check(Ipv4Addr::LOCALHOST)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_closed_port_fails_both_probes() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = Probe::Tcp(port)
            .check(Ipv4Addr::LOCALHOST)
            .await
            .unwrap_err();
        assert!(err.contains("nothing answered"), "{err}");
        let http = Probe::Http {
            port,
            path: "/".into(),
        };
        assert!(http.check(Ipv4Addr::LOCALHOST).await.is_err());
    }
}
