//! Conversion of Istio protos into the store's domain types, validating as it
//! goes: a resource that fails here is NACKed by name while the rest of its
//! response is applied. What is rejected: missing required names, a resource
//! name that is not the one istiod would give the object (removals are by
//! name, so a mismatch would leave it unremovable), IPs that are not 4 or 16
//! bytes, prefix lengths beyond the family, ports beyond 65535, enum values
//! this proxy does not know (acting on a misunderstood policy is unsafe),
//! and empty oneofs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use sidetunnel_proto::istio::security as xsec;
use sidetunnel_proto::istio::workload as xwl;

use super::types::*;

/// Why a resource was rejected (the xDS client NACKs it with this text).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    /// Path of the offending field, e.g. `workload.addresses[1]`.
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn required(field: &str, value: &str) -> Result<String, ConvertError> {
    if value.is_empty() {
        Err(err(field, "must not be empty"))
    } else {
        Ok(value.to_string())
    }
}

/// Converts a 4- or 16-byte `bytes` field to an IP.
pub fn ip_from_bytes(field: &str, b: &[u8]) -> Result<IpAddr, ConvertError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(b).unwrap_or_default(),
        ))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(b).unwrap_or_default(),
        ))),
        n => Err(err(
            field,
            format!("IP address must be 4 or 16 bytes, got {n}"),
        )),
    }
}

fn port(field: &str, p: u32) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| err(field, format!("port {p} out of range")))
}

/// Decodes a proto enum, rejecting values this build does not know.
fn known_enum<E: TryFrom<i32>>(field: &str, v: i32) -> Result<E, ConvertError> {
    E::try_from(v).map_err(|_| err(field, format!("unknown enum value {v}")))
}

/// Converts an Address resource named `name`.
pub fn address(name: &str, a: &xwl::Address) -> Result<Address, ConvertError> {
    match &a.r#type {
        Some(xwl::address::Type::Workload(w)) => {
            let w = workload(w)?;
            if w.uid != name {
                return Err(err(
                    "workload.uid",
                    format!("resource name {name:?} differs from uid {:?}", w.uid),
                ));
            }
            Ok(Address::Workload(Arc::new(w)))
        }
        Some(xwl::address::Type::Service(s)) => {
            let s = service(s)?;
            if s.key() != name {
                return Err(err(
                    "service",
                    format!(
                        "resource name {name:?} differs from namespace/hostname {:?}",
                        s.key()
                    ),
                ));
            }
            Ok(Address::Service(Arc::new(s)))
        }
        None => Err(err("address.type", "neither workload nor service is set")),
    }
}

/// Converts and validates a Workload.
pub fn workload(w: &xwl::Workload) -> Result<Workload, ConvertError> {
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, b)| ip_from_bytes(&format!("workload.addresses[{i}]"), b))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match known_enum("workload.tunnel_protocol", w.tunnel_protocol)? {
        xwl::TunnelProtocol::None => TunnelProtocol::None,
        xwl::TunnelProtocol::Hbone => TunnelProtocol::Hbone,
        xwl::TunnelProtocol::LegacyIstioMtls => TunnelProtocol::LegacyIstioMtls,
    };
    let status = match known_enum("workload.status", w.status)? {
        xwl::WorkloadStatus::Healthy => HealthStatus::Healthy,
        xwl::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    let workload_type = match known_enum("workload.workload_type", w.workload_type)? {
        xwl::WorkloadType::Deployment => WorkloadType::Deployment,
        xwl::WorkloadType::Cronjob => WorkloadType::Cronjob,
        xwl::WorkloadType::Pod => WorkloadType::Pod,
        xwl::WorkloadType::Job => WorkloadType::Job,
    };
    let network_mode = match known_enum("workload.network_mode", w.network_mode)? {
        xwl::NetworkMode::Standard => NetworkMode::Standard,
        xwl::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
    };
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let field = format!("workload.services[{key}]");
        if !key
            .split_once('/')
            .is_some_and(|(ns, h)| !ns.is_empty() && !h.is_empty())
        {
            return Err(err(field, "key must be namespace/hostname"));
        }
        services.insert(key.clone(), port_map(&field, &list.ports)?);
    }
    Ok(Workload {
        uid: required("workload.uid", &w.uid)?,
        name: required("workload.name", &w.name)?,
        namespace: required("workload.namespace", &w.namespace)?,
        service_account: w.service_account.clone(),
        trust_domain: w.trust_domain.clone(),
        addresses,
        hostname: w.hostname.clone(),
        network: network_name("workload.network", &w.network)?,
        protocol,
        waypoint: w
            .waypoint
            .as_ref()
            .map(|g| gateway("workload.waypoint", g))
            .transpose()?,
        network_gateway: w
            .network_gateway
            .as_ref()
            .map(|g| gateway("workload.network_gateway", g))
            .transpose()?,
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        workload_type,
        cluster_id: w.cluster_id.clone(),
        network_mode,
        services,
        authorization_policies: w.authorization_policies.clone(),
        status,
        locality: w.locality.as_ref().map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
    })
}

fn port_map(field: &str, ports: &[xwl::Port]) -> Result<PortMap, ConvertError> {
    ports
        .iter()
        .map(|p| {
            Ok((
                port(&format!("{field}.service_port"), p.service_port)?,
                port(&format!("{field}.target_port"), p.target_port)?,
            ))
        })
        .collect()
}

fn network_address(field: &str, a: &xwl::NetworkAddress) -> Result<NetworkAddr, ConvertError> {
    Ok(NetworkAddr::new(
        network_name(&format!("{field}.network"), &a.network)?,
        ip_from_bytes(&format!("{field}.address"), &a.address)?,
    ))
}

/// Network names are Kubernetes label values, which never contain `/`; one
/// that did would make the `network/IP` alias ambiguous, so lookups and
/// removals by alias would silently miss (found by the xds_address fuzzer).
fn network_name(field: &str, network: &str) -> Result<String, ConvertError> {
    if network.contains('/') {
        return Err(err(field, format!("network name {network:?} contains '/'")));
    }
    Ok(network.to_owned())
}

fn gateway(field: &str, g: &xwl::GatewayAddress) -> Result<GatewayAddress, ConvertError> {
    let destination = match &g.destination {
        Some(xwl::gateway_address::Destination::Hostname(h)) => {
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: required(&format!("{field}.hostname.namespace"), &h.namespace)?,
                hostname: required(&format!("{field}.hostname.hostname"), &h.hostname)?,
            })
        }
        Some(xwl::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(network_address(&format!("{field}.address"), a)?)
        }
        None => return Err(err(field, "destination is not set")),
    };
    // istiod leaves the port at 0 to mean the standard HBONE port.
    let hbone_mtls_port = match port(&format!("{field}.hbone_mtls_port"), g.hbone_mtls_port)? {
        0 => 15008,
        p => p,
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

/// Converts and validates a Service.
pub fn service(s: &xwl::Service) -> Result<Service, ConvertError> {
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| network_address(&format!("service.addresses[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancing = s
        .load_balancing
        .as_ref()
        .map(|lb| {
            let routing_preference = lb
                .routing_preference
                .iter()
                .map(|v| {
                    known_enum::<xwl::load_balancing::Scope>("service.load_balancing.scope", *v)
                        .map(|s| s.as_str_name().to_string())
                })
                .collect::<Result<_, _>>()?;
            let mode: xwl::load_balancing::Mode =
                known_enum("service.load_balancing.mode", lb.mode)?;
            let health: xwl::load_balancing::HealthPolicy =
                known_enum("service.load_balancing.health_policy", lb.health_policy)?;
            Ok::<_, ConvertError>(LoadBalancing {
                routing_preference,
                mode: mode.as_str_name().to_string(),
                health_policy: health.as_str_name().to_string(),
            })
        })
        .transpose()?;
    Ok(Service {
        name: required("service.name", &s.name)?,
        namespace: required("service.namespace", &s.namespace)?,
        hostname: required("service.hostname", &s.hostname)?,
        vips,
        ports: port_map("service.ports", &s.ports)?,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s
            .waypoint
            .as_ref()
            .map(|g| gateway("service.waypoint", g))
            .transpose()?,
        load_balancing,
    })
}

/// Converts an Authorization resource named `name` (`namespace/name`).
pub fn policy(name: &str, a: &xsec::Authorization) -> Result<Policy, ConvertError> {
    let scope = match known_enum("authorization.scope", a.scope)? {
        xsec::Scope::Global => PolicyScope::Global,
        xsec::Scope::Namespace => PolicyScope::Namespace,
        xsec::Scope::WorkloadSelector => PolicyScope::WorkloadSelector,
    };
    let action = match known_enum("authorization.action", a.action)? {
        xsec::Action::Allow => PolicyAction::Allow,
        xsec::Action::Deny => PolicyAction::Deny,
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let matches = clause
                .matches
                .iter()
                .enumerate()
                .map(|(m, mt)| {
                    policy_match(
                        &format!("authorization.rules[{r}].clauses[{c}].matches[{m}]"),
                        mt,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    let p = Policy {
        name: required("authorization.name", &a.name)?,
        namespace: required("authorization.namespace", &a.namespace)?,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    };
    if p.key() != name {
        return Err(err(
            "authorization",
            format!(
                "resource name {name:?} differs from namespace/name {:?}",
                p.key()
            ),
        ));
    }
    Ok(p)
}

fn policy_match(field: &str, m: &xsec::Match) -> Result<PolicyMatch, ConvertError> {
    let strings = |f: &str, v: &[xsec::StringMatch]| -> Result<Vec<StringMatch>, ConvertError> {
        v.iter()
            .enumerate()
            .map(|(i, s)| string_match(&format!("{field}.{f}[{i}]"), s))
            .collect()
    };
    let prefixes = |f: &str, v: &[xsec::Address]| -> Result<Vec<IpPrefix>, ConvertError> {
        v.iter()
            .enumerate()
            .map(|(i, a)| ip_prefix(&format!("{field}.{f}[{i}]"), a))
            .collect()
    };
    let ports = |f: &str, v: &[u32]| -> Result<Vec<u16>, ConvertError> {
        v.iter()
            .map(|p| port(&format!("{field}.{f}"), *p))
            .collect()
    };
    let sas = |v: &[xsec::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(PolicyMatch {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        principals: strings("principals", &m.principals)?,
        not_principals: strings("not_principals", &m.not_principals)?,
        source_ips: prefixes("source_ips", &m.source_ips)?,
        not_source_ips: prefixes("not_source_ips", &m.not_source_ips)?,
        destination_ips: prefixes("destination_ips", &m.destination_ips)?,
        not_destination_ips: prefixes("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
    })
}

fn string_match(field: &str, s: &xsec::StringMatch) -> Result<StringMatch, ConvertError> {
    use xsec::string_match::MatchType;
    match &s.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err(err(field, "match_type is not set")),
    }
}

fn ip_prefix(field: &str, a: &xsec::Address) -> Result<IpPrefix, ConvertError> {
    let address = ip_from_bytes(&format!("{field}.address"), &a.address)?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    match u8::try_from(a.length) {
        Ok(length) if length <= max => Ok(IpPrefix { address, length }),
        _ => Err(err(
            format!("{field}.length"),
            format!("prefix length {} exceeds {max}", a.length),
        )),
    }
}
