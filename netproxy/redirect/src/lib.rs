//! Traffic redirection inside a pod's network namespace: the ruleset the shim
//! installs at sandbox creation so every app connection passes the proxy.
//!
//! * outbound TCP from unmarked sockets, not to loopback → NAT redirect to
//!   the proxy's outbound port (15001; original destination via
//!   `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`);
//! * inbound TCP except the proxy's own ports (15008 HBONE, 15020, 15021) →
//!   TPROXY to 15006 (original source and destination preserved), reset when
//!   the proxy is not listening (fail closed);
//! * the proxy's sockets are exempt by packet mark (0x539/0xfff), never by UID;
//! * policy routing (`fwmark 0x111/0xfff lookup 100`, `local default dev lo
//!   table 100`) for transparent delivery.
//!
//! The proxy never calls this crate to install rules; the shim does, from
//! the node, before any app container exists, over netlink from its own
//! process (nothing spawned). `show` prints the state with `nft` and `ip`.
//! Mechanism and trade-offs: docs/redirection.md.

mod annotations;
mod config;
mod error;
mod exec;
mod netlink;
mod netns;
mod nft;
mod routing;
mod ruleset;

use std::path::Path;

pub use annotations::{
    DNS_CAPTURE, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS, ISTIO_DNS_CAPTURE, PROBE_PORTS,
};
pub use config::{PortSelection, RedirectConfig};
pub use error::Error;
pub use ruleset::{TABLE, install_script};

use exec::is_not_found;
use netlink::{NETLINK_NETFILTER, NETLINK_ROUTE};
use netns::Netns;

/// Installs (or converges to) the ruleset for `cfg` inside the network
/// namespace at `netns_path`. Idempotent: the nftables table is replaced in
/// one transaction and the policy rule is rewritten only when it differs,
/// so re-running after a shim restart or a half-finished install yields the
/// same state. Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (setns). Blocking
/// (a few netlink round trips; the kernel may load nftables modules on
/// first use).
pub fn install(netns_path: &Path, cfg: &RedirectConfig) -> Result<(), Error> {
    cfg.validate()?;
    let ns = Netns::open(netns_path)?;
    let [mut rtnl, mut nfnl] = netlink::open_in(&ns, [NETLINK_ROUTE, NETLINK_NETFILTER])?;
    // Routing first: the TPROXY rules rely on it for delivery.
    routing::install(&mut rtnl, cfg)?;
    nft::install(&mut nfnl, cfg)?;
    nfnl.close_in_background();
    tracing::info!(netns = %netns_path.display(), "redirection ruleset installed");
    Ok(())
}

/// Removes everything `install` added. Removing what is absent is not an error.
pub fn remove(netns_path: &Path, cfg: &RedirectConfig) -> Result<(), Error> {
    let ns = Netns::open(netns_path)?;
    let [mut rtnl, mut nfnl] = netlink::open_in(&ns, [NETLINK_ROUTE, NETLINK_NETFILTER])?;
    nft::remove(&mut nfnl)?;
    routing::remove(&mut rtnl, cfg)?;
    tracing::info!(netns = %netns_path.display(), "redirection ruleset removed");
    Ok(())
}

/// The installed ruleset, printable for operators: the nftables table, the
/// policy rules and the routes of non-main tables.
pub fn show(netns_path: &Path) -> Result<String, Error> {
    let ns = Netns::open(netns_path)?;
    let mut out = format!("# nft list table inet {TABLE}\n");
    match ns.run("nft", &["list", "table", "inet", TABLE], None) {
        Ok(table) => out.push_str(&table),
        Err(e) if is_not_found(&e) => out.push_str("(not installed)\n"),
        Err(e) => return Err(e),
    }
    out.push_str(&routing::dump(&ns)?);
    Ok(out)
}
