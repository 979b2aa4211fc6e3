//! HBONE: TCP tunnelled in HTTP/2 `CONNECT` streams over mutual TLS, as
//! Istio's ztunnel and waypoints speak it.
//!
//! * Request: `CONNECT`, `:authority` = `ip:port` of the destination
//!   workload, `forwarded: for="<src ip:port>"` (plus `;host=<svc host>` when a
//!   service was addressed), `baggage`, `traceparent`.
//! * Responses: 200 once the upstream connection is established; 400 for a
//!   malformed request (not CONNECT, bad authority); 401 when authorization
//!   denies; 503 when the upstream connection fails.
//! * HTTP/2 tuning as ztunnel (1 MiB frames, keepalive pings every 10 s,
//!   20 s timeout) except the windows: [`H2Config`]'s default is ztunnel's
//!   4 MiB stream / 16 MiB connection window, the proxy's the share of its
//!   `--memory-budget` (config::BufferShares; 1 MiB / 4 MiB by default).
//!
//! [`client::Pool`] opens and pools client connections; [`server::serve_connection`]
//! serves one accepted TLS connection; [`HboneStream`] adapts a CONNECT
//! stream to `AsyncRead + AsyncWrite`; [`copy_bidirectional`] splices two
//! streams and counts bytes.

mod budget;
pub mod client;
mod copy;
mod headers;
mod ping;
pub mod server;
mod splice;
mod stream;

use std::time::Duration;

pub use budget::{CopyBudget, Grant};
pub use client::{
    ConnectRequest, FIRST_DATA_MAX, Pool, PoolKey, PoolStats, SocketFactory, TcpSocketFactory,
};
pub use copy::{
    CONNECTION_COPY_CAP, CopyCounters, CopyResult, INITIAL_CHUNK, MAX_CHUNK, SEND_BUFFER,
    copy_bidirectional,
};
pub use headers::{
    AuthorityError, BAGGAGE, Baggage, TRACEPARENT, TraceParent, forwarded_for, forwarded_header,
    forwarded_host, parse_authority,
};
pub use server::{InboundRequest, serve_connection};
pub use splice::Splice;
pub use stream::HboneStream;

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 and pool settings. Defaults are ztunnel's.
#[derive(Debug, Clone)]
pub struct H2Config {
    /// Per-stream flow-control window (default 4 MiB).
    pub stream_window: u32,
    /// Per-connection flow-control window (default 16 MiB; larger than the
    /// stream window so one stream cannot starve the others).
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept (default 1 MiB).
    pub max_frame_size: u32,
    /// Client: most concurrent streams on one pooled connection (default 100).
    pub max_streams_per_conn: u16,
    /// Client: a pooled connection with no streams for this long is closed
    /// (default 5 min).
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings (default 10 s).
    pub keepalive_interval: Duration,
    /// A ping unanswered this long closes the connection (default 20 s).
    pub keepalive_timeout: Duration,
    /// Client: TCP connect + TLS handshake + HTTP/2 handshake deadline;
    /// server: deadline for the client's HTTP/2 preface (default 10 s).
    pub connect_timeout: Duration,
    /// Server: most concurrent streams a peer may open (default 200, hyper's).
    pub server_max_concurrent_streams: u32,
}

impl Default for H2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            server_max_concurrent_streams: 200,
        }
    }
}

/// HBONE errors.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(std::net::SocketAddr),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("HBONE peer answered CONNECT with status {0}")]
    Status(http::StatusCode),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl HboneError {
    /// The HTTP status the peer answered, when that was the failure.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Status(s) => Some(*s),
            _ => None,
        }
    }
}
