//! Forwarding a query the mesh does not answer to the pod's own resolvers,
//! unchanged, over the transport it arrived on, from marked sockets (the
//! ruleset exempts the mark, so the query is not captured back into the
//! proxy). Each UDP try uses a fresh connected socket (a random source
//! port per query, as stub resolvers do, against spoofed answers), and a
//! response is relayed only if it matches the query's id and question.
//! Nameservers are tried in order, `attempts` rounds, each try bounded by
//! the resolv.conf timeout. UDP source ports stay out of the ephemeral
//! range (see [`UPSTREAM_PORTS`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use rand::Rng;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::resolv::ResolvConf;
use super::wire::{self, Query};
use crate::socket;

/// Largest response accepted from upstream (the DNS maximum over TCP; UDP
/// responses are bounded by the client's EDNS size anyway).
const MAX_RESPONSE: usize = 65_535;

/// Which transport a query came in on (and goes out on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
#[error("no upstream resolver answered: {last}")]
pub struct ForwardError {
    last: String,
}

/// The upstream resolvers of the pod.
#[derive(Debug, Clone)]
pub struct Forwarder {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u8,
    mark: u32,
}

impl Forwarder {
    pub fn new(conf: &ResolvConf, mark: u32) -> Forwarder {
        Forwarder {
            servers: conf.nameservers.clone(),
            timeout: conf.timeout,
            attempts: conf.attempts,
            mark,
        }
    }

    /// Sends `raw` (the parsed `q`) upstream and returns the first valid
    /// response.
    pub async fn forward(
        &self,
        q: &Query,
        raw: &[u8],
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut last = String::from("no nameserver");
        for _ in 0..self.attempts {
            for server in &self.servers {
                let r = match transport {
                    Transport::Udp => self.udp(*server, q, raw).await,
                    Transport::Tcp => self.tcp(*server, q, raw).await,
                };
                match r {
                    Ok(resp) => return Ok(resp),
                    Err(e) => {
                        tracing::debug!(%server, error = %e, "DNS upstream try failed");
                        last = format!("{server}: {e}");
                    }
                }
            }
        }
        Err(ForwardError { last })
    }

    async fn udp(&self, server: SocketAddr, q: &Query, raw: &[u8]) -> io::Result<Vec<u8>> {
        let sock = udp_socket(server, self.mark)?;
        sock.connect(server).await?;
        sock.send(raw).await?;
        let mut buf = vec![0u8; MAX_RESPONSE];
        let wait = async {
            loop {
                let n = sock.recv(&mut buf).await?;
                // Anything else on this port is a stray or a spoof: keep
                // waiting for the real answer until the timeout.
                match wire::check_response(q, &buf[..n]) {
                    Ok(()) => return Ok(buf[..n].to_vec()),
                    Err(e) => tracing::debug!(%server, error = %e, "ignoring DNS response"),
                }
            }
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
    }

    async fn tcp(&self, server: SocketAddr, q: &Query, raw: &[u8]) -> io::Result<Vec<u8>> {
        let exchange = async {
            let (mut s, _, _) = socket::connect(server, None, self.mark, self.timeout).await?;
            let mut msg = Vec::with_capacity(raw.len() + 2);
            msg.extend_from_slice(&(raw.len() as u16).to_be_bytes());
            msg.extend_from_slice(raw);
            s.write_all(&msg).await?;
            let len = s.read_u16().await? as usize;
            let mut buf = vec![0u8; len];
            s.read_exact(&mut buf).await?;
            wire::check_response(q, &buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            Ok(buf)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
    }
}

/// Source ports of upstream UDP queries: below Linux's default ephemeral
/// range (32768–60999). A forwarded query leaves an un-NATed conntrack
/// entry (pod IP:port → nameserver:53) for 30 s after its socket closed;
/// were the port ephemeral, an app socket given the same port in that time
/// would match the entry and reach the nameserver around the capture
/// (Istio separates the two with conntrack zones, which the ruleset does
/// not use). Apps get ports from the ephemeral range, so they never meet
/// these entries.
const UPSTREAM_PORTS: std::ops::RangeInclusive<u16> = 10_000..=32_767;

/// A marked UDP socket of `server`'s family on a random port of
/// [`UPSTREAM_PORTS`] (a few tries; an ephemeral port if all are taken).
fn udp_socket(server: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(server),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    s.set_nonblocking(true)?;
    let mut rng = rand::rng();
    let bound = (0..16).any(|_| {
        let port = rng.random_range(UPSTREAM_PORTS);
        s.bind(&SocketAddr::new(any, port).into()).is_ok()
    });
    if !bound {
        s.bind(&SocketAddr::new(any, 0).into())?;
    }
    UdpSocket::from_std(s.into())
}
