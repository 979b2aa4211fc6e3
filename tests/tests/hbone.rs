//! HBONE end to end on loopback with real TLS and real HTTP/2: a test CA
//! made with rcgen, the proxy's HBONE server and pooled client.
//!
//! Covers: round trips with half-close both ways, pooling and the per
//! connection stream cap, idle release, identity checks in both directions
//! (wrong SAN, foreign trust domain, untrusted root), per-stream error
//! answers (400/401/503) that leave other streams on the same connection
//! alone, and certificate rotation applying to new connections.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use netproxy::cert_source::{CaClientConfig, CertSource};
use netproxy::hbone::{
    ConnectRequest, H2Config, HboneError, HboneStream, InboundRequest, Pool, TcpSocketFactory,
};
use netproxy::identity::{CertificateManager, Identity, WorkloadCertificate};
use netproxy::tls::HboneAcceptor;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

/// A mesh CA.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::OrganizationName, name);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn root_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A workload leaf as Istio's CA issues it: one URI SAN, server+client
    /// auth (rcgen's default validity window).
    fn leaf_pem(&self, uri: &str) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn workload(&self, uri: &str) -> WorkloadCertificate {
        self.workload_with_roots(uri, &self.root_pem())
    }

    fn workload_with_roots(&self, uri: &str, roots: &str) -> WorkloadCertificate {
        let (cert, key) = self.leaf_pem(uri);
        WorkloadCertificate::from_pem(cert.as_bytes(), key.as_bytes(), roots.as_bytes()).unwrap()
    }

    fn manager(&self, uri: &str) -> CertificateManager {
        CertificateManager::with_certificate(self.workload(uri)).unwrap()
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/client-ns/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/server-ns/sa/server";

/// Runs a test's body, failing the test when it takes longer than `limit`
/// (a hang fails, it does not block the run).
async fn within(limit: Duration, body: impl std::future::Future<Output = ()>) {
    timeout(limit, body).await.expect("test timed out")
}

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// What the test server's handler saw for one request.
#[derive(Debug)]
struct Seen {
    peer: Identity,
    destination: SocketAddr,
    forwarded_for: Option<std::net::IpAddr>,
    traceparent: Option<String>,
    baggage: Option<String>,
}

/// An HBONE server on loopback: authorizes by destination port, connects to
/// the destination, answers 503 when that fails.
struct TestServer {
    addr: SocketAddr,
    tcp_accepts: Arc<AtomicUsize>,
    handshake_failures: Arc<AtomicUsize>,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_server(certs: CertificateManager, denied_ports: HashSet<u16>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = HboneAcceptor::new(certs, vec![]).unwrap();
    let tcp_accepts = Arc::new(AtomicUsize::new(0));
    let handshake_failures = Arc::new(AtomicUsize::new(0));
    let (tx, seen) = mpsc::unbounded_channel();
    let denied = Arc::new(denied_ports);
    let (accepts, failures) = (tcp_accepts.clone(), handshake_failures.clone());
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            accepts.fetch_add(1, Ordering::SeqCst);
            let (acceptor, tx, denied, failures) = (
                acceptor.clone(),
                tx.clone(),
                denied.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let (tls, peer) = match acceptor.accept(tcp).await {
                    Ok(x) => x,
                    Err(_) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let cfg = H2Config::default();
                let handler = move |req: InboundRequest| {
                    let (tx, denied) = (tx.clone(), denied.clone());
                    async move {
                        let _ = tx.send(Seen {
                            peer: req.peer_identity().clone(),
                            destination: req.destination(),
                            forwarded_for: req.forwarded_for(),
                            traceparent: req.traceparent().map(str::to_owned),
                            baggage: req
                                .headers()
                                .get("baggage")
                                .map(|v| v.to_str().unwrap().to_owned()),
                        });
                        if denied.contains(&req.destination().port()) {
                            return req.reject(http::StatusCode::UNAUTHORIZED);
                        }
                        match TcpStream::connect(req.destination()).await {
                            Ok(mut upstream) => {
                                let _ = req.accept_and_splice(&mut upstream, None).await;
                            }
                            Err(_) => req.reject(http::StatusCode::SERVICE_UNAVAILABLE),
                        }
                    }
                };
                let _ = netproxy::hbone::serve_connection(
                    tls,
                    peer,
                    &cfg,
                    std::future::pending(),
                    handler,
                )
                .await;
            });
        }
    });
    TestServer {
        addr,
        tcp_accepts,
        handshake_failures,
        seen,
        task,
    }
}

/// A loopback listener on a fresh port that runs `handle` on every
/// accepted connection, each in its own task; the listener's address.
async fn serve_loopback<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(handle(s));
        }
    });
    addr
}

/// An upstream app: reads to EOF, then echoes everything back and closes.
async fn start_echo() -> SocketAddr {
    serve_loopback(|mut s| async move {
        let mut buf = Vec::new();
        if s.read_to_end(&mut buf).await.is_ok() {
            let _ = s.write_all(&buf).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// The set-up most tests share: a `cluster.local` CA, an HBONE server
/// presenting `server_id` that denies no port, an echo upstream, and a
/// client pool with [`CLIENT`]'s certificate and the default settings.
struct Fixture {
    ca: TestCa,
    /// The server's certificates (shared with the running server).
    server_certs: CertificateManager,
    server: TestServer,
    echo: SocketAddr,
    pool: Pool,
}

async fn fixture(server_id: &str) -> Fixture {
    let ca = TestCa::new("cluster.local");
    let server_certs = ca.manager(server_id);
    let server = start_server(server_certs.clone(), HashSet::new()).await;
    let echo = start_echo().await;
    let pool = pool(ca.manager(CLIENT), H2Config::default());
    Fixture {
        ca,
        server_certs,
        server,
        echo,
        pool,
    }
}

/// A port on which nothing listens.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn pool(certs: CertificateManager, cfg: H2Config) -> Pool {
    Pool::new(cfg, certs, Arc::new(TcpSocketFactory))
}

fn source() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Opens a tunnel from [`source`] to `dest` through the HBONE server at
/// `server`, which must present [`SERVER`]'s identity.
async fn tunnel(
    pool: &Pool,
    server: SocketAddr,
    dest: SocketAddr,
) -> Result<(HboneStream, Identity), HboneError> {
    pool.connect(server, &[id(SERVER)], &ConnectRequest::new(dest, source()))
        .await
}

/// Half-closes `s` and reads what the peer still sends until EOF.
async fn finish(s: &mut HboneStream) -> Vec<u8> {
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    rest
}

/// Sends `data`, half-closes, reads the echo to EOF.
async fn round_trip(pool: &Pool, server: SocketAddr, dest: SocketAddr, data: &[u8]) -> Vec<u8> {
    let (mut stream, peer) = tunnel(pool, server, dest).await.expect("HBONE connect");
    assert_eq!(peer, id(SERVER));
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(write, read);
    back
}

/// A bare HTTP/2 server that answers a CONNECT with 200 only once the
/// stream's first DATA has arrived, then echoes that DATA and ends the
/// stream: a client that waits for the 200 before sending never gets it.
async fn start_answer_after_data(certs: CertificateManager) -> SocketAddr {
    let acceptor = HboneAcceptor::new(certs, vec![]).unwrap();
    serve_loopback(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let Ok((tls, _)) = acceptor.accept(tcp).await else {
                return;
            };
            let mut conn = h2::server::handshake(tls).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let Some(Ok(first)) = body.data().await else {
                        return;
                    };
                    let _ = body.flow_control().release_capacity(first.len());
                    let mut send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    send.send_data(first, true).unwrap();
                });
            }
        }
    })
    .await
}

/// The outbound proxy's new-connection fast path: bytes the app wrote
/// before the tunnel exists leave with the CONNECT headers, not a round
/// trip later.
#[tokio::test]
async fn first_data_travels_with_the_connect_headers() {
    within(T, async {
        let ca = TestCa::new("cluster.local");
        let server = start_answer_after_data(ca.manager(SERVER)).await;
        let pool = pool(ca.manager(CLIENT), H2Config::default());
        let req = ConnectRequest::new("127.0.0.1:8080".parse().unwrap(), source());
        let first = Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n");
        let (mut stream, peer) = pool
            .connect_with_data(server, &[id(SERVER)], &req, first.clone())
            .await
            .expect("answered once the first data arrived");
        assert_eq!(peer, id(SERVER));
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, first, "the server echoes what came with the headers");

        // Without first data the same server never answers: the check
        // above depends on the data leaving before the response.
        let waiting = timeout(
            Duration::from_millis(300),
            pool.connect(server, &[id(SERVER)], &req),
        )
        .await;
        assert!(waiting.is_err(), "answered without data: {waiting:?}");
    })
    .await;
}

#[tokio::test]
async fn round_trip_with_half_close_and_headers() {
    within(T, async {
        let mut fx = fixture(SERVER).await;
        // 3 MiB: more than the default 64 KiB windows, less than ours.
        let data = pattern(3 * 1024 * 1024 + 7, 1);
        let back = round_trip(&fx.pool, fx.server.addr, fx.echo, &data).await;
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");

        let seen = fx.server.seen.recv().await.unwrap();
        assert_eq!(seen.peer, id(CLIENT));
        assert_eq!(seen.destination, fx.echo);
        assert_eq!(seen.forwarded_for, Some(source().ip()));
        let tp = seen.traceparent.expect("traceparent sent");
        assert_eq!(tp.len(), 55, "{tp}");
        assert_eq!(seen.baggage, None);

        // Baggage and an IPv6-looking source pass through.
        let mut req = ConnectRequest::new(fx.echo, "[fd00::7]:1234".parse().unwrap());
        req.baggage = Some("k8s.namespace.name=client-ns".into());
        let (mut s, _) = fx
            .pool
            .connect(fx.server.addr, &[id(SERVER)], &req)
            .await
            .unwrap();
        let rest = finish(&mut s).await;
        assert!(rest.is_empty());
        let seen = fx.server.seen.recv().await.unwrap();
        assert_eq!(seen.forwarded_for, Some("fd00::7".parse().unwrap()));
        assert_eq!(
            seen.baggage.as_deref(),
            Some("k8s.namespace.name=client-ns")
        );
    })
    .await;
}

#[tokio::test]
async fn streams_share_pooled_connections_up_to_the_cap() {
    within(T, async {
        let fx = fixture(SERVER).await;
        // 20 concurrent tunnels, one connection.
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let (pool, addr, echo) = (fx.pool.clone(), fx.server.addr, fx.echo);
            tasks.push(tokio::spawn(async move {
                let data = pattern(100_000 + i as usize, i);
                let back = round_trip(&pool, addr, echo, &data).await;
                assert!(back == data, "stream {i} corrupted");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(fx.pool.stats().connections_opened, 1);
        assert_eq!(fx.server.tcp_accepts.load(Ordering::SeqCst), 1);

        // Cap of 2 streams per connection: 5 open tunnels need 3 connections.
        let capped = self::pool(
            fx.ca.manager(CLIENT),
            H2Config {
                max_streams_per_conn: 2,
                ..H2Config::default()
            },
        );
        let mut open = Vec::new();
        for _ in 0..5 {
            open.push(tunnel(&capped, fx.server.addr, fx.echo).await.unwrap().0);
        }
        let stats = capped.stats();
        assert_eq!(stats.connections_opened, 3);
        assert_eq!(stats.open_connections, 3);
        assert_eq!(stats.active_streams, 5);
        drop(open);
        assert_eq!(capped.stats().active_streams, 0);
        assert_eq!(fx.server.tcp_accepts.load(Ordering::SeqCst), 4);
    })
    .await;
}

#[tokio::test]
async fn idle_connections_are_released() {
    within(T, async {
        let fx = fixture(SERVER).await;
        let pool = pool(
            fx.ca.manager(CLIENT),
            H2Config {
                idle_timeout: Duration::from_millis(300),
                ..H2Config::default()
            },
        );
        let back = round_trip(&pool, fx.server.addr, fx.echo, b"hello").await;
        assert_eq!(back, b"hello");
        // Released after the idle timeout…
        while pool.stats().open_connections != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // …and a new request opens a fresh connection.
        assert_eq!(
            round_trip(&pool, fx.server.addr, fx.echo, b"again").await,
            b"again"
        );
        assert_eq!(pool.stats().connections_opened, 2);
        assert_eq!(fx.server.tcp_accepts.load(Ordering::SeqCst), 2);
    })
    .await;
}

fn handshake_message(e: &HboneError) -> String {
    match e {
        HboneError::Tls(t) => format!("{t}: {:?}", std::error::Error::source(t)),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn client_refuses_server_with_unexpected_identity() {
    // The server presents a valid mesh certificate, but not the identity
    // the client expects for this destination.
    let wrong = "spiffe://cluster.local/ns/server-ns/sa/impostor";
    within(T, async {
        let mut fx = fixture(wrong).await;
        let err = tunnel(&fx.pool, fx.server.addr, fx.echo).await.unwrap_err();
        let msg = handshake_message(&err);
        assert!(msg.contains("not the expected"), "{msg}");
        // Any of several expected identities (service SANs) is accepted.
        let (s, peer) = fx
            .pool
            .connect(
                fx.server.addr,
                &[id(SERVER), id(wrong)],
                &ConnectRequest::new(fx.echo, source()),
            )
            .await
            .unwrap();
        assert_eq!(peer, id(wrong));
        drop(s);
        assert_eq!(fx.server.seen.recv().await.unwrap().peer, id(CLIENT));
    })
    .await;
}

#[tokio::test]
async fn server_refuses_foreign_trust_domain_and_untrusted_roots() {
    within(T, async {
        let mut fx = fixture(SERVER).await;
        // Same root, other trust domain.
        let foreign = pool(
            fx.ca
                .manager("spiffe://other.domain/ns/client-ns/sa/client"),
            H2Config::default(),
        );
        let r = tunnel(&foreign, fx.server.addr, fx.echo).await;
        assert!(r.is_err(), "foreign trust domain was accepted");

        // Right trust domain, but signed by a CA the server does not trust.
        let rogue = TestCa::new("rogue");
        let rogue_client = CertificateManager::with_certificate(
            rogue.workload_with_roots(CLIENT, &fx.ca.root_pem()),
        )
        .unwrap();
        let r = tunnel(
            &pool(rogue_client, H2Config::default()),
            fx.server.addr,
            fx.echo,
        )
        .await;
        assert!(r.is_err(), "untrusted client chain was accepted");

        // Both were stopped in the handshake: the handler never ran.
        while fx.server.handshake_failures.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fx.server.seen.try_recv().is_err());
    })
    .await;
}

#[tokio::test]
async fn per_stream_errors_do_not_disturb_other_streams() {
    within(T, async {
        let ca = TestCa::new("cluster.local");
        let echo = start_echo().await;
        let denied = closed_port().await;
        let refused = closed_port().await;
        let server = start_server(ca.manager(SERVER), HashSet::from([denied.port()])).await;
        let pool = pool(ca.manager(CLIENT), H2Config::default());

        // A long-lived tunnel, open across all the failures below.
        let (mut live, _) = tunnel(&pool, server.addr, echo).await.unwrap();
        live.write_all(b"before ").await.unwrap();

        // Denied by the handler → 401; upstream refused → 503.
        let status = |r: Result<_, HboneError>| r.err().and_then(|e| e.status());
        let r = tunnel(&pool, server.addr, denied).await;
        assert_eq!(status(r), Some(http::StatusCode::UNAUTHORIZED));
        let r = tunnel(&pool, server.addr, refused).await;
        assert_eq!(status(r), Some(http::StatusCode::SERVICE_UNAVAILABLE));

        // Malformed requests on a raw HTTP/2 connection → 400 each, while a
        // CONNECT on the same connection keeps working.
        let certs = ca.manager(CLIENT);
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (tls, _) = netproxy::tls::hbone_connect(&certs, &[id(SERVER)], tcp)
            .await
            .unwrap();
        let (h2, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        let connect = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(echo.to_string())
            .body(())
            .unwrap();
        let (resp, mut good) = h2.send_request(connect, false).unwrap();
        let good_resp = resp.await.unwrap();
        assert_eq!(good_resp.status(), http::StatusCode::OK);
        let bad_requests = [
            http::Request::builder()
                .method(http::Method::GET)
                .uri(format!("http://{echo}/"))
                .body(())
                .unwrap(),
            http::Request::builder()
                .method(http::Method::CONNECT)
                .uri("example.com:80")
                .body(())
                .unwrap(),
        ];
        for bad in bad_requests {
            let mut h2 = h2.clone().ready().await.unwrap();
            let (resp, _) = h2.send_request(bad, true).unwrap();
            assert_eq!(resp.await.unwrap().status(), http::StatusCode::BAD_REQUEST);
        }
        good.send_data(Bytes::from_static(b"raw stream"), true)
            .unwrap();
        let mut body = good_resp.into_body();
        let mut echoed = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            echoed.extend_from_slice(&chunk);
        }
        assert_eq!(echoed, b"raw stream");

        // The long-lived tunnel is unaffected.
        live.write_all(b"after").await.unwrap();
        let back = finish(&mut live).await;
        assert_eq!(back, b"before after");
        assert_eq!(pool.stats().connections_opened, 1);
    })
    .await;
}

#[tokio::test]
async fn rotated_certificate_applies_to_new_connections() {
    within(T, async {
        let fx = fixture(SERVER).await;
        let client_certs = fx.ca.manager(CLIENT);

        let serial_seen = |certs: CertificateManager| async move {
            let tcp = TcpStream::connect(fx.server.addr).await.unwrap();
            let (tls, _) = netproxy::tls::hbone_connect(&certs, &[id(SERVER)], tcp)
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].clone()
        };
        let before = serial_seen(client_certs.clone()).await;
        assert_eq!(before, fx.server_certs.current().unwrap().chain()[0]);

        // An open tunnel across the rotation keeps working.
        let pool = pool(client_certs.clone(), H2Config::default());
        let (mut live, _) = tunnel(&pool, fx.server.addr, fx.echo).await.unwrap();
        live.write_all(b"x").await.unwrap();

        fx.server_certs.install(fx.ca.workload(SERVER)).unwrap();
        let after = serial_seen(client_certs).await;
        assert_ne!(before, after);
        assert_eq!(after, fx.server_certs.current().unwrap().chain()[0]);

        live.write_all(b"y").await.unwrap();
        let back = finish(&mut live).await;
        assert_eq!(back, b"xy");

        // A certificate for another identity is refused by the manager.
        assert!(fx.server_certs.install(fx.ca.workload(CLIENT)).is_err());
    })
    .await;
}

/// A running `sidetunnel-meshd` (killed on drop).
struct Meshd {
    _child: tokio::process::Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

fn meshd_cmd() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(sidetunnel_tests::bins::path("sidetunnel-meshd"));
    c.kill_on_drop(true).env("RUST_LOG", "warn");
    c
}

/// Runs `sidetunnel-meshd <args> --dir <dir>` to completion and returns
/// its stdout; the test fails when it does not succeed.
async fn meshd_ok(args: &[&str], dir: &std::path::Path) -> Vec<u8> {
    let out = meshd_cmd()
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "sidetunnel-meshd {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

async fn start_meshd() -> Meshd {
    let dir = tempfile::tempdir().unwrap();
    meshd_ok(&["init"], dir.path()).await;
    let inventory = dir.path().join("inventory.yaml");
    std::fs::write(&inventory, "{}\n").unwrap();
    let mut child = meshd_cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir.path())
        .arg("--inventory")
        .arg(&inventory)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = lines
        .next_line()
        .await
        .unwrap()
        .expect("meshd printed nothing");
    let addr = line
        .strip_prefix("sidetunnel-meshd listening on ")
        .unwrap_or_else(|| panic!("unexpected meshd output {line:?}"))
        .parse()
        .unwrap();
    Meshd {
        _child: child,
        addr,
        dir,
    }
}

impl Meshd {
    /// Writes a service-account token for `ns/sa` to a file, as kubelet
    /// projects it.
    async fn token_file(&self, ns: &str, sa: &str) -> std::path::PathBuf {
        let args = ["token", "--namespace", ns, "--service-account", sa];
        let token = meshd_ok(&args, self.dir.path()).await;
        let path = self.dir.path().join(format!("token-{ns}-{sa}"));
        std::fs::write(&path, token).unwrap();
        path
    }

    async fn ca_source(&self, ns: &str, sa: &str, ttl: Duration) -> CertSource {
        let mut cfg = CaClientConfig::new(
            format!("https://{}", self.addr),
            self.dir.path().join("root-cert.pem"),
        );
        cfg.token_file = Some(self.token_file(ns, sa).await);
        cfg.ttl = ttl;
        CertSource::IstioCa(cfg)
    }
}

/// An upstream that echoes as it reads (streaming), then closes.
async fn start_streaming_echo() -> SocketAddr {
    serve_loopback(|s| async move {
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Certificates from the real meshd CA (CSR over gRPC with a bearer token),
/// rotated every ~2 s (4 s TTL) on both sides during a transfer that
/// outlives several certificates: no byte is lost, and every rotation is a
/// new certificate for the same identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshd_ca_certificates_rotate_during_transfer() {
    within(Duration::from_secs(60), async {
        let meshd = start_meshd().await;
        let ttl = Duration::from_secs(4);
        let (server_certs, server_task) = meshd
            .ca_source("server-ns", "server", ttl)
            .await
            .spawn(id(SERVER))
            .unwrap();
        let (client_certs, client_task) = meshd
            .ca_source("client-ns", "client", ttl)
            .await
            .spawn(id(CLIENT))
            .unwrap();
        server_certs.wait_ready().await;
        client_certs.wait_ready().await;
        let first = client_certs.current().unwrap();
        assert_eq!(first.identity(), &id(CLIENT));
        let lifetime = first
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(lifetime <= ttl, "requested TTL not honoured: {lifetime:?}");

        let mut rotations = client_certs.subscribe();
        rotations.mark_unchanged();
        let server = start_server(server_certs.clone(), HashSet::new()).await;
        let echo = start_streaming_echo().await;
        let pool = pool(client_certs.clone(), H2Config::default());
        let (stream, _) = tunnel(&pool, server.addr, echo).await.unwrap();

        // ~9 s of paced traffic: longer than two TTLs.
        let (mut r, mut w) = tokio::io::split(stream);
        let chunks = 90usize;
        let chunk = 64 * 1024;
        let writer = tokio::spawn(async move {
            for i in 0..chunks {
                w.write_all(&pattern(chunk, i as u8)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            w.shutdown().await.unwrap();
        });
        let mut serials = HashSet::new();
        let mut received = Vec::with_capacity(chunks * chunk);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => {
                    let n = n.unwrap();
                    if n == 0 { break; }
                    received.extend_from_slice(&buf[..n]);
                }
                changed = rotations.changed() => {
                    changed.unwrap();
                    let cert = rotations.borrow_and_update().clone().unwrap();
                    assert_eq!(cert.identity(), &id(CLIENT));
                    serials.insert(cert.info().serial);
                }
            }
        }
        writer.await.unwrap();
        assert_eq!(received.len(), chunks * chunk, "bytes lost");
        for (i, part) in received.chunks(chunk).enumerate() {
            assert!(
                part == pattern(chunk, i as u8).as_slice(),
                "chunk {i} corrupted"
            );
        }
        assert!(
            serials.len() >= 2,
            "expected at least 2 rotations, saw {}",
            serials.len()
        );
        assert!(!serials.contains(&first.info().serial));
        // The first certificate has expired by now: it is never served.
        assert!(first.is_expired());
        assert_ne!(
            client_certs.current().unwrap().info().serial,
            first.info().serial
        );

        // New connections use the current certificates.
        let (mut s, _) = tunnel(&pool, server.addr, echo).await.unwrap();
        s.write_all(b"fresh").await.unwrap();
        let back = finish(&mut s).await;
        assert_eq!(back, b"fresh");
        server_task.abort();
        client_task.abort();
    })
    .await;
}

/// A sink: reads to EOF, reports how many bytes arrived.
async fn start_sink() -> (SocketAddr, mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_loopback(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            let _ = tx.send(total);
        }
    })
    .await;
    (addr, rx)
}

/// Sends `bytes` to `addr` over plain TCP; returns MB/s measured until the
/// receiving app has seen the last byte.
async fn send_bulk(addr: SocketAddr, bytes: u64, done: &mut mpsc::UnboundedReceiver<u64>) -> f64 {
    let buf = vec![0x5au8; 256 * 1024];
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    s.shutdown().await.unwrap();
    assert_eq!(done.recv().await.unwrap(), bytes);
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Throughput sanity: one stream app → outbound splice → HBONE (mTLS, h2)
/// → inbound splice → app, against app → app over loopback TCP, alternating
/// in the same run. Run in release:
/// `cargo test --release -p sidetunnel-tests --test hbone -- --ignored --nocapture`
/// (`HBONE_BENCH_MB` sets the transfer size, default 1024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release with --ignored"]
async fn throughput_hbone_vs_tcp() {
    let mb: u64 = std::env::var("HBONE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mb * 1024 * 1024;
    let ca = TestCa::new("cluster.local");
    let server = start_server(ca.manager(SERVER), HashSet::new()).await;
    let (sink, mut done) = start_sink().await;
    let pool = pool(ca.manager(CLIENT), H2Config::default());

    // The outbound side: a TCP listener standing in for the capture port,
    // splicing each accepted connection into an HBONE tunnel.
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outbound_addr = outbound.local_addr().unwrap();
    let server_addr = server.addr;
    tokio::spawn(async move {
        loop {
            let (mut app, peer) = outbound.accept().await.unwrap();
            let pool = pool.clone();
            tokio::spawn(async move {
                let req = ConnectRequest::new(sink, peer);
                let (mut tunnel, _) = pool
                    .connect(server_addr, &[id(SERVER)], &req)
                    .await
                    .unwrap();
                let r = netproxy::hbone::copy_bidirectional(&mut app, &mut tunnel, None).await;
                assert!(r.error.is_none(), "{:?}", r.error);
            });
        }
    });

    // Warm-up (pool connection, buffers).
    send_bulk(outbound_addr, 8 << 20, &mut done).await;
    let (mut raw, mut hbone) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        raw.push(send_bulk(sink, bytes, &mut done).await);
        hbone.push(send_bulk(outbound_addr, bytes, &mut done).await);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (raw_m, hbone_m) = (median(&mut raw), median(&mut hbone));
    println!(
        "single stream, {mb} MiB x3 (median): raw TCP {raw_m:.0} MB/s, HBONE (2 splices, mTLS, h2) {hbone_m:.0} MB/s, ratio {:.2}",
        hbone_m / raw_m
    );
    assert!(hbone_m > 0.0);
}
