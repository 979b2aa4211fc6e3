//! The nftables ruleset, rendered as an `nft -f` script from a
//! `RedirectConfig`. One `inet` table covers IPv4 and IPv6. The script
//! first creates-then-deletes the table and then declares it whole, so one
//! `nft -f` run is a single kernel transaction that replaces whatever was
//! there (nothing, a previous install, or a half-written table).
//!
//! Equivalent of Istio's in-pod ambient rules (istio-cni `AppendInpodRules`,
//! TPROXY variant), with two deliberate differences: an inbound connection
//! the proxy cannot take is reset instead of falling through to the app
//! (nft's `tproxy` does not drop on a missing socket, iptables' TPROXY does),
//! and connections from the app to its own pod IP are captured too.

use std::fmt::Write;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{PortSelection, RedirectConfig};

/// Name of the `inet` table that holds every sidetunnel rule.
pub const TABLE: &str = "sidetunnel";

/// Script that atomically replaces the table with the one for `cfg`.
pub fn install_script(cfg: &RedirectConfig) -> String {
    let mut s = remove_script();
    let mask = cfg.mark_mask;
    let keep = !mask;
    let proxy_mark = format!("meta mark & {mask:#x} == {:#x}", cfg.proxy_mark);
    let tproxy_mark = cfg.tproxy_mark;

    let _ = writeln!(s, "table inet {TABLE} {{");

    // Inbound: mangle-priority prerouting, TPROXY so the proxy sees the
    // original source and destination without NAT.
    let _ = writeln!(s, "\tchain prerouting {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    // Connections the proxy opens (its sockets carry the proxy mark; only
    // ones to a local address come back through prerouting, on lo) get the
    // tproxy connmark, so the app's replies to a spoofed source are routed
    // back to the proxy (see the output route chain and table 100).
    let _ = writeln!(
        s,
        "\t\t{proxy_mark} ct mark set ct mark & {keep:#x} | {tproxy_mark:#x}"
    );
    // Everything on lo already went through this netns's output chains.
    let _ = writeln!(s, "\t\tiif \"lo\" accept");
    let _ = writeln!(s, "\t\tmeta l4proto != tcp accept");
    let _ = writeln!(s, "\t\tct state established,related accept");
    let _ = writeln!(s, "\t\ttcp dport {} accept", set(cfg.proxy_inbound_ports()));
    if !cfg.exclude_inbound_ports.is_empty() {
        let _ = writeln!(
            s,
            "\t\ttcp dport {} accept",
            set(&cfg.exclude_inbound_ports)
        );
    }
    let probe_ports = if cfg.probe_ports.is_empty() {
        String::new()
    } else {
        format!(" tcp dport {}", set(&cfg.probe_ports))
    };
    let (probe4, probe6): (Vec<IpAddr>, Vec<IpAddr>) =
        cfg.probe_source_addrs.iter().partition(|a| a.is_ipv4());
    for (family, addrs) in [("ip", probe4), ("ip6", probe6)] {
        if !addrs.is_empty() {
            let _ = writeln!(s, "\t\t{family} saddr {}{probe_ports} accept", set(addrs));
        }
    }
    let capture_inbound = match &cfg.include_inbound_ports {
        PortSelection::All => true,
        PortSelection::Only(ports) if ports.is_empty() => false,
        PortSelection::Only(ports) => {
            let _ = writeln!(s, "\t\ttcp dport != {} accept", set(ports));
            true
        }
    };
    if capture_inbound {
        let _ = writeln!(
            s,
            "\t\tmeta l4proto tcp tproxy to :{} meta mark set meta mark & {keep:#x} | {tproxy_mark:#x} accept",
            cfg.inbound_plaintext_port
        );
        // Fail closed: no transparent listener (proxy down) means reset,
        // never delivery to the app behind the proxy's back.
        let _ = writeln!(s, "\t\tmeta l4proto tcp reject with tcp reset");
    }
    let _ = writeln!(s, "\t}}");

    // Restore the tproxy connmark onto locally generated packets; a `route`
    // chain makes the kernel re-route them after the mark changes.
    let _ = writeln!(s, "\tchain output-route {{");
    let _ = writeln!(
        s,
        "\t\ttype route hook output priority mangle; policy accept;"
    );
    let _ = writeln!(
        s,
        "\t\tct mark & {mask:#x} == {tproxy_mark:#x} meta mark set ct mark"
    );
    let _ = writeln!(s, "\t}}");

    // Outbound: NAT redirect so the proxy reads the original destination
    // with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
    let _ = writeln!(s, "\tchain output-nat {{");
    let _ = writeln!(s, "\t\ttype nat hook output priority -100; policy accept;");
    let _ = writeln!(s, "\t\t{proxy_mark} accept");
    let _ = writeln!(s, "\t\tip daddr 127.0.0.0/8 accept");
    let _ = writeln!(s, "\t\tip6 daddr ::1 accept");
    let (v4, v6) = excluded_nets(&cfg.exclude_outbound_ip_ranges);
    if !v4.is_empty() {
        let _ = writeln!(s, "\t\tip daddr {} accept", set(v4));
    }
    if !v6.is_empty() {
        let _ = writeln!(s, "\t\tip6 daddr {} accept", set(v6));
    }
    if !cfg.exclude_outbound_ports.is_empty() {
        let _ = writeln!(
            s,
            "\t\tmeta l4proto {{ tcp, udp }} th dport {} accept",
            set(&cfg.exclude_outbound_ports)
        );
    }
    if cfg.dns_capture {
        let _ = writeln!(
            s,
            "\t\tmeta l4proto {{ tcp, udp }} th dport 53 redirect to :{}",
            cfg.dns_port
        );
    }
    let _ = writeln!(s, "\t\tmeta l4proto tcp redirect to :{}", cfg.outbound_port);
    let _ = writeln!(s, "\t}}");
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
fn excluded_nets(nets: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in nets {
        match net {
            IpNet::V4(n) => v4.push(*n),
            IpNet::V6(n) => v6.push(*n),
        }
    }
    (Ipv4Net::aggregate(&v4), Ipv6Net::aggregate(&v6))
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
