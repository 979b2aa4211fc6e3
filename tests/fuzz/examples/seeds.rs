//! Writes the seed corpora (`cargo xtask fuzz seeds`, argument: the corpus
//! root). Seeds are small realistic inputs: meshd inventories, the xDS
//! resources meshd encodes from them, OCI specs as containerd and CRI-O
//! write them, certificates with SPIFFE SANs, HBONE headers and HTTP/2
//! frame sequences, meshd tokens (signed with the fixture key, valid for a
//! century so they keep verifying) and CSRs. Deterministic except for
//! certificate keys, ECDSA signatures and token times.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use rcgen::{CertificateParams, KeyPair, SanType};
use sidetunnel_fuzz::{CALLER_SAN, CLUSTER_ID, caller_token};
use sidetunnel_meshd::generate::{Params, generate};
use sidetunnel_meshd::inventory::{self, Context};
use sidetunnel_meshd::snapshot::{Kind, Snapshot, TypeUrl};
use sidetunnel_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use sidetunnel_proto::istio::ca::IstioCertificateRequest;

const SMALL_INVENTORY: &str = r#"
workloads:
  - {name: a1, namespace: ns, serviceAccount: a, addresses: [10.0.0.1], services: {ns/a.ns.svc.cluster.local: {80: 8080}}}
  - {name: b1, namespace: ns, serviceAccount: b, addresses: ["fd00::3"]}
services:
  - {name: a, namespace: ns, vips: [172.16.0.1], ports: {80: 8080}}
policies:
  - {name: allow-a, namespace: ns, selector: {matchLabels: {app: a}}}
"#;

const FULL_INVENTORY: &str = r#"
workloads:
  - name: productpage-v1-6b7f6dc4d-abcde
    namespace: default
    serviceAccount: bookinfo-productpage
    addresses: [10.0.1.5, "fd00::1:5"]
    node: node-1
    protocol: HBONE
    workloadType: deployment
    labels: {app: productpage, version: v1}
    waypoint: {address: 10.0.9.1, port: 15008}
    services:
      default/productpage.default.svc.cluster.local: {9080: 9080}
    status: Healthy
    locality: {region: r1, zone: z1, subzone: s1}
  - name: reviews-v1-abc
    namespace: default
    addresses: [10.0.1.6]
    network: net1
    protocol: NONE
    labels: {app: reviews}
    networkGateway: {hostname: default/gw.default.svc.cluster.local, port: 15008}
    status: Unhealthy
services:
  - name: productpage
    namespace: default
    vips: [10.96.0.10, "net1/10.96.0.11"]
    ports: {9080: 9080}
    waypoint: {address: 10.0.9.1, port: 15008}
    loadBalancing: {mode: FAILOVER, routingPreference: [NETWORK, ZONE], healthPolicy: ONLY_HEALTHY}
  - name: reviews
    namespace: default
    ports: {9080: 0}
    selector: {app: reviews}
policies:
  - name: allow-reviews
    namespace: default
    action: Allow
    selector: {matchLabels: {app: reviews}, workloads: [reviews-v1-abc]}
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/default/sa/bookinfo-productpage", "*-sa"]
                namespaces: [default]
                serviceAccounts: ["default/bookinfo-productpage"]
                sourceIps: [10.0.0.0/8, "fd00::/8"]
                destinationPorts: [9080]
          - matches:
              - notNamespaces: [kube-system]
                notDestinationIps: [10.0.1.7]
  - name: deny-all
    namespace: istio-system
    action: Deny
    dryRun: true
    rules: [{clauses: [{matches: [{notSourceIps: [192.168.0.0/16]}]}]}]
raw:
  - {name: default/broken, type: Address, base64: "CgQKAgoA"}
"#;

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).expect("usage: seeds <corpus dir>"));
    let ctx = Context {
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
    };
    let generated = generate(&Params {
        services: 3,
        pods: 6,
        seed: 1,
        namespaces: None,
    })
    .expect("generate");
    let generated = serde_yaml::to_string(&generated).expect("yaml");
    let inventories = [
        ("small.yaml", SMALL_INVENTORY),
        ("full.yaml", FULL_INVENTORY),
        ("generated.yaml", generated.as_str()),
    ];
    let mut snapshots = Vec::new();
    for (name, text) in inventories {
        write(&root, "meshd_inventory", name, text.as_bytes());
        snapshots.push(inventory::parse(&ctx, text).expect("seed inventory is valid"));
    }
    xds(&root, &snapshots);
    oci(&root);
    redirect(&root);
    identities(&root);
    certificates(&root);
    hbone_request(&root);
    hbone_server(&root);
    jwt(&root);
    csr(&root);
    dns(&root);
}

fn write(root: &Path, target: &str, name: &str, data: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(name), data).expect("write seed");
}

/// Resource bodies and whole responses from meshd's snapshots.
fn xds(root: &Path, snapshots: &[Snapshot]) {
    for (i, snap) in snapshots.iter().enumerate() {
        for t in TypeUrl::ALL {
            let mut resources = Vec::new();
            for (j, (name, entry)) in snap.table(t).iter().enumerate() {
                resources.push(snap.resource(t, name).expect("listed"));
                if entry.kind == Kind::Raw || j >= 4 {
                    continue;
                }
                let seed = format!("{i}-{j}");
                match t {
                    TypeUrl::Address => write(root, "xds_address", &seed, &entry.body),
                    TypeUrl::Authorization => {
                        // Connection head: IPv4, identity 1 (default/sleep),
                        // 10.0.0.9:40000 → 10.0.1.6:9080.
                        let mut data =
                            vec![0b010, 10, 0, 0, 9, 0x9c, 0x40, 10, 0, 1, 6, 0x23, 0x78];
                        data.extend_from_slice(&entry.body);
                        write(root, "xds_authorization", &seed, &data);
                    }
                }
            }
            let resp = DeltaDiscoveryResponse {
                type_url: t.as_str().into(),
                nonce: format!("n{i}"),
                system_version_info: "seed".into(),
                removed_resources: vec!["ns/gone".into()],
                resources,
                ..Default::default()
            };
            let kind = match t {
                TypeUrl::Address => "address",
                TypeUrl::Authorization => "authorization",
            };
            write(
                root,
                "xds_delta",
                &format!("{i}-{kind}"),
                &resp.encode_to_vec(),
            );
        }
    }
}

fn oci(root: &Path) {
    let containerd_sandbox = r#"{
  "ociVersion": "1.2.0",
  "process": {"user": {"uid": 65535, "gid": 65535}, "args": ["/pause"], "cwd": "/"},
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "productpage-v1-6b7f6dc4d-abcde",
  "annotations": {
    "io.kubernetes.cri.container-type": "sandbox",
    "io.kubernetes.cri.sandbox-id": "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "io.kubernetes.cri.sandbox-name": "productpage-v1-6b7f6dc4d-abcde",
    "io.kubernetes.cri.sandbox-namespace": "default",
    "io.kubernetes.cri.sandbox-uid": "4f1c2a5e-8d6b-4c1e-9a3f-2b7d6e5c4a31",
    "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/default_productpage_4f1c2a5e",
    "sidetunnel.io/inject": "true",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "9000,9001",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32"
  },
  "linux": {
    "cgroupsPath": "kubepods-besteffort-pod4f1c2a5e_8d6b_4c1e_9a3f_2b7d6e5c4a31.slice:cri-containerd:0f1e2d3c",
    "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                   {"type": "network", "path": "/var/run/netns/cni-1234"}]
  }
}"#;
    let containerd_container = r#"{
  "ociVersion": "1.2.0",
  "annotations": {
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.container-name": "productpage",
    "io.kubernetes.cri.image-name": "docker.io/istio/examples-bookinfo-productpage-v1:1.20.1",
    "io.kubernetes.cri.sandbox-id": "0f1e2d3c",
    "io.kubernetes.cri.sandbox-name": "productpage-v1-6b7f6dc4d-abcde",
    "io.kubernetes.cri.sandbox-namespace": "default",
    "io.kubernetes.cri.sandbox-uid": "4f1c2a5e-8d6b-4c1e-9a3f-2b7d6e5c4a31"
  },
  "linux": {"cgroupsPath": "/kubepods/besteffort/pod4f1c2a5e/abcdef", "namespaces": [{"type": "network", "path": "/proc/42/ns/net"}]}
}"#;
    let crio_sandbox = r#"{
  "ociVersion": "1.0.2-dev",
  "annotations": {
    "io.kubernetes.cri-o.ContainerType": "sandbox",
    "io.kubernetes.cri-o.SandboxID": "9a8b7c6d",
    "io.kubernetes.cri-o.Namespace": "default",
    "io.kubernetes.cri-o.KubeName": "reviews-v1-abc",
    "io.kubernetes.cri-o.Metadata": "{\"name\":\"reviews-v1-abc\",\"uid\":\"11111111-2222-3333-4444-555555555555\",\"namespace\":\"default\",\"attempt\":0}",
    "io.kubernetes.cri-o.LogPath": "/var/log/pods/default_reviews_1111/9a8b.log",
    "io.kubernetes.cri-o.HostNetwork": "false",
    "io.kubernetes.pod.name": "reviews-v1-abc",
    "io.kubernetes.pod.namespace": "default",
    "io.kubernetes.pod.uid": "11111111-2222-3333-4444-555555555555"
  },
  "linux": {"cgroupsPath": "/kubepods/burstable/pod1111/9a8b7c6d", "namespaces": [{"type": "network", "path": "/var/run/netns/9a8b"}]}
}"#;
    let standalone =
        r#"{"ociVersion": "1.1.0", "annotations": null, "linux": {"namespaces": null}}"#;
    for (name, json) in [
        ("containerd-sandbox.json", containerd_sandbox),
        ("containerd-container.json", containerd_container),
        ("crio-sandbox.json", crio_sandbox),
        ("standalone.json", standalone),
    ] {
        write(root, "oci_spec", name, json.as_bytes());
    }
}

fn redirect(root: &Path) {
    let seeds = [
        (
            "istio.json",
            r#"{"traffic.sidecar.istio.io/excludeOutboundPorts": "9000, 9001", "traffic.sidecar.istio.io/excludeInboundPorts": "15090", "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32,fd00::/8,10.0.0.1", "traffic.sidecar.istio.io/includeInboundPorts": "*"}"#,
        ),
        (
            "sidetunnel.json",
            r#"{"sidetunnel.io/dns-capture": "true", "ambient.istio.io/dns-capture": "true", "sidetunnel.io/probe-ports": "8080,8081", "traffic.sidecar.istio.io/includeInboundPorts": "80,443"}"#,
        ),
        (
            "ignored.json",
            r#"{"traffic.sidecar.istio.io/interceptionMode": "TPROXY", "app": "productpage", "traffic.sidecar.istio.io/excludeOutboundIPRanges": "*"}"#,
        ),
        ("empty.json", "{}"),
    ];
    for (name, json) in seeds {
        write(root, "redirect_annotations", name, json.as_bytes());
    }
}

fn identities(root: &Path) {
    let ids = [
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "spiffe://td.with.dots/ns/ns.with.dots/sa/sa_with-dashes",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/ns/default/sa/a/b",
        "https://example.com/ns/a/sa/b",
    ];
    for (i, id) in ids.iter().enumerate() {
        write(root, "spiffe_identity", &i.to_string(), id.as_bytes());
    }
}

fn certificates(root: &Path) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf = |sans: Vec<SanType>| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = sans;
        p.signed_by(&KeyPair::generate().expect("key"), &issuer)
            .expect("leaf")
    };
    let uri = |u: &str| SanType::URI(u.try_into().expect("ia5"));
    let spiffe = leaf(vec![uri("spiffe://cluster.local/ns/default/sa/sleep")]);
    let mixed = leaf(vec![
        SanType::DnsName("sleep.default.svc".try_into().expect("ia5")),
        uri("https://example.com/x"),
        uri("spiffe://example.org/ns/other/sa/default"),
    ]);
    write(root, "x509_san", "spiffe.der", spiffe.der());
    write(root, "x509_san", "mixed.der", mixed.der());
    write(root, "x509_san", "ca.der", ca_cert.der());
    write(
        root,
        "x509_san",
        "bundle.pem",
        format!("{}{}", spiffe.pem(), ca_cert.pem()).as_bytes(),
    );
}

fn hbone_request(root: &Path) {
    let seeds = [
        "10.0.1.6:9080\nfor=\"10.0.0.9:40000\";host=reviews.default.svc.cluster.local\nk8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=productpage-v1,service.name=productpage,service.version=v1\n00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n10.0.0.9:40000\nreviews.default.svc.cluster.local",
        "[fd00::1:5]:8080\nfor=\"[fd00::9]:1234\", for=192.0.2.1\nk8s.pod.name=p,cloud.region=r1,cloud.availability_zone=z1\n00-00000000000000000000000000000001-0000000000000001-00\n[fd00::9]:1234\n",
        "reviews.default:9080\nFor=_hidden;proto=https\n\nff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n10.0.0.9:0\nexample.com",
        "10.0.1.6:0\nfor=unknown\n,,=,k8s..name=x\n00-zz\n\n",
    ];
    for (i, s) in seeds.iter().enumerate() {
        write(root, "hbone_request", &i.to_string(), s.as_bytes());
    }
}

/// HTTP/2 frames (after the preface, which the harness adds).
fn hbone_server(root: &Path) {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK literal header field without indexing, new name, no Huffman.
    fn headers(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in fields {
            b.push(0);
            b.push(n.len() as u8);
            b.extend_from_slice(n.as_bytes());
            b.push(v.len() as u8);
            b.extend_from_slice(v.as_bytes());
        }
        b
    }
    const HEADERS: u8 = 1;
    const DATA: u8 = 0;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    let settings = frame(4, 0, 0, &[]);
    let connect = |stream: u32, authority: &str| {
        frame(
            HEADERS,
            END_HEADERS,
            stream,
            &headers(&[
                (":method", "CONNECT"),
                (":authority", authority),
                (
                    "forwarded",
                    "for=\"10.0.0.9:40000\";host=reviews.default.svc",
                ),
                (
                    "baggage",
                    "k8s.namespace.name=default,service.name=productpage",
                ),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ]),
        )
    };
    let data = |stream: u32, end: bool, bytes: &[u8]| {
        frame(DATA, if end { END_STREAM } else { 0 }, stream, bytes)
    };
    let seq = |frames: Vec<Vec<u8>>| frames.concat();
    let get = frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &headers(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "a"),
        ]),
    );
    let seeds = [
        (
            "accept",
            seq(vec![
                settings.clone(),
                connect(1, "10.0.1.6:9081"),
                data(1, true, b"hello"),
            ]),
        ),
        (
            "refuse",
            seq(vec![settings.clone(), connect(1, "[fd00::1:5]:9080")]),
        ),
        (
            "bad-authority",
            seq(vec![
                settings.clone(),
                connect(1, "reviews:9080"),
                connect(3, "10.0.1.6:0"),
            ]),
        ),
        (
            "get-then-connect",
            seq(vec![
                settings.clone(),
                get,
                connect(5, "10.0.1.6:9081"),
                data(5, false, b"x"),
            ]),
        ),
        (
            "ping-window-reset",
            seq(vec![
                settings,
                frame(6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
                connect(1, "10.0.1.6:9081"),
                frame(8, 0, 1, &1024u32.to_be_bytes()),
                frame(3, 0, 1, &8u32.to_be_bytes()),
                frame(7, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
            ]),
        ),
    ];
    for (name, bytes) in seeds {
        write(root, "hbone_server", name, &bytes);
    }
}

/// Bearer metadata (`jwt_token`) and token header/claims JSON (`jwt_claims`).
fn jwt(root: &Path) {
    let century = Duration::from_secs(100 * 365 * 86400);
    let token = caller_token(century);
    let bearer = [
        ("bearer", format!("Bearer {token}")),
        ("bare-token", token.clone()),
        ("cluster", format!("{CLUSTER_ID}\nbearer  {token} ")),
        ("other-cluster", format!("other\nBearer {token}")),
        ("unsigned", {
            let (head, _) = token.rsplit_once('.').expect("three parts");
            format!("Bearer {head}.")
        }),
        ("basic", "Basic dXNlcjpwYXNz".to_string()),
    ];
    for (name, v) in bearer {
        write(root, "jwt_token", name, v.as_bytes());
    }

    let far = 4_000_000_000u64;
    let k8s = format!(
        r#"{{"iss":"sidetunnel-meshd","sub":"system:serviceaccount:default:sleep","aud":["istio-ca"],"exp":{far},"iat":1700000000,"nbf":1700000000,"kubernetes.io":{{"namespace":"default","serviceaccount":{{"name":"sleep","uid":"1"}},"pod":{{"name":"sleep-1","uid":"2"}}}}}}"#
    );
    let sub_only = format!(
        r#"{{"iss":"x","sub":"system:serviceaccount:ns1:sa1","aud":"istio-ca","exp":{far},"iat":0,"nbf":0}}"#
    );
    let expired = r#"{"iss":"x","sub":"system:serviceaccount:a:b","aud":["kubernetes","istio-ca"],"exp":1000,"iat":0,"nbf":0}"#;
    let future = format!(
        r#"{{"iss":"x","sub":"system:serviceaccount:a:b","aud":["istio-ca"],"exp":{far},"iat":0,"nbf":{far}}}"#
    );
    let claims = [
        ("k8s", k8s.clone()),
        ("sub-only", sub_only),
        ("expired", expired.to_string()),
        ("not-yet", future),
        (
            "with-header",
            format!(
                r#"{{"alg":"ES256","typ":"JWT","kid":"abc"}}{}{sub}"#,
                '\0',
                sub = k8s
            ),
        ),
        ("alg-none", format!(r#"{{"alg":"none"}}{}{k8s}"#, '\0')),
    ];
    for (name, v) in claims {
        write(root, "jwt_claims", name, v.as_bytes());
    }
}

/// CSRs: DER and PEM (`ca_csr`), SAN lists (`ca_csr_sans`) and whole
/// `IstioCertificateRequest`s (`ca_request`).
fn csr(root: &Path) {
    let request = |sans: Vec<SanType>| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = sans;
        p.serialize_request(&KeyPair::generate().expect("key"))
            .expect("CSR")
    };
    let uri = |u: &str| SanType::URI(u.try_into().expect("ia5"));
    let caller = request(vec![uri(CALLER_SAN)]);
    let other = request(vec![uri("spiffe://cluster.local/ns/default/sa/admin")]);
    let extra = request(vec![
        uri(CALLER_SAN),
        SanType::DnsName("sleep.default.svc".try_into().expect("ia5")),
    ]);
    let none = request(vec![]);
    for (name, c) in [
        ("caller", &caller),
        ("other", &other),
        ("extra", &extra),
        ("none", &none),
    ] {
        write(root, "ca_csr", &format!("{name}.der"), c.der());
        write(
            root,
            "ca_csr",
            &format!("{name}.pem"),
            c.pem().expect("pem").as_bytes(),
        );
    }

    let sans = [
        ("caller", format!("U{CALLER_SAN}")),
        (
            "other",
            "Uspiffe://cluster.local/ns/default/sa/admin".to_string(),
        ),
        (
            "case",
            "Uspiffe://cluster.local/ns/default/sa/Sleep".to_string(),
        ),
        ("two", format!("U{CALLER_SAN}\nU{CALLER_SAN}")),
        (
            "mixed",
            format!("U{CALLER_SAN}\nDsleep.default.svc\nI10.0.0.9\nEa@b.c"),
        ),
        ("ip", "Ifd00::1".to_string()),
    ];
    for (name, v) in sans {
        write(root, "ca_csr_sans", name, v.as_bytes());
    }

    let impersonate = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    "spiffe://cluster.local/ns/default/sa/admin".into(),
                )),
            },
        )]
        .into(),
    };
    let requests = [
        ("caller", caller.pem().expect("pem"), 3600, None),
        ("caller-no-ttl", caller.pem().expect("pem"), 0, None),
        (
            "impersonate",
            caller.pem().expect("pem"),
            -5,
            Some(impersonate),
        ),
        ("other", other.pem().expect("pem"), 86400 * 365, None),
    ];
    for (name, csr, validity_duration, metadata) in requests {
        let req = IstioCertificateRequest {
            csr,
            validity_duration,
            metadata,
        };
        write(root, "ca_request", name, &req.encode_to_vec());
    }
}

/// Queries as stubs send them (with and without EDNS0, search-expanded,
/// over the UDP limit when answered), upstream responses with compressed
/// names, and resolv.conf files.
fn dns(root: &Path) {
    use netproxy::dns::wire::{self, RData, Rcode, Record, TYPE_A, TYPE_AAAA};
    let queries = [
        ("service.bin", "web.ns.svc.cluster.local", TYPE_A, Some(1232)),
        ("service-aaaa.bin", "web.ns.svc.cluster.local", TYPE_AAAA, None),
        ("expanded.bin", "api.example.com.ns.svc.cluster.local", TYPE_A, Some(4096)),
        ("wildcard.bin", "x.wild.example.svc.cluster.local", TYPE_A, None),
        ("many.bin", "many.example.com", TYPE_AAAA, None),
        ("outside.bin", "www.example.org", TYPE_A, Some(512)),
        ("mx.bin", "example.org", 15, None),
    ];
    for (name, host, qtype, edns) in queries {
        let q = wire::build_query(0x1234, host, qtype, edns).expect("seed name");
        write(root, "dns_message", name, &q);
    }
    let q = wire::parse_query(&wire::build_query(7, "www.example.org", TYPE_A, None).expect("seed"))
        .expect("seed parses");
    let cname = [
        Record {
            owner: None,
            ttl: 60,
            data: RData::Cname("edge.example.net".into()),
        },
        Record {
            owner: Some("edge.example.net".into()),
            ttl: 60,
            data: RData::A([192, 0, 2, 1].into()),
        },
    ];
    let resp = wire::encode_answer(&q, Rcode::NoError, false, &cname, 512).expect("seed");
    write(root, "dns_message", "response-cname.bin", &resp);
    write(
        root,
        "dns_message",
        "resolv.conf",
        b"search ns.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5 timeout:2\n",
    );
}
