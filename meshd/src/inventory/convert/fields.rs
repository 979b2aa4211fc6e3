//! Values several inventory items share, parsed and validated: IPs and
//! `network/IP` addresses, ports and port maps, proto enums by name,
//! waypoint and gateway addresses, required strings.

use std::net::IpAddr;

use bytes::Bytes;
use sidetunnel_proto::istio::workload::{
    GatewayAddress, NamespacedHostname, NetworkAddress, Port, gateway_address::Destination,
};

use super::Result;
use crate::inventory::model;

/// Port waypoints and gateways accept HBONE on unless told otherwise.
const DEFAULT_HBONE_PORT: u32 = 15008;

/// Parses a proto enum by name: accepts the proto spelling (`ONLY_HEALTHY`)
/// and CamelCase or lower case (`OnlyHealthy`, `deployment`).
pub(super) fn enum_value<E: Copy + Into<i32>>(
    field: &str,
    raw: &str,
    from_name: fn(&str) -> Option<E>,
    allowed: &[&str],
) -> Result<i32> {
    let mut norm = String::new();
    let mut prev_lower = false;
    for c in raw.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            norm.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        norm.push(c.to_ascii_uppercase());
    }
    from_name(&norm)
        .map(Into::into)
        .ok_or_else(|| format!("{field}: invalid value {raw:?} (expected one of {allowed:?})"))
}

pub(super) fn parse_ip(field: &str, s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| format!("{field}: invalid IP {s:?}"))
}

pub(super) fn ip_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    }
}

/// `ip` or `network/ip`.
pub(super) fn network_ip(field: &str, s: &str) -> Result<(String, IpAddr)> {
    match s.rsplit_once('/') {
        Some((net, ip)) => Ok((network(field, net)?, parse_ip(field, ip)?)),
        None => Ok((String::new(), parse_ip(field, s)?)),
    }
}

/// A network name: no '/', since `network/IP` resource names split on it
/// (the proxy rejects such a workload, so serving it would be a NACK).
pub(super) fn network(field: &str, name: &str) -> Result<String> {
    if name.contains('/') {
        return Err(format!("{field}: network name {name:?} contains '/'"));
    }
    Ok(name.to_owned())
}

pub(super) fn port(field: &str, p: u32) -> Result<u32> {
    if (1..=65535).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{field}: port {p} outside 1-65535"))
    }
}

pub(super) fn ports(field: &str, m: &model::PortMap) -> Result<Vec<Port>> {
    m.iter()
        .map(|(&sp, &tp)| {
            // A target port of 0 means "unknown, use the workload's own
            // mapping", as istiod sends for named target ports.
            let tp = if tp == 0 { 0 } else { port(field, tp)? };
            Ok(Port {
                service_port: port(field, sp)?,
                target_port: tp,
                ..Default::default()
            })
        })
        .collect()
}

pub(super) fn gateway(field: &str, g: &model::Gateway) -> Result<GatewayAddress> {
    let destination = match (&g.address, &g.hostname) {
        (Some(a), None) => {
            let (network, ip) = network_ip(&format!("{field}.address"), a)?;
            Destination::Address(NetworkAddress {
                network,
                address: ip_bytes(ip),
                length: None,
            })
        }
        (None, Some(h)) => {
            let (namespace, hostname) = h
                .split_once('/')
                .filter(|(n, h)| !n.is_empty() && !h.is_empty())
                .ok_or_else(|| format!("{field}.hostname: {h:?} is not namespace/hostname"))?;
            Destination::Hostname(NamespacedHostname {
                namespace: namespace.into(),
                hostname: hostname.into(),
            })
        }
        _ => return Err(format!("{field}: set exactly one of address, hostname")),
    };
    Ok(GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: port(
            &format!("{field}.port"),
            g.port.unwrap_or(DEFAULT_HBONE_PORT),
        )?,
    })
}

pub(super) fn required(field: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        Err(format!("{field} is required"))
    } else {
        Ok(())
    }
}
