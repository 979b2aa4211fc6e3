use std::collections::BTreeMap;

use super::*;
use crate::state::{
    HealthStatus, LoadBalancing, Locality, NamespacedHostname, NetworkAddr, NetworkMode,
    StoreUpdate, WorkloadType,
};

fn wl(name: &str, ip: &str, hbone: bool) -> Workload {
    Workload {
        uid: format!("c//Pod/ns/{name}"),
        name: name.into(),
        namespace: "ns".into(),
        service_account: format!("sa-{name}"),
        trust_domain: "cluster.local".into(),
        addresses: vec![ip.parse().unwrap()],
        hostname: String::new(),
        network: String::new(),
        protocol: if hbone {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        waypoint: None,
        network_gateway: None,
        node: "node-1".into(),
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        workload_name: name.into(),
        workload_type: WorkloadType::Deployment,
        cluster_id: "c".into(),
        network_mode: NetworkMode::Standard,
        services: BTreeMap::new(),
        authorization_policies: vec![],
        status: HealthStatus::Healthy,
        locality: None,
    }
}

fn backs(mut w: Workload, svc: &str, port: u16, target: u16) -> Workload {
    w.services
        .entry(format!("ns/{svc}"))
        .or_default()
        .insert(port, target);
    w
}

fn svc(host: &str, vip: &str, ports: &[(u16, u16)]) -> Service {
    Service {
        name: host.split('.').next().unwrap().into(),
        namespace: "ns".into(),
        hostname: host.into(),
        vips: vec![NetworkAddr::new("", vip.parse().unwrap())],
        ports: ports.iter().copied().collect(),
        subject_alt_names: vec![],
        waypoint: None,
        load_balancing: None,
    }
}

fn store(workloads: Vec<Workload>, services: Vec<Service>) -> Store {
    let s = Store::new();
    let mut u = StoreUpdate::default();
    u.addresses.extend(
        workloads
            .into_iter()
            .map(|w| Address::Workload(Arc::new(w))),
    );
    u.addresses
        .extend(services.into_iter().map(|s| Address::Service(Arc::new(s))));
    s.apply(u);
    s
}

fn go(s: &Store, src: Option<&Workload>, dst: &str) -> Result<Upstream, RouteError> {
    resolve(s, "", src, dst.parse().unwrap(), 15008)
}

#[test]
fn unknown_destination_is_passthrough() {
    let s = store(vec![], vec![]);
    match go(&s, None, "192.0.2.1:443").unwrap() {
        Upstream::Passthrough {
            addr,
            workload,
            service,
        } => {
            assert_eq!(addr, "192.0.2.1:443".parse().unwrap());
            assert!(workload.is_none() && service.is_none());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn mesh_workload_gets_hbone_with_its_identity() {
    let s = store(
        vec![wl("b", "10.0.0.2", true), wl("legacy", "10.0.0.3", false)],
        vec![],
    );
    match go(&s, None, "10.0.0.2:8080").unwrap() {
        Upstream::Hbone {
            connect_to,
            authority,
            identities,
            via_waypoint,
            ..
        } => {
            assert_eq!(connect_to, "10.0.0.2:15008".parse().unwrap());
            assert_eq!(authority, "10.0.0.2:8080".parse().unwrap());
            assert_eq!(
                identities[0].to_string(),
                "spiffe://cluster.local/ns/ns/sa/sa-b"
            );
            assert!(!via_waypoint);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        go(&s, None, "10.0.0.3:80").unwrap(),
        Upstream::Passthrough {
            workload: Some(_),
            ..
        }
    ));
}

#[test]
fn service_vip_maps_port_and_adds_sans() {
    let b = backs(wl("b", "10.0.0.2", true), "b.ns.svc", 80, 8080);
    let mut sv = svc("b.ns.svc", "10.96.0.10", &[(80, 8080)]);
    sv.subject_alt_names = vec![
        "spiffe://cluster.local/ns/ns/sa/other".into(),
        "dns-name".into(),
    ];
    let s = store(vec![b], vec![sv]);
    match go(&s, None, "10.96.0.10:80").unwrap() {
        Upstream::Hbone {
            connect_to,
            authority,
            identities,
            service,
            ..
        } => {
            assert_eq!(connect_to, "10.0.0.2:15008".parse().unwrap());
            assert_eq!(authority, "10.0.0.2:8080".parse().unwrap());
            let ids: Vec<String> = identities.iter().map(|i| i.to_string()).collect();
            assert_eq!(
                ids,
                [
                    "spiffe://cluster.local/ns/ns/sa/sa-b",
                    "spiffe://cluster.local/ns/ns/sa/other"
                ]
            );
            assert_eq!(service.unwrap().hostname, "b.ns.svc");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        go(&s, None, "10.96.0.10:81").unwrap_err(),
        RouteError::NoServicePort {
            service: "ns/b.ns.svc".into(),
            port: 81
        }
    );
}

#[test]
fn named_target_ports_come_from_the_endpoint() {
    // Service target 0 (named port): each endpoint says its own port;
    // endpoints without it are skipped.
    let b1 = backs(wl("b1", "10.0.0.2", false), "b.ns.svc", 80, 9001);
    let b2 = backs(wl("b2", "10.0.0.3", false), "b.ns.svc", 81, 9002);
    let s = store(
        vec![b1, b2],
        vec![svc("b.ns.svc", "10.96.0.10", &[(80, 0), (81, 0)])],
    );
    for _ in 0..20 {
        match go(&s, None, "10.96.0.10:80").unwrap() {
            Upstream::Passthrough { addr, .. } => {
                assert_eq!(addr, "10.0.0.2:9001".parse().unwrap())
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn unhealthy_endpoints_are_skipped_unless_allowed() {
    let mut sick = backs(wl("sick", "10.0.0.2", true), "b.ns.svc", 80, 80);
    sick.status = HealthStatus::Unhealthy;
    let s = store(
        vec![sick.clone()],
        vec![svc("b.ns.svc", "10.96.0.10", &[(80, 80)])],
    );
    assert!(matches!(
        go(&s, None, "10.96.0.10:80"),
        Err(RouteError::NoEndpoint { .. })
    ));
    let mut sv = svc("b.ns.svc", "10.96.0.10", &[(80, 80)]);
    sv.load_balancing = Some(LoadBalancing {
        routing_preference: vec![],
        mode: "UNSPECIFIED_MODE".into(),
        health_policy: "ALLOW_ALL".into(),
    });
    let s = store(vec![sick], vec![sv]);
    assert!(go(&s, None, "10.96.0.10:80").is_ok());
}

fn zoned(name: &str, ip: &str, zone: &str) -> Workload {
    let mut w = backs(wl(name, ip, false), "b.ns.svc", 80, 80);
    w.locality = Some(Locality {
        region: "r".into(),
        zone: zone.into(),
        subzone: String::new(),
    });
    w
}

#[test]
fn locality_failover_prefers_and_strict_requires() {
    let near = zoned("near", "10.0.0.2", "z1");
    let far = zoned("far", "10.0.0.3", "z2");
    let client = zoned("client", "10.0.0.9", "z1");
    let lb = |mode: &str| LoadBalancing {
        routing_preference: vec!["REGION".into(), "ZONE".into()],
        mode: mode.into(),
        health_policy: "ONLY_HEALTHY".into(),
    };
    let mut failover = svc("b.ns.svc", "10.96.0.10", &[(80, 80)]);
    failover.load_balancing = Some(lb("FAILOVER"));
    let s = store(vec![near.clone(), far.clone()], vec![failover.clone()]);
    for _ in 0..20 {
        let up = go(&s, Some(&client), "10.96.0.10:80").unwrap();
        assert_eq!(up.workload().unwrap().name, "near");
    }
    // Failover: with the near endpoint gone, the far one is used.
    let s = store(vec![far.clone()], vec![failover]);
    assert_eq!(
        go(&s, Some(&client), "10.96.0.10:80")
            .unwrap()
            .workload()
            .unwrap()
            .name,
        "far"
    );
    // Strict: the far one is never used.
    let mut strict = svc("b.ns.svc", "10.96.0.10", &[(80, 80)]);
    strict.load_balancing = Some(lb("STRICT"));
    let s = store(vec![far], vec![strict]);
    assert!(matches!(
        go(&s, Some(&client), "10.96.0.10:80"),
        Err(RouteError::NoEndpoint { .. })
    ));
}

#[test]
fn waypoints_are_used_for_services_and_workloads() {
    let wp = backs(
        wl("waypoint", "10.0.0.50", true),
        "waypoint.ns.svc",
        15008,
        15008,
    );
    let gw = GatewayAddress {
        destination: GatewayDestination::Hostname(NamespacedHostname {
            namespace: "ns".into(),
            hostname: "waypoint.ns.svc".into(),
        }),
        hbone_mtls_port: 15008,
    };
    let mut b = backs(wl("b", "10.0.0.2", true), "b.ns.svc", 80, 8080);
    b.waypoint = Some(gw.clone());
    let mut sv = svc("b.ns.svc", "10.96.0.10", &[(80, 8080)]);
    sv.waypoint = Some(gw);
    let s = store(
        vec![wp.clone(), b],
        vec![sv, svc("waypoint.ns.svc", "10.96.0.50", &[(15008, 15008)])],
    );
    for dst in ["10.96.0.10:80", "10.0.0.2:8080"] {
        match go(&s, None, dst).unwrap() {
            Upstream::Hbone {
                connect_to,
                authority,
                identities,
                via_waypoint,
                ..
            } => {
                assert_eq!(connect_to, "10.0.0.50:15008".parse().unwrap());
                assert_eq!(
                    authority,
                    dst.parse().unwrap(),
                    "waypoint gets the original target"
                );
                assert_eq!(
                    identities[0].to_string(),
                    "spiffe://cluster.local/ns/ns/sa/sa-waypoint"
                );
                assert!(via_waypoint);
            }
            other => panic!("{other:?}"),
        }
    }
    // The waypoint itself goes straight to the endpoint.
    match go(&s, Some(&wp), "10.96.0.10:80").unwrap() {
        Upstream::Hbone {
            connect_to,
            via_waypoint,
            ..
        } => {
            assert_eq!(connect_to, "10.0.0.2:15008".parse().unwrap());
            assert!(!via_waypoint);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_waypoint_is_an_error_not_a_bypass() {
    let mut b = wl("b", "10.0.0.2", true);
    b.waypoint = Some(GatewayAddress {
        destination: GatewayDestination::Address(NetworkAddr::new(
            "",
            "10.0.0.99".parse().unwrap(),
        )),
        hbone_mtls_port: 15008,
    });
    let s = store(vec![b], vec![]);
    assert!(matches!(
        go(&s, None, "10.0.0.2:80"),
        Err(RouteError::WaypointNotFound(_))
    ));
}
