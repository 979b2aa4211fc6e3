//! One query, start to end, whatever the transport: parse (a refused
//! message gets FORMERR/NOTIMP or, when it cannot be answered, nothing),
//! answer A/AAAA for mesh hosts from the store (`lookup`), fetch a host the
//! store does not hold on demand and wait a bounded time, and forward
//! everything else — other names, other types, other classes — to the
//! pod's resolvers (`forward`); SERVFAIL when none answers. Counts every
//! query by outcome.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use super::forward::{Forwarder, Transport};
use super::lookup::{self, Found, Names};
use super::wire::{self, CLASS_IN, Query, RData, Rcode, Record, TYPE_A, TYPE_AAAA};
use crate::metrics::DnsMetrics;
use crate::state::Store;

/// TTL of the proxy's own answers, as ztunnel's: short, since the store
/// changes under it.
pub const TTL: u32 = 30;

/// The name of an IN A/AAAA query with a hostname-like name: the only
/// queries the proxy may answer itself.
fn asks_for_address(q: &Query) -> Option<&str> {
    q.name
        .as_deref()
        .filter(|_| q.qclass == CLASS_IN && (q.qtype == TYPE_A || q.qtype == TYPE_AAAA))
}

/// The most bytes an answer may take on `transport`.
fn limit(q: &Query, transport: Transport) -> usize {
    match transport {
        Transport::Udp => q.udp_limit(),
        Transport::Tcp => u16::MAX as usize,
    }
}

/// Everything a query needs. Share as `Arc<DnsProxy>`.
pub struct DnsProxy {
    pub store: Arc<Store>,
    pub names: Names,
    /// The pod's network: only VIPs on it are callable.
    pub network: String,
    pub forwarder: Forwarder,
    /// Bound on the on-demand wait for one query.
    pub demand_timeout: Duration,
    pub metrics: DnsMetrics,
}

impl DnsProxy {
    /// The answer to `raw`, or `None` to send nothing.
    pub async fn handle(&self, raw: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let t = transport.label();
        let q = match wire::parse_query(raw) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(error = %e, transport = t, "malformed DNS query");
                self.metrics.query(t, "malformed");
                return wire::error_answer(raw, &e);
            }
        };
        if let Some(answer) = self.answer_from_store(&q, transport) {
            self.metrics.query(t, "answered");
            return Some(answer);
        }
        if let Some(name) = asks_for_address(&q)
            && self.fetch(name).await
            && let Some(answer) = self.answer_from_store(&q, transport)
        {
            self.metrics.query(t, "answered_on_demand");
            return Some(answer);
        }
        match self.forwarder.forward(&q, raw, transport).await {
            Ok(resp) => {
                self.metrics.query(t, "forwarded");
                Some(resp)
            }
            Err(e) => {
                tracing::debug!(error = %e, name = ?q.name, "DNS forwarding failed");
                self.metrics.query(t, "upstream_failed");
                wire::encode_answer(&q, Rcode::ServFail, false, &[], limit(&q, transport))
            }
        }
    }

    /// The proxy's own answer to `q` from what the store holds now, if `q`
    /// asks for the address of a mesh host (`None`: forward it, or fetch
    /// on demand first). Synchronous: no network, no waiting.
    pub fn answer_from_store(&self, q: &Query, transport: Transport) -> Option<Vec<u8>> {
        let found = self.find(asks_for_address(q)?, q.qtype)?;
        Some(self.encode(q, &found, limit(q, transport)))
    }

    fn find(&self, name: &str, qtype: u16) -> Option<Found> {
        lookup::find(&self.store, &self.names, &self.network, name, qtype)
    }

    /// Subscribes the hosts `name` may stand for on demand (all at once)
    /// and waits for them, at most the demand timeout; true if any arrived.
    async fn fetch(&self, name: &str) -> bool {
        if !self.store.on_demand() {
            return false;
        }
        let wanted = self.names.demand_names(name);
        if wanted.is_empty() {
            return false;
        }
        let fetches = wanted.iter().map(|n| async move {
            match tokio::time::timeout(self.demand_timeout, self.store.fetch_name(n)).await {
                Ok(Ok(Some(_))) => {
                    self.metrics.demand("found");
                    true
                }
                Ok(Ok(None)) => {
                    self.metrics.demand("absent");
                    false
                }
                Ok(Err(_)) | Err(_) => {
                    self.metrics.demand("timeout");
                    false
                }
            }
        });
        join_all(fetches).await.into_iter().any(|f| f)
    }

    fn encode(&self, q: &Query, found: &Found, limit: usize) -> Vec<u8> {
        let mut records = Vec::with_capacity(found.addrs.len() + 1);
        if let Some(target) = &found.cname {
            records.push(Record {
                owner: None,
                ttl: TTL,
                data: RData::Cname(target.clone()),
            });
        }
        for ip in &found.addrs {
            records.push(Record {
                owner: found.cname.clone(),
                ttl: TTL,
                data: match ip {
                    std::net::IpAddr::V4(v) => RData::A(*v),
                    std::net::IpAddr::V6(v) => RData::Aaaa(*v),
                },
            });
        }
        // NODATA (found, no address of the family) goes out without the
        // CNAME: the name exists, it just has no such record.
        if found.addrs.is_empty() {
            records.clear();
        }
        wire::encode_answer(q, Rcode::NoError, true, &records, limit)
            .or_else(|| wire::encode_answer(q, Rcode::ServFail, false, &[], limit))
            .unwrap_or_default()
    }
}
