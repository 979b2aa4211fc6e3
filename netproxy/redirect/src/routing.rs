//! Policy routing for transparent delivery: packets carrying the tproxy
//! mark look up a table whose only routes are `local` defaults via `lo`, so
//! TPROXY'd packets and the app's replies to connections the proxy opened
//! with a spoofed (original) source are delivered to the proxy locally.
//! Installed with iproute2 inside the namespace; see docs/redirection.md.

use crate::exec::{Netns, is_not_found};
use crate::{Error, RedirectConfig};

const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

/// Upper bound on stale rules removed at our priority (guards a loop).
const MAX_STALE_RULES: usize = 64;

pub(crate) fn install(ns: &Netns, cfg: &RedirectConfig) -> Result<(), Error> {
    let table = cfg.route_table.to_string();
    let families = match routes(ns, &table, &FAMILIES) {
        // IPv6 switched off in the pod (sysctl or kernel): there is no IPv6
        // traffic to deliver, hence nothing to bypass; keep IPv4 only.
        Err(e) if ipv6_unavailable(&e) => {
            tracing::warn!(error = %e, "IPv6 unavailable in the pod netns; IPv6 policy routing skipped");
            routes(ns, &table, &FAMILIES[..1])?;
            &FAMILIES[..1]
        }
        other => other.map(|()| &FAMILIES[..])?,
    };

    let pref = cfg.rule_priority.to_string();
    let fwmark = format!("{:#x}/{:#x}", cfg.tproxy_mark, cfg.mark_mask);
    let wanted = format!("{pref}: from all fwmark {fwmark} lookup {table}");
    for (family, _) in families {
        let current = ns.run("ip", &[family, "rule", "show", "pref", &pref], None)?;
        if normalize(&current) == wanted {
            continue;
        }
        // Partial or stale state (e.g. a different mark from an older
        // config): clear our priority, then add the one rule we want.
        if !current.trim().is_empty() {
            delete_rules(ns, family, &pref)?;
        }
        let add = [
            family, "rule", "add", "pref", &pref, "fwmark", &fwmark, "lookup", &table,
        ];
        ns.run("ip", &add, None)?;
    }
    Ok(())
}

/// Brings lo up (the IPv6 route needs it) and sets the `local` default
/// routes; `replace` makes this idempotent. One `ip` process for all.
fn routes(ns: &Netns, table: &str, families: &[(&str, &str)]) -> Result<(), Error> {
    let mut batch = String::from("link set lo up\n");
    // Batch lines take no -4/-6 option: the prefix gives the family.
    for (_, default) in families {
        batch.push_str(&format!(
            "route replace local {default} dev lo table {table}\n"
        ));
    }
    ns.run("ip", &["-batch", "-"], Some(&batch)).map(drop)
}

fn ipv6_unavailable(err: &Error) -> bool {
    matches!(err, Error::Command { stderr, .. }
        if stderr.contains("IPv6 is disabled") || stderr.contains("Address family not supported"))
}

pub(crate) fn remove(ns: &Netns, cfg: &RedirectConfig) -> Result<(), Error> {
    let pref = cfg.rule_priority.to_string();
    let table = cfg.route_table.to_string();
    for (family, default) in FAMILIES {
        let del = [
            family, "route", "del", "local", default, "dev", "lo", "table", &table,
        ];
        let result =
            delete_rules(ns, family, &pref).and_then(|()| ns.run("ip", &del, None).map(drop));
        match result {
            Err(e) if !is_not_found(&e) && !ipv6_unavailable(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Policy rules and the non-main, non-local routes, for `show`.
pub(crate) fn dump(ns: &Netns) -> Result<String, Error> {
    let mut out = String::new();
    for (family, _) in FAMILIES {
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

fn delete_rules(ns: &Netns, family: &str, pref: &str) -> Result<(), Error> {
    for _ in 0..MAX_STALE_RULES {
        match ns.run("ip", &[family, "rule", "del", "pref", pref], None) {
            Ok(_) => continue,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Err(Error::Config(format!(
        "more than {MAX_STALE_RULES} policy rules at priority {pref}"
    )))
}

/// `ip rule show` output with whitespace collapsed to single spaces.
fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
