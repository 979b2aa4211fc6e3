//! Converts a parsed inventory into Istio's protobuf objects, validating as
//! it goes (every error names the item it is about), and derives what istiod
//! derives: default uids, service membership from selectors, and the
//! selector-based policies listed in `Workload.authorization_policies`.
//!
//! This module converts the whole inventory and derives across items;
//! `address` converts one service or workload, `policy` one policy, and
//! `fields` the values items share (IPs, ports, enums, gateways).

mod address;
mod fields;
mod policy;

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use sidetunnel_proto::istio::security as sec;
use sidetunnel_proto::istio::workload::{self as wl, PortList};

use super::model;
use crate::snapshot::{Snapshot, SnapshotBuilder, TypeUrl, alias};
use address::{convert_service, convert_workload, service_name};
use policy::{convert_policy, selects};

/// Istio's root namespace: policies there without a selector are mesh-wide,
/// and selector policies there select workloads in every namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

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

/// An item's conversion result; the error says what is wrong with it and
/// [`convert`] adds which item it is.
type Result<T> = std::result::Result<T, String>;

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
mod tests;
