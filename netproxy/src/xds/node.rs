//! The Envoy `Node` this proxy presents, in ztunnel's format so istiod
//! treats it as a ztunnel (a WDS consumer): id
//! `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` and string metadata
//! `NAME`, `NAMESPACE`, `SERVICE_ACCOUNT`, `INSTANCE_IPS`, `CLUSTER_ID`,
//! `ISTIO_VERSION`, `NODE_NAME` only when set, plus any extra keys. istiod
//! checks `NAMESPACE`/`SERVICE_ACCOUNT` against the bearer token's
//! identity; a non-empty `NODE_NAME` makes it push every workload of that
//! node to an on-demand client (see `XdsConfig::from_proxy_config`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use prost_types::{Struct, Value, value::Kind};
use sidetunnel_proto::envoy::config::core::v3::{Node, node::UserAgentVersionType};

/// Istio release whose protocol this proxy speaks (istiod gates features on it).
pub const ISTIO_VERSION: &str = "1.27.0";

/// Who is asking for configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub pod_name: String,
    pub namespace: String,
    pub service_account: String,
    /// `NODE_NAME` metadata: sent only when not empty (istiod then pushes
    /// every workload on that node).
    pub node_name: String,
    pub cluster_id: String,
    /// The pod's IPs; the first one goes into the node id.
    pub ips: Vec<IpAddr>,
    /// Extra string metadata (e.g. `ISTIO_META_*`-style keys); overrides the
    /// standard keys on conflict.
    pub extra: BTreeMap<String, String>,
}

impl NodeInfo {
    /// The node id in ztunnel's format. istiod parses the IP part, so a pod
    /// without a known IP uses ztunnel's placeholder `1.1.1.1`.
    pub fn id(&self) -> String {
        let ip = self
            .ips
            .first()
            .map_or_else(|| "1.1.1.1".to_string(), IpAddr::to_string);
        let ns = &self.namespace;
        format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", self.pod_name)
    }

    /// The metadata map as sent.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let ips = self
            .ips
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut m: BTreeMap<String, String> = [
            ("NAME", self.pod_name.clone()),
            ("NAMESPACE", self.namespace.clone()),
            ("SERVICE_ACCOUNT", self.service_account.clone()),
            ("INSTANCE_IPS", ips),
            ("CLUSTER_ID", self.cluster_id.clone()),
            ("ISTIO_VERSION", ISTIO_VERSION.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if !self.node_name.is_empty() {
            m.insert("NODE_NAME".into(), self.node_name.clone());
        }
        m.extend(self.extra.clone());
        m
    }

    /// The Envoy `Node` message.
    pub fn to_proto(&self) -> Node {
        let fields = self
            .metadata()
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Value {
                        kind: Some(Kind::StringValue(v)),
                    },
                )
            })
            .collect();
        Node {
            id: self.id(),
            metadata: Some(Struct { fields }),
            user_agent_name: "sidetunnel".to_string(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_string(),
            )),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_metadata_follow_ztunnel() {
        let n = NodeInfo {
            pod_name: "web-1".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node_name: "node-a".into(),
            cluster_id: "Kubernetes".into(),
            ips: vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
            extra: BTreeMap::from([("LABELS".into(), "x".into())]),
        };
        assert_eq!(n.id(), "ztunnel~10.0.0.7~web-1.shop~shop.svc.cluster.local");
        let p = n.to_proto();
        let f = p.metadata.unwrap().fields;
        let s = |k: &str| match &f[k].kind {
            Some(Kind::StringValue(v)) => v.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("NAMESPACE"), "shop");
        assert_eq!(s("SERVICE_ACCOUNT"), "web");
        assert_eq!(s("NAME"), "web-1");
        assert_eq!(s("INSTANCE_IPS"), "10.0.0.7,fd00::7");
        assert_eq!(s("CLUSTER_ID"), "Kubernetes");
        assert_eq!(s("LABELS"), "x");
        assert_eq!(s("NODE_NAME"), "node-a");
        let none = NodeInfo::default();
        assert!(none.id().starts_with("ztunnel~1.1.1.1~"));
        assert!(!none.metadata().contains_key("NODE_NAME"));
    }
}
