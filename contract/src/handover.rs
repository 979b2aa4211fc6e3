//! The listener handover between the shim and successive proxy processes of
//! one pod, which lets the shim replace the proxy (a new binary, or a
//! restart after a crash) without a moment in which the pod's proxy ports
//! refuse a connection.
//!
//! * The shim starts every proxy with one end of a `SOCK_SEQPACKET` Unix
//!   socket pair at descriptor [`CHANNEL_FD`] and says so in [`CHANNEL_ENV`].
//! * A proxy that bound its listeners itself sends them to the shim at once
//!   ([`Message::Listeners`], the descriptors attached with `SCM_RIGHTS` in
//!   the order of the names). The shim keeps a copy of each, so the sockets,
//!   and the connections queued on them, outlive any one proxy process.
//! * The shim starts later proxies with those listeners inherited at
//!   descriptors [`LISTEN_FDS_START`]`..`, their names in [`LISTEN_FDS_ENV`]
//!   (comma separated, in descriptor order). Such a proxy binds nothing it
//!   inherited; it checks each descriptor is a listening socket on the
//!   port its settings name, and refuses to start otherwise.
//! * Once ready (certificate and first xDS), a proxy sends
//!   [`Message::Ready`] with its version and the identity of its binary.
//! * The shim tells the old proxy to hand over with [`HANDOVER_SIGNAL`]:
//!   it stops accepting on every listener at once (the new proxy accepts
//!   on the same sockets), lets its open connections finish within its
//!   drain grace period, and exits. SIGTERM keeps its meaning (a pod
//!   shutdown: readiness answers 503 while draining).
//!
//! The messages are single datagrams of UTF-8 text, one word per field, so
//! both sides parse them without a serialization library.

/// Descriptor of the proxy's end of the handover channel.
pub const CHANNEL_FD: i32 = 4;
/// Set (to [`CHANNEL_FD`]'s number) when the channel is there.
pub const CHANNEL_ENV: &str = "SIDETUNNEL_HANDOVER_FD";
/// First inherited listener's descriptor.
pub const LISTEN_FDS_START: i32 = 5;
/// Names of the inherited listeners, comma separated, in descriptor order.
pub const LISTEN_FDS_ENV: &str = "SIDETUNNEL_LISTEN_FDS";
/// The signal that asks a proxy to hand over: `SIGUSR1`. (Each side names
/// it through its own signal bindings; the number is Linux's on x86 and
/// ARM.)
pub const HANDOVER_SIGNAL_NAME: &str = "SIGUSR1";

/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 1024;
/// Most listeners one message may carry.
pub const MAX_LISTENERS: usize = 16;

/// The listeners a proxy holds, by the names both sides use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerName {
    Outbound,
    InboundPlaintext,
    Hbone,
    Metrics,
    Readiness,
    Dns,
    DnsTcp,
    /// The admin Unix socket.
    Admin,
}

impl ListenerName {
    pub const ALL: [ListenerName; 8] = [
        ListenerName::Outbound,
        ListenerName::InboundPlaintext,
        ListenerName::Hbone,
        ListenerName::Metrics,
        ListenerName::Readiness,
        ListenerName::Dns,
        ListenerName::DnsTcp,
        ListenerName::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ListenerName::Outbound => "outbound",
            ListenerName::InboundPlaintext => "inbound_plaintext",
            ListenerName::Hbone => "hbone",
            ListenerName::Metrics => "metrics",
            ListenerName::Readiness => "readiness",
            ListenerName::Dns => "dns",
            ListenerName::DnsTcp => "dns_tcp",
            ListenerName::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<ListenerName, HandoverError> {
        ListenerName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| HandoverError::UnknownListener(s.to_string()))
    }
}

/// Parses [`LISTEN_FDS_ENV`]'s value: distinct known names, at most
/// [`MAX_LISTENERS`].
pub fn parse_listen_fds(value: &str) -> Result<Vec<ListenerName>, HandoverError> {
    let mut names = Vec::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let name = ListenerName::parse(part)?;
        if names.contains(&name) {
            return Err(HandoverError::DuplicateListener(part.to_string()));
        }
        names.push(name);
    }
    if names.len() > MAX_LISTENERS {
        return Err(HandoverError::TooManyListeners(names.len()));
    }
    Ok(names)
}

/// Renders [`LISTEN_FDS_ENV`]'s value.
pub fn render_listen_fds(names: &[ListenerName]) -> String {
    names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// One datagram on the handover channel, proxy → shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `listeners NAME…`: the attached descriptors, in this order.
    Listeners(Vec<ListenerName>),
    /// `ready VERSION BINARY`: the proxy is ready; its version and the
    /// identity of the binary it runs (`dev:inode:size:mtime`, see
    /// [`binary_identity`]).
    Ready { version: String, binary: String },
}

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Listeners(names) => {
                let mut s = String::from("listeners");
                for n in names {
                    s.push(' ');
                    s.push_str(n.as_str());
                }
                s
            }
            Message::Ready { version, binary } => format!("ready {version} {binary}"),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, HandoverError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(HandoverError::TooLong(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| HandoverError::NotText)?;
        let mut words = text.split_ascii_whitespace();
        match words.next() {
            Some("listeners") => {
                let names = words
                    .map(ListenerName::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                if names.len() > MAX_LISTENERS {
                    return Err(HandoverError::TooManyListeners(names.len()));
                }
                Ok(Message::Listeners(names))
            }
            Some("ready") => {
                let (Some(version), Some(binary), None) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(HandoverError::Malformed(text.to_string()));
                };
                Ok(Message::Ready {
                    version: version.to_string(),
                    binary: binary.to_string(),
                })
            }
            _ => Err(HandoverError::Malformed(text.to_string())),
        }
    }
}

/// How a binary is told apart from its replacement without reading it:
/// device, inode, size and modification time (seconds.nanoseconds). An
/// installed update (a new file renamed over the path) always changes the
/// inode; an in-place rewrite changes size or mtime.
pub fn binary_identity(dev: u64, ino: u64, size: u64, mtime_s: i64, mtime_ns: i64) -> String {
    format!("{dev}:{ino}:{size}:{mtime_s}.{mtime_ns:09}")
}

/// [`binary_identity`] of the file at `path` now (symlinks followed, so
/// `/proc/self/exe` names the running binary even after it was replaced).
pub fn identity_of(path: &std::path::Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(binary_identity(
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
    ))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoverError {
    #[error("unknown listener name {0:?}")]
    UnknownListener(String),
    #[error("listener {0:?} named twice")]
    DuplicateListener(String),
    #[error("{0} listeners (at most {MAX_LISTENERS})")]
    TooManyListeners(usize),
    #[error("handover message of {0} bytes (at most {MAX_MESSAGE})")]
    TooLong(usize),
    #[error("handover message is not UTF-8 text")]
    NotText,
    #[error("malformed handover message {0:?}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Listeners(vec![ListenerName::Outbound, ListenerName::Admin]),
            Message::Listeners(Vec::new()),
            Message::Ready {
                version: "0.1.0".into(),
                binary: binary_identity(2049, 77, 1234, 1_700_000_000, 5),
            },
        ] {
            assert_eq!(Message::decode(m.encode().as_bytes()), Ok(m));
        }
    }

    #[test]
    fn bad_messages_are_named() {
        assert!(matches!(
            Message::decode(b"listeners outbound smtp"),
            Err(HandoverError::UnknownListener(n)) if n == "smtp"
        ));
        assert!(matches!(
            Message::decode(b"ready 1.0"),
            Err(HandoverError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(b"ready 1.0 a b"),
            Err(HandoverError::Malformed(_))
        ));
        assert_eq!(Message::decode(b"\xff"), Err(HandoverError::NotText));
        assert_eq!(
            Message::decode(&[b'a'; MAX_MESSAGE + 1]),
            Err(HandoverError::TooLong(MAX_MESSAGE + 1))
        );
        assert!(matches!(
            Message::decode(b""),
            Err(HandoverError::Malformed(_))
        ));
    }

    #[test]
    fn identity_changes_when_the_file_is_replaced() {
        let dir = std::env::temp_dir().join(format!("handover-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (p, tmp) = (dir.join("proxy"), dir.join("proxy.new"));
        std::fs::write(&p, b"one").unwrap();
        let first = identity_of(&p).unwrap();
        assert_eq!(identity_of(&p).unwrap(), first);
        std::fs::write(&tmp, b"one").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let second = identity_of(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(second, first, "a renamed-over copy");
    }

    #[test]
    fn listen_fds_value() {
        let names = [ListenerName::Outbound, ListenerName::Hbone];
        assert_eq!(render_listen_fds(&names), "outbound,hbone");
        assert_eq!(parse_listen_fds("outbound,hbone").unwrap(), names);
        assert_eq!(parse_listen_fds("").unwrap(), []);
        assert_eq!(
            parse_listen_fds("hbone,hbone"),
            Err(HandoverError::DuplicateListener("hbone".into()))
        );
        assert!(parse_listen_fds("hbone,ftp").is_err());
    }
}
