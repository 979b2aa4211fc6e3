use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::identity::Identity;
use crate::state::{HealthStatus, NetworkMode, TunnelProtocol, Workload, WorkloadType};

fn workload(name: &str, ns: &str, sa: &str) -> Arc<Workload> {
    Arc::new(Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        trust_domain: "cluster.local".into(),
        addresses: vec![],
        hostname: String::new(),
        network: String::new(),
        protocol: TunnelProtocol::Hbone,
        waypoint: None,
        network_gateway: None,
        node: String::new(),
        canonical_name: format!("{name}-app"),
        canonical_revision: "v1".into(),
        workload_name: format!("{name}-deploy"),
        workload_type: WorkloadType::Deployment,
        cluster_id: "Kubernetes".into(),
        network_mode: NetworkMode::Standard,
        services: BTreeMap::new(),
        authorization_policies: vec![],
        status: HealthStatus::Healthy,
        locality: None,
    })
}

fn open(m: &Metrics, security: SecurityPolicy) -> ConnectionRecorder {
    let a = workload("a", "ns-a", "sa-a");
    let b = workload("b", "ns-b", "sa-b");
    m.traffic.open(ConnectionOpen {
        reporter: Reporter::Destination,
        src: "10.0.0.1:40000".parse().unwrap(),
        dst: "10.0.0.2:15008".parse().unwrap(),
        hbone_target: Some("10.0.0.2:8080".parse().unwrap()),
        source: Peer {
            identity: Some(a.identity().parse::<Identity>().unwrap()),
            workload: Some(a),
        },
        destination: Peer {
            identity: Some(b.identity().parse::<Identity>().unwrap()),
            workload: Some(b),
        },
        destination_service: None,
        security,
    })
}

/// The value of the sample whose name and labels contain all of `parts`.
fn sample(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn connection_lifecycle_counts_with_istio_names_and_labels() {
    let m = Metrics::new();
    let rec = open(&m, SecurityPolicy::MutualTls);
    rec.add_received(100);
    rec.add_sent(7);
    rec.add_received(1);
    rec.finish(ResponseFlags::None, None);
    let text = m.encode();
    let base = [
        "reporter=\"destination\"",
        "source_workload=\"a-deploy\"",
        "source_workload_namespace=\"ns-a\"",
        "source_principal=\"spiffe://cluster.local/ns/ns-a/sa/sa-a\"",
        "source_app=\"a-app\"",
        "source_version=\"v1\"",
        "destination_workload=\"b-deploy\"",
        "destination_principal=\"spiffe://cluster.local/ns/ns-b/sa/sa-b\"",
        "destination_service=\"unknown\"",
        "request_protocol=\"tcp\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &base),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &base),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &base),
        Some(101.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &base),
        Some(7.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_failed_total", &[]),
        None
    );
}

#[test]
fn failures_are_counted_with_response_flags() {
    let m = Metrics::new();
    open(&m, SecurityPolicy::MutualTls)
        .finish(ResponseFlags::AuthorizationPolicyDenied, Some(&"denied"));
    open(&m, SecurityPolicy::MutualTls).finish(ResponseFlags::ConnectionFailure, Some(&"refused"));
    let text = m.encode();
    for flag in ["DENY", "CONNECT"] {
        let f = format!("response_flags=\"{flag}\"");
        assert_eq!(
            sample(&text, "istio_tcp_connections_failed_total", &[&f]),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &[&f]),
            Some(1.0)
        );
    }
    // Both were opened under the neutral flag.
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &["response_flags=\"-\""]
        ),
        Some(2.0)
    );
}

#[test]
fn principals_are_unknown_without_mtls_and_drop_closes() {
    let m = Metrics::new();
    drop(open(&m, SecurityPolicy::Unknown));
    let text = m.encode();
    let l = [
        "source_principal=\"unknown\"",
        "destination_principal=\"unknown\"",
        "connection_security_policy=\"unknown\"",
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &l),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn xds_counters_absent_until_attached() {
    let m = Metrics::new();
    assert!(!m.encode().contains("xds"), "{}", m.encode());
}

#[test]
fn build_info_names_the_version() {
    let text = Metrics::new().encode();
    let line = format!(
        "istio_build{{component=\"sidetunnel-proxy\",tag=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&line), "no {line} in\n{text}");
}
