//! Certificate verifiers for HBONE. Both check the chain with webpki against
//! the trust anchors of the *current* workload certificate (so a root
//! rotation applies to new handshakes), then check SPIFFE URI SANs:
//! the server checks the client's trust domain, the client checks the
//! server's exact identity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::crypto::provider;
use crate::identity::{CertificateManager, Identity, identities_of};

/// A rustls error carrying our own message (shows up in handshake errors).
#[derive(Debug)]
struct SanMismatch(String);

impl std::fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SanMismatch {}

fn other(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        SanMismatch(msg),
    ))))
}

fn webpki_to_rustls(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        e => CertificateError::Other(rustls::OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// Chain check of `end_entity` + `intermediates` against the manager's
/// current roots for the given usage.
fn verify_chain(
    certs: &CertificateManager,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<Vec<Identity>, rustls::Error> {
    let current = certs
        .current()
        .ok_or_else(|| other("no valid local certificate, so no trust anchors".to_owned()))?;
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_to_rustls)?;
    cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &current.root_store().roots,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_to_rustls)?;
    identities_of(end_entity).map_err(|e| other(e.to_string()))
}

/// The handshake-signature methods `ClientCertVerifier` and
/// `ServerCertVerifier` both require, identical for the two verifiers: the
/// configs are TLS 1.3 only, with the crypto provider's algorithms.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            // rustls never calls this on a TLS 1.3-only config.
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Server side: client certificate required, chained to the mesh roots,
/// with a SPIFFE identity in an allowed trust domain.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    certs: CertificateManager,
    trust_domains: Vec<String>,
}

impl ClientIdentityVerifier {
    pub fn new(certs: CertificateManager, trust_domains: Vec<String>) -> Self {
        Self {
            certs,
            trust_domains,
        }
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every mesh client has exactly one certificate; hints buy nothing.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ids = verify_chain(
            &self.certs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if ids.is_empty() {
            return Err(other("client certificate has no SPIFFE URI SAN".to_owned()));
        }
        if !ids
            .iter()
            .any(|id| self.trust_domains.iter().any(|td| td == id.trust_domain()))
        {
            return Err(other(format!(
                "client identity {} is not in an allowed trust domain ({})",
                join(&ids),
                self.trust_domains.join(", ")
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// Client side: server chained to the mesh roots and presenting one of the
/// expected SPIFFE identities as a URI SAN.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    certs: CertificateManager,
    expected: Vec<Identity>,
}

impl ServerIdentityVerifier {
    pub fn new(certs: CertificateManager, expected: Vec<Identity>) -> Self {
        Self { certs, expected }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ids = verify_chain(
            &self.certs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if ids.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(other(format!(
            "server identity {} is not the expected {}",
            if ids.is_empty() {
                "(none)".to_owned()
            } else {
                join(&ids)
            },
            join(&self.expected)
        )))
    }

    tls13_only_signatures!();
}

fn join(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
