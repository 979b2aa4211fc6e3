//! The ruleset's terms as nf_tables expression lists, the way nft 1.0
//! compiles the same text: implied dependencies (`meta nfproto` before an
//! `ip`/`ip6` field, `meta l4proto tcp` before `tcp dport`), a one-element
//! set as a plain comparison, a byte-aligned prefix as a shorter load. The
//! tests compare `nft list` of both installs, so the listing operators see
//! is the same whichever path installed it.

use std::net::IpAddr;

use ipnet::IpNet;

use super::expr::{Base, CtKey, Expr, MetaKey};
use super::set::{AnonSet, KeyType};
use crate::ruleset::{AddrField, Addrs, Cmp, L4, MarkOf, PortField, Rule, Term, Values};

/// `LOOPBACK_IFINDEX`: lo is interface 1 in every network namespace, so
/// `iif "lo"` needs no lookup.
const LO_IFINDEX: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// `enum ip_conntrack_status` bits of `ct state`.
const CT_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;

/// A rule's expressions and the anonymous sets they look up.
pub(crate) struct Compiled {
    pub exprs: Vec<Expr>,
    pub sets: Vec<AnonSet>,
}

/// Compiles `rule`; set ids are taken from `next_set_id`, unique per batch.
pub(crate) fn rule(rule: &Rule, next_set_id: &mut u32) -> Compiled {
    let mut c = Compiled {
        exprs: Vec::new(),
        sets: Vec::new(),
    };
    for term in &rule.0 {
        c.term(term, next_set_id);
    }
    c
}

impl Compiled {
    fn term(&mut self, term: &Term, next_set_id: &mut u32) {
        let e = &mut self.exprs;
        match term {
            Term::MarkIs { of, mask, value } => {
                e.push(load_mark(*of));
                e.push(Expr::Bitwise {
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                e.push(eq(value.to_ne_bytes()));
            }
            Term::IifLo => {
                e.push(Expr::Meta(MetaKey::Iif));
                e.push(eq(LO_IFINDEX.to_ne_bytes()));
            }
            Term::L4Proto(cmp, p) => {
                e.push(Expr::Meta(MetaKey::L4proto));
                e.push(Expr::Cmp {
                    eq: *cmp == Cmp::Eq,
                    data: vec![proto(*p)],
                });
            }
            Term::L4ProtoIn(ps) => {
                e.push(Expr::Meta(MetaKey::L4proto));
                let keys = ps.iter().map(|p| vec![proto(*p)]).collect();
                self.match_values(Cmp::Eq, KeyType::InetProto, keys, next_set_id);
            }
            Term::CtEstablishedRelated => {
                e.push(Expr::Ct(CtKey::State));
                e.push(Expr::Bitwise {
                    mask: CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                e.push(Expr::Cmp {
                    eq: false,
                    data: vec![0; 4],
                });
            }
            Term::Dport(field, cmp, ports) => {
                if let PortField::Tcp = field {
                    e.push(Expr::Meta(MetaKey::L4proto));
                    e.push(eq([proto(L4::Tcp)]));
                }
                e.push(Expr::Payload {
                    base: Base::Transport,
                    offset: 2,
                    len: 2,
                });
                let keys = ports
                    .items()
                    .iter()
                    .map(|p| p.to_be_bytes().to_vec())
                    .collect();
                self.match_values(*cmp, KeyType::InetService, keys, next_set_id);
            }
            Term::Addr(field, v6, addrs) => {
                e.push(Expr::Meta(MetaKey::Nfproto));
                e.push(eq([if *v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]));
                let (offset, len, key_type) = match (v6, field) {
                    (false, AddrField::Saddr) => (12, 4, KeyType::Ipv4),
                    (false, AddrField::Daddr) => (16, 4, KeyType::Ipv4),
                    (true, AddrField::Saddr) => (8, 16, KeyType::Ipv6),
                    (true, AddrField::Daddr) => (24, 16, KeyType::Ipv6),
                };
                let load = |len| Expr::Payload {
                    base: Base::Network,
                    offset,
                    len,
                };
                match addrs {
                    Addrs::Hosts(hosts) => {
                        e.push(load(len));
                        let keys = hosts.items().iter().map(|a| addr_bytes(*a)).collect();
                        self.match_values(Cmp::Eq, key_type, keys, next_set_id);
                    }
                    Addrs::Nets(Values::Set(nets)) if nets.len() > 1 => {
                        e.push(load(len));
                        let ranges = nets
                            .iter()
                            .map(|n| (addr_bytes(n.network()), addr_bytes(n.broadcast())))
                            .collect();
                        let set = AnonSet::ranges(take_id(next_set_id), key_type, ranges);
                        e.push(Expr::Lookup {
                            set_id: set.id,
                            inverted: false,
                        });
                        self.sets.push(set);
                    }
                    Addrs::Nets(nets) => {
                        if let Some(net) = nets.items().first() {
                            e.extend(prefix(net, load));
                        }
                    }
                }
            }
            Term::SetMark { to, keep, or } => {
                e.push(load_mark(*to));
                e.push(Expr::Bitwise {
                    mask: keep.to_ne_bytes().to_vec(),
                    xor: or.to_ne_bytes().to_vec(),
                });
                e.push(match to {
                    MarkOf::Meta => Expr::MetaSet(MetaKey::Mark),
                    MarkOf::Ct => Expr::CtSet(CtKey::Mark),
                });
            }
            Term::MetaMarkFromCt => {
                e.push(Expr::Ct(CtKey::Mark));
                e.push(Expr::MetaSet(MetaKey::Mark));
            }
            Term::Tproxy(port) => {
                e.push(Expr::Immediate(port.to_be_bytes().to_vec()));
                e.push(Expr::Tproxy);
            }
            Term::Redirect(port) => {
                e.push(Expr::Immediate(port.to_be_bytes().to_vec()));
                e.push(Expr::Redirect);
            }
            Term::RejectTcpReset => e.push(Expr::RejectTcpReset),
            Term::Accept => e.push(Expr::Accept),
        }
    }

    /// The loaded value compared with one key, or looked up in a set of
    /// several.
    fn match_values(
        &mut self,
        cmp: Cmp,
        key_type: KeyType,
        mut keys: Vec<Vec<u8>>,
        next_set_id: &mut u32,
    ) {
        if keys.len() == 1 {
            let data = keys.remove(0);
            self.exprs.push(Expr::Cmp {
                eq: cmp == Cmp::Eq,
                data,
            });
            return;
        }
        let set = AnonSet::values(take_id(next_set_id), key_type, keys);
        self.exprs.push(Expr::Lookup {
            set_id: set.id,
            inverted: cmp == Cmp::Ne,
        });
        self.sets.push(set);
    }
}

/// `field net`: a full-length network is the address; a byte-aligned
/// prefix loads only its bytes; any other (including /0) is masked.
fn prefix(net: &IpNet, load: impl Fn(u32) -> Expr) -> Vec<Expr> {
    let bytes = addr_bytes(net.network());
    let full = bytes.len() as u32 * 8;
    let plen = u32::from(net.prefix_len());
    if plen == full {
        vec![load(full / 8), eq(bytes)]
    } else if plen % 8 == 0 && plen > 0 {
        vec![load(plen / 8), eq(&bytes[..(plen / 8) as usize])]
    } else {
        vec![
            load(full / 8),
            Expr::Bitwise {
                mask: addr_bytes(net.netmask()),
                xor: vec![0; bytes.len()],
            },
            eq(bytes),
        ]
    }
}

fn load_mark(of: MarkOf) -> Expr {
    match of {
        MarkOf::Meta => Expr::Meta(MetaKey::Mark),
        MarkOf::Ct => Expr::Ct(CtKey::Mark),
    }
}

fn eq(data: impl AsRef<[u8]>) -> Expr {
    Expr::Cmp {
        eq: true,
        data: data.as_ref().to_vec(),
    }
}

fn proto(p: L4) -> u8 {
    match p {
        L4::Tcp => libc::IPPROTO_TCP as u8,
        L4::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn take_id(next: &mut u32) -> u32 {
    *next += 1;
    *next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(terms: Vec<Term>) -> Compiled {
        let mut id = 0;
        rule(&Rule(terms), &mut id)
    }

    #[test]
    fn one_element_set_is_a_comparison_and_several_a_lookup() {
        let one = compile(vec![Term::Dport(
            PortField::Th,
            Cmp::Eq,
            Values::Set(vec![53]),
        )]);
        assert!(one.sets.is_empty());
        assert_eq!(one.exprs.last(), Some(&eq([0, 53])));
        let two = compile(vec![Term::Dport(
            PortField::Tcp,
            Cmp::Ne,
            Values::Set(vec![80, 8080]),
        )]);
        assert_eq!(two.sets.len(), 1);
        assert_eq!(two.exprs[0], Expr::Meta(MetaKey::L4proto));
        assert_eq!(
            two.exprs.last(),
            Some(&Expr::Lookup {
                set_id: 1,
                inverted: true
            })
        );
    }

    #[test]
    fn prefixes_compile_like_nft() {
        let load = |len| Expr::Payload {
            base: Base::Network,
            offset: 16,
            len,
        };
        let p = |s: &str| prefix(&s.parse().unwrap(), load);
        assert_eq!(p("127.0.0.0/8"), [load(1), eq([127])]);
        assert_eq!(p("10.0.0.1/32"), [load(4), eq([10, 0, 0, 1])]);
        assert_eq!(
            p("10.0.0.0/12"),
            [
                load(4),
                Expr::Bitwise {
                    mask: vec![255, 240, 0, 0],
                    xor: vec![0; 4]
                },
                eq([10, 0, 0, 0])
            ]
        );
        assert_eq!(
            p("0.0.0.0/0")[1],
            Expr::Bitwise {
                mask: vec![0; 4],
                xor: vec![0; 4]
            }
        );
    }
}
