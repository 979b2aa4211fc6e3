//! Where an outbound connection goes: the original destination looked up in
//! the store (workload IP first, then service VIP; fetched on demand on a
//! miss), a service endpoint chosen by its load-balancing settings, the
//! service port mapped to the endpoint's target port, and the transport —
//! HBONE to the endpoint (or its waypoint) when the destination is in the
//! mesh, plain TCP otherwise. Pure decisions over store data, so they are
//! unit-tested without sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::seq::IndexedRandom;

use crate::identity::Identity;
use crate::state::{
    Address, GatewayAddress, GatewayDestination, Service, Store, TunnelProtocol, Workload,
};

/// The chosen upstream.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// HTTP/2 CONNECT over mTLS to `connect_to` (pod or waypoint, port
    /// 15008), asking for `authority`.
    Hbone {
        connect_to: SocketAddr,
        authority: SocketAddr,
        /// Identities the server certificate may carry.
        identities: Vec<Identity>,
        /// The final destination workload (not the waypoint).
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
        /// Set when the hop is a waypoint.
        via_waypoint: bool,
    },
    /// Plain TCP to `addr` (destination outside the mesh).
    Passthrough {
        addr: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

impl Upstream {
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Upstream::Hbone { workload, .. } | Upstream::Passthrough { workload, .. } => {
                workload.as_ref()
            }
        }
    }
    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Upstream::Hbone { service, .. } | Upstream::Passthrough { service, .. } => {
                service.as_ref()
            }
        }
    }
}

/// Why no upstream could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("service {service} has no usable endpoint for port {port}")]
    NoEndpoint { service: String, port: u16 },
    #[error("workload {0} has no IP address")]
    NoAddress(String),
    #[error("waypoint {0} not found")]
    WaypointNotFound(String),
    #[error("identity {value:?} of {what} is invalid: {reason}")]
    BadIdentity {
        what: String,
        value: String,
        reason: String,
    },
}

/// Resolves `dst` (the app's original destination) from `source`'s point
/// of view. `network` is the pod's network.
pub fn resolve(
    store: &Store,
    network: &str,
    source: Option<&Workload>,
    dst: SocketAddr,
    hbone_port: u16,
) -> Result<Upstream, RouteError> {
    match store.lookup_address(network, dst.ip()) {
        Some(Address::Workload(w)) => to_workload(store, source, w, dst, None, hbone_port),
        Some(Address::Service(s)) => to_service(store, source, s, dst, hbone_port),
        None => Ok(Upstream::Passthrough {
            addr: dst,
            workload: None,
            service: None,
        }),
    }
}

/// A workload addressed directly (or chosen as a service endpoint).
fn to_workload(
    store: &Store,
    source: Option<&Workload>,
    w: Arc<Workload>,
    dst: SocketAddr,
    service: Option<Arc<Service>>,
    hbone_port: u16,
) -> Result<Upstream, RouteError> {
    // A waypoint never sends to its own waypoint (it *is* the waypoint).
    if service.is_none()
        && let Some(wp) = w.waypoint.clone()
        && !is_self(source, &wp, store)
    {
        return via_waypoint(store, &wp, dst, Some(w), None);
    }
    if w.protocol != TunnelProtocol::Hbone {
        return Ok(Upstream::Passthrough {
            addr: dst,
            workload: Some(w),
            service,
        });
    }
    let mut identities = vec![identity_of(&w)?];
    if let Some(s) = &service {
        identities.extend(service_sans(s));
    }
    Ok(Upstream::Hbone {
        connect_to: SocketAddr::new(dst.ip(), hbone_port),
        authority: dst,
        identities,
        workload: Some(w),
        service,
        via_waypoint: false,
    })
}

fn to_service(
    store: &Store,
    source: Option<&Workload>,
    s: Arc<Service>,
    dst: SocketAddr,
    hbone_port: u16,
) -> Result<Upstream, RouteError> {
    if let Some(wp) = s.waypoint.clone()
        && !is_self(source, &wp, store)
    {
        return via_waypoint(store, &wp, dst, None, Some(s));
    }
    let lb = s.load_balancing.as_ref();
    if lb.is_some_and(|lb| lb.mode == "PASSTHROUGH") {
        // Istio: connect to the address the client used, no endpoint pick.
        return Ok(Upstream::Passthrough {
            addr: dst,
            workload: None,
            service: Some(s),
        });
    }
    let Some(&svc_target) = s.ports.get(&dst.port()) else {
        return Err(RouteError::NoServicePort {
            service: s.key(),
            port: dst.port(),
        });
    };
    let (w, target_port) = pick_endpoint(store, source, &s, dst.port(), svc_target, dst.ip())
        .ok_or_else(|| RouteError::NoEndpoint {
            service: s.key(),
            port: dst.port(),
        })?;
    let ip = endpoint_ip(&w, dst.ip())?;
    to_workload(
        store,
        source,
        w,
        SocketAddr::new(ip, target_port),
        Some(s),
        hbone_port,
    )
}

/// Endpoint choice: usable endpoints (have an address of the VIP's family,
/// a target port, and are healthy unless the policy allows all), ranked by
/// routing preference in STRICT/FAILOVER modes, then uniformly at random
/// among the best.
fn pick_endpoint(
    store: &Store,
    source: Option<&Workload>,
    s: &Service,
    port: u16,
    svc_target: u16,
    vip: IpAddr,
) -> Option<(Arc<Workload>, u16)> {
    let lb = s.load_balancing.as_ref();
    let allow_unhealthy = lb.is_some_and(|lb| lb.health_policy == "ALLOW_ALL");
    let key = s.key();
    let usable: Vec<(Arc<Workload>, u16)> = store
        .service_endpoints(s)
        .into_iter()
        .filter(|w| allow_unhealthy || w.healthy())
        .filter(|w| endpoint_ip(w, vip).is_ok())
        .filter_map(|w| {
            let target = w
                .services
                .get(&key)
                .and_then(|m| m.get(&port).copied())
                .filter(|p| *p != 0)
                .or((svc_target != 0).then_some(svc_target))?;
            Some((w, target))
        })
        .collect();
    let ranked: Vec<(Arc<Workload>, u16)> = match lb {
        Some(lb) if matches!(lb.mode.as_str(), "STRICT" | "FAILOVER") => {
            let strict = lb.mode == "STRICT";
            let scored: Vec<(usize, (Arc<Workload>, u16))> = usable
                .into_iter()
                .filter_map(|e| {
                    let r = rank(source, &e.0, &lb.routing_preference);
                    (!strict || r == lb.routing_preference.len()).then_some((r, e))
                })
                .collect();
            let best = scored.iter().map(|(r, _)| *r).max()?;
            scored
                .into_iter()
                .filter(|(r, _)| *r == best)
                .map(|(_, e)| e)
                .collect()
        }
        _ => usable,
    };
    ranked.choose(&mut rand::rng()).cloned()
}

/// How many routing-preference scopes, in order, `w` shares with the
/// source. A leading NETWORK scope dominates: a same-network endpoint
/// outranks any other-network one (Istio's network-first semantics).
fn rank(source: Option<&Workload>, w: &Workload, prefs: &[String]) -> usize {
    let Some(src) = source else { return 0 };
    let loc = |x: &Workload| x.locality.clone().unwrap_or_default();
    let (sl, wl) = (loc(src), loc(w));
    let network_first = prefs.first().is_some_and(|p| p == "NETWORK");
    let mut rank = 0;
    let mut bonus = 0;
    for p in prefs {
        let m = match p.as_str() {
            "REGION" => sl.region == wl.region,
            "ZONE" => sl.zone == wl.zone,
            "SUBZONE" => sl.subzone == wl.subzone,
            "NODE" => src.node == w.node,
            "CLUSTER" => src.cluster_id == w.cluster_id,
            "NETWORK" => {
                let m = src.network == w.network;
                if network_first {
                    if m {
                        bonus = prefs.len() - 1;
                    } else {
                        continue;
                    }
                }
                m
            }
            _ => false,
        };
        if !m {
            break;
        }
        rank += 1;
    }
    rank + bonus
}

/// The endpoint's address of the same family as the VIP (dual-stack
/// services may have endpoints of both families).
fn endpoint_ip(w: &Workload, like: IpAddr) -> Result<IpAddr, RouteError> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or(w.addresses.first())
        .copied()
        .ok_or_else(|| RouteError::NoAddress(w.uid.clone()))
}

fn via_waypoint(
    store: &Store,
    wp: &GatewayAddress,
    dst: SocketAddr,
    workload: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
) -> Result<Upstream, RouteError> {
    let (wp_workload, wp_ip) = waypoint_endpoint(store, wp)?;
    Ok(Upstream::Hbone {
        connect_to: SocketAddr::new(wp_ip, wp.hbone_mtls_port),
        authority: dst,
        identities: vec![identity_of(&wp_workload)?],
        workload,
        service,
        via_waypoint: true,
    })
}

/// A waypoint workload to connect to: the waypoint named by hostname (a
/// service: pick one of its endpoints) or by address.
fn waypoint_endpoint(
    store: &Store,
    wp: &GatewayAddress,
) -> Result<(Arc<Workload>, IpAddr), RouteError> {
    let not_found = || RouteError::WaypointNotFound(format!("{:?}", wp.destination));
    let addr = match &wp.destination {
        GatewayDestination::Hostname(h) => store
            .service_by_hostname(&h.namespace, &h.hostname)
            .map(Address::Service),
        GatewayDestination::Address(a) => store.lookup_address(&a.network, a.address),
    }
    .ok_or_else(not_found)?;
    match addr {
        Address::Workload(w) => {
            let ip = w.addresses.first().copied().ok_or_else(not_found)?;
            Ok((w, ip))
        }
        Address::Service(s) => {
            let endpoints: Vec<Arc<Workload>> = store
                .service_endpoints(&s)
                .into_iter()
                .filter(|w| w.healthy() && !w.addresses.is_empty())
                .collect();
            let w = endpoints
                .choose(&mut rand::rng())
                .cloned()
                .ok_or_else(not_found)?;
            let ip = w.addresses[0];
            Ok((w, ip))
        }
    }
}

/// Whether the source itself is the waypoint `wp` (then it must not
/// route to itself).
fn is_self(source: Option<&Workload>, wp: &GatewayAddress, store: &Store) -> bool {
    let Some(src) = source else { return false };
    match &wp.destination {
        GatewayDestination::Address(a) => src.addresses.contains(&a.address),
        GatewayDestination::Hostname(h) => store
            .service_by_hostname(&h.namespace, &h.hostname)
            .is_some_and(|s| src.services.contains_key(&s.key())),
    }
}

fn identity_of(w: &Workload) -> Result<Identity, RouteError> {
    w.identity().parse().map_err(
        |e: crate::identity::IdentityParseError| RouteError::BadIdentity {
            what: w.uid.clone(),
            value: w.identity(),
            reason: e.to_string(),
        },
    )
}

/// A service's subject alt names that are SPIFFE identities (others, e.g.
/// DNS names, cannot match an Istio workload certificate).
fn service_sans(s: &Service) -> Vec<Identity> {
    s.subject_alt_names
        .iter()
        .filter_map(|san| san.parse::<Identity>().ok())
        .collect()
}

#[cfg(test)]
mod tests;
