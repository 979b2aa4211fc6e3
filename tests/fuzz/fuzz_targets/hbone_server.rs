//! The HBONE server end to end: the input is what an (authenticated) peer
//! sends after the HTTP/2 client preface: frames carrying CONNECT requests,
//! data, resets, pings, settings. It is served by `serve_connection` over an
//! in-memory pipe with a handler that reads the request headers and either
//! refuses or accepts and exchanges data. Checks that only well-formed
//! CONNECT requests reach the handler and that the server finishes once the
//! peer's bytes end (no hang on any frame sequence).
#![no_main]

use std::time::Duration;

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use netproxy::hbone::{H2Config, InboundRequest, serve_connection};
use netproxy::identity::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn handle(req: InboundRequest) {
    let dst = req.destination();
    assert_ne!(dst.port(), 0, "a CONNECT to port 0 reached the handler");
    let _ = (req.forwarded_for(), req.forwarded_host(), req.baggage());
    let _ = (req.traceparent(), req.headers().len(), req.peer_identity());
    if dst.port().is_multiple_of(2) {
        return req.reject(StatusCode::UNAUTHORIZED);
    }
    if let Ok(mut tunnel) = req.accept() {
        let mut buf = [0u8; 256];
        if let Ok(n) = tunnel.read(&mut buf).await {
            let _ = tunnel.write_all(&buf[..n]).await;
        }
        let _ = tunnel.shutdown().await;
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(data);
        tokio::spawn(async move {
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await;
        });
        let cfg = H2Config {
            // Generous: no timer may end a connection the test wants ended
            // by the peer's EOF.
            keepalive_interval: Duration::from_secs(3600),
            keepalive_timeout: Duration::from_secs(3600),
            ..H2Config::default()
        };
        let peer = Identity::new("cluster.local", "default", "client").expect("identity");
        let served = serve_connection(server, peer, &cfg, std::future::pending(), handle);
        let finished = tokio::time::timeout(Duration::from_secs(30), served).await;
        assert!(
            finished.is_ok(),
            "HBONE server still running after the peer's EOF"
        );
    });
});
