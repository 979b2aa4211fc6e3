//! rustls configuration for HBONE (mTLS between proxies) and for the control
//! plane channel (xDS and CA).
//!
//! HBONE follows ztunnel: TLS 1.3 only, AES-GCM suites only, ALPN `h2`,
//! client certificates required, peers identified by SPIFFE URI SANs (never
//! by DNS names). Certificates and trust anchors are resolved per handshake
//! from the [`CertificateManager`], so a rotated certificate applies to new
//! connections without rebuilding any config.

mod control_plane;
mod verify;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::crypto::provider;
use crate::identity::{CertificateManager, Identity, identities_of};

pub use control_plane::{MarkedConnector, control_plane_channel, control_plane_client_config};
pub use verify::{ClientIdentityVerifier, ServerIdentityVerifier};

/// ALPN protocol of HBONE.
pub const HBONE_ALPN: &[u8] = b"h2";

/// TLS errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no valid workload certificate available")]
    NoCertificate,
    #[error("rustls configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("peer presented no SPIFFE identity")]
    NoPeerIdentity,
    #[error("control plane TLS: {0}")]
    ControlPlane(String),
}

/// Serves the current certificate of a manager to rustls (server side and
/// client side).
#[derive(Debug)]
struct CurrentCert(CertificateManager);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current().map(|c| c.certified_key().clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current().map(|c| c.certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// HBONE server config: presents `certs`' current certificate, requires a
/// client certificate chaining to the current mesh roots whose SPIFFE
/// identity belongs to one of `trust_domains` (empty = the proxy's own trust
/// domain only). Build once; rotation is picked up per handshake.
pub fn hbone_server_config(
    certs: CertificateManager,
    trust_domains: Vec<String>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let trust_domains = if trust_domains.is_empty() {
        vec![certs.identity().trust_domain().to_owned()]
    } else {
        trust_domains
    };
    let verifier = Arc::new(ClientIdentityVerifier::new(certs.clone(), trust_domains));
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(certs)));
    cfg.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    // Resumption would let a client skip certificate verification against
    // rotated roots; HBONE connections are pooled and long-lived anyway.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// HBONE client config: presents `certs`' current certificate and accepts
/// only a server chaining to the current mesh roots whose URI SAN is one of
/// `expected` (the destination workload's identity or the service's SANs).
pub fn hbone_client_config(
    certs: CertificateManager,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(ServerIdentityVerifier::new(certs.clone(), expected));
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(certs)));
    cfg.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The SPIFFE identity of the peer of an established TLS connection (first
/// SPIFFE URI SAN of its leaf certificate).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    identities_of(leaf).ok()?.into_iter().next()
}

/// When the peer's leaf certificate of an established TLS connection
/// expires.
pub fn peer_not_after(conn: &rustls::CommonState) -> Option<std::time::SystemTime> {
    crate::identity::not_after_of(conn.peer_certificates()?.first()?).ok()
}

/// Accepts HBONE TLS connections and reports the verified client identity.
#[derive(Clone)]
pub struct HboneAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl HboneAcceptor {
    /// See [`hbone_server_config`]. Handshakes time out after 10 s.
    pub fn new(certs: CertificateManager, trust_domains: Vec<String>) -> Result<Self, TlsError> {
        Ok(Self {
            acceptor: hbone_server_config(certs, trust_domains)?.into(),
            handshake_timeout: Duration::from_secs(10),
        })
    }

    /// Changes the handshake deadline (a peer that stalls the handshake
    /// must not hold a socket forever).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// TLS handshake on an accepted socket; returns the stream and the
    /// client's verified identity.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Identity), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut tls = self
            .acceptor
            .accept(io)
            .await
            .map_err(TlsError::Handshake)?;
        let peer = peer_identity(tls.get_ref().1).ok_or(TlsError::NoPeerIdentity)?;
        tls.get_mut().1.set_buffer_limit(Some(HBONE_TLS_BUFFER));
        Ok((tls, peer))
    }
}

/// How much encrypted data rustls queues on an HBONE connection before a
/// write returns (its default is 64 KiB). The copy path hands h2 DATA
/// frames of up to 256 KiB + a 9-byte frame head; with 64 KiB each frame
/// took four 64 KiB `writev`s plus a fifth for a 9-byte tail record, a
/// separate TCP segment the peer woke up for. A whole frame now goes out
/// in one `writev`. Per HBONE connection (not per stream) and only while
/// the socket is backed up.
pub const HBONE_TLS_BUFFER: usize = 512 * 1024;

/// TLS handshake as an HBONE client, verifying the server is one of
/// `expected`. Returns the stream and the server's identity.
pub async fn hbone_connect<IO>(
    certs: &CertificateManager,
    expected: &[Identity],
    io: IO,
) -> Result<(tokio_rustls::client::TlsStream<IO>, Identity), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if !certs.is_ready() {
        return Err(TlsError::NoCertificate);
    }
    let cfg = hbone_client_config(certs.clone(), expected.to_vec())?;
    // The name is irrelevant: the verifier checks URI SANs, not DNS names.
    let name = ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into());
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, io)
        .await
        .map_err(TlsError::Handshake)?;
    let peer = peer_identity(tls.get_ref().1).ok_or(TlsError::NoPeerIdentity)?;
    tls.get_mut().1.set_buffer_limit(Some(HBONE_TLS_BUFFER));
    Ok((tls, peer))
}

/// Convenience for `hbone_connect` over a plain TCP stream.
pub type HboneClientStream = tokio_rustls::client::TlsStream<TcpStream>;
