//! The in-pod DNS proxy (`--dns-proxy`): with DNS capture on, the ruleset
//! redirects the app's UDP and TCP port 53 here. Service and ServiceEntry
//! hosts are answered from the xDS store; in on-demand xDS mode a host the
//! store does not hold yet is subscribed as `namespace/hostname` and waited
//! for, bounded; everything else goes to the pod's own resolvers from its
//! resolv.conf. Upstream ztunnel has no DNS proxy in on-demand mode
//! (istio/ztunnel#577); this one is built for it.
//!
//! Submodules, lowest first: `wire` (message parsing and encoding),
//! `resolv` (resolv.conf), `lookup` (names → store answers, on-demand
//! names), `forward` (upstream resolvers), `handler` (one query, start to
//! end), `server` (the UDP and TCP listeners).

mod forward;
mod handler;
mod lookup;
pub mod resolv;
mod server;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use forward::{Forwarder, Transport};
pub use handler::{DnsProxy, TTL};
pub use lookup::Names;
pub use server::{DnsListeners, MAX_QUERY};

use crate::config::DnsSettings;
use crate::metrics::DnsMetrics;
use crate::state::Store;

/// Why the DNS proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsStartError {
    #[error("reading resolv.conf {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("resolv.conf {path}: {source}")]
    Parse {
        path: PathBuf,
        source: resolv::ResolvError,
    },
    #[error("binding the DNS port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
}

/// Reads and parses the pod's resolv.conf.
pub fn read_resolv_conf(path: &Path) -> Result<resolv::ResolvConf, DnsStartError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsStartError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    resolv::parse(&text).map_err(|source| DnsStartError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// A bound, configured DNS proxy, not serving yet (binding fails the
/// proxy's start, before anything else runs).
pub struct DnsServer {
    listeners: DnsListeners,
    proxy: Arc<DnsProxy>,
}

impl DnsServer {
    /// Reads the resolv.conf and binds the listeners.
    pub fn bind(
        settings: &DnsSettings,
        pod_namespace: &str,
        network: &str,
        mark: u32,
        store: Arc<Store>,
        metrics: DnsMetrics,
    ) -> Result<DnsServer, DnsStartError> {
        let conf = read_resolv_conf(&settings.resolv_conf)?;
        let listeners =
            DnsListeners::bind(settings.port, mark).map_err(|source| DnsStartError::Bind {
                port: settings.port,
                source,
            })?;
        tracing::info!(
            addrs = ?listeners.local_addrs(),
            upstream = ?conf.nameservers,
            search = ?conf.search,
            ndots = conf.ndots,
            "DNS proxy bound"
        );
        let proxy = DnsProxy {
            store,
            names: Names {
                pod_namespace: pod_namespace.to_string(),
                cluster_domain: settings.cluster_domain.clone(),
                search: conf.search.clone(),
                ndots: conf.ndots,
            },
            network: network.to_string(),
            forwarder: forward::Forwarder::new(&conf, mark),
            demand_timeout: settings.on_demand_timeout,
            metrics,
        };
        Ok(DnsServer {
            listeners,
            proxy: Arc::new(proxy),
        })
    }

    /// Serves until `stop`.
    pub async fn serve(self, stop: CancellationToken) {
        self.listeners.serve(self.proxy, stop).await
    }
}

#[cfg(test)]
mod tests;
