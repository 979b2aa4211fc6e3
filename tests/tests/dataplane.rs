//! The data path end to end, as root in real network namespaces: "pods" A
//! and B (and an out-of-mesh host X) on a bridge in a "node" netns that also
//! runs a real `sidetunnel-meshd` (control plane and CA). A and B each run
//! the real `sidetunnel-proxy` (started with `ip netns exec`) behind the
//! redirection ruleset of `sidetunnel-redirect`. Apps are plain TCP sockets
//! created inside the namespaces: A's client knows nothing about the mesh.
//!
//! Checked: A → B by pod IP and by service VIP; B's app sees A's real IP;
//! mTLS with both SPIFFE identities, read from B's (and A's) metrics; a DENY
//! policy added to the inventory makes A's connections fail and is counted
//! with `response_flags="DENY"`; a destination outside the mesh is reached in
//! passthrough; SIGTERM drains (an open connection keeps working during the
//! grace period, new ones are refused, the proxy exits 0); the proxy's own
//! control-plane connections carry its mark (the ruleset has no control-plane
//! exclusion, yet captures an app's connection to the same address);
//! certificates from a 4 s-TTL CA rotate several times during one long
//! transfer with no byte lost (SHA-256 both ways); the same A → B path over
//! IPv6 (pod IP and service VIP) with B's app seeing A's IPv6 address.
//!
//! `measure_dataplane` (ignored; run with `--ignored --nocapture`, ideally
//! `--release`) prints idle RSS, single-stream throughput through two proxies
//! vs direct on the same path, and connections/s with a warm pool.

mod pods_support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pods_support::*;
use sidetunnel_tests::netns::NetNs;

#[test]
fn mesh_traffic_is_mtls_with_identities_source_ip_and_policy() {
    let Some(mesh) = Mesh::start("mesh_traffic_is_mtls_with_identities_source_ip_and_policy")
    else {
        return;
    };
    let _app = start_echo(&mesh.b, B_IP, APP_PORT);

    // By pod IP and by service VIP: B's app sees A's own address.
    for dst in [format!("{B_IP}:{APP_PORT}"), format!("{VIP}:80")] {
        let mut c = mesh.connect_expecting_source(&mesh.a, &dst, A_IP);
        echo_roundtrip(&mut c, b"hello through the mesh").unwrap();
        echo_roundtrip(&mut c, &vec![7u8; 1 << 20]).unwrap();
    }

    // Identities come from the mTLS handshake, reported by both sides.
    let labels = [
        ("source_principal", A_ID),
        ("destination_principal", B_ID),
        ("connection_security_policy", "mutual_tls"),
        ("source_workload", "a"),
        ("source_workload_namespace", "ns-a"),
        ("destination_workload", "b"),
        ("destination_app", "server"),
        ("destination_version", "v2"),
    ];
    let mut l = labels.to_vec();
    l.push(("reporter", "destination"));
    mesh.eventually_counted("b", "istio_tcp_connections_closed_total", &l, 2.0);
    let m = mesh.metrics("b");
    let received = sample(&m, "istio_tcp_received_bytes_total", &l).unwrap_or(0.0);
    assert!(
        received >= 2.0 * (1 << 20) as f64,
        "B counted {received} bytes from A\n{m}"
    );
    assert!(
        sample(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("destination_service", "b.ns-b.svc.cluster.local"),
            ]
        )
        .is_some(),
        "B labels the VIP connection with the service from `forwarded: host=`:\n{m}"
    );
    let m = mesh.metrics("a");
    let mut l = labels.to_vec();
    l.push(("reporter", "source"));
    assert!(
        sample(&m, "istio_tcp_connections_opened_total", &l).unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "istio_tcp_connections_opened_total",
            &[("destination_service", "b.ns-b.svc.cluster.local")]
        )
        .is_some(),
        "VIP connection labelled with its service:\n{m}"
    );

    // The admin socket shows the config and the certificate.
    let dump: serde_json::Value = serde_json::from_str(&mesh.admin("b", "/config_dump")).unwrap();
    assert_eq!(dump["certificates"][0]["identity"], B_ID);
    assert!(
        dump["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "b")
    );

    // A DENY policy for A's principal on B: A's connections fail and B
    // counts them with response_flags="DENY".
    mesh.set_inventory(&inventory(true, false));
    eventually("policy pushed to B", || {
        let d: serde_json::Value = serde_json::from_str(&mesh.admin("b", "/config_dump")).ok()?;
        d["policies"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "deny-a")
            .then_some(())
    });
    for dst in [format!("{B_IP}:{APP_PORT}"), format!("{VIP}:80")] {
        // The client proxy resets the app's connection once B refuses; on
        // a busy machine that can land before connect() returns.
        assert_eq!(
            reach(&mesh.a, &dst),
            None,
            "denied connection to {dst} must not reach B's app"
        );
    }
    mesh.eventually_counted(
        "b",
        "istio_tcp_connections_failed_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            ("source_principal", A_ID),
        ],
        2.0,
    );
    let m = mesh.metrics("a");
    assert!(
        sample(
            &m,
            "istio_tcp_connections_failed_total",
            &[("reporter", "source"), ("response_flags", "DENY")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "A saw the 401 as DENY:\n{m}"
    );

    // Every tunnel stream was released back to the pool (none leaked), and
    // all of A's connections shared pooled HBONE connections.
    eventually("A's HBONE streams released", || {
        let d: serde_json::Value = serde_json::from_str(&mesh.admin("a", "/config_dump")).ok()?;
        (d["hbonePool"]["activeStreams"] == 0).then_some(())
    });

    // Removing the policy restores access.
    mesh.set_inventory(&inventory(false, false));
    eventually("policy removed and traffic flowing", || {
        let mut c = connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}")).ok()?;
        greeting(&mut c)
    });
}

#[test]
fn destination_outside_the_mesh_is_passthrough() {
    let Some(mesh) = Mesh::start("destination_outside_the_mesh_is_passthrough") else {
        return;
    };
    let _ext = start_echo(&mesh.x, X_IP, EXT_PORT);
    let mut c = mesh.connect_expecting_source(&mesh.a, &format!("{X_IP}:{EXT_PORT}"), A_IP);
    echo_roundtrip(&mut c, b"plain tcp").unwrap();
    drop(c);
    let m = eventually("passthrough counted", || {
        let m = mesh.metrics("a");
        sample(
            &m,
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "unknown"),
                ("destination_workload", "unknown"),
            ],
        )
        .map(|_| m)
    });
    assert!(
        sample(
            &m,
            "istio_tcp_received_bytes_total",
            &[("connection_security_policy", "unknown")]
        )
        .unwrap()
            >= 9.0
    );
    // Plaintext into the mesh (PERMISSIVE, the default): X → B's app port is
    // TPROXY'd to B's plaintext listener and reaches the app with X's IP.
    let _app = start_echo(&mesh.b, B_IP, APP_PORT);
    let mut c = mesh.connect_expecting_source(&mesh.x, &format!("{B_IP}:{APP_PORT}"), X_IP);
    echo_roundtrip(&mut c, b"plaintext inbound").unwrap();
    drop(c);
    mesh.eventually_counted(
        "b",
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "unknown"),
            ("source_principal", "unknown"),
        ],
        0.0,
    );
    // Self-calls to the proxy's own capture ports are refused.
    if let Ok(mut c) = connect_from(&mesh.a, &format!("{A_IP}:15006")) {
        let mut buf = [0u8; 1];
        assert!(
            matches!(c.read(&mut buf), Ok(0) | Err(_)),
            "self-call must not be served"
        );
    }
}

#[test]
fn strict_mode_rejects_plaintext_except_probe_sources() {
    let test = "strict_mode_rejects_plaintext_except_probe_sources";
    let Some(mesh) = Mesh::start_with(
        test,
        &["--inbound-policy", "STRICT", "--probe-source", NODE_IP],
    ) else {
        return;
    };
    let _app = start_echo(&mesh.b, B_IP, APP_PORT);
    // Plaintext from outside the mesh: refused (reset), counted as DENY.
    let refused =
        connect_from(&mesh.x, &format!("{B_IP}:{APP_PORT}")).map(|mut c| greeting(&mut c));
    assert!(
        matches!(refused, Err(_) | Ok(None)),
        "STRICT let plaintext through: {refused:?}"
    );
    mesh.eventually_counted(
        "b",
        "istio_tcp_connections_failed_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            ("connection_security_policy", "unknown"),
        ],
        0.0,
    );
    // The probe source (the node, as kubelet) still gets through.
    let mut probe = in_ns(&mesh.node, || {
        TcpStream::connect_timeout(&format!("{B_IP}:{APP_PORT}").parse().unwrap(), IO_TIMEOUT)
    })
    .expect("probe connect");
    probe.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let peer = greeting(&mut probe).unwrap_or_else(|| panic!("probe refused\n{}", mesh.logs()));
    assert!(peer.starts_with(&format!("{NODE_IP}:")), "{peer}");
    // mTLS from A is unaffected.
    let mut c = connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}")).unwrap();
    assert!(greeting(&mut c).is_some(), "{}", mesh.logs());
}

#[test]
fn sigterm_drains_open_connections() {
    let Some(mut mesh) = Mesh::start("sigterm_drains_open_connections") else {
        return;
    };
    let _app = start_echo(&mesh.b, B_IP, APP_PORT);
    let mut open = connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}")).unwrap();
    assert!(greeting(&mut open).is_some(), "{}", mesh.logs());
    echo_roundtrip(&mut open, b"before").unwrap();

    let t0 = Instant::now();
    mesh.proxy("b").sigterm();
    // B stops being ready and stops accepting new HBONE connections...
    eventually("B unready while draining", || {
        match mesh.http_get(&format!("{B_IP}:15021"), "/healthz/ready") {
            Ok((200, _)) => None,
            _ => Some(()),
        }
    });
    // ...while the open connection keeps working inside the 4 s grace period.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "machine too slow to observe the grace period"
    );
    echo_roundtrip(&mut open, b"during the grace period")
        .expect("open connection survives the drain");
    let fresh = connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}"));
    if let Ok(mut c) = fresh {
        assert_eq!(greeting(&mut c), None, "no new connections while draining");
    }
    // After the grace period the proxy cuts the rest and exits 0.
    let code = mesh.proxy("b").wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", mesh.logs());
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "exited before the grace period ended"
    );
    let mut buf = [0u8; 16];
    let _ = open.write_all(b"after");
    assert!(
        matches!(open.read(&mut buf), Ok(0) | Err(_)),
        "connection cut after the grace period"
    );
    assert!(
        !mesh.admin_path("b").exists(),
        "admin socket removed on exit"
    );
}

#[test]
fn control_plane_connections_carry_the_mark() {
    let Some(mesh) = Mesh::start("control_plane_connections_carry_the_mark") else {
        return;
    };
    let cp = mesh.cp();
    // Both proxies are ready, so they reached xDS and the CA through their
    // own ruleset; every one of their control-plane sockets is marked.
    for name in ["a", "b"] {
        let socks = eventually("a control-plane connection", || {
            let s = sockets_to(mesh.ns(name), cp);
            (!s.is_empty()).then_some(s)
        });
        for line in &socks {
            assert!(
                line.contains(&format!("fwmark:{MARK:#x}")),
                "unmarked control-plane socket in pod {name}: {line}"
            );
        }
    }
    let captured = |ns: &NetNs| {
        let out = ns.exec_ok(&["ss", "-tnH", "state", "established", "sport", "= :15001"]);
        out.lines().filter(|l| !l.trim().is_empty()).count()
    };
    assert_eq!(captured(&mesh.a), 0, "the proxy captured its own traffic");
    // The ruleset does capture the same destination for an app: an
    // unmarked connection to the control plane lands on the proxy's
    // outbound listener.
    let app = connect_from(&mesh.a, &cp.to_string()).expect("app connect");
    eventually("the app's connection captured", || {
        (captured(&mesh.a) >= 1).then_some(())
    });
    drop(app);
}

/// A transfer through both proxies that outlives several certificates of
/// both (meshd issues 4 s certificates; the proxies renew at half-life):
/// every byte comes back (SHA-256 of what was sent equals that of what the
/// echo returned), and connections opened meanwhile work.
#[test]
fn certificates_rotate_during_a_long_transfer_without_loss() {
    let test = "certificates_rotate_during_a_long_transfer_without_loss";
    let opts = Options {
        meshd_args: vec!["--max-cert-ttl".into(), "4s".into()],
        ..Options::default()
    };
    let Some(mesh) = Mesh::start_opts(test, opts) else {
        return;
    };
    let _app = start_echo(&mesh.b, B_IP, APP_PORT);
    let first = [mesh.cert_serial("a"), mesh.cert_serial("b")];
    let mut c = connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}")).expect("connect");
    assert!(greeting(&mut c).is_some(), "{}", mesh.logs());
    let mut reader = c.try_clone().unwrap();
    const CHUNKS: usize = 120;
    const CHUNK: usize = 32 * 1024;
    let sender = std::thread::spawn(move || {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for i in 0..CHUNKS {
            let data: Vec<u8> = (0..CHUNK).map(|j| (i * 31 + j * 7) as u8).collect();
            digest.update(&data);
            c.write_all(&data).expect("write during rotation");
            std::thread::sleep(Duration::from_millis(100));
        }
        c.shutdown(Shutdown::Write).unwrap();
        digest.finish()
    });
    let receiver = std::thread::spawn(move || {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    digest.update(&buf[..n]);
                    total += n;
                }
                Err(e) => panic!("read after {total} bytes: {e}"),
            }
        }
        (total, digest.finish())
    });
    let t0 = Instant::now();
    let mut serials = [std::collections::BTreeSet::new(), Default::default()];
    let mut fresh = 0;
    while !sender.is_finished() {
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            if let Some(s) = mesh.cert_serial(name) {
                serials[i].insert(s);
            }
        }
        if t0.elapsed().as_secs() as usize / 3 >= fresh {
            fresh += 1;
            let peer = reach(&mesh.a, &format!("{B_IP}:{APP_PORT}"));
            assert!(
                peer.is_some(),
                "new connection during rotation failed\n{}",
                mesh.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let sent = sender.join().expect("sender");
    let (total, received) = receiver.join().expect("receiver");
    let elapsed = t0.elapsed();
    assert_eq!(total, CHUNKS * CHUNK, "bytes lost\n{}", mesh.logs());
    assert_eq!(sent.as_ref(), received.as_ref(), "checksum differs");
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let first = first[i].clone().expect("initial serial");
        serials[i].remove(&first);
        assert!(
            serials[i].len() >= 2,
            "proxy {name}: {} rotations in {elapsed:?}\n{}",
            serials[i].len(),
            mesh.logs()
        );
    }
    println!(
        "{} bytes in {elapsed:?} through {} (A) / {} (B) new certificates; {fresh} fresh connections",
        total,
        serials[0].len(),
        serials[1].len()
    );
}

/// The A → B mesh path over IPv6: dual-stack pods, the inventory lists both
/// families; A's app connects to B's IPv6 address and to the service's IPv6
/// VIP and B's app sees A's IPv6 address; both proxies report the mTLS
/// identities.
#[test]
fn ipv6_mesh_path_preserves_source_and_identities() {
    let opts = Options {
        inventory: inventory(false, true),
        ipv6: true,
        ..Options::default()
    };
    let Some(mesh) = Mesh::start_opts("ipv6_mesh_path_preserves_source_and_identities", opts)
    else {
        return;
    };
    let _app = start_echo(&mesh.b, "::", APP_PORT);
    for dst in [format!("[{B_IP6}]:{APP_PORT}"), format!("[{VIP6}]:80")] {
        let mut c = mesh.connect_expecting_source(&mesh.a, &dst, A_IP6);
        echo_roundtrip(&mut c, &vec![3u8; 256 * 1024]).unwrap();
    }
    let labels = [
        ("reporter", "destination"),
        ("source_principal", A_ID),
        ("destination_principal", B_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    mesh.eventually_counted("b", "istio_tcp_connections_closed_total", &labels, 2.0);
    // The IPv4 path still works next to it.
    assert!(reach(&mesh.a, &format!("{B_IP}:{APP_PORT}")).is_some());
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sends `total` bytes over `s` and waits for the sink's 8-byte count.
fn throughput(mut s: TcpStream, total: usize) -> f64 {
    let chunk = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(u64::from_be_bytes(ack) as usize, sent);
    sent as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
}

/// A sink on B: reads to EOF, answers the byte count.
fn start_sink(ns: &NetNs, port: u16) {
    let addr: SocketAddr = format!("{B_IP}:{port}").parse().unwrap();
    let l = in_ns(ns, || TcpListener::bind(addr)).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = c.write_all(&n.to_be_bytes());
            });
        }
    });
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture (ideally --release)"]
fn measure_dataplane() {
    let Some(mut mesh) = Mesh::start("measure_dataplane") else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let rss_a = rss_kib(mesh.proxy("a").pid());
    start_sink(&mesh.b, APP_PORT);
    start_sink(&mesh.b, DIRECT_PORT);
    let _ = &mesh.x;
    let total = 1 << 30;
    // Warm-up through the mesh (opens the pooled connection).
    let _ = throughput(
        connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}")).unwrap(),
        8 << 20,
    );
    let mut mesh_gbps = Vec::new();
    let mut direct_gbps = Vec::new();
    for _ in 0..3 {
        mesh_gbps.push(throughput(
            connect_from(&mesh.a, &format!("{B_IP}:{APP_PORT}")).unwrap(),
            total,
        ));
        // Direct: a marked socket (exempt from A's capture) to a port B's
        // ruleset does not capture — same veth/bridge path, no proxies.
        let addr: SocketAddr = format!("{B_IP}:{DIRECT_PORT}").parse().unwrap();
        let s = in_ns(&mesh.a, || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_mark(0x539).unwrap();
            s.connect_timeout(&addr.into(), IO_TIMEOUT).unwrap();
            TcpStream::from(s)
        });
        direct_gbps.push(throughput(s, total));
    }
    let rss_a_after = rss_kib(mesh.proxy("a").pid());

    // Connections per second through a warm pool: sequential connect,
    // 1-byte exchange via the echo app, close; 4 client threads, 5 s.
    let echo_port = 8081;
    let _echo = start_echo(&mesh.b, B_IP, echo_port);
    let _ = connect_from(&mesh.a, &format!("{B_IP}:{echo_port}")).map(|mut c| greeting(&mut c));
    let deadline = Instant::now() + Duration::from_secs(5);
    let count = std::sync::atomic::AtomicU64::new(0);
    let a = &mesh.a;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while Instant::now() < deadline {
                    let mut c = connect_from(a, &format!("{B_IP}:{echo_port}")).unwrap();
                    greeting(&mut c).expect("greeting");
                    echo_roundtrip(&mut c, b"x").unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let cps = count.load(Ordering::Relaxed) as f64 / 5.0;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!("idle RSS of proxy A: {rss_a} KiB (after traffic: {rss_a_after} KiB)");
    println!(
        "single stream A->B 1 GiB x3: through two proxies median {:.2} Gbit/s {:?}; direct median {:.2} Gbit/s {:?}",
        med(&mut mesh_gbps),
        mesh_gbps,
        med(&mut direct_gbps),
        direct_gbps
    );
    println!("connections/s with a warm pool (4 clients, 1-byte echo): {cps:.0}");
    let dump: serde_json::Value = serde_json::from_str(&mesh.admin("a", "/config_dump")).unwrap();
    println!(
        "A's HBONE pool after all of it: {} (connections proxied: {:?})",
        dump["hbonePool"],
        sample(
            &mesh.metrics("a"),
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        )
    );
}
