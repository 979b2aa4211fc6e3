//! TCP traffic metrics with Istio's standard labels, and the access log.
//!
//! One [`ConnectionRecorder`] per proxied connection: created when the proxy
//! knows who talks to whom (counts `istio_tcp_connections_opened_total`),
//! fed byte counts while data flows, and finished exactly once (counts
//! `..._closed_total`, plus `..._failed_total` when a response flag says the
//! connection failed, and writes one `access` log line). Dropping an
//! unfinished recorder (a task cancelled at shutdown) still closes it.
//!
//! Byte directions follow Istio: `received` = from the client (request),
//! `sent` = to the client (response).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::event;

use crate::identity::Identity;
use crate::state::{Service, Workload};

/// Which side of the connection reports.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The client's proxy (outbound).
    #[default]
    Source,
    /// The server's proxy (inbound).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
    fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

/// Why a connection failed (Istio/Envoy response-flag spellings).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// Denied by authorization policy (or STRICT plaintext rejection).
    AuthorizationPolicyDenied,
    /// The upstream connection could not be established.
    ConnectionFailure,
    TlsFailure,
    Http2HandshakeFailure,
    IdentityError,
}

impl ResponseFlags {
    fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::AuthorizationPolicyDenied => "DENY",
            ResponseFlags::ConnectionFailure => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::Http2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
        }
    }
}

/// `connection_security_policy`.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    #[default]
    Unknown,
    MutualTls,
}

impl SecurityPolicy {
    fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::Unknown => "unknown",
            SecurityPolicy::MutualTls => "mutual_tls",
        }
    }
}

macro_rules! label_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                fmt::Write::write_str(w, self.as_str())
            }
        }
    )*};
}
label_str!(Reporter, ResponseFlags, SecurityPolicy);

/// Istio's standard TCP labels (ztunnel's set, without locality). Unknown
/// values are the string `unknown`, as in Istio.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() { UNKNOWN } else { s }.to_string()
}

/// Workload labels: (workload, canonical service, canonical revision,
/// namespace, app, version, cluster).
fn workload_labels(w: Option<&Workload>) -> [String; 7] {
    match w {
        Some(w) => [
            or_unknown(&w.workload_name),
            or_unknown(&w.canonical_name),
            or_unknown(&w.canonical_revision),
            or_unknown(&w.namespace),
            or_unknown(&w.canonical_name),
            or_unknown(&w.canonical_revision),
            or_unknown(&w.cluster_id),
        ],
        None => std::array::from_fn(|_| UNKNOWN.to_string()),
    }
}

/// One side of a connection as known to the proxy.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The workload from the store, when known.
    pub workload: Option<Arc<Workload>>,
    /// The identity proven by mTLS (or our own certificate's identity).
    pub identity: Option<Identity>,
}

/// Everything known when a connection is accepted for proxying.
#[derive(Clone, Debug)]
pub struct ConnectionOpen {
    pub reporter: Reporter,
    /// Client address.
    pub src: SocketAddr,
    /// The address the proxy connects to (pod:15008 for HBONE, the app or
    /// passthrough address otherwise).
    pub dst: SocketAddr,
    /// The HBONE `:authority` (final destination) when tunnelled.
    pub hbone_target: Option<SocketAddr>,
    pub source: Peer,
    pub destination: Peer,
    pub destination_service: Option<Arc<Service>>,
    pub security: SecurityPolicy,
}

impl ConnectionOpen {
    fn labels(&self) -> TrafficLabels {
        let [sw, scs, scr, sns, sapp, sver, scl] = workload_labels(self.source.workload.as_deref());
        let [dw, dcs, dcr, dns, dapp, dver, dcl] =
            workload_labels(self.destination.workload.as_deref());
        let principal = |p: &Peer| match (&p.identity, self.security) {
            (Some(id), SecurityPolicy::MutualTls) => id.to_string(),
            _ => UNKNOWN.to_string(),
        };
        let (svc, svc_ns, svc_name) = match &self.destination_service {
            Some(s) => (
                or_unknown(&s.hostname),
                or_unknown(&s.namespace),
                or_unknown(&s.name),
            ),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        TrafficLabels {
            reporter: self.reporter,
            source_workload: sw,
            source_canonical_service: scs,
            source_canonical_revision: scr,
            source_workload_namespace: sns,
            source_principal: principal(&self.source),
            source_app: sapp,
            source_version: sver,
            source_cluster: scl,
            destination_service: svc,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_workload: dw,
            destination_canonical_service: dcs,
            destination_canonical_revision: dcr,
            destination_workload_namespace: dns,
            destination_principal: principal(&self.destination),
            destination_app: dapp,
            destination_version: dver,
            destination_cluster: dcl,
            request_protocol: "tcp".into(),
            response_flags: ResponseFlags::None,
            connection_security_policy: self.security,
        }
    }
}

/// The TCP counter families. Cheap to clone (families share storage).
#[derive(Clone, Debug)]
pub struct TrafficMetrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    sent: Family<TrafficLabels, Counter>,
    received: Family<TrafficLabels, Counter>,
}

impl TrafficMetrics {
    pub(super) fn new(registry: &mut Registry) -> Self {
        let m = TrafficMetrics {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
        };
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
            m.failed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent.clone(),
        );
        m
    }

    /// Starts recording a connection: counts it opened and logs at debug.
    pub fn open(&self, conn: ConnectionOpen) -> ConnectionRecorder {
        let labels = conn.labels();
        let sent = self.sent.get_or_create(&labels).clone();
        let received = self.received.get_or_create(&labels).clone();
        self.opened.get_or_create(&labels).inc();
        let rec = ConnectionRecorder {
            metrics: self.clone(),
            labels,
            conn,
            start: Instant::now(),
            sent,
            received,
            sent_bytes: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            finished: false,
        };
        event!(
            target: "access",
            tracing::Level::DEBUG,
            src.addr = %rec.conn.src,
            src.workload = rec.labels.source_workload,
            dst.addr = %rec.conn.dst,
            dst.hbone_addr = rec.conn.hbone_target.map(tracing::field::display),
            dst.workload = rec.labels.destination_workload,
            direction = rec.labels.reporter.direction(),
            "connection opened"
        );
        rec
    }

    /// Logs a connection refused before enough was known to label metrics
    /// (e.g. a self-call, a failed TLS handshake).
    pub fn early_failure(
        reporter: Reporter,
        src: SocketAddr,
        dst: SocketAddr,
        err: &dyn fmt::Display,
    ) {
        event!(
            target: "access",
            tracing::Level::WARN,
            src.addr = %src,
            dst.addr = %dst,
            direction = reporter.direction(),
            error = %err,
            "connection failed"
        );
    }
}

/// Records one connection; see the module doc.
pub struct ConnectionRecorder {
    metrics: TrafficMetrics,
    labels: TrafficLabels,
    conn: ConnectionOpen,
    start: Instant,
    sent: Counter,
    received: Counter,
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    finished: bool,
}

impl ConnectionRecorder {
    /// Bytes sent to the client (response direction).
    pub fn add_sent(&self, n: u64) {
        self.sent_bytes.fetch_add(n, Ordering::Relaxed);
        self.sent.inc_by(n);
    }

    /// Bytes received from the client (request direction).
    pub fn add_received(&self, n: u64) {
        self.received_bytes.fetch_add(n, Ordering::Relaxed);
        self.received.inc_by(n);
    }

    /// The labels this connection is counted under.
    pub fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    /// Closes the connection record. `flag` other than `None` counts it as
    /// failed; `error` goes to the access log.
    pub fn finish(mut self, flag: ResponseFlags, error: Option<&dyn fmt::Display>) {
        self.record(flag, error.map(|e| e.to_string()));
    }

    fn record(&mut self, flag: ResponseFlags, error: Option<String>) {
        if self.finished {
            return;
        }
        self.finished = true;
        // Bytes stay on the open-time labels (so live byte counters are not
        // split); the close and failure counters carry the outcome flag.
        let mut labels = self.labels.clone();
        labels.response_flags = flag;
        self.metrics.closed.get_or_create(&labels).inc();
        if flag != ResponseFlags::None {
            self.metrics.failed.get_or_create(&labels).inc();
        }
        let mtls = labels.connection_security_policy == SecurityPolicy::MutualTls;
        let id = |s: &String| (mtls && s != UNKNOWN).then(|| s.clone());
        let (src_id, dst_id) = (
            id(&labels.source_principal),
            id(&labels.destination_principal),
        );
        let level_error = error.is_some();
        macro_rules! log {
            ($lvl:expr) => {
                event!(
                    target: "access",
                    $lvl,
                    src.addr = %self.conn.src,
                    src.workload = labels.source_workload,
                    src.namespace = labels.source_workload_namespace,
                    src.identity = src_id,
                    dst.addr = %self.conn.dst,
                    dst.hbone_addr = self.conn.hbone_target.map(tracing::field::display),
                    dst.service = labels.destination_service,
                    dst.workload = labels.destination_workload,
                    dst.namespace = labels.destination_workload_namespace,
                    dst.identity = dst_id,
                    direction = labels.reporter.direction(),
                    bytes_sent = self.sent_bytes.load(Ordering::Relaxed),
                    bytes_recv = self.received_bytes.load(Ordering::Relaxed),
                    duration_ms = self.start.elapsed().as_millis() as u64,
                    response_flags = flag.as_str(),
                    error = error.as_deref(),
                    "connection complete"
                )
            };
        }
        if level_error {
            log!(tracing::Level::WARN);
        } else {
            log!(tracing::Level::INFO);
        }
    }
}

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        self.record(
            ResponseFlags::None,
            Some("connection task ended before completion".into()),
        );
    }
}

impl fmt::Debug for ConnectionRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionRecorder")
            .field("src", &self.conn.src)
            .field("dst", &self.conn.dst)
            .field("reporter", &self.labels.reporter)
            .finish_non_exhaustive()
    }
}
