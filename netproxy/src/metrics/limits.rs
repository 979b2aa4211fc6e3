//! Metrics of the proxy's resource limits, so an operator sees a pod
//! hitting them without reading logs:
//!
//! * the bounded connection table (`proxy::limits`):
//!   `sidetunnel_connections_open` (gauge) and
//!   `sidetunnel_connections_refused_total{listener}` (counter);
//! * the copy-buffer budget (`hbone::CopyBudget`, read at scrape time):
//!   `sidetunnel_copy_buffer_bytes` (gauge: bytes held by copy buffers
//!   grown past 16 KiB), `sidetunnel_copy_buffer_budget_bytes` (gauge: the
//!   `--copy-buffer-budget`) and `sidetunnel_copy_buffer_budget_refusals_total`
//!   (counter: a bulk direction kept at a smaller chunk because the budget
//!   was full; once per direction until it shrinks).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::hbone::CopyBudget;

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

/// Scrape-time view of a [`CopyBudget`] (the process's, in the proxy).
#[derive(Debug, Clone, Copy)]
pub struct CopyBufferMetrics {
    budget: &'static CopyBudget,
}

impl CopyBufferMetrics {
    pub fn new(budget: &'static CopyBudget) -> Self {
        CopyBufferMetrics { budget }
    }
}

impl Collector for CopyBufferMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Gauges as i64 (Prometheus floats), saturating far beyond any budget.
        let gauge = |v: usize| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        for (name, help, g) in [
            (
                "sidetunnel_copy_buffer_bytes",
                "Bytes held by copy buffers grown past 16 KiB (bulk connections)",
                gauge(self.budget.held()),
            ),
            (
                "sidetunnel_copy_buffer_budget_bytes",
                "Most bytes grown copy buffers may hold together (--copy-buffer-budget)",
                gauge(self.budget.limit()),
            ),
        ] {
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let c = ConstCounter::new(self.budget.refused());
        c.encode(enc.encode_descriptor(
            "sidetunnel_copy_buffer_budget_refusals",
            "Bulk copy directions kept at a smaller chunk because the copy-buffer budget was full",
            None,
            c.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_budget_is_reported_at_scrape_time() {
        let budget: &'static CopyBudget = Box::leak(Box::new(CopyBudget::new(1 << 20)));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CopyBufferMetrics::new(budget)));
        let scrape = || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        let mut g = budget.grant();
        assert!(g.try_resize(512 << 10));
        assert!(!budget.grant().try_resize(768 << 10));
        budget.count_refusal();
        let text = scrape();
        for line in [
            "sidetunnel_copy_buffer_bytes 524288",
            "sidetunnel_copy_buffer_budget_bytes 1048576",
            "sidetunnel_copy_buffer_budget_refusals_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        drop(g);
        assert!(
            scrape()
                .lines()
                .any(|l| l == "sidetunnel_copy_buffer_bytes 0")
        );
    }
}
