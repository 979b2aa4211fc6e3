//! Inbound plaintext: connections TPROXY'd to the plaintext port (the local
//! address of the accepted socket is the original destination). Under
//! STRICT they are rejected unless they come from a configured probe source
//! (normally the ruleset lets kubelet probes bypass the proxy entirely;
//! this is the same exemption should they reach it). Otherwise the
//! workload's policies apply without a peer identity, and the app sees the
//! client's address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::outbound::finish_copy;
use super::{Drain, ProxyInputs, upstream};
use crate::authz;
use crate::config::InboundPolicy;
use crate::hbone::copy_bidirectional;
use crate::metrics::{
    ConnectionOpen, Peer, Reporter, ResponseFlags, SecurityPolicy, TrafficMetrics,
};
use crate::socket;

const SOURCE_LOOKUP_BOUND: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("plaintext to the proxy's own port {0}")]
    SelfCall(SocketAddr),
    #[error("plaintext connection not allowed: inbound policy is STRICT (mTLS only)")]
    Strict,
    #[error("workload for {0} not known yet; refusing until config arrives")]
    UnknownWorkload(SocketAddr),
}

pub(super) async fn handle(
    pi: Arc<ProxyInputs>,
    mut client: TcpStream,
    src: SocketAddr,
    _drain: Drain,
) {
    let Ok(dst) = client.local_addr().map(socket::canonical) else {
        return;
    };
    if pi.cfg.ports.self_call_ports().contains(&dst.port()) {
        socket::reset(client);
        return TrafficMetrics::early_failure(
            Reporter::Destination,
            src,
            dst,
            &Refused::SelfCall(dst),
        );
    }
    let Some(me) = pi.store.workload_by_ip(pi.network(), dst.ip()) else {
        socket::reset(client);
        return TrafficMetrics::early_failure(
            Reporter::Destination,
            src,
            dst,
            &Refused::UnknownWorkload(dst),
        );
    };
    let source = pi.workload_at(src.ip(), SOURCE_LOOKUP_BOUND).await;
    let rec = pi.metrics.traffic.open(ConnectionOpen {
        reporter: Reporter::Destination,
        src,
        dst,
        hbone_target: None,
        source: Peer {
            workload: source,
            identity: None,
        },
        destination: Peer {
            workload: Some(me.clone()),
            identity: None,
        },
        destination_service: None,
        security: SecurityPolicy::Unknown,
    });
    let probe = pi.cfg.probe_sources.iter().any(|n| n.contains(&src.ip()));
    if pi.cfg.inbound_policy == InboundPolicy::Strict && !probe {
        socket::reset(client);
        return rec.finish(
            ResponseFlags::AuthorizationPolicyDenied,
            Some(&Refused::Strict),
        );
    }
    let conn = authz::Connection {
        src,
        dst,
        src_identity: None,
    };
    if let Err(denied) = authz::check(&pi.store.policies_for(&me), &conn) {
        socket::reset(client);
        return rec.finish(ResponseFlags::AuthorizationPolicyDenied, Some(&denied));
    }
    let mut app = match upstream::connect_app(&pi, dst, src.ip()).await {
        Ok((s, _)) => s,
        Err(e) => {
            socket::reset(client);
            return rec.finish(ResponseFlags::ConnectionFailure, Some(&e));
        }
    };
    let r = copy_bidirectional(&mut client, &mut app, None).await;
    finish_copy(rec, r.a_to_b, r.b_to_a, r.error);
}
