//! meshd's delta ADS over real TLS on loopback, in-process (library
//! `server::serve`): wildcard and on-demand subscriptions, pushes of
//! inventory edits as deltas, rejection of bad edits, reconnect with
//! `initial_resource_versions`, and stream authentication/authorization.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use prost::Message;
use sidetunnel_meshd::jwt::{AUDIENCE, JwtKey, TokenRequest};
use sidetunnel_meshd::mode::Mode;
use sidetunnel_meshd::pki;
use sidetunnel_meshd::server::{ServeConfig, serve};
use sidetunnel_proto::envoy::config::core::v3::Node;
use sidetunnel_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use sidetunnel_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use sidetunnel_proto::istio::workload::{Address, address};
use sidetunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(20);
/// Long enough for several polls: "nothing arrived" means nothing was pushed.
const QUIET: Duration = Duration::from_millis(800);

const INVENTORY: &str = r#"
workloads:
  - {name: a1, namespace: ns, serviceAccount: a, addresses: [10.0.0.1], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}
  - {name: a2, namespace: ns, serviceAccount: a, addresses: [10.0.0.2], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}
  - {name: b1, namespace: ns, serviceAccount: b, addresses: [10.0.0.3]}
services:
  - {name: a, namespace: ns, vips: [172.16.0.1], ports: {80: 8080}}
policies:
  - {name: allow-a, namespace: ns, selector: {matchLabels: {app: a}}}
"#;

struct Server {
    dir: tempfile::TempDir,
    inventory: PathBuf,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(dir: tempfile::TempDir, mode: Mode) -> Server {
        let state = dir.path().join("state");
        pki::init(&state, "cluster.local").unwrap();
        let inventory = dir.path().join("inventory.yaml");
        if !inventory.exists() {
            std::fs::write(&inventory, INVENTORY).unwrap();
        }
        let cfg = ServeConfig {
            dir: state,
            inventory: inventory.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            cluster_id: "Kubernetes".into(),
            max_cert_ttl: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
            mode,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            serve(
                cfg,
                |a| {
                    let _ = addr_tx.send(a);
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("serve");
        });
        let addr = tokio::time::timeout(WAIT, addr_rx).await.unwrap().unwrap();
        Server {
            dir,
            inventory,
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    async fn shutdown(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("serve returns promptly on shutdown, even with open streams")
            .unwrap();
        self.dir
    }

    fn token(&self, ns: &str, sa: &str) -> String {
        let key =
            JwtKey::from_pkcs8(&pki::load_pkcs8_der(&self.state().join(pki::JWT_KEY)).unwrap())
                .unwrap();
        key.issue(&TokenRequest {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: None,
            ttl: Duration::from_secs(600),
            audience: AUDIENCE.into(),
        })
        .unwrap()
    }

    /// Replaces the inventory (new size or mtime triggers the poller).
    fn write_inventory(&self, text: &str) {
        std::fs::write(&self.inventory, text).unwrap();
    }
}

struct Ads {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

fn node(ns: &str, sa: &str) -> Node {
    let s = |v: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(v.into())),
    };
    Node {
        id: format!("sidecar~10.0.0.1~a1.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(prost_types::Struct {
            fields: BTreeMap::from([
                ("NAMESPACE".to_string(), s(ns)),
                ("SERVICE_ACCOUNT".to_string(), s(sa)),
            ]),
        }),
        ..Default::default()
    }
}

async fn connect(
    srv: &Server,
    token: Option<&str>,
    first: DeltaDiscoveryRequest,
) -> Result<Ads, tonic::Status> {
    let root = std::fs::read_to_string(srv.state().join(pki::ROOT_CERT)).unwrap();
    let channel = Channel::from_shared(format!("https://{}", srv.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    let rx = tokio::time::timeout(
        WAIT,
        AggregatedDiscoveryServiceClient::new(channel).delta_aggregated_resources(req),
    )
    .await
    .expect("stream open timed out")?
    .into_inner();
    Ok(Ads { tx, rx })
}

fn request(type_url: &str, sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node("ns", "a")),
        type_url: type_url.into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

impl Ads {
    async fn next(&mut self) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    /// Receives a response and ACKs it.
    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        let r = self.next().await.expect("response");
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
        r
    }

    async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("unexpected push: {m:?}");
        }
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn workload_node(r: &DeltaDiscoveryResponse, name: &str) -> String {
    let res = r.resources.iter().find(|x| x.name == name).unwrap();
    match Address::decode(&res.resource.as_ref().unwrap().value[..])
        .unwrap()
        .r#type
    {
        Some(address::Type::Workload(w)) => w.node,
        other => panic!("not a workload: {other:?}"),
    }
}

async fn wildcard_sync_and_deltas(srv: &Server) {
    let tok = srv.token("ns", "a");
    let mut ads = connect(srv, Some(&tok), request(ADDRESS_TYPE_URL, &[], &[]))
        .await
        .unwrap();
    let full = ads.recv().await;
    assert_eq!(full.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        names(&full),
        [
            "Kubernetes//Pod/ns/a1",
            "Kubernetes//Pod/ns/a2",
            "Kubernetes//Pod/ns/b1",
            "ns/a.ns.svc.cluster.local"
        ]
    );
    assert_eq!(full.resources[0].aliases, ["/10.0.0.1"]);
    ads.send(request(AUTHORIZATION_TYPE_URL, &[], &[])).await;
    let pol = ads.recv().await;
    assert_eq!(names(&pol), ["ns/allow-a"]);
    ads.quiet().await;

    // Edit: a2 moves node, b1 goes, c1 arrives: exactly that is pushed.
    let edited = INVENTORY
        .replace(
            "{name: a2, namespace: ns,",
            "{name: a2, node: node-9, namespace: ns,",
        )
        .replace(
            "  - {name: b1, namespace: ns, serviceAccount: b, addresses: [10.0.0.3]}\n",
            "  - {name: c1, namespace: ns, addresses: [10.0.0.4]}\n",
        );
    srv.write_inventory(&edited);
    let d = ads.recv().await;
    assert_eq!(
        names(&d),
        ["Kubernetes//Pod/ns/a2", "Kubernetes//Pod/ns/c1"]
    );
    assert_eq!(workload_node(&d, "Kubernetes//Pod/ns/a2"), "node-9");
    assert_eq!(d.removed_resources, ["Kubernetes//Pod/ns/b1"]);
    ads.quiet().await;

    // A bad edit is rejected: nothing pushed, the stream stays up.
    srv.write_inventory(&edited.replace("10.0.0.4", "10.0.0.400"));
    ads.quiet().await;
    // Reverting to valid content with a real change pushes again.
    srv.write_inventory(&edited.replace("10.0.0.4]", "10.0.0.5]"));
    let d = ads.recv().await;
    assert_eq!(names(&d), ["Kubernetes//Pod/ns/c1"]);
    assert_eq!(d.resources[0].aliases, ["/10.0.0.5"]);
    srv.write_inventory(INVENTORY);
    let d = ads.recv().await;
    assert_eq!(
        names(&d),
        ["Kubernetes//Pod/ns/a2", "Kubernetes//Pod/ns/b1"]
    );
    assert_eq!(d.removed_resources, ["Kubernetes//Pod/ns/c1"]);

    // An empty file (a rewrite caught half-way) is not an empty mesh.
    srv.write_inventory("");
    ads.quiet().await;
    srv.write_inventory(INVENTORY);
    ads.quiet().await;
}

async fn on_demand(srv: &Server) {
    let tok = srv.token("ns", "a");
    let mut ads = connect(srv, Some(&tok), request(ADDRESS_TYPE_URL, &["*"], &["*"]))
        .await
        .unwrap();
    let first = ads.recv().await;
    assert!(first.resources.is_empty() && first.removed_resources.is_empty());
    ads.send(request(ADDRESS_TYPE_URL, &["/10.0.0.3"], &[]))
        .await;
    let r = ads.recv().await;
    assert_eq!(names(&r), ["Kubernetes//Pod/ns/b1"]);
    assert_eq!(r.resources[0].aliases, ["/10.0.0.3"]);
    ads.send(request(ADDRESS_TYPE_URL, &["/172.16.0.1"], &[]))
        .await;
    let r = ads.recv().await;
    assert_eq!(
        names(&r),
        [
            "Kubernetes//Pod/ns/a1",
            "Kubernetes//Pod/ns/a2",
            "ns/a.ns.svc.cluster.local"
        ]
    );
    ads.send(request(ADDRESS_TYPE_URL, &["/10.9.9.9"], &[]))
        .await;
    let r = ads.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["/10.9.9.9"]);
    ads.quiet().await;
}

/// A wildcard client's stream and the versions it holds.
async fn holding_client(srv: &Server) -> (Ads, BTreeMap<String, String>) {
    let tok = srv.token("ns", "a");
    let mut ads = connect(srv, Some(&tok), request(ADDRESS_TYPE_URL, &[], &[]))
        .await
        .unwrap();
    let full = ads.recv().await;
    let versions = full
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    (ads, versions)
}

async fn refused(srv: &Server) {
    let tok = srv.token("ns", "a");
    // Token for ns/a, node claims ns/b.
    let mut r = request(ADDRESS_TYPE_URL, &[], &[]);
    r.node = Some(node("ns", "b"));
    let mut ads = connect(srv, Some(&tok), r).await.unwrap();
    let e = ads.next().await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("SERVICE_ACCOUNT=b"), "{}", e.message());

    let e = connect(srv, None, request(ADDRESS_TYPE_URL, &[], &[]))
        .await
        .err()
        .expect("no token must be refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = connect(srv, Some("x.y.z"), request(ADDRESS_TYPE_URL, &[], &[]))
        .await
        .err()
        .expect("bad token must be refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_end_to_end_istiod() {
    delta_ads_end_to_end(Mode::Istiod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_end_to_end_extended() {
    delta_ads_end_to_end(Mode::Extended).await;
}

/// Authorization by workload uid: istiod sends every policy and the uid
/// back as a removal; extended mode the policies that apply to it.
async fn authorization_by_uid(srv: &Server, mode: Mode) {
    let tok = srv.token("ns", "a");
    let mut ads = connect(
        srv,
        Some(&tok),
        request(AUTHORIZATION_TYPE_URL, &["*"], &["*"]),
    )
    .await
    .unwrap();
    let first = ads.recv().await;
    let r = {
        ads.send(request(
            AUTHORIZATION_TYPE_URL,
            &["Kubernetes//Pod/ns/b1"],
            &[],
        ))
        .await;
        ads.recv().await
    };
    match mode {
        Mode::Istiod => {
            assert_eq!(names(&first), ["ns/allow-a", "ns/other"]);
            assert_eq!(names(&r), ["ns/allow-a", "ns/other"]);
            assert_eq!(r.removed_resources, ["Kubernetes//Pod/ns/b1"]);
            assert!(r.resources.iter().all(|x| x.version.is_empty()));
        }
        Mode::Extended => {
            assert!(first.resources.is_empty());
            // b1 is not selected by allow-a; ns/other is namespace-wide.
            assert_eq!(names(&r), ["ns/other"]);
            assert!(r.removed_resources.is_empty());
        }
    }
    ads.quiet().await;
}

/// A client whose node metadata names a node gets that node's workloads
/// (istiod's node-local optimisation), in both modes.
async fn node_name_is_node_wide(srv: &Server) {
    let tok = srv.token("ns", "a");
    let mut r = request(ADDRESS_TYPE_URL, &["*"], &["*"]);
    let mut node = node("ns", "a");
    node.metadata.as_mut().unwrap().fields.insert(
        "NODE_NAME".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("node-v".into())),
        },
    );
    r.node = Some(node);
    let mut ads = connect(srv, Some(&tok), r).await.unwrap();
    let first = ads.recv().await;
    assert_eq!(
        names(&first),
        ["Kubernetes//Pod/ns/a1", "Kubernetes//Pod/ns/a2"]
    );
    ads.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_and_node_name_per_mode() {
    for mode in Mode::ALL {
        let dir = tempfile::tempdir().unwrap();
        let inv = INVENTORY
            .replace(
                "{name: a1, namespace: ns,",
                "{name: a1, node: node-v, namespace: ns,",
            )
            .replace(
                "{name: a2, namespace: ns,",
                "{name: a2, node: node-v, namespace: ns,",
            )
            + "  - {name: other, namespace: ns}\n";
        std::fs::write(dir.path().join("inventory.yaml"), inv).unwrap();
        let srv = Server::start(dir, mode).await;
        authorization_by_uid(&srv, mode).await;
        node_name_is_node_wide(&srv).await;
        srv.shutdown().await;
    }
}

async fn delta_ads_end_to_end(mode: Mode) {
    let srv = Server::start(tempfile::tempdir().unwrap(), mode).await;
    wildcard_sync_and_deltas(&srv).await;
    on_demand(&srv).await;
    refused(&srv).await;
    let (mut old, versions) = holding_client(&srv).await;

    // Restart meshd with a changed inventory; the open stream is closed with
    // UNAVAILABLE; a reconnect presenting what the client holds gets only
    // the change and the removal.
    let dir = srv.shutdown().await;
    let e = old.next().await.expect_err("stream must end on shutdown");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let inv = dir.path().join("inventory.yaml");
    let text = INVENTORY
        .replace(
            "{name: a1, namespace: ns,",
            "{name: a1, node: node-2, namespace: ns,",
        )
        .replace(
            "  - {name: b1, namespace: ns, serviceAccount: b, addresses: [10.0.0.3]}\n",
            "",
        );
    std::fs::write(&inv, text).unwrap();
    let srv = Server::start(dir, mode).await;
    let mut first = request(ADDRESS_TYPE_URL, &[], &[]);
    first.initial_resource_versions = versions.into_iter().collect();
    let tok = srv.token("ns", "a");
    let mut ads = connect(&srv, Some(&tok), first).await.unwrap();
    let r = ads.recv().await;
    assert_eq!(names(&r), ["Kubernetes//Pod/ns/a1"]);
    assert_eq!(r.removed_resources, ["Kubernetes//Pod/ns/b1"]);
    drop(ads);
    srv.shutdown().await;
}
