//! A DNS message as the app (or an upstream resolver) sends it to the
//! pod proxy's DNS server: the strict query parser, then, for what it
//! accepts, the answer from a store holding a Service, a ServiceEntry and
//! a wildcard host (search-domain stripping and CNAMEs included), over UDP
//! and TCP limits. Checks that a refused message gets either no answer or
//! a header-only error with its id, that every answer reads back as a
//! response to the same question within the transport's size limit, and
//! that the response reader, the upstream-response check and the
//! resolv.conf parser take the same bytes without panicking.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use netproxy::dns::resolv::{self, ResolvConf};
use netproxy::dns::wire;
use netproxy::dns::{DnsProxy, Forwarder, Names, Transport};
use netproxy::metrics::DnsMetrics;
use netproxy::state::{Address, NetworkAddr, Service, Store, StoreUpdate};

fn service(ns: &str, host: &str, vips: &[&str]) -> Address {
    Address::Service(Arc::new(Service {
        name: "svc".into(),
        namespace: ns.into(),
        hostname: host.into(),
        vips: vips
            .iter()
            .map(|v| NetworkAddr::new("", v.parse().expect("fixture IP")))
            .collect(),
        ports: [(80, 8080)].into(),
        subject_alt_names: vec![],
        waypoint: None,
        load_balancing: None,
    }))
}

fn proxy() -> &'static DnsProxy {
    static P: OnceLock<DnsProxy> = OnceLock::new();
    P.get_or_init(|| {
        let store = Arc::new(Store::new());
        store.apply(StoreUpdate {
            addresses: vec![
                service("ns", "web.ns.svc.cluster.local", &["10.96.0.1", "fd00::1"]),
                service("ns", "api.example.com", &["240.240.0.1"]),
                service("ns", "*.wild.example", &["240.240.0.2"]),
                // Many VIPs: answers that exceed the UDP limit.
                service(
                    "ns",
                    "many.example.com",
                    &(1..=120)
                        .map(|i| format!("fd00::{i:x}"))
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>(),
                ),
            ],
            ..Default::default()
        });
        let conf = ResolvConf {
            // Never used: the target only takes the store path.
            nameservers: vec!["127.0.0.1:9".parse().expect("literal")],
            search: vec![
                "ns.svc.cluster.local".into(),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
            ndots: 5,
            timeout: Duration::from_secs(1),
            attempts: 1,
        };
        DnsProxy {
            store,
            names: Names {
                pod_namespace: "ns".into(),
                cluster_domain: "cluster.local".into(),
                search: conf.search.clone(),
                ndots: conf.ndots,
            },
            network: String::new(),
            forwarder: Forwarder::new(&conf, 0),
            demand_timeout: Duration::from_secs(1),
            metrics: DnsMetrics::default(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_response(data);
    let _ = resolv::parse(&String::from_utf8_lossy(data));
    let q = match wire::parse_query(data) {
        Ok(q) => q,
        Err(e) => {
            if let Some(err) = wire::error_answer(data, &e) {
                assert_eq!(err.len(), wire::HEADER_LEN);
                assert_eq!(err[..2], data[..2], "error answer keeps the id");
                assert!(wire::parse_response(&err).is_ok());
            }
            return;
        }
    };
    // A message that parses as a query is never accepted as its own answer.
    assert!(wire::check_response(&q, data).is_err());
    for (transport, limit) in [
        (Transport::Udp, q.udp_limit()),
        (Transport::Tcp, u16::MAX as usize),
    ] {
        let Some(answer) = proxy().answer_from_store(&q, transport) else {
            continue;
        };
        assert!(answer.len() <= limit, "{} > {limit}", answer.len());
        wire::check_response(&q, &answer).expect("answers its own question");
        let r = wire::parse_response(&answer).expect("answer reads back");
        assert_eq!(r.id, q.id);
        assert_eq!(Some(r.name.as_str()), q.name.as_deref());
    }
});
