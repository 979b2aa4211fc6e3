//! The scale scenarios of issue 6 and the per-object cost model behind
//! `cargo xtask bench xds`: the three study scenarios (A, B, C), the study's
//! own numbers (`meshd/scale/study-xds-sizes.json`, a copy of the seed
//! measurements), the size of a full WDS exactly as meshd serves it, the
//! deterministic "who talks to whom" graph of a scenario, and what a
//! scoped (on-demand) proxy receives — per pod and cluster-wide, including
//! the fan-out of pod churn.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use serde::{Deserialize, Serialize};
use sidetunnel_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use sidetunnel_proto::istio::workload::{Address, Workload, address};

use crate::generate::{self, GenerateError, Params, Rng};
use crate::inventory::{Context, ConvertError, Inventory, convert::convert};
use crate::mode::Mode;
use crate::snapshot::{Kind, Snapshot, SnapshotBuilder, TypeUrl};
use crate::subscription::Outgoing;

/// One of the study's cluster shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub services: usize,
    pub pods: usize,
}

/// The study's scenarios, smallest first.
pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "A",
        services: 100,
        pods: 1000,
    },
    Scenario {
        name: "B",
        services: 500,
        pods: 3000,
    },
    Scenario {
        name: "C",
        services: 1000,
        pods: 5000,
    },
];

/// Generator seed of the published scenarios.
pub const SEED: u64 = 1;

/// Cluster id and trust domain the scenarios are served with (meshd's defaults).
pub fn context() -> Context {
    Context {
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
    }
}

impl Scenario {
    pub fn by_name(name: &str) -> Option<Scenario> {
        SCENARIOS
            .into_iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
    }

    pub fn params(&self) -> Params {
        Params {
            services: self.services,
            pods: self.pods,
            seed: SEED,
            namespaces: None,
        }
    }

    /// The scenario's inventory (what `generate --services N --pods M` writes).
    pub fn inventory(&self) -> Result<Inventory, GenerateError> {
        generate::generate(&self.params())
    }
}

/// The study's bytes per proxy, by discovery type (`None`: not received).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "UPPERCASE")]
pub struct StudyRow {
    pub wds: Option<u64>,
    pub cds: Option<u64>,
    pub eds: Option<u64>,
    pub lds: Option<u64>,
    pub rds: Option<u64>,
    #[serde(rename = "total")]
    pub total: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct StudyScenario {
    pub name: String,
    pub services: usize,
    pub pods: usize,
    pub waypoint: StudyRow,
    pub envoy_sidecar: StudyRow,
    pub ztunnel_sidecar: StudyRow,
}

#[derive(Debug, Clone, Deserialize)]
struct StudyFile {
    scenarios: Vec<StudyScenario>,
}

const STUDY_JSON: &str = include_str!("../scale/study-xds-sizes.json");

/// The study's measurements for `name` (A, B or C).
pub fn study(name: &str) -> Option<StudyScenario> {
    // The file ships inside the binary; a parse failure is a build-time bug
    // that the unit tests catch.
    let f: StudyFile = serde_json::from_str(STUDY_JSON).ok()?;
    f.scenarios.into_iter().find(|s| s.name == name)
}

/// Converts an inventory with the scenarios' context.
pub fn snapshot(inv: &Inventory) -> Result<Snapshot, ConvertError> {
    convert(&context(), inv)
}

/// The first response of a wildcard subscription to `t`: every resource of
/// the type, as meshd's ADS stream sends it.
pub fn full_response(snap: &Snapshot, t: TypeUrl) -> DeltaDiscoveryResponse {
    let resources = snap
        .table(t)
        .keys()
        .filter_map(|n| snap.resource(t, n))
        .collect();
    crate::xds::response(
        t,
        Outgoing {
            resources,
            removed: vec![],
        },
        "1-1-1".into(),
        1,
    )
}

/// A push of one changed workload, as meshd's ADS stream sends it.
pub fn incremental_response(uid: &str, w: &Workload) -> DeltaDiscoveryResponse {
    let mut b = SnapshotBuilder::default();
    b.add_workload(w);
    let snap = b.build();
    crate::xds::response(
        TypeUrl::Address,
        Outgoing {
            resources: snap.resource(TypeUrl::Address, uid).into_iter().collect(),
            removed: vec![],
        },
        "1-2-2".into(),
        2,
    )
}

/// Bytes of the full WDS: all Address resources in one delta ADS response,
/// protobuf-encoded (what the study's "WDS" column measures).
pub fn full_wds_bytes(snap: &Snapshot) -> usize {
    full_response(snap, TypeUrl::Address).encoded_len()
}

/// The workload resource `uid` of a snapshot, decoded.
pub fn workload(snap: &Snapshot, uid: &str) -> Option<Workload> {
    let e = snap.get(TypeUrl::Address, uid)?;
    match Address::decode(&e.body[..]).ok()?.r#type? {
        address::Type::Workload(w) => Some(w),
        address::Type::Service(_) => None,
    }
}

/// Bytes a length-delimited field of `len` bytes takes inside its parent
/// (one-byte tag + length varint + payload).
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The services a pod talks to: `k` distinct application services (never
/// a waypoint, never the pod's own service), drawn deterministically per pod
/// and uniformly over the mesh. Returned as `namespace/hostname` names.
pub fn destinations(snap: &Snapshot, own_services: &[String], pod: usize, k: usize) -> Vec<String> {
    let candidates: Vec<&String> = app_services(snap)
        .filter(|s| !own_services.contains(s))
        .collect();
    let k = k.min(candidates.len());
    let mut rng = Rng::new(SEED ^ (pod as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut picked = BTreeSet::new();
    while picked.len() < k {
        picked.insert(rng.below(candidates.len()));
    }
    picked.into_iter().map(|i| candidates[i].clone()).collect()
}

fn app_services(snap: &Snapshot) -> impl Iterator<Item = &String> {
    snap.table(TypeUrl::Address)
        .iter()
        .filter(|(name, e)| e.kind == Kind::Service && !is_waypoint(name))
        .map(|(name, _)| name)
}

fn is_waypoint(service_name: &str) -> bool {
    service_name
        .split_once('/')
        .is_some_and(|(_, host)| host.starts_with("waypoint."))
}

/// What a scoped proxy holds: Address names (its workload, its
/// destinations' services and their endpoints) and Authorization names
/// (the policies that apply to it), with the bytes they take in responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Scoped {
    pub addresses: BTreeSet<String>,
    pub policies: BTreeSet<String>,
    /// Resource bytes only (no response envelopes).
    pub address_bytes: usize,
    pub authorization_bytes: usize,
    /// Responses a proxy receives for this set when it fetches each
    /// destination separately: own workload, policies, one per destination.
    pub responses: usize,
    /// `responses` × the envelope of one response.
    pub envelope_bytes: usize,
}

impl Scoped {
    pub fn total_bytes(&self) -> usize {
        self.address_bytes + self.authorization_bytes + self.envelope_bytes
    }
}

/// Measured per-object costs of one scenario's snapshot, and the
/// subscription graph: each pod talks to `k` services.
pub struct CostModel<'a> {
    snap: &'a Snapshot,
    /// istiod: every proxy receives every policy (and its uid name back as a
    /// removal); extended: the policies that apply to its workload.
    mode: Mode,
    /// Resource name → bytes inside a response, per type.
    sizes: [HashMap<String, usize>; 2],
    /// Workload uid → the services it backs.
    workload_services: BTreeMap<String, Vec<String>>,
    /// Envelope of a response for Address / Authorization with no resource.
    envelope: [usize; 2],
}

fn ti(t: TypeUrl) -> usize {
    match t {
        TypeUrl::Address => 0,
        TypeUrl::Authorization => 1,
    }
}

impl<'a> CostModel<'a> {
    pub fn new(snap: &'a Snapshot, mode: Mode) -> CostModel<'a> {
        let mut sizes = [HashMap::new(), HashMap::new()];
        for t in TypeUrl::ALL {
            for name in snap.table(t).keys() {
                if let Some(mut r) = snap.resource(t, name) {
                    if t == TypeUrl::Authorization && !mode.extensions().versioned_authorization {
                        r.version.clear();
                    }
                    sizes[ti(t)].insert(name.clone(), field_len(r.encoded_len()));
                }
            }
        }
        let mut workload_services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for svc in app_services(snap).chain(
            snap.table(TypeUrl::Address)
                .iter()
                .filter(|(n, e)| e.kind == Kind::Service && is_waypoint(n))
                .map(|(n, _)| n),
        ) {
            let mut members = BTreeSet::new();
            snap.resolve(TypeUrl::Address, svc, &mut members);
            for m in members.into_iter().filter(|m| m != svc) {
                workload_services.entry(m).or_default().push(svc.clone());
            }
        }
        let envelope = TypeUrl::ALL
            .map(|t| crate::xds::response(t, Outgoing::default(), "1-1-1".into(), 1).encoded_len());
        CostModel {
            snap,
            mode,
            sizes,
            workload_services,
            envelope,
        }
    }

    /// Bytes resource `name` of type `t` takes inside a response.
    pub fn size(&self, t: TypeUrl, name: &str) -> usize {
        self.sizes[ti(t)].get(name).copied().unwrap_or(0)
    }

    /// Mean bytes one resource of `kind` takes inside a response.
    pub fn mean_size(&self, kind: Kind) -> f64 {
        let t = match kind {
            Kind::Authorization => TypeUrl::Authorization,
            _ => TypeUrl::Address,
        };
        let sizes: Vec<usize> = self
            .snap
            .table(t)
            .iter()
            .filter(|(_, e)| e.kind == kind)
            .map(|(n, _)| self.size(t, n))
            .collect();
        sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64
    }

    /// Bytes of the removal of `name` inside a response.
    pub fn removal_size(&self, name: &str) -> usize {
        field_len(name.len())
    }

    pub fn envelope(&self, t: TypeUrl) -> usize {
        self.envelope[ti(t)]
    }

    /// Workload uids, in order (a pod's index is its position here).
    pub fn workloads(&self) -> impl Iterator<Item = &String> {
        self.snap
            .table(TypeUrl::Address)
            .iter()
            .filter(|(_, e)| e.kind == Kind::Workload)
            .map(|(n, _)| n)
    }

    /// The services workload `uid` backs.
    pub fn services_of(&self, uid: &str) -> &[String] {
        self.workload_services
            .get(uid)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The `k` destinations of the pod at index `pod` with uid `uid`.
    pub fn destinations(&self, pod: usize, uid: &str, k: usize) -> Vec<String> {
        destinations(self.snap, self.services_of(uid), pod, k)
    }

    /// What a scoped proxy for `uid` talking to `dests` holds and costs.
    pub fn scoped(&self, uid: &str, dests: &[String]) -> Scoped {
        let mut s = Scoped::default();
        self.snap.resolve(TypeUrl::Address, uid, &mut s.addresses);
        for d in dests {
            self.snap.resolve(TypeUrl::Address, d, &mut s.addresses);
        }
        let scoped_policies = self.mode.extensions().uid_scoped_authorization;
        if scoped_policies {
            self.snap
                .resolve(TypeUrl::Authorization, uid, &mut s.policies);
        } else {
            s.policies
                .extend(self.snap.table(TypeUrl::Authorization).keys().cloned());
        }
        s.address_bytes = s
            .addresses
            .iter()
            .map(|n| self.size(TypeUrl::Address, n))
            .sum();
        s.authorization_bytes = s
            .policies
            .iter()
            .map(|n| self.size(TypeUrl::Authorization, n))
            .sum::<usize>()
            // istiod answers the uid subscription with its removal.
            + if scoped_policies { 0 } else { self.removal_size(uid) };
        s.responses = 2 + dests.len();
        s.envelope_bytes = self.envelope(TypeUrl::Address) * (1 + dests.len())
            + self.envelope(TypeUrl::Authorization);
        s
    }

    /// Bytes of a full wildcard sync of one proxy (Address + Authorization).
    pub fn full_bytes(&self) -> usize {
        TypeUrl::ALL
            .map(|t| {
                let mut r = full_response(self.snap, t);
                if t == TypeUrl::Authorization && !self.mode.extensions().versioned_authorization {
                    for res in &mut r.resources {
                        res.version.clear();
                    }
                }
                r.encoded_len()
            })
            .iter()
            .sum()
    }

    /// The serving mode this model prices.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// How scoped bytes spread over all pods of a scenario, each talking to `k`
/// services: a single pod can be far from typical (a destination's size is
/// its endpoint count, and replicas are skewed), so the bench reports its
/// pod next to these and picks the median pod as its pod.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    pub k: usize,
    pub pods: usize,
    pub min: usize,
    pub p10: usize,
    pub median: usize,
    pub mean: f64,
    pub p90: usize,
    pub max: usize,
    /// Index of the median pod (ties broken by index, so it is stable).
    pub median_pod: usize,
}

impl Spread {
    /// The spread of `per_pod` (scoped bytes, indexed by pod); `None` when empty.
    pub fn of(k: usize, per_pod: &[usize]) -> Option<Spread> {
        let mut ranked: Vec<(usize, usize)> = per_pod.iter().copied().zip(0..).collect();
        ranked.sort_unstable();
        let n = ranked.len();
        // Nearest rank below: for q = 0.5 this is the median pod's rank.
        let at = |q: f64| ranked[((n - 1) as f64 * q) as usize].0;
        Some(Spread {
            k,
            pods: n,
            min: ranked.first()?.0,
            p10: at(0.1),
            median: at(0.5),
            mean: per_pod.iter().sum::<usize>() as f64 / n as f64,
            p90: at(0.9),
            max: ranked.last()?.0,
            median_pod: ranked[(n - 1) / 2].1,
        })
    }
}

/// Scoped bytes (as [`Scoped::total_bytes`]) of every pod, in pod order,
/// each talking to its `k` destinations.
pub fn scoped_per_pod(model: &CostModel<'_>, k: usize) -> Vec<usize> {
    model
        .workloads()
        .enumerate()
        .map(|(i, uid)| {
            model
                .scoped(uid, &model.destinations(i, uid, k))
                .total_bytes()
        })
        .collect()
}

/// Cluster-wide totals of one scenario for both subscription modes.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterTotals {
    pub pods: usize,
    pub k: usize,
    /// One initial sync of every pod.
    pub full_sync_wildcard: u64,
    pub full_sync_scoped: u64,
    /// Pods replaced in the churn event (1% of pods).
    pub churned_pods: usize,
    /// Bytes pushed to the other proxies when those pods are replaced (the
    /// old workload removed, a new one with a new name and IP added; one
    /// push each, as Kubernetes reports them separately).
    pub churn_push_wildcard: u64,
    pub churn_push_scoped: u64,
    /// Proxies that received anything in scoped mode (all others, in
    /// wildcard mode).
    pub churn_receivers_scoped: usize,
}

/// Totals for every pod talking to `k` services; 1% of pods (at least one),
/// spread evenly over the pod list, churn.
pub fn cluster_totals(model: &CostModel<'_>, k: usize) -> ClusterTotals {
    let uids: Vec<&String> = model.workloads().collect();
    let full = model.full_bytes() as u64;
    let mut scoped_sync = 0u64;
    // Service → pods that talk to it.
    let mut subscribers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, uid) in uids.iter().enumerate() {
        let dests = model.destinations(i, uid, k);
        scoped_sync += model.scoped(uid, &dests).total_bytes() as u64;
        for d in dests {
            subscribers.entry(d).or_default().push(i);
        }
    }
    let churned = (uids.len() / 100).max(1);
    let step = uids.len() / churned;
    let addr_env = model.envelope(TypeUrl::Address) as u64;
    let mut push_wildcard = 0u64;
    let mut push_scoped = 0u64;
    let mut receivers = BTreeSet::new();
    for c in 0..churned {
        let idx = c * step;
        let uid = uids[idx];
        // The replacement has the same shape and size: same deployment,
        // same name length, another IP of the same node range.
        let one = addr_env * 2
            + model.removal_size(uid) as u64
            + model.size(TypeUrl::Address, uid) as u64;
        let others = uids.len() as u64 - 1;
        push_wildcard += one * others;
        let mut rx = BTreeSet::new();
        for svc in model.services_of(uid) {
            rx.extend(subscribers.get(svc).into_iter().flatten().copied());
        }
        rx.remove(&idx);
        push_scoped += one * rx.len() as u64;
        receivers.extend(rx);
    }
    ClusterTotals {
        pods: uids.len(),
        k,
        full_sync_wildcard: full * uids.len() as u64,
        full_sync_scoped: scoped_sync,
        churned_pods: churned,
        churn_push_wildcard: push_wildcard,
        churn_push_scoped: push_scoped,
        churn_receivers_scoped: receivers.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_ranks_pods_and_breaks_ties_by_index() {
        let s = Spread::of(10, &[50, 10, 30, 30, 20]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.pods), (10, 30, 50, 5));
        assert_eq!(s.median_pod, 2);
        assert!((s.mean - 28.0).abs() < 1e-9);
        assert_eq!((s.p10, s.p90), (10, 30));
        assert!(Spread::of(1, &[]).is_none());
    }

    #[test]
    fn median_pod_of_scenario_a_is_typical() {
        let snap = snapshot(&SCENARIOS[0].inventory().unwrap()).unwrap();
        let m = CostModel::new(&snap, Mode::Extended);
        let per_pod = scoped_per_pod(&m, 10);
        assert_eq!(per_pod.len(), 1000);
        let s = Spread::of(10, &per_pod).unwrap();
        assert_eq!(per_pod[s.median_pod], s.median);
        let below = per_pod.iter().filter(|&&b| b < s.median).count();
        let above = per_pod.iter().filter(|&&b| b > s.median).count();
        assert!(below <= 500 && above <= 500, "{below} below, {above} above");
        assert!(s.min < s.median && s.median < s.max, "{s:?}");
        // Every pod's cost is the model's scoped set for its destinations.
        let uid = m.workloads().nth(s.median_pod).unwrap();
        let dests = m.destinations(s.median_pod, uid, 10);
        assert_eq!(m.scoped(uid, &dests).total_bytes(), s.median);
    }
}
