//! Load generators for data-path benchmarks, with blocking sockets and a
//! thread per connection (the proxies under test are the async part; the
//! load tools stay simple and predictable). Servers are created inside a
//! namespace ([`NetNs::run`]); clients are plain functions over streams,
//! and [`connect`] is meant to run on a thread inside the client's
//! namespace.
//!
//! Protocols: a *sink* reads to EOF and then answers the byte count (8
//! bytes, big endian), so a sender learns how much really arrived; an
//! *echo* server writes back whatever it reads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use crate::netns::NetNs;

/// Write size of bulk senders (iperf3's TCP default).
pub const BULK_CHUNK: usize = 128 * 1024;
const READ_BUF: usize = 256 * 1024;
/// Bound on any single blocking read or write, so a wedged path fails
/// instead of hanging the benchmark.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A listening server with a thread per connection; stops accepting on drop.
pub struct Server {
    listener: TcpListener,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// A sink on `addr` inside `ns`.
    pub fn sink(ns: &NetNs, addr: SocketAddr) -> io::Result<Server> {
        Server::start(ns, addr, sink_conn)
    }

    /// An echo server on `addr` inside `ns`.
    pub fn echo(ns: &NetNs, addr: SocketAddr) -> io::Result<Server> {
        Server::start(ns, addr, echo_conn)
    }

    fn start(ns: &NetNs, addr: SocketAddr, serve: fn(TcpStream)) -> io::Result<Server> {
        let listener = ns.run(|| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            io::Result::Ok(TcpListener::from(s))
        })?;
        let l = listener.try_clone()?;
        let accept = std::thread::spawn(move || {
            // Ends when `drop` shuts the listener down (accept fails).
            while let Ok((c, _)) = l.accept() {
                let _ = c.set_nodelay(true);
                std::thread::spawn(move || serve(c));
            }
        });
        Ok(Server {
            listener,
            accept: Some(accept),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // On Linux, shutting a listening socket down wakes a blocked accept().
        let _ = SockRef::from(&self.listener).shutdown(Shutdown::Both);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn sink_conn(mut c: TcpStream) {
    let mut buf = vec![0u8; READ_BUF];
    let mut n = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => return,
        }
    }
    let _ = c.write_all(&n.to_be_bytes());
}

fn echo_conn(mut c: TcpStream) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c.shutdown(Shutdown::Write);
}

/// Connects to `dst` from the calling thread's namespace, with `mark` as
/// SO_MARK when given (the proxy's mark bypasses the redirection), Nagle
/// off and I/O timeouts set.
pub fn connect(dst: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.connect_timeout(&dst.into(), IO_TIMEOUT)?;
    s.set_tcp_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s.into())
}

/// Bytes that reached the sinks and the time it took.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Transfer {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Sends on every stream (one thread each) for `duration`, then half-closes
/// and waits for each sink's count. Elapsed time runs until the last count
/// arrived, so data still queued in the proxies is not counted as moved.
pub fn bulk(streams: Vec<TcpStream>, duration: Duration) -> io::Result<Transfer> {
    let start = Instant::now();
    let end = start + duration;
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|stream| s.spawn(move || send_until(stream, end)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("sender panicked")))
            })
            .collect::<io::Result<Vec<u64>>>()
    })?;
    Ok(Transfer {
        bytes: counts.iter().sum(),
        elapsed: start.elapsed(),
    })
}

fn send_until(mut s: TcpStream, end: Instant) -> io::Result<u64> {
    let chunk = vec![0x5au8; BULK_CHUNK];
    let mut sent = 0u64;
    while Instant::now() < end {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let got = u64::from_be_bytes(ack);
    if got != sent {
        return Err(io::Error::other(format!(
            "sink received {got} bytes of {sent} sent"
        )));
    }
    Ok(got)
}

/// Request/response latencies (nanoseconds) and the wall time they took.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub samples_ns: Vec<u64>,
    pub elapsed: Duration,
}

impl Latencies {
    /// The `q` quantile (0..=1) in microseconds; 0 without samples.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let mut v = self.samples_ns.clone();
        v.sort_unstable();
        match v.len() {
            0 => 0.0,
            n => v[((n - 1) as f64 * q).round() as usize] as f64 / 1e3,
        }
    }

    /// Completed requests per second.
    pub fn rate(&self) -> f64 {
        self.samples_ns.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends `size`-byte requests on one persistent connection to an echo
/// server and waits for each echo, for `duration`; with `rate`, requests
/// start on a fixed schedule (requests per second) instead of back to back.
pub fn request_response(
    s: &mut TcpStream,
    size: usize,
    duration: Duration,
    rate: Option<f64>,
) -> io::Result<Latencies> {
    let req = vec![0xa5u8; size];
    let mut resp = vec![0u8; size];
    let mut out = Latencies::default();
    let start = Instant::now();
    let end = start + duration;
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next = start;
    while Instant::now() < end {
        if let Some(i) = interval {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += i;
        }
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        out.samples_ns.push(t.elapsed().as_nanos() as u64);
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// A new connection per request: `connect`, one `size`-byte echo, close,
/// back to back for `duration`. Each sample spans connect to the last
/// response byte.
pub fn connection_per_request(
    mut connect: impl FnMut() -> io::Result<TcpStream>,
    size: usize,
    duration: Duration,
) -> io::Result<Latencies> {
    let req = vec![0xa5u8; size];
    let mut resp = vec![0u8; size];
    let mut out = Latencies::default();
    let start = Instant::now();
    let end = start + duration;
    while Instant::now() < end {
        let t = Instant::now();
        let mut s = connect()?;
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        out.samples_ns.push(t.elapsed().as_nanos() as u64);
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_nearest_rank() {
        let l = Latencies {
            samples_ns: (1..=100).rev().map(|v| v * 1000).collect(),
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(l.quantile_us(0.0), 1.0);
        assert_eq!(l.quantile_us(0.5), 51.0);
        assert_eq!(l.quantile_us(0.99), 99.0);
        assert_eq!(l.quantile_us(1.0), 100.0);
        assert_eq!(l.rate(), 50.0);
        assert_eq!(Latencies::default().quantile_us(0.5), 0.0);
    }

    /// Every tool against its server over loopback in a fresh namespace;
    /// dropping a server stops its accept thread.
    #[test]
    fn tools_drive_their_servers() {
        if !crate::prereq::root("tools_drive_their_servers") {
            return;
        }
        let ns = NetNs::new("load");
        let sink: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let echo: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let s1 = Server::sink(&ns, sink).unwrap();
        let s2 = Server::echo(&ns, echo).unwrap();
        let streams = ns.run(|| {
            (0..3)
                .map(|_| connect(sink, None))
                .collect::<io::Result<Vec<_>>>()
        });
        let t = bulk(streams.unwrap(), Duration::from_millis(200)).unwrap();
        assert!(t.bytes >= 3 * BULK_CHUNK as u64, "{t:?}");
        assert!(t.gbit_per_s() > 0.0);
        let mut c = ns.run(|| connect(echo, Some(0x539))).unwrap();
        let l = request_response(&mut c, 1024, Duration::from_millis(200), None).unwrap();
        assert!(!l.samples_ns.is_empty());
        let paced =
            request_response(&mut c, 1024, Duration::from_millis(300), Some(100.0)).unwrap();
        let n = paced.samples_ns.len();
        assert!((20..=40).contains(&n), "100/s for 0.3 s made {n} requests");
        let l = ns
            .run(|| {
                connection_per_request(|| connect(echo, None), 1024, Duration::from_millis(200))
            })
            .unwrap();
        assert!(l.rate() > 0.0 && l.quantile_us(0.5) > 0.0);
        drop(c);
        drop((s1, s2));
        assert!(
            ns.run(|| connect(sink, None)).is_err(),
            "listener closed on drop"
        );
    }
}
