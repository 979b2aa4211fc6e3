//! Caller authentication and authorization, as istiod does it: a bearer
//! token (`authorization: Bearer <jwt>`) verified with meshd's JWT key, an
//! optional `clusterid` header that must name this cluster, and for xDS the
//! check that the node metadata's NAMESPACE / SERVICE_ACCOUNT match the
//! token (istiod's `checkConnectionIdentity`).

use prost_types::value::Kind;
use sidetunnel_proto::envoy::config::core::v3::Node;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::jwt::{Identity, JwtKey};

/// Node metadata keys compared with the token's identity.
pub const META_NAMESPACE: &str = "NAMESPACE";
pub const META_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// Header ztunnel sends naming the cluster its token belongs to.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

pub struct Authenticator {
    key: JwtKey,
    cluster_id: String,
}

impl Authenticator {
    pub fn new(key: JwtKey, cluster_id: String) -> Self {
        Authenticator { key, cluster_id }
    }

    /// Verifies the request's credentials; `Unauthenticated` says why not.
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Identity, Status> {
        if let Some(c) = md.get(CLUSTER_ID_HEADER) {
            let c = c.to_str().unwrap_or("<non-ASCII>");
            if c != self.cluster_id {
                return Err(Status::unauthenticated(format!(
                    "client claimed to be in cluster {c:?}, but this control plane serves {:?}",
                    self.cluster_id
                )));
            }
        }
        let raw = md
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
        let raw = raw
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
        let token = raw
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("authorization header is not \"Bearer <token>\"")
            })?;
        self.key
            .verify(token)
            .map_err(|e| Status::unauthenticated(format!("invalid bearer token: {e}")))
    }
}

fn meta_str<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    let v = node.metadata.as_ref()?.fields.get(key)?;
    match &v.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// The node may only claim the namespace and service account of its token;
/// absent (or empty) metadata claims nothing, as in istiod.
pub fn check_node(id: &Identity, node: &Node) -> Result<(), Status> {
    let ns = meta_str(node, META_NAMESPACE);
    let sa = meta_str(node, META_SERVICE_ACCOUNT);
    let ns_ok = ns.is_none_or(|n| n == id.namespace);
    let sa_ok = sa.is_none_or(|s| s == id.service_account);
    if ns_ok && sa_ok {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "authorization failed: token identity {}/{} does not match node metadata {META_NAMESPACE}={} {META_SERVICE_ACCOUNT}={}",
        id.namespace,
        id.service_account,
        ns.unwrap_or(""),
        sa.unwrap_or("")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::{AUDIENCE, TokenRequest};
    use std::time::Duration;
    use tonic::Code;

    fn key() -> JwtKey {
        JwtKey::from_pkcs8(&rcgen::KeyPair::generate().unwrap().serialize_der()).unwrap()
    }

    fn token(k: &JwtKey) -> String {
        k.issue(&TokenRequest {
            namespace: "ns".into(),
            service_account: "sa".into(),
            pod: None,
            ttl: Duration::from_secs(60),
            audience: AUDIENCE.into(),
        })
        .unwrap()
    }

    fn md(pairs: &[(&'static str, String)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn bearer_and_cluster_header() {
        let k = key();
        let t = token(&k);
        let a = Authenticator::new(k, "Kubernetes".into());
        let id = a
            .authenticate(&md(&[("authorization", format!("Bearer {t}"))]))
            .unwrap();
        assert_eq!(id.namespace, "ns");
        a.authenticate(&md(&[
            ("authorization", format!("bearer {t}")),
            ("clusterid", "Kubernetes".into()),
        ]))
        .unwrap();
        let cases = [
            (md(&[]), "missing authorization"),
            (md(&[("authorization", t.clone())]), "not \"Bearer"),
            (md(&[("authorization", "Bearer x.y".into())]), "not a JWT"),
            (
                md(&[
                    ("authorization", format!("Bearer {t}")),
                    ("clusterid", "other".into()),
                ]),
                "cluster \"other\"",
            ),
        ];
        for (m, want) in cases {
            let e = a.authenticate(&m).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            assert!(e.message().contains(want), "{} !~ {want}", e.message());
        }
        let other = Authenticator::new(key(), "Kubernetes".into());
        let e = other
            .authenticate(&md(&[("authorization", format!("Bearer {t}"))]))
            .unwrap_err();
        assert!(e.message().contains("signature"), "{}", e.message());
    }

    #[test]
    fn node_metadata_must_match() {
        let id = Identity {
            namespace: "ns".into(),
            service_account: "sa".into(),
            pod_name: None,
        };
        let node = |pairs: &[(&str, &str)]| Node {
            metadata: Some(prost_types::Struct {
                fields: pairs
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            prost_types::Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        check_node(&id, &Node::default()).unwrap();
        check_node(
            &id,
            &node(&[("NAMESPACE", "ns"), ("SERVICE_ACCOUNT", "sa")]),
        )
        .unwrap();
        check_node(&id, &node(&[("NAMESPACE", "ns"), ("SERVICE_ACCOUNT", "")])).unwrap();
        for bad in [
            node(&[("NAMESPACE", "other")]),
            node(&[("NAMESPACE", "ns"), ("SERVICE_ACCOUNT", "admin")]),
        ] {
            let e = check_node(&id, &bad).unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied);
            assert!(e.message().contains("ns/sa"), "{}", e.message());
        }
    }
}
