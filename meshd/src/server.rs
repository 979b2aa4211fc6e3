//! `serve`: loads the state directory and inventory, then serves delta ADS
//! and the CA on one TLS gRPC port while the inventory watcher publishes
//! changes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidetunnel_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use sidetunnel_proto::istio::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::auth::Authenticator;
use crate::ca::CaService;
use crate::inventory::{Context, LoadError};
use crate::jwt::{JwtError, JwtKey};
use crate::pki::{self, Ca, PkiError};
use crate::snapshot::TypeUrl;
use crate::watch::InventoryWatcher;
use crate::xds::{AdsService, Published};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub dir: PathBuf,
    pub inventory: PathBuf,
    pub listen: SocketAddr,
    pub cluster_id: String,
    pub max_cert_ttl: Duration,
    pub poll_interval: Duration,
    /// istiod's behaviour, or with meshd's extensions.
    pub mode: crate::mode::Mode,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("state directory: {0} (run `sidetunnel-meshd init --dir DIR` first)")]
    Pki(#[from] PkiError),
    #[error("JWT key: {0}")]
    Jwt(#[from] JwtError),
    #[error("{0}")]
    Inventory(#[from] LoadError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs until `shutdown` completes. `on_listening` gets the bound address
/// once the port accepts connections.
pub async fn serve(
    cfg: ServeConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let trust_domain = pki::read_trust_domain(&cfg.dir)?;
    let ca = Arc::new(Ca::load(&cfg.dir)?);
    let jwt = JwtKey::from_pkcs8(&pki::load_pkcs8_der(&cfg.dir.join(pki::JWT_KEY))?)?;
    let read = |name: &str| {
        let p = cfg.dir.join(name);
        std::fs::read(&p).map_err(|source| PkiError::Io { path: p, source })
    };
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(pki::XDS_CERT)?,
        read(pki::XDS_KEY)?,
    ));
    let ctx = Context {
        cluster_id: cfg.cluster_id.clone(),
        trust_domain: trust_domain.clone(),
    };
    let (watcher, snapshot) =
        InventoryWatcher::load(cfg.inventory.clone(), ctx, cfg.poll_interval)?;
    info!(
        inventory = %cfg.inventory.display(),
        addresses = snapshot.table(TypeUrl::Address).len(),
        policies = snapshot.table(TypeUrl::Authorization).len(),
        full_address_sync_bytes = snapshot.full_sync_bytes(TypeUrl::Address),
        mode = %cfg.mode,
        "inventory loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(Published {
        generation: 1,
        snapshot: Arc::new(snapshot),
        diff_from_previous: Default::default(),
    }));

    let auth = Arc::new(Authenticator::new(jwt, cfg.cluster_id.clone()));
    let ads = AdsService::new(auth.clone(), rx, cfg.mode.extensions());
    let ca = CaService::new(auth, ca, trust_domain, cfg.max_cert_ttl);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let watcher = tokio::spawn(watcher.run(tx));
    // Stopping the watcher drops the snapshot sender, which ends every open
    // xDS stream (UNAVAILABLE); graceful shutdown would otherwise wait for
    // clients that never hang up.
    let stop_watcher = watcher.abort_handle();
    let shutdown = async move {
        shutdown.await;
        info!("shutting down: closing xDS streams");
        stop_watcher.abort();
    };
    let server = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AggregatedDiscoveryServiceServer::new(ads).max_decoding_message_size(16 << 20))
        .add_service(IstioCertificateServiceServer::new(ca))
        .serve_with_incoming_shutdown(incoming_nodelay(listener), shutdown);
    info!(%addr, "serving delta ADS and CA over TLS");
    on_listening(addr);
    let result = server.await;
    watcher.abort();
    Ok(result?)
}

/// Accepted connections with Nagle off: xDS responses are small writes that
/// a peer's delayed ACK would otherwise hold back ~40 ms (measured as most of
/// a proxy's start-to-ready time).
fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        // Best effort: a socket that refuses the option still serves.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    })
}
