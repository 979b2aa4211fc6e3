//! Telemetry: Prometheus metrics with Istio's names and labels (served on
//! the metrics port as text exposition) and the per-connection access log.
//!
//! Submodules: `dns` (DNS proxy counters), `traffic` (TCP connection metrics, labels, the per-connection
//! recorder that also writes the access log) and `xds` (control-plane
//! counters, read from the xDS client at scrape time). Traffic metrics are
//! registered under the `istio_` prefix, so counters come out as e.g.
//! `istio_tcp_connections_opened_total`.

mod dns;
mod limits;
mod traffic;
mod xds;

use prometheus_client::registry::Registry;

pub use dns::{DnsMetrics, DnsQueryLabels};
pub use limits::{ConnectionTableMetrics, CopyBufferMetrics, ListenerLabel};
pub use traffic::{
    ConnectionOpen, ConnectionRecorder, Peer, Reporter, ResponseFlags, SecurityPolicy,
    TrafficLabels, TrafficMetrics,
};
pub use xds::XdsMetrics;

/// All of the proxy's metrics. Share as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    pub traffic: TrafficMetrics,
    pub xds: XdsMetrics,
    pub connections: ConnectionTableMetrics,
    pub dns: DnsMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let traffic = TrafficMetrics::new(registry.sub_registry_with_prefix("istio"));
        let xds = XdsMetrics::default();
        registry.register_collector(Box::new(xds.clone()));
        let connections =
            ConnectionTableMetrics::register(registry.sub_registry_with_prefix("sidetunnel"));
        let dns = DnsMetrics::register(registry.sub_registry_with_prefix("sidetunnel"));
        registry.register_collector(Box::new(CopyBufferMetrics::new(
            crate::hbone::CopyBudget::global(),
        )));
        register_build(&mut registry);
        Metrics {
            registry,
            traffic,
            xds,
            connections,
            dns,
        }
    }

    /// The Prometheus text exposition (OpenMetrics text, which Prometheus
    /// and Istio's tooling scrape).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `istio_build{component="sidetunnel-proxy",tag="<version>"} 1`, Istio's
/// build-info metric: which proxy version serves a pod (it changes on a
/// live upgrade; the shim's record says the same).
fn register_build(registry: &mut Registry) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let build = Family::<Vec<(String, String)>, Gauge>::default();
    build
        .get_or_create(&vec![
            ("component".to_string(), "sidetunnel-proxy".to_string()),
            ("tag".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ])
        .set(1);
    registry.register("istio_build", "Istio component build info", build);
}

#[cfg(test)]
mod tests;
