//! The environment variables the shim passes to the proxy (its "standard
//! environment") and the proxy reads as its settings. The proxy reads more
//! (see `sidetunnel-proxy run --help`); these are the ones the shim sets.

pub const POD_NAMESPACE: &str = "SIDETUNNEL_POD_NAMESPACE";
pub const POD_NAME: &str = "SIDETUNNEL_POD_NAME";
pub const POD_UID: &str = "SIDETUNNEL_POD_UID";
pub const SERVICE_ACCOUNT: &str = "SIDETUNNEL_SERVICE_ACCOUNT";
pub const NODE_NAME: &str = "SIDETUNNEL_NODE_NAME";
pub const CLUSTER_ID: &str = "SIDETUNNEL_CLUSTER_ID";
pub const TRUST_DOMAIN: &str = "SIDETUNNEL_TRUST_DOMAIN";
pub const XDS_ADDRESS: &str = "SIDETUNNEL_XDS_ADDRESS";
pub const XDS_ROOT_CERT: &str = "SIDETUNNEL_XDS_ROOT_CERT";
pub const CA_ADDRESS: &str = "SIDETUNNEL_CA_ADDRESS";
pub const TOKEN_FILE: &str = "SIDETUNNEL_TOKEN_FILE";
pub const ADMIN_SOCKET: &str = "SIDETUNNEL_ADMIN_SOCKET";
pub const OUTBOUND_PORT: &str = "SIDETUNNEL_OUTBOUND_PORT";
pub const INBOUND_PLAINTEXT_PORT: &str = "SIDETUNNEL_INBOUND_PLAINTEXT_PORT";
pub const HBONE_PORT: &str = "SIDETUNNEL_HBONE_PORT";
pub const METRICS_PORT: &str = "SIDETUNNEL_METRICS_PORT";
pub const READINESS_PORT: &str = "SIDETUNNEL_READINESS_PORT";
pub const MARK: &str = "SIDETUNNEL_MARK";
/// `true` runs the proxy's DNS server (the shim sets it when DNS capture
/// is on for the pod).
pub const DNS_PROXY: &str = "SIDETUNNEL_DNS_PROXY";
pub const DNS_PORT: &str = "SIDETUNNEL_DNS_PORT";
/// The pod's resolv.conf, copied where the proxy can read it: its
/// nameservers are the DNS proxy's upstream.
pub const DNS_RESOLV_CONF: &str = "SIDETUNNEL_DNS_RESOLV_CONF";
