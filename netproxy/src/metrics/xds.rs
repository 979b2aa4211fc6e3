//! Control-plane counters, read from the xDS client's live counters at
//! scrape time: `istio_xds_message_total` and
//! `istio_xds_message_bytes_total{url}` (ztunnel's names), plus
//! `sidetunnel_xds_*_total` for stream health (connects, failures, ACKs,
//! NACKs, rejected resources). Nothing is reported until a client is
//! attached.

use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Unit;

use crate::xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsCounters, XdsHandle};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeUrl {
    url: &'static str,
}

/// Scrape-time view of the xDS client's counters. Cheap to clone.
#[derive(Clone, Default)]
pub struct XdsMetrics {
    source: Arc<RwLock<Option<XdsHandle>>>,
}

impl std::fmt::Debug for XdsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsMetrics").finish_non_exhaustive()
    }
}

impl XdsMetrics {
    /// Reports `handle`'s counters from now on.
    pub fn attach(&self, handle: XdsHandle) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    fn snapshot(&self) -> Option<XdsCounters> {
        let guard = self.source.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|h| h.stats().snapshot())
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for XdsMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.snapshot() else {
            return Ok(());
        };
        counter(
            &mut enc,
            "istio_xds_message",
            "Total number of messages received (unstable)",
            c.responses,
        )?;
        {
            let bytes = ConstCounter::new(0u64);
            let mut family = enc.encode_descriptor(
                "istio_xds_message",
                "Total number of bytes received (unstable)",
                Some(&Unit::Bytes),
                bytes.metric_type(),
            )?;
            for (url, v) in [
                (ADDRESS_TYPE_URL, c.address_bytes),
                (AUTHORIZATION_TYPE_URL, c.authorization_bytes),
            ] {
                ConstCounter::new(v).encode(family.encode_family(&TypeUrl { url })?)?;
            }
        }
        for (name, help, v) in [
            (
                "sidetunnel_xds_connects",
                "xDS streams established",
                c.connects,
            ),
            (
                "sidetunnel_xds_connect_failures",
                "Failed xDS connection or stream attempts",
                c.connect_failures,
            ),
            (
                "sidetunnel_xds_resources",
                "Resources received (added or updated)",
                c.resources,
            ),
            (
                "sidetunnel_xds_removals",
                "Resource names received as removed",
                c.removals,
            ),
            ("sidetunnel_xds_acks", "ACKs sent", c.acks),
            ("sidetunnel_xds_nacks", "NACKs sent", c.nacks),
            (
                "sidetunnel_xds_rejected_resources",
                "Resources rejected by validation",
                c.rejected_resources,
            ),
            (
                "sidetunnel_xds_requests",
                "DeltaDiscoveryRequests sent",
                c.requests,
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        Ok(())
    }
}
