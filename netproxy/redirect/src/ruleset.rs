//! The nftables ruleset for a `RedirectConfig`, as data: chains of rules,
//! each a list of matches and statements in nft's own vocabulary. Two
//! renderings read it: `install_script` here (the `nft -f` text operators
//! read, and the reference the tests compare against) and `nft/` (the
//! netlink batch the shim installs). One `inet` table covers IPv4 and IPv6;
//! both renderings replace the whole table in one kernel transaction
//! (nothing, a previous install, or a half-written table before).
//!
//! Equivalent of Istio's in-pod ambient rules (istio-cni `AppendInpodRules`,
//! TPROXY variant), with two deliberate differences: an inbound connection
//! the proxy cannot take is reset instead of falling through to the app
//! (nft's `tproxy` does not drop on a missing socket, iptables' TPROXY does),
//! and connections from the app to its own pod IP are captured too.

use std::collections::BTreeSet;
use std::fmt::{self, Display, Write};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{PortSelection, RedirectConfig};

/// Name of the `inet` table that holds every sidetunnel rule.
pub const TABLE: &str = "sidetunnel";

/// A base chain: its hook and every rule in order.
pub(crate) struct Chain {
    pub name: &'static str,
    pub kind: ChainKind,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy)]
pub(crate) enum ChainKind {
    Filter,
    Route,
    Nat,
}

#[derive(Clone, Copy)]
pub(crate) enum Hook {
    Prerouting,
    Output,
}

/// One rule: its terms in order, as `nft` reads them left to right.
pub(crate) struct Rule(pub Vec<Term>);

/// Which mark a term reads or writes.
#[derive(Clone, Copy)]
pub(crate) enum MarkOf {
    Meta,
    Ct,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum L4 {
    Tcp,
    Udp,
}

#[derive(Clone, Copy)]
pub(crate) enum AddrField {
    Saddr,
    Daddr,
}

#[derive(Clone, Copy)]
pub(crate) enum PortField {
    /// `tcp dport`: implies `meta l4proto tcp`.
    Tcp,
    /// `th dport`: any transport header, no protocol implied.
    Th,
}

/// One value or an anonymous set (`{ a, b }`) of values. A set is kept a
/// set even with one element: the text says `{ x }` and nft itself then
/// compiles it like the single value.
#[derive(Clone)]
pub(crate) enum Values<T> {
    One(T),
    Set(Vec<T>),
}

impl<T> Values<T> {
    pub fn items(&self) -> &[T] {
        match self {
            Values::One(v) => std::slice::from_ref(v),
            Values::Set(v) => v,
        }
    }
}

/// Addresses of one family: hosts (plain addresses) or networks (CIDRs,
/// which make an interval set).
#[derive(Clone)]
pub(crate) enum Addrs {
    Hosts(Values<IpAddr>),
    Nets(Values<IpNet>),
}

/// A match or a statement.
pub(crate) enum Term {
    /// `meta|ct mark & mask == value`
    MarkIs { of: MarkOf, mask: u32, value: u32 },
    /// `iif "lo"`
    IifLo,
    /// `meta l4proto [!=] p`
    L4Proto(Cmp, L4),
    /// `meta l4proto { a, b }`
    L4ProtoIn(Vec<L4>),
    /// `ct state established,related`
    CtEstablishedRelated,
    /// `tcp|th dport [!=] ports`
    Dport(PortField, Cmp, Values<u16>),
    /// `ip|ip6 saddr|daddr addrs` (family from the addresses)
    Addr(AddrField, bool, Addrs),
    /// `ct|meta mark set <of> mark & keep | or`
    SetMark { to: MarkOf, keep: u32, or: u32 },
    /// `meta mark set ct mark`
    MetaMarkFromCt,
    /// `tproxy to :port`
    Tproxy(u16),
    /// `redirect to :port`
    Redirect(u16),
    /// `reject with tcp reset`
    RejectTcpReset,
    /// `accept`
    Accept,
}

/// The table's chains for `cfg`, in declaration order.
pub(crate) fn chains(cfg: &RedirectConfig) -> Vec<Chain> {
    let mask = cfg.mark_mask;
    let keep = !mask;
    let tproxy_mark = cfg.tproxy_mark;
    let proxy_mark = || Term::MarkIs {
        of: MarkOf::Meta,
        mask,
        value: cfg.proxy_mark,
    };
    let set_of = |ports: &BTreeSet<u16>| Values::Set(ports.iter().copied().collect());
    let tcp_dport = |cmp, ports| Term::Dport(PortField::Tcp, cmp, ports);

    // Inbound: mangle-priority prerouting, TPROXY so the proxy sees the
    // original source and destination without NAT.
    let mut pre = vec![
        // Connections the proxy opens (its sockets carry the proxy mark;
        // only ones to a local address come back through prerouting, on
        // lo) get the tproxy connmark, so the app's replies to a spoofed
        // source are routed back to the proxy (see the output route chain
        // and table 100).
        Rule(vec![
            proxy_mark(),
            Term::SetMark {
                to: MarkOf::Ct,
                keep,
                or: tproxy_mark,
            },
        ]),
        // Everything on lo already went through this netns's output chains.
        Rule(vec![Term::IifLo, Term::Accept]),
        Rule(vec![Term::L4Proto(Cmp::Ne, L4::Tcp), Term::Accept]),
        Rule(vec![Term::CtEstablishedRelated, Term::Accept]),
        Rule(vec![
            tcp_dport(Cmp::Eq, Values::Set(cfg.proxy_inbound_ports().to_vec())),
            Term::Accept,
        ]),
    ];
    if !cfg.exclude_inbound_ports.is_empty() {
        pre.push(Rule(vec![
            tcp_dport(Cmp::Eq, set_of(&cfg.exclude_inbound_ports)),
            Term::Accept,
        ]));
    }
    let hosts: BTreeSet<IpAddr> = cfg.probe_source_addrs.iter().copied().collect();
    let (probe4, probe6): (Vec<IpAddr>, Vec<IpAddr>) = hosts.into_iter().partition(|a| a.is_ipv4());
    for (v6, addrs) in [(false, probe4), (true, probe6)] {
        if !addrs.is_empty() {
            let mut rule = vec![Term::Addr(
                AddrField::Saddr,
                v6,
                Addrs::Hosts(Values::Set(addrs)),
            )];
            if !cfg.probe_ports.is_empty() {
                rule.push(tcp_dport(Cmp::Eq, set_of(&cfg.probe_ports)));
            }
            rule.push(Term::Accept);
            pre.push(Rule(rule));
        }
    }
    let capture_inbound = match &cfg.include_inbound_ports {
        PortSelection::All => true,
        PortSelection::Only(ports) if ports.is_empty() => false,
        PortSelection::Only(ports) => {
            pre.push(Rule(vec![tcp_dport(Cmp::Ne, set_of(ports)), Term::Accept]));
            true
        }
    };
    if capture_inbound {
        pre.push(Rule(vec![
            Term::L4Proto(Cmp::Eq, L4::Tcp),
            Term::Tproxy(cfg.inbound_plaintext_port),
            Term::SetMark {
                to: MarkOf::Meta,
                keep,
                or: tproxy_mark,
            },
            Term::Accept,
        ]));
        // Fail closed: no transparent listener (proxy down) means reset,
        // never delivery to the app behind the proxy's back.
        pre.push(Rule(vec![
            Term::L4Proto(Cmp::Eq, L4::Tcp),
            Term::RejectTcpReset,
        ]));
    }

    // Restore the tproxy connmark onto locally generated packets; a `route`
    // chain makes the kernel re-route them after the mark changes.
    let route = vec![Rule(vec![
        Term::MarkIs {
            of: MarkOf::Ct,
            mask,
            value: tproxy_mark,
        },
        Term::MetaMarkFromCt,
    ])];

    // Outbound: NAT redirect so the proxy reads the original destination
    // with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
    let loopback4: IpNet = "127.0.0.0/8".parse().expect("literal CIDR");
    let mut nat = vec![
        Rule(vec![proxy_mark(), Term::Accept]),
        Rule(vec![
            Term::Addr(AddrField::Daddr, false, Addrs::Nets(Values::One(loopback4))),
            Term::Accept,
        ]),
        Rule(vec![
            Term::Addr(
                AddrField::Daddr,
                true,
                Addrs::Hosts(Values::One(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))),
            ),
            Term::Accept,
        ]),
    ];
    let (v4, v6) = excluded_nets(&cfg.exclude_outbound_ip_ranges);
    for (is_v6, nets) in [(false, v4), (true, v6)] {
        if !nets.is_empty() {
            nat.push(Rule(vec![
                Term::Addr(AddrField::Daddr, is_v6, Addrs::Nets(Values::Set(nets))),
                Term::Accept,
            ]));
        }
    }
    if !cfg.exclude_outbound_ports.is_empty() {
        nat.push(Rule(vec![
            Term::L4ProtoIn(vec![L4::Tcp, L4::Udp]),
            Term::Dport(PortField::Th, Cmp::Eq, set_of(&cfg.exclude_outbound_ports)),
            Term::Accept,
        ]));
    }
    if cfg.dns_capture {
        nat.push(Rule(vec![
            Term::L4ProtoIn(vec![L4::Tcp, L4::Udp]),
            Term::Dport(PortField::Th, Cmp::Eq, Values::One(53)),
            Term::Redirect(cfg.dns_port),
        ]));
    }
    nat.push(Rule(vec![
        Term::L4Proto(Cmp::Eq, L4::Tcp),
        Term::Redirect(cfg.outbound_port),
    ]));

    vec![
        Chain {
            name: "prerouting",
            kind: ChainKind::Filter,
            hook: Hook::Prerouting,
            priority: MANGLE,
            rules: pre,
        },
        Chain {
            name: "output-route",
            kind: ChainKind::Route,
            hook: Hook::Output,
            priority: MANGLE,
            rules: route,
        },
        Chain {
            name: "output-nat",
            kind: ChainKind::Nat,
            hook: Hook::Output,
            priority: DSTNAT,
            rules: nat,
        },
    ]
}

/// nft's `mangle` priority.
const MANGLE: i32 = -150;
/// The output NAT chain's priority (`dstnat`, written as a number).
const DSTNAT: i32 = -100;

/// Script that atomically replaces the table with the one for `cfg`.
pub fn install_script(cfg: &RedirectConfig) -> String {
    let mut s = remove_script();
    let _ = writeln!(s, "table inet {TABLE} {{");
    for chain in chains(cfg) {
        let _ = writeln!(s, "\tchain {} {{", chain.name);
        let priority = match chain.priority {
            MANGLE => "mangle".to_string(),
            p => p.to_string(),
        };
        let _ = writeln!(
            s,
            "\t\ttype {} hook {} priority {priority}; policy accept;",
            chain.kind, chain.hook
        );
        for rule in &chain.rules {
            let _ = writeln!(s, "\t\t{rule}");
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// Script that removes the table whether or not it exists (the `add` makes
/// the `delete` always valid; nft 1.0.6 has no `destroy`).
pub fn remove_script() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Merges overlapping networks per family: nft rejects overlapping
/// intervals in one set.
fn excluded_nets(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in nets {
        match net {
            IpNet::V4(n) => v4.push(*n),
            IpNet::V6(n) => v6.push(*n),
        }
    }
    (
        Ipv4Net::aggregate(&v4).into_iter().map(IpNet::V4).collect(),
        Ipv6Net::aggregate(&v6).into_iter().map(IpNet::V6).collect(),
    )
}

impl Display for ChainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainKind::Filter => "filter",
            ChainKind::Route => "route",
            ChainKind::Nat => "nat",
        })
    }
}

impl Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        })
    }
}

impl Display for MarkOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MarkOf::Meta => "meta",
            MarkOf::Ct => "ct",
        })
    }
}

impl Display for Cmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cmp::Eq => "",
            Cmp::Ne => "!= ",
        })
    }
}

impl Display for L4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        })
    }
}

impl<T: Display> Display for Values<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Values::One(v) => write!(f, "{v}"),
            Values::Set(items) => write!(f, "{}", set(items)),
        }
    }
}

impl Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&terms.join(" "))
    }
}

impl Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::MarkIs { of, mask, value } => write!(f, "{of} mark & {mask:#x} == {value:#x}"),
            Term::IifLo => f.write_str("iif \"lo\""),
            Term::L4Proto(cmp, p) => write!(f, "meta l4proto {cmp}{p}"),
            Term::L4ProtoIn(ps) => write!(f, "meta l4proto {}", set(ps)),
            Term::CtEstablishedRelated => f.write_str("ct state established,related"),
            Term::Dport(field, cmp, ports) => {
                let proto = match field {
                    PortField::Tcp => "tcp",
                    PortField::Th => "th",
                };
                write!(f, "{proto} dport {cmp}{ports}")
            }
            Term::Addr(field, v6, addrs) => {
                let family = if *v6 { "ip6" } else { "ip" };
                let field = match field {
                    AddrField::Saddr => "saddr",
                    AddrField::Daddr => "daddr",
                };
                match addrs {
                    Addrs::Hosts(v) => write!(f, "{family} {field} {v}"),
                    Addrs::Nets(v) => write!(f, "{family} {field} {v}"),
                }
            }
            Term::SetMark { to, keep, or } => {
                write!(f, "{to} mark set {to} mark & {keep:#x} | {or:#x}")
            }
            Term::MetaMarkFromCt => f.write_str("meta mark set ct mark"),
            Term::Tproxy(port) => write!(f, "tproxy to :{port}"),
            Term::Redirect(port) => write!(f, "redirect to :{port}"),
            Term::RejectTcpReset => f.write_str("reject with tcp reset"),
            Term::Accept => f.write_str("accept"),
        }
    }
}

/// An anonymous nft set: `{ a, b }`.
fn set<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ruleset_shape() {
        let s = install_script(&RedirectConfig::default());
        assert!(s.starts_with(
            "add table inet sidetunnel\ndelete table inet sidetunnel\ntable inet sidetunnel {"
        ));
        for line in [
            "meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111",
            "tcp dport { 15008, 15020, 15021 } accept",
            "meta l4proto tcp tproxy to :15006 meta mark set meta mark & 0xfffff000 | 0x111 accept",
            "meta l4proto tcp reject with tcp reset",
            "ct mark & 0xfff == 0x111 meta mark set ct mark",
            "meta mark & 0xfff == 0x539 accept",
            "meta l4proto tcp redirect to :15001",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        assert!(
            !s.contains("th dport 53"),
            "DNS capture must be off by default:\n{s}"
        );
        assert!(
            !s.contains("saddr"),
            "no probe exemption without node addresses:\n{s}"
        );
    }

    #[test]
    fn options_render() {
        let cfg = RedirectConfig {
            dns_capture: true,
            exclude_outbound_ports: [9090].into(),
            exclude_outbound_ip_ranges: ["10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]
                .iter()
                .map(|n| n.parse().unwrap())
                .collect(),
            exclude_inbound_ports: [8081].into(),
            include_inbound_ports: PortSelection::Only([80, 8080].into()),
            probe_source_addrs: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            probe_ports: [8080].into(),
            ..Default::default()
        };
        let s = install_script(&cfg);
        for line in [
            "meta l4proto { tcp, udp } th dport 53 redirect to :15053",
            "meta l4proto { tcp, udp } th dport { 9090 } accept",
            "ip daddr { 10.0.0.0/8 } accept",
            "ip6 daddr { fd00::/8 } accept",
            "tcp dport { 8081 } accept",
            "tcp dport != { 80, 8080 } accept",
            "ip saddr { 10.0.0.1 } tcp dport { 8080 } accept",
            "ip6 saddr { fd00::1 } tcp dport { 8080 } accept",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        // DNS capture honours exclusions: it comes after them.
        assert!(s.find("th dport 53").unwrap() > s.find("th dport { 9090 }").unwrap());
    }

    #[test]
    fn empty_include_list_captures_no_inbound() {
        let cfg = RedirectConfig {
            include_inbound_ports: PortSelection::Only(Default::default()),
            ..Default::default()
        };
        let s = install_script(&cfg);
        assert!(!s.contains("tproxy") && !s.contains("reject"), "{s}");
        assert!(
            s.contains("redirect to :15001"),
            "outbound stays captured:\n{s}"
        );
    }
}
