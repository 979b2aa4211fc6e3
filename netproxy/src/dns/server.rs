//! The DNS listeners: UDP and TCP on the DNS port of the pod's loopback
//! (127.0.0.1, and ::1 when the netns has IPv6), where the ruleset's
//! `redirect` delivers the app's port-53 traffic. Loopback, not the
//! wildcard address: a redirected datagram's destination is rewritten to
//! loopback, and only a reply sent from that same address matches the
//! NAT entry and is turned back into the resolver's address the app asked.
//! Bounded: at most [`MAX_UDP_IN_FLIGHT`] UDP queries and
//! [`MAX_TCP_CONNECTIONS`] TCP connections at once (more are dropped; the
//! client retries), TCP messages of at most [`MAX_QUERY`] bytes, idle TCP
//! connections closed after [`TCP_IDLE`].
//!
//! The sockets set SO_REUSEPORT: during a proxy handover (a new binary
//! starting while the old one drains) both processes bind the DNS port, and
//! the kernel spreads queries over them until the old one exits. (The DNS
//! sockets are the proxy's own, not among the listeners the shim holds.)

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::forward::Transport;
use super::handler::DnsProxy;

/// The largest query accepted: a stub's query is a question and an OPT
/// record, far below this; anything bigger is not a query we answer.
pub const MAX_QUERY: usize = 4096;
pub const MAX_UDP_IN_FLIGHT: usize = 256;
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may sit between queries (RFC 7766 suggests
/// tens of seconds at most).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long the rest of a TCP query may take once its length arrived.
const TCP_READ: Duration = Duration::from_secs(5);

/// The bound sockets.
pub struct DnsListeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl DnsListeners {
    /// Binds UDP and TCP on `port` of 127.0.0.1 (required) and ::1 (if the
    /// netns has IPv6 loopback), with the proxy's `mark`.
    pub fn bind(port: u16, mark: u32) -> io::Result<DnsListeners> {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        let mut l = DnsListeners {
            udp: vec![udp_bind(v4, mark)?],
            tcp: vec![tcp_bind(v4, mark)?],
        };
        match (udp_bind(v6, mark), tcp_bind(v6, mark)) {
            (Ok(u), Ok(t)) => {
                l.udp.push(u);
                l.tcp.push(t);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("DNS on [::1]:{port} not bound ({e}); IPv4 only");
            }
        }
        Ok(l)
    }

    /// The local addresses, UDP then TCP.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let udp = self.udp.iter().filter_map(|s| s.local_addr().ok());
        let tcp = self.tcp.iter().filter_map(|s| s.local_addr().ok());
        udp.chain(tcp).collect()
    }

    /// Serves until `stop`.
    pub async fn serve(self, dns: Arc<DnsProxy>, stop: CancellationToken) {
        let mut tasks = Vec::new();
        let in_flight = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
        for s in self.udp {
            tasks.push(tokio::spawn(serve_udp(
                Arc::new(s),
                dns.clone(),
                in_flight.clone(),
                stop.clone(),
            )));
        }
        let conns = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        for l in self.tcp {
            tasks.push(tokio::spawn(serve_tcp(
                l,
                dns.clone(),
                conns.clone(),
                stop.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// A marked, non-blocking, SO_REUSEPORT socket bound to `addr`.
fn bound(addr: SocketAddr, ty: Type, proto: Protocol, mark: u32) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn udp_bind(addr: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    UdpSocket::from_std(bound(addr, Type::DGRAM, Protocol::UDP, mark)?.into())
}

fn tcp_bind(addr: SocketAddr, mark: u32) -> io::Result<TcpListener> {
    let s = bound(addr, Type::STREAM, Protocol::TCP, mark)?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    dns: Arc<DnsProxy>,
    in_flight: Arc<Semaphore>,
    stop: CancellationToken,
) {
    // One byte more than the largest query, to tell an oversized datagram
    // (which recv truncates silently) from one that fits.
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier replies surface here; the
                    // socket itself is fine.
                    tracing::debug!(error = %e, "DNS UDP receive");
                    continue;
                }
            },
        };
        if n > MAX_QUERY {
            dns.metrics.query("udp", "malformed");
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            dns.metrics.query("udp", "dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, dns) = (sock.clone(), dns.clone());
        tokio::spawn(async move {
            if let Some(resp) = dns.handle(&query, Transport::Udp).await
                && let Err(e) = sock.send_to(&resp, peer).await
            {
                tracing::debug!(%peer, error = %e, "DNS UDP reply");
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(
    listener: TcpListener,
    dns: Arc<DnsProxy>,
    conns: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS TCP accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            dns.metrics.query("tcp", "dropped");
            continue;
        };
        let (dns, stop) = (dns.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = tcp_connection(stream, &dns) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "DNS TCP connection");
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Serves length-prefixed queries one after the other until the client
/// closes, idles out, or sends something that is not a query.
async fn tcp_connection(mut s: TcpStream, dns: &DnsProxy) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, s.read_u16()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r? as usize,
        };
        if len == 0 || len > MAX_QUERY {
            dns.metrics.query("tcp", "malformed");
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{len}-byte message (1..={MAX_QUERY} accepted)"),
            ));
        }
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_READ, s.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query body timed out"))??;
        let Some(resp) = dns.handle(&query, Transport::Tcp).await else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(resp.len() + 2);
        out.extend_from_slice(&(resp.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(&resp[..resp.len().min(u16::MAX as usize)]);
        s.write_all(&out).await?;
    }
}
