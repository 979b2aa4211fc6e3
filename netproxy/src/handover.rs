//! The proxy's side of the listener handover with the shim (the protocol
//! is `sidetunnel_contract::handover`): listeners inherited from an earlier
//! proxy of the same pod, and the channel on which this proxy gives its
//! listeners to the shim and says it is ready.
//!
//! Both are optional: a proxy started by hand, or by a shim without the
//! handover, binds its own ports and has no channel.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use sidetunnel_contract::handover::{
    self as contract, CHANNEL_ENV, CHANNEL_FD, LISTEN_FDS_ENV, LISTEN_FDS_START, ListenerName,
    Message,
};

/// Why inherited descriptors or the channel cannot be used. The proxy
/// refuses to start: binding afresh would clash with the very sockets it
/// was given.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{LISTEN_FDS_ENV}: {0}")]
    Names(#[from] contract::HandoverError),
    #[error("inherited listener {name} (descriptor {fd}): {problem}")]
    Listener {
        name: &'static str,
        fd: RawFd,
        problem: String,
    },
    #[error("{CHANNEL_ENV}={value}: {problem}")]
    Channel { value: String, problem: String },
}

/// Listeners handed down by the shim, by name, not yet taken.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: BTreeMap<ListenerName, OwnedFd>,
}

impl Inherited {
    /// Reads [`LISTEN_FDS_ENV`]: each named descriptor must be open and a
    /// listening socket. They become close-on-exec (the proxy runs nothing,
    /// but nothing should leak if it ever does).
    pub fn from_env() -> Result<Inherited, HandoverError> {
        let Ok(value) = std::env::var(LISTEN_FDS_ENV) else {
            return Ok(Inherited::default());
        };
        let names = contract::parse_listen_fds(&value)?;
        let mut fds = BTreeMap::new();
        for (i, name) in names.into_iter().enumerate() {
            let fd = LISTEN_FDS_START + i as RawFd;
            let fail = |problem: String| HandoverError::Listener {
                name: name.as_str(),
                fd,
                problem,
            };
            // SAFETY: F_GETFD/F_SETFD only probe and set a descriptor flag.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(fail(format!("not open: {}", io::Error::last_os_error())));
            }
            // SAFETY: the descriptor is open (checked above) and was given
            // to this process for exactly this use; nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let sock = socket2::SockRef::from(&owned);
            match sock.is_listener() {
                Ok(true) => {}
                Ok(false) => return Err(fail("a socket, but not listening".into())),
                Err(e) => return Err(fail(format!("not a socket: {e}"))),
            }
            fds.insert(name, owned);
        }
        Ok(Inherited { fds })
    }

    /// The inherited TCP listener `name`, checked to be bound to `port`;
    /// `None` when none was inherited.
    pub fn take_tcp(
        &mut self,
        name: ListenerName,
        port: u16,
    ) -> Result<Option<std::net::TcpListener>, HandoverError> {
        let Some(fd) = self.fds.remove(&name) else {
            return Ok(None);
        };
        let raw = fd.as_raw_fd();
        let l = std::net::TcpListener::from(fd);
        let fail = |problem: String| HandoverError::Listener {
            name: name.as_str(),
            fd: raw,
            problem,
        };
        let local = l
            .local_addr()
            .map_err(|e| fail(format!("not a TCP socket: {e}")))?;
        if local.port() != port {
            return Err(fail(format!(
                "bound to port {}, the settings say {port}",
                local.port()
            )));
        }
        l.set_nonblocking(true)
            .map_err(|e| fail(format!("set non-blocking: {e}")))?;
        Ok(Some(l))
    }

    /// The inherited Unix listener `name`; `None` when none was inherited.
    pub fn take_unix(
        &mut self,
        name: ListenerName,
    ) -> Result<Option<std::os::unix::net::UnixListener>, HandoverError> {
        let Some(fd) = self.fds.remove(&name) else {
            return Ok(None);
        };
        let raw = fd.as_raw_fd();
        let l = std::os::unix::net::UnixListener::from(fd);
        l.local_addr().map_err(|e| HandoverError::Listener {
            name: name.as_str(),
            fd: raw,
            problem: format!("not a Unix socket: {e}"),
        })?;
        l.set_nonblocking(true)
            .map_err(|e| HandoverError::Listener {
                name: name.as_str(),
                fd: raw,
                problem: format!("set non-blocking: {e}"),
            })?;
        Ok(Some(l))
    }

    /// Whether nothing was inherited (a first start).
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Names inherited but not taken (settings that no longer use them).
    pub fn leftover(&self) -> Vec<&'static str> {
        self.fds.keys().map(|n| n.as_str()).collect()
    }
}

/// The proxy's end of the handover channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// The channel named by [`CHANNEL_ENV`], if any.
    pub fn from_env() -> Result<Option<Channel>, HandoverError> {
        let Ok(value) = std::env::var(CHANNEL_ENV) else {
            return Ok(None);
        };
        let fail = |problem: String| HandoverError::Channel {
            value: value.clone(),
            problem,
        };
        if value.trim() != CHANNEL_FD.to_string() {
            return Err(fail(format!(
                "the channel is always descriptor {CHANNEL_FD}"
            )));
        }
        // SAFETY: as in `Inherited::from_env`.
        if unsafe { libc::fcntl(CHANNEL_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(fail(format!("not open: {}", io::Error::last_os_error())));
        }
        // SAFETY: open (checked above), given to this process for this use.
        let fd = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
        match socket2::SockRef::from(&fd).r#type() {
            Ok(t) if t == socket2::Type::SEQPACKET => Ok(Some(Channel { fd })),
            Ok(t) => Err(fail(format!("socket type {t:?}, expected SOCK_SEQPACKET"))),
            Err(e) => Err(fail(format!("not a socket: {e}"))),
        }
    }

    /// Sends `listeners` to the shim, descriptors attached in order.
    pub fn send_listeners(&self, listeners: &[(ListenerName, BorrowedFd<'_>)]) -> io::Result<()> {
        let names = listeners.iter().map(|(n, _)| *n).collect();
        let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        self.send(&Message::Listeners(names), &fds)
    }

    /// Tells the shim this proxy is ready.
    pub fn send_ready(&self) -> io::Result<()> {
        let binary = running_binary().unwrap_or_else(|e| format!("unknown({e})").replace(' ', "_"));
        self.send(
            &Message::Ready {
                version: env!("CARGO_PKG_VERSION").to_string(),
                binary,
            },
            &[],
        )
    }

    fn send(&self, msg: &Message, fds: &[RawFd]) -> io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let text = msg.encode();
        let iov = [io::IoSlice::new(text.as_bytes())];
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        sendmsg::<()>(
            self.fd.as_fd().as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(io::Error::from)
    }
}

/// The identity of the binary this process runs (see
/// [`contract::identity_of`]).
pub fn running_binary() -> io::Result<String> {
    contract::identity_of(std::path::Path::new("/proc/self/exe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener passed over a SEQPACKET pair arrives as a usable
    /// listening socket with its name, as the shim receives it.
    #[test]
    fn listeners_cross_the_channel() {
        use nix::sys::socket::{
            AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let channel = Channel { fd: ours };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        channel
            .send_listeners(&[(ListenerName::Outbound, l.as_fd())])
            .unwrap();
        let mut buf = [0u8; contract::MAX_MESSAGE];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = recvmsg::<()>(
            theirs.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut got = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                got.extend(fds);
            }
        }
        let n = msg.bytes;
        assert_eq!(
            Message::decode(&buf[..n]).unwrap(),
            Message::Listeners(vec![ListenerName::Outbound])
        );
        assert_eq!(got.len(), 1);
        // SAFETY: received just now, owned by nothing else.
        let received = unsafe { OwnedFd::from_raw_fd(got[0]) };
        let received = std::net::TcpListener::from(received);
        assert_eq!(received.local_addr().unwrap(), l.local_addr().unwrap());
        assert!(running_binary().unwrap().split(':').count() == 4);
    }
}
