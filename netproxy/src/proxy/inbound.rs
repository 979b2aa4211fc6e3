//! Inbound HBONE: TLS with client-certificate verification (the peer's
//! SPIFFE identity and trust domain), HTTP/2, then per CONNECT stream:
//! * 400 when the target is not this pod or is one of the proxy's ports;
//! * 503 when this pod's workload is unknown (policies cannot be known:
//!   fail closed);
//! * 401 when authorization denies (counted with `response_flags="DENY"`);
//! * 503 when the app does not accept the connection;
//! * 401 when the client's certificate that authenticated this (long-lived,
//!   pooled) connection has expired since, 503 when ours has: a stream is
//!   never accepted on the strength of an expired certificate;
//! * 503 when the connection table is full (`--max-connections`);
//! * 200 only after the app accepted, then bytes flow.
//!
//! The source seen by authorization and by the app is the TCP peer of the
//! HBONE connection (the client pod's IP, where its proxy runs), not the
//! client-asserted `forwarded` header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::debug;

use super::outbound::finish_copy;
use super::{Drain, ProxyInputs, upstream};
use crate::authz;
use crate::hbone::{InboundRequest, serve_connection};
use crate::metrics::{
    ConnectionOpen, Peer, Reporter, ResponseFlags, SecurityPolicy, TrafficMetrics,
};
use crate::socket;
use crate::state::{Address, Service, Workload};
use crate::tls::HboneAcceptor;

/// How long the first connection from an unknown source waits for its
/// workload or service (for metric labels only).
const SOURCE_LOOKUP_BOUND: Duration = Duration::from_secs(1);

pub(super) async fn handle(
    pi: Arc<ProxyInputs>,
    acceptor: HboneAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: Drain,
) {
    let local = tcp.local_addr().map(socket::canonical).unwrap_or(peer);
    // Our certificate as of the handshake: a rotation during it can only
    // present a later-expiring one, so this bound is conservative.
    let own_expiry = pi.certs.current().map(|c| c.not_after());
    let handshake = tokio::time::timeout(pi.cfg.connect_timeout, acceptor.accept(tcp)).await;
    let (tls, peer_id) = match handshake {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return TrafficMetrics::early_failure(Reporter::Destination, peer, local, &e),
        Err(_) => {
            return TrafficMetrics::early_failure(
                Reporter::Destination,
                peer,
                local,
                &"TLS handshake timed out",
            );
        }
    };
    debug!(%peer, identity = %peer_id, "HBONE connection accepted");
    let expiry = CertExpiry {
        own: own_expiry,
        peer: crate::tls::peer_not_after(tls.get_ref().1),
    };
    let d = drain.clone();
    let shutdown = async move { d.accepting_stopped().await };
    let handler = |req: InboundRequest| {
        let pi = pi.clone();
        drain.track(serve_stream(pi, req, peer, local, expiry))
    };
    if let Err(e) = serve_connection(tls, peer_id, &pi.h2, shutdown, handler).await {
        debug!(%peer, "HBONE connection ended: {e}");
    }
}

/// When the two certificates that authenticated one HBONE connection
/// expire (`None`: unknown, treated as expired).
#[derive(Debug, Clone, Copy)]
pub(super) struct CertExpiry {
    own: Option<SystemTime>,
    peer: Option<SystemTime>,
}

pub(super) async fn serve_stream(
    pi: Arc<ProxyInputs>,
    req: InboundRequest,
    peer: SocketAddr,
    local: SocketAddr,
    expiry: CertExpiry,
) {
    // Each stream holds an upstream socket and buffers: it takes an entry
    // of the connection table (see `limits`) or is refused with 503.
    let Some(_slot) = pi.connections.try_acquire(super::Listener::HboneStream) else {
        return req.reject(StatusCode::SERVICE_UNAVAILABLE);
    };
    let now = SystemTime::now();
    let expired = |t: Option<SystemTime>| t.is_none_or(|t| now >= t);
    if expired(expiry.peer) || expired(expiry.own) {
        let (whose, status) = match expired(expiry.peer) {
            true => ("client", StatusCode::UNAUTHORIZED),
            false => ("server", StatusCode::SERVICE_UNAVAILABLE),
        };
        TrafficMetrics::early_failure(
            Reporter::Destination,
            peer,
            local,
            &format!("{whose} certificate of this HBONE connection has expired"),
        );
        return req.reject(status);
    }
    let target = req.destination();
    if !(target.ip() == local.ip() || pi.local_ips.contains(&target.ip()))
        || pi.cfg.ports.self_call_ports().contains(&target.port())
    {
        TrafficMetrics::early_failure(
            Reporter::Destination,
            peer,
            local,
            &format!("HBONE target {target} is not an app port of this pod"),
        );
        return req.reject(StatusCode::BAD_REQUEST);
    }
    let Some(me) = pi.store.workload_by_ip(pi.network(), target.ip()) else {
        TrafficMetrics::early_failure(
            Reporter::Destination,
            peer,
            local,
            &format!("workload for {target} not known yet; refusing until config arrives"),
        );
        return req.reject(StatusCode::SERVICE_UNAVAILABLE);
    };
    let peer_id = req.peer_identity().clone();
    let source = pi.workload_at(peer.ip(), SOURCE_LOOKUP_BOUND).await;
    let service = inbound_service(&pi, &me, req.forwarded_host().as_deref(), target.port()).await;
    let rec = pi.metrics.traffic.open(ConnectionOpen {
        reporter: Reporter::Destination,
        src: peer,
        dst: local,
        hbone_target: Some(target),
        source: Peer {
            workload: source,
            identity: Some(peer_id.clone()),
        },
        destination: Peer {
            workload: Some(me.clone()),
            identity: Some(pi.identity()),
        },
        destination_service: service,
        security: SecurityPolicy::MutualTls,
    });
    let conn = authz::Connection {
        src: peer,
        dst: target,
        src_identity: Some(&peer_id),
    };
    if let Err(denied) = authz::check(&pi.store.policies_for(&me), &conn) {
        req.reject(StatusCode::UNAUTHORIZED);
        return rec.finish(ResponseFlags::AuthorizationPolicyDenied, Some(&denied));
    }
    let mut app = match upstream::connect_app(&pi, target, peer.ip()).await {
        Ok((s, _)) => s,
        Err(e) => {
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            return rec.finish(ResponseFlags::ConnectionFailure, Some(&e));
        }
    };
    match req.accept_and_splice(&mut app, None).await {
        Ok(r) => finish_copy(rec, r.a_to_b, r.b_to_a, r.error),
        Err(e) => rec.finish(ResponseFlags::ConnectionFailure, Some(&e)),
    }
}

/// The service the client addressed, for metric labels: the one named in
/// `forwarded: host=` when this workload backs it, else the only service
/// of this workload exposing the target port. Only the workload's own
/// services are looked up (bounded), so a client cannot make the proxy
/// fetch arbitrary names.
async fn inbound_service(
    pi: &ProxyInputs,
    me: &Workload,
    host: Option<&str>,
    port: u16,
) -> Option<Arc<Service>> {
    let key = match host {
        Some(h) => me
            .services
            .keys()
            .find(|k| k.split_once('/').is_some_and(|(_, kh)| kh == h))?,
        None => {
            let mut by_port = me
                .services
                .iter()
                .filter(|(_, ports)| ports.values().any(|t| *t == port))
                .map(|(k, _)| k);
            let first = by_port.next()?;
            if by_port.next().is_some() {
                return None;
            }
            first
        }
    };
    let (ns, hostname) = key.split_once('/')?;
    if let Some(s) = pi.store.service_by_hostname(ns, hostname) {
        return Some(s);
    }
    match tokio::time::timeout(SOURCE_LOOKUP_BOUND, pi.store.fetch_name(key)).await {
        Ok(Ok(Some(Address::Service(s)))) => Some(s),
        _ => None,
    }
}
