//! Metrics of the DNS proxy (`dns`):
//!
//! * `sidetunnel_dns_queries_total{transport, outcome}` — queries by how
//!   they ended: `answered` (from the store), `answered_on_demand` (after an
//!   on-demand xDS fetch), `forwarded` (an upstream resolver answered),
//!   `upstream_failed` (SERVFAIL: no upstream answered in time),
//!   `malformed` (refused at parsing: FORMERR/NOTIMP or dropped) and
//!   `dropped` (too many queries in flight);
//! * `sidetunnel_dns_on_demand_total{result}` — on-demand fetches of names
//!   by result: `found`, `absent` (the control plane has no such host) or
//!   `timeout` (no answer within `--dns-on-demand-timeout`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsQueryLabels {
    pub transport: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsDemandLabels {
    pub result: &'static str,
}

/// Handles shared with the DNS server (cheap clones of atomics).
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    pub queries: Family<DnsQueryLabels, Counter>,
    pub on_demand: Family<DnsDemandLabels, Counter>,
}

impl DnsMetrics {
    /// Registers both families under `registry` (expected to carry the
    /// `sidetunnel` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_queries",
            "DNS queries the proxy received, by transport and outcome",
            m.queries.clone(),
        );
        registry.register(
            "dns_on_demand",
            "On-demand xDS fetches of DNS names, by result",
            m.on_demand.clone(),
        );
        m
    }

    pub fn query(&self, transport: &'static str, outcome: &'static str) {
        self.queries
            .get_or_create(&DnsQueryLabels { transport, outcome })
            .inc();
    }

    pub fn demand(&self, result: &'static str) {
        self.on_demand
            .get_or_create(&DnsDemandLabels { result })
            .inc();
    }
}
