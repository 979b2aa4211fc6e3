//! The proxy's own HTTP endpoints:
//! * readiness on the readiness port (`/healthz/ready`: 200 `ready` only
//!   when every readiness check passes — certificate and initial config),
//! * Prometheus metrics on the metrics port (`/metrics`,
//!   `/stats/prometheus`),
//! * the admin API on a Unix socket (mode 0600, path chosen by the shim):
//!   `/config_dump` (JSON) and `/logging?level=<filter>`. The admin API is
//!   never exposed on the pod network: it reveals configuration and changes
//!   logging, and the app must not reach it.
//!
//! Submodules: `http` (a tiny HTTP/1 server over TCP or Unix listeners),
//! `logging` (tracing setup with a reloadable filter), `readiness`.

mod http;
pub mod logging;
mod readiness;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

pub use http::Request;
pub use logging::LogControl;
pub use readiness::Readiness;

use crate::metrics::Metrics;

/// Produces the `/config_dump` document.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

fn only_get(req: &Request) -> Option<Reply> {
    (req.method() != Method::GET).then(|| text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"))
}

/// Serves `/healthz/ready` on `listener` until `stop`.
pub async fn serve_readiness(listener: TcpListener, readiness: Readiness, stop: CancellationToken) {
    let handler = move |req: Request| {
        if let Some(r) = only_get(&req) {
            return r;
        }
        match req.uri().path() {
            sidetunnel_contract::readiness::PATH => match readiness.pending() {
                p if p.is_empty() => text(StatusCode::OK, "ready\n"),
                p => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {}\n", p.join(", ")),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    };
    http::serve_tcp(listener, Arc::new(handler), stop).await
}

/// Serves Prometheus metrics on `listener` until `stop`.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let handler = move |req: Request| {
        if let Some(r) = only_get(&req) {
            return r;
        }
        match req.uri().path() {
            "/metrics" | "/stats/prometheus" => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    };
    http::serve_tcp(listener, Arc::new(handler), stop).await
}

/// Errors setting up the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
}

/// Binds the admin Unix socket at `path` (replacing a stale one) with mode
/// 0600, so only the socket's owner (the shim's user) can use it.
pub fn bind_admin_socket(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // Create with a tight umask-independent mode: bind, then chmod before
    // anything is served (nothing accepts until serve_admin runs).
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `stop`.
pub async fn serve_admin(
    listener: UnixListener,
    dump: ConfigDump,
    logs: LogControl,
    stop: CancellationToken,
) {
    let handler = move |req: Request| match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => match serde_json::to_vec_pretty(&dump()) {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (&Method::GET | &Method::POST, "/logging") => logging_endpoint(&logs, req.uri().query()),
        (_, "/config_dump" | "/logging") => text(StatusCode::METHOD_NOT_ALLOWED, "bad method\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: /config_dump, /logging?level=<filter>\n",
        ),
    };
    http::serve_unix(listener, Arc::new(handler), stop).await
}

/// `/logging` shows the filter; `/logging?level=<filter>` replaces it.
fn logging_endpoint(logs: &LogControl, query: Option<&str>) -> Reply {
    let level = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "level")
            .map(|(_, v)| percent_decode(v))
    });
    match level {
        None => text(
            StatusCode::OK,
            format!("current log level is {}\n", logs.current()),
        ),
        Some(l) => match logs.set(&l) {
            Ok(()) => text(
                StatusCode::OK,
                format!("current log level is {}\n", logs.current()),
            ),
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
    }
}

/// Decodes `%XX` escapes and `+` (curl --data-urlencode style).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Binds a TCP listener for the metrics or readiness port with the proxy's
/// mark (so its replies are never redirected back into the proxy).
pub fn bind_tcp(addr: SocketAddr, mark: u32) -> std::io::Result<TcpListener> {
    crate::socket::listener(addr, mark, false)
}

#[cfg(test)]
mod tests;
