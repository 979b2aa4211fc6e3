//! Metrics of the bounded connection table (`proxy::limits`):
//! `sidetunnel_connections_open` (gauge) and
//! `sidetunnel_connections_refused_total{listener}` (counter), so an
//! operator sees a pod hitting `--max-connections` without reading logs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of a refusal: where the connection arrived.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

/// Handles shared with the connection table (cheap clones of atomics).
#[derive(Clone, Debug, Default)]
pub struct ConnectionTableMetrics {
    pub open: Gauge,
    pub refused: Family<ListenerLabel, Counter>,
}

impl ConnectionTableMetrics {
    /// Registers both metrics under `registry` (expected to carry the
    /// `sidetunnel` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "connections_open",
            "Proxied connections currently held in the connection table",
            m.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused because the connection table was full",
            m.refused.clone(),
        );
        m
    }
}
