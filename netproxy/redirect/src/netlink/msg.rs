//! Netlink message framing: building a message (header, family header,
//! attributes, nested attributes) and walking the messages and attributes
//! the kernel sends back. Byte order is the caller's: nf_tables wants
//! big-endian integers, rtnetlink native ones.

/// `struct nlmsghdr` is 16 bytes, `struct nlattr` 4; both align to 4.
pub(crate) const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 1 << 15;
/// Low bits of `nla_type`; the top two are flags.
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_MULTI: u16 = 0x2;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_REPLACE: u16 = 0x100;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
/// In an NLMSG_ERROR: extended-ack attributes follow.
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Messages appended one after another into one buffer (a batch, or a
/// single request).
#[derive(Default)]
pub(crate) struct Builder {
    buf: Vec<u8>,
    /// Start of the message being built.
    msg: usize,
    /// An attribute outgrew its 16-bit length: the buffer must not be sent.
    oversized: bool,
    /// Starts of the open nested attributes.
    nests: Vec<usize>,
}

impl Builder {
    /// Starts a message; `header` is the family header (nfgenmsg, rtmsg, …).
    pub fn begin(&mut self, ty: u16, flags: u16, seq: u32, header: &[u8]) {
        debug_assert!(self.nests.is_empty(), "message begun inside a nest");
        self.msg = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `end`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        self.buf.extend_from_slice(header);
        self.pad();
    }

    /// Ends the message begun last.
    pub fn end(&mut self) {
        debug_assert!(self.nests.is_empty(), "message ended inside a nest");
        let len = (self.buf.len() - self.msg) as u32;
        self.buf[self.msg..self.msg + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn put(&mut self, ty: u16, data: &[u8]) {
        let len = self.attr_len(NLA_HDRLEN + data.len());
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn put_be32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    pub fn put_ne32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_ne_bytes());
    }

    /// A NUL-terminated string attribute.
    pub fn put_str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.put(ty, &data);
    }

    /// A nested attribute holding whatever `f` puts.
    pub fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.nests.push(start);
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        self.nests.pop();
        let len = self.attr_len(self.buf.len() - start);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr_len(&mut self, len: usize) -> u16 {
        u16::try_from(len).unwrap_or_else(|_| {
            self.oversized = true;
            u16::MAX
        })
    }

    /// True when some attribute was too long for netlink (the caller
    /// reports it instead of sending a corrupt message).
    pub fn oversized(&self) -> bool {
        self.oversized
    }

    fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// One received message: its header fields and payload (after the header).
pub(crate) struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages in one datagram; stops at the first malformed one.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let msg = Msg {
            ty: u16::from_ne_bytes(buf[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(buf[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align(len).min(buf.len())..];
        Some(msg)
    })
}

/// The attributes in `buf` as (type without flags, data); stops at the
/// first malformed one.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return None;
        }
        let data = &buf[NLA_HDRLEN..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((ty, data))
    })
}

/// A native-endian u32 attribute value, if it is one.
pub(crate) fn ne32(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_walks_nested_attributes() {
        let mut b = Builder::default();
        b.begin(0x0a06, NLM_F_REQUEST, 7, &[1, 0, 0, 0]);
        b.put_str(1, "t");
        b.nest(4, |b| {
            b.put_be32(2, 0x0102_0304);
            b.put(3, &[9]);
        });
        b.end();
        let bytes = b.bytes().to_vec();
        let msgs: Vec<Msg<'_>> = messages(&bytes).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].ty, msgs[0].seq), (0x0a06, 7));
        assert_eq!(bytes.len() % 4, 0);
        let top: Vec<(u16, &[u8])> = attrs(&msgs[0].payload[4..]).collect();
        assert_eq!(top[0], (1, &b"t\0"[..]));
        assert_eq!(top[1].0, 4);
        let inner: Vec<(u16, &[u8])> = attrs(top[1].1).collect();
        assert_eq!(inner, [(2, &[1, 2, 3, 4][..]), (3, &[9][..])]);
    }

    #[test]
    fn an_attribute_past_64_kib_is_flagged_not_wrapped() {
        let mut b = Builder::default();
        b.begin(1, NLM_F_REQUEST, 1, &[]);
        b.nest(1, |b| b.put(2, &vec![0u8; 70_000]));
        b.end();
        assert!(b.oversized());
        let mut ok = Builder::default();
        ok.begin(1, NLM_F_REQUEST, 1, &[]);
        ok.put(2, &vec![0u8; 60_000]);
        ok.end();
        assert!(!ok.oversized());
    }

    #[test]
    fn truncated_input_yields_nothing_instead_of_panicking() {
        assert_eq!(messages(&[0xff; 10]).count(), 0);
        let mut bogus = vec![0u8; 20];
        bogus[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert_eq!(messages(&bogus).count(), 0);
        assert_eq!(attrs(&[8, 0, 1, 0, 1]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }
}
