//! The in-pod DNS proxy with real proxies in real network namespaces
//! (tests/src/topology.rs: meshd in its default istiod mode, pods A and B
//! behind the redirection ruleset with DNS capture on, each running
//! `sidetunnel-proxy --dns-proxy true`), and a small resolver on host X
//! (10.88.0.50:53, outside the mesh) as the pods' nameserver.
//!
//! The app in pod A sends its queries to the nameserver of its resolv.conf,
//! as any stub does; the ruleset redirects them to the proxy. Checked:
//! Service hostnames answered from the proxy's state (full names and
//! search-expanded short forms, NODATA for a missing family) over UDP and
//! TCP, without the resolver seeing them; other names forwarded to the
//! resolver and its answer relayed; a ServiceEntry host the pod never
//! contacted resolved through on-demand xDS (`ns-a/api.example.com`), also
//! by glibc's own resolver honouring search and ndots; malformed,
//! truncated and oversized packets answered FORMERR or dropped, the proxy
//! serving on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netproxy::dns::wire::{self, RData, TYPE_A, TYPE_AAAA};
use sidetunnel_tests::dns::{Resolver, addresses, exchange_udp, query_tcp, query_udp};
use sidetunnel_tests::mesh::metrics;
use sidetunnel_tests::topology::{
    A_IP, B_IP, Options, Pod, PodPair, VIP, X_IP, inventory_with_addresses,
};
use sidetunnel_tests::{bins, prereq};

/// The ServiceEntry host and its VIP (meshd serves it as a Service with an
/// explicit hostname, as istiod sends a ServiceEntry over WDS).
const SE_HOST: &str = "api.example.com";
const SE_VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 1);
/// A name only the resolver knows.
const OUTSIDE_HOST: &str = "www.example.org";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
const SEARCH: &str = "ns-a.svc.cluster.local svc.cluster.local cluster.local";

fn gate(t: &str) -> bool {
    prereq::root(t) && prereq::binary(t, "ip") && prereq::binary(t, "nft")
}

fn bin_dir() -> PathBuf {
    std::env::var_os("SIDETUNNEL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(bins::dir)
}

/// The pair's inventory plus the ServiceEntry in A's namespace.
fn inventory() -> String {
    let mut s = inventory_with_addresses(&A_IP.to_string(), &B_IP.to_string(), &VIP.to_string());
    s.push_str(&format!(
        "  - name: api\n    namespace: ns-a\n    hostname: {SE_HOST}\n    vips: [{SE_VIP}]\n    ports: {{443: 443}}\n"
    ));
    s
}

fn resolv_conf() -> String {
    format!("search {SEARCH}\nnameserver {X_IP}\noptions ndots:5\n")
}

struct Setup {
    pair: PodPair,
    resolver: Resolver,
    _dir: tempfile::TempDir,
}

/// The pair with DNS capture and the proxies' DNS servers on, the
/// ServiceEntry in meshd's inventory, and the resolver on X.
fn setup(extra_args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, resolv_conf()).unwrap();
    let mut opts = Options::new(bin_dir());
    opts.outside_host = true;
    opts.dns_capture = true;
    opts.log_level = "info,netproxy::dns=debug".into();
    opts.proxy_args = vec![
        "--dns-proxy".into(),
        "true".into(),
        "--dns-resolv-conf".into(),
        resolv.display().to_string(),
    ];
    opts.proxy_args
        .extend(extra_args.iter().map(|s| s.to_string()));
    let pair = PodPair::start(opts).expect("start the pair");
    pair.set_inventory(&inventory()).unwrap();
    // meshd polls its inventory file (200 ms by default).
    std::thread::sleep(Duration::from_secs(1));
    let resolver = Resolver::start(
        pair.outside().expect("host X"),
        SocketAddr::new(X_IP.into(), 53),
        &[(OUTSIDE_HOST, OUTSIDE_IP)],
    )
    .unwrap();
    Setup {
        pair,
        resolver,
        _dir: dir,
    }
}

/// Where the app in A sends its queries: its resolv.conf's nameserver.
fn nameserver() -> SocketAddr {
    SocketAddr::new(X_IP.into(), 53)
}

fn a_udp(s: &Setup, name: &str, qtype: u16) -> wire::Response {
    s.pair
        .ns(Pod::A)
        .run(|| query_udp(nameserver(), name, qtype))
        .unwrap_or_else(|e| panic!("{name} over UDP: {e}\n{}", s.pair.logs()))
}

fn a_tcp(s: &Setup, name: &str, qtype: u16) -> wire::Response {
    s.pair
        .ns(Pod::A)
        .run(|| query_tcp(nameserver(), name, qtype))
        .unwrap_or_else(|e| panic!("{name} over TCP: {e}\n{}", s.pair.logs()))
}

fn ips(list: &[Ipv4Addr]) -> Vec<IpAddr> {
    list.iter().map(|ip| IpAddr::V4(*ip)).collect()
}

fn dns_count(s: &Setup, name: &str, labels: &[(&str, &str)]) -> f64 {
    let m = metrics::parse(&s.pair.metrics(Pod::A).unwrap());
    metrics::sum(&m, name, labels)
}

#[test]
fn dns_answers_service_names_from_state_and_forwards_other_names() {
    let t = "dns_answers_service_names_from_state_and_forwards_other_names";
    if !gate(t) {
        return;
    }
    // Wildcard: the store holds every Service once the proxy is ready.
    let s = setup(&["--xds-mode", "wildcard"]);
    let full = "b.ns-b.svc.cluster.local";
    let r = a_udp(&s, full, TYPE_A);
    assert_eq!((r.rcode, r.authoritative), (0, true), "{r:?}");
    assert_eq!(addresses(&r), ips(&[VIP]));
    assert_eq!(r.answers[0].ttl, netproxy::dns::TTL);
    // `b.ns-b` as glibc sends it first with ndots:5: CNAME to the typed name.
    let r = a_udp(&s, "b.ns-b.ns-a.svc.cluster.local", TYPE_A);
    assert_eq!(r.answers[0].data, RData::Cname("b.ns-b".into()));
    assert_eq!(addresses(&r), ips(&[VIP]));
    // No IPv6 VIP: NODATA (the name exists), not NXDOMAIN, not forwarded.
    let r = a_udp(&s, full, TYPE_AAAA);
    assert_eq!((r.rcode, r.answers.len()), (0, 0));
    // Over TCP too (captured like UDP).
    let r = a_tcp(&s, full, TYPE_A);
    assert_eq!(addresses(&r), ips(&[VIP]));
    assert_eq!(
        s.resolver.queries(),
        0,
        "mesh names must not reach the resolver"
    );

    // Outside the mesh: the resolver answers, through the proxy.
    let r = a_udp(&s, OUTSIDE_HOST, TYPE_A);
    assert_eq!(addresses(&r), ips(&[OUTSIDE_IP]));
    assert_eq!(r.answers[0].ttl, sidetunnel_tests::dns::RESOLVER_TTL);
    let r = a_udp(&s, "nope.example.org", TYPE_A);
    assert_eq!(r.rcode, 3, "NXDOMAIN relayed: {r:?}");
    let r = a_tcp(&s, OUTSIDE_HOST, TYPE_A);
    assert_eq!(addresses(&r), ips(&[OUTSIDE_IP]));
    assert_eq!(s.resolver.queries(), 3);

    let q = |transport, outcome| {
        dns_count(
            &s,
            "sidetunnel_dns_queries_total",
            &[("transport", transport), ("outcome", outcome)],
        )
    };
    assert_eq!(q("udp", "answered"), 3.0);
    assert_eq!(q("tcp", "answered"), 1.0);
    assert_eq!(q("udp", "forwarded"), 2.0);
    assert_eq!(q("tcp", "forwarded"), 1.0);
}

#[test]
fn dns_resolves_a_never_contacted_service_entry_with_on_demand_xds() {
    let t = "dns_resolves_a_never_contacted_service_entry_with_on_demand_xds";
    if !gate(t) {
        return;
    }
    // The default: on-demand xDS, meshd in istiod mode.
    let s = setup(&[]);
    let dump = s.pair.admin(Pod::A, "/config_dump").unwrap();
    assert!(!dump.contains(SE_HOST), "not held before the query");

    // The first query glibc sends for `api.example.com` with ndots:5.
    let r = a_udp(&s, &format!("{SE_HOST}.ns-a.svc.cluster.local"), TYPE_A);
    assert_eq!(r.answers[0].data, RData::Cname(SE_HOST.into()), "{r:?}");
    assert_eq!(addresses(&r), ips(&[SE_VIP]));
    let dump = s.pair.admin(Pod::A, "/config_dump").unwrap();
    assert!(
        dump.contains(&format!("\"ns-a/{SE_HOST}\"")),
        "subscribed on demand: {dump}"
    );
    // Now held: answered from state.
    let r = a_udp(&s, SE_HOST, TYPE_A);
    assert_eq!(addresses(&r), ips(&[SE_VIP]));
    // A Service on demand, by its full name.
    let r = a_tcp(&s, "b.ns-b.svc.cluster.local", TYPE_A);
    assert_eq!(addresses(&r), ips(&[VIP]));
    assert_eq!(s.resolver.queries(), 0);

    // Unknown to the control plane: asked once, then forwarded.
    let r = a_udp(&s, OUTSIDE_HOST, TYPE_A);
    assert_eq!(addresses(&r), ips(&[OUTSIDE_IP]));
    assert_eq!(s.resolver.queries(), 1);

    let found = dns_count(&s, "sidetunnel_dns_on_demand_total", &[("result", "found")]);
    let absent = dns_count(
        &s,
        "sidetunnel_dns_on_demand_total",
        &[("result", "absent")],
    );
    assert_eq!((found, absent), (2.0, 1.0));
    let q = |outcome| dns_count(&s, "sidetunnel_dns_queries_total", &[("outcome", outcome)]);
    assert_eq!(q("answered_on_demand"), 2.0);
    assert_eq!(q("answered"), 1.0);
}

/// glibc's stub resolver in pod A (`ip netns exec` bind-mounts
/// `/etc/netns/<ns>/resolv.conf` over /etc/resolv.conf): `getent` applies
/// search domains and ndots itself; the proxy answers its first expansion
/// after fetching the ServiceEntry on demand.
#[test]
fn dns_glibc_resolves_a_service_entry_through_the_proxy() {
    let t = "dns_glibc_resolves_a_service_entry_through_the_proxy";
    if !gate(t) || !prereq::binary(t, "getent") {
        return;
    }
    let s = setup(&[]);
    let etc = Path::new("/etc/netns").join(s.pair.ns(Pod::A).name());
    std::fs::create_dir_all(&etc).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Remove(etc.clone());
    std::fs::write(etc.join("resolv.conf"), resolv_conf()).unwrap();
    let out = s.pair.ns(Pod::A).exec(&["getent", "ahostsv4", SE_HOST]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&SE_VIP.to_string()),
        "getent: {text} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.pair.logs()
    );
    let out = s
        .pair
        .ns(Pod::A)
        .exec(&["getent", "ahostsv4", OUTSIDE_HOST]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&OUTSIDE_IP.to_string()));
    // Only the final, unexpanded try of the outside name reached the
    // resolver: every search expansion was answered NXDOMAIN upstream
    // too, so count at least that one.
    assert!(s.resolver.queries() >= 1);
}

#[test]
fn dns_malformed_packets_get_formerr_or_nothing_and_the_proxy_serves_on() {
    let t = "dns_malformed_packets_get_formerr_or_nothing_and_the_proxy_serves_on";
    if !gate(t) {
        return;
    }
    let s = setup(&["--xds-mode", "wildcard"]);
    let good = wire::build_query(0x4242, "b.ns-b.svc.cluster.local", TYPE_A, None).unwrap();
    let send = |raw: Vec<u8>| {
        s.pair
            .ns(Pod::A)
            .run(move || exchange_udp(nameserver(), &raw, Duration::from_millis(500)))
            .unwrap()
    };
    // Truncated question: FORMERR carrying the id.
    let r = send(good[..good.len() - 3].to_vec()).expect("an answer");
    let r = wire::parse_response(&r).unwrap();
    assert_eq!((r.id, r.rcode), (0x4242, 1));
    // Trailing garbage: FORMERR.
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    let r = wire::parse_response(&send(trailing).expect("an answer")).unwrap();
    assert_eq!(r.rcode, 1);
    // Not a whole header, a response, an oversized datagram: nothing.
    assert_eq!(send(good[..7].to_vec()), None);
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(send(resp), None);
    let mut big = good.clone();
    big.resize(netproxy::dns::MAX_QUERY + 500, 0xff);
    assert_eq!(send(big), None);
    // TCP: an oversized length prefix closes the connection.
    let closed = s.pair.ns(Pod::A).run(|| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(nameserver()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(&[0xff, 0xff]).unwrap();
        let mut b = [0u8; 1];
        matches!(c.read(&mut b), Ok(0) | Err(_))
    });
    assert!(closed);
    // Still serving, still the same process.
    let pid = s.pair.proxy_pid(Pod::A);
    let r = a_udp(&s, "b.ns-b.svc.cluster.local", TYPE_A);
    assert_eq!(addresses(&r), ips(&[VIP]));
    assert_eq!(s.pair.proxy_pid(Pod::A), pid);
    assert!(Path::new(&format!("/proc/{}", pid.unwrap())).exists());
    assert_eq!(
        dns_count(
            &s,
            "sidetunnel_dns_queries_total",
            &[("outcome", "malformed")]
        ),
        6.0
    );
    assert_eq!(s.resolver.queries(), 0);
}
