//! Socket plumbing for the listeners and upstream connections: every socket
//! carries the proxy's packet mark (the redirection ruleset lets marked
//! traffic through, so the proxy never captures itself), listeners are
//! dual-stack where the netns has IPv6, the inbound plaintext listener is
//! transparent (TPROXY), and inbound upstream connections may bind the
//! client's original IP (IP_TRANSPARENT + freebind) so the app sees the
//! real source.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::debug;

/// Listen backlog: connection bursts from the app must not be dropped.
const BACKLOG: i32 = 1024;

/// Binds a marked TCP listener on `addr`. An unspecified IPv6 address
/// (`[::]`) is dual-stack; if the netns has no IPv6, `[::]` falls back to
/// `0.0.0.0`. `transparent` sets IP_TRANSPARENT (and IPV6_TRANSPARENT) so
/// TPROXY'd connections to any address are accepted.
pub fn listener(addr: SocketAddr, mark: u32, transparent: bool) -> io::Result<TcpListener> {
    match bind(addr, mark, transparent) {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            debug!("binding {addr} failed ({e}); falling back to IPv4 only");
            bind(
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
                mark,
                transparent,
            )
        }
        r => r,
    }
}

fn bind(addr: SocketAddr, mark: u32, transparent: bool) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    if transparent {
        set_transparent(&SockRef::from(&s), addr.is_ipv6())?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    TcpListener::from_std(s.into())
}

fn set_transparent(s: &SockRef<'_>, v6: bool) -> io::Result<()> {
    if v6 {
        s.set_ip_transparent_v6(true)?;
        // Dual-stack sockets also serve IPv4; the v4 flag is the same
        // kernel bit but set it explicitly for clarity on older kernels.
        let _ = s.set_ip_transparent_v4(true);
        s.set_freebind_v6(true)
    } else {
        s.set_ip_transparent_v4(true)?;
        s.set_freebind_v4(true)
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The destination the app asked for before NAT redirected it to the
/// outbound listener (SO_ORIGINAL_DST, then IP6T_SO_ORIGINAL_DST).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let s = SockRef::from(stream);
    let addr = match s.original_dst_v4() {
        Ok(a) => a,
        Err(e4) => s.original_dst_v6().map_err(|e6| {
            io::Error::new(
                e6.kind(),
                format!(
                    "no original destination (SO_ORIGINAL_DST: {e4}; IP6T_SO_ORIGINAL_DST: {e6})"
                ),
            )
        })?,
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// How an upstream connection chose its source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceBinding {
    /// The kernel picked the source.
    Kernel,
    /// Bound to the client's original IP (transparent).
    Original(IpAddr),
}

/// Connects to `dst` from a marked socket, within `timeout`. With
/// `original_src`, first tries to bind that IP transparently; when the
/// kernel refuses (no CAP_NET_ADMIN, family mismatch), connects normally
/// and reports why, so the caller can log the lost source.
pub async fn connect(
    dst: SocketAddr,
    original_src: Option<IpAddr>,
    mark: u32,
    timeout: Duration,
) -> io::Result<(TcpStream, SourceBinding, Option<io::Error>)> {
    let fut = async {
        let mut fallback = None;
        if let Some(src) = original_src.filter(|s| s.is_ipv4() == dst.is_ipv4() && *s != dst.ip()) {
            match transparent_socket(dst, src, mark) {
                Ok(sock) => {
                    let stream = sock.connect(dst).await?;
                    return Ok((stream, SourceBinding::Original(src), None));
                }
                Err(e) => fallback = Some(e),
            }
        }
        let sock = marked_socket(dst, mark)?;
        Ok((sock.connect(dst).await?, SourceBinding::Kernel, fallback))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out"),
        )
    })?
}

fn new_socket(dst: SocketAddr, mark: u32) -> io::Result<Socket> {
    // Non-blocking from `socket(2)` on: two fewer syscalls per connection.
    let ty = Type::STREAM.nonblocking();
    let s = Socket::new(Domain::for_address(dst), ty, Some(Protocol::TCP))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// A marked, not yet connected socket for `dst` (kernel-chosen source).
pub fn marked_socket(dst: SocketAddr, mark: u32) -> io::Result<TcpSocket> {
    Ok(TcpSocket::from_std_stream(new_socket(dst, mark)?.into()))
}

fn transparent_socket(dst: SocketAddr, src: IpAddr, mark: u32) -> io::Result<TcpSocket> {
    let s = new_socket(dst, mark)?;
    set_transparent(&SockRef::from(&s), dst.is_ipv6())?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    Ok(TcpSocket::from_std_stream(s.into()))
}

/// Closes `stream` with a TCP reset (SO_LINGER 0): a refused connection
/// looks refused to the client instead of like an empty reply.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Local addresses of this network namespace (the pod's IPs), excluding
/// loopback; used to recognise connections to the pod itself.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn marked_listener_and_connect() {
        // Setting SO_MARK needs CAP_NET_ADMIN; without it, use mark 0.
        let mark = if nix::unistd::geteuid().is_root() {
            0x539
        } else {
            0
        };
        let l = listener("127.0.0.1:0".parse().unwrap(), mark, false).unwrap();
        let addr = l.local_addr().unwrap();
        if mark != 0 {
            assert_eq!(SockRef::from(&l).mark().unwrap(), 0x539);
        }
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        let (mut c, binding, why) = connect(addr, None, mark, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(binding, SourceBinding::Kernel);
        assert!(why.is_none());
        if mark != 0 {
            assert_eq!(SockRef::from(&c).mark().unwrap(), 0x539);
        }
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn original_dst_absent_without_nat() {
        let l = listener("127.0.0.1:0".parse().unwrap(), 0, false).unwrap();
        let addr = l.local_addr().unwrap();
        let c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        // No conntrack NAT entry: the error says what was tried.
        match original_dst(&s) {
            Ok(a) => assert_eq!(a, addr, "without NAT the original dst is the local address"),
            Err(e) => assert!(e.to_string().contains("SO_ORIGINAL_DST"), "{e}"),
        }
        drop(c);
    }

    #[test]
    fn canonicalises_mapped_addresses() {
        let a: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(a), "10.0.0.1:80".parse::<SocketAddr>().unwrap());
    }
}
