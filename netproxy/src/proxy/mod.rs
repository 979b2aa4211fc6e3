//! The data path, running inside the pod's network namespace:
//! * outbound capture (15001): app connections NAT-redirected by the
//!   ruleset; original destination → store lookup → HBONE or passthrough;
//! * inbound HBONE (15008): mTLS + HTTP/2 CONNECT, authorization, then a
//!   connection to the app that keeps the client's source IP;
//! * inbound plaintext (15006, TPROXY): PeerAuthentication mode and
//!   authorization without identity, then the same source-preserving
//!   connection to the app.
//!
//! Every socket carries the proxy mark. On shutdown the listeners close
//! first, open connections get the grace period, then are cut.
//!
//! Sockets (marks, TPROXY, original destination) are [`crate::socket`]'s.
//! Submodules: `route`
//! (destination choice), `outbound`, `inbound` (HBONE), `plaintext`,
//! `drain` (graceful shutdown), `upstream` (connection to the local app),
//! `limits` (the bounded connection table).

mod app;
pub mod drain;
mod inbound;
pub mod limits;
mod outbound;
mod plaintext;
pub mod route;
mod upstream;

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use sidetunnel_contract::handover::ListenerName;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::config::Config;
use crate::handover::{HandoverError, Inherited};
use crate::hbone::{self, H2Config, Pool, SocketFactory};
use crate::identity::{CertificateManager, Identity};
use crate::metrics::Metrics;
use crate::socket;
use crate::state::{Store, Workload};

pub use app::{StartError, run as run_app};
pub use drain::Drain;
pub use limits::{ConnectionSlot, ConnectionTable, Listener};

/// Everything the connection handlers share.
pub struct ProxyInputs {
    pub cfg: Arc<Config>,
    pub store: Arc<Store>,
    pub certs: CertificateManager,
    pub metrics: Arc<Metrics>,
    pub pool: Pool,
    pub h2: H2Config,
    /// Bounds the connections held at once (`--max-connections`).
    pub connections: Arc<ConnectionTable>,
    /// The pod's own IPs (connections to them on the proxy's ports are
    /// self-calls; inbound targets must be one of them).
    pub local_ips: Vec<IpAddr>,
}

impl ProxyInputs {
    /// Builds the shared inputs; the HBONE pool opens marked sockets.
    pub fn new(
        cfg: Arc<Config>,
        store: Arc<Store>,
        certs: CertificateManager,
        metrics: Arc<Metrics>,
        local_ips: Vec<IpAddr>,
    ) -> Arc<Self> {
        let h2 = H2Config {
            max_streams_per_conn: cfg.pool.max_streams_per_conn,
            idle_timeout: cfg.pool.idle_timeout,
            connect_timeout: cfg.connect_timeout,
            stream_window: cfg.limits.stream_window,
            connection_window: cfg.limits.connection_window,
            ..H2Config::default()
        };
        let connections =
            ConnectionTable::new(cfg.limits.max_connections, metrics.connections.clone());
        // Process-wide: it bounds the memory of all copies together.
        crate::hbone::CopyBudget::global()
            .set_limit(usize::try_from(cfg.limits.copy_buffer_budget).unwrap_or(usize::MAX));
        let sockets = Arc::new(MarkedSockets {
            mark: cfg.mark,
            timeout: cfg.connect_timeout,
        });
        let pool = Pool::new(h2.clone(), certs.clone(), sockets);
        Arc::new(ProxyInputs {
            cfg,
            store,
            certs,
            metrics,
            pool,
            h2,
            connections,
            local_ips,
        })
    }

    fn network(&self) -> &str {
        &self.cfg.pod.network
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local_ips.contains(&ip)
    }

    /// A connection to one of the proxy's own capture ports on this pod
    /// would loop through the proxy forever.
    fn is_self_call(&self, dst: SocketAddr) -> bool {
        self.is_local(dst.ip()) && self.cfg.ports.self_call_ports().contains(&dst.port())
    }

    /// This proxy's identity (fixed for its lifetime).
    fn identity(&self) -> Identity {
        self.certs.identity().clone()
    }

    /// The workload at `ip`, fetching it on demand within `bound`; `None`
    /// when unknown (metrics then say `unknown`).
    async fn workload_at(&self, ip: IpAddr, bound: Duration) -> Option<Arc<Workload>> {
        if let Some(w) = self.store.workload_by_ip(self.network(), ip) {
            return Some(w);
        }
        match tokio::time::timeout(bound, self.store.fetch_on_demand(self.network(), ip)).await {
            Ok(Ok(Some(crate::state::Address::Workload(w)))) => Some(w),
            _ => None,
        }
    }
}

/// The pool's socket factory: marked sockets, bounded connect.
struct MarkedSockets {
    mark: u32,
    timeout: Duration,
}

impl SocketFactory for MarkedSockets {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<TcpStream>> + Send + '_>>
    {
        Box::pin(async move {
            let (s, _, _) = socket::connect(addr, None, self.mark, self.timeout).await?;
            Ok(s)
        })
    }
}

/// The three data-path listeners, bound (or inherited, see
/// [`crate::handover`]) before anything else starts so a port clash fails
/// the start with a clear error.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound_plaintext: TcpListener,
    pub hbone: TcpListener,
}

/// Errors binding the listeners.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("binding the {what} listener on port {port}: {source}")]
    Bind {
        what: &'static str,
        port: u16,
        source: io::Error,
    },
    #[error(transparent)]
    Inherited(#[from] HandoverError),
}

impl Listeners {
    /// Takes each listener from `inherited` or binds it on the unspecified
    /// address (dual-stack when the netns has IPv6). The plaintext one is
    /// transparent (TPROXY target).
    pub fn bind(cfg: &Config, inherited: &mut Inherited) -> Result<Listeners, BindError> {
        let ports = &cfg.ports;
        Ok(Listeners {
            outbound: take_or_bind(
                inherited,
                ListenerName::Outbound,
                ports.outbound,
                cfg.mark,
                false,
            )?,
            inbound_plaintext: take_or_bind(
                inherited,
                ListenerName::InboundPlaintext,
                ports.inbound_plaintext,
                cfg.mark,
                true,
            )?,
            hbone: take_or_bind(inherited, ListenerName::Hbone, ports.hbone, cfg.mark, false)?,
        })
    }

    /// The listeners by their handover names.
    pub fn named(&self) -> [(ListenerName, BorrowedFd<'_>); 3] {
        [
            (ListenerName::Outbound, self.outbound.as_fd()),
            (
                ListenerName::InboundPlaintext,
                self.inbound_plaintext.as_fd(),
            ),
            (ListenerName::Hbone, self.hbone.as_fd()),
        ]
    }
}

/// The inherited listener `name`, or a new one on `port` of the
/// unspecified address.
pub fn take_or_bind(
    inherited: &mut Inherited,
    name: ListenerName,
    port: u16,
    mark: u32,
    transparent: bool,
) -> Result<TcpListener, BindError> {
    let what = name.as_str();
    let bind_err = |source| BindError::Bind { what, port, source };
    if let Some(l) = inherited.take_tcp(name, port)? {
        return TcpListener::from_std(l).map_err(bind_err);
    }
    let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    socket::listener(any, mark, transparent).map_err(bind_err)
}

/// Runs the listeners until `drain` stops accepting. `acceptor` verifies
/// HBONE clients (see [`crate::tls::HboneAcceptor`]).
pub async fn run(
    pi: Arc<ProxyInputs>,
    listeners: Listeners,
    acceptor: crate::tls::HboneAcceptor,
    drain: Drain,
) {
    info!(
        outbound = %local(&listeners.outbound),
        inbound_plaintext = %local(&listeners.inbound_plaintext),
        hbone = %local(&listeners.hbone),
        "listeners ready"
    );
    let out = {
        let pi = pi.clone();
        let acc = Accept::new(&pi, Listener::Outbound, &drain);
        acc.run(listeners.outbound, move |s, peer, d| {
            outbound::handle(pi.clone(), s, peer, d)
        })
    };
    let plain = {
        let pi = pi.clone();
        let acc = Accept::new(&pi, Listener::InboundPlaintext, &drain);
        acc.run(listeners.inbound_plaintext, move |s, peer, d| {
            plaintext::handle(pi.clone(), s, peer, d)
        })
    };
    let hb = {
        let pi = pi.clone();
        let acc = Accept::new(&pi, Listener::Hbone, &drain);
        acc.run(listeners.hbone, move |s, peer, d| {
            inbound::handle(pi.clone(), acceptor.clone(), s, peer, d)
        })
    };
    tokio::join!(out, plain, hb);
}

fn local(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// One listener's accept loop: what it needs besides the handler.
struct Accept {
    kind: Listener,
    table: Arc<ConnectionTable>,
    drain: Drain,
}

impl Accept {
    fn new(pi: &ProxyInputs, kind: Listener, drain: &Drain) -> Self {
        Accept {
            kind,
            table: pi.connections.clone(),
            drain: drain.clone(),
        }
    }

    /// Accepts until the drain stops accepting; each connection runs on its
    /// own tracked task (cut when the grace period ends) holding an entry
    /// of the connection table. When the table is full the connection is
    /// reset at once, before any work is spent on it.
    async fn run<F, Fut>(self, listener: TcpListener, handler: F)
    where
        F: Fn(TcpStream, SocketAddr, Drain) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let drain = self.drain;
        loop {
            let (stream, peer) = tokio::select! {
                _ = drain.accepting_stopped() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        warn!("accept on {}: {e}", local(&listener));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = self.table.try_acquire(self.kind) else {
                socket::reset(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            // A combinator, not an async block, so the connection's future
            // is held once (see `Drain::track`); the slot is released when
            // the connection ends or is cut.
            let conn = handler(stream, socket::canonical(peer), drain.clone());
            drain.spawn(conn.map(move |()| drop(slot)));
        }
        // Dropping the listener closes the port: new connections are refused
        // (the ruleset then resets redirected ones) while open ones drain.
    }
}

/// Response flag for an HBONE client failure.
fn hbone_flag(e: &hbone::HboneError) -> crate::metrics::ResponseFlags {
    use crate::metrics::ResponseFlags as F;
    match e {
        hbone::HboneError::Tls(_) => F::TlsFailure,
        hbone::HboneError::H2(_) => F::Http2HandshakeFailure,
        hbone::HboneError::Status(s) if *s == http::StatusCode::UNAUTHORIZED => {
            F::AuthorizationPolicyDenied
        }
        _ => F::ConnectionFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn size4<A, B, C, D, F: Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn size5<A, B, C, D, E, F: Future>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection task's future is allocated once and held for the
    /// connection's whole life, so its size is a floor of the memory every
    /// idle proxied connection costs. The outbound setup steps (on-demand
    /// lookup, passthrough connect, HBONE dial and CONNECT exchange) are
    /// boxed so their state is freed once the splice runs; unboxed, the
    /// outbound future was 6.8 KiB in release (4.6 KiB of it the HBONE
    /// connect). See also `drain::tests`.
    #[test]
    fn connection_futures_stay_small() {
        let sizes = [
            ("outbound", size4(outbound::handle)),
            ("plaintext inbound", size4(plaintext::handle)),
            ("HBONE stream", size5(inbound::serve_stream)),
        ];
        eprintln!("{sizes:?}");
        for (what, bytes) in sizes {
            assert!(bytes <= 4096, "{what} connection future is {bytes} bytes");
        }
    }
}
