//! Which mesh host a query names, and its addresses from the store, with
//! ztunnel's semantics (src/dns/server.rs there): the query name itself,
//! then the name with one of the pod's search domains stripped when the
//! client would have expanded it (fewer dots than `ndots`), each also as a
//! Kubernetes short form (`svc`, `svc.ns`, `svc.ns.svc` completed to
//! `svc.ns.svc.<domain>`), each tried literally and then against wildcard
//! hosts (`*.example.com`). A match answers with the service's VIPs on the
//! pod's network (a headless Kubernetes Service: its endpoints' IPs); a
//! service without VIPs outside the cluster domain (a DNS-resolved
//! ServiceEntry) is no match, so the name is forwarded. Also which
//! `namespace/hostname` an unknown name is subscribed to on demand.

use std::net::IpAddr;

use crate::state::{Service, Store};

use super::wire::{TYPE_A, TYPE_AAAA};

/// How names are read for one pod.
#[derive(Debug, Clone)]
pub struct Names {
    pub pod_namespace: String,
    /// The cluster domain, `cluster.local`.
    pub cluster_domain: String,
    /// The pod's search domains (resolv.conf), lower case.
    pub search: Vec<String>,
    pub ndots: u8,
}

/// One name a query may stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The host to look up.
    pub host: String,
    /// The name the client typed, when `host` came from stripping a search
    /// domain off the query (answers then carry a CNAME to it).
    pub stripped: Option<String>,
}

/// A query answered from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The service that matched, `namespace/hostname`.
    pub service: String,
    /// The CNAME target (the stripped name) when a search domain was
    /// stripped and the match was not a wildcard.
    pub cname: Option<String>,
    /// Addresses of the asked family; empty is NODATA (the host exists).
    pub addrs: Vec<IpAddr>,
}

impl Names {
    fn svc_domain(&self) -> String {
        format!("svc.{}", self.cluster_domain)
    }

    /// The names `qname` may stand for, most specific first, without
    /// repeats.
    pub fn candidates(&self, qname: &str) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        let mut add = |host: String, stripped: Option<&str>| {
            if !out.iter().any(|c| c.host == host) {
                out.push(Candidate {
                    host,
                    stripped: stripped.map(str::to_string),
                });
            }
        };
        add(qname.to_string(), None);
        for fqdn in self.kube_fqdns(qname) {
            add(fqdn, None);
        }
        for domain in &self.search {
            let Some(stripped) = qname
                .strip_suffix(domain.as_str())
                .and_then(|s| s.strip_suffix('.'))
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            // The client expands only names with fewer dots than ndots, so
            // only then can this query be its expansion of `stripped`.
            if stripped.matches('.').count() >= self.ndots as usize {
                continue;
            }
            add(stripped.to_string(), Some(stripped));
            for fqdn in self.kube_fqdns(stripped) {
                add(fqdn, Some(stripped));
            }
        }
        out
    }

    /// `name` completed to `<svc>.<ns>.svc.<domain>` where it is a short
    /// form of one.
    fn kube_fqdns(&self, name: &str) -> Vec<String> {
        let labels: Vec<&str> = name.split('.').collect();
        let svc = self.svc_domain();
        match labels.as_slice() {
            [_] => vec![format!("{name}.{}.{svc}", self.pod_namespace)],
            [_, _] => vec![format!("{name}.{svc}")],
            [_, _, "svc"] => vec![format!("{name}.{}", self.cluster_domain)],
            _ => Vec::new(),
        }
    }

    /// The Address resources to subscribe on demand for a query of
    /// `qname` the store has no answer to: for the name itself and, if it
    /// is the client's first search expansion (the pod's own namespace
    /// domain, tried first with Kubernetes' `ndots:5`), for what the client
    /// typed — as is and completed to a Service name. Later expansions of
    /// the same typed name need no subscription of their own: the first
    /// one already brought the host, or a negative answer.
    pub fn demand_names(&self, qname: &str) -> Vec<String> {
        let mut hosts = vec![qname.to_string()];
        hosts.extend(self.kube_fqdns(qname));
        if let Some(first) = self.search.first()
            && let Some(stripped) = qname
                .strip_suffix(first.as_str())
                .and_then(|s| s.strip_suffix('.'))
                .filter(|s| !s.is_empty() && s.matches('.').count() < self.ndots as usize)
        {
            hosts.push(stripped.to_string());
            hosts.extend(self.kube_fqdns(stripped));
        }
        let mut out: Vec<String> = Vec::new();
        for n in hosts.iter().filter_map(|h| self.demand_name(h)) {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }

    /// The Address resource to subscribe on demand for `host`, if it could
    /// be a mesh host: `<ns>/<svc>.<ns>.svc.<domain>` for a Kubernetes
    /// Service name, `<pod ns>/<host>` for a name outside the cluster
    /// domain (a ServiceEntry host in the pod's namespace). Other names
    /// inside the cluster domain (pods, search-expanded junk) are never
    /// Services, so they are not asked for.
    fn demand_name(&self, host: &str) -> Option<String> {
        let domain_suffix = format!(".{}", self.cluster_domain);
        if let Some(rest) = host.strip_suffix(&format!(".{}", self.svc_domain())) {
            return match rest.split('.').collect::<Vec<_>>().as_slice() {
                [_, ns] => Some(format!("{ns}/{host}")),
                _ => None,
            };
        }
        if host.ends_with(&domain_suffix) || host == self.cluster_domain || !host.contains('.') {
            return None;
        }
        Some(format!("{}/{host}", self.pod_namespace))
    }
}

/// `host` itself, then `*.<parent>` for each parent domain with at least
/// two labels.
fn wildcards(host: &str) -> Vec<String> {
    let mut out = vec![host.to_string()];
    let mut rest = host;
    while let Some((_, parent)) = rest.split_once('.') {
        out.push(format!("*.{parent}"));
        rest = parent;
    }
    out
}

/// Looks `qname` up for a query of `qtype` (A or AAAA) from a pod on
/// `network`.
pub fn find(store: &Store, names: &Names, network: &str, qname: &str, qtype: u16) -> Option<Found> {
    let svc_suffix = format!(".{}", names.svc_domain());
    for cand in names.candidates(qname) {
        for (i, host) in wildcards(&cand.host).into_iter().enumerate() {
            let services = store.services_by_host(&host);
            let usable = services
                .iter()
                .filter(|s| !s.vips.is_empty() || s.hostname.ends_with(&svc_suffix));
            let best = usable
                .clone()
                .find(|s| s.namespace == names.pod_namespace)
                .or_else(|| usable.clone().next());
            if let Some(s) = best {
                return Some(Found {
                    service: s.key(),
                    cname: cand.stripped.clone().filter(|_| i == 0),
                    addrs: addresses(store, s, network, qtype),
                });
            }
        }
    }
    None
}

fn family_matches(ip: &IpAddr, qtype: u16) -> bool {
    match ip {
        IpAddr::V4(_) => qtype == TYPE_A,
        IpAddr::V6(_) => qtype == TYPE_AAAA,
    }
}

/// The service's VIPs on `network` of the asked family; for a headless
/// service, one address per endpoint.
fn addresses(store: &Store, s: &Service, network: &str, qtype: u16) -> Vec<IpAddr> {
    if s.vips.is_empty() {
        return store
            .service_endpoints(s)
            .iter()
            .filter_map(|w| {
                w.addresses
                    .iter()
                    .find(|ip| family_matches(ip, qtype))
                    .copied()
            })
            .collect();
    }
    s.vips
        .iter()
        .filter(|v| v.network == network && family_matches(&v.address, qtype))
        .map(|v| v.address)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::{Address, NetworkAddr, StoreUpdate};

    fn names() -> Names {
        Names {
            pod_namespace: "ns-a".into(),
            cluster_domain: "cluster.local".into(),
            search: vec![
                "ns-a.svc.cluster.local".into(),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
            ndots: 5,
        }
    }

    fn service(ns: &str, host: &str, vips: &[&str]) -> Address {
        Address::Service(Arc::new(Service {
            name: host.split('.').next().unwrap().into(),
            namespace: ns.into(),
            hostname: host.into(),
            vips: vips
                .iter()
                .map(|v| NetworkAddr::new("", v.parse().unwrap()))
                .collect(),
            ports: [(80, 8080)].into(),
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: None,
        }))
    }

    fn store() -> Store {
        let s = Store::new();
        s.apply(StoreUpdate {
            addresses: vec![
                service(
                    "ns-b",
                    "b.ns-b.svc.cluster.local",
                    &["10.96.0.10", "fd00::10"],
                ),
                service("ns-a", "api.example.com", &["240.240.0.1"]),
                service("ns-x", "api.example.com", &["240.240.0.2"]),
                service("ns-a", "*.wild.example", &["240.240.0.3"]),
                service("ns-a", "dns-only.example.com", &[]),
            ],
            ..Default::default()
        });
        s
    }

    fn lookup(name: &str, qtype: u16) -> Option<Found> {
        find(&store(), &names(), "", name, qtype)
    }

    #[test]
    fn full_service_names_answer_with_the_vip_of_the_family() {
        let f = lookup("b.ns-b.svc.cluster.local", TYPE_A).unwrap();
        assert_eq!(f.addrs, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(f.cname, None);
        let f = lookup("b.ns-b.svc.cluster.local", TYPE_AAAA).unwrap();
        assert_eq!(f.addrs, ["fd00::10".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn search_expanded_short_forms_get_a_cname_to_what_the_client_typed() {
        // `b.ns-b` expanded with the pod's first search domain.
        let f = lookup("b.ns-b.ns-a.svc.cluster.local", TYPE_A).unwrap();
        assert_eq!(f.service, "ns-b/b.ns-b.svc.cluster.local");
        assert_eq!(f.cname.as_deref(), Some("b.ns-b"));
        // A ServiceEntry host expanded with a search domain.
        let f = lookup("api.example.com.svc.cluster.local", TYPE_A).unwrap();
        assert_eq!(f.cname.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn prefers_the_pods_namespace_then_the_first() {
        assert_eq!(
            lookup("api.example.com", TYPE_A).unwrap().service,
            "ns-a/api.example.com"
        );
        let mut n = names();
        n.pod_namespace = "ns-q".into();
        let f = find(&store(), &n, "", "api.example.com", TYPE_A).unwrap();
        assert_eq!(f.service, "ns-a/api.example.com");
    }

    #[test]
    fn wildcards_match_without_cname() {
        let f = lookup("x.wild.example.ns-a.svc.cluster.local", TYPE_A).unwrap();
        assert_eq!(f.service, "ns-a/*.wild.example");
        assert_eq!(f.cname, None);
    }

    #[test]
    fn misses_and_nodata() {
        assert_eq!(lookup("other.example.com", TYPE_A), None);
        // No VIPs outside the cluster domain: resolved by DNS, forwarded.
        assert_eq!(lookup("dns-only.example.com", TYPE_A), None);
        // Found, but no address of the family: NODATA, not a miss.
        assert!(
            lookup("api.example.com", TYPE_AAAA)
                .unwrap()
                .addrs
                .is_empty()
        );
        // Another network's VIP is not callable.
        assert!(
            find(&store(), &names(), "net2", "api.example.com", TYPE_A)
                .unwrap()
                .addrs
                .is_empty()
        );
    }

    #[test]
    fn ndots_limits_what_counts_as_an_expansion() {
        let mut n = names();
        n.ndots = 2;
        // `api.example.com` has 2 dots: the client would not expand it.
        assert_eq!(
            find(
                &store(),
                &n,
                "",
                "api.example.com.svc.cluster.local",
                TYPE_A
            ),
            None
        );
    }

    #[test]
    fn demand_names() {
        let n = names();
        assert_eq!(
            n.demand_name("b.ns-b.svc.cluster.local").as_deref(),
            Some("ns-b/b.ns-b.svc.cluster.local")
        );
        assert_eq!(
            n.demand_name("api.example.com").as_deref(),
            Some("ns-a/api.example.com")
        );
        assert_eq!(n.demand_name("x.y.ns-b.svc.cluster.local"), None);
        assert_eq!(n.demand_name("api.example.com.cluster.local"), None);
        assert_eq!(n.demand_name("localhost"), None);
        assert_eq!(
            n.demand_names("api.example.com.ns-a.svc.cluster.local"),
            ["ns-a/api.example.com"]
        );
        // A later expansion asks for nothing new.
        assert!(
            n.demand_names("api.example.com.svc.cluster.local")
                .is_empty()
        );
        assert_eq!(
            n.demand_names("reviews.ns-a.svc.cluster.local"),
            ["ns-a/reviews.ns-a.svc.cluster.local"]
        );
        // `b.ns-b` may be a Service short form or a two-label host.
        assert_eq!(
            n.demand_names("b.ns-b.ns-a.svc.cluster.local"),
            ["ns-a/b.ns-b", "ns-b/b.ns-b.svc.cluster.local"]
        );
    }
}
