//! An xDS `Authorization` resource as bytes (after a few bytes describing a
//! connection): prost decode → conversion → store → policy selection for a
//! workload → L4 enforcement of that connection. Checks that enforcement
//! agrees with the policy's own match (a matching enforced DENY denies; a
//! lone enforced ALLOW allows exactly what it matches).
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use netproxy::authz::{self, Connection, Denied};
use netproxy::identity::Identity;
use netproxy::state::{PolicyAction, PolicyScope, Store, StoreUpdate, convert};
use prost::Message;
use sidetunnel_proto::istio::{security as xsec, workload as xwl};

/// The connection under test, from the input's head: a flags byte (bit 0:
/// IPv6; bits 1-2: peer identity, 0 for plaintext), then source IP and
/// port, destination IP and port (big endian). The rest is the resource.
struct Conn {
    src: SocketAddr,
    dst: SocketAddr,
    identity: Option<usize>,
}

impl Conn {
    fn split(data: &[u8]) -> Option<(Conn, &[u8])> {
        let (&flags, rest) = data.split_first()?;
        let ip_len = if flags & 1 == 1 { 16 } else { 4 };
        let (src, rest) = addr(rest, ip_len)?;
        let (dst, rest) = addr(rest, ip_len)?;
        let identity = match (flags >> 1) & 3 {
            0 => None,
            i => Some(usize::from(i)),
        };
        Some((Conn { src, dst, identity }, rest))
    }
}

fn addr(data: &[u8], ip_len: usize) -> Option<(SocketAddr, &[u8])> {
    if data.len() < ip_len + 2 {
        return None;
    }
    let (ip, rest) = data.split_at(ip_len);
    let ip = match ip_len {
        4 => IpAddr::from(<[u8; 4]>::try_from(ip).ok()?),
        _ => IpAddr::from(<[u8; 16]>::try_from(ip).ok()?),
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((SocketAddr::new(ip, port), &rest[2..]))
}

/// Peer identities 1-3 (0 is plaintext).
const IDENTITIES: [(&str, &str, &str); 4] = [
    ("unused", "unused", "unused"),
    ("cluster.local", "default", "sleep"),
    ("cluster.local", "other", "default"),
    ("example.org", "default", "sleep"),
];

fuzz_target!(|data: &[u8]| {
    let Some((conn, rest)) = Conn::split(data) else {
        return;
    };
    let Ok(auth) = xsec::Authorization::decode(rest) else {
        return;
    };
    let name = format!("{}/{}", auth.namespace, auth.name);
    let _ = convert::policy("wrong/name", &auth);
    let Ok(policy) = convert::policy(&name, &auth) else {
        return;
    };
    let store = Store::new();
    store.apply(StoreUpdate {
        policies: vec![policy.clone()],
        ..Default::default()
    });
    let key = policy.key();
    assert!(store.policy(&key).is_some(), "{key:?} not stored");

    // A workload in the policy's namespace, selected by it.
    let w = xwl::Workload {
        uid: "Kubernetes//Pod/fuzz/w".into(),
        name: "w".into(),
        namespace: policy.namespace.clone(),
        service_account: "sa".into(),
        addresses: vec![vec![10, 0, 0, 1].into()],
        authorization_policies: vec![key.clone()],
        ..Default::default()
    };
    let Ok(workload) = convert::workload(&w) else {
        return;
    };
    let selected = store.policies_for(&workload);
    assert!(
        selected.iter().any(|p| p.key() == key),
        "{key:?} ({:?}) not selected for a workload naming it",
        policy.scope
    );
    if policy.scope == PolicyScope::Global {
        assert_eq!(selected.len(), 1);
    }

    let identity = conn
        .identity
        .map(|i| IDENTITIES[i])
        .map(|(td, ns, sa)| Identity::new(td, ns, sa).expect("valid identity"));
    let c = Connection {
        src: conn.src,
        dst: conn.dst,
        src_identity: identity.as_ref(),
    };
    let matched = authz::matches(&policy, &c);
    let verdict = authz::check(&[Arc::new(policy.clone())], &c);
    match (policy.action, policy.dry_run) {
        (_, true) => assert_eq!(verdict, Ok(()), "dry-run policies are never enforced"),
        (PolicyAction::Deny, false) => assert_eq!(verdict.is_err(), matched),
        (PolicyAction::Allow, false) => {
            assert_eq!(verdict == Err(Denied::NotAllowed), !matched)
        }
    }
    serde_json::to_string(&store.dump()).expect("config dump serializes");
    store.apply(StoreUpdate {
        removed_policies: vec![key.clone()],
        ..Default::default()
    });
    assert!(store.policies_for(&workload).is_empty(), "{key:?} lingers");
});
