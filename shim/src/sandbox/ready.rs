//! The proxy's readiness, checked the way kubelet would check a container's:
//! `GET <path>` on its readiness port must answer 200. The connection is made
//! from inside the pod's network namespace by a short-lived thread that enters
//! it (setns affects only the calling thread; the thread then exits, so no
//! runtime thread ever changes namespace).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// One probe; `Err` says why the proxy is not ready.
pub async fn probe(netns: &Path, port: u16, path: &str) -> Result<(), String> {
    let (netns, path): (PathBuf, String) = (netns.to_owned(), path.to_owned());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ready-probe".into())
        .spawn(move || {
            let _ = tx.send(probe_blocking(&netns, port, &path));
        })
        .map_err(|e| format!("spawn probe thread: {e}"))?;
    rx.await.map_err(|_| "probe thread died".to_string())?
}

fn probe_blocking(netns: &Path, port: u16, path: &str) -> Result<(), String> {
    let ns =
        std::fs::File::open(netns).map_err(|e| format!("open netns {}: {e}", netns.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter netns {}: {e}", netns.display()))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // One write: a server may act on the first segment it reads.
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send request: {e}"))?;
    // Read the status line and, for a refusal, the start of the body: the
    // proxy says there what it still waits for (`not ready: waiting for
    // certificate`), which the start error then names.
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while got.len() < MAX_RESPONSE {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            // A status line is enough; the body is only an explanation.
            Err(_) if got.windows(2).any(|w| w == b"\r\n") => break,
            Err(e) => return Err(format!("read response: {e}")),
        };
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    status_ok(&got)
}

/// Most of a readiness response read.
const MAX_RESPONSE: usize = 1024;
/// Most of a refusal's body quoted in the error.
const MAX_REASON: usize = 200;

/// Accepts `HTTP/1.x 200 ...` as ready; otherwise says what was answered,
/// with the first line of the body when there is one.
pub fn status_ok(response: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(response);
    let line = text.lines().next().unwrap_or("").trim();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/1.") => Ok(()),
        (Some(v), Some(code)) if v.starts_with("HTTP/") => {
            let reason = text
                .split_once("\r\n\r\n")
                .and_then(|(_, body)| body.lines().map(str::trim).find(|l| !l.is_empty()))
                .map(|l| l.chars().take(MAX_REASON).collect::<String>());
            Err(match reason {
                Some(r) => format!("readiness endpoint answered {code}: {r:?}"),
                None => format!("readiness endpoint answered {code}"),
            })
        }
        _ => Err(format!("not an HTTP response: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n\r\nready").is_ok());
        assert!(status_ok(b"HTTP/1.0 200 OK\r\n").is_ok());
        assert_eq!(
            status_ok(b"HTTP/1.1 503 Service Unavailable\r\n").unwrap_err(),
            "readiness endpoint answered 503"
        );
        assert_eq!(
            status_ok(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 38\r\n\r\nnot ready: waiting for certificate\n")
                .unwrap_err(),
            "readiness endpoint answered 503: \"not ready: waiting for certificate\""
        );
        assert!(status_ok(b"SSH-2.0\r\n").is_err());
        assert!(status_ok(b"").is_err());
    }

    #[tokio::test]
    async fn probes_a_listener_in_our_own_netns() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // Other processes on this host may connect to any loopback port:
        // answer only our own (uniquely named) request.
        let path = format!("/healthz/ready-{}", std::process::id());
        let expect = format!("GET {path} ");
        let server = std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut req = Vec::new();
                let mut b = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                if req.starts_with(expect.as_bytes()) {
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nready");
                    return;
                }
                let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\n\r\n");
            }
        });
        let ns = format!("/proc/{}/ns/net", std::process::id());
        assert_eq!(
            probe(Path::new(&ns), port, "/other").await.unwrap_err(),
            "readiness endpoint answered 404"
        );
        probe(Path::new(&ns), port, &path).await.unwrap();
        server.join().unwrap();
        // The listener is closed: nothing listens there any more.
        assert!(
            probe(Path::new(&ns), port, &path)
                .await
                .unwrap_err()
                .contains("connect")
        );
    }
}
