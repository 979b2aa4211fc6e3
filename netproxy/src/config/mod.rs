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

/// Default `--memory-budget`: half of a 64 MiB pod, so a pod that small
/// keeps the other half for its app.
pub const DEFAULT_MEMORY_BUDGET: u64 = 32 << 20;

/// Part of the memory budget that traffic does not buy: the resident
/// binary, runtime, threads and an idle connection table (5.5–6 MiB for a
/// release proxy at idle, docs/performance.md "Memory") with some room.
pub const MEMORY_BUDGET_RESERVE: u64 = 8 << 20;

/// Smallest accepted `--memory-budget`: the reserve plus 8 MiB of buffers
/// (below that the derived windows hit HTTP/2's 64 KiB floor and the
/// budget could no longer be kept).
pub const MIN_MEMORY_BUDGET: u64 = 16 << 20;

/// Default budget of grown copy buffers: the share of the default memory
/// budget (8 MiB, 16 directions at the largest chunk).
pub const DEFAULT_COPY_BUFFER_BUDGET: usize =
    BufferShares::of(DEFAULT_MEMORY_BUDGET).copy_buffer_budget as usize;

/// The buffer limits a memory budget pays for (explicit flags override
/// each). What the budget minus [`MEMORY_BUDGET_RESERVE`] buys is split so
/// that the proxy's three growing parts fit in two thirds of it, leaving a
/// third for the 16 KiB chunks of streams kept small, copy chunks pinned by
/// h2's send queue, and allocator slack:
///
/// * a third to the copy buffers (`copy_buffer_budget`), the sending
///   side's reads from local sockets;
/// * a sixth to the HTTP/2 connection window: what this proxy buffers
///   received from one HBONE connection, and — both proxies of a mesh run
///   the same defaults — what the peer lets it queue for sending on one;
/// * the stream window a quarter of that, so one stream cannot fill the
///   connection's window alone.
///
/// The windows are capped at ztunnel's (4 MiB / 16 MiB): a budget of
/// 104 MiB or more gives the previous defaults (32 MiB copy budget,
/// 4 MiB / 16 MiB windows). The bound holds per HBONE connection: 100
/// streams to one destination share one (`--pool-max-streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferShares {
    pub copy_buffer_budget: u64,
    pub stream_window: u32,
    pub connection_window: u32,
}

impl BufferShares {
    /// The shares of `budget` (at least [`MIN_MEMORY_BUDGET`], at most
    /// [`MAX_MEMORY_BUDGET`]; the resolver checks before calling).
    pub const fn of(budget: u64) -> BufferShares {
        const WINDOW_STEP: u64 = 64 << 10;
        let buffers = budget.saturating_sub(MEMORY_BUDGET_RESERVE);
        let connection = clamp(buffers / 6 / WINDOW_STEP * WINDOW_STEP, 256 << 10, 16 << 20);
        // 64 KiB: above HTTP/2's 65,535-byte floor for a window.
        let stream = clamp(connection / 4, WINDOW_STEP, 4 << 20);
        BufferShares {
            copy_buffer_budget: buffers / 3,
            stream_window: stream as u32,
            connection_window: connection as u32,
        }
    }
}

const fn clamp(v: u64, lo: u64, hi: u64) -> u64 {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

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

/// Largest accepted `--memory-budget` (same reason).
pub const MAX_MEMORY_BUDGET: u64 = 64 << 30;

/// Resource bounds. Worst-case memory of one proxied connection is about
/// one stream window (data received from the peer proxy, not yet written
/// to the local socket) plus the copy path's buffers (at most
/// `hbone::CONNECTION_COPY_CAP`); the connection window caps what all
/// streams of one HBONE connection may hold together, and the copy-buffer
/// budget what all grown copy buffers of the process hold together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// What the proxy's memory (RSS) should stay within; the defaults of
    /// the three fields below are derived from it ([`BufferShares`]).
    pub memory_budget: u64,
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
    /// 16384 connections; windows and copy-buffer budget as a 32 MiB
    /// memory budget pays for (1 MiB per stream, 4 MiB per connection,
    /// 8 MiB of grown copy buffers).
    fn default() -> Self {
        Limits::within(DEFAULT_MEMORY_BUDGET, 16384)
    }
}

impl Limits {
    /// Whether explicit flags set a buffer limit above what
    /// `memory_budget` pays for: the proxy may then grow past its budget
    /// under bulk load (the start logs a warning).
    pub fn exceeds_budget(&self) -> bool {
        let shares = BufferShares::of(self.memory_budget);
        self.copy_buffer_budget > shares.copy_buffer_budget
            || self.stream_window > shares.stream_window
            || self.connection_window > shares.connection_window
    }

    /// `max_connections` and the buffer limits `memory_budget` pays for.
    pub fn within(memory_budget: u64, max_connections: usize) -> Self {
        let shares = BufferShares::of(memory_budget);
        Limits {
            memory_budget,
            max_connections,
            stream_window: shares.stream_window,
            connection_window: shares.connection_window,
            copy_buffer_budget: shares.copy_buffer_budget,
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
