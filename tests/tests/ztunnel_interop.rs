//! HBONE on a real wire between sidetunnel and Istio's ztunnel
//! (docs/hbone-interop.md): one pod of a [`PodPair`] runs a ztunnel built
//! from upstream source ("dedicated" mode), the other `sidetunnel-proxy`,
//! both against the same meshd (xDS and CA) behind the same redirection
//! ruleset. Checked in both directions: A's plain client reaches B's app
//! with 1 MiB echoed back byte-exact, B's app sees A's own address, and
//! each side's metrics report the mTLS identities the other presented.
//!
//! Ignored by default: they need a ztunnel binary, which CI cannot have
//! (ztunnel's source is on GitHub, out of CI's reach, and is not ours to
//! vendor). Run with
//! `SIDETUNNEL_ZTUNNEL=/path/to/ztunnel cargo test -p sidetunnel-tests --test ztunnel_interop -- --ignored`.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use sidetunnel_tests::topology::{A_ID, A_IP, APP_PORT, B_ID, B_IP, Options, Pod, PodPair};
use sidetunnel_tests::{bins, load, prereq};

const WAIT: Duration = Duration::from_secs(30);
const PAYLOAD: usize = 1 << 20;

#[test]
#[ignore = "needs a ztunnel binary built from istio/ztunnel: SIDETUNNEL_ZTUNNEL=path"]
fn ztunnel_client_to_sidetunnel_server() {
    interop("ztunnel_client_to_sidetunnel_server", Pod::A);
}

#[test]
#[ignore = "needs a ztunnel binary built from istio/ztunnel: SIDETUNNEL_ZTUNNEL=path"]
fn sidetunnel_client_to_ztunnel_server() {
    interop("sidetunnel_client_to_ztunnel_server", Pod::B);
}

fn interop(test: &str, ztunnel_in: Pod) {
    let ztunnel = std::env::var_os("SIDETUNNEL_ZTUNNEL")
        .map(PathBuf::from)
        .expect("SIDETUNNEL_ZTUNNEL=<ztunnel binary built from istio/ztunnel> is not set");
    assert!(ztunnel.is_file(), "{} is not a file", ztunnel.display());
    if !(prereq::root(test) && prereq::binary(test, "ip") && prereq::binary(test, "nft")) {
        return;
    }
    let mut opts = Options::new(bins::dir());
    opts.ztunnel = Some(ztunnel);
    opts.ztunnel_only_in = Some(ztunnel_in);
    let pair = PodPair::start(opts).expect("start the pair");

    let app = SocketAddrV4::new(B_IP, APP_PORT);
    let listener = pair.ns(Pod::B).run(|| TcpListener::bind(app)).unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<SocketAddr> {
        let (mut c, peer) = listener.accept()?;
        c.set_read_timeout(Some(WAIT))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                break;
            }
            c.write_all(&buf[..n])?;
        }
        c.shutdown(Shutdown::Write)?;
        Ok(peer)
    });

    // Not a repeating pattern, so a dropped or duplicated chunk shows.
    let data: Vec<u8> = (0..PAYLOAD).map(|i| (i ^ (i >> 11)) as u8).collect();
    let mut c = pair
        .ns(Pod::A)
        .run(|| load::connect(app.into(), None))
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", pair.logs()));
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent)?;
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(PAYLOAD);
    let read = c.read_to_end(&mut back);
    writer.join().unwrap().expect("send to B's app");
    read.unwrap_or_else(|e| panic!("echo: {e}\n{}", pair.logs()));
    assert_eq!(back.len(), PAYLOAD, "echoed bytes\n{}", pair.logs());
    assert!(back == data, "the echo differs from what was sent");
    let peer = server.join().unwrap().expect("B's app");
    assert_eq!(peer.ip(), IpAddr::V4(A_IP), "B's app must see A's address");

    // Both proxies export Istio's standard TCP metrics; the identities in
    // them come from the peer's certificate.
    let mtls = [
        format!("source_principal=\"{A_ID}\""),
        format!("destination_principal=\"{B_ID}\""),
        "connection_security_policy=\"mutual_tls\"".to_string(),
    ];
    for (pod, reporter) in [(Pod::B, "destination"), (Pod::A, "source")] {
        let mut want = mtls.to_vec();
        want.push(format!("reporter=\"{reporter}\""));
        if let Err(m) = pair.wait_for_series(pod, "istio_tcp_connections_opened_total", &want, WAIT)
        {
            panic!(
                "proxy {} did not count the mTLS connection ({want:?}):\n{m}",
                pod.name()
            );
        }
    }
}
