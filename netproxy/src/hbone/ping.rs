//! HTTP/2 keepalive: a PING every interval; a PING unanswered within the
//! timeout (or failing) means the peer is gone, and the caller closes the
//! connection. Detects half-dead TCP paths (peer pod deleted, netns gone)
//! that would otherwise hold pooled connections forever.

use std::time::Duration;

/// Completes when the peer stopped answering pings. Never completes while it
/// answers. With no `PingPong` (already taken) it never completes.
pub(crate) async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 keepalive ping failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?timeout, "HTTP/2 keepalive ping timed out");
                return;
            }
        }
    }
}
