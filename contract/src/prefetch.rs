//! A pod's prefetch list (annotation `sidetunnel.io/prefetch`:
//! comma-separated hostnames or IPs), handed by the shim to the proxy as
//! [`FLAG`], which the proxy turns into on-demand Address resource names as
//! istiod spells them, so known dependencies are subscribed at start and the
//! first connection to them does not wait for a control-plane round trip.
//! One grammar for both: the shim checks the list with [`prefetch_names`]
//! so a bad entry fails RunPodSandbox instead of every proxy start.

use std::net::IpAddr;

/// The proxy's command-line flag carrying the list (comma separated).
pub const FLAG: &str = "--xds-prefetch";

/// Cluster domain appended to `name.namespace.svc` (Kubernetes' default).
const CLUSTER_DOMAIN: &str = "cluster.local";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("prefetch entry {entry:?}: {reason}")]
pub struct PrefetchError {
    pub entry: String,
    pub reason: String,
}

/// Maps each entry to a resource name:
/// * an IP → `network/IP` (a workload IP or a service VIP);
/// * `namespace/hostname` → itself (any service, ServiceEntries included);
/// * `name.namespace.svc[.domain]` → `namespace/name.namespace.svc.domain`
///   (the domain defaults to `cluster.local`).
///
/// Other hostnames are refused: their namespace cannot be known (write
/// them as `namespace/hostname`). Duplicates are dropped, order is kept.
pub fn prefetch_names(entries: &[String], network: &str) -> Result<Vec<String>, PrefetchError> {
    let mut out: Vec<String> = Vec::with_capacity(entries.len());
    for raw in entries {
        let entry = raw.trim();
        let err = |reason: &str| PrefetchError {
            entry: entry.to_string(),
            reason: reason.to_string(),
        };
        let name = if let Ok(ip) = entry.parse::<IpAddr>() {
            // istiod's alias of an address: `network/IP`, `/IP` on the
            // default network.
            format!("{network}/{ip}")
        } else if let Some((ns, host)) = entry.split_once('/') {
            if ns.is_empty() || host.is_empty() || host.contains('/') {
                return Err(err("expected namespace/hostname"));
            }
            entry.to_string()
        } else {
            let labels: Vec<&str> = entry.split('.').collect();
            if labels.iter().any(|l| l.is_empty()) {
                return Err(err("empty label in hostname"));
            }
            match labels.as_slice() {
                [name, ns, "svc"] => format!("{ns}/{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
                [_, ns, "svc", ..] => format!("{ns}/{entry}"),
                _ => {
                    return Err(err(
                        "not a Kubernetes service hostname (name.namespace.svc[.domain]); \
                         write other hosts as namespace/hostname",
                    ));
                }
            }
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str], net: &str) -> Result<Vec<String>, PrefetchError> {
        prefetch_names(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), net)
    }

    #[test]
    fn entries_map_to_istiod_names() {
        assert_eq!(
            names(
                &[
                    "ratings.default.svc.cluster.local",
                    "reviews.shop.svc",
                    " 10.96.0.10 ",
                    "fd00::1",
                    "istio-system/api.example.com",
                    "reviews.shop.svc",
                ],
                "",
            )
            .unwrap(),
            [
                "default/ratings.default.svc.cluster.local",
                "shop/reviews.shop.svc.cluster.local",
                "/10.96.0.10",
                "/fd00::1",
                "istio-system/api.example.com",
            ]
        );
        assert_eq!(names(&["10.0.0.1"], "net1").unwrap(), ["net1/10.0.0.1"]);
    }

    #[test]
    fn ambiguous_or_malformed_entries_are_refused() {
        for bad in [
            "api.example.com",
            "reviews",
            "reviews.shop",
            "a..svc",
            "/x",
            "ns/",
        ] {
            let e = names(&[bad], "").unwrap_err();
            assert_eq!(e.entry, bad);
        }
        let e = names(&["api.example.com"], "").unwrap_err();
        assert!(e.to_string().contains("namespace/hostname"), "{e}");
    }
}
