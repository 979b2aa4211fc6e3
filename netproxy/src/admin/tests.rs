use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::LogFormat;

/// One HTTP/1.0 request; returns (status, body).
async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, target: &str) -> (u16, String) {
    let req = format!("GET {target} HTTP/1.0\r\nHost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut buf),
    )
    .await
    .expect("response in time")
    .unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn readiness_follows_checks() {
    let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 0x539).unwrap();
    let addr = listener.local_addr().unwrap();
    let readiness = Readiness::new();
    let cert = Arc::new(AtomicBool::new(false));
    let c = cert.clone();
    readiness.add("certificate", move || c.load(Ordering::SeqCst));
    readiness.add("config", || true);
    let stop = CancellationToken::new();
    tokio::spawn(serve_readiness(listener, readiness.clone(), stop.clone()));

    let (status, body) = get(TcpStream::connect(addr).await.unwrap(), "/healthz/ready").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("certificate") && !body.contains("config"),
        "{body}"
    );
    cert.store(true, Ordering::SeqCst);
    let (status, body) = get(TcpStream::connect(addr).await.unwrap(), "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _) = get(TcpStream::connect(addr).await.unwrap(), "/nope").await;
    assert_eq!(status, 404);

    stop.cancel();
    // After cancellation the listener is closed.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn metrics_served_on_both_paths() {
    let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 0x539).unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    metrics
        .traffic
        .open(crate::metrics::ConnectionOpen {
            reporter: crate::metrics::Reporter::Source,
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:2".parse().unwrap(),
            hbone_target: None,
            source: Default::default(),
            destination: Default::default(),
            destination_service: None,
            security: crate::metrics::SecurityPolicy::Unknown,
        })
        .finish(crate::metrics::ResponseFlags::None, None);
    let stop = CancellationToken::new();
    tokio::spawn(serve_metrics(listener, metrics, stop.clone()));
    for path in ["/metrics", "/stats/prometheus"] {
        let (status, body) = get(TcpStream::connect(addr).await.unwrap(), path).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("# TYPE istio_tcp_connections_opened counter")
                && body.contains("istio_tcp_connections_opened_total{reporter=\"source\""),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
    stop.cancel();
}

#[tokio::test]
async fn admin_socket_dump_and_logging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    std::fs::write(&path, b"stale").unwrap();
    let listener = bind_admin_socket(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let (logs, _subscriber) = LogControl::build(LogFormat::Json, "info").unwrap();
    let dump: ConfigDump =
        Arc::new(|| serde_json::json!({"workloads": [], "certificates": [{"identity": "x"}]}));
    let stop = CancellationToken::new();
    tokio::spawn(serve_admin(listener, dump, logs.clone(), stop.clone()));

    let (status, body) = get(UnixStream::connect(&path).await.unwrap(), "/config_dump").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["certificates"][0]["identity"], "x");

    let (status, body) = get(
        UnixStream::connect(&path).await.unwrap(),
        "/logging?level=debug%2Caccess%3Dtrace",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        logs.current().contains("access=trace"),
        "{}",
        logs.current()
    );
    let (status, body) = get(
        UnixStream::connect(&path).await.unwrap(),
        "/logging?level=[[bad",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        logs.current().contains("access=trace"),
        "bad filter must not replace the old one"
    );
    let (status, _) = get(UnixStream::connect(&path).await.unwrap(), "/other").await;
    assert_eq!(status, 404);
    stop.cancel();
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("a%2Cb+c%3d"), "a,b c=");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz"), "%zz");
}
