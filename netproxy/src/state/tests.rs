//! Unit tests of conversion, indexes, apply and on-demand waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sidetunnel_proto::istio::security as xsec;
use sidetunnel_proto::istio::workload as xwl;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ip_bytes(s: &str) -> Bytes {
    match ip(s) {
        IpAddr::V4(v) => Bytes::copy_from_slice(&v.octets()),
        IpAddr::V6(v) => Bytes::copy_from_slice(&v.octets()),
    }
}

fn proto_workload(name: &str, ips: &[&str], services: &[&str]) -> xwl::Workload {
    xwl::Workload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: "sa-".to_string() + name,
        addresses: ips.iter().map(|s| ip_bytes(s)).collect(),
        tunnel_protocol: xwl::TunnelProtocol::Hbone as i32,
        services: services
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    xwl::PortList {
                        ports: vec![xwl::Port {
                            service_port: 80,
                            target_port: 8080,
                            app_protocol: 0,
                        }],
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn workload(name: &str, ips: &[&str], services: &[&str]) -> Arc<Workload> {
    Arc::new(convert::workload(&proto_workload(name, ips, services)).unwrap())
}

fn proto_service(name: &str, vip: &str) -> xwl::Service {
    xwl::Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        addresses: vec![xwl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
            length: None,
        }],
        ports: vec![xwl::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    }
}

fn service(name: &str, vip: &str) -> Arc<Service> {
    Arc::new(convert::service(&proto_service(name, vip)).unwrap())
}

fn policy(ns: &str, name: &str, scope: PolicyScope) -> Policy {
    Policy {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action: PolicyAction::Allow,
        rules: vec![],
        dry_run: false,
    }
}

const SVC: &str = "default/web.default.svc.cluster.local";

#[test]
fn converts_workload_and_identity() {
    let w = workload("web-1", &["10.0.0.1", "fd00::1"], &[SVC]);
    assert_eq!(
        w.identity(),
        "spiffe://cluster.local/ns/default/sa/sa-web-1"
    );
    assert_eq!(w.addresses, vec![ip("10.0.0.1"), ip("fd00::1")]);
    assert_eq!(w.protocol, TunnelProtocol::Hbone);
    assert_eq!(w.services[SVC][&80], 8080);
    assert!(w.healthy());
}

#[test]
fn rejects_malformed_resources_naming_the_field() {
    let mut w = proto_workload("bad", &["10.0.0.1"], &[]);
    w.addresses.push(Bytes::from_static(&[1, 2, 3, 4, 5]));
    let e = convert::workload(&w).unwrap_err();
    assert_eq!(e.field, "workload.addresses[1]");
    assert!(e.reason.contains("got 5"), "{e}");

    let mut w = proto_workload("bad", &["10.0.0.1"], &[]);
    w.tunnel_protocol = 42;
    assert_eq!(
        convert::workload(&w).unwrap_err().field,
        "workload.tunnel_protocol"
    );

    // A '/' in a network name would make the network/IP alias ambiguous.
    let mut w = proto_workload("bad", &["10.0.0.1"], &[]);
    w.network = "a/b".into();
    assert_eq!(convert::workload(&w).unwrap_err().field, "workload.network");

    let mut w = proto_workload("bad", &[], &["no-slash"]);
    w.uid.clear();
    assert!(convert::workload(&w).is_err());

    let addr = xwl::Address {
        r#type: Some(xwl::address::Type::Workload(proto_workload("a", &[], &[]))),
    };
    let e = convert::address("wrong-name", &addr).unwrap_err();
    assert!(e.reason.contains("differs from uid"), "{e}");
    assert!(convert::address("x", &xwl::Address { r#type: None }).is_err());

    let mut s = proto_service("web", "10.96.0.1");
    s.ports[0].service_port = 70000;
    assert!(
        convert::service(&s)
            .unwrap_err()
            .to_string()
            .contains("70000")
    );

    let auth = |m: xsec::Match| xsec::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        rules: vec![xsec::Rule {
            clauses: vec![xsec::Clause { matches: vec![m] }],
        }],
        ..Default::default()
    };
    let long_prefix = xsec::Match {
        source_ips: vec![xsec::Address {
            address: ip_bytes("10.0.0.0"),
            length: 33,
        }],
        ..Default::default()
    };
    let e = convert::policy("ns/p", &auth(long_prefix)).unwrap_err();
    assert_eq!(
        e.field,
        "authorization.rules[0].clauses[0].matches[0].source_ips[0].length"
    );
    let empty_string_match = xsec::Match {
        principals: vec![xsec::StringMatch { match_type: None }],
        ..Default::default()
    };
    assert!(convert::policy("ns/p", &auth(empty_string_match)).is_err());
    assert!(convert::policy("ns/other", &auth(Default::default())).is_err());
    let mut unknown_action = auth(Default::default());
    unknown_action.action = 9;
    assert!(convert::policy("ns/p", &unknown_action).is_err());
}

#[test]
fn converts_policy_matches() {
    let a = xsec::Authorization {
        name: "allow".into(),
        namespace: "ns".into(),
        scope: xsec::Scope::WorkloadSelector as i32,
        action: xsec::Action::Deny as i32,
        dry_run: true,
        rules: vec![xsec::Rule {
            clauses: vec![xsec::Clause {
                matches: vec![xsec::Match {
                    principals: vec![xsec::StringMatch {
                        match_type: Some(xsec::string_match::MatchType::Prefix("td/".into())),
                    }],
                    source_ips: vec![xsec::Address {
                        address: ip_bytes("10.1.0.0"),
                        length: 16,
                    }],
                    destination_ports: vec![8080],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let p = convert::policy("ns/allow", &a).unwrap();
    assert_eq!(p.scope, PolicyScope::WorkloadSelector);
    assert_eq!(p.action, PolicyAction::Deny);
    assert!(p.dry_run);
    let m = &p.rules[0][0][0];
    assert!(m.principals[0].matches("td/ns/a/sa/b"));
    assert!(m.source_ips[0].contains(ip("10.1.200.3")));
    assert!(!m.source_ips[0].contains(ip("10.2.0.1")));
    assert_eq!(m.destination_ports, vec![8080]);
}

#[test]
fn indexes_follow_insert_update_remove() {
    let store = Store::new();
    store.apply(StoreUpdate {
        addresses: vec![
            Address::Workload(workload("web-1", &["10.0.0.1"], &[SVC])),
            Address::Workload(workload("web-2", &["10.0.0.2"], &[SVC])),
            Address::Service(service("web", "10.96.0.1")),
        ],
        ..Default::default()
    });
    assert_eq!(
        store.workload_by_ip("", ip("10.0.0.1")).unwrap().name,
        "web-1"
    );
    assert!(store.workload_by_ip("other-net", ip("10.0.0.1")).is_none());
    let svc = store.service_by_vip("", ip("10.96.0.1")).unwrap();
    assert_eq!(svc.key(), SVC);
    assert_eq!(
        store.service_by_hostname("default", "web.default.svc.cluster.local"),
        Some(svc.clone())
    );
    let names = |v: Vec<Arc<Workload>>| v.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(store.service_endpoints(&svc)), ["web-1", "web-2"]);
    assert!(matches!(
        store.lookup_address("", ip("10.96.0.1")),
        Some(Address::Service(_))
    ));
    assert!(matches!(
        store.lookup_name("/10.0.0.2"),
        Some(Address::Workload(_))
    ));

    // Update: web-1 moves IP and leaves the service.
    store.apply(StoreUpdate {
        addresses: vec![Address::Workload(workload("web-1", &["10.0.0.9"], &[]))],
        ..Default::default()
    });
    assert!(store.workload_by_ip("", ip("10.0.0.1")).is_none());
    assert_eq!(
        store.workload_by_ip("", ip("10.0.0.9")).unwrap().name,
        "web-1"
    );
    assert_eq!(names(store.service_endpoints(&svc)), ["web-2"]);

    // IP reuse: a new pod takes 10.0.0.2 before the old one's removal.
    store.apply(StoreUpdate {
        addresses: vec![Address::Workload(workload("web-3", &["10.0.0.2"], &[SVC]))],
        ..Default::default()
    });
    store.apply(StoreUpdate {
        removed_addresses: vec!["Kubernetes//Pod/default/web-2".into()],
        ..Default::default()
    });
    assert_eq!(
        store.workload_by_ip("", ip("10.0.0.2")).unwrap().name,
        "web-3"
    );

    // Removal by alias and by ns/hostname.
    store.apply(StoreUpdate {
        removed_addresses: vec!["/10.0.0.9".into(), SVC.into()],
        ..Default::default()
    });
    assert!(
        store
            .workload_by_uid("Kubernetes//Pod/default/web-1")
            .is_none()
    );
    assert!(store.service_by_vip("", ip("10.96.0.1")).is_none());
    assert_eq!(
        store.stats(),
        StoreStats {
            workloads: 1,
            services: 0,
            policies: 0
        }
    );
    assert_eq!(store.generation(), 5);
}

#[test]
fn policies_by_scope() {
    let store = Store::new();
    store.apply(StoreUpdate {
        policies: vec![
            policy("istio-system", "global", PolicyScope::Global),
            policy("default", "ns-wide", PolicyScope::Namespace),
            policy("other", "ns-other", PolicyScope::Namespace),
            policy("default", "selected", PolicyScope::WorkloadSelector),
            policy("default", "unselected", PolicyScope::WorkloadSelector),
        ],
        ..Default::default()
    });
    let mut w = (*workload("web-1", &["10.0.0.1"], &[])).clone();
    w.authorization_policies = vec!["default/selected".into(), "default/missing".into()];
    let keys = |store: &Store| {
        store
            .policies_for(&w)
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&store),
        ["default/ns-wide", "default/selected", "istio-system/global"]
    );
    // A policy changing scope is re-indexed; removal drops it.
    store.apply(StoreUpdate {
        policies: vec![policy("default", "ns-wide", PolicyScope::WorkloadSelector)],
        removed_policies: vec!["istio-system/global".into()],
        ..Default::default()
    });
    assert_eq!(keys(&store), ["default/selected"]);
}

#[test]
fn dump_uses_ztunnel_field_names() {
    let store = Store::new();
    store.apply(StoreUpdate {
        addresses: vec![
            Address::Workload(workload("web-1", &["10.0.0.1"], &[SVC])),
            Address::Service(service("web", "10.96.0.1")),
        ],
        policies: vec![policy("default", "p", PolicyScope::Namespace)],
        ..Default::default()
    });
    let v = serde_json::to_value(store.dump()).unwrap();
    let w = &v["workloads"][0];
    assert_eq!(w["workloadIps"][0], "10.0.0.1");
    assert_eq!(w["serviceAccount"], "sa-web-1");
    assert_eq!(w["protocol"], "HBONE");
    assert_eq!(w["services"][SVC]["80"], 8080);
    assert_eq!(v["services"][0]["vips"][0], "/10.96.0.1");
    assert_eq!(v["services"][0]["subjectAltNames"], serde_json::json!([]));
    assert_eq!(v["policies"][0]["scope"], "Namespace");
    assert_eq!(v["policies"][0]["dryRun"], false);
}

/// Answers demands from a prepared map, later, from another task, like a
/// control plane would: present names are applied, others removed.
struct ScriptedDemand {
    store: Mutex<Option<Arc<Store>>>,
    answers: HashMap<String, Address>,
    silent: bool,
}

impl Demand for ScriptedDemand {
    fn subscribe(&self, names: Vec<String>) {
        let Some(store) = self.store.lock().unwrap().clone() else {
            return;
        };
        if self.silent {
            return;
        }
        let mut update = StoreUpdate::default();
        for n in names {
            match self.answers.get(&n) {
                Some(a) => update.addresses.push(a.clone()),
                None => update.removed_addresses.push(n),
            }
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            store.apply(update);
        });
    }
}

fn demand_store(silent: bool) -> Arc<Store> {
    let store = Arc::new(Store::with_demand_timeout(Duration::from_millis(300)));
    let d = Arc::new(ScriptedDemand {
        store: Mutex::new(Some(store.clone())),
        answers: HashMap::from([
            (
                "/10.0.0.1".to_string(),
                Address::Workload(workload("web-1", &["10.0.0.1"], &[])),
            ),
            (
                SVC.to_string(),
                Address::Service(service("web", "10.96.0.1")),
            ),
        ]),
        silent,
    });
    store.set_demand(d);
    store
}

#[tokio::test]
async fn fetch_on_demand_waits_for_positive_and_negative_answers() {
    let store = demand_store(false);
    let found = store.fetch_on_demand("", ip("10.0.0.1")).await.unwrap();
    assert!(matches!(found, Some(Address::Workload(w)) if w.name == "web-1"));
    let found = store.fetch_name(SVC).await.unwrap();
    assert!(matches!(found, Some(Address::Service(_))));
    assert_eq!(store.fetch_on_demand("", ip("10.9.9.9")).await, Ok(None));
    // The negative answer is remembered while subscribed.
    assert_eq!(store.fetch_on_demand("", ip("10.9.9.9")).await, Ok(None));
    assert_eq!(store.demanded_names(), ["/10.0.0.1", "/10.9.9.9", SVC]);
    // A later push of that address clears the negative entry.
    store.apply(StoreUpdate {
        addresses: vec![Address::Workload(workload("late", &["10.9.9.9"], &[]))],
        ..Default::default()
    });
    assert!(
        store
            .fetch_on_demand("", ip("10.9.9.9"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn fetch_on_demand_is_bounded() {
    let store = demand_store(true);
    let err = store.fetch_on_demand("", ip("10.0.0.1")).await.unwrap_err();
    assert!(matches!(err, FetchError::Timeout { ref name, .. } if name == "/10.0.0.1"));
    // Without a demander (wildcard mode) a miss is an immediate negative.
    let wildcard = Store::new();
    assert_eq!(wildcard.fetch_on_demand("", ip("10.0.0.1")).await, Ok(None));
}

#[tokio::test]
async fn rejected_resource_answers_waiters_negatively() {
    let store = demand_store(true);
    let s2 = store.clone();
    let waiter = tokio::spawn(async move { s2.fetch_on_demand("", ip("10.0.0.1")).await });
    // Demand registration does not bump the generation: poll for it.
    for _ in 0..200 {
        if !store.demanded_names().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.demanded_names(), ["/10.0.0.1"]);
    store.apply(StoreUpdate {
        rejected_addresses: vec!["Kubernetes//Pod/default/x".into(), "/10.0.0.1".into()],
        ..Default::default()
    });
    assert_eq!(waiter.await.unwrap(), Ok(None));
}

#[tokio::test]
async fn idle_demands_are_dropped_with_what_only_they_brought() {
    let store = demand_store(false);
    let web1 = workload("web-1", &["10.0.0.1"], &[SVC]);
    let web2 = workload("web-2", &["10.0.0.2"], &[SVC]);
    // web-1 is asked for by IP, then its service, which arrives with its
    // endpoints (as meshd sends them).
    assert!(
        store
            .fetch_on_demand("", ip("10.0.0.1"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.fetch_name(SVC).await.unwrap().is_some());
    store.apply(StoreUpdate {
        addresses: vec![
            Address::Workload(web1.clone()),
            Address::Workload(web2.clone()),
        ],
        ..Default::default()
    });
    tokio::time::sleep(Duration::from_millis(120)).await;
    // Traffic to web-1's IP keeps that name fresh; the service is idle.
    assert!(store.lookup_address("", ip("10.0.0.1")).is_some());
    assert_eq!(store.idle_demands(Duration::from_millis(100)), [SVC]);
    // A wildcard-style lookup of something not demanded changes nothing.
    assert!(store.workload_by_ip("", ip("10.0.0.2")).is_some());
    assert_eq!(store.idle_demands(Duration::from_millis(100)), [SVC]);

    let gen_before = store.generation();
    let removed = store.drop_demands(&[SVC.to_string()], &["/10.0.0.1".to_string()]);
    // web-1 stays (still demanded by IP); the service and web-2 go.
    assert_eq!(removed, [web2.uid.clone(), SVC.to_string()]);
    assert!(store.generation() > gen_before);
    assert!(store.workload_by_uid(&web1.uid).is_some());
    assert!(store.workload_by_uid(&web2.uid).is_none());
    assert!(store.lookup_name(SVC).is_none());
    assert_eq!(store.demanded_names(), ["/10.0.0.1"]);
    assert!(store.idle_demands(Duration::from_millis(100)).is_empty());
    // With a zero timeout, anything not used this very millisecond is idle.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.idle_demands(Duration::ZERO), ["/10.0.0.1"]);
}

#[test]
fn services_by_host_spans_namespaces_and_forgets_removed_ones() {
    let store = Store::new();
    let mut other = proto_service("web", "10.96.0.2");
    other.namespace = "other".into();
    let other = Arc::new(convert::service(&other).unwrap());
    store.apply(StoreUpdate {
        addresses: vec![
            Address::Service(service("web", "10.96.0.1")),
            Address::Service(other),
        ],
        ..Default::default()
    });
    let host = "web.default.svc.cluster.local";
    let found: Vec<String> = store
        .services_by_host(host)
        .iter()
        .map(|s| s.key())
        .collect();
    assert_eq!(found, [format!("default/{host}"), format!("other/{host}")]);
    store.apply(StoreUpdate {
        removed_addresses: vec![format!("default/{host}")],
        ..Default::default()
    });
    assert_eq!(store.services_by_host(host).len(), 1);
    store.apply(StoreUpdate {
        removed_addresses: vec![format!("other/{host}")],
        ..Default::default()
    });
    assert!(store.services_by_host(host).is_empty());
    assert!(!store.on_demand());
}
