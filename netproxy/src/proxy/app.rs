//! Process wiring of `sidetunnel-proxy run`: binds every listener first (a
//! clash fails the start), starts the certificate source and the xDS
//! client, serves the data path, the DNS proxy (if enabled), metrics, readiness and the admin socket,
//! and on SIGTERM/SIGINT drains: listeners close, readiness turns 503, open
//! connections get the grace period, then the process exits. With the
//! shim's handover channel (see [`crate::handover`]) it takes inherited
//! listeners instead of binding, gives the shim its listeners and says when
//! it is ready; on SIGUSR1 it hands over: every listener (readiness,
//! metrics and admin included) stops accepting at once, because the next
//! proxy serves them, and open connections drain as on SIGTERM.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use serde_json::json;
use sidetunnel_contract::handover::ListenerName;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{BindError, Drain, Listeners, ProxyInputs, take_or_bind};
use crate::admin::{self, LogControl, Readiness};
use crate::cert_source::{CaClientConfig, CertSource, CertSourceError, FileSourceConfig};
use crate::config::{CertSource as CfgCertSource, Config};
use crate::dns::DnsServer;
use crate::handover::{Channel, HandoverError, Inherited};
use crate::identity::{CertificateManager, Identity, IdentityParseError};
use crate::metrics::Metrics;
use crate::socket;
use crate::state::Store;
use crate::xds::{XdsClient, XdsConfig, XdsHandle};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("DNS proxy: {0}")]
    Dns(#[from] crate::dns::DnsStartError),
    #[error("pod identity: {0}")]
    Identity(#[from] IdentityParseError),
    #[error("certificate source: {0}")]
    CertSource(#[from] CertSourceError),
    #[error("HBONE TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("listing the pod's addresses: {0}")]
    Addresses(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the proxy until SIGTERM/SIGINT, then drains.
pub async fn run(cfg: Config, logs: LogControl) -> Result<(), StartError> {
    let started = Instant::now();
    let cfg = Arc::new(cfg);
    let mut inherited = Inherited::from_env()?;
    let channel = Channel::from_env()?;
    let shim_holds_listeners = channel.is_some();
    let took_over = !inherited.is_empty();
    let listeners = Listeners::bind(&cfg, &mut inherited)?;
    let metrics_listener = take_or_bind(
        &mut inherited,
        ListenerName::Metrics,
        cfg.ports.metrics,
        cfg.mark,
        false,
    )?;
    let readiness_listener = take_or_bind(
        &mut inherited,
        ListenerName::Readiness,
        cfg.ports.readiness,
        cfg.mark,
        false,
    )?;
    let admin_listener = match inherited.take_unix(ListenerName::Admin)? {
        Some(l) => Some(tokio::net::UnixListener::from_std(l).map_err(|source| {
            admin::AdminError::Socket {
                path: "(inherited)".into(),
                source,
            }
        })?),
        None => cfg
            .admin_socket
            .as_deref()
            .map(admin::bind_admin_socket)
            .transpose()?,
    };
    let leftover = inherited.leftover();
    if !leftover.is_empty() {
        warn!(
            ?leftover,
            "inherited listeners these settings do not use; closing them"
        );
    }
    drop(inherited);
    if let Some(ch) = &channel {
        let mut named = listeners.named().to_vec();
        named.push((ListenerName::Metrics, metrics_listener.as_fd()));
        named.push((ListenerName::Readiness, readiness_listener.as_fd()));
        if let Some(a) = &admin_listener {
            named.push((ListenerName::Admin, a.as_fd()));
        }
        // Without them the shim cannot keep the ports open across a
        // restart or hand them to a successor; the proxy still serves.
        if let Err(e) = ch.send_listeners(&named) {
            warn!("giving the listeners to the shim: {e}");
        }
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let mut sighandover = signal(SignalKind::user_defined1()).map_err(StartError::Signals)?;

    let local_ips = if cfg.pod.ips.is_empty() {
        socket::local_addresses().map_err(StartError::Addresses)?
    } else {
        cfg.pod.ips.clone()
    };
    let identity = Identity::new(
        &cfg.pod.trust_domain,
        &cfg.pod.namespace,
        &cfg.pod.service_account,
    )?;
    let (certs, cert_task) = cert_source(&cfg).spawn(identity.clone())?;
    let store = Arc::new(Store::with_demand_timeout(cfg.on_demand_timeout));
    let metrics = Arc::new(Metrics::new());
    // Bound before the xDS client starts so a clash or a bad resolv.conf
    // fails the start like any other listener.
    let dns = cfg
        .dns
        .as_ref()
        .map(|d| {
            DnsServer::bind(
                d,
                &cfg.pod.namespace,
                &cfg.pod.network,
                cfg.mark,
                store.clone(),
                metrics.dns.clone(),
            )
        })
        .transpose()?;
    let (xds, xds_task) = XdsClient::new(
        XdsConfig::from_proxy_config(&cfg, &local_ips),
        store.clone(),
    )
    .spawn();
    metrics.xds.attach(xds.clone());
    info!(%identity, ips = ?local_ips, xds = %cfg.xds.address, "sidetunnel-proxy starting");
    let limits = &cfg.limits;
    if limits.exceeds_budget() {
        // Allowed (a pod may trade memory for throughput), but the budget
        // the RuntimeClass overhead was sized for no longer holds.
        warn!(
            memory_budget = limits.memory_budget,
            copy_buffer_budget = limits.copy_buffer_budget,
            stream_window = limits.stream_window,
            connection_window = limits.connection_window,
            "buffer limits set above --memory-budget's shares: bulk traffic may grow the proxy past its budget"
        );
    }

    let drain = Drain::new();
    let readiness = Readiness::new();
    {
        let certs = certs.clone();
        readiness.add("certificate", move || certs.is_ready());
        let xds = xds.clone();
        readiness.add("config", move || xds.status().synced);
        let d = drain.clone();
        readiness.add("not draining", move || !d.is_draining());
    }

    let stop = CancellationToken::new();
    let trust_domains = vec![cfg.pod.trust_domain.clone()];
    let acceptor = crate::tls::HboneAcceptor::new(certs.clone(), trust_domains)?;
    let pi = ProxyInputs::new(
        cfg.clone(),
        store.clone(),
        certs.clone(),
        metrics.clone(),
        local_ips,
    );
    // Inherited listeners are (or were) served by an earlier proxy of this
    // pod: the old one keeps accepting until this one is ready, and a
    // connection this one accepted before it had a certificate and its
    // first config would fail. So with inherited listeners nothing is
    // accepted until ready; connections meanwhile wait in the kernel's
    // accept queue (or go to the old proxy).
    let gate = {
        let (certs, xds, drain) = (certs.clone(), xds.clone(), drain.clone());
        async move {
            if took_over {
                tokio::select! {
                    _ = async {
                        certs.wait_ready().await;
                        xds.wait_synced(READY_LOG_BOUND).await;
                    } => {}
                    _ = drain.accepting_stopped() => {}
                }
            }
        }
    };
    let gate = gate.boxed().shared();
    let data_path = {
        let (pi, drain, gate) = (pi.clone(), drain.clone(), gate.clone());
        tokio::spawn(async move {
            gate.await;
            super::run(pi, listeners, acceptor, drain).await
        })
    };
    if let Some(dns) = dns {
        let serve_dns = dns.serve(stop.clone());
        tokio::spawn(gate.clone().then(move |()| serve_dns));
    }
    tokio::spawn(log_ready(started, certs.clone(), xds.clone(), channel));
    tokio::spawn(super::limits::release_memory_after_bursts(
        pi.connections.clone(),
        stop.clone(),
    ));
    let serve_metrics = admin::serve_metrics(metrics_listener, metrics.clone(), stop.clone());
    tokio::spawn(gate.clone().then(move |()| serve_metrics));
    let serve_readiness =
        admin::serve_readiness(readiness_listener, readiness.clone(), stop.clone());
    tokio::spawn(gate.then(move |()| serve_readiness));
    if let Some(l) = admin_listener {
        let dump = config_dump(cfg.clone(), store, certs, xds, pi);
        tokio::spawn(admin::serve_admin(l, dump, logs, stop.clone()));
    }

    let sig = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        _ = sighandover.recv() => "SIGUSR1",
    };
    let handover = sig == "SIGUSR1";
    if handover {
        // The successor accepts on the same sockets: stop every server of
        // this process now, so no probe or scrape reaches the old one.
        info!(grace = ?cfg.drain_grace_period, "handing over to a new proxy");
        stop.cancel();
    } else {
        info!(signal = sig, grace = ?cfg.drain_grace_period, "shutting down");
    }
    let cut = drain.shutdown(cfg.drain_grace_period).await;
    info!(cut, "drained");
    stop.cancel();
    let _ = data_path.await;
    xds_task.abort();
    cert_task.abort();
    // A shim that holds the admin socket (it was given or inherited) keeps
    // it for the next proxy and removes it with the pod's directory.
    if let Some(path) = &cfg.admin_socket
        && !shim_holds_listeners
    {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Logs once when the proxy first became ready (and tells the shim, over
/// the handover channel), with what it waited for,
/// in milliseconds since `run` began (after flags, logging and the runtime):
/// the start → ready breakdown without a debug log. Gives up silently if
/// readiness takes longer than [`READY_LOG_BOUND`].
async fn log_ready(
    started: Instant,
    certs: CertificateManager,
    xds: XdsHandle,
    channel: Option<Channel>,
) {
    let ms = |t: Instant| t.duration_since(started).as_secs_f64() * 1e3;
    let cert = async {
        certs.wait_ready().await;
        Instant::now()
    };
    let config = async {
        let synced = xds.wait_synced(READY_LOG_BOUND).await;
        synced.then(Instant::now)
    };
    let Ok((cert, Some(config))) =
        tokio::time::timeout(READY_LOG_BOUND, async { tokio::join!(cert, config) }).await
    else {
        return;
    };
    info!(
        ready_ms = format!("{:.1}", ms(cert.max(config))),
        certificate_ms = format!("{:.1}", ms(cert)),
        config_ms = format!("{:.1}", ms(config)),
        "ready"
    );
    if let Some(ch) = channel
        && let Err(e) = ch.send_ready()
    {
        warn!("telling the shim this proxy is ready: {e}");
    }
}

/// How long [`log_ready`] waits.
const READY_LOG_BOUND: Duration = Duration::from_secs(600);

fn cert_source(cfg: &Config) -> CertSource {
    match &cfg.cert_source {
        CfgCertSource::IstioCa { ca } => {
            let mut c = CaClientConfig::new(ca.address.clone(), ca.root_cert.clone());
            c.server_name = Some(ca.server_name.clone());
            c.token_file = cfg.token_file.clone();
            c.cluster_id = cfg.pod.cluster_id.clone();
            c.mark = cfg.mark;
            CertSource::IstioCa(c)
        }
        CfgCertSource::Files { cert, key, roots } => CertSource::Files(FileSourceConfig::new(
            cert.clone(),
            key.clone(),
            roots.clone(),
        )),
    }
}

fn config_dump(
    cfg: Arc<Config>,
    store: Arc<Store>,
    certs: CertificateManager,
    xds: XdsHandle,
    pi: Arc<ProxyInputs>,
) -> admin::ConfigDump {
    Arc::new(move || {
        let mut v = serde_json::to_value(store.dump()).unwrap_or_else(|_| json!({}));
        if let Some(obj) = v.as_object_mut() {
            let certificates: Vec<_> = certs.latest().map(|c| c.info()).into_iter().collect();
            obj.insert("certificates".into(), json!(certificates));
            obj.insert("config".into(), json!(*cfg));
            obj.insert(
                "xds".into(),
                json!({
                    "status": xds.status(),
                    "counters": xds.stats().snapshot(),
                    "onDemand": store.demanded_names(),
                }),
            );
            let pool = pi.pool.stats();
            obj.insert(
                "hbonePool".into(),
                json!({
                    "connectionsOpened": pool.connections_opened,
                    "openConnections": pool.open_connections,
                    "activeStreams": pool.active_streams,
                }),
            );
        }
        v
    })
}
