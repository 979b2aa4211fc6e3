//! The shim's side of the listener handover (the protocol is
//! `sidetunnel_contract::handover`): one socket pair per proxy process, a
//! thread reading what the proxy says on it, and the listeners the shim
//! holds between proxies.
//!
//! What arrives is checked before it is kept: the proxy runs as an
//! unprivileged user and may be a broken or hostile build, so a malformed
//! message, a descriptor count that does not match the names, or a
//! descriptor that is not a listening socket is logged and dropped.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair,
};
use sidetunnel_contract::handover::{self, ListenerName, MAX_LISTENERS, MAX_MESSAGE, Message};
use tokio::sync::mpsc;

/// What a proxy said on its channel.
#[derive(Debug)]
pub enum Event {
    Listeners(Held),
    Ready { version: String, binary: String },
}

/// Listening sockets the shim keeps for the next proxy, in the order they
/// are handed down.
#[derive(Debug, Default)]
pub struct Held(Vec<(ListenerName, OwnedFd)>);

impl Held {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(descriptor to pass, name)` pairs, in descriptor order.
    pub fn fds(&self) -> Vec<(RawFd, ListenerName)> {
        self.0.iter().map(|(n, fd)| (fd.as_raw_fd(), *n)).collect()
    }

    /// [`handover::LISTEN_FDS_ENV`]'s value for these listeners.
    pub fn names(&self) -> String {
        let names: Vec<ListenerName> = self.0.iter().map(|(n, _)| *n).collect();
        handover::render_listen_fds(&names)
    }
}

/// A fresh channel: the shim's end and the end the proxy inherits. Both
/// are close-on-exec; the launcher's spawn places the proxy's end at
/// [`handover::CHANNEL_FD`].
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Reads the shim's end until the proxy's side closes (the proxy exited),
/// forwarding each valid message. Runs on its own thread: blocking reads of
/// a few datagrams per proxy life.
pub fn read_events(fd: OwnedFd, pid: i32) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("proxy-channel".into())
        .spawn(move || {
            loop {
                match receive(&fd) {
                    Ok(None) => return,
                    Ok(Some(ev)) => {
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(pid, "proxy handover channel: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, "proxy handover channel: no reader thread: {e}");
    }
    rx
}

/// One datagram; `None` at end of stream.
fn receive(fd: &OwnedFd) -> Result<Option<Event>, String> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
    let (n, fds, truncated) = loop {
        match recvmsg::<()>(
            fd.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(|e| format!("control data: {e}"))? {
                    if let ControlMessageOwned::ScmRights(got) = c {
                        // SAFETY: received just now with MSG_CMSG_CLOEXEC;
                        // nothing else owns them.
                        fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("receive: {e}")),
        }
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err("message or descriptors truncated; dropped".into());
    }
    let msg = Message::decode(&buf[..n]).map_err(|e| e.to_string())?;
    match msg {
        Message::Listeners(names) => {
            if names.len() != fds.len() {
                return Err(format!(
                    "{} listener names but {} descriptors; dropped",
                    names.len(),
                    fds.len()
                ));
            }
            let mut held = Vec::new();
            for (name, fd) in names.into_iter().zip(fds) {
                if held.iter().any(|(n, _)| *n == name) {
                    return Err(format!("listener {} sent twice; dropped", name.as_str()));
                }
                check_listener(&fd)
                    .map_err(|e| format!("listener {}: {e}; dropped", name.as_str()))?;
                held.push((name, fd));
            }
            Ok(Some(Event::Listeners(Held(held))))
        }
        Message::Ready { version, binary } => {
            if !fds.is_empty() {
                return Err("descriptors attached to a ready message; dropped".into());
            }
            Ok(Some(Event::Ready { version, binary }))
        }
    }
}

/// A listening TCP (IPv4/IPv6) or Unix stream socket.
fn check_listener(fd: &OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{SockaddrLike, getsockname, getsockopt, sockopt};
    let listening =
        getsockopt(fd, sockopt::AcceptConn).map_err(|e| format!("not a socket ({e})"))?;
    if !listening {
        return Err("not a listening socket".into());
    }
    if getsockopt(fd, sockopt::SockType).map_err(|e| e.to_string())? != SockType::Stream {
        return Err("not a stream socket".into());
    }
    let addr: nix::sys::socket::SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6 | AddressFamily::Unix) => Ok(()),
        other => Err(format!("unexpected address family {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};

    fn send(fd: &OwnedFd, text: &str, fds: &[RawFd]) {
        let iov = [std::io::IoSlice::new(text.as_bytes())];
        let c = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &c };
        sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }

    #[test]
    fn valid_messages_pass_bad_ones_are_dropped() {
        let (shim, proxy) = pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();

        send(&proxy, "listeners outbound", &[l.as_raw_fd()]);
        match receive(&shim).unwrap() {
            Some(Event::Listeners(h)) => {
                assert_eq!(h.names(), "outbound");
                let (fd, _) = h.fds()[0];
                assert_ne!(fd, l.as_raw_fd(), "a new descriptor, not ours");
            }
            other => panic!("{other:?}"),
        }
        send(&proxy, "listeners outbound hbone", &[l.as_raw_fd()]);
        assert!(
            receive(&shim)
                .unwrap_err()
                .contains("2 listener names but 1")
        );
        send(&proxy, "listeners metrics", &[not_listening.as_raw_fd()]);
        assert!(receive(&shim).unwrap_err().contains("metrics"));
        send(&proxy, "listeners admin", &[file.as_raw_fd()]);
        assert!(receive(&shim).unwrap_err().contains("not a socket"));
        send(&proxy, "ready 1.2.3 1:2:3:4.000000005", &[]);
        assert!(matches!(
            receive(&shim).unwrap(),
            Some(Event::Ready { version, .. }) if version == "1.2.3"
        ));
        send(&proxy, "hello", &[]);
        assert!(receive(&shim).unwrap_err().contains("malformed"));
        drop(proxy);
        assert!(receive(&shim).unwrap().is_none());
    }
}
