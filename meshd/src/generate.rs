//! Scale-scenario generator: a deterministic (per seed) inventory with
//! Kubernetes-like shapes. Every service fronts one deployment; pods are
//! spread over deployments (every deployment gets one, the rest go to a
//! skewed subset, as real clusters have a few large deployments), scheduled
//! onto nodes of ~30 pods with a /24 pod CIDR each; VIPs come from
//! 172.16.0.0/12. About one namespace in ten runs a waypoint that its
//! services use; about one service in eight has a selector-scoped ALLOW
//! policy, each namespace in four a namespace-wide one, plus one mesh-wide
//! DENY in istio-system.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::inventory::convert::ROOT_NAMESPACE;
use crate::inventory::model::{
    Clause, Gateway, Inventory, Match, Policy, Rule, Selector, Service, Workload,
};

#[derive(Debug, Clone)]
pub struct Params {
    pub services: usize,
    pub pods: usize,
    pub seed: u64,
    /// Default: one namespace per ten services (at least one).
    pub namespaces: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("--services must be at least 1")]
    NoServices,
    #[error("--namespaces must be at least 1")]
    NoNamespaces,
    #[error("--pods {pods} exceeds the generator's address space ({max} pods)")]
    TooManyPods { pods: usize, max: usize },
}

/// Pods per node, and so per node /24 (kubelet's default max is 110).
const PODS_PER_NODE: usize = 30;
/// Nodes get 10.<n/256>.<n%256>.0/24; 10.0.0.0/8 holds 65536 of them.
const MAX_NODES: usize = 65536;

/// SplitMix64: tiny, and its output is fixed forever for a seed (a library
/// RNG may change streams across versions, which would change scenarios).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
    /// Kubernetes-style random suffix (consonants and digits).
    fn suffix(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len())] as char)
            .collect()
    }
}

const TEAMS: &[&str] = &[
    "payments",
    "checkout",
    "catalog",
    "search",
    "identity",
    "orders",
    "shipping",
    "billing",
    "inventory",
    "analytics",
    "frontend",
    "platform",
    "ml",
    "notifications",
    "reviews",
    "ads",
];
const PARTS: &[&str] = &[
    "api",
    "worker",
    "gateway",
    "backend",
    "cache",
    "db-proxy",
    "scheduler",
    "indexer",
    "web",
    "grpc",
    "consumer",
    "exporter",
];
const PORT_SETS: &[&[(u32, u32)]] = &[
    &[(80, 8080)],
    &[(8080, 8080)],
    &[(9090, 9090)],
    &[(80, 8080), (9090, 9090)],
    &[(443, 8443), (80, 8080)],
    &[(6379, 6379)],
    &[(5432, 5432)],
    &[(80, 8080), (8081, 8081), (9090, 9090)],
];

/// Namespaces are named after teams; once every team has one, a team gets
/// a second (`payments-2`), and so on.
fn namespace_name(i: usize) -> String {
    let team = TEAMS[i % TEAMS.len()];
    match i / TEAMS.len() {
        0 => team.to_string(),
        n => format!("{team}-{}", n + 1),
    }
}

/// `base`, or `base-2`, `base-3`… if taken.
fn unique(taken: &mut std::collections::HashSet<String>, base: String) -> String {
    let mut name = base.clone();
    let mut n = 1;
    while !taken.insert(name.clone()) {
        n += 1;
        name = format!("{base}-{n}");
    }
    name
}

struct Deployment {
    name: String,
    namespace: String,
    service_account: String,
    hostname: String,
    ports: BTreeMap<u32, u32>,
    replicas: usize,
    version: String,
}

fn ip(n: u32) -> String {
    Ipv4Addr::from(n).to_string()
}

pub fn generate(p: &Params) -> Result<Inventory, GenerateError> {
    if p.services == 0 {
        return Err(GenerateError::NoServices);
    }
    let k = p.namespaces.unwrap_or((p.services / 10).max(1));
    if k == 0 {
        return Err(GenerateError::NoNamespaces);
    }
    let max = MAX_NODES * PODS_PER_NODE;
    if p.pods > max {
        return Err(GenerateError::TooManyPods { pods: p.pods, max });
    }
    let mut rng = Rng(p.seed);
    let namespaces: Vec<String> = (0..k).map(namespace_name).collect();
    // One namespace in ten (when there are enough services) has a waypoint.
    let waypoint_ns: Vec<bool> = (0..k).map(|i| p.services >= 20 && i % 10 == 3).collect();

    // Names taken per namespace (Kubernetes names are unique per namespace).
    let mut taken: Vec<std::collections::HashSet<String>> = vec![Default::default(); k];
    let mut deployments: Vec<Deployment> = (0..p.services)
        .map(|i| {
            let ns_idx = i % k;
            let ns = &namespaces[ns_idx];
            let is_waypoint = waypoint_ns[ns_idx] && i / k == 0;
            let name = if is_waypoint {
                "waypoint".to_string()
            } else {
                // A third of the deployments carry a team prefix (mostly their
                // namespace's team), the rest are named by role alone
                // (`api`, `worker`) as the namespace already says whose.
                let part = rng.pick(PARTS);
                let base = if rng.chance(65) {
                    part.to_string()
                } else if rng.chance(80) {
                    format!("{}-{part}", TEAMS[ns_idx % TEAMS.len()])
                } else {
                    format!("{}-{part}", rng.pick(TEAMS))
                };
                unique(&mut taken[ns_idx], base)
            };
            let ports = if is_waypoint {
                BTreeMap::from([(15008, 15008), (15021, 15021)])
            } else {
                PORT_SETS[rng.below(PORT_SETS.len())]
                    .iter()
                    .copied()
                    .collect()
            };
            Deployment {
                service_account: if is_waypoint || rng.chance(60) {
                    name.clone()
                } else {
                    "default".into()
                },
                hostname: format!("{name}.{ns}.svc.cluster.local"),
                namespace: ns.clone(),
                name,
                ports,
                replicas: 0,
                version: format!("v{}", 1 + rng.below(3)),
            }
        })
        .collect();

    // Replicas: one each first, then a skewed spread of the rest.
    for d in deployments.iter_mut().take(p.pods) {
        d.replicas = 1;
    }
    let weights: Vec<u64> = (0..deployments.len())
        .map(|_| {
            if rng.chance(15) {
                12
            } else {
                1 + rng.below(3) as u64
            }
        })
        .collect();
    let total: u64 = weights.iter().sum();
    for _ in deployments.len().min(p.pods)..p.pods {
        let mut x = rng.next() % total;
        let mut i = 0;
        while x >= weights[i] {
            x -= weights[i];
            i += 1;
        }
        deployments[i].replicas += 1;
    }

    let mut services = Vec::with_capacity(deployments.len());
    for (i, d) in deployments.iter().enumerate() {
        let ns_idx = namespaces
            .iter()
            .position(|n| *n == d.namespace)
            .unwrap_or(0);
        let waypoint = (waypoint_ns[ns_idx] && d.name != "waypoint").then(|| Gateway {
            address: None,
            hostname: Some(format!(
                "{}/waypoint.{}.svc.cluster.local",
                d.namespace, d.namespace
            )),
            port: None,
        });
        services.push(Service {
            name: d.name.clone(),
            namespace: d.namespace.clone(),
            hostname: None,
            vips: vec![ip(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + 1 + i as u32)],
            ports: d.ports.clone(),
            waypoint,
            ..Default::default()
        });
    }

    let mut workloads = Vec::with_capacity(p.pods);
    let mut pod_index = 0usize;
    let mut pod_names = std::collections::HashSet::new();
    for d in &deployments {
        let rs_hash = {
            let len = 9 + rng.below(2);
            rng.suffix(len)
        };
        for _ in 0..d.replicas {
            let node = pod_index / PODS_PER_NODE;
            let addr = u32::from(Ipv4Addr::new(10, (node / 256) as u8, (node % 256) as u8, 0))
                + 2
                + (pod_index % PODS_PER_NODE) as u32;
            pod_index += 1;
            // Random suffixes may collide; Kubernetes retries, so do we.
            let name = loop {
                let n = format!("{}-{rs_hash}-{}", d.name, rng.suffix(5));
                if pod_names.insert(n.clone()) {
                    break n;
                }
            };
            workloads.push(Workload {
                name,
                namespace: d.namespace.clone(),
                service_account: Some(d.service_account.clone()),
                addresses: vec![ip(addr)],
                node: format!("node-{node}"),
                canonical_name: Some(d.name.clone()),
                canonical_revision: Some(d.version.clone()),
                workload_name: Some(d.name.clone()),
                labels: BTreeMap::from([
                    ("app".to_string(), d.name.clone()),
                    ("version".to_string(), d.version.clone()),
                ]),
                services: BTreeMap::from([(
                    format!("{}/{}", d.namespace, d.hostname),
                    d.ports.clone(),
                )]),
                ..Default::default()
            });
        }
    }

    let policies = policies(&mut rng, &deployments, &namespaces);
    Ok(Inventory {
        workloads,
        services,
        policies,
        raw: vec![],
    })
}

fn policies(rng: &mut Rng, deployments: &[Deployment], namespaces: &[String]) -> Vec<Policy> {
    let mut out = vec![Policy {
        name: "deny-blocked".into(),
        namespace: ROOT_NAMESPACE.into(),
        action: Some("Deny".into()),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    namespaces: vec!["blocked".into()],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }];
    for (i, ns) in namespaces.iter().enumerate() {
        if i % 4 == 1 {
            out.push(Policy {
                name: "allow-same-namespace".into(),
                namespace: ns.clone(),
                rules: vec![Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            namespaces: vec![ns.clone()],
                            ..Default::default()
                        }],
                    }],
                }],
                ..Default::default()
            });
        }
    }
    for d in deployments {
        if d.name == "waypoint" || !rng.chance(12) {
            continue;
        }
        let callers = 1 + rng.below(3);
        let principals = (0..callers)
            .map(|_| {
                let c = &deployments[rng.below(deployments.len())];
                format!("cluster.local/ns/{}/sa/{}", c.namespace, c.service_account)
            })
            .collect();
        out.push(Policy {
            name: format!("allow-{}", d.name),
            namespace: d.namespace.clone(),
            selector: Some(Selector {
                match_labels: BTreeMap::from([("app".to_string(), d.name.clone())]),
                workloads: vec![],
            }),
            rules: vec![Rule {
                clauses: vec![
                    Clause {
                        matches: vec![Match {
                            principals,
                            ..Default::default()
                        }],
                    },
                    Clause {
                        matches: vec![Match {
                            destination_ports: d.ports.values().copied().collect(),
                            ..Default::default()
                        }],
                    },
                ],
            }],
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Context, convert::convert};
    use crate::snapshot::{Kind, TypeUrl};
    use prost::Message;
    use sidetunnel_proto::istio::workload::{Address, address};

    fn ctx() -> Context {
        Context {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    #[test]
    fn deterministic_valid_and_sized() {
        let params = Params {
            services: 100,
            pods: 1000,
            seed: 7,
            namespaces: None,
        };
        let a = generate(&params).unwrap();
        assert_eq!(a, generate(&params).unwrap());
        assert_ne!(
            a,
            generate(&Params {
                seed: 8,
                ..params.clone()
            })
            .unwrap()
        );
        assert_eq!(a.workloads.len(), 1000);
        assert_eq!(a.services.len(), 100);
        // Round-trips through YAML and converts cleanly.
        let text = serde_yaml::to_string(&a).unwrap();
        let snap = crate::inventory::parse(&ctx(), &text).unwrap();
        let table = snap.table(TypeUrl::Address);
        assert_eq!(
            table.values().filter(|e| e.kind == Kind::Workload).count(),
            1000
        );
        assert_eq!(
            table.values().filter(|e| e.kind == Kind::Service).count(),
            100
        );
        assert!(a.services.iter().any(|s| s.waypoint.is_some()));
        assert!(a.policies.iter().any(|p| p.selector.is_some()));
        let counts: Vec<usize> = a.services.iter().map(|s| s.ports.len()).collect();
        assert!(counts.iter().all(|c| (1..=3).contains(c)));
        // Some deployments are much larger than others.
        let mut replicas: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &a.workloads {
            *replicas
                .entry(w.workload_name.as_deref().unwrap())
                .or_default() += 1;
        }
        assert_eq!(replicas.values().min(), Some(&1));
        assert!(replicas.values().max().unwrap() > &20);
        // Selector policies are listed on the workloads they select.
        let selected = convert(&ctx(), &a)
            .unwrap()
            .table(TypeUrl::Address)
            .values()
            .filter_map(|e| match Address::decode(&e.body[..]).unwrap().r#type {
                Some(address::Type::Workload(w)) => Some(w.authorization_policies.len()),
                _ => None,
            })
            .filter(|&n| n > 0)
            .count();
        assert!(selected > 0);
    }

    #[test]
    fn fewer_pods_than_services_and_errors() {
        let inv = generate(&Params {
            services: 10,
            pods: 3,
            seed: 1,
            namespaces: Some(2),
        })
        .unwrap();
        assert_eq!(inv.workloads.len(), 3);
        assert!(
            generate(&Params {
                services: 0,
                pods: 3,
                seed: 1,
                namespaces: None
            })
            .is_err()
        );
        assert!(
            generate(&Params {
                services: 1,
                pods: 3,
                seed: 1,
                namespaces: Some(0)
            })
            .is_err()
        );
    }
}
