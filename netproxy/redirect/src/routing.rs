//! Policy routing for transparent delivery: packets carrying the tproxy
//! mark look up a table whose only routes are `local` defaults via `lo`, so
//! TPROXY'd packets and the app's replies to connections the proxy opened
//! with a spoofed (original) source are delivered to the proxy locally.
//! Installed over rtnetlink (what `ip rule` / `ip route` send); `dump`
//! shows it with `ip` for operators. See docs/redirection.md.

use crate::netlink::Socket;
use crate::netlink::msg::{
    self, Builder, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use crate::netns::Netns;
use crate::{Error, RedirectConfig};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
/// Rule selectors other than the mark (dst, src, iifname, goto, flow,
/// suppress_ifgroup, suppress_prefixlen, oifname, l3mdev, uid range, ip
/// proto, sport, dport): a rule with any of them is not ours.
const FRA_OTHER_SELECTORS: [u16; 13] = [1, 2, 3, 4, 11, 13, 14, 17, 19, 20, 22, 23, 24];
const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 0x2;
const RT_TABLE_UNSPEC: u8 = 0;
/// `rtm_table` for tables past 255 (the real id goes in RTA_TABLE).
const RT_TABLE_COMPAT: u8 = 252;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
/// `LOOPBACK_IFINDEX`: lo in every network namespace.
const LO_IFINDEX: u32 = 1;

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// Upper bound on stale rules removed at our priority (guards a loop).
const MAX_STALE_RULES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

pub(crate) fn install(sock: &mut Socket, cfg: &RedirectConfig) -> Result<(), Error> {
    let netns = sock.netns().to_path_buf();
    // lo up (the IPv6 route needs it) and the `local` default routes, one
    // request; `replace` makes the routes idempotent.
    let mut b = Builder::default();
    let lo = sock.next_seq();
    link_up(&mut b, lo, LO_IFINDEX);
    let mut seqs = vec![lo];
    for family in FAMILIES {
        let seq = sock.next_seq();
        route(
            &mut b,
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            seq,
            family,
            cfg.route_table,
        );
        seqs.push(seq);
    }
    let acks = sock.transact("setting up policy routing", &b, &seqs)?;
    let mut families = FAMILIES.to_vec();
    for ack in acks.iter().filter(|a| a.errno != 0) {
        if ack.seq == seqs[2] && ipv6_unavailable(ack.errno) {
            // IPv6 switched off in the pod (sysctl or kernel): there is no
            // IPv6 traffic to deliver, hence nothing to bypass; IPv4 only.
            tracing::warn!(error = %ack.error("", &netns), "IPv6 unavailable in the pod netns; IPv6 policy routing skipped");
            families.retain(|f| *f == Family::V4);
            continue;
        }
        let what = if ack.seq == lo {
            "bringing lo up".to_string()
        } else {
            format!(
                "adding route `local default dev lo table {}` ({})",
                cfg.route_table,
                if ack.seq == seqs[1] { "IPv4" } else { "IPv6" }
            )
        };
        return Err(ack.error(&what, &netns));
    }
    for family in families {
        let current = rules_at(sock, family, cfg.rule_priority)?;
        if current.len() == 1 && current[0] == wanted(cfg) {
            continue;
        }
        // Partial or stale state (e.g. a different mark from an older
        // config): clear our priority, then add the one rule we want.
        if !current.is_empty() {
            delete_rules(sock, family, cfg.rule_priority)?;
        }
        add_rule(sock, family, cfg)?;
    }
    Ok(())
}

pub(crate) fn remove(sock: &mut Socket, cfg: &RedirectConfig) -> Result<(), Error> {
    let netns = sock.netns().to_path_buf();
    for family in FAMILIES {
        match delete_rules(sock, family, cfg.rule_priority) {
            Err(Error::Netlink { source, .. })
                if source.raw_os_error().is_some_and(ipv6_unavailable) => {}
            other => other?,
        }
        let mut b = Builder::default();
        let seq = sock.next_seq();
        route(&mut b, RTM_DELROUTE, 0, seq, family, cfg.route_table);
        let what = format!("deleting the {} local default route", family.name());
        for ack in sock.transact(&what, &b, &[seq])? {
            if ack.errno != 0 && !gone(ack.errno) && !ipv6_unavailable(ack.errno) {
                return Err(ack.error(&what, &netns));
            }
        }
    }
    Ok(())
}

/// Policy rules and the non-main, non-local routes, for `show`.
pub(crate) fn dump(ns: &Netns) -> Result<String, Error> {
    let mut out = String::new();
    for family in ["-4", "-6"] {
        out.push_str(&format!("# ip {family} rule\n"));
        out.push_str(&ns.run("ip", &[family, "rule", "show"], None)?);
        out.push_str(&format!("# ip {family} route (policy tables)\n"));
        let routes = ns.run("ip", &[family, "route", "show", "table", "all"], None)?;
        for line in routes
            .lines()
            .filter(|l| l.contains(" table ") && !l.contains(" table local"))
        {
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    Ok(out)
}

fn ipv6_unavailable(errno: i32) -> bool {
    // EACCES: "IPv6 is disabled on nexthop device"; EAFNOSUPPORT: no IPv6.
    errno == libc::EAFNOSUPPORT || errno == libc::EACCES
}

fn gone(errno: i32) -> bool {
    errno == libc::ENOENT || errno == libc::ESRCH
}

/// `struct ifinfomsg` setting IFF_UP on `index`.
fn link_up(b: &mut Builder, seq: u32, index: u32) {
    let mut hdr = [0u8; 16];
    hdr[4..8].copy_from_slice(&index.to_ne_bytes());
    hdr[8..12].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    hdr[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    b.begin(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, &hdr);
    b.end();
}

/// `local default dev lo table <table>` for `family`.
fn route(b: &mut Builder, ty: u16, flags: u16, seq: u32, family: Family, table: u32) {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    let rtm_table = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
    let hdr = [
        family.af(),
        0,
        0,
        0,
        rtm_table,
        RTPROT_BOOT,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    b.begin(ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq, &hdr);
    b.put_ne32(RTA_TABLE, table);
    b.put_ne32(RTA_OIF, LO_IFINDEX);
    b.end();
}

/// `struct fib_rule_hdr` for `family` with `table` and `action`.
fn rule_hdr(family: Family, table: u32, action: u8) -> [u8; 12] {
    let t = u8::try_from(table).unwrap_or(RT_TABLE_UNSPEC);
    [family.af(), 0, 0, 0, t, 0, 0, action, 0, 0, 0, 0]
}

/// A rule as compared for convergence: (mark, mask, table), None when it
/// is not a plain `fwmark … lookup …` rule.
type RuleKey = Option<(u32, u32, u32)>;

fn wanted(cfg: &RedirectConfig) -> RuleKey {
    Some((cfg.tproxy_mark, cfg.mark_mask, cfg.route_table))
}

/// The rules of `family` at priority `pref`.
fn rules_at(sock: &mut Socket, family: Family, pref: u32) -> Result<Vec<RuleKey>, Error> {
    let mut b = Builder::default();
    let seq = sock.next_seq();
    b.begin(
        RTM_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &rule_hdr(family, 0, 0),
    );
    b.end();
    let what = format!("listing {} policy rules", family.name());
    let mut out = Vec::new();
    for payload in sock.dump(&what, &b)? {
        let Some(hdr) = payload.get(..12) else {
            continue;
        };
        let attrs: Vec<(u16, &[u8])> = msg::attrs(&payload[12..]).collect();
        let get = |ty| {
            attrs
                .iter()
                .find(|(t, _)| *t == ty)
                .and_then(|(_, d)| msg::ne32(d))
        };
        if get(FRA_PRIORITY) != Some(pref) {
            continue;
        }
        let flags = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let plain = hdr[1] == 0
            && hdr[2] == 0
            && hdr[3] == 0
            && hdr[7] == FR_ACT_TO_TBL
            && flags & FIB_RULE_INVERT == 0
            && !attrs.iter().any(|(t, _)| FRA_OTHER_SELECTORS.contains(t));
        let table = get(FRA_TABLE).unwrap_or(u32::from(hdr[4]));
        out.push(match (plain, get(FRA_FWMARK), get(FRA_FWMASK)) {
            (true, Some(mark), Some(mask)) => Some((mark, mask, table)),
            _ => None,
        });
    }
    Ok(out)
}

fn delete_rules(sock: &mut Socket, family: Family, pref: u32) -> Result<(), Error> {
    let netns = sock.netns().to_path_buf();
    let what = format!("deleting {} policy rules at priority {pref}", family.name());
    for _ in 0..MAX_STALE_RULES {
        let mut b = Builder::default();
        let seq = sock.next_seq();
        b.begin(
            RTM_DELRULE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            &rule_hdr(family, 0, 0),
        );
        b.put_ne32(FRA_PRIORITY, pref);
        b.end();
        for ack in sock.transact(&what, &b, &[seq])? {
            if gone(ack.errno) {
                return Ok(());
            }
            if ack.errno != 0 {
                return Err(ack.error(&what, &netns));
            }
        }
    }
    Err(Error::Config(format!(
        "more than {MAX_STALE_RULES} policy rules at priority {pref}"
    )))
}

fn add_rule(sock: &mut Socket, family: Family, cfg: &RedirectConfig) -> Result<(), Error> {
    let netns = sock.netns().to_path_buf();
    let what = format!(
        "adding {} policy rule `{}: from all fwmark {:#x}/{:#x} lookup {}`",
        family.name(),
        cfg.rule_priority,
        cfg.tproxy_mark,
        cfg.mark_mask,
        cfg.route_table
    );
    let mut b = Builder::default();
    let seq = sock.next_seq();
    b.begin(
        RTM_NEWRULE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        &rule_hdr(family, cfg.route_table, FR_ACT_TO_TBL),
    );
    b.put_ne32(FRA_PRIORITY, cfg.rule_priority);
    b.put_ne32(FRA_FWMARK, cfg.tproxy_mark);
    b.put_ne32(FRA_FWMASK, cfg.mark_mask);
    b.put_ne32(FRA_TABLE, cfg.route_table);
    b.end();
    for ack in sock.transact(&what, &b, &[seq])? {
        if ack.errno != 0 {
            return Err(ack.error(&what, &netns));
        }
    }
    Ok(())
}
