//! nf_tables expressions and their netlink encoding, with the attribute
//! numbers of linux/netfilter/nf_tables.h. Only what the ruleset uses.

use crate::netlink::msg::Builder;

/// `NFT_REG_VERDICT` and `NFT_REG_1` (a 16-byte register, enough for an
/// IPv6 address), the registers nft itself uses for these rules.
const REG_VERDICT: u32 = 0;
pub(crate) const REG_1: u32 = 1;

// enum nft_list_attributes / nft_expr_attributes
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
// enum nft_data_attributes / nft_verdict_attributes
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NF_ACCEPT: u32 = 1;

/// `enum nft_meta_keys` values used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaKey {
    Mark = 3,
    Iif = 4,
    Nfproto = 15,
    L4proto = 16,
}

/// `enum nft_ct_keys` values used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CtKey {
    State = 0,
    Mark = 3,
}

/// `enum nft_payload_bases` values used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Base {
    Network = 1,
    Transport = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Expr {
    /// Load a meta key into REG_1.
    Meta(MetaKey),
    /// Set a meta key from REG_1.
    MetaSet(MetaKey),
    /// Load a conntrack key into REG_1.
    Ct(CtKey),
    /// Set a conntrack key from REG_1.
    CtSet(CtKey),
    /// Load `len` bytes at `offset` of a header into REG_1.
    Payload { base: Base, offset: u32, len: u32 },
    /// Compare REG_1 with `data`; `eq` false is `!=`.
    Cmp { eq: bool, data: Vec<u8> },
    /// REG_1 = (REG_1 & mask) ^ xor, over `mask.len()` bytes.
    Bitwise { mask: Vec<u8>, xor: Vec<u8> },
    /// REG_1 in the anonymous set with batch id `set_id`.
    Lookup { set_id: u32, inverted: bool },
    /// Load `data` into REG_1.
    Immediate(Vec<u8>),
    /// Verdict accept.
    Accept,
    /// TPROXY to the port in REG_1 (address unchanged, either family).
    Tproxy,
    /// Redirect to the port in REG_1.
    Redirect,
    /// Reject with a TCP reset.
    RejectTcpReset,
}

/// Name of the anonymous sets in a batch; the kernel numbers them.
pub(crate) const ANON_SET_NAME: &str = "__set%d";

impl Expr {
    /// Appends this expression as one NFTA_LIST_ELEM.
    pub fn encode(&self, b: &mut Builder) {
        b.nest(NFTA_LIST_ELEM, |b| {
            b.put_str(NFTA_EXPR_NAME, self.name());
            b.nest(NFTA_EXPR_DATA, |b| self.encode_data(b));
        });
    }

    fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) | Expr::MetaSet(_) => "meta",
            Expr::Ct(_) | Expr::CtSet(_) => "ct",
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Lookup { .. } => "lookup",
            Expr::Immediate(_) | Expr::Accept => "immediate",
            Expr::Tproxy => "tproxy",
            Expr::Redirect => "redir",
            Expr::RejectTcpReset => "reject",
        }
    }

    fn encode_data(&self, b: &mut Builder) {
        match self {
            // NFTA_META_DREG 1, NFTA_META_KEY 2, NFTA_META_SREG 3
            Expr::Meta(key) => {
                b.put_be32(2, *key as u32);
                b.put_be32(1, REG_1);
            }
            Expr::MetaSet(key) => {
                b.put_be32(2, *key as u32);
                b.put_be32(3, REG_1);
            }
            // NFTA_CT_DREG 1, NFTA_CT_KEY 2, NFTA_CT_SREG 4
            Expr::Ct(key) => {
                b.put_be32(2, *key as u32);
                b.put_be32(1, REG_1);
            }
            Expr::CtSet(key) => {
                b.put_be32(2, *key as u32);
                b.put_be32(4, REG_1);
            }
            // NFTA_PAYLOAD_DREG 1, BASE 2, OFFSET 3, LEN 4
            Expr::Payload { base, offset, len } => {
                b.put_be32(1, REG_1);
                b.put_be32(2, *base as u32);
                b.put_be32(3, *offset);
                b.put_be32(4, *len);
            }
            // NFTA_CMP_SREG 1, OP 2 (NFT_CMP_EQ 0, NEQ 1), DATA 3
            Expr::Cmp { eq, data } => {
                b.put_be32(1, REG_1);
                b.put_be32(2, if *eq { 0 } else { 1 });
                b.nest(3, |b| b.put(NFTA_DATA_VALUE, data));
            }
            // NFTA_BITWISE_SREG 1, DREG 2, LEN 3, MASK 4, XOR 5
            Expr::Bitwise { mask, xor } => {
                b.put_be32(1, REG_1);
                b.put_be32(2, REG_1);
                b.put_be32(3, mask.len() as u32);
                b.nest(4, |b| b.put(NFTA_DATA_VALUE, mask));
                b.nest(5, |b| b.put(NFTA_DATA_VALUE, xor));
            }
            // NFTA_LOOKUP_SET 1, SREG 2, SET_ID 4, FLAGS 5 (NFT_LOOKUP_F_INV 1)
            Expr::Lookup { set_id, inverted } => {
                b.put_be32(2, REG_1);
                b.put_str(1, ANON_SET_NAME);
                b.put_be32(4, *set_id);
                if *inverted {
                    b.put_be32(5, 1);
                }
            }
            // NFTA_IMMEDIATE_DREG 1, DATA 2
            Expr::Immediate(data) => {
                b.put_be32(1, REG_1);
                b.nest(2, |b| b.put(NFTA_DATA_VALUE, data));
            }
            Expr::Accept => {
                b.put_be32(1, REG_VERDICT);
                b.nest(2, |b| {
                    b.nest(NFTA_DATA_VERDICT, |b| {
                        b.put_be32(NFTA_VERDICT_CODE, NF_ACCEPT)
                    })
                });
            }
            // NFTA_TPROXY_FAMILY 1 (NFPROTO_UNSPEC: the packet's), REG_PORT 3
            Expr::Tproxy => {
                b.put_be32(1, 0);
                b.put_be32(3, REG_1);
            }
            // NFTA_REDIR_REG_PROTO_MIN 1, FLAGS 3 (NF_NAT_RANGE_PROTO_SPECIFIED)
            Expr::Redirect => {
                b.put_be32(1, REG_1);
                b.put_be32(3, 2);
            }
            // NFTA_REJECT_TYPE 1 (NFT_REJECT_TCP_RST 1), ICMP_CODE 2 (u8)
            Expr::RejectTcpReset => {
                b.put_be32(1, 1);
                b.put(2, &[0]);
            }
        }
    }
}
