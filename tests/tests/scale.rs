//! Scoped on-demand discovery (issue 6) with the real netproxy xDS client
//! against a real `sidetunnel-meshd` process on loopback:
//! * a scoped proxy in scenario A holds exactly what its pod needs (its own
//!   workload, its destinations' services and endpoints, the policies that
//!   apply to it), computed here independently from the inventory;
//! * a destination's change reaches the proxies subscribed to it, and only
//!   them;
//! * idle destinations are dropped (store and server subscription) while
//!   the own workload and the prefetch list stay;
//! * the per-object cost model behind the bench's cluster totals
//!   (`meshd::scale`) predicts what a real scoped client receives, for the
//!   scenario's median pod (the bench's pod).
//!
//! No root needed.

mod meshd_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use netproxy::state::Store;
use netproxy::xds::{Backoff, NodeInfo, Subscription, XdsClient, XdsConfig, XdsHandle};
use sidetunnel_meshd::inventory::model::{Policy, Workload};
use sidetunnel_meshd::inventory::{self, parse_model};
use sidetunnel_meshd::scale::{self, CostModel, Spread};

use sidetunnel_meshd::mode::Mode;

use meshd_support::{Mesh, WAIT, ip, run_ok};

/// After the subscribed client got a push, how long the other one must stay
/// silent: meshd pushes one publication to every stream at once.
const QUIET: Duration = Duration::from_secs(1);

fn uid(w: &Workload) -> String {
    format!("Kubernetes//Pod/{}/{}", w.namespace, w.name)
}

/// A client for pod `w` in scoped mode: own workload (and, for
/// Authorization, the policies that apply to it) at start.
fn scoped_client(
    mesh: &Mesh,
    url: &str,
    w: &Workload,
    configure: impl FnOnce(&mut XdsConfig),
) -> (Arc<Store>, XdsHandle, tokio::task::JoinHandle<()>) {
    let sa = w
        .service_account
        .clone()
        .unwrap_or_else(|| "default".into());
    let node = NodeInfo {
        pod_name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: sa.clone(),
        // As the proxy on demand: no NODE_NAME (istiod would push every
        // workload of the node).
        node_name: String::new(),
        cluster_id: "Kubernetes".into(),
        ips: w.addresses.iter().map(|a| ip(a)).collect(),
        ..Default::default()
    };
    let mut cfg = XdsConfig::new(url, mesh.path("root-cert.pem"), node);
    cfg.token_file = Some(mesh.token(&w.namespace, &sa));
    cfg.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    cfg.addresses = Subscription::OnDemand {
        initial: vec![uid(w)],
    };
    cfg.authorizations = Subscription::OnDemand {
        initial: vec![uid(w)],
    };
    configure(&mut cfg);
    let store = Arc::new(Store::with_demand_timeout(WAIT));
    let (handle, task) = XdsClient::new(cfg, store.clone()).spawn();
    (store, handle, task)
}

async fn synced(handle: &XdsHandle) {
    assert!(
        handle.wait_synced(WAIT).await,
        "xDS client did not sync: {:?}",
        handle.status()
    );
}

/// What the store holds: workload uids, service keys, policy keys.
fn held(store: &Store) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let d = store.dump();
    (
        d.workloads.iter().map(|w| w.uid.clone()).collect(),
        d.services.iter().map(|s| s.key()).collect(),
        d.policies.iter().map(|p| p.key()).collect(),
    )
}

/// Whether policy `p` applies to workload `w`, by AuthorizationPolicy's
/// rules: root-namespace policies without selector are mesh-wide, others
/// without selector cover their namespace, selector policies select by
/// labels in their namespace (every namespace from the root one).
fn applies(p: &Policy, w: &Workload) -> bool {
    let root = p.namespace == "istio-system";
    match &p.selector {
        None => root || p.namespace == w.namespace,
        Some(sel) => {
            assert!(sel.workloads.is_empty(), "generator uses labels only");
            (root || p.namespace == w.namespace)
                && sel
                    .match_labels
                    .iter()
                    .all(|(k, v)| w.labels.get(k) == Some(v))
        }
    }
}

fn service_key(s: &sidetunnel_meshd::inventory::model::Service) -> String {
    let host = s
        .hostname
        .clone()
        .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", s.name, s.namespace));
    format!("{}/{host}", s.namespace)
}

async fn scoped_proxy_holds_exactly_what_its_pod_needs(mode: Mode) {
    let text = run_ok(&["generate", "--services", "100", "--pods", "1000"]);
    let inv = parse_model(&text).expect("generated inventory parses");
    let mesh = Mesh::new(&text);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);

    // A pod with a mesh-wide, a namespace and a selector policy, if any.
    let policies_of = |w: &Workload| -> BTreeSet<String> {
        inv.policies
            .iter()
            .filter(|p| applies(p, w))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    };
    let me = inv
        .workloads
        .iter()
        .max_by_key(|w| policies_of(w).len())
        .unwrap();
    let want_policies = policies_of(me);
    assert!(want_policies.len() >= 2, "{want_policies:?}");
    // istiod sends every policy to every proxy.
    let want_policies = match mode {
        Mode::Istiod => inv
            .policies
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
        Mode::Extended => want_policies,
    };
    let own_services: Vec<&String> = me.services.keys().collect();

    // Destinations: three services by hostname, one by VIP, and one pod
    // of yet another service by its IP (just that pod then).
    let others: Vec<_> = inv
        .services
        .iter()
        .filter(|s| s.name != "waypoint" && !own_services.contains(&&service_key(s)))
        .collect();
    let step = others.len() / 5;
    let by_host: Vec<String> = (0..3).map(|i| service_key(others[i * step])).collect();
    let by_vip = others[3 * step];
    let pod_service = service_key(others[4 * step]);
    let lone_pod = inv
        .workloads
        .iter()
        .find(|w| w.services.contains_key(&pod_service))
        .unwrap();

    let mut want_services: BTreeSet<String> = by_host.iter().cloned().collect();
    want_services.insert(service_key(by_vip));
    let mut want_workloads: BTreeSet<String> = inv
        .workloads
        .iter()
        .filter(|w| w.services.keys().any(|k| want_services.contains(k)))
        .map(uid)
        .collect();
    want_workloads.insert(uid(me));
    want_workloads.insert(uid(lone_pod));

    let (store, handle, task) = scoped_client(&mesh, &meshd.url(), me, |_| {});
    synced(&handle).await;
    // At start: its own workload and its policies, nothing else.
    let (w, s, p) = held(&store);
    assert_eq!(w, BTreeSet::from([uid(me)]));
    assert!(s.is_empty(), "{s:?}");
    assert_eq!(p, want_policies);

    // First use of each destination, as the data path does it.
    for name in &by_host {
        assert!(store.fetch_name(name).await.unwrap().is_some(), "{name}");
    }
    assert!(
        store
            .fetch_on_demand("", ip(&by_vip.vips[0]))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .fetch_on_demand("", ip(&lone_pod.addresses[0]))
            .await
            .unwrap()
            .is_some()
    );
    let (w, s, p) = held(&store);
    assert_eq!(s, want_services);
    assert_eq!(w, want_workloads);
    assert_eq!(p, want_policies);

    let c = handle.stats().snapshot();
    assert_eq!(c.nacks, 0);
    println!(
        "scoped proxy, scenario A, {} destinations: {} bytes ({} Address, {} Authorization), {} workloads, {} services, {} policies",
        want_services.len() + 1,
        c.bytes_received,
        c.address_bytes,
        c.authorization_bytes,
        w.len(),
        s.len(),
        p.len()
    );
    task.abort();
}

const TWO_TEAMS: &str = r#"
workloads:
  - {name: c1, namespace: a, serviceAccount: c1, addresses: [10.0.0.1], labels: {app: c1}}
  - {name: c2, namespace: b, serviceAccount: c2, addresses: [10.0.0.2], labels: {app: c2}}
  - {name: x1, namespace: s, addresses: [10.0.1.1], labels: {app: x}, services: {s/x.s.svc.cluster.local: {80: 8080}}}
  - {name: y1, namespace: s, addresses: [10.0.2.1], labels: {app: y}, services: {s/y.s.svc.cluster.local: {80: 8080}}}
services:
  - {name: x, namespace: s, vips: [172.16.0.1], ports: {80: 8080}}
  - {name: y, namespace: s, vips: [172.16.0.2], ports: {80: 8080}}
policies:
  - {name: mesh-deny, namespace: istio-system, action: Deny}
  - {name: team-a, namespace: a}
  - {name: only-c2, namespace: b, selector: {matchLabels: {app: c2}}}
  - {name: for-x, namespace: s, selector: {matchLabels: {app: x}}}
"#;

/// The pods of [`TWO_TEAMS`] by name.
fn two_teams() -> BTreeMap<String, Workload> {
    let inv = parse_model(TWO_TEAMS).expect("test inventory");
    inv.workloads
        .into_iter()
        .map(|w| (w.name.clone(), w))
        .collect()
}

async fn destination_change_reaches_only_its_subscribers(mode: Mode) {
    let pods = two_teams();
    let mesh = Mesh::new(TWO_TEAMS);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let (s1, h1, t1) = scoped_client(&mesh, &meshd.url(), &pods["c1"], |_| {});
    let (s2, h2, t2) = scoped_client(&mesh, &meshd.url(), &pods["c2"], |_| {});
    synced(&h1).await;
    synced(&h2).await;
    // Extended mode scopes policies too: mesh-wide + own namespace, or own
    // selector. istiod sends every policy to both.
    let all: BTreeSet<String> = ["a/team-a", "b/only-c2", "istio-system/mesh-deny", "s/for-x"]
        .map(String::from)
        .into();
    let scoped = |a: &str| BTreeSet::from([a.to_string(), "istio-system/mesh-deny".into()]);
    let (want1, want2) = match mode {
        Mode::Istiod => (all.clone(), all),
        Mode::Extended => (scoped("a/team-a"), scoped("b/only-c2")),
    };
    assert_eq!(held(&s1).2, want1);
    assert_eq!(held(&s2).2, want2);
    assert!(
        s1.fetch_name("s/x.s.svc.cluster.local")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s2.fetch_on_demand("", ip("172.16.0.2"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(s1.workload_by_uid("Kubernetes//Pod/s/x1").is_some());
    assert!(s2.workload_by_uid("Kubernetes//Pod/s/y1").is_some());

    // x gains an endpoint: c1 (subscribed to x) gets it, c2 does not.
    let before2 = h2.stats().snapshot();
    let with_x2 = TWO_TEAMS.replace(
        "services:\n",
        "  - {name: x2, namespace: s, addresses: [10.0.1.2], labels: {app: x}, services: {s/x.s.svc.cluster.local: {80: 8080}}}\nservices:\n",
    );
    mesh.write_inventory(&with_x2);
    assert!(
        s1.wait_until(WAIT, |s| s
            .workload_by_uid("Kubernetes//Pod/s/x2")
            .is_some())
            .await,
        "c1 did not receive x's new endpoint"
    );
    tokio::time::sleep(QUIET).await;
    let after2 = h2.stats().snapshot();
    assert_eq!(
        (after2.responses, after2.resources, after2.removals),
        (before2.responses, before2.resources, before2.removals),
        "c2 is not subscribed to x but received a push"
    );
    assert!(s2.workload_by_uid("Kubernetes//Pod/s/x2").is_none());

    // y1 moves: only c2 hears of it.
    let before1 = h1.stats().snapshot();
    mesh.write_inventory(&with_x2.replace("addresses: [10.0.2.1]", "addresses: [10.0.2.9]"));
    assert!(
        s2.wait_until(WAIT, |s| s.workload_by_ip("", ip("10.0.2.9")).is_some())
            .await,
        "c2 did not receive y1's move"
    );
    tokio::time::sleep(QUIET).await;
    let after1 = h1.stats().snapshot();
    assert_eq!(
        (after1.responses, after1.resources),
        (before1.responses, before1.resources),
        "c1 is not subscribed to y but received a push"
    );
    t1.abort();
    t2.abort();
}

async fn idle_destinations_are_dropped_but_pinned_names_stay(mode: Mode) {
    let pods = two_teams();
    let mesh = Mesh::new(TWO_TEAMS);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let (store, handle, task) = scoped_client(&mesh, &meshd.url(), &pods["c1"], |cfg| {
        cfg.add_prefetch(&["y.s.svc".to_string()], "").unwrap();
        cfg.idle_timeout = Some(Duration::from_millis(600));
    });
    synced(&handle).await;
    // The prefetched service and its endpoint are there from the start.
    let (w, s, _) = held(&store);
    assert_eq!(
        w,
        BTreeSet::from(["Kubernetes//Pod/a/c1".into(), "Kubernetes//Pod/s/y1".into()])
    );
    assert_eq!(s, BTreeSet::from(["s/y.s.svc.cluster.local".into()]));

    assert!(
        store
            .fetch_on_demand("", ip("172.16.0.1"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.workload_by_uid("Kubernetes//Pod/s/x1").is_some());
    // Unused, x goes (service and endpoint); own workload and y stay.
    assert!(
        store
            .wait_until(WAIT, |s| s.service_by_vip("", ip("172.16.0.1")).is_none()
                && s.workload_by_uid("Kubernetes//Pod/s/x1").is_none())
            .await,
        "idle destination not dropped: {:?}",
        held(&store)
    );
    assert!(store.demanded_names().is_empty());
    let (w, s, p) = held(&store);
    assert_eq!(
        w,
        BTreeSet::from(["Kubernetes//Pod/a/c1".into(), "Kubernetes//Pod/s/y1".into()])
    );
    assert_eq!(s, BTreeSet::from(["s/y.s.svc.cluster.local".into()]));
    // Scoped (extended) or every policy (istiod).
    let policies = match mode {
        Mode::Istiod => 4,
        Mode::Extended => 2,
    };
    assert_eq!(p.len(), policies);

    // The server stopped pushing x; the pinned y still arrives.
    mesh.write_inventory(
        &TWO_TEAMS
            .replace("addresses: [10.0.1.1]", "addresses: [10.0.1.7]")
            .replace("addresses: [10.0.2.1]", "addresses: [10.0.2.7]"),
    );
    assert!(
        store
            .wait_until(WAIT, |s| s.workload_by_ip("", ip("10.0.2.7")).is_some())
            .await,
        "pinned prefetch no longer followed"
    );
    tokio::time::sleep(QUIET).await;
    assert!(store.workload_by_uid("Kubernetes//Pod/s/x1").is_none());
    assert_eq!(handle.stats().snapshot().nacks, 0);

    // Used again, x is fetched again.
    assert!(
        store
            .fetch_on_demand("", ip("172.16.0.1"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.workload_by_ip("", ip("10.0.1.7")).is_some());
    task.abort();
}

async fn cost_model_predicts_what_the_median_pod_receives(mode: Mode) {
    let text = run_ok(&["generate", "--services", "100", "--pods", "1000"]);
    let inv = parse_model(&text).expect("generated inventory parses");
    let snap = inventory::parse(&scale::context(), &text).expect("inventory converts");
    let model = CostModel::new(&snap, mode);
    let spread = Spread::of(10, &scale::scoped_per_pod(&model, 10)).expect("pods");
    let pod = spread.median_pod;
    let want_uid = model.workloads().nth(pod).expect("median pod").clone();
    let dests = model.destinations(pod, &want_uid, 10);
    let want = model.scoped(&want_uid, &dests);
    assert_eq!(want.total_bytes(), spread.median);
    let me = inv
        .workloads
        .iter()
        .find(|w| uid(w) == want_uid)
        .expect("the model's pod is in the inventory");

    let mesh = Mesh::new(&text);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let (store, handle, task) = scoped_client(&mesh, &meshd.url(), me, |_| {});
    synced(&handle).await;
    for d in &dests {
        assert!(store.fetch_name(d).await.unwrap().is_some(), "{d}");
    }
    let (w, s, p) = held(&store);
    let held: BTreeSet<String> = w.union(&s).cloned().collect();
    assert_eq!(held, want.addresses);
    assert_eq!(p, want.policies);

    let c = handle.stats().snapshot();
    assert_eq!(c.nacks, 0);
    assert_eq!(c.responses as usize, want.responses);
    // Only nonces differ in length (the model assumes "1-1-1", meshd
    // numbers streams and responses).
    let slack = 8 * want.responses as i64;
    let diff = c.bytes_received as i64 - want.total_bytes() as i64;
    assert!(
        diff.abs() <= slack,
        "received {} bytes, the model says {} (pod {pod})",
        c.bytes_received,
        want.total_bytes()
    );
    println!(
        "median pod {pod} of scenario A, 10 destinations: received {} B, model {} B; all pods: median {} B, mean {:.0} B",
        c.bytes_received,
        want.total_bytes(),
        spread.median,
        spread.mean
    );
    task.abort();
}

sidetunnel_tests::in_both_meshd_modes!(
    scoped_proxy_holds_exactly_what_its_pod_needs,
    destination_change_reaches_only_its_subscribers,
    idle_destinations_are_dropped_but_pinned_names_stay,
    cost_model_predicts_what_the_median_pod_receives,
);
