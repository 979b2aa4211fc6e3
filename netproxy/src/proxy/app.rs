//! Process wiring of `sidetunnel-proxy run`: binds every listener first (a
//! clash fails the start), starts the certificate source and the xDS
//! client, serves the data path, metrics, readiness and the admin socket,
//! and on SIGTERM/SIGINT drains: listeners close, readiness turns 503, open
//! connections get the grace period, then the process exits.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Drain, Listeners, ProxyInputs, socket};
use crate::admin::{self, LogControl, Readiness};
use crate::config::{CertSource as CfgCertSource, Config, XdsMode};
use crate::identity::{
    CaClientConfig, CertSource, CertificateManager, FileSourceConfig, Identity, IdentityError,
    IdentityParseError,
};
use crate::metrics::Metrics;
use crate::state::{NetworkAddr, Store};
use crate::xds::{NodeInfo, Subscription, XdsClient, XdsConfig, XdsHandle};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] super::BindError),
    #[error("binding the {what} port {port}: {source}")]
    BindPort {
        what: &'static str,
        port: u16,
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("pod identity: {0}")]
    Identity(#[from] IdentityParseError),
    #[error("certificate source: {0}")]
    CertSource(#[from] IdentityError),
    #[error("HBONE TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("listing the pod's addresses: {0}")]
    Addresses(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the proxy until SIGTERM/SIGINT, then drains.
pub async fn run(cfg: Config, logs: LogControl) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    let any = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let listeners = Listeners::bind(&cfg)?;
    let bind_port = |what, port| {
        admin::bind_tcp(any(port), cfg.mark).map_err(|source| StartError::BindPort {
            what,
            port,
            source,
        })
    };
    let metrics_listener = bind_port("metrics", cfg.ports.metrics)?;
    let readiness_listener = bind_port("readiness", cfg.ports.readiness)?;
    let admin_listener = cfg
        .admin_socket
        .as_deref()
        .map(admin::bind_admin_socket)
        .transpose()?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

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
    let (certs, cert_task) = CertificateManager::spawn(identity.clone(), cert_source(&cfg))?;
    let store = Arc::new(Store::with_demand_timeout(cfg.on_demand_timeout));
    let (xds, xds_task) = XdsClient::new(xds_config(&cfg, &local_ips), store.clone()).spawn();
    let metrics = Arc::new(Metrics::new());
    metrics.xds.attach(xds.clone());
    info!(%identity, ips = ?local_ips, xds = %cfg.xds.address, "sidetunnel-proxy starting");

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
    let data_path = tokio::spawn(super::run(pi.clone(), listeners, acceptor, drain.clone()));
    tokio::spawn(admin::serve_metrics(
        metrics_listener,
        metrics.clone(),
        stop.clone(),
    ));
    tokio::spawn(admin::serve_readiness(
        readiness_listener,
        readiness.clone(),
        stop.clone(),
    ));
    if let Some(l) = admin_listener {
        let dump = config_dump(cfg.clone(), store, certs, xds, pi);
        tokio::spawn(admin::serve_admin(l, dump, logs, stop.clone()));
    }

    let sig = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    info!(signal = sig, grace = ?cfg.drain_grace_period, "shutting down");
    let cut = drain.shutdown(cfg.drain_grace_period).await;
    info!(cut, "drained");
    stop.cancel();
    let _ = data_path.await;
    xds_task.abort();
    cert_task.abort();
    if let Some(path) = &cfg.admin_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

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

fn xds_config(cfg: &Config, local_ips: &[IpAddr]) -> XdsConfig {
    let node = NodeInfo {
        pod_name: cfg.pod.name.clone(),
        namespace: cfg.pod.namespace.clone(),
        service_account: cfg.pod.service_account.clone(),
        node_name: cfg.pod.node_name.clone().unwrap_or_default(),
        cluster_id: cfg.pod.cluster_id.clone(),
        ips: local_ips.to_vec(),
        extra: Default::default(),
    };
    let mut x = XdsConfig::new(cfg.xds.address.clone(), cfg.xds.root_cert.clone(), node);
    x.server_name = cfg.xds.server_name.clone();
    x.token_file = cfg.token_file.clone();
    x.connect_timeout = cfg.connect_timeout;
    x.mark = cfg.mark;
    if cfg.xds_mode == XdsMode::OnDemand {
        // Scoped mode (see `XdsConfig::from_proxy_config`): the pod's own
        // workload is needed from the start (inbound policy and metrics);
        // other destinations arrive on demand and are dropped when idle.
        x.addresses = Subscription::OnDemand {
            initial: local_ips
                .iter()
                .map(|ip| NetworkAddr::new(cfg.pod.network.clone(), *ip).to_string())
                .collect(),
        };
        // Policies stay wildcard: scoping them by the workload uid (as
        // `XdsConfig::from_proxy_config` does) would hide policies meshd
        // serves verbatim (inventory `raw:` resources), which it does not
        // resolve to any workload.
        x.authorizations = Subscription::Wildcard;
        x.idle_timeout = Some(cfg.xds_idle_timeout);
        // Validated when the configuration was resolved.
        if let Err(e) = x.add_prefetch(&cfg.xds_prefetch, &cfg.pod.network) {
            tracing::warn!(error = %e, "ignoring the xDS prefetch list");
        }
    } else {
        x.addresses = Subscription::Wildcard;
        x.authorizations = Subscription::Wildcard;
    }
    x
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
