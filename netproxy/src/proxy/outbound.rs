//! Outbound: an app connection redirected to the outbound port. The
//! original destination decides the upstream (see `route`): HBONE through
//! the pool, or plain TCP from a marked socket. Connections to the proxy's
//! own capture ports are refused; a destination the store does not know is
//! fetched on demand (bounded) and, if the control plane does not answer in
//! time, the connection fails rather than leaving the mesh unencrypted.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

use super::route::{self, Upstream};
use super::{Drain, ProxyInputs};
use crate::hbone::{Baggage, ConnectRequest, FIRST_DATA_MAX, copy_bidirectional};
use crate::metrics::{
    ConnectionOpen, ConnectionRecorder, Peer, Reporter, ResponseFlags, SecurityPolicy,
    TrafficMetrics,
};
use crate::socket;
use crate::state::Workload;

#[derive(Debug, thiserror::Error)]
enum EarlyError {
    #[error("no original destination: {0}")]
    NoOriginalDst(std::io::Error),
    #[error("refusing a call to the proxy's own port {0} (would loop)")]
    SelfCall(SocketAddr),
    #[error("destination lookup: {0}")]
    Lookup(#[from] crate::state::FetchError),
}

pub(super) async fn handle(
    pi: Arc<ProxyInputs>,
    mut app: TcpStream,
    src: SocketAddr,
    _drain: Drain,
) {
    let dst = match socket::original_dst(&app) {
        Ok(d) => d,
        Err(e) => {
            let local = app.local_addr().map(socket::canonical).unwrap_or(src);
            socket::reset(app);
            return TrafficMetrics::early_failure(
                Reporter::Source,
                src,
                local,
                &EarlyError::NoOriginalDst(e),
            );
        }
    };
    if pi.is_self_call(dst) {
        socket::reset(app);
        return TrafficMetrics::early_failure(
            Reporter::Source,
            src,
            dst,
            &EarlyError::SelfCall(dst),
        );
    }
    // Make sure the store knows the destination (on-demand mode asks the
    // control plane; wildcard mode already holds everything).
    if pi.store.lookup_address(pi.network(), dst.ip()).is_none()
        && let Err(e) = Box::pin(pi.store.fetch_on_demand(pi.network(), dst.ip())).await
    {
        socket::reset(app);
        return TrafficMetrics::early_failure(Reporter::Source, src, dst, &EarlyError::Lookup(e));
    }
    let source = pi.store.workload_by_ip(pi.network(), src.ip());
    let upstream = route::resolve(
        &pi.store,
        pi.network(),
        source.as_deref(),
        dst,
        pi.cfg.ports.hbone,
    );
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            socket::reset(app);
            let rec = pi.metrics.traffic.open(ConnectionOpen {
                reporter: Reporter::Source,
                src,
                dst,
                hbone_target: None,
                source: Peer {
                    workload: source,
                    identity: None,
                },
                destination: Peer::default(),
                destination_service: None,
                security: SecurityPolicy::Unknown,
            });
            return rec.finish(ResponseFlags::ConnectionFailure, Some(&e));
        }
    };
    match upstream {
        Upstream::Passthrough {
            addr,
            workload,
            service,
        } => {
            let rec = pi.metrics.traffic.open(ConnectionOpen {
                reporter: Reporter::Source,
                src,
                dst: addr,
                hbone_target: None,
                source: Peer {
                    workload: source,
                    identity: None,
                },
                destination: Peer {
                    workload,
                    identity: None,
                },
                destination_service: service,
                security: SecurityPolicy::Unknown,
            });
            let mut up = match Box::pin(socket::connect(
                addr,
                None,
                pi.cfg.mark,
                pi.cfg.connect_timeout,
            ))
            .await
            {
                Ok((s, _, _)) => s,
                Err(e) => {
                    socket::reset(app);
                    return rec.finish(ResponseFlags::ConnectionFailure, Some(&e));
                }
            };
            let r = copy_bidirectional(&mut app, &mut up, None).await;
            finish_copy(rec, r.a_to_b, r.b_to_a, r.error);
        }
        Upstream::Hbone {
            connect_to,
            authority,
            identities,
            workload,
            service,
            via_waypoint: _,
        } => {
            let rec = pi.metrics.traffic.open(ConnectionOpen {
                reporter: Reporter::Source,
                src,
                dst: connect_to,
                hbone_target: Some(authority),
                source: Peer {
                    workload: source.clone(),
                    identity: Some(pi.identity()),
                },
                destination: Peer {
                    workload,
                    identity: identities.first().cloned(),
                },
                destination_service: service.clone(),
                security: SecurityPolicy::MutualTls,
            });
            let first = match already_sent(&app) {
                Ok(b) => b,
                Err(e) => {
                    socket::reset(app);
                    return rec.finish(ResponseFlags::ConnectionFailure, Some(&e));
                }
            };
            let sent_first = first.len() as u64;
            let req = ConnectRequest {
                authority,
                source: src,
                service_host: service.as_ref().map(|s| s.hostname.clone()),
                baggage: source.as_deref().map(baggage),
                traceparent: None,
            };
            // Boxed, like every setup step of this task: dialing and the
            // CONNECT exchange are its largest state (4.6 KiB in release)
            // and are needed only until the tunnel is up, while the task's
            // own future lives as long as the connection.
            let connect = pi
                .pool
                .connect_with_data(connect_to, &identities, &req, first);
            let mut tunnel = match Box::pin(connect).await {
                Ok((t, _peer)) => t,
                Err(e) => {
                    socket::reset(app);
                    return rec.finish(super::hbone_flag(&e), Some(&e));
                }
            };
            let r = copy_bidirectional(&mut app, &mut tunnel, None).await;
            if r.error.is_some() {
                tunnel.reset();
            }
            finish_copy(rec, sent_first + r.a_to_b, r.b_to_a, r.error);
        }
    }
}

/// What the app has already written (clients usually send their request
/// right after `connect`), without waiting: it travels with the CONNECT
/// headers (see [`crate::hbone::Pool::connect_with_data`]). Empty when
/// nothing is there yet or the app already half-closed (the splice then
/// reads the EOF again).
fn already_sent(app: &TcpStream) -> std::io::Result<Bytes> {
    // On the heap, not the stack: the compiler may lay a stack array out
    // in the connection task's future, which lives as long as the
    // connection.
    let mut buf = Vec::with_capacity(FIRST_DATA_MAX);
    match app.try_read_buf(&mut buf) {
        Ok(_) => Ok(Bytes::copy_from_slice(&buf)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

/// Records the end of a splice: `from_client` bytes went client → upstream.
pub(super) fn finish_copy(
    rec: ConnectionRecorder,
    from_client: u64,
    to_client: u64,
    error: Option<std::io::Error>,
) {
    rec.add_received(from_client);
    rec.add_sent(to_client);
    match error {
        // Mid-stream resets are how TCP connections often end; they are
        // logged, not counted as failed connections (as Istio does).
        Some(e) => rec.finish(ResponseFlags::None, Some(&e)),
        None => rec.finish(ResponseFlags::None, None),
    }
}

/// The `baggage` header describing the source workload (ztunnel sends it so
/// the destination can label metrics without a lookup).
fn baggage(w: &Workload) -> String {
    let kind = format!("{:?}", w.workload_type).to_lowercase();
    Baggage {
        cluster_id: Some(w.cluster_id.clone()).filter(|s| !s.is_empty()),
        namespace: Some(w.namespace.clone()),
        workload_kind: Some(kind),
        workload_name: Some(w.workload_name.clone()).filter(|s| !s.is_empty()),
        service_name: Some(w.canonical_name.clone()).filter(|s| !s.is_empty()),
        service_version: Some(w.canonical_revision.clone()).filter(|s| !s.is_empty()),
        region: w
            .locality
            .as_ref()
            .map(|l| l.region.clone())
            .filter(|s| !s.is_empty()),
        zone: w
            .locality
            .as_ref()
            .map(|l| l.zone.clone())
            .filter(|s| !s.is_empty()),
    }
    .to_header()
}
