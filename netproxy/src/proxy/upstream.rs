//! The connection from the proxy to the local app (inbound direction),
//! keeping the client's IP as source: a transparent socket bound to the
//! original source. The ruleset marks such connections so the app's
//! replies are routed back to the proxy. If the kernel refuses the
//! transparent bind (missing CAP_NET_ADMIN, family mismatch), the proxy
//! connects normally — the app then sees the proxy's address — and says
//! why, once at warn level and afterwards at debug.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::ProxyInputs;
use crate::socket::{self, SourceBinding};

static WARNED: AtomicBool = AtomicBool::new(false);

pub(super) async fn connect_app(
    pi: &ProxyInputs,
    target: SocketAddr,
    original_src: IpAddr,
) -> io::Result<(TcpStream, SourceBinding)> {
    let (stream, binding, fallback) = socket::connect(
        target,
        Some(original_src),
        pi.cfg.mark,
        pi.cfg.connect_timeout,
    )
    .await?;
    if let Some(e) = fallback {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!(%target, src = %original_src, "cannot preserve the original source IP (transparent bind failed: {e}); the app sees the proxy's address");
        } else {
            debug!(%target, src = %original_src, "transparent bind failed: {e}");
        }
    }
    Ok((stream, binding))
}
