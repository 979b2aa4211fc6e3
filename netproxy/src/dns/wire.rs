//! DNS messages on the wire (RFC 1035, EDNS0 OPT of RFC 6891): the strict
//! parser of queries arriving from the app, the encoder of the proxy's own
//! answers, the check of upstream responses before they are relayed, and a
//! response reader (with name compression) for clients of the proxy — the
//! tests, the benchmark, the fuzz target. Everything here is synchronous
//! and allocation-bounded by the input; bad input is an error, never a
//! panic.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 12;
/// The longest name on the wire, length bytes and the root included.
pub const MAX_NAME_WIRE: usize = 255;
/// UDP answers fit in this without EDNS0 (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The EDNS0 payload size the proxy announces and honours at most (the
/// DNS flag day 2020 value: no IP fragmentation on common paths).
pub const EDNS_UDP_LIMIT: u16 = 1232;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;

/// Response codes the proxy sends or reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// Why a message was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("{0} bytes: shorter than a DNS header")]
    Short(usize),
    #[error("not a query (QR bit set)")]
    NotQuery,
    #[error("opcode {0} is not QUERY")]
    Opcode(u8),
    #[error("{0} questions (expected 1)")]
    Questions(u16),
    #[error("answer or authority records in a query")]
    Records,
    #[error("message ends inside a field at byte {0}")]
    Truncated(usize),
    #[error("compression pointer where none may be")]
    Pointer,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("reserved label type {0:#04x}")]
    LabelType(u8),
    #[error("additional section is not a single root OPT record")]
    Additional,
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
    #[error("response id {got} does not match query id {want}")]
    Id { got: u16, want: u16 },
    #[error("response question does not match the query")]
    Question,
    #[error("compression pointer loop or forward pointer")]
    PointerLoop,
}

impl WireError {
    /// The response code a query refused for this reason gets, or `None`
    /// when no answer may be sent: without a whole header there is no id
    /// to answer to, and answering a response could start a loop.
    pub fn rcode(&self) -> Option<Rcode> {
        match self {
            WireError::Short(_) | WireError::NotQuery => None,
            WireError::Opcode(_) => Some(Rcode::NotImp),
            _ => Some(Rcode::FormErr),
        }
    }
}

/// A validated query: one question, at most an OPT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The question as received (name, type, class), echoed in answers so
    /// a client's 0x20 case randomisation survives.
    pub question: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    /// The name in lower case, dotted, without the final dot (`""` for the
    /// root); `None` when a label holds bytes no hostname has (dots,
    /// spaces, non-ASCII): such a name is never a mesh name, only forwarded.
    pub name: Option<String>,
    /// The UDP payload size of the client's OPT record, if it sent one.
    pub edns_udp_size: Option<u16>,
}

impl Query {
    /// The most bytes a UDP answer to this query may take.
    pub fn udp_limit(&self) -> usize {
        match self.edns_udp_size {
            Some(n) => (n.min(EDNS_UDP_LIMIT) as usize).max(CLASSIC_UDP_LIMIT),
            None => CLASSIC_UDP_LIMIT,
        }
    }
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, WireError> {
    buf.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(WireError::Truncated(buf.len()))
}

/// Parses a query from a client. Strict: exactly one question, no answer
/// or authority records, at most one additional record which must be an
/// OPT on the root name, nothing after it.
pub fn parse_query(buf: &[u8]) -> Result<Query, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Short(buf.len()));
    }
    let id = u16_at(buf, 0)?;
    let flags = u16_at(buf, 2)?;
    if flags & FLAG_QR != 0 {
        return Err(WireError::NotQuery);
    }
    let opcode = ((flags >> 11) & 0xf) as u8;
    if opcode != 0 {
        return Err(WireError::Opcode(opcode));
    }
    let qd = u16_at(buf, 4)?;
    if qd != 1 {
        return Err(WireError::Questions(qd));
    }
    if u16_at(buf, 6)? != 0 || u16_at(buf, 8)? != 0 {
        return Err(WireError::Records);
    }
    let ar = u16_at(buf, 10)?;
    let (name, end) = read_plain_name(buf, HEADER_LEN)?;
    let qtype = u16_at(buf, end)?;
    let qclass = u16_at(buf, end + 2)?;
    let question_end = end + 4;
    let mut at = question_end;
    let mut edns_udp_size = None;
    match ar {
        0 => {}
        1 => {
            // OPT: root name, type 41, class = payload size, TTL = extended
            // rcode/version/flags, then RDATA (options, not interpreted).
            if buf.get(at) != Some(&0) {
                return Err(if at >= buf.len() {
                    WireError::Truncated(buf.len())
                } else {
                    WireError::Additional
                });
            }
            if u16_at(buf, at + 1)? != TYPE_OPT {
                return Err(WireError::Additional);
            }
            edns_udp_size = Some(u16_at(buf, at + 3)?);
            let rdlen = u16_at(buf, at + 9)? as usize;
            at += 11;
            if buf.len() < at + rdlen {
                return Err(WireError::Truncated(buf.len()));
            }
            at += rdlen;
        }
        _ => return Err(WireError::Additional),
    }
    if at != buf.len() {
        return Err(WireError::Trailing(buf.len() - at));
    }
    Ok(Query {
        id,
        recursion_desired: flags & FLAG_RD != 0,
        checking_disabled: flags & FLAG_CD != 0,
        question: buf[HEADER_LEN..question_end].to_vec(),
        qtype,
        qclass,
        name,
        edns_udp_size,
    })
}

/// Reads an uncompressed name at `at`: the dotted lower-case form if every
/// label is hostname-like, and the offset after the name.
fn read_plain_name(buf: &[u8], mut at: usize) -> Result<(Option<String>, usize), WireError> {
    let start = at;
    let mut out = String::new();
    let mut plain = true;
    loop {
        let len = *buf.get(at).ok_or(WireError::Truncated(buf.len()))?;
        match len & 0xc0 {
            0 => {}
            0xc0 => return Err(WireError::Pointer),
            t => return Err(WireError::LabelType(t)),
        }
        let len = len as usize;
        if at + 1 + len - start > MAX_NAME_WIRE {
            return Err(WireError::NameTooLong);
        }
        if len == 0 {
            return Ok((plain.then_some(out), at + 1));
        }
        let label = buf
            .get(at + 1..at + 1 + len)
            .ok_or(WireError::Truncated(buf.len()))?;
        if plain {
            if label
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
            {
                if !out.is_empty() {
                    out.push('.');
                }
                out.extend(label.iter().map(|c| c.to_ascii_lowercase() as char));
            } else {
                plain = false;
            }
        }
        at += 1 + len;
    }
}

/// Appends `name` (dotted, no final dot) in wire form; `None` if a label is
/// empty or over 63 bytes or the whole is over 255.
fn put_name(out: &mut Vec<u8>, name: &str) -> Option<()> {
    let start = out.len();
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    (out.len() - start <= MAX_NAME_WIRE).then_some(())
}

/// What an answer record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    /// Any other type, kept as its type number (responses only).
    Other(u16),
}

/// One answer record; `owner` `None` is the question's name (encoded as a
/// pointer to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub owner: Option<String>,
    pub ttl: u32,
    pub data: RData,
}

fn header(out: &mut Vec<u8>, q: &Query, rcode: Rcode, aa: bool, tc: bool, counts: [u16; 4]) {
    let mut flags = FLAG_QR | FLAG_RA | rcode as u16;
    if aa {
        flags |= FLAG_AA;
    }
    if tc {
        flags |= FLAG_TC;
    }
    if q.recursion_desired {
        flags |= FLAG_RD;
    }
    if q.checking_disabled {
        flags |= FLAG_CD;
    }
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

/// Encodes the proxy's own answer to `q`. Records that cannot be encoded
/// (a name that is not a valid DNS name) make it `None`, for the caller
/// to answer SERVFAIL. If the message would exceed `limit` bytes it goes
/// out truncated (TC set, no records) and the client retries over TCP.
pub fn encode_answer(
    q: &Query,
    rcode: Rcode,
    authoritative: bool,
    records: &[Record],
    limit: usize,
) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(256);
    for r in records {
        match &r.owner {
            None => body.extend_from_slice(&[0xc0, HEADER_LEN as u8]),
            Some(n) => put_name(&mut body, n)?,
        }
        let (rtype, rdata) = match &r.data {
            RData::A(ip) => (TYPE_A, ip.octets().to_vec()),
            RData::Aaaa(ip) => (TYPE_AAAA, ip.octets().to_vec()),
            RData::Cname(n) => {
                let mut v = Vec::new();
                put_name(&mut v, n)?;
                (TYPE_CNAME, v)
            }
            RData::Other(_) => return None,
        };
        body.extend_from_slice(&rtype.to_be_bytes());
        body.extend_from_slice(&CLASS_IN.to_be_bytes());
        body.extend_from_slice(&r.ttl.to_be_bytes());
        body.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        body.extend_from_slice(&rdata);
    }
    let opt_len = if q.edns_udp_size.is_some() { 11 } else { 0 };
    let fits = HEADER_LEN + q.question.len() + body.len() + opt_len <= limit;
    let answers = if fits { records.len() as u16 } else { 0 };
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + body.len() + opt_len);
    header(
        &mut out,
        q,
        rcode,
        authoritative,
        !fits,
        [1, answers, 0, u16::from(opt_len > 0)],
    );
    out.extend_from_slice(&q.question);
    if fits {
        out.extend_from_slice(&body);
    }
    if opt_len > 0 {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_UDP_LIMIT.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    Some(out)
}

/// An error answer to a message that did not parse as a query, or `None`
/// when it may not be answered (see [`WireError::rcode`]). It carries the
/// id, opcode and RD bit of the message and no question.
pub fn error_answer(buf: &[u8], err: &WireError) -> Option<Vec<u8>> {
    let rcode = err.rcode()?;
    let id = u16_at(buf, 0).ok()?;
    let flags = u16_at(buf, 2).ok()?;
    let flags = FLAG_QR | FLAG_RA | (flags & (0x7800 | FLAG_RD)) | rcode as u16;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// Checks that `resp` from an upstream resolver answers `q`: same id, a
/// response, and the same question (case aside) — or no question with an
/// error rcode, which some servers send for refused queries.
pub fn check_response(q: &Query, resp: &[u8]) -> Result<(), WireError> {
    if resp.len() < HEADER_LEN {
        return Err(WireError::Short(resp.len()));
    }
    let id = u16_at(resp, 0)?;
    if id != q.id {
        return Err(WireError::Id {
            got: id,
            want: q.id,
        });
    }
    let flags = u16_at(resp, 2)?;
    if flags & FLAG_QR == 0 {
        return Err(WireError::Question);
    }
    match u16_at(resp, 4)? {
        0 if flags & 0xf != 0 => Ok(()),
        1 => {
            let got = resp
                .get(HEADER_LEN..HEADER_LEN + q.question.len())
                .ok_or(WireError::Truncated(resp.len()))?;
            if got.eq_ignore_ascii_case(&q.question) {
                Ok(())
            } else {
                Err(WireError::Question)
            }
        }
        n => Err(WireError::Questions(n)),
    }
}

/// Builds a query for `name` (dotted, no final dot) with RD set and, with
/// `edns`, an OPT record announcing that payload size.
pub fn build_query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&FLAG_RD.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    put_name(&mut out, name)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    if let Some(size) = edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    Some(out)
}

/// A response as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    pub authoritative: bool,
    pub truncated: bool,
    /// The question's name, lower case (empty if there was no question).
    pub name: String,
    pub answers: Vec<Record>,
}

/// Reads a response (compression allowed): header, question, answers;
/// authority and additional records are not read.
pub fn parse_response(buf: &[u8]) -> Result<Response, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Short(buf.len()));
    }
    let flags = u16_at(buf, 2)?;
    let qd = u16_at(buf, 4)?;
    let an = u16_at(buf, 6)?;
    if qd > 1 {
        return Err(WireError::Questions(qd));
    }
    let mut at = HEADER_LEN;
    let mut name = String::new();
    if qd == 1 {
        let (n, end) = read_name(buf, at)?;
        name = n;
        at = end + 4;
        if at > buf.len() {
            return Err(WireError::Truncated(buf.len()));
        }
    }
    let mut answers = Vec::with_capacity(an.min(64) as usize);
    for _ in 0..an {
        let (owner, end) = read_name(buf, at)?;
        let rtype = u16_at(buf, end)?;
        let ttl = u16_at(buf, end + 4)? as u32 * 65536 + u16_at(buf, end + 6)? as u32;
        let rdlen = u16_at(buf, end + 8)? as usize;
        let rd_at = end + 10;
        let rdata = buf
            .get(rd_at..rd_at + rdlen)
            .ok_or(WireError::Truncated(buf.len()))?;
        let data = match (rtype, rdlen) {
            (TYPE_A, 4) => RData::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(rdata);
                RData::Aaaa(Ipv6Addr::from(o))
            }
            (TYPE_CNAME, _) => RData::Cname(read_name(buf, rd_at)?.0),
            (t, _) => RData::Other(t),
        };
        answers.push(Record {
            owner: Some(owner),
            ttl,
            data,
        });
        at = rd_at + rdlen;
    }
    Ok(Response {
        id: u16_at(buf, 0)?,
        rcode: (flags & 0xf) as u8,
        authoritative: flags & FLAG_AA != 0,
        truncated: flags & FLAG_TC != 0,
        name,
        answers,
    })
}

/// Reads a possibly compressed name: the dotted lower-case form (bytes
/// outside printable ASCII escaped as `\NNN`) and the offset after it in
/// the message. Pointers must point backwards, so they cannot loop.
fn read_name(buf: &[u8], start: usize) -> Result<(String, usize), WireError> {
    let mut out = String::new();
    let mut at = start;
    let mut end = None;
    let mut wire_len = 0;
    loop {
        let len = *buf.get(at).ok_or(WireError::Truncated(buf.len()))?;
        match len & 0xc0 {
            0 => {}
            0xc0 => {
                let target = (u16_at(buf, at)? & 0x3fff) as usize;
                if target >= at {
                    return Err(WireError::PointerLoop);
                }
                end.get_or_insert(at + 2);
                at = target;
                continue;
            }
            t => return Err(WireError::LabelType(t)),
        }
        let len = len as usize;
        wire_len += len + 1;
        if wire_len > MAX_NAME_WIRE {
            return Err(WireError::NameTooLong);
        }
        if len == 0 {
            return Ok((out, end.unwrap_or(at + 1)));
        }
        let label = buf
            .get(at + 1..at + 1 + len)
            .ok_or(WireError::Truncated(buf.len()))?;
        if !out.is_empty() {
            out.push('.');
        }
        for c in label {
            if c.is_ascii_graphic() && *c != b'.' && *c != b'\\' {
                out.push(c.to_ascii_lowercase() as char);
            } else {
                let _ = write!(out, "\\{c:03}");
            }
        }
        at += 1 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        build_query(0x1234, name, qtype, edns).unwrap()
    }

    #[test]
    fn parses_a_built_query_and_lowercases_the_name() {
        let raw = q("Reviews.Default.svc.cluster.local", TYPE_A, Some(4096));
        let p = parse_query(&raw).unwrap();
        assert_eq!(p.id, 0x1234);
        assert!(p.recursion_desired);
        assert_eq!(p.name.as_deref(), Some("reviews.default.svc.cluster.local"));
        assert_eq!((p.qtype, p.qclass), (TYPE_A, CLASS_IN));
        assert_eq!(p.edns_udp_size, Some(4096));
        assert_eq!(p.udp_limit(), EDNS_UDP_LIMIT as usize);
        // The question is echoed as sent, case included.
        assert_eq!(&p.question[1..8], b"Reviews");
    }

    #[test]
    fn refuses_malformed_queries_with_the_reason() {
        let good = q("a.b", TYPE_A, None);
        assert_eq!(parse_query(&good[..5]), Err(WireError::Short(5)));
        for cut in HEADER_LEN..good.len() {
            assert!(
                matches!(parse_query(&good[..cut]), Err(WireError::Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(parse_query(&trailing), Err(WireError::Trailing(1)));
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(WireError::NotQuery));
        let mut opcode = good.clone();
        opcode[2] |= 0x10; // opcode 2 (STATUS)
        assert_eq!(parse_query(&opcode), Err(WireError::Opcode(2)));
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(WireError::Questions(2)));
        let mut ptr = good.clone();
        ptr[HEADER_LEN] = 0xc0;
        assert_eq!(parse_query(&ptr), Err(WireError::Pointer));
        let mut ext = good.clone();
        ext[HEADER_LEN] = 0x41;
        assert_eq!(parse_query(&ext), Err(WireError::LabelType(0x40)));
        let long = format!("{}.x", vec!["a".repeat(63); 4].join("."));
        let mut raw = good[..HEADER_LEN].to_vec();
        for l in long.split('.') {
            raw.push(l.len() as u8);
            raw.extend_from_slice(l.as_bytes());
        }
        raw.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&raw), Err(WireError::NameTooLong));
        let mut ar = good.clone();
        ar[11] = 1;
        ar.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]); // root A, not OPT
        assert_eq!(parse_query(&ar), Err(WireError::Additional));
    }

    #[test]
    fn non_hostname_labels_are_not_names() {
        let mut raw = q("a.b", TYPE_A, None);
        raw[HEADER_LEN + 1] = b' ';
        assert_eq!(parse_query(&raw).unwrap().name, None);
    }

    #[test]
    fn answers_round_trip_through_the_reader() {
        let p = parse_query(&q("svc.ns.svc.cluster.local", TYPE_A, Some(1400))).unwrap();
        let recs = [
            Record {
                owner: None,
                ttl: 30,
                data: RData::Cname("svc".into()),
            },
            Record {
                owner: Some("svc".into()),
                ttl: 30,
                data: RData::A(Ipv4Addr::new(10, 0, 0, 1)),
            },
        ];
        let out = encode_answer(&p, Rcode::NoError, true, &recs, p.udp_limit()).unwrap();
        let r = parse_response(&out).unwrap();
        assert_eq!(r.id, 0x1234);
        assert!(r.authoritative && !r.truncated);
        assert_eq!(r.name, "svc.ns.svc.cluster.local");
        assert_eq!(r.answers.len(), 2);
        assert_eq!(
            r.answers[0].owner.as_deref(),
            Some("svc.ns.svc.cluster.local")
        );
        assert_eq!(r.answers[1].data, RData::A(Ipv4Addr::new(10, 0, 0, 1)));
        check_response(&p, &out).unwrap();
        // Too big for the limit: truncated, no records.
        let out = encode_answer(&p, Rcode::NoError, true, &recs, 40).unwrap();
        let r = parse_response(&out).unwrap();
        assert!(r.truncated && r.answers.is_empty());
    }

    #[test]
    fn upstream_responses_must_match_the_query() {
        let p = parse_query(&q("example.com", TYPE_A, None)).unwrap();
        let ok = encode_answer(&p, Rcode::NxDomain, false, &[], 512).unwrap();
        check_response(&p, &ok).unwrap();
        let mut other_id = ok.clone();
        other_id[1] ^= 1;
        assert!(matches!(
            check_response(&p, &other_id),
            Err(WireError::Id { .. })
        ));
        let other = parse_query(&q("example.org", TYPE_A, None)).unwrap();
        assert_eq!(check_response(&other, &ok), Err(WireError::Question));
        assert!(check_response(&p, &q("example.com", TYPE_A, None)).is_err());
    }

    #[test]
    fn error_answers_keep_the_id_and_never_answer_responses() {
        let mut raw = q("a", TYPE_A, None);
        raw[5] = 0;
        let e = parse_query(&raw).unwrap_err();
        let out = error_answer(&raw, &e).unwrap();
        let r = parse_response(&out).unwrap();
        assert_eq!((r.id, r.rcode), (0x1234, Rcode::FormErr as u8));
        raw[2] |= 0x80;
        assert_eq!(error_answer(&raw, &WireError::NotQuery), None);
    }

    #[test]
    fn reader_refuses_forward_pointers() {
        let mut raw = q("a", TYPE_A, None);
        raw[2] |= 0x80;
        raw[7] = 1;
        raw.extend_from_slice(&[0xc0, 0x30, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse_response(&raw), Err(WireError::PointerLoop));
    }
}
