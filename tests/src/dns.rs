//! DNS on both sides of the pod proxy, for tests and the benchmark: a
//! small authoritative resolver ([`Resolver`], UDP and TCP, a fixed table
//! of A records, NXDOMAIN for anything else) started inside a namespace,
//! and blocking clients ([`query_udp`], [`query_tcp`]) meant to run on a
//! thread inside the app's namespace ([`NetNs::run`]). Messages are built
//! and read with the proxy's own `netproxy::dns::wire`, whose parser is
//! unit-tested and fuzzed on its own.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use netproxy::dns::wire::{self, RData, Rcode, Record, Response};
pub use netproxy::dns::wire::{TYPE_A, TYPE_AAAA};
use socket2::SockRef;

use crate::netns::NetNs;

/// TTL of the resolver's answers.
pub const RESOLVER_TTL: u32 = 300;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolver: answers A queries for the names in its table.
pub struct Resolver {
    udp: UdpSocket,
    tcp: TcpListener,
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Resolver {
    /// Serves `table` (lower-case names) on UDP and TCP `addr` inside `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr, table: &[(&str, Ipv4Addr)]) -> io::Result<Resolver> {
        let (udp, tcp) =
            ns.run(|| io::Result::Ok((UdpSocket::bind(addr)?, TcpListener::bind(addr)?)))?;
        Resolver::serve(udp, tcp, table)
    }

    /// Serves `table` on UDP and TCP `addr` in the caller's namespace.
    pub fn start_here(addr: SocketAddr, table: &[(&str, Ipv4Addr)]) -> io::Result<Resolver> {
        Resolver::serve(UdpSocket::bind(addr)?, TcpListener::bind(addr)?, table)
    }

    fn serve(udp: UdpSocket, tcp: TcpListener, table: &[(&str, Ipv4Addr)]) -> io::Result<Resolver> {
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let table: Arc<BTreeMap<String, Ipv4Addr>> =
            Arc::new(table.iter().map(|(n, ip)| (n.to_string(), *ip)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        {
            let (udp, table, stop, queries) = (
                udp.try_clone()?,
                table.clone(),
                stop.clone(),
                queries.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::Relaxed);
                    if let Some(r) = answer(&table, &buf[..n]) {
                        let _ = udp.send_to(&r, peer);
                    }
                }
            }));
        }
        {
            let (tcp, table, queries) = (tcp.try_clone()?, table.clone(), queries.clone());
            threads.push(std::thread::spawn(move || {
                // Ends when `drop` shuts the listener down.
                while let Ok((c, _)) = tcp.accept() {
                    let (table, queries) = (table.clone(), queries.clone());
                    std::thread::spawn(move || serve_tcp(c, &table, &queries));
                }
            }));
        }
        Ok(Resolver {
            udp,
            tcp,
            stop,
            queries,
            threads,
        })
    }

    /// Queries received so far (UDP and TCP).
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.udp.local_addr().expect("resolver address")
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = SockRef::from(&self.tcp).shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn answer(table: &BTreeMap<String, Ipv4Addr>, raw: &[u8]) -> Option<Vec<u8>> {
    let q = match wire::parse_query(raw) {
        Ok(q) => q,
        Err(e) => return wire::error_answer(raw, &e),
    };
    let found = q.name.as_deref().and_then(|n| table.get(n));
    let (rcode, records) = match (found, q.qtype) {
        (Some(ip), wire::TYPE_A) => (
            Rcode::NoError,
            vec![Record {
                owner: None,
                ttl: RESOLVER_TTL,
                data: RData::A(*ip),
            }],
        ),
        (Some(_), _) => (Rcode::NoError, vec![]),
        (None, _) => (Rcode::NxDomain, vec![]),
    };
    wire::encode_answer(&q, rcode, true, &records, q.udp_limit())
}

fn serve_tcp(mut c: TcpStream, table: &BTreeMap<String, Ipv4Addr>, queries: &AtomicUsize) {
    let _ = c.set_read_timeout(Some(IO_TIMEOUT));
    loop {
        let mut len = [0u8; 2];
        if c.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if c.read_exact(&mut q).is_err() {
            return;
        }
        queries.fetch_add(1, Ordering::Relaxed);
        let Some(r) = answer(table, &q) else { return };
        let mut out = (r.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&r);
        if c.write_all(&out).is_err() {
            return;
        }
    }
}

/// Sends raw bytes over UDP to `to` from the calling thread's namespace and
/// waits up to `timeout` for one datagram back (`None`: nothing came).
pub fn exchange_udp(to: SocketAddr, raw: &[u8], timeout: Duration) -> io::Result<Option<Vec<u8>>> {
    exchange_udp_marked(to, raw, timeout, None)
}

/// [`exchange_udp`] from a socket carrying `mark` (SO_MARK; the proxy's
/// mark passes the pod's ruleset uncaptured: the direct path).
fn exchange_udp_marked(
    to: SocketAddr,
    raw: &[u8],
    timeout: Duration,
    mark: Option<u32>,
) -> io::Result<Option<Vec<u8>>> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    match mark {
        Some(m) => {
            s.set_mark(m)?;
            // Outside the ephemeral range, as the proxy's own upstream
            // sockets (netproxy/src/dns/forward.rs): the un-NATed
            // conntrack entry this leaves must not meet a later unmarked
            // query given the same port.
            let mut bound = false;
            for _ in 0..16 {
                let port = 10_000 + rand_id() % 22_000;
                if s.bind(&SocketAddr::new(any.ip(), port).into()).is_ok() {
                    bound = true;
                    break;
                }
            }
            if !bound {
                s.bind(&any.into())?;
            }
        }
        None => s.bind(&any.into())?,
    }
    let s = UdpSocket::from(s);
    s.connect(to)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(raw)?;
    let mut buf = vec![0u8; 65535];
    match s.recv(&mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One query over UDP (EDNS0, 1232 bytes), checked to answer it.
pub fn query_udp(to: SocketAddr, name: &str, qtype: u16) -> io::Result<Response> {
    query_udp_marked(to, name, qtype, None)
}

/// [`query_udp`] from a socket carrying `mark`.
pub fn query_udp_marked(
    to: SocketAddr,
    name: &str,
    qtype: u16,
    mark: Option<u32>,
) -> io::Result<Response> {
    let id = rand_id();
    let raw = wire::build_query(id, name, qtype, Some(1232)).ok_or_else(|| bad("bad name"))?;
    let resp =
        exchange_udp_marked(to, &raw, IO_TIMEOUT, mark)?.ok_or_else(|| bad("no UDP answer"))?;
    checked(id, name, &resp)
}

/// One query over a fresh TCP connection.
pub fn query_tcp(to: SocketAddr, name: &str, qtype: u16) -> io::Result<Response> {
    let id = rand_id();
    let raw = wire::build_query(id, name, qtype, None).ok_or_else(|| bad("bad name"))?;
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut out = (raw.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&raw);
    s.write_all(&out)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut resp = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut resp)?;
    checked(id, name, &resp)
}

fn checked(id: u16, name: &str, resp: &[u8]) -> io::Result<Response> {
    let r = wire::parse_response(resp).map_err(|e| bad(&e.to_string()))?;
    if r.id != id || r.name != name.to_ascii_lowercase() {
        return Err(bad(&format!("answer to another query: {r:?}")));
    }
    Ok(r)
}

/// The A/AAAA addresses of a response, in order.
pub fn addresses(r: &Response) -> Vec<std::net::IpAddr> {
    r.answers
        .iter()
        .filter_map(|a| match a.data {
            RData::A(ip) => Some(ip.into()),
            RData::Aaaa(ip) => Some(ip.into()),
            _ => None,
        })
        .collect()
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    );
    h.finish() as u16
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}
