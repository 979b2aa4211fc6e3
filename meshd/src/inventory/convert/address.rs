//! One service or one workload of the inventory converted into Istio's
//! `Address` protos (the two kinds of WDS resource), with istiod's defaults:
//! hostnames, uids, the cluster and trust domain from meshd's settings.

use sidetunnel_proto::istio::workload::{self as wl, LoadBalancing, NetworkAddress, PortList};

use super::fields::{
    enum_value, gateway, ip_bytes, network, network_ip, parse_ip, ports, required,
};
use super::{Context, Result};
use crate::inventory::model;

pub(super) fn service_name(ns: &str, hostname: &str) -> String {
    format!("{ns}/{hostname}")
}

pub(super) fn default_hostname(s: &model::Service) -> String {
    s.hostname
        .clone()
        .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", s.name, s.namespace))
}

pub(super) fn convert_service(s: &model::Service) -> Result<wl::Service> {
    required("name", &s.name)?;
    required("namespace", &s.namespace)?;
    let hostname = default_hostname(s);
    required("hostname", &hostname)?;
    let addresses = s
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (network, ip) = network_ip(&format!("vips[{i}]"), v)?;
            Ok(NetworkAddress {
                network,
                address: ip_bytes(ip),
                length: None,
            })
        })
        .collect::<Result<_>>()?;
    let load_balancing = s
        .load_balancing
        .as_ref()
        .map(|lb| -> Result<LoadBalancing> {
            use wl::load_balancing::{HealthPolicy, Mode, Scope};
            Ok(LoadBalancing {
                mode: match &lb.mode {
                    Some(m) => enum_value(
                        "loadBalancing.mode",
                        m,
                        Mode::from_str_name,
                        &["STRICT", "FAILOVER", "PASSTHROUGH", "UNSPECIFIED_MODE"],
                    )?,
                    None => 0,
                },
                routing_preference: lb
                    .routing_preference
                    .iter()
                    .map(|p| {
                        enum_value(
                            "loadBalancing.routingPreference",
                            p,
                            Scope::from_str_name,
                            &["NETWORK", "REGION", "ZONE", "SUBZONE", "NODE", "CLUSTER"],
                        )
                    })
                    .collect::<Result<_>>()?,
                health_policy: match &lb.health_policy {
                    Some(h) => enum_value(
                        "loadBalancing.healthPolicy",
                        h,
                        HealthPolicy::from_str_name,
                        &["ONLY_HEALTHY", "ALLOW_ALL"],
                    )?,
                    None => 0,
                },
            })
        })
        .transpose()?;
    Ok(wl::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname,
        addresses,
        ports: ports("ports", &s.ports)?,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s
            .waypoint
            .as_ref()
            .map(|g| gateway("waypoint", g))
            .transpose()?,
        load_balancing,
        ..Default::default()
    })
}

pub(super) fn convert_workload(ctx: &Context, w: &model::Workload) -> Result<wl::Workload> {
    required("name", &w.name)?;
    required("namespace", &w.namespace)?;
    let cluster_id = w
        .cluster_id
        .clone()
        .unwrap_or_else(|| ctx.cluster_id.clone());
    let uid = w
        .uid
        .clone()
        .unwrap_or_else(|| format!("{cluster_id}//Pod/{}/{}", w.namespace, w.name));
    required("uid", &uid)?;
    if w.addresses.is_empty() && w.hostname.is_empty() {
        return Err("a workload needs addresses or a hostname".into());
    }
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| parse_ip(&format!("addresses[{i}]"), a).map(ip_bytes))
        .collect::<Result<_>>()?;
    let services = w
        .services
        .iter()
        .map(|(k, m)| {
            if !k.contains('/') {
                return Err(format!("services: key {k:?} is not namespace/hostname"));
            }
            Ok((
                k.clone(),
                PortList {
                    ports: ports(&format!("services[{k}]"), m)?,
                },
            ))
        })
        .collect::<Result<_>>()?;
    use wl::{TunnelProtocol, WorkloadStatus, WorkloadType};
    Ok(wl::Workload {
        uid,
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses,
        hostname: w.hostname.clone(),
        network: network("network", &w.network)?,
        tunnel_protocol: match &w.protocol {
            Some(p) => enum_value(
                "protocol",
                p,
                TunnelProtocol::from_str_name,
                &["HBONE", "NONE", "LEGACY_ISTIO_MTLS"],
            )?,
            None => TunnelProtocol::Hbone.into(),
        },
        // Like istiod, leave the mesh's own trust domain implicit (empty).
        trust_domain: w
            .trust_domain
            .clone()
            .filter(|td| *td != ctx.trust_domain)
            .unwrap_or_default(),
        service_account: w
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into()),
        waypoint: w
            .waypoint
            .as_ref()
            .map(|g| gateway("waypoint", g))
            .transpose()?,
        network_gateway: w
            .network_gateway
            .as_ref()
            .map(|g| gateway("networkGateway", g))
            .transpose()?,
        node: w.node.clone(),
        canonical_name: w
            .canonical_name
            .clone()
            .or_else(|| w.labels.get("app").cloned())
            .unwrap_or_else(|| w.name.clone()),
        canonical_revision: w
            .canonical_revision
            .clone()
            .or_else(|| w.labels.get("version").cloned())
            .unwrap_or_else(|| "latest".into()),
        workload_type: match &w.workload_type {
            Some(t) => enum_value(
                "workloadType",
                t,
                WorkloadType::from_str_name,
                &["deployment", "cronjob", "pod", "job"],
            )?,
            None => WorkloadType::Deployment.into(),
        },
        workload_name: w.workload_name.clone().unwrap_or_else(|| w.name.clone()),
        native_tunnel: w.native_tunnel,
        services,
        status: match &w.status {
            Some(s) => enum_value(
                "status",
                s,
                WorkloadStatus::from_str_name,
                &["Healthy", "Unhealthy"],
            )?,
            None => 0,
        },
        cluster_id,
        locality: w.locality.as_ref().map(|l| wl::Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
        ..Default::default()
    })
}
