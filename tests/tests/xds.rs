//! The netproxy xDS client and store against a real `sidetunnel-meshd`
//! process over TLS on loopback: wildcard sync, on-demand lookups, inventory
//! edits pushed as deltas, NACK of a malformed resource, meshd restart with
//! `initial_resource_versions`, refusal of a bad token, and the size of a
//! full wildcard sync of a 1000-pod mesh. No root needed.

mod meshd_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use netproxy::state::{Address, Store};
use netproxy::xds::{Backoff, NodeInfo, Subscription, XdsClient, XdsConfig, XdsHandle};
use prost::Message;
use sidetunnel_proto::istio::workload as xwl;

use sidetunnel_meshd::mode::Mode;

use meshd_support::{Mesh, Meshd, WAIT, ip, run_ok};

/// The client pod in every scenario.
const CLIENT_UID: &str = "Kubernetes//Pod/default/client-1";

const INVENTORY: &str = r#"
workloads:
  - name: client-1
    namespace: default
    serviceAccount: client
    addresses: [10.0.0.10]
    node: node-1
  - name: web-1
    namespace: default
    serviceAccount: web
    addresses: [10.0.1.1]
    labels: {app: web}
  - name: web-2
    namespace: default
    serviceAccount: web
    addresses: [10.0.1.2]
    labels: {app: web}
  - name: db-1
    namespace: data
    serviceAccount: db
    addresses: [10.0.2.1]
    labels: {app: db}
services:
  - name: web
    namespace: default
    vips: [10.96.0.1]
    ports: {80: 8080}
    selector: {app: web}
  - name: db
    namespace: data
    vips: [10.96.0.2]
    ports: {5432: 5432}
    selector: {app: db}
policies:
  - name: allow-client
    namespace: default
    selector: {matchLabels: {app: web}}
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/default/sa/client"]
                destinationPorts: [8080]
  - name: deny-all
    namespace: data
    scope: Namespace
    action: Deny
    rules:
      - clauses:
          - matches:
              - notNamespaces: [data]
"#;

fn client_config(mesh: &Mesh, url: &str, token: Option<PathBuf>) -> XdsConfig {
    let node = NodeInfo {
        pod_name: "client-1".into(),
        namespace: "default".into(),
        service_account: "client".into(),
        node_name: "node-1".into(),
        cluster_id: "Kubernetes".into(),
        ips: vec![ip("10.0.0.10")],
        ..Default::default()
    };
    let mut cfg = XdsConfig::new(url, mesh.path("root-cert.pem"), node);
    cfg.token_file = token;
    cfg.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    cfg
}

fn start_client(cfg: XdsConfig) -> (Arc<Store>, XdsHandle, tokio::task::JoinHandle<()>) {
    let store = Arc::new(Store::with_demand_timeout(Duration::from_secs(10)));
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

async fn wildcard_sync_fills_the_store(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let token = mesh.token("default", "client");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(token)));
    synced(&handle).await;

    let stats = store.stats();
    assert_eq!((stats.workloads, stats.services, stats.policies), (4, 2, 2));
    let client = store.workload_by_uid(CLIENT_UID).expect("own workload");
    assert_eq!(
        client.identity(),
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(client.addresses, vec![ip("10.0.0.10")]);
    let web = store.service_by_vip("", ip("10.96.0.1")).expect("web VIP");
    assert_eq!(web.ports.get(&80), Some(&8080));
    let eps: Vec<String> = store
        .service_endpoints(&web)
        .iter()
        .map(|w| w.name.clone())
        .collect();
    assert_eq!(eps, ["web-1", "web-2"]);
    let web1 = store
        .workload_by_ip("", ip("10.0.1.1"))
        .expect("web-1 by IP");
    let pol: Vec<String> = store.policies_for(&web1).iter().map(|p| p.key()).collect();
    assert_eq!(pol, ["default/allow-client"]);
    let db1 = store
        .workload_by_ip("", ip("10.0.2.1"))
        .expect("db-1 by IP");
    let pol: Vec<String> = store.policies_for(&db1).iter().map(|p| p.key()).collect();
    assert_eq!(pol, ["data/deny-all"]);

    let c = handle.stats().snapshot();
    assert_eq!(c.nacks, 0, "{:?}", handle.status());
    assert!(
        c.acks >= 2 && c.address_bytes > 0 && c.authorization_bytes > 0,
        "{c:?}"
    );
    let dump = serde_json::to_value(store.dump()).unwrap();
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 4);
    assert!(dump["workloads"][0]["workloadIps"].is_array());
    task.abort();
}

async fn on_demand_fetches_workload_ip_vip_and_hostname(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let token = mesh.token("default", "client");
    let mut cfg = client_config(&mesh, &meshd.url(), Some(token));
    cfg.addresses = Subscription::OnDemand {
        initial: vec![CLIENT_UID.to_string()],
    };
    let (store, handle, task) = start_client(cfg);
    synced(&handle).await;
    // Only its own workload so far.
    assert_eq!(store.stats().workloads, 1);
    assert!(store.workload_by_uid(CLIENT_UID).is_some());
    assert!(store.workload_by_ip("", ip("10.0.2.1")).is_none());

    // A workload IP.
    match store.fetch_on_demand("", ip("10.0.2.1")).await {
        Ok(Some(Address::Workload(w))) => assert_eq!(w.name, "db-1"),
        other => panic!("db-1 by IP: {other:?}"),
    }
    // A service VIP.
    match store.fetch_on_demand("", ip("10.96.0.2")).await {
        Ok(Some(Address::Service(s))) => assert_eq!(s.name, "db"),
        other => panic!("db by VIP: {other:?}"),
    }
    // A hostname: the service and all its endpoints arrive.
    match store
        .fetch_name("default/web.default.svc.cluster.local")
        .await
    {
        Ok(Some(Address::Service(s))) => {
            let ok = store
                .wait_until(WAIT, |st| st.service_endpoints(&s).len() == 2)
                .await;
            assert!(ok, "web endpoints: {:?}", store.service_endpoints(&s));
        }
        other => panic!("web by hostname: {other:?}"),
    }
    // An unknown address: a negative answer, not a timeout.
    assert_eq!(store.fetch_on_demand("", ip("10.9.9.9")).await, Ok(None));
    // Scoped: nothing else was sent (own + db-1 + db + web + web-1/2).
    let s = store.stats();
    assert_eq!((s.workloads, s.services), (4, 2));
    assert_eq!(handle.stats().snapshot().nacks, 0);
    task.abort();
}

async fn inventory_edits_arrive_as_deltas(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let token = mesh.token("default", "client");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(token)));
    synced(&handle).await;
    let before = handle.stats().snapshot();

    // Add web-3, move db-1 to a new IP, remove web-2.
    let edited = INVENTORY
        .replace(
            "  - name: web-2\n    namespace: default\n    serviceAccount: web\n    addresses: [10.0.1.2]\n",
            "  - name: web-3\n    namespace: default\n    serviceAccount: web\n    addresses: [10.0.1.3]\n",
        )
        .replace("addresses: [10.0.2.1]", "addresses: [10.0.2.9]");
    assert_ne!(edited, INVENTORY);
    mesh.write_inventory(&edited);

    let applied = store
        .wait_until(WAIT, |s| {
            s.workload_by_ip("", ip("10.0.1.3")).is_some()
                && s.workload_by_ip("", ip("10.0.1.2")).is_none()
                && s.workload_by_ip("", ip("10.0.2.9")).is_some()
        })
        .await;
    assert!(applied, "edit not seen: {:#?}", store.dump());
    assert!(store.workload_by_ip("", ip("10.0.2.1")).is_none());
    assert!(
        store
            .workload_by_uid("Kubernetes//Pod/default/web-2")
            .is_none()
    );
    let web = store
        .service_by_hostname("default", "web.default.svc.cluster.local")
        .unwrap();
    let eps: Vec<String> = store
        .service_endpoints(&web)
        .iter()
        .map(|w| w.name.clone())
        .collect();
    assert_eq!(eps, ["web-1", "web-3"]);

    // A delta, not a resync: only the changed resources travelled.
    let after = handle.stats().snapshot();
    let resent = after.resources - before.resources;
    assert!(
        (2..=3).contains(&resent),
        "expected web-3 and db-1 (maybe in separate pushes), got {resent} resources"
    );
    assert!(after.removals > before.removals);
    task.abort();
}

/// A Workload resource whose only address is 5 bytes long: valid protobuf,
/// invalid Istio. Served through meshd's `raw` test hook.
fn broken_workload_yaml(uid: &str) -> String {
    let w = xwl::Workload {
        uid: uid.to_string(),
        name: "broken".into(),
        namespace: "default".into(),
        addresses: vec![bytes::Bytes::from_static(&[10, 0, 0, 0, 99])],
        ..Default::default()
    };
    let addr = xwl::Address {
        r#type: Some(xwl::address::Type::Workload(w)),
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(addr.encode_to_vec());
    format!("raw:\n  - name: {uid}\n    type: Address\n    base64: \"{b64}\"\n")
}

async fn malformed_resource_is_nacked_while_the_rest_applies(mode: Mode) {
    let broken = "Kubernetes//Pod/default/broken";
    let mesh = Mesh::new(&format!("{INVENTORY}{}", broken_workload_yaml(broken)));
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let token = mesh.token("default", "client");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(token)));
    synced(&handle).await;

    assert!(
        handle.wait_status(WAIT, |s| s.last_nack.is_some()).await,
        "no NACK: {:?}",
        handle.status()
    );
    let nack = handle.status().last_nack.unwrap();
    assert!(nack.contains(broken), "{nack}");
    assert!(nack.contains("workload.addresses[0]"), "{nack}");
    assert!(nack.contains("got 5"), "{nack}");
    // Everything else applied.
    assert_eq!(store.stats().workloads, 4);
    assert!(store.workload_by_uid(broken).is_none());
    assert!(store.workload_by_ip("", ip("10.0.1.2")).is_some());
    let c = handle.stats().snapshot();
    assert!(c.nacks >= 1 && c.rejected_resources >= 1, "{c:?}");
    task.abort();
}

async fn meshd_restart_keeps_config_and_resyncs_with_versions(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let token = mesh.token("default", "client");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(token)));
    synced(&handle).await;
    let first_dump = serde_json::to_value(store.dump()).unwrap();

    let addr = meshd.stop();
    assert!(
        handle.wait_status(WAIT, |s| !s.connected).await,
        "client did not notice meshd going away"
    );
    // Last-known config is kept while the control plane is away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(serde_json::to_value(store.dump()).unwrap(), first_dump);
    assert!(handle.status().last_error.is_some());

    // While down, db-1 changes; after the restart only it must be resent.
    mesh.write_inventory(&INVENTORY.replace("addresses: [10.0.2.1]", "addresses: [10.0.2.7]"));
    let before = handle.stats().snapshot();
    let _meshd = restart(&mesh, addr, mode);
    assert!(
        handle
            .wait_status(WAIT, |s| s.connected && s.attempt > 1)
            .await,
        "no reconnect: {:?}",
        handle.status()
    );
    assert!(
        store
            .wait_until(WAIT, |s| s.workload_by_ip("", ip("10.0.2.7")).is_some())
            .await,
        "change made while down not received"
    );
    // Give any (unexpected) full resend time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = handle.stats().snapshot();
    // Addresses: only the changed workload. Policies: istiod sets no
    // versions on them and resends all (2) on every subscription request.
    let policies = match mode {
        Mode::Istiod => 2,
        Mode::Extended => 0,
    };
    assert_eq!(
        after.resources - before.resources,
        1 + policies,
        "initial_resource_versions should limit the resync to the changed workload"
    );
    assert_eq!(store.stats().workloads, 4);
    assert!(store.workload_by_ip("", ip("10.0.2.1")).is_none());
    task.abort();
}

/// Restarts meshd on the same port (the client's configured address). The
/// port was just freed; retry briefly in case it lingers.
fn restart(mesh: &Mesh, addr: SocketAddr, mode: Mode) -> Meshd {
    for _ in 0..50 {
        if std::net::TcpListener::bind(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    mesh.serve_mode(&addr.to_string(), mode)
}

async fn wrong_token_is_refused_with_a_clear_error(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    // Signed by another control plane's key.
    let other = Mesh::new("{}\n");
    let forged = other.token("default", "client");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(forged)));
    assert!(
        handle
            .wait_status(WAIT, |s| s
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("Unauthenticated")))
            .await,
        "{:?}",
        handle.status()
    );
    let status = handle.status();
    eprintln!(
        "forged token: {}",
        status.last_error.as_deref().unwrap_or_default()
    );
    assert!(!status.connected && !status.synced, "{status:?}");
    assert_eq!(store.stats().workloads, 0);
    task.abort();

    // A valid token for another identity than the node claims.
    let other_sa = mesh.token("default", "web");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(other_sa)));
    assert!(
        handle
            .wait_status(WAIT, |s| s
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("PermissionDenied")))
            .await,
        "{:?}",
        handle.status()
    );
    assert!(!handle.status().synced);
    assert_eq!(store.stats().workloads, 0);
    task.abort();

    // No token at all.
    let (_store, handle, task) = start_client(client_config(&mesh, &meshd.url(), None));
    assert!(
        handle
            .wait_status(WAIT, |s| s
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("Unauthenticated")))
            .await,
        "{:?}",
        handle.status()
    );
    task.abort();
}

/// Issue 2's measurement: bytes of a full wildcard sync (Address +
/// Authorization, protobuf-encoded responses) for `generate --services 100
/// --pods 1000`. Printed; asserts only that everything arrived.
async fn full_sync_size_for_1000_pods(mode: Mode) {
    let inventory = run_ok(&["generate", "--services", "100", "--pods", "1000"]);
    let mesh = Mesh::new(&inventory);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let token = mesh.token("default", "client");
    let (store, handle, task) = start_client(client_config(&mesh, &meshd.url(), Some(token)));
    synced(&handle).await;
    let s = store.stats();
    assert_eq!((s.workloads, s.services), (1000, 100));
    let c = handle.stats().snapshot();
    assert_eq!(c.nacks, 0);
    println!(
        "full wildcard sync, 100 services / 1000 pods: {} bytes total ({} Address, {} Authorization), {} resources, {} policies",
        c.bytes_received, c.address_bytes, c.authorization_bytes, c.resources, s.policies
    );
    task.abort();
}

/// On demand, like the proxy: only its own IP pinned.
fn on_demand_client(
    mesh: &Mesh,
    meshd: &Meshd,
) -> (Arc<Store>, XdsHandle, tokio::task::JoinHandle<()>) {
    let token = mesh.token("default", "client");
    let mut cfg = client_config(mesh, &meshd.url(), Some(token));
    cfg.addresses = Subscription::OnDemand {
        initial: vec!["/10.0.0.10".to_string()],
    };
    start_client(cfg)
}

/// The shim_mesh bug: an on-demand lookup of an IP nobody holds must get
/// meshd's negative answer, also right after (and while) an inventory
/// change is pushed on the stream, and again when asked a second time.
async fn unknown_ip_is_answered_around_inventory_pushes(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let (store, handle, task) = on_demand_client(&mesh, &meshd);
    synced(&handle).await;
    // Something on demand that the edits below change, so pushes happen.
    assert!(matches!(
        store.fetch_on_demand("", ip("10.0.2.1")).await,
        Ok(Some(Address::Workload(_)))
    ));

    for round in 1..=4u8 {
        let before = handle.stats().snapshot().responses;
        mesh.write_inventory(&INVENTORY.replace(
            "addresses: [10.0.2.1]",
            &format!("addresses: [10.0.2.1, 10.0.3.{round}]"),
        ));
        // Ask for fresh unknown IPs until the push has arrived and a bit
        // after: each must be answered negatively, never time out.
        let mut asked = 0u32;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let pushed = store
                .workload_by_ip("", ip(&format!("10.0.3.{round}")))
                .is_some();
            // 10.<round>.0.0/16 holds nothing, and fresh names never repeat.
            let unknown =
                std::net::IpAddr::V4((u32::from_be_bytes([10, round, 0, 0]) + asked + 1).into());
            let got = store.fetch_on_demand("", unknown).await;
            assert_eq!(
                got,
                Ok(None),
                "round {round}: {unknown} after {asked} lookups"
            );
            // The same name again: answered from the negative cache.
            assert_eq!(store.fetch_on_demand("", unknown).await, Ok(None));
            asked += 1;
            if pushed && asked > 3 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "push not applied");
        }
        assert!(handle.stats().snapshot().responses > before);
    }
    assert_eq!(handle.stats().snapshot().nacks, 0);
    task.abort();
}

/// A destination that was answered once and then removed from the mesh
/// (its pod deleted; a non-mesh pod may reuse the IP): asking for it again
/// must reach the control plane and get a negative answer, not wait for
/// an answer to a subscription the server already considers answered.
async fn removed_destination_is_answered_when_asked_again(mode: Mode) {
    let mesh = Mesh::new(INVENTORY);
    let meshd = mesh.serve_mode("127.0.0.1:0", mode);
    let (store, handle, task) = on_demand_client(&mesh, &meshd);
    synced(&handle).await;
    match store.fetch_on_demand("", ip("10.0.2.1")).await {
        Ok(Some(Address::Workload(w))) => assert_eq!(w.name, "db-1"),
        other => panic!("db-1 by IP: {other:?}"),
    }
    // db-1 goes away.
    mesh.write_inventory(&INVENTORY.replace(
        "  - name: db-1\n    namespace: data\n    serviceAccount: db\n    addresses: [10.0.2.1]\n    labels: {app: db}\n",
        "",
    ));
    assert!(
        store
            .wait_until(WAIT, |s| s.workload_by_ip("", ip("10.0.2.1")).is_none())
            .await,
        "removal not pushed"
    );
    for attempt in 1..=2 {
        assert_eq!(
            store.fetch_on_demand("", ip("10.0.2.1")).await,
            Ok(None),
            "attempt {attempt}"
        );
    }
    // When it comes back, the server pushes it (the subscription stays).
    mesh.write_inventory(INVENTORY);
    assert!(
        store
            .wait_until(WAIT, |s| s.workload_by_ip("", ip("10.0.2.1")).is_some())
            .await,
        "db-1 not pushed after it came back"
    );
    assert_eq!(handle.stats().snapshot().nacks, 0);
    task.abort();
}

sidetunnel_tests::in_both_meshd_modes!(
    wildcard_sync_fills_the_store,
    on_demand_fetches_workload_ip_vip_and_hostname,
    inventory_edits_arrive_as_deltas,
    malformed_resource_is_nacked_while_the_rest_applies,
    meshd_restart_keeps_config_and_resyncs_with_versions,
    wrong_token_is_refused_with_a_clear_error,
    full_sync_size_for_1000_pods,
    unknown_ip_is_answered_around_inventory_pushes,
    removed_destination_is_answered_when_asked_again,
);
