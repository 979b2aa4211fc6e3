//! Domain types of the store: what the proxy knows about workloads, services
//! and L4 authorization policies after conversion and validation of Istio's
//! `istio.workload.Address` and `istio.security.Authorization` resources.
//! They serialize (serde, camelCase) in the shape of ztunnel's `config_dump`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// An IP address qualified by the network it lives on (`network/IP`), the
/// key Istio uses for workload IPs and service VIPs. The empty network is
/// the default network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddr {
    pub network: String,
    pub address: IpAddr,
}

impl NetworkAddr {
    pub fn new(network: impl Into<String>, address: IpAddr) -> Self {
        NetworkAddr {
            network: network.into(),
            address,
        }
    }

    /// Parses istiod's `network/IP` alias (the network may be empty);
    /// `None` for any other resource name.
    pub fn parse(name: &str) -> Option<NetworkAddr> {
        let (network, ip) = name.rsplit_once('/')?;
        if network.contains('/') {
            return None;
        }
        let ip: IpAddr = ip.parse().ok()?;
        Some(NetworkAddr::new(network, ip))
    }
}

/// Formats as istiod's resource alias: `network/IP` (`/10.0.0.1` on the
/// default network, which is how istiod spells it too).
impl fmt::Display for NetworkAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl Serialize for NetworkAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `namespace/hostname`: the resource name of a service and the key of a
/// workload's `services` map.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

/// How traffic to a workload is carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TunnelProtocol {
    /// Plain TCP: the destination is not in the mesh (or not captured).
    #[default]
    None,
    /// HTTP/2 CONNECT over mutual TLS to port 15008.
    Hbone,
    /// Istio sidecar mTLS (ALPN `istio-peer-exchange`), for interop with
    /// Envoy sidecars.
    LegacyIstioMtls,
}

/// Where a waypoint or network gateway is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// Port of the gateway's HBONE (mTLS) listener; 15008 when unset upstream.
    pub hbone_mtls_port: u16,
}

/// A gateway is named either by a service hostname or by an address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    Hostname(NamespacedHostname),
    Address(NetworkAddr),
}

/// Health as the control plane reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// Kind of controller owning the workload (Istio's `WorkloadType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadType {
    #[default]
    Deployment,
    Cronjob,
    Pod,
    Job,
}

/// Whether the workload shares the node's network namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// Service port → target (container) port. A target of 0 means "same as
/// the service's `ports` mapping" (Istio's convention for named ports).
pub type PortMap = BTreeMap<u16, u16>;

/// One workload (pod, VM entry) as known from WDS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Globally unique id, the resource name (`cluster//Pod/ns/name`).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    /// Pod IPs (ztunnel's dump calls them `workloadIps`).
    #[serde(rename = "workloadIps")]
    pub addresses: Vec<IpAddr>,
    /// DNS name for workloads without IPs (rare; e.g. ServiceEntry hosts).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    pub network: String,
    pub protocol: TunnelProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_gateway: Option<GatewayAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub workload_type: WorkloadType,
    pub cluster_id: String,
    pub network_mode: NetworkMode,
    /// Services this workload backs: `ns/hostname` → port map.
    pub services: BTreeMap<String, PortMap>,
    /// `ns/name` of the selector-scoped policies that select this workload.
    pub authorization_policies: Vec<String>,
    pub status: HealthStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
}

impl Workload {
    /// The workload's SPIFFE identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn identity(&self) -> String {
        spiffe_id(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// True when the control plane reports the workload healthy.
    pub fn healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    /// The `network/IP` names (istiod aliases) under which this workload is found.
    pub fn network_addrs(&self) -> impl Iterator<Item = NetworkAddr> + '_ {
        self.addresses
            .iter()
            .map(|ip| NetworkAddr::new(self.network.clone(), *ip))
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`; an empty trust domain means `cluster.local`
/// (istiod leaves it empty for the default).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let td = if trust_domain.is_empty() {
        "cluster.local"
    } else {
        trust_domain
    };
    format!("spiffe://{td}/ns/{namespace}/sa/{service_account}")
}

/// Locality-aware load-balancing settings of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    /// Locality scopes to prefer, most specific match first
    /// (`REGION`, `ZONE`, `SUBZONE`, `NODE`, `CLUSTER`, `NETWORK`).
    pub routing_preference: Vec<String>,
    /// `UNSPECIFIED_MODE`, `STRICT` or `FAILOVER`.
    pub mode: String,
    /// `ONLY_HEALTHY` or `ALLOW_ALL`.
    pub health_policy: String,
}

/// One service (Kubernetes Service or ServiceEntry) as known from WDS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkAddr>,
    /// Service port → target port (0: take it from each endpoint's map).
    pub ports: PortMap,
    pub subject_alt_names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    #[serde(rename = "loadBalancer", skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancing>,
}

impl Service {
    /// The resource name and endpoint key, `namespace/hostname`.
    pub fn namespaced_hostname(&self) -> NamespacedHostname {
        NamespacedHostname {
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
        }
    }

    /// `namespace/hostname` as a string (the store's key).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// What a resolved address is: a workload IP or a service VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Workload(std::sync::Arc<Workload>),
    Service(std::sync::Arc<Service>),
}

/// Which workloads an L4 policy applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum PolicyScope {
    /// Every workload in the mesh (policies in the root namespace).
    #[default]
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads listing the policy in `authorization_policies`.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// Istio's string matcher (exact / prefix / suffix / presence).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Matches any non-empty value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A service account reference `namespace`/`serviceAccount`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// An IP prefix (`address/length`), validated: length fits the family and
/// host bits may be set (Istio sends them as written by the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub address: IpAddr,
    pub length: u8,
}

impl IpPrefix {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.length))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.length))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.length)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One match: every non-empty field must match (AND); within a field any
/// entry may match (OR); `not_*` fields must not match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMatch {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpPrefix>,
    pub not_source_ips: Vec<IpPrefix>,
    pub destination_ips: Vec<IpPrefix>,
    pub not_destination_ips: Vec<IpPrefix>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// A clause holds alternative matches (OR); a rule's clauses all apply (AND);
/// a policy's rules are alternatives (OR). Same nesting as istio.security.
pub type Clause = Vec<PolicyMatch>;
pub type Rule = Vec<Clause>;

/// An L4 authorization policy (Istio's `istio.security.Authorization`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    pub rules: Vec<Rule>,
    pub dry_run: bool,
}

impl Policy {
    /// The resource name and store key, `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
