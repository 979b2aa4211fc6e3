//! Abusive HBONE clients against a real `sidetunnel-proxy` (pod B of a
//! proxy pair with a real meshd CA), speaking raw TCP/TLS/HTTP/2 from the
//! node namespace to B's port 15008:
//! * (a) TCP connections that never start the TLS handshake;
//! * (b) TLS completed, then the HTTP/2 preface trickled a byte at a time;
//! * (b') preface and SETTINGS sent, then a HEADERS frame trickled;
//! * (c) one connection opening more CONNECT streams than the server's
//!   `max_concurrent_streams` and never sending data: the server serves
//!   exactly its cap and refuses the rest (RST_STREAM REFUSED_STREAM).
//!
//! Meanwhile a well-behaved client (A's app through A's proxy, and a direct
//! HBONE client) must be served promptly, and (a)/(b) must be closed by the
//! server within its handshake deadline (`--connect-timeout`, 3 s here).
//!
//! Certificate expiry: a client whose certificate expires while its HBONE
//! connection stays open gets 401 for a new CONNECT on that connection; the
//! stream it opened before expiry keeps working.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use netproxy::identity::{CertificateManager, Identity, WorkloadCertificate};
use rcgen::{CertificateParams, KeyPair, SanType};
use sidetunnel_tests::load::{self, Server};
use sidetunnel_tests::topology::{A_ID, APP_PORT, B_ID, B_IP, Options, Pod, PodPair};
use sidetunnel_tests::{bins, prereq};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const HBONE: SocketAddrV4 = SocketAddrV4::new(B_IP, 15008);
/// B's `--connect-timeout`: its TLS handshake and HTTP/2 preface deadline.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);
/// What "promptly" means for the well-behaved client on a loaded 2-core
/// machine (it is normally a few milliseconds).
const PROMPT: Duration = Duration::from_secs(5);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
/// The server's `max_concurrent_streams` (hyper's and ztunnel's 200).
const SERVER_MAX_STREAMS: u32 = 200;

fn start(test: &str) -> Option<(PodPair, Server)> {
    if !(prereq::root(test) && prereq::binary(test, "ip") && prereq::binary(test, "nft")) {
        return None;
    }
    let mut opts = Options::new(bins::dir());
    opts.log_level = "warn".into();
    opts.b_args = vec!["--connect-timeout".into(), "3s".into()];
    let pair = PodPair::start(opts).expect("start the proxy pair");
    let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
    let echo = Server::echo(pair.ns(Pod::B), app).expect("echo app");
    Some((pair, echo))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A certificate for A's identity signed by the pair's meshd CA, valid for
/// `ttl` (what meshd would issue to A for that TTL).
fn client_certs(pair: &PodPair, ttl: Duration) -> CertificateManager {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(A_ID.try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let ca = sidetunnel_meshd::pki::Ca::load(pair.mesh().dir()).expect("meshd CA");
    let signed = ca.sign_csr(&csr, A_ID, ttl).expect("sign");
    let cert = WorkloadCertificate::from_pem(
        signed.chain.concat().as_bytes(),
        key.serialize_pem().as_bytes(),
        ca.root_pem().as_bytes(),
    )
    .expect("workload certificate");
    CertificateManager::with_certificate(cert).expect("manager")
}

/// A TCP connection to B's HBONE port from the node namespace (no
/// redirection there), as a tokio stream.
fn tcp(pair: &PodPair) -> TcpStream {
    let s = pair
        .node()
        .run(|| std::net::TcpStream::connect_timeout(&HBONE.into(), PROMPT))
        .expect("connect to B:15008");
    s.set_nonblocking(true).unwrap();
    TcpStream::from_std(s).unwrap()
}

async fn tls(
    pair: &PodPair,
    certs: &CertificateManager,
) -> impl AsyncRead + AsyncWrite + Unpin + Send + 'static {
    let b: Identity = B_ID.parse().unwrap();
    let (tls, _) = netproxy::tls::hbone_connect(certs, &[b], tcp(pair))
        .await
        .expect("mTLS to B");
    tls
}

/// An HTTP/2 client over mTLS to B, its connection driven on a task.
async fn h2_client(pair: &PodPair, certs: &CertificateManager) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(tls(pair, certs).await)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Sends `CONNECT` for B's app; the response status and the tunnel.
async fn connect(
    send: &mut h2::client::SendRequest<Bytes>,
) -> Result<(StatusCode, h2::SendStream<Bytes>, h2::RecvStream), h2::Error> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{B_IP}:{APP_PORT}"))
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await?;
    let (resp, tx) = send.send_request(req, false)?;
    let resp = resp.await?;
    let status = resp.status();
    Ok((status, tx, resp.into_body()))
}

/// Writes `data` on a tunnel and reads it back from B's echo app.
async fn echo(tx: &mut h2::SendStream<Bytes>, rx: &mut h2::RecvStream, data: &[u8]) {
    tx.send_data(Bytes::copy_from_slice(data), false).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = timeout(PROMPT, rx.data())
            .await
            .expect("echo timed out")
            .expect("tunnel ended")
            .expect("tunnel data");
        let _ = rx.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, data);
}

fn frame(buf: &mut Vec<u8>, typ: u8, flags: u8, stream: u32, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    buf.extend_from_slice(&[typ, flags]);
    buf.extend_from_slice(&stream.to_be_bytes());
    buf.extend_from_slice(payload);
}

/// HPACK block of `CONNECT <B's app>` (literals without indexing, static
/// names `:method` = 2 and `:authority` = 1).
fn connect_block() -> Vec<u8> {
    let authority = format!("{B_IP}:{APP_PORT}");
    let mut b = vec![0x02, 7];
    b.extend_from_slice(b"CONNECT");
    b.extend_from_slice(&[0x01, authority.len() as u8]);
    b.extend_from_slice(authority.as_bytes());
    b
}

/// Reads one frame: (type, flags, stream, payload).
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut h = [0u8; 9];
    r.read_exact(&mut h).await?;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((h[3], h[4], stream, payload))
}

/// Waits until the server closes `s` (EOF or reset), at most `limit`;
/// how long it took.
async fn closed_within(s: &mut (impl AsyncRead + Unpin), limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| t.elapsed())
}

/// Writes `bytes` one at a time, `gap` apart, until done or the peer closes.
async fn trickle(mut w: impl AsyncWrite + Unpin, bytes: Vec<u8>, gap: Duration) {
    for b in bytes {
        if w.write_all(&[b]).await.is_err() || w.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(gap).await;
    }
}

#[test]
fn slow_loris_clients_do_not_starve_others() {
    let Some((pair, _echo)) = start("slow_loris_clients_do_not_starve_others") else {
        return;
    };
    let certs = client_certs(&pair, Duration::from_secs(3600));
    let rt = runtime();
    rt.block_on(async {
        let t0 = Instant::now();
        // (a) Silent TCP connections: no ClientHello.
        let mut silent: Vec<TcpStream> = (0..50).map(|_| tcp(&pair)).collect();
        // (b) TLS done, preface trickled (24 bytes, 500 ms apart: 12 s).
        let mut trickled = Vec::new();
        for _ in 0..20 {
            let (r, w) = tokio::io::split(tls(&pair, &certs).await);
            tokio::spawn(trickle(w, PREFACE.to_vec(), Duration::from_millis(500)));
            trickled.push(r);
        }
        // (b') Preface and SETTINGS at once, then a HEADERS frame trickled.
        let mut slow_headers = Vec::new();
        for _ in 0..10 {
            let (r, mut w) = tokio::io::split(tls(&pair, &certs).await);
            let mut start = PREFACE.to_vec();
            frame(&mut start, SETTINGS, 0, 0, &[]);
            w.write_all(&start).await.unwrap();
            let mut headers = Vec::new();
            frame(&mut headers, HEADERS, END_HEADERS, 1, &connect_block());
            tokio::spawn(trickle(w, headers, Duration::from_millis(500)));
            slow_headers.push(r);
        }

        // (c) More streams than the cap on one connection, no data sent.
        let (mut r, mut w) = tokio::io::split(tls(&pair, &certs).await);
        let mut start = PREFACE.to_vec();
        frame(&mut start, SETTINGS, 0, 0, &[]);
        w.write_all(&start).await.unwrap();
        // Settings take effect when acknowledged: wait for the server's
        // SETTINGS, acknowledge them, then open the streams.
        loop {
            let (typ, flags, _, _) = read_frame(&mut r).await.expect("server SETTINGS");
            if typ == SETTINGS && flags & ACK == 0 {
                break;
            }
        }
        let extra = 5;
        let mut burst = Vec::new();
        frame(&mut burst, SETTINGS, ACK, 0, &[]);
        for i in 0..SERVER_MAX_STREAMS + extra {
            frame(
                &mut burst,
                HEADERS,
                END_HEADERS,
                1 + 2 * i,
                &connect_block(),
            );
        }
        w.write_all(&burst).await.unwrap();
        let (mut answered, mut refused) = (0u32, Vec::new());
        let burst_result = timeout(Duration::from_secs(30), async {
            while answered + (refused.len() as u32) < SERVER_MAX_STREAMS + extra {
                match read_frame(&mut r).await.expect("frames from B") {
                    // `:status: 200` is static-table entry 8 (0x88).
                    (HEADERS, _, _, p) => {
                        assert_eq!(p.first(), Some(&0x88), "CONNECT answered {p:02x?}");
                        answered += 1;
                    }
                    (RST_STREAM, _, id, p) => {
                        let code = u32::from_be_bytes(p[..4].try_into().unwrap());
                        assert_eq!(code, REFUSED_STREAM, "stream {id} reset with {code}");
                        refused.push(id);
                    }
                    (GOAWAY, _, _, p) => panic!("GOAWAY {p:02x?} after {answered} streams"),
                    _ => {}
                }
            }
        })
        .await;
        assert!(
            burst_result.is_ok(),
            "over-cap burst: {answered} answered, {} refused\n{}",
            refused.len(),
            pair.logs()
        );
        assert_eq!(answered, SERVER_MAX_STREAMS);
        let want: Vec<u32> = (SERVER_MAX_STREAMS..SERVER_MAX_STREAMS + extra)
            .map(|i| 1 + 2 * i)
            .collect();
        assert_eq!(refused, want, "the streams over the cap are refused");

        // The well-behaved clients, while all of the above is held open.
        let good_start = Instant::now();
        let mut send = h2_client(&pair, &certs).await;
        let (status, mut tx, mut rx) = timeout(PROMPT, connect(&mut send))
            .await
            .expect("good CONNECT answered promptly")
            .expect("good CONNECT");
        assert_eq!(status, StatusCode::OK);
        echo(&mut tx, &mut rx, b"well-behaved").await;
        let app: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
        let rr = pair.ns(Pod::A).run(|| {
            (0..10)
                .map(|_| {
                    let t = Instant::now();
                    let mut c = load::connect(app, None)?;
                    load::request_response(&mut c, 64, Duration::from_millis(20), None)?;
                    Ok(t.elapsed())
                })
                .collect::<std::io::Result<Vec<Duration>>>()
        });
        let slowest = rr
            .unwrap_or_else(|e| panic!("A's app through the mesh: {e}\n{}", pair.logs()))
            .into_iter()
            .max()
            .unwrap();
        assert!(slowest < PROMPT, "A's app waited {slowest:?}");
        println!(
            "well-behaved clients served in {:?} (slowest A→B connection {slowest:?})",
            good_start.elapsed()
        );

        // (a) and (b) are cut at the handshake deadline, from t0.
        let limit = (HANDSHAKE_DEADLINE + PROMPT).saturating_sub(t0.elapsed());
        for c in &mut silent {
            assert!(
                closed_within(c, limit).await.is_some(),
                "a silent TCP connection was still open {:?} after it started",
                t0.elapsed()
            );
        }
        for c in &mut trickled {
            assert!(
                closed_within(c, limit).await.is_some(),
                "a trickled-preface connection was still open {:?} after it started",
                t0.elapsed()
            );
        }
        println!(
            "silent and trickled-preface connections closed by {:?}",
            t0.elapsed()
        );
        // (b') are still open (keepalive closes them later); they and (c)
        // held the server's resources during the checks above.
        assert_eq!(slow_headers.len(), 10);
        drop(w);
    });
}

#[test]
fn expired_client_certificate_gets_no_new_streams() {
    let Some((pair, _echo)) = start("expired_client_certificate_gets_no_new_streams") else {
        return;
    };
    let ttl = Duration::from_secs(4);
    let certs = client_certs(&pair, ttl);
    let expiry = certs.current().unwrap().not_after();
    let rt = runtime();
    rt.block_on(async {
        let mut send = h2_client(&pair, &certs).await;
        let (status, mut tx, mut rx) = connect(&mut send).await.expect("CONNECT");
        assert_eq!(status, StatusCode::OK, "{}", pair.logs());
        echo(&mut tx, &mut rx, b"before expiry").await;

        let wait = expiry.duration_since(SystemTime::now()).unwrap_or_default()
            + Duration::from_millis(500);
        assert!(wait <= ttl + Duration::from_secs(1), "TTL not honoured");
        tokio::time::sleep(wait).await;

        // The same connection, authenticated by a now-expired certificate.
        let (status, _, _) = connect(&mut send).await.expect("CONNECT after expiry");
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "new stream on a connection whose client certificate expired"
        );
        // The stream opened while the certificate was valid carries on.
        echo(&mut tx, &mut rx, b"after expiry").await;

        // A fresh certificate on a new connection is served.
        let fresh = client_certs(&pair, Duration::from_secs(3600));
        let mut send = h2_client(&pair, &fresh).await;
        let (status, _, _) = connect(&mut send).await.expect("CONNECT");
        assert_eq!(status, StatusCode::OK);
    });
}
