//! The delta ADS client that feeds [`crate::state::Store`]: one
//! `DeltaAggregatedResources` stream over TLS to istiod (or
//! sidetunnel-meshd) carrying Istio's `Address` and `Authorization` types.
//!
//! * Wildcard or on-demand per type. On demand, the store's lookups
//!   subscribe `network/IP`, `namespace/hostname` or uid names on a miss
//!   (through [`crate::state::Demand`]) and wait, bounded, for the resource
//!   or a negative answer (the name in `removed_resources`). The initial
//!   names (own workload, prefetch list; for Authorization the own workload
//!   uid, which sidetunnel-meshd resolves to the policies that apply to it)
//!   are pinned; demanded names unused for `idle_timeout` are unsubscribed
//!   and what only they brought is removed from the store.
//! * Every response is applied, then ACKed; resources failing validation are
//!   skipped and NACKed by name while the others apply.
//! * The stream reconnects with jittered exponential backoff; the store
//!   keeps the last-known config meanwhile, and the new stream carries
//!   `initial_resource_versions` for what the store holds plus the current
//!   subscriptions. The bearer token is re-read on every connect.
//!
//! Submodules: `client` (the stream loop), `handler` (response → store
//! update + verdict), `node` (ztunnel-format node id/metadata), `stats`,
//! `from_config` (settings from the proxy's [`crate::config::Config`]).
//! Prefetch entries become resource names by the grammar the shim checks
//! them with ([`sidetunnel_contract::prefetch`]).

mod client;
mod from_config;
pub mod handler;
mod node;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sidetunnel_contract::prefetch::{PrefetchError, prefetch_names};
use tokio::sync::{mpsc, watch};

pub use client::XdsClient;
pub use from_config::own_workload_uid;
pub use node::{ISTIO_VERSION, NodeInfo};
pub use sidetunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
pub use stats::{XdsCounters, XdsStats};

/// How one resource type is subscribed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscription {
    /// Everything of the type (what a node ztunnel does).
    Wildcard,
    /// Only named resources: `initial` at start (pinned: never dropped as
    /// idle), more on demand.
    OnDemand { initial: Vec<String> },
}

/// Retry pacing between connection attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(15),
        }
    }
}

/// Everything the client needs to reach and authenticate to the server.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `https://host:port`.
    pub address: String,
    /// Name the server certificate must carry (SNI and verification).
    pub server_name: String,
    /// PEM file with the root(s) that sign the server certificate; re-read
    /// on every connect.
    pub root_cert: PathBuf,
    /// File holding the bearer token (a projected service-account JWT);
    /// re-read on every connect so rotated tokens are picked up.
    pub token_file: Option<PathBuf>,
    /// Sent as the `clusterid` header and `CLUSTER_ID` metadata.
    pub cluster_id: String,
    pub node: NodeInfo,
    pub addresses: Subscription,
    pub authorizations: Subscription,
    /// Bound on TCP connect, TLS handshake and stream opening.
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    /// On-demand Address names not used for this long are unsubscribed and
    /// their resources removed (initial names are kept). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// SO_MARK of the connection to the server (the proxy's mark, so the
    /// pod's redirection ruleset does not capture it); 0: unmarked.
    pub mark: u32,
}

impl XdsConfig {
    /// A wildcard-mode config with default timeouts; `server_name` is the
    /// host part of `address`.
    pub fn new(address: impl Into<String>, root_cert: impl Into<PathBuf>, node: NodeInfo) -> Self {
        let address = address.into();
        let server_name = host_of(&address);
        XdsConfig {
            address,
            server_name,
            root_cert: root_cert.into(),
            token_file: None,
            cluster_id: node.cluster_id.clone(),
            node,
            addresses: Subscription::Wildcard,
            authorizations: Subscription::Wildcard,
            connect_timeout: Duration::from_secs(5),
            backoff: Backoff::default(),
            idle_timeout: None,
            mark: 0,
        }
    }

    /// Adds prefetch entries (hostnames, `namespace/hostname` or IPs, see
    /// [`prefetch_names`]) to the initial on-demand Address names, resolved
    /// on `network`. No-op in wildcard mode, which fetches everything.
    pub fn add_prefetch(&mut self, entries: &[String], network: &str) -> Result<(), PrefetchError> {
        let names = prefetch_names(entries, network)?;
        if let Subscription::OnDemand { initial } = &mut self.addresses {
            for n in names {
                if !initial.contains(&n) {
                    initial.push(n);
                }
            }
        }
        Ok(())
    }
}

/// Host part of `scheme://host:port/...` (brackets of IPv6 literals removed).
fn host_of(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .to_string()
}

/// Why a connection attempt or stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("invalid xDS address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("reading xDS root certificate {path}: {source}")]
    RootCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading bearer token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bearer token in {path} is not a valid header value")]
    TokenFormat { path: PathBuf },
    #[error("connecting to xDS server {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("xDS server {address} refused the stream: {code:?}: {message}")]
    Refused {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("xDS stream from {address} failed: {code:?}: {message}")]
    Stream {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("xDS server {address} closed the stream")]
    Closed { address: String },
    #[error("timed out after {0:?} opening the xDS stream")]
    Timeout(Duration),
}

/// Connection state, for readiness, logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    /// A stream is currently open.
    pub connected: bool,
    /// Every wildcard type (and every on-demand type with initial names) has
    /// been received and applied at least once. Stays true across
    /// reconnects: the store keeps serving the last-known config.
    pub synced: bool,
    /// Number of the current (or last) connection attempt, from 1.
    pub attempt: u64,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// The last NACK's error detail.
    pub last_nack: Option<String>,
}

/// Subscription changes requested while the client runs.
#[derive(Clone, Debug)]
enum Command {
    Subscribe(&'static str, Vec<String>),
    Unsubscribe(&'static str, Vec<String>),
}

pub(crate) struct Shared {
    stats: XdsStats,
    status: watch::Sender<XdsStatus>,
    commands: mpsc::UnboundedSender<Command>,
}

/// Cloneable handle to a running (or not yet started) client.
#[derive(Clone)]
pub struct XdsHandle {
    shared: Arc<Shared>,
}

impl XdsHandle {
    /// Live counters.
    pub fn stats(&self) -> &XdsStats {
        &self.shared.stats
    }

    /// Current status.
    pub fn status(&self) -> XdsStatus {
        self.shared.status.borrow().clone()
    }

    /// Watches the status (changes on connect, sync, error, NACK).
    pub fn watch_status(&self) -> watch::Receiver<XdsStatus> {
        self.shared.status.subscribe()
    }

    /// Waits until `pred` holds on the status, or `timeout`; returns whether it held.
    pub async fn wait_status(&self, timeout: Duration, pred: impl Fn(&XdsStatus) -> bool) -> bool {
        let mut rx = self.watch_status();
        tokio::time::timeout(timeout, rx.wait_for(|s| pred(s)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the initial sync completed (see [`XdsStatus::synced`]).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        self.wait_status(timeout, |s| s.synced).await
    }

    /// Adds names to an on-demand subscription of `type_url` (Address or
    /// Authorization). Ignored for wildcard types and unknown type URLs.
    pub fn subscribe(&self, type_url: &str, names: Vec<String>) {
        if let Some(t) = known_type(type_url) {
            let _ = self.shared.commands.send(Command::Subscribe(t, names));
        }
    }

    /// Removes names from an on-demand subscription. The server stops
    /// pushing them; resources already in the store stay until the caller
    /// (e.g. an idle-subscription sweeper) removes them.
    pub fn unsubscribe(&self, type_url: &str, names: Vec<String>) {
        if let Some(t) = known_type(type_url) {
            let _ = self.shared.commands.send(Command::Unsubscribe(t, names));
        }
    }
}

fn known_type(type_url: &str) -> Option<&'static str> {
    handler::TYPE_URLS.into_iter().find(|t| *t == type_url)
}

/// The store's [`crate::state::Demand`] in on-demand mode: forwards names to
/// the client's Address subscription.
struct AddressDemand(mpsc::UnboundedSender<Command>);

impl crate::state::Demand for AddressDemand {
    fn subscribe(&self, names: Vec<String>) {
        let _ = self.0.send(Command::Subscribe(ADDRESS_TYPE_URL, names));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_defaults_to_host() {
        assert_eq!(host_of("https://127.0.0.1:15012"), "127.0.0.1");
        assert_eq!(
            host_of("https://istiod.istio-system.svc:15012/x"),
            "istiod.istio-system.svc"
        );
        assert_eq!(host_of("https://[::1]:15012"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
