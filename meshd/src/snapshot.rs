//! An immutable, indexed set of encoded xDS resources built from one
//! inventory: Address resources (workloads by uid, services by
//! `namespace/hostname`, both reachable through their `network/IP` aliases)
//! and Authorization resources (by `namespace/name`). Encoding happens once
//! per snapshot; every stream shares the bytes. Versions are content hashes,
//! so the same inventory yields the same versions across restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use sidetunnel_proto::envoy::service::discovery::v3::Resource;
use sidetunnel_proto::istio::security::Authorization;
use sidetunnel_proto::istio::workload::{PortList, Service, Workload};
use sidetunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// What an Address entry wraps (services pull in their workloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Workload,
    Service,
    Authorization,
    /// Served verbatim from the inventory's `raw` section.
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub aliases: Vec<String>,
    pub version: String,
    /// The encoded message (`Any.value`).
    pub body: Bytes,
}

/// The resource type a stream subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TypeUrl {
    Address,
    Authorization,
}

impl TypeUrl {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            ADDRESS_TYPE_URL => Some(TypeUrl::Address),
            AUTHORIZATION_TYPE_URL => Some(TypeUrl::Authorization),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TypeUrl::Address => ADDRESS_TYPE_URL,
            TypeUrl::Authorization => AUTHORIZATION_TYPE_URL,
        }
    }
    pub const ALL: [TypeUrl; 2] = [TypeUrl::Address, TypeUrl::Authorization];
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    addresses: BTreeMap<String, Entry>,
    policies: BTreeMap<String, Entry>,
    /// `network/IP` → canonical Address name.
    by_alias: HashMap<String, String>,
    /// Service name → uids of the workloads that back it.
    service_workloads: HashMap<String, BTreeSet<String>>,
    /// Workload uid → names of the Authorization resources that apply to it
    /// (mesh-wide, its namespace's, and those selecting it).
    workload_policies: HashMap<String, BTreeSet<String>>,
    /// Kubernetes node → uids of the workloads on it (istiod pushes these to
    /// a client whose node metadata carries `NODE_NAME`).
    node_workloads: HashMap<String, BTreeSet<String>>,
}

/// Names changed (added or new version) and removed between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeDiff {
    pub changed: BTreeSet<String>,
    pub removed: BTreeSet<String>,
}

impl TypeDiff {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub addresses: TypeDiff,
    pub policies: TypeDiff,
}

impl Diff {
    pub fn of(&self, t: TypeUrl) -> &TypeDiff {
        match t {
            TypeUrl::Address => &self.addresses,
            TypeUrl::Authorization => &self.policies,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.policies.is_empty()
    }
}

/// `network/IP` as istiod spells aliases (empty network → `/10.0.0.1`).
pub fn alias(network: &str, ip: std::net::IpAddr) -> String {
    format!("{network}/{ip}")
}

/// 48 bits of the content's SHA-256 in 8 base64url characters: versions
/// ride on every resource (istiod sends none), so they are kept short, and
/// 48 bits keep the chance that a change goes unpushed (same version for
/// new content) negligible.
fn version_of(body: &[u8]) -> String {
    use base64::Engine;
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&d.as_ref()[..6])
}

/// Wraps an encoded message as `Address.workload` (1) or `Address.service` (2).
fn wrap(field: u32, inner: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(inner.len() + 6);
    encode_key(field, WireType::LengthDelimited, &mut buf);
    encode_varint(inner.len() as u64, &mut buf);
    buf.put_slice(inner);
    buf.freeze()
}

/// Encodes a workload with its `services` map in key order: prost encodes a
/// HashMap in iteration order, which would make versions (and bytes) differ
/// between runs for the same content.
fn encode_workload(w: &Workload) -> Vec<u8> {
    let services: BTreeMap<&String, &PortList> = w.services.iter().collect();
    let mut head = w.clone();
    head.services.clear();
    let mut buf = head.encode_to_vec();
    for (k, v) in services {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::message::encode(2, v, &mut entry);
        encode_key(22, WireType::LengthDelimited, &mut buf);
        encode_varint(entry.len() as u64, &mut buf);
        buf.extend_from_slice(&entry);
    }
    buf
}

impl Snapshot {
    pub fn table(&self, t: TypeUrl) -> &BTreeMap<String, Entry> {
        match t {
            TypeUrl::Address => &self.addresses,
            TypeUrl::Authorization => &self.policies,
        }
    }

    pub fn get(&self, t: TypeUrl, name: &str) -> Option<&Entry> {
        self.table(t).get(name)
    }

    /// The resource as sent on the wire.
    pub fn resource(&self, t: TypeUrl, name: &str) -> Option<Resource> {
        let e = self.get(t, name)?;
        Some(Resource {
            name: name.to_owned(),
            aliases: e.aliases.clone(),
            version: e.version.clone(),
            resource: Some(prost_types::Any {
                type_url: t.as_str().to_owned(),
                value: e.body.to_vec(),
            }),
            ..Default::default()
        })
    }

    /// Resolves an on-demand subscription name to canonical resource names,
    /// istiod-style: a canonical name, or (Address) a `network/IP` alias; a
    /// service also brings all workloads backing it. Extension (istiod
    /// always sends every policy): an Authorization subscription to a
    /// workload uid resolves to the policies that apply to that workload.
    /// Returns false if the name matches nothing.
    pub fn resolve(&self, t: TypeUrl, name: &str, out: &mut BTreeSet<String>) -> bool {
        let canonical = if self.table(t).contains_key(name) {
            name
        } else if t == TypeUrl::Address
            && let Some(c) = self.by_alias.get(name)
        {
            c.as_str()
        } else if t == TypeUrl::Authorization
            && let Some(ps) = self.workload_policies.get(name)
        {
            out.extend(ps.iter().cloned());
            return true;
        } else {
            return false;
        };
        out.insert(canonical.to_owned());
        if let Some(ws) = self.service_workloads.get(canonical) {
            out.extend(ws.iter().cloned());
        }
        true
    }

    /// Uids of the workloads on Kubernetes node `node`.
    pub fn workloads_on_node(&self, node: &str) -> impl Iterator<Item = &String> {
        self.node_workloads.get(node).into_iter().flatten()
    }

    /// Which names changed from `old` to `self`.
    pub fn diff_from(&self, old: &Snapshot) -> Diff {
        fn one(new: &BTreeMap<String, Entry>, old: &BTreeMap<String, Entry>) -> TypeDiff {
            TypeDiff {
                changed: new
                    .iter()
                    .filter(|(n, e)| {
                        old.get(*n)
                            .is_none_or(|o| o.version != e.version || o.aliases != e.aliases)
                    })
                    .map(|(n, _)| n.clone())
                    .collect(),
                removed: old
                    .keys()
                    .filter(|n| !new.contains_key(*n))
                    .cloned()
                    .collect(),
            }
        }
        Diff {
            addresses: one(&self.addresses, &old.addresses),
            policies: one(&self.policies, &old.policies),
        }
    }

    /// Total encoded bytes of all resources of a type, as a full delta
    /// response would carry them (the `Resource` wrappers included).
    pub fn full_sync_bytes(&self, t: TypeUrl) -> usize {
        self.table(t)
            .keys()
            .filter_map(|n| self.resource(t, n))
            .map(|r| r.encoded_len())
            .sum()
    }
}

/// Accumulates encoded resources; the converter feeds it validated objects.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    snap: Snapshot,
}

impl SnapshotBuilder {
    fn insert(&mut self, t: TypeUrl, name: String, kind: Kind, aliases: Vec<String>, body: Bytes) {
        for a in &aliases {
            self.snap.by_alias.insert(a.clone(), name.clone());
        }
        let e = Entry {
            kind,
            aliases,
            version: version_of(&body),
            body,
        };
        match t {
            TypeUrl::Address => self.snap.addresses.insert(name, e),
            TypeUrl::Authorization => self.snap.policies.insert(name, e),
        };
    }

    /// Whether an Address or Authorization name is already taken.
    pub fn contains(&self, t: TypeUrl, name: &str) -> bool {
        self.snap.table(t).contains_key(name)
    }

    /// The owner of an alias, if any.
    pub fn alias_owner(&self, alias: &str) -> Option<&str> {
        self.snap.by_alias.get(alias).map(String::as_str)
    }

    pub fn add_workload(&mut self, w: &Workload) {
        let aliases = w
            .addresses
            .iter()
            .filter_map(|b| ip_from_bytes(b))
            .map(|ip| alias(&w.network, ip))
            .collect();
        for svc in w.services.keys() {
            self.snap
                .service_workloads
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone());
        }
        if !w.node.is_empty() {
            self.snap
                .node_workloads
                .entry(w.node.clone())
                .or_default()
                .insert(w.uid.clone());
        }
        let body = wrap(1, &encode_workload(w));
        self.insert(
            TypeUrl::Address,
            w.uid.clone(),
            Kind::Workload,
            aliases,
            body,
        );
    }

    pub fn add_service(&mut self, s: &Service) {
        let aliases = s
            .addresses
            .iter()
            .filter_map(|a| ip_from_bytes(&a.address).map(|ip| alias(&a.network, ip)))
            .collect();
        let name = format!("{}/{}", s.namespace, s.hostname);
        let body = wrap(2, &s.encode_to_vec());
        self.insert(TypeUrl::Address, name, Kind::Service, aliases, body);
    }

    /// Records which policies apply to a workload (see [`Snapshot::resolve`]).
    pub fn set_workload_policies(&mut self, uid: &str, policies: BTreeSet<String>) {
        self.snap.workload_policies.insert(uid.to_owned(), policies);
    }

    pub fn add_policy(&mut self, p: &Authorization) {
        let name = format!("{}/{}", p.namespace, p.name);
        let body = Bytes::from(p.encode_to_vec());
        self.insert(
            TypeUrl::Authorization,
            name,
            Kind::Authorization,
            vec![],
            body,
        );
    }

    pub fn add_raw(&mut self, t: TypeUrl, name: String, body: Bytes) {
        self.insert(t, name, Kind::Raw, vec![], body);
    }

    pub fn build(self) -> Snapshot {
        self.snap
    }
}

pub fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(<[u8; 4]>::try_from(b).ok()?.into()),
        16 => Some(<[u8; 16]>::try_from(b).ok()?.into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidetunnel_proto::istio::workload::{Address, NetworkAddress, Port, address};

    fn workload(uid: &str, ip: [u8; 4], svcs: &[&str]) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.rsplit('/').next().unwrap().into(),
            namespace: "ns".into(),
            addresses: vec![Bytes::copy_from_slice(&ip)],
            services: svcs
                .iter()
                .map(|s| {
                    (
                        s.to_string(),
                        PortList {
                            ports: vec![Port {
                                service_port: 80,
                                target_port: 8080,
                                ..Default::default()
                            }],
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn encoding_decodes_and_is_deterministic() {
        let svcs: Vec<String> = (0..20).map(|i| format!("ns/s{i}.ns.svc")).collect();
        let refs: Vec<&str> = svcs.iter().map(String::as_str).collect();
        let w = workload("c//Pod/ns/a", [10, 0, 0, 1], &refs);
        let mut versions = BTreeSet::new();
        for _ in 0..5 {
            // A fresh HashMap each time: different iteration orders.
            let mut b = SnapshotBuilder::default();
            b.add_workload(&w.clone());
            let s = b.build();
            let e = s.get(TypeUrl::Address, "c//Pod/ns/a").unwrap();
            versions.insert(e.version.clone());
            let decoded = Address::decode(&e.body[..]).unwrap();
            assert_eq!(decoded.r#type, Some(address::Type::Workload(w.clone())));
            assert_eq!(e.aliases, vec!["/10.0.0.1".to_string()]);
        }
        assert_eq!(versions.len(), 1);
    }

    #[test]
    fn resolve_and_diff() {
        let mut b = SnapshotBuilder::default();
        b.add_workload(&workload("c//Pod/ns/a", [10, 0, 0, 1], &["ns/s.ns.svc"]));
        b.add_workload(&workload("c//Pod/ns/b", [10, 0, 0, 2], &["ns/s.ns.svc"]));
        b.add_workload(&workload("c//Pod/ns/c", [10, 0, 0, 3], &[]));
        b.add_service(&Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc".into(),
            addresses: vec![NetworkAddress {
                network: "n1".into(),
                address: Bytes::from_static(&[172, 16, 0, 1]),
                length: None,
            }],
            ..Default::default()
        });
        let s1 = b.build();
        let mut out = BTreeSet::new();
        assert!(s1.resolve(TypeUrl::Address, "n1/172.16.0.1", &mut out));
        assert_eq!(
            out.iter().map(String::as_str).collect::<Vec<_>>(),
            ["c//Pod/ns/a", "c//Pod/ns/b", "ns/s.ns.svc"]
        );
        out.clear();
        assert!(s1.resolve(TypeUrl::Address, "/10.0.0.3", &mut out));
        assert!(s1.resolve(TypeUrl::Address, "c//Pod/ns/c", &mut out));
        assert_eq!(out.len(), 1);
        assert!(!s1.resolve(TypeUrl::Address, "/10.0.0.9", &mut out));
        assert!(!s1.resolve(TypeUrl::Address, "n2/172.16.0.1", &mut out));
        assert!(!s1.resolve(TypeUrl::Authorization, "/10.0.0.3", &mut out));

        let mut b = SnapshotBuilder::default();
        let mut a = workload("c//Pod/ns/a", [10, 0, 0, 1], &["ns/s.ns.svc"]);
        a.node = "node-2".into();
        b.add_workload(&a);
        b.add_workload(&workload("c//Pod/ns/b", [10, 0, 0, 2], &["ns/s.ns.svc"]));
        b.add_workload(&workload("c//Pod/ns/d", [10, 0, 0, 4], &[]));
        let s2 = b.build();
        let d = s2.diff_from(&s1);
        assert_eq!(
            d.addresses
                .changed
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["c//Pod/ns/a", "c//Pod/ns/d"]
        );
        assert_eq!(
            d.addresses
                .removed
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["c//Pod/ns/c", "ns/s.ns.svc"]
        );
        assert!(d.policies.is_empty());
        assert!(s2.diff_from(&s2).is_empty());
    }
}
