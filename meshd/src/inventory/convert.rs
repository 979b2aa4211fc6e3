//! Converts a parsed inventory into Istio's protobuf objects, validating as
//! it goes (every error names the item it is about), and derives what istiod
//! derives: default uids, service membership from selectors, and the
//! selector-based policies listed in `Workload.authorization_policies`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use base64::Engine;
use bytes::Bytes;
use sidetunnel_proto::istio::security::{
    self as sec, Authorization, ServiceAccountMatch, StringMatch, string_match::MatchType,
};
use sidetunnel_proto::istio::workload::{
    self as wl, GatewayAddress, LoadBalancing, NamespacedHostname, NetworkAddress, Port, PortList,
    gateway_address::Destination,
};

use super::model;
use crate::snapshot::{Snapshot, SnapshotBuilder, TypeUrl, alias};

/// Istio's root namespace: policies there without a selector are mesh-wide,
/// and selector policies there select workloads in every namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// Port waypoints and gateways accept HBONE on unless told otherwise.
const DEFAULT_HBONE_PORT: u32 = 15008;

/// Defaults that come from meshd's configuration rather than the file.
#[derive(Debug, Clone)]
pub struct Context {
    pub cluster_id: String,
    pub trust_domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{item}: {msg}")]
pub struct ConvertError {
    pub item: String,
    pub msg: String,
}

type Result<T> = std::result::Result<T, String>;

/// Parses a proto enum by name: accepts the proto spelling (`ONLY_HEALTHY`)
/// and CamelCase or lower case (`OnlyHealthy`, `deployment`).
fn enum_value<E: Copy + Into<i32>>(
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

fn parse_ip(field: &str, s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| format!("{field}: invalid IP {s:?}"))
}

fn ip_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    }
}

/// `ip` or `network/ip`.
fn network_ip(field: &str, s: &str) -> Result<(String, IpAddr)> {
    match s.rsplit_once('/') {
        Some((net, ip)) => Ok((net.to_owned(), parse_ip(field, ip)?)),
        None => Ok((String::new(), parse_ip(field, s)?)),
    }
}

fn port(field: &str, p: u32) -> Result<u32> {
    if (1..=65535).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{field}: port {p} outside 1-65535"))
    }
}

fn ports(field: &str, m: &model::PortMap) -> Result<Vec<Port>> {
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

fn gateway(field: &str, g: &model::Gateway) -> Result<GatewayAddress> {
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

fn required(field: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        Err(format!("{field} is required"))
    } else {
        Ok(())
    }
}

fn service_name(ns: &str, hostname: &str) -> String {
    format!("{ns}/{hostname}")
}

fn default_hostname(s: &model::Service) -> String {
    s.hostname
        .clone()
        .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", s.name, s.namespace))
}

fn convert_service(s: &model::Service) -> Result<wl::Service> {
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

fn convert_workload(ctx: &Context, w: &model::Workload) -> Result<wl::Workload> {
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
        network: w.network.clone(),
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

/// AuthorizationPolicy string match: `abc*` prefix, `*abc` suffix, `*`
/// presence, else exact.
fn string_match(s: &str) -> StringMatch {
    let m = if s == "*" {
        MatchType::Presence(())
    } else if let Some(p) = s.strip_suffix('*') {
        MatchType::Prefix(p.into())
    } else if let Some(p) = s.strip_prefix('*') {
        MatchType::Suffix(p.into())
    } else {
        MatchType::Exact(s.into())
    };
    StringMatch {
        match_type: Some(m),
    }
}

fn cidr(field: &str, s: &str) -> Result<sec::Address> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => {
            let ip = parse_ip(field, ip)?;
            let len: u32 = len
                .parse()
                .map_err(|_| format!("{field}: invalid prefix length in {s:?}"))?;
            (ip, len)
        }
        None => {
            let ip = parse_ip(field, s)?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{field}: prefix length {len} too long in {s:?}"));
    }
    Ok(sec::Address {
        address: ip_bytes(ip),
        length: len,
    })
}

fn sa_match(field: &str, s: &str) -> Result<ServiceAccountMatch> {
    let (ns, sa) = s
        .split_once('/')
        .filter(|(n, a)| !n.is_empty() && !a.is_empty())
        .ok_or_else(|| format!("{field}: {s:?} is not namespace/serviceaccount"))?;
    Ok(ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    })
}

fn convert_match(field: &str, m: &model::Match) -> Result<sec::Match> {
    let strings = |v: &[String]| v.iter().map(|s| string_match(s)).collect();
    let cidrs = |name: &str, v: &[String]| -> Result<Vec<sec::Address>> {
        v.iter()
            .enumerate()
            .map(|(i, s)| cidr(&format!("{field}.{name}[{i}]"), s))
            .collect()
    };
    let sas = |name: &str, v: &[String]| -> Result<Vec<ServiceAccountMatch>> {
        v.iter()
            .enumerate()
            .map(|(i, s)| sa_match(&format!("{field}.{name}[{i}]"), s))
            .collect()
    };
    let port_list = |name: &str, v: &[u32]| -> Result<Vec<u32>> {
        v.iter()
            .map(|p| port(&format!("{field}.{name}"), *p))
            .collect()
    };
    Ok(sec::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: sas("serviceAccounts", &m.service_accounts)?,
        not_service_accounts: sas("notServiceAccounts", &m.not_service_accounts)?,
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs("sourceIps", &m.source_ips)?,
        not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
        destination_ips: cidrs("destinationIps", &m.destination_ips)?,
        not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
        destination_ports: port_list("destinationPorts", &m.destination_ports)?,
        not_destination_ports: port_list("notDestinationPorts", &m.not_destination_ports)?,
        ..Default::default()
    })
}

fn convert_policy(p: &model::Policy) -> Result<Authorization> {
    required("name", &p.name)?;
    required("namespace", &p.namespace)?;
    let scope = match &p.scope {
        Some(s) => enum_value(
            "scope",
            s,
            sec::Scope::from_str_name,
            &["Global", "Namespace", "WorkloadSelector"],
        )?,
        None if p.selector.is_some() => sec::Scope::WorkloadSelector.into(),
        None if p.namespace == ROOT_NAMESPACE => sec::Scope::Global.into(),
        None => sec::Scope::Namespace.into(),
    };
    let is_selector = scope == i32::from(sec::Scope::WorkloadSelector);
    match &p.selector {
        None if is_selector => return Err("scope WorkloadSelector needs a selector".into()),
        Some(_) if !is_selector => {
            return Err("a selector is only valid with scope WorkloadSelector".into());
        }
        Some(s) if s.match_labels.is_empty() && s.workloads.is_empty() => {
            return Err("selector: set matchLabels and/or workloads".into());
        }
        _ => {}
    }
    let rules = p
        .rules
        .iter()
        .enumerate()
        .map(|(r, rule)| {
            Ok(sec::Rule {
                clauses: rule
                    .clauses
                    .iter()
                    .enumerate()
                    .map(|(c, clause)| {
                        Ok(sec::Clause {
                            matches: clause
                                .matches
                                .iter()
                                .enumerate()
                                .map(|(m, mm)| {
                                    convert_match(
                                        &format!("rules[{r}].clauses[{c}].matches[{m}]"),
                                        mm,
                                    )
                                })
                                .collect::<Result<_>>()?,
                        })
                    })
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action: match &p.action {
            Some(a) => enum_value("action", a, sec::Action::from_str_name, &["Allow", "Deny"])?,
            None => sec::Action::Allow.into(),
        },
        rules,
        dry_run: p.dry_run,
        ..Default::default()
    })
}

fn selects(p: &model::Policy, w: &model::Workload) -> bool {
    let Some(sel) = &p.selector else {
        return false;
    };
    if p.namespace != ROOT_NAMESPACE && p.namespace != w.namespace {
        return false;
    }
    let labels_ok = sel
        .match_labels
        .iter()
        .all(|(k, v)| w.labels.get(k) == Some(v));
    let names_ok = sel.workloads.is_empty() || sel.workloads.contains(&w.name);
    labels_ok && names_ok
}

fn label_match(selector: &model::Labels, labels: &model::Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn item(kind: &str, i: usize, ns: &str, name: &str) -> String {
    format!("{kind}[{i}] {ns}/{name}")
}

/// Validates and converts the whole inventory.
pub fn convert(
    ctx: &Context,
    inv: &model::Inventory,
) -> std::result::Result<Snapshot, ConvertError> {
    let mut b = SnapshotBuilder::default();
    let err = |item: String| move |msg: String| ConvertError { item, msg };

    // Services first: workloads reference them, selectors add membership.
    let mut services: BTreeMap<String, (&model::Service, wl::Service)> = BTreeMap::new();
    for (i, s) in inv.services.iter().enumerate() {
        let it = item("services", i, &s.namespace, &s.name);
        let svc = convert_service(s).map_err(err(it.clone()))?;
        let name = service_name(&svc.namespace, &svc.hostname);
        if services.contains_key(&name) {
            return Err(err(it)(format!("duplicate service {name}")));
        }
        services.insert(name, (s, svc));
    }

    let mut policies = BTreeMap::new();
    for (i, p) in inv.policies.iter().enumerate() {
        let it = item("policies", i, &p.namespace, &p.name);
        let auth = convert_policy(p).map_err(err(it.clone()))?;
        let name = format!("{}/{}", p.namespace, p.name);
        if policies.insert(name.clone(), auth).is_some() {
            return Err(err(it)(format!("duplicate policy {name}")));
        }
    }

    // Only services with a selector can add membership (few, usually).
    let selecting: Vec<(&String, &model::Service, &wl::Service)> = services
        .iter()
        .filter(|(_, (ms, _))| !ms.selector.is_empty())
        .map(|(n, (ms, svc))| (n, *ms, svc))
        .collect();
    let mut seen_uids = BTreeSet::new();
    for (i, w) in inv.workloads.iter().enumerate() {
        let it = item("workloads", i, &w.namespace, &w.name);
        let mut work = convert_workload(ctx, w).map_err(err(it.clone()))?;
        if !seen_uids.insert(work.uid.clone()) {
            return Err(err(it)(format!("duplicate workload uid {}", work.uid)));
        }
        for key in work.services.keys() {
            if !services.contains_key(key) {
                return Err(err(it)(format!("services: unknown service {key}")));
            }
        }
        for (name, ms, svc) in &selecting {
            if ms.namespace == w.namespace
                && label_match(&ms.selector, &w.labels)
                && !work.services.contains_key(*name)
            {
                work.services.insert(
                    (*name).clone(),
                    PortList {
                        ports: svc.ports.clone(),
                    },
                );
            }
        }
        work.authorization_policies = inv
            .policies
            .iter()
            .filter(|p| selects(p, w))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for ip in &w.addresses {
            let a = alias(&work.network, ip.parse().expect("validated above"));
            if let Some(owner) = b.alias_owner(&a) {
                return Err(err(it)(format!("address {a} already used by {owner}")));
            }
        }
        // Everything that applies: mesh-wide, namespace-wide, selected.
        let applicable = policies
            .iter()
            .filter(|(_, a)| {
                a.scope == i32::from(sec::Scope::Global)
                    || (a.scope == i32::from(sec::Scope::Namespace) && a.namespace == w.namespace)
            })
            .map(|(n, _)| n.clone())
            .chain(work.authorization_policies.iter().cloned())
            .collect();
        b.set_workload_policies(&work.uid, applicable);
        b.add_workload(&work);
    }

    for (i, (name, (ms, svc))) in services.iter().enumerate() {
        for a in &svc.addresses {
            let ip = crate::snapshot::ip_from_bytes(&a.address).expect("converted from an IP");
            let al = alias(&a.network, ip);
            if let Some(owner) = b.alias_owner(&al) {
                return Err(err(item("services", i, &ms.namespace, &ms.name))(format!(
                    "VIP {al} already used by {owner}"
                )));
            }
        }
        debug_assert!(!b.contains(TypeUrl::Address, name));
        b.add_service(svc);
    }
    for p in policies.values() {
        b.add_policy(p);
    }

    for (i, r) in inv.raw.iter().enumerate() {
        let it = format!("raw[{i}] {}", r.name);
        let t = match r.kind.as_str() {
            "Address" => TypeUrl::Address,
            "Authorization" => TypeUrl::Authorization,
            other => {
                return Err(err(it)(format!(
                    "type: invalid value {other:?} (expected Address or Authorization)"
                )));
            }
        };
        if r.name.is_empty() {
            return Err(err(it)("name is required".into()));
        }
        if b.contains(t, &r.name) {
            return Err(err(it)(format!("name {} already used", r.name)));
        }
        let body = base64::engine::general_purpose::STANDARD
            .decode(r.base64.trim())
            .map_err(|e| err(it.clone())(format!("base64: {e}")))?;
        b.add_raw(t, r.name.clone(), body.into());
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{LoadError, parse};
    use crate::snapshot::Kind;
    use prost::Message;
    use sidetunnel_proto::istio::workload::{Address, address};

    fn ctx() -> Context {
        Context {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    fn err(text: &str) -> String {
        match parse(&ctx(), text) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted invalid inventory:\n{text}"),
        }
    }

    fn workload(s: &Snapshot, name: &str) -> wl::Workload {
        let e = s.get(TypeUrl::Address, name).expect(name);
        assert_eq!(e.kind, Kind::Workload);
        match Address::decode(&e.body[..]).unwrap().r#type {
            Some(address::Type::Workload(w)) => w,
            other => panic!("{other:?}"),
        }
    }

    fn service(s: &Snapshot, name: &str) -> wl::Service {
        match Address::decode(&s.get(TypeUrl::Address, name).unwrap().body[..])
            .unwrap()
            .r#type
        {
            Some(address::Type::Service(svc)) => svc,
            other => panic!("{other:?}"),
        }
    }

    fn policy(s: &Snapshot, name: &str) -> Authorization {
        Authorization::decode(&s.get(TypeUrl::Authorization, name).unwrap().body[..]).unwrap()
    }

    #[test]
    fn defaults_and_derived_fields() {
        let s = parse(
            &ctx(),
            r#"
workloads:
  - name: web-1
    namespace: shop
    addresses: [10.1.0.5, "fd00::5"]
    labels: {app: web, version: v2}
    node: node-a
    waypoint: {hostname: shop/waypoint.shop.svc.cluster.local}
  - {name: db-0, namespace: shop, uid: custom-uid, addresses: [10.1.0.6], protocol: NONE,
     workloadType: pod, status: Unhealthy, trustDomain: other.td, serviceAccount: db,
     services: {shop/db.shop.svc.cluster.local: {5432: 5432}}, network: net2,
     locality: {region: r, zone: z}}
services:
  - {name: web, namespace: shop, vips: [172.20.0.1, "net2/172.20.0.2"], ports: {80: 8080, 443: 0},
     selector: {app: web}, loadBalancing: {mode: FAILOVER, routingPreference: [NETWORK, Zone], healthPolicy: AllowAll}}
  - {name: db, namespace: shop, hostname: db.shop.svc.cluster.local}
policies:
  - {name: allow-web, namespace: shop, selector: {matchLabels: {app: web}},
     rules: [{clauses: [{matches: [{principals: ["cluster.local/ns/shop/*", "*"], namespaces: ["*-prod"],
       serviceAccounts: [shop/api], sourceIps: [10.0.0.0/8, "fd00::1"], destinationPorts: [8080]}]}]}]}
  - {name: deny-all, namespace: istio-system, action: Deny}
  - {name: ns-wide, namespace: shop}
  - {name: global-web, namespace: istio-system, selector: {workloads: [web-1]}}
"#,
        )
        .unwrap();
        let w = workload(&s, "Kubernetes//Pod/shop/web-1");
        assert_eq!(w.addresses.len(), 2);
        assert_eq!(w.canonical_name, "web");
        assert_eq!(w.canonical_revision, "v2");
        assert_eq!(w.workload_name, "web-1");
        assert_eq!(w.service_account, "default");
        assert_eq!(w.trust_domain, "", "mesh trust domain stays implicit");
        assert_eq!(w.tunnel_protocol, i32::from(wl::TunnelProtocol::Hbone));
        assert_eq!(w.cluster_id, "Kubernetes");
        assert_eq!(
            w.waypoint.unwrap().destination,
            Some(Destination::Hostname(NamespacedHostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into()
            }))
        );
        // Membership from the service selector, with the service's ports.
        let ports = &w.services["shop/web.shop.svc.cluster.local"].ports;
        assert_eq!(
            ports
                .iter()
                .map(|p| (p.service_port, p.target_port))
                .collect::<Vec<_>>(),
            [(80, 8080), (443, 0)]
        );
        // Selector policies in its namespace and in the root namespace.
        assert_eq!(
            w.authorization_policies,
            ["istio-system/global-web", "shop/allow-web"]
        );
        let aliases = &s
            .get(TypeUrl::Address, "Kubernetes//Pod/shop/web-1")
            .unwrap()
            .aliases;
        assert_eq!(aliases, &["/10.1.0.5", "/fd00::5"]);

        let db = workload(&s, "custom-uid");
        assert_eq!(db.tunnel_protocol, i32::from(wl::TunnelProtocol::None));
        assert_eq!(db.workload_type, i32::from(wl::WorkloadType::Pod));
        assert_eq!(db.status, i32::from(wl::WorkloadStatus::Unhealthy));
        assert_eq!(db.trust_domain, "other.td");
        assert_eq!(db.canonical_revision, "latest");
        assert!(db.authorization_policies.is_empty());
        assert_eq!(
            s.get(TypeUrl::Address, "custom-uid").unwrap().aliases,
            ["net2/10.1.0.6"]
        );

        let web = service(&s, "shop/web.shop.svc.cluster.local");
        assert_eq!(web.addresses[1].network, "net2");
        let lb = web.load_balancing.unwrap();
        assert_eq!(lb.mode, i32::from(wl::load_balancing::Mode::Failover));
        assert_eq!(
            lb.routing_preference,
            [
                i32::from(wl::load_balancing::Scope::Network),
                i32::from(wl::load_balancing::Scope::Zone)
            ]
        );
        assert_eq!(
            lb.health_policy,
            i32::from(wl::load_balancing::HealthPolicy::AllowAll)
        );

        let p = policy(&s, "shop/allow-web");
        assert_eq!(p.scope, i32::from(sec::Scope::WorkloadSelector));
        assert_eq!(p.action, i32::from(sec::Action::Allow));
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals
                .iter()
                .map(|x| x.match_type.clone())
                .collect::<Vec<_>>(),
            [
                Some(MatchType::Prefix("cluster.local/ns/shop/".into())),
                Some(MatchType::Presence(()))
            ]
        );
        assert_eq!(
            m.namespaces[0].match_type,
            Some(MatchType::Suffix("-prod".into()))
        );
        assert_eq!(m.service_accounts[0].service_account, "api");
        assert_eq!(m.source_ips[0].length, 8);
        assert_eq!(m.source_ips[1].length, 128);
        assert_eq!(m.source_ips[1].address.len(), 16);
        let deny = policy(&s, "istio-system/deny-all");
        assert_eq!(deny.scope, i32::from(sec::Scope::Global));
        assert_eq!(deny.action, i32::from(sec::Action::Deny));
        assert_eq!(
            policy(&s, "shop/ns-wide").scope,
            i32::from(sec::Scope::Namespace)
        );
    }

    #[test]
    fn errors_name_the_item() {
        let w = "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1]}\n";
        let cases: &[(&str, &str)] = &[
            (
                "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.300]}\n",
                "workloads[0] n/p: addresses[0]: invalid IP \"10.0.0.300\"",
            ),
            (
                "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], colour: red}\n",
                "unknown field `colour`",
            ),
            (
                "workloads:\n  - {namespace: n, addresses: [10.0.0.1]}\n",
                "missing field `name`",
            ),
            (
                "workloads:\n  - {name: p, namespace: n}\n",
                "workloads[0] n/p: a workload needs addresses or a hostname",
            ),
            (
                &format!("{w}  - {{name: q, namespace: n, addresses: [10.0.0.1]}}\n"),
                "workloads[1] n/q: address /10.0.0.1 already used by Kubernetes//Pod/n/p",
            ),
            (
                &format!("{w}  - {{name: p, namespace: n, addresses: [10.0.0.2]}}\n"),
                "duplicate workload uid Kubernetes//Pod/n/p",
            ),
            (
                "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], services: {n/x: {80: 80}}}\n",
                "workloads[0] n/p: services: unknown service n/x",
            ),
            (
                "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], services: {x: {80: 80}}}\n",
                "key \"x\" is not namespace/hostname",
            ),
            (
                "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], protocol: QUIC}\n",
                "protocol: invalid value \"QUIC\"",
            ),
            (
                "workloads:\n  - {name: p, namespace: n, addresses: [10.0.0.1], waypoint: {port: 1}}\n",
                "waypoint: set exactly one of address, hostname",
            ),
            (
                "services:\n  - {name: s, namespace: n, ports: {70000: 80}}\n",
                "services[0] n/s: ports: port 70000 outside 1-65535",
            ),
            (
                &format!("{w}services:\n  - {{name: s, namespace: n, vips: [10.0.0.1]}}\n"),
                "services[0] n/s: VIP /10.0.0.1 already used by Kubernetes//Pod/n/p",
            ),
            (
                "services:\n  - {name: s, namespace: n}\n  - {name: s, namespace: n}\n",
                "services[1] n/s: duplicate service n/s.n.svc.cluster.local",
            ),
            (
                "policies:\n  - {name: p, namespace: n, scope: WorkloadSelector}\n",
                "policies[0] n/p: scope WorkloadSelector needs a selector",
            ),
            (
                "policies:\n  - {name: p, namespace: n, scope: Namespace, selector: {workloads: [a]}}\n",
                "only valid with scope WorkloadSelector",
            ),
            (
                "policies:\n  - {name: p, namespace: n, rules: [{clauses: [{matches: [{sourceIps: [10.0.0.0/33]}]}]}]}\n",
                "policies[0] n/p: rules[0].clauses[0].matches[0].sourceIps[0]: prefix length 33 too long",
            ),
            (
                "policies:\n  - {name: p, namespace: n, action: Audit}\n",
                "action: invalid value \"Audit\"",
            ),
            (
                "raw:\n  - {name: x, type: Cluster, base64: AA==}\n",
                "raw[0] x: type: invalid value \"Cluster\"",
            ),
            (
                "raw:\n  - {name: x, type: Address, base64: '!!'}\n",
                "raw[0] x: base64",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "error {e:?} does not contain {want:?}");
        }
        assert!(matches!(
            parse(&ctx(), "workloads: [").unwrap_err(),
            LoadError::Yaml(_)
        ));
    }

    #[test]
    fn raw_resources_are_served_verbatim() {
        let s = parse(
            &ctx(),
            "raw:\n  - {name: ns/broken, type: Address, base64: '/////w=='}\n  - {name: ns/p, type: Authorization, base64: ''}\n",
        )
        .unwrap();
        let e = s.get(TypeUrl::Address, "ns/broken").unwrap();
        assert_eq!(e.kind, Kind::Raw);
        assert_eq!(&e.body[..], &[0xff, 0xff, 0xff, 0xff]);
        assert!(
            s.get(TypeUrl::Authorization, "ns/p")
                .unwrap()
                .body
                .is_empty()
        );
        assert_eq!(parse(&ctx(), "").unwrap(), Snapshot::default());
    }
}
