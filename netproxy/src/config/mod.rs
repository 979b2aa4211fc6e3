//! Proxy configuration: command-line flags, environment variables and an
//! optional TOML file (flags and env win over the file, the file over
//! defaults), resolved into one validated [`Config`]. Every validation error
//! names the flag and says what is wrong, so a misconfigured pod fails at
//! start with a readable message instead of misbehaving later.

mod args;
mod log;
mod parse;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use sidetunnel_contract::ports;

pub use args::ProxyArgs;
pub use log::{LogFilterError, LogFormat, parse_log_filter};
pub use parse::{parse_duration, parse_mark, parse_size};

/// Default idle time after which an on-demand destination is dropped.
pub const DEFAULT_XDS_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Default budget of grown copy buffers: 32 MiB, enough for 64 directions
/// at the largest chunk (two 256 KiB buffers each).
pub const DEFAULT_COPY_BUFFER_BUDGET: usize = 32 << 20;

/// Errors found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("missing required setting --{flag} (env {env}, file key `{flag}`)")]
    Missing {
        flag: &'static str,
        env: &'static str,
    },
    #[error("invalid --{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
}

impl ConfigError {
    pub(crate) fn invalid(flag: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        ConfigError::Invalid {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Who this proxy is: the pod it serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub service_account: String,
    pub node_name: Option<String>,
    pub cluster_id: String,
    pub trust_domain: String,
    pub network: String,
    /// The pod's IPs when the shim passes them; otherwise discovered from the
    /// netns interfaces at start.
    pub ips: Vec<IpAddr>,
}

impl PodIdentity {
    /// The SPIFFE identity the pod's certificate must carry.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A gRPC endpoint of the control plane (xDS or CA).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// `https://host:port`.
    pub address: String,
    /// TLS server name checked against the server certificate.
    pub server_name: String,
    /// PEM file with the roots that sign the server certificate.
    pub root_cert: PathBuf,
}

/// Where the workload certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum CertSource {
    /// Istio CA: CSR over gRPC authenticated by the service-account token.
    IstioCa { ca: Endpoint },
    /// Certificate files provisioned by the platform, watched for changes.
    Files {
        cert: PathBuf,
        key: PathBuf,
        roots: PathBuf,
    },
}

/// How the xDS client subscribes to addresses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum XdsMode {
    /// Only the pod's own workload and destinations it really uses.
    OnDemand,
    /// Every address in the mesh (what a node ztunnel does).
    Wildcard,
}

/// Local inbound policy for plaintext (non-HBONE) connections, Istio's
/// PeerAuthentication mode.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum InboundPolicy {
    /// Plaintext rejected, except from the configured probe sources.
    #[value(name = "STRICT", alias = "strict")]
    Strict,
    /// Plaintext accepted, subject to authorization without identity.
    #[value(name = "PERMISSIVE", alias = "permissive")]
    Permissive,
}

/// The proxy's listening ports (Istio conventions by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: ports::OUTBOUND,
            inbound_plaintext: ports::INBOUND_PLAINTEXT,
            hbone: ports::HBONE,
            metrics: ports::METRICS,
            readiness: ports::READINESS,
        }
    }
}

impl Ports {
    /// Ports an outbound connection to the pod itself must never reach
    /// (they would loop through the proxy).
    pub fn self_call_ports(&self) -> [u16; 3] {
        [self.outbound, self.inbound_plaintext, self.hbone]
    }
}

/// The DNS proxy (`--dns-proxy`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DnsSettings {
    /// UDP and TCP port on loopback the ruleset redirects port 53 to.
    pub port: u16,
    /// The pod's resolv.conf: upstream nameservers, search domains, ndots.
    pub resolv_conf: PathBuf,
    /// Kubernetes cluster domain (Service names end in `svc.<domain>`).
    pub cluster_domain: String,
    /// Longest wait of one query for an on-demand xDS fetch.
    #[serde(with = "parse::duration_serde")]
    pub on_demand_timeout: Duration,
}

/// Default bound of a DNS query's on-demand wait: well under a stub
/// resolver's 5 s timeout, so a slow control plane costs one forward, not a
/// client retry.
pub const DEFAULT_DNS_ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// HBONE client pool tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolConfig {
    /// Streams per HTTP/2 connection before a new connection is opened.
    pub max_streams_per_conn: u16,
    /// How long an unused pooled connection is kept.
    pub idle_timeout: Duration,
}

/// Largest accepted `--max-connections` (each connection needs two file
/// descriptors; far beyond what one pod's proxy should hold).
pub const MAX_CONNECTIONS_CAP: usize = 1 << 20;

/// Largest accepted `--copy-buffer-budget` (fits any platform's `usize`
/// arithmetic with room; far beyond one pod's memory).
pub const MAX_COPY_BUFFER_BUDGET: u64 = 64 << 30;

/// Resource bounds. Worst-case memory of one proxied connection is about
/// one stream window (data received from the peer proxy, not yet written
/// to the local socket) plus the copy path's buffers (at most
/// `hbone::CONNECTION_COPY_CAP`); the connection window caps what all
/// streams of one HBONE connection may hold together, and the copy-buffer
/// budget what all grown copy buffers of the process hold together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Most proxied connections held at once; more are refused.
    pub max_connections: usize,
    /// HTTP/2 receive window of one HBONE stream (bytes).
    pub stream_window: u32,
    /// HTTP/2 receive window of one HBONE connection (bytes).
    pub connection_window: u32,
    /// Bytes all copy buffers grown past 16 KiB may hold together.
    pub copy_buffer_budget: u64,
}

impl Default for Limits {
    /// 16384 connections; ztunnel's windows (4 MiB per stream, 16 MiB per
    /// connection); a 32 MiB copy-buffer budget.
    fn default() -> Self {
        Limits {
            max_connections: 16384,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            copy_buffer_budget: DEFAULT_COPY_BUFFER_BUDGET as u64,
        }
    }
}

/// The resolved and validated proxy configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub pod: PodIdentity,
    pub xds: Endpoint,
    /// Bearer token for the CA and xDS server (a projected service-account
    /// token), re-read on every use.
    pub token_file: Option<PathBuf>,
    pub xds_mode: XdsMode,
    pub cert_source: CertSource,
    pub ports: Ports,
    pub mark: u32,
    pub admin_socket: Option<PathBuf>,
    #[serde(with = "parse::duration_serde")]
    pub drain_grace_period: Duration,
    #[serde(with = "parse::duration_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "parse::duration_serde")]
    pub on_demand_timeout: Duration,
    /// Unused on-demand destinations are unsubscribed after this long.
    #[serde(with = "parse::duration_serde")]
    pub xds_idle_timeout: Duration,
    /// Destinations subscribed at start (on-demand mode), as given.
    pub xds_prefetch: Vec<String>,
    pub pool: PoolConfig,
    pub limits: Limits,
    pub worker_threads: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    pub inbound_policy: InboundPolicy,
    pub probe_sources: Vec<IpNet>,
    /// The DNS proxy, when enabled.
    pub dns: Option<DnsSettings>,
}

impl Config {
    /// Loads the optional file named by `--config`, merges flags/env over it
    /// and validates the result.
    pub fn load(cli: ProxyArgs) -> Result<Config, ConfigError> {
        let merged = match cli.config.clone() {
            Some(path) => cli.over(ProxyArgs::from_file(&path)?),
            None => cli,
        };
        merged.resolve()
    }
}

#[cfg(test)]
mod tests;
