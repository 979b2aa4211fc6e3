//! Counters of the xDS stream, updated lock-free by the client and read by
//! the metrics module (as a plain snapshot) and by benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters; all monotonic since the client was created.
#[derive(Debug, Default)]
pub struct XdsStats {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    responses: AtomicU64,
    resources: AtomicU64,
    removals: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    rejected_resources: AtomicU64,
    requests: AtomicU64,
    bytes_received: AtomicU64,
    address_bytes: AtomicU64,
    authorization_bytes: AtomicU64,
}

/// A consistent-enough copy of [`XdsStats`] (each field read atomically).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsCounters {
    /// Streams established.
    pub connects: u64,
    /// Connection or stream attempts that failed (including refusals).
    pub connect_failures: u64,
    /// `DeltaDiscoveryResponse` messages received.
    pub responses: u64,
    /// Resources received (added or updated).
    pub resources: u64,
    /// Names received in `removed_resources`.
    pub removals: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Resources rejected by validation (each NACK names at least one).
    pub rejected_resources: u64,
    /// `DeltaDiscoveryRequest` messages sent (subscriptions, ACKs, NACKs).
    pub requests: u64,
    /// Protobuf-encoded size of all responses received.
    pub bytes_received: u64,
    /// Of which responses of type Address.
    pub address_bytes: u64,
    /// Of which responses of type Authorization.
    pub authorization_bytes: u64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl XdsStats {
    pub fn snapshot(&self) -> XdsCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        XdsCounters {
            connects: g(&self.connects),
            connect_failures: g(&self.connect_failures),
            responses: g(&self.responses),
            resources: g(&self.resources),
            removals: g(&self.removals),
            acks: g(&self.acks),
            nacks: g(&self.nacks),
            rejected_resources: g(&self.rejected_resources),
            requests: g(&self.requests),
            bytes_received: g(&self.bytes_received),
            address_bytes: g(&self.address_bytes),
            authorization_bytes: g(&self.authorization_bytes),
        }
    }

    pub(super) fn connected(&self) {
        inc(&self.connects, 1);
    }
    pub(super) fn connect_failed(&self) {
        inc(&self.connect_failures, 1);
    }
    pub(super) fn request_sent(&self) {
        inc(&self.requests, 1);
    }
    pub(super) fn response(&self, type_url: &str, bytes: usize, resources: usize, removals: usize) {
        let bytes = bytes as u64;
        inc(&self.responses, 1);
        inc(&self.resources, resources as u64);
        inc(&self.removals, removals as u64);
        inc(&self.bytes_received, bytes);
        if type_url == sidetunnel_proto::ADDRESS_TYPE_URL {
            inc(&self.address_bytes, bytes);
        } else if type_url == sidetunnel_proto::AUTHORIZATION_TYPE_URL {
            inc(&self.authorization_bytes, bytes);
        }
    }
    pub(super) fn acked(&self) {
        inc(&self.acks, 1);
    }
    pub(super) fn nacked(&self, rejected: usize) {
        inc(&self.nacks, 1);
        inc(&self.rejected_resources, rejected as u64);
    }
}
