//! Unit tests of the inventory conversion: every field, the derivations and
//! every error naming its item.

use super::*;
use crate::inventory::{LoadError, parse};
use crate::snapshot::Kind;
use prost::Message;
use sidetunnel_proto::istio::security::{Authorization, string_match::MatchType};
use sidetunnel_proto::istio::workload::{Address, address};
use sidetunnel_proto::istio::workload::{NamespacedHostname, gateway_address::Destination};

fn ctx() -> Context {
    Context {
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
    }
}

fn err(text: &str) -> String {
    match parse(&ctx(), text) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted invalid inventory:\n{text}"),
    }
}

fn workload(s: &Snapshot, name: &str) -> wl::Workload {
    let e = s.get(TypeUrl::Address, name).expect(name);
    assert_eq!(e.kind, Kind::Workload);
    match Address::decode(&e.body[..]).unwrap().r#type {
        Some(address::Type::Workload(w)) => w,
        other => panic!("{other:?}"),
    }
}

fn service(s: &Snapshot, name: &str) -> wl::Service {
    match Address::decode(&s.get(TypeUrl::Address, name).unwrap().body[..])
        .unwrap()
        .r#type
    {
        Some(address::Type::Service(svc)) => svc,
        other => panic!("{other:?}"),
    }
}

fn policy(s: &Snapshot, name: &str) -> Authorization {
    Authorization::decode(&s.get(TypeUrl::Authorization, name).unwrap().body[..]).unwrap()
}

#[test]
fn defaults_and_derived_fields() {
    let s = parse(
        &ctx(),
        r#"
workloads:
  - name: web-1
    namespace: shop
    addresses: [10.1.0.5, "fd00::5"]
    labels: {app: web, version: v2}
    node: node-a
    waypoint: {hostname: shop/waypoint.shop.svc.cluster.local}
  - {name: db-0, namespace: shop, uid: custom-uid, addresses: [10.1.0.6], protocol: NONE,
     workloadType: pod, status: Unhealthy, trustDomain: other.td, serviceAccount: db,
     services: {shop/db.shop.svc.cluster.local: {5432: 5432}}, network: net2,
     locality: {region: r, zone: z}}
services:
  - {name: web, namespace: shop, vips: [172.20.0.1, "net2/172.20.0.2"], ports: {80: 8080, 443: 0},
     selector: {app: web}, loadBalancing: {mode: FAILOVER, routingPreference: [NETWORK, Zone], healthPolicy: AllowAll}}
  - {name: db, namespace: shop, hostname: db.shop.svc.cluster.local}
policies:
  - {name: allow-web, namespace: shop, selector: {matchLabels: {app: web}},
     rules: [{clauses: [{matches: [{principals: ["cluster.local/ns/shop/*", "*"], namespaces: ["*-prod"],
       serviceAccounts: [shop/api], sourceIps: [10.0.0.0/8, "fd00::1"], destinationPorts: [8080]}]}]}]}
  - {name: deny-all, namespace: istio-system, action: Deny}
  - {name: ns-wide, namespace: shop}
  - {name: global-web, namespace: istio-system, selector: {workloads: [web-1]}}
"#,
    )
    .unwrap();
    let w = workload(&s, "Kubernetes//Pod/shop/web-1");
    assert_eq!(w.addresses.len(), 2);
    assert_eq!(w.canonical_name, "web");
    assert_eq!(w.canonical_revision, "v2");
    assert_eq!(w.workload_name, "web-1");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.trust_domain, "", "mesh trust domain stays implicit");
    assert_eq!(w.tunnel_protocol, i32::from(wl::TunnelProtocol::Hbone));
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(
        w.waypoint.unwrap().destination,
        Some(Destination::Hostname(NamespacedHostname {
            namespace: "shop".into(),
            hostname: "waypoint.shop.svc.cluster.local".into()
        }))
    );
    // Membership from the service selector, with the service's ports.
    let ports = &w.services["shop/web.shop.svc.cluster.local"].ports;
    assert_eq!(
        ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect::<Vec<_>>(),
        [(80, 8080), (443, 0)]
    );
    // Selector policies in its namespace and in the root namespace.
    assert_eq!(
        w.authorization_policies,
        ["istio-system/global-web", "shop/allow-web"]
    );
    let aliases = &s
        .get(TypeUrl::Address, "Kubernetes//Pod/shop/web-1")
        .unwrap()
        .aliases;
    assert_eq!(aliases, &["/10.1.0.5", "/fd00::5"]);

    let db = workload(&s, "custom-uid");
    assert_eq!(db.tunnel_protocol, i32::from(wl::TunnelProtocol::None));
    assert_eq!(db.workload_type, i32::from(wl::WorkloadType::Pod));
    assert_eq!(db.status, i32::from(wl::WorkloadStatus::Unhealthy));
    assert_eq!(db.trust_domain, "other.td");
    assert_eq!(db.canonical_revision, "latest");
    assert!(db.authorization_policies.is_empty());
    assert_eq!(
        s.get(TypeUrl::Address, "custom-uid").unwrap().aliases,
        ["net2/10.1.0.6"]
    );

    let web = service(&s, "shop/web.shop.svc.cluster.local");
    assert_eq!(web.addresses[1].network, "net2");
    let lb = web.load_balancing.unwrap();
    assert_eq!(lb.mode, i32::from(wl::load_balancing::Mode::Failover));
    assert_eq!(
        lb.routing_preference,
        [
            i32::from(wl::load_balancing::Scope::Network),
            i32::from(wl::load_balancing::Scope::Zone)
        ]
    );
    assert_eq!(
        lb.health_policy,
        i32::from(wl::load_balancing::HealthPolicy::AllowAll)
    );

    let p = policy(&s, "shop/allow-web");
    assert_eq!(p.scope, i32::from(sec::Scope::WorkloadSelector));
    assert_eq!(p.action, i32::from(sec::Action::Allow));
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(
        m.principals
            .iter()
            .map(|x| x.match_type.clone())
            .collect::<Vec<_>>(),
        [
            Some(MatchType::Prefix("cluster.local/ns/shop/".into())),
            Some(MatchType::Presence(()))
        ]
    );
    assert_eq!(
        m.namespaces[0].match_type,
        Some(MatchType::Suffix("-prod".into()))
    );
    assert_eq!(m.service_accounts[0].service_account, "api");
    assert_eq!(m.source_ips[0].length, 8);
    assert_eq!(m.source_ips[1].length, 128);
    assert_eq!(m.source_ips[1].address.len(), 16);
    let deny = policy(&s, "istio-system/deny-all");
    assert_eq!(deny.scope, i32::from(sec::Scope::Global));
    assert_eq!(deny.action, i32::from(sec::Action::Deny));
    assert_eq!(
        policy(&s, "shop/ns-wide").scope,
        i32::from(sec::Scope::Namespace)
    );
}

#[test]
fn errors_name_the_item() {
    let w = "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1]}\n";
    let cases: &[(&str, &str)] = &[
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.300]}\n",
            "workloads[0] n/p: addresses[0]: invalid IP \"10.0.0.300\"",
        ),
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], colour: red}\n",
            "unknown field `colour`",
        ),
        (
            "workloads:\n  - {namespace: n, addresses: [10.0.0.1]}\n",
            "missing field `name`",
        ),
        (
            "workloads:\n  - {name: p, namespace: n}\n",
            "workloads[0] n/p: a workload needs addresses or a hostname",
        ),
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], network: net/}\n",
            "workloads[0] n/p: network: network name \"net/\" contains '/'",
        ),
        (
            "services:\n  - {name: s, namespace: n, vips: [a/b/10.0.0.9]}\n",
            "network name \"a/b\" contains '/'",
        ),
        (
            &format!("{w}  - {{name: q, namespace: n, addresses: [10.0.0.1]}}\n"),
            "workloads[1] n/q: address /10.0.0.1 already used by Kubernetes//Pod/n/p",
        ),
        (
            &format!("{w}  - {{name: p, namespace: n, addresses: [10.0.0.2]}}\n"),
            "duplicate workload uid Kubernetes//Pod/n/p",
        ),
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], services: {n/x: {80: 80}}}\n",
            "workloads[0] n/p: services: unknown service n/x",
        ),
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], services: {x: {80: 80}}}\n",
            "key \"x\" is not namespace/hostname",
        ),
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], protocol: QUIC}\n",
            "protocol: invalid value \"QUIC\"",
        ),
        (
            "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], waypoint: {port: 1}}\n",
            "waypoint: set exactly one of address, hostname",
        ),
        (
            "services:\n  - {name: s, namespace: n, ports: {70000: 80}}\n",
            "services[0] n/s: ports: port 70000 outside 1-65535",
        ),
        (
            &format!("{w}services:\n  - {{name: s, namespace: n, vips: [10.0.0.1]}}\n"),
            "services[0] n/s: VIP /10.0.0.1 already used by Kubernetes//Pod/n/p",
        ),
        (
            "services:\n  - {name: s, namespace: n}\n  - {name: s, namespace: n}\n",
            "services[1] n/s: duplicate service n/s.n.svc.cluster.local",
        ),
        (
            "policies:\n  - {name: p, namespace: n, scope: WorkloadSelector}\n",
            "policies[0] n/p: scope WorkloadSelector needs a selector",
        ),
        (
            "policies:\n  - {name: p, namespace: n, scope: Namespace, selector: {workloads: [a]}}\n",
            "only valid with scope WorkloadSelector",
        ),
        (
            "policies:\n  - {name: p, namespace: n, rules: [{clauses: [{matches: [{sourceIps: [10.0.0.0/33]}]}]}]}\n",
            "policies[0] n/p: rules[0].clauses[0].matches[0].sourceIps[0]: prefix length 33 too long",
        ),
        (
            "policies:\n  - {name: p, namespace: n, action: Audit}\n",
            "action: invalid value \"Audit\"",
        ),
        (
            "raw:\n  - {name: x, type: Cluster, base64: AA==}\n",
            "raw[0] x: type: invalid value \"Cluster\"",
        ),
        (
            "raw:\n  - {name: x, type: Address, base64: '!!'}\n",
            "raw[0] x: base64",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "error {e:?} does not contain {want:?}");
    }
    assert!(matches!(
        parse(&ctx(), "workloads: [").unwrap_err(),
        LoadError::Yaml(_)
    ));
}

#[test]
fn raw_resources_are_served_verbatim() {
    let s = parse(
        &ctx(),
        "raw:\n  - {name: ns/broken, type: Address, base64: '/////w=='}\n  - {name: ns/p, type: Authorization, base64: ''}\n",
    )
    .unwrap();
    let e = s.get(TypeUrl::Address, "ns/broken").unwrap();
    assert_eq!(e.kind, Kind::Raw);
    assert_eq!(&e.body[..], &[0xff, 0xff, 0xff, 0xff]);
    assert!(
        s.get(TypeUrl::Authorization, "ns/p")
            .unwrap()
            .body
            .is_empty()
    );
    assert_eq!(parse(&ctx(), "").unwrap(), Snapshot::default());
}
