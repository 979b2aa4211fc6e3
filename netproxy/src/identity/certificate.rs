//! A workload's certificate: leaf + intermediates, private key, mesh roots,
//! validity window and the SPIFFE identity read from the leaf's URI SAN.
//!
//! Everything the TLS layer needs per handshake (the rustls `CertifiedKey`
//! and the trust anchors) is built once here, so a handshake only clones
//! `Arc`s.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::Identity;

/// Why certificate material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: no PEM CERTIFICATE block found")]
    NoCertificate { what: &'static str },
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("private key: invalid or unsupported key: {0}")]
    Key(#[source] rustls::Error),
    #[error("private key does not match the leaf certificate's public key: {0}")]
    KeyMismatch(#[source] rustls::Error),
    #[error("{what}: invalid X.509 certificate: {detail}")]
    X509 { what: &'static str, detail: String },
    #[error("leaf certificate has no SPIFFE URI SAN (URI SANs: {0:?})")]
    NoIdentity(Vec<String>),
    #[error("roots: invalid trust anchor: {0}")]
    Root(#[source] rustls::Error),
    #[error("certificate identity {got} differs from the expected {want}")]
    WrongIdentity { want: Identity, got: Identity },
    #[error("certificate expired at {not_after:?}")]
    Expired { not_after: SystemTime },
}

/// A workload certificate and everything derived from it. Immutable; shared
/// as `Arc<WorkloadCertificate>`.
pub struct WorkloadCertificate {
    identity: Identity,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    /// Leaf first, then intermediates (as presented in the handshake).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
    certified_key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for WorkloadCertificate {
    // Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// A serialisable summary for config dumps and logs (no key material).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateInfo {
    pub identity: String,
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
    pub chain_len: usize,
    pub roots: usize,
}

impl WorkloadCertificate {
    /// Builds from PEM text: `chain` = leaf then intermediates, `key` = PKCS#8,
    /// SEC1 or PKCS#1 private key, `roots` = one or more trust anchors.
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Self, CertError> {
        let chain = parse_certs("certificate chain", chain)?;
        let roots = parse_certs("roots", roots)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| CertError::Pem {
            what: "private key",
            source,
        })?;
        Self::from_der(chain, key, roots)
    }

    /// Builds from DER values (leaf first in `chain`).
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::NoCertificate {
            what: "certificate chain",
        })?;
        let parsed = parse_leaf(leaf)?;
        let mut root_store = RootCertStore::empty();
        for root in &roots {
            root_store.add(root.clone()).map_err(CertError::Root)?;
        }
        let signer = crate::crypto::provider()
            .key_provider
            .load_private_key(key)
            .map_err(CertError::Key)?;
        let certified_key = CertifiedKey::new(chain.clone(), signer);
        certified_key.keys_match().map_err(CertError::KeyMismatch)?;
        Ok(Self {
            identity: parsed.identity,
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            serial: parsed.serial,
            chain,
            roots,
            root_store: Arc::new(root_store),
            certified_key: Arc::new(certified_key),
        })
    }

    /// The SPIFFE identity from the leaf's first SPIFFE URI SAN.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// True when `now` lies inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }

    /// True once `not_after` has passed: such a certificate is never used.
    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// Leaf then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The mesh trust anchors delivered with this certificate.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trust anchors as a rustls store (used by the HBONE verifiers).
    pub fn root_store(&self) -> &Arc<RootCertStore> {
        &self.root_store
    }

    /// Chain + signing key, ready for a rustls cert resolver.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// Summary for config dumps.
    pub fn info(&self) -> CertificateInfo {
        CertificateInfo {
            identity: self.identity.to_string(),
            serial: self.serial.clone(),
            not_before: epoch_secs(self.not_before),
            not_after: epoch_secs(self.not_after),
            chain_len: self.chain.len(),
            roots: self.roots.len(),
        }
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses every CERTIFICATE block of a PEM bundle (e.g. a roots file).
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    parse_certs("certificates", pem)
}

/// Parses every CERTIFICATE block in `pem` (other block types are skipped).
pub(crate) fn parse_certs(
    what: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate { what });
    }
    Ok(certs)
}

struct ParsedLeaf {
    identity: Identity,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

fn parse_leaf(der: &CertificateDer<'_>) -> Result<ParsedLeaf, CertError> {
    let x509 = |detail: String| CertError::X509 {
        what: "leaf certificate",
        detail,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| x509(e.to_string()))?;
    let uris = uri_sans(&cert).map_err(x509)?;
    let identity = uris
        .iter()
        .find_map(|u| u.parse::<Identity>().ok())
        .ok_or_else(|| CertError::NoIdentity(uris.clone()))?;
    Ok(ParsedLeaf {
        identity,
        not_before: to_system_time(cert.validity().not_before.timestamp()),
        not_after: to_system_time(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string(),
    })
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    }
}

/// All URI SANs of a certificate.
fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// End of a DER certificate's validity window (`notAfter`); used to stop
/// reusing a connection once the peer's certificate has expired.
pub fn not_after_of(der: &CertificateDer<'_>) -> Result<SystemTime, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::X509 {
        what: "peer certificate",
        detail: e.to_string(),
    })?;
    Ok(to_system_time(cert.validity().not_after.timestamp()))
}

/// The SPIFFE identities in a DER certificate's URI SANs (used by the TLS
/// verifiers on peer certificates). Unparseable URIs are ignored.
pub fn identities_of(der: &CertificateDer<'_>) -> Result<Vec<Identity>, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::X509 {
        what: "peer certificate",
        detail: e.to_string(),
    })?;
    let uris = uri_sans(&cert).map_err(|detail| CertError::X509 {
        what: "peer certificate",
        detail,
    })?;
    Ok(uris.iter().filter_map(|u| u.parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testca::TestCa;

    const ID: &str = "spiffe://cluster.local/ns/a/sa/b";

    #[test]
    fn parses_identity_validity_and_key() {
        let ca = TestCa::new();
        let i = ca.issue(&[ID], false);
        let c =
            WorkloadCertificate::from_pem(i.chain.as_bytes(), i.key.as_bytes(), i.roots.as_bytes())
                .unwrap();
        assert_eq!(c.identity().to_string(), ID);
        assert!(c.is_valid_at(SystemTime::now()));
        assert!(!c.is_expired());
        assert_eq!(c.chain().len(), 1);
        assert_eq!(c.roots().len(), 1);
        assert_eq!(c.root_store().len(), 1);
        let info = c.info();
        assert_eq!(info.identity, ID);
        assert!(info.not_after > info.not_before);
        // Debug output never shows key material.
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn first_spiffe_uri_wins_and_non_spiffe_is_ignored() {
        let ca = TestCa::new();
        let i = ca.issue(&["https://example.com/x", ID], false);
        let c =
            WorkloadCertificate::from_pem(i.chain.as_bytes(), i.key.as_bytes(), i.roots.as_bytes())
                .unwrap();
        assert_eq!(c.identity().to_string(), ID);
        let ids = identities_of(&c.chain()[0]).unwrap();
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn rejects_bad_material_with_clear_errors() {
        let ca = TestCa::new();
        let good = ca.issue(&[ID], false);
        let other = ca.issue(&[ID], false);
        let err = |chain: &str, key: &str, roots: &str| {
            WorkloadCertificate::from_pem(chain.as_bytes(), key.as_bytes(), roots.as_bytes())
                .unwrap_err()
        };
        assert!(matches!(
            err(&good.chain, &other.key, &good.roots),
            CertError::KeyMismatch(_)
        ));
        assert!(matches!(
            err("", &good.key, &good.roots),
            CertError::NoCertificate {
                what: "certificate chain"
            }
        ));
        assert!(matches!(
            err(&good.chain, &good.key, "junk"),
            CertError::NoCertificate { what: "roots" }
        ));
        assert!(matches!(
            err(&good.chain, "", &good.roots),
            CertError::Pem { .. }
        ));
        let no_id = ca.issue(&["https://example.com/x"], false);
        let e = err(&no_id.chain, &no_id.key, &no_id.roots);
        assert!(matches!(e, CertError::NoIdentity(_)));
        assert!(e.to_string().contains("https://example.com/x"), "{e}");
    }
}
