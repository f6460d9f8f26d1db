//! The connections of a live move: each opened by the source with the target's secret, one
//! stream written until the source closes its side, one line answered by the target once it
//! has it all (`ok`, else why not).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use cloud48_driver::LiveTarget;

/// How long a target waits for the source to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one side waits for the other once connected (a stalled peer is a failed move).
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// A tar of the plain files of `dir` (a CRIU checkpoint), written to `out`; returns its bytes.
pub(crate) fn archive_flat<W: Write>(dir: &Path, out: W) -> std::io::Result<u64> {
    let mut b = tar::Builder::new(Counting(out, 0));
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            b.append_path_with_name(e.path(), e.file_name())?;
        }
    }
    Ok(b.into_inner()?.1)
}

/// A writer that counts what passes.
pub(crate) struct Counting<W>(pub(crate) W, pub(crate) u64);

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A random secret, hex.
pub(crate) fn secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Source side of one connection: the secret, then `send` writes the stream; returns what the
/// target answers once it has it all (`ok`, else why not) and the bytes sent.
pub(crate) fn send_stream(
    target: &LiveTarget,
    port: u16,
    what: &str,
    send: impl FnOnce(&mut TcpStream) -> std::io::Result<u64>,
) -> Result<u64, String> {
    let failed =
        |e: std::io::Error| format!("sending the {what} to {}:{port} failed: {e}", target.host);
    let mut conn = TcpStream::connect((target.host.as_str(), port)).map_err(failed)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(failed)?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(failed)?;
    conn.write_all(format!("{}\n", target.token).as_bytes())
        .map_err(failed)?;
    let sent = send(&mut conn).map_err(failed)?;
    conn.shutdown(std::net::Shutdown::Write).map_err(failed)?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(failed)?;
    match answer.trim() {
        "ok" => Ok(sent),
        "" => Err(format!(
            "the target closed the connection for the {what} without an answer"
        )),
        why => Err(format!("the target refused the {what}: {why}")),
    }
}

/// Target side of one connection: checks the secret, then `receive` reads the rest; a failure
/// is answered to the source.
pub(crate) fn receive_stream(
    conn: TcpStream,
    token: &str,
    receive: impl FnOnce(&mut BufReader<&TcpStream>) -> Result<(), String>,
) -> Result<TcpStream, String> {
    let got = (|| {
        conn.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(&conn);
        let mut line = String::new();
        // A secret is one short line: nothing longer is read.
        reader
            .by_ref()
            .take(256)
            .read_line(&mut line)
            .map_err(|e| format!("reading the source's secret: {e}"))?;
        if line.trim_end() != token {
            return Err("a connection without the migration's secret".to_string());
        }
        receive(&mut reader)
    })();
    if let Err(e) = &got {
        answer(&conn, &Err(e.clone()));
    }
    got.map(|()| conn)
}

/// Answers on `conn` how the stream it carried went.
pub(crate) fn answer(mut conn: &TcpStream, outcome: &Result<(), String>) {
    let line = match outcome {
        Ok(()) => "ok\n".to_string(),
        Err(e) => format!("{}\n", e.replace('\n', " ")),
    };
    let _ = conn.write_all(line.as_bytes());
}

/// Accepts one connection on `listener` within `ACCEPT_TIMEOUT`, as a blocking stream.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    what: &str,
) -> Result<TcpStream, String> {
    let (conn, _) = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept())
        .await
        .map_err(|_| format!("the source did not send the {what} within {ACCEPT_TIMEOUT:?}"))?
        .map_err(|e| format!("accepting the {what}: {e}"))?;
    let conn = conn.into_std().map_err(|e| e.to_string())?;
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Accepts the next connection on `listener`, has `apply` read what it carries (after the
/// secret), and answers that it arrived.
pub(crate) async fn receive_into(
    listener: &tokio::net::TcpListener,
    token: &str,
    what: &str,
    apply: impl FnOnce(&mut BufReader<&TcpStream>) -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    let conn = accept(listener, what).await?;
    let token = token.to_string();
    tokio::task::spawn_blocking(move || {
        let conn = receive_stream(conn, &token, apply)?;
        answer(&conn, &Ok(()));
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}
