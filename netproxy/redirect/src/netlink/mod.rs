//! Netlink sockets bound to a pod's network namespace, and request/ack
//! exchange on them. A netlink socket stays in the namespace it was created
//! in, so a short-lived thread enters the namespace, creates the sockets
//! and hands them back: the caller's threads (the shim's tokio runtime)
//! never change namespace and nothing is spawned.

pub(crate) mod msg;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use msg::{Builder, NLM_F_ACK_TLVS, NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN};

use crate::Error;
use crate::netns::Netns;

pub(crate) const NETLINK_ROUTE: libc::c_int = libc::NETLINK_ROUTE;
pub(crate) const NETLINK_NETFILTER: libc::c_int = libc::NETLINK_NETFILTER;

const SOL_NETLINK: libc::c_int = 270;
/// Report errors with the kernel's message (extended ack).
const NETLINK_EXT_ACK: libc::c_int = 11;
/// Do not echo the failed request back in an error.
const NETLINK_CAP_ACK: libc::c_int = 10;
/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// A kernel that never answers must not hang sandbox creation.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
const RECV_BUF: usize = 64 * 1024;
/// Requests up to this size fit any default socket send buffer.
const DEFAULT_SNDBUF: usize = 64 * 1024;
/// The socket-opening thread makes three syscalls.
const THREAD_STACK: usize = 64 * 1024;

/// One netlink socket in a namespace.
pub(crate) struct Socket {
    fd: OwnedFd,
    netns: PathBuf,
    seq: u32,
}

/// The kernel's answer to one request message.
pub(crate) struct Ack {
    pub seq: u32,
    /// 0 on success, else a positive errno.
    pub errno: i32,
    /// The extended ack's text, when the kernel gave one.
    pub detail: Option<String>,
}

impl Ack {
    /// The failure as an `Error` naming `what` failed.
    pub fn error(&self, what: &str, netns: &std::path::Path) -> Error {
        Error::Netlink {
            what: what.to_string(),
            netns: netns.to_path_buf(),
            source: std::io::Error::from_raw_os_error(self.errno),
            detail: self.detail.clone().unwrap_or_default(),
        }
    }
}

/// Opens one socket per protocol inside `ns`.
pub(crate) fn open_in<const N: usize>(
    ns: &Netns,
    protocols: [libc::c_int; N],
) -> Result<[Socket; N], Error> {
    let netns_err = |source| Error::Netns {
        path: ns.path.clone(),
        source,
    };
    let fds = std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("netns-sockets".into())
            .stack_size(THREAD_STACK);
        let spawned = thread.spawn_scoped(s, || -> Result<Vec<OwnedFd>, Error> {
            // This thread alone enters the namespace and ends right after.
            nix::sched::setns(&ns.file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| netns_err(e.into()))?;
            protocols
                .iter()
                .map(|&p| open_socket(p).map_err(|e| sock_err(ns, p, e)))
                .collect()
        });
        match spawned {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                Err(netns_err(std::io::Error::other(
                    "netlink socket thread panicked",
                )))
            }),
            Err(e) => Err(netns_err(e)),
        }
    })?;
    let sockets: Vec<Socket> = fds
        .into_iter()
        .map(|fd| Socket {
            fd,
            netns: ns.path.clone(),
            seq: 0,
        })
        .collect();
    sockets
        .try_into()
        .map_err(|_| netns_err(std::io::Error::other("wrong number of netlink sockets")))
}

fn sock_err(ns: &Netns, protocol: libc::c_int, source: std::io::Error) -> Error {
    Error::Netlink {
        what: format!("open netlink socket (protocol {protocol})"),
        netns: ns.path.clone(),
        source,
        detail: String::new(),
    }
}

fn open_socket(protocol: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
        // Older kernels lack these; errors then just come without text.
        let _ = setsockopt_int(&fd, SOL_NETLINK, opt, 1);
    }
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: valid fd, option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: valid fd, c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Socket {
    /// Closes the socket on a detached thread. Closing an nfnetlink socket
    /// waits (nf_tables' NETLINK_URELEASE handler) until the kernel has
    /// freed the last transaction, an RCU grace period later: about 10 ms
    /// that nothing needs to wait for.
    pub fn close_in_background(self) {
        let closer = std::thread::Builder::new()
            .name("netlink-close".into())
            .stack_size(THREAD_STACK);
        // No thread to be had: the closure, socket inside, is dropped
        // here, which only closes it slower.
        let _ = closer.spawn(move || drop(self));
    }

    /// The next sequence number, for the message about to be built.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn netns(&self) -> &std::path::Path {
        &self.netns
    }

    /// Sends `req` and collects the acks of the messages numbered `expect`
    /// (each sent with NLM_F_ACK). Stops early once an error arrived and
    /// nothing more is queued: a batch the kernel refused as a whole
    /// answers only its first message.
    pub fn transact(&self, what: &str, req: &Builder, expect: &[u32]) -> Result<Vec<Ack>, Error> {
        if req.oversized() {
            return Err(Error::Config(format!(
                "{what}: a netlink attribute would exceed 64 KiB (too many values in one rule)"
            )));
        }
        self.send(what, req.bytes())?;
        let mut acks: Vec<Ack> = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        while !expect.iter().all(|s| acks.iter().any(|a| a.seq == *s)) {
            let failed = acks.iter().any(|a| a.errno != 0);
            let n = match self.recv(&mut buf, failed) {
                Ok(n) => n,
                Err(e) if failed && e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(self.io_err(what, e)),
            };
            for m in msg::messages(&buf[..n]) {
                if m.ty == NLMSG_ERROR {
                    acks.push(parse_ack(m.seq, m.flags, m.payload));
                }
            }
        }
        Ok(acks)
    }

    /// Sends a dump request and returns the payloads of its answers.
    pub fn dump(&self, what: &str, req: &Builder) -> Result<Vec<Vec<u8>>, Error> {
        self.send(what, req.bytes())?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self
                .recv(&mut buf, false)
                .map_err(|e| self.io_err(what, e))?;
            for m in msg::messages(&buf[..n]) {
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let ack = parse_ack(m.seq, m.flags, m.payload);
                        if ack.errno != 0 {
                            return Err(ack.error(what, &self.netns));
                        }
                    }
                    _ => out.push(m.payload.to_vec()),
                }
                if m.flags & NLM_F_MULTI == 0 && m.ty != NLMSG_ERROR {
                    return Ok(out);
                }
            }
        }
    }

    fn send(&self, what: &str, bytes: &[u8]) -> Result<(), Error> {
        if bytes.len() > DEFAULT_SNDBUF {
            // One batch is one datagram, refused past the send buffer;
            // nft raises it the same way for large rulesets (root may
            // exceed net.core.wmem_max with SO_SNDBUFFORCE).
            let fd = &self.fd;
            let size = libc::c_int::try_from(bytes.len()).unwrap_or(libc::c_int::MAX);
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size)
                .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, size))
                .map_err(|e| self.io_err(what, e))?;
        }
        // SAFETY: valid fd and buffer; the kernel is the default peer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(self.io_err(what, std::io::Error::last_os_error()));
        }
        if n as usize != bytes.len() {
            return Err(self.io_err(what, std::io::Error::other("short netlink send")));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], nonblocking: bool) -> std::io::Result<usize> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: valid fd, writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn io_err(&self, what: &str, source: std::io::Error) -> Error {
        Error::Netlink {
            what: what.to_string(),
            netns: self.netns.clone(),
            source,
            detail: String::new(),
        }
    }
}

/// An NLMSG_ERROR payload: the error, the request's header, and with
/// NLM_F_ACK_TLVS the extended-ack attributes.
fn parse_ack(seq: u32, flags: u16, payload: &[u8]) -> Ack {
    let errno = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .map(|e| -e)
        .unwrap_or(libc::EPROTO);
    let detail = if flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK only the request's header is echoed.
        payload.get(4 + NLMSG_HDRLEN..).and_then(|tlvs| {
            msg::attrs(tlvs)
                .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
                .map(|(_, d)| {
                    String::from_utf8_lossy(d)
                        .trim_end_matches('\0')
                        .to_string()
                })
        })
    } else {
        None
    };
    Ack { seq, errno, detail }
}
