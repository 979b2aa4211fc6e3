//! The DNS proxy end to end on loopback (no root): the real listeners and
//! handler in front of a real store, forwarding to a small UDP/TCP
//! resolver on an ephemeral loopback port. On-demand fetches go through
//! a `Demand` that plays the control plane by applying (or refusing) the
//! asked-for service, as the xDS client would on the server's answer.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::forward::Forwarder;
use super::resolv::ResolvConf;
use super::wire::{self, RData, Rcode, TYPE_A, TYPE_AAAA, TYPE_CNAME};
use super::*;
use crate::metrics::DnsMetrics;
use crate::state::{Address, Demand, NetworkAddr, Service, Store, StoreUpdate};

const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

fn service(ns: &str, host: &str, vip: &str) -> Address {
    Address::Service(Arc::new(Service {
        name: host.split('.').next().unwrap_or(host).into(),
        namespace: ns.into(),
        hostname: host.into(),
        vips: vec![NetworkAddr::new("", vip.parse().unwrap())],
        ports: [(443, 443)].into(),
        subject_alt_names: vec![],
        waypoint: None,
        load_balancing: None,
    }))
}

/// The control plane's side of on-demand: knows `catalog`, answers
/// anything else as absent, records what was asked.
struct Catalog {
    store: std::sync::Weak<Store>,
    catalog: Vec<(String, Address)>,
    asked: Mutex<Vec<String>>,
}

impl Demand for Catalog {
    fn subscribe(&self, names: Vec<String>) {
        let Some(store) = self.store.upgrade() else {
            return;
        };
        self.asked.lock().unwrap().extend(names.iter().cloned());
        let mut update = StoreUpdate::default();
        for n in names {
            match self.catalog.iter().find(|(k, _)| *k == n) {
                Some((_, a)) => update.addresses.push(a.clone()),
                None => update.removed_addresses.push(n),
            }
        }
        store.apply(update);
    }
}

/// Answers every A query with [`UPSTREAM_ANSWER`], NXDOMAIN otherwise,
/// over UDP and TCP on the same loopback port.
async fn upstream() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let answer = |raw: &[u8]| {
        let q = wire::parse_query(raw).unwrap();
        let recs = [wire::Record {
            owner: None,
            ttl: 60,
            data: RData::A(UPSTREAM_ANSWER),
        }];
        let (rcode, recs): (_, &[wire::Record]) = match q.qtype {
            TYPE_A => (Rcode::NoError, &recs),
            _ => (Rcode::NxDomain, &[]),
        };
        wire::encode_answer(&q, rcode, false, recs, 65535).unwrap()
    };
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&answer(&buf[..n]), peer).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let len = s.read_u16().await.unwrap() as usize;
            let mut q = vec![0; len];
            s.read_exact(&mut q).await.unwrap();
            let r = answer(&q);
            s.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&r).await.unwrap();
        }
    });
    addr
}

struct Fixture {
    udp: SocketAddr,
    tcp: SocketAddr,
    metrics: DnsMetrics,
    catalog: Arc<Catalog>,
    _stop: tokio_util::sync::DropGuard,
}

async fn fixture(on_demand: bool) -> Fixture {
    let store = Arc::new(Store::new());
    store.apply(StoreUpdate {
        addresses: vec![service("ns-b", "b.ns-b.svc.cluster.local", "10.96.0.10")],
        ..Default::default()
    });
    let catalog = Arc::new(Catalog {
        store: Arc::downgrade(&store),
        catalog: vec![(
            "ns-a/api.example.com".into(),
            service("ns-a", "api.example.com", "240.240.0.1"),
        )],
        asked: Mutex::new(Vec::new()),
    });
    if on_demand {
        store.set_demand(catalog.clone());
    }
    let conf = ResolvConf {
        nameservers: vec![upstream().await],
        search: vec![
            "ns-a.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
        ndots: 5,
        timeout: Duration::from_secs(2),
        attempts: 1,
    };
    let metrics = DnsMetrics::default();
    let proxy = DnsProxy {
        store,
        names: Names {
            pod_namespace: "ns-a".into(),
            cluster_domain: "cluster.local".into(),
            search: conf.search.clone(),
            ndots: conf.ndots,
        },
        network: String::new(),
        forwarder: Forwarder::new(&conf, 0),
        demand_timeout: Duration::from_secs(1),
        metrics: metrics.clone(),
    };
    let listeners = DnsListeners::bind(0, 0).unwrap();
    let addrs = listeners.local_addrs();
    let udp = addrs[0];
    let tcp = *addrs
        .iter()
        .find(|a| a.ip() == udp.ip() && **a != udp)
        .unwrap_or(&addrs[1]);
    let stop = CancellationToken::new();
    tokio::spawn(listeners.serve(Arc::new(proxy), stop.clone()));
    Fixture {
        udp,
        tcp,
        metrics,
        catalog,
        _stop: stop.drop_guard(),
    }
}

async fn udp_exchange(to: SocketAddr, raw: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(raw, to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

async fn ask(f: &Fixture, name: &str, qtype: u16) -> wire::Response {
    let raw = wire::build_query(7, name, qtype, Some(1232)).unwrap();
    let resp = udp_exchange(f.udp, &raw).await.expect("an answer");
    wire::parse_response(&resp).unwrap()
}

fn count(m: &DnsMetrics, outcome: &'static str) -> u64 {
    m.queries
        .get_or_create(&crate::metrics::DnsQueryLabels {
            transport: "udp",
            outcome,
        })
        .get()
}

#[tokio::test]
async fn answers_mesh_names_from_the_store_and_forwards_the_rest() {
    let f = fixture(false).await;
    let r = ask(&f, "b.ns-b.svc.cluster.local", TYPE_A).await;
    assert_eq!(r.rcode, 0);
    assert!(r.authoritative);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].data, RData::A(Ipv4Addr::new(10, 96, 0, 10)));
    assert_eq!(r.answers[0].ttl, TTL);
    // A known host without an IPv6 VIP: NODATA, not forwarded.
    let r = ask(&f, "b.ns-b.svc.cluster.local", TYPE_AAAA).await;
    assert_eq!((r.rcode, r.answers.len()), (0, 0));
    // Typed as `b.ns-b`, expanded by the client's first search domain.
    let r = ask(&f, "b.ns-b.ns-a.svc.cluster.local", TYPE_A).await;
    assert_eq!(r.answers[0].data, RData::Cname("b.ns-b".into()));
    assert_eq!(r.answers[1].owner.as_deref(), Some("b.ns-b"));
    assert_eq!(count(&f.metrics, "answered"), 3);
    // Not in the mesh (and wildcard mode: no on-demand): the upstream's answer.
    let r = ask(&f, "www.example.org", TYPE_A).await;
    assert!(!r.authoritative);
    assert_eq!(r.answers[0].data, RData::A(UPSTREAM_ANSWER));
    // Other types of mesh names are forwarded too (ztunnel's rule).
    let r = ask(&f, "b.ns-b.svc.cluster.local", TYPE_CNAME).await;
    assert_eq!(r.rcode, Rcode::NxDomain as u8);
    assert_eq!(count(&f.metrics, "forwarded"), 2);
}

#[tokio::test]
async fn fetches_unknown_hosts_on_demand_once() {
    let f = fixture(true).await;
    let r = ask(&f, "api.example.com.ns-a.svc.cluster.local", TYPE_A).await;
    assert_eq!(r.answers[0].data, RData::Cname("api.example.com".into()));
    assert_eq!(r.answers[1].data, RData::A(Ipv4Addr::new(240, 240, 0, 1)));
    assert_eq!(count(&f.metrics, "answered_on_demand"), 1);
    let r = ask(&f, "api.example.com", TYPE_A).await;
    assert_eq!(r.answers[0].data, RData::A(Ipv4Addr::new(240, 240, 0, 1)));
    assert_eq!(count(&f.metrics, "answered"), 1);
    // Unknown to the control plane: asked once, then forwarded; the
    // negative answer is remembered.
    for _ in 0..2 {
        let r = ask(&f, "www.example.org", TYPE_A).await;
        assert_eq!(r.answers[0].data, RData::A(UPSTREAM_ANSWER));
    }
    assert_eq!(
        *f.catalog.asked.lock().unwrap(),
        ["ns-a/api.example.com", "ns-a/www.example.org"]
    );
}

#[tokio::test]
async fn tcp_queries_and_pipelining() {
    let f = fixture(false).await;
    let mut s = TcpStream::connect(f.tcp).await.unwrap();
    for (id, name) in [(1u16, "b.ns-b.svc.cluster.local"), (2, "www.example.org")] {
        let q = wire::build_query(id, name, TYPE_A, None).unwrap();
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
    }
    for (id, want) in [(1u16, Ipv4Addr::new(10, 96, 0, 10)), (2, UPSTREAM_ANSWER)] {
        let len = s.read_u16().await.unwrap() as usize;
        let mut buf = vec![0; len];
        s.read_exact(&mut buf).await.unwrap();
        let r = wire::parse_response(&buf).unwrap();
        assert_eq!(r.id, id);
        assert_eq!(r.answers.last().unwrap().data, RData::A(want));
    }
    // An oversized length closes the connection.
    s.write_all(&((MAX_QUERY + 1) as u16).to_be_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn bad_input_gets_formerr_or_nothing_and_the_server_lives_on() {
    let f = fixture(false).await;
    let good = wire::build_query(9, "b.ns-b.svc.cluster.local", TYPE_A, None).unwrap();
    // Truncated after the header: FORMERR with the id.
    let r = udp_exchange(f.udp, &good[..20]).await.unwrap();
    let r = wire::parse_response(&r).unwrap();
    assert_eq!((r.id, r.rcode), (9, Rcode::FormErr as u8));
    // Shorter than a header, or a response: no answer.
    assert_eq!(udp_exchange(f.udp, &good[..5]).await, None);
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(udp_exchange(f.udp, &resp).await, None);
    // Oversized datagram: dropped.
    let mut big = good.clone();
    big.resize(MAX_QUERY + 100, 0);
    assert_eq!(udp_exchange(f.udp, &big).await, None);
    assert_eq!(count(&f.metrics, "malformed"), 4);
    let r = ask(&f, "b.ns-b.svc.cluster.local", TYPE_A).await;
    assert_eq!(r.answers.len(), 1);
}

#[tokio::test]
async fn upstream_down_is_servfail() {
    // A socket that never answers.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let conf = ResolvConf {
        nameservers: vec![dead.local_addr().unwrap()],
        search: vec![],
        ndots: 1,
        timeout: Duration::from_millis(200),
        attempts: 2,
    };
    let metrics = DnsMetrics::default();
    let proxy = DnsProxy {
        store: Arc::new(Store::new()),
        names: Names {
            pod_namespace: "ns-a".into(),
            cluster_domain: "cluster.local".into(),
            search: vec![],
            ndots: 1,
        },
        network: String::new(),
        forwarder: Forwarder::new(&conf, 0),
        demand_timeout: Duration::from_secs(1),
        metrics: metrics.clone(),
    };
    let raw = wire::build_query(3, "www.example.org", TYPE_A, None).unwrap();
    let out = proxy.handle(&raw, Transport::Udp).await.unwrap();
    let r = wire::parse_response(&out).unwrap();
    assert_eq!((r.id, r.rcode), (3, Rcode::ServFail as u8));
    assert_eq!(count(&metrics, "upstream_failed"), 1);
}

#[tokio::test]
async fn a_second_proxy_can_bind_the_dns_port_during_a_handover() {
    let port = DnsListeners::bind(0, 0).unwrap().local_addrs()[0].port();
    let old = DnsListeners::bind(port, 0).unwrap();
    let new = DnsListeners::bind(port, 0).expect("SO_REUSEPORT lets both bind");
    assert_eq!(old.local_addrs()[0].port(), new.local_addrs()[0].port());
}
