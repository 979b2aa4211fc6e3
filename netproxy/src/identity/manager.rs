//! The proxy's current certificate: one writer (a certificate source), many
//! readers (every TLS handshake). Readers take a cheap `Arc` clone of the
//! current certificate; a watch channel tells interested tasks about changes.
//!
//! An expired certificate is never handed out: `current()` checks the
//! validity window on every call, so a source that cannot renew in time makes
//! the proxy unready rather than insecure.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use super::{CertError, Identity, WorkloadCertificate};

/// Shared handle to the workload certificate. Clone freely.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Identity,
    tx: watch::Sender<Option<Arc<WorkloadCertificate>>>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("identity", &self.inner.identity.to_string())
            .field("current", &*self.inner.tx.borrow())
            .finish()
    }
}

impl CertificateManager {
    /// An empty manager for `identity`; a source fills it with `install`.
    pub fn new(identity: Identity) -> Self {
        let (tx, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner { identity, tx }),
        }
    }

    /// A manager holding one fixed certificate (tests, static setups).
    pub fn with_certificate(cert: WorkloadCertificate) -> Result<Self, CertError> {
        let manager = Self::new(cert.identity().clone());
        manager.install(cert)?;
        Ok(manager)
    }

    /// The identity this proxy serves as (fixed for its lifetime).
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The current certificate when one is present and inside its validity
    /// window; `None` otherwise.
    pub fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        let cert = self.inner.tx.borrow().clone()?;
        cert.is_valid_at(SystemTime::now()).then_some(cert)
    }

    /// The latest installed certificate even if it is expired or not yet
    /// valid (for config dumps and renewal decisions only, never for TLS).
    pub fn latest(&self) -> Option<Arc<WorkloadCertificate>> {
        self.inner.tx.borrow().clone()
    }

    /// Readiness: a valid certificate is available.
    pub fn is_ready(&self) -> bool {
        self.current().is_some()
    }

    /// Waits until a valid certificate is available.
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.tx.subscribe();
        loop {
            if self.is_ready() {
                return;
            }
            // A not-yet-valid certificate becomes usable without a change
            // notification; re-check at least once a second.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed()).await;
        }
    }

    /// Change notifications: the receiver sees every installed certificate.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<WorkloadCertificate>>> {
        self.inner.tx.subscribe()
    }

    /// Replaces the current certificate. Refuses a certificate for another
    /// identity or one that is already expired (the old one stays).
    pub fn install(
        &self,
        cert: WorkloadCertificate,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        if cert.identity() != &self.inner.identity {
            return Err(CertError::WrongIdentity {
                want: self.inner.identity.clone(),
                got: cert.identity().clone(),
            });
        }
        if cert.is_expired() {
            return Err(CertError::Expired {
                not_after: cert.not_after(),
            });
        }
        let cert = Arc::new(cert);
        tracing::info!(
            identity = %cert.identity(),
            serial = cert.info().serial,
            expires_in_s = cert
                .not_after()
                .duration_since(SystemTime::now())
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "installed workload certificate"
        );
        self.inner.tx.send_replace(Some(cert.clone()));
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testca::TestCa;

    fn cert(ca: &TestCa, uri: &str, expired: bool) -> WorkloadCertificate {
        let i = ca.issue(&[uri], expired);
        WorkloadCertificate::from_pem(i.chain.as_bytes(), i.key.as_bytes(), i.roots.as_bytes())
            .unwrap()
    }

    #[tokio::test]
    async fn install_checks_identity_and_expiry_and_notifies() {
        let ca = TestCa::new();
        let id: Identity = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let m = CertificateManager::new(id.clone());
        assert!(!m.is_ready());
        assert!(m.current().is_none());
        let mut rx = m.subscribe();

        let e = m
            .install(cert(&ca, "spiffe://td/ns/a/sa/other", false))
            .unwrap_err();
        assert!(matches!(e, CertError::WrongIdentity { .. }), "{e}");
        let e = m
            .install(cert(&ca, "spiffe://td/ns/a/sa/b", true))
            .unwrap_err();
        assert!(matches!(e, CertError::Expired { .. }), "{e}");
        assert!(!m.is_ready());

        let installed = m
            .install(cert(&ca, "spiffe://td/ns/a/sa/b", false))
            .unwrap();
        rx.changed().await.unwrap();
        assert!(Arc::ptr_eq(rx.borrow().as_ref().unwrap(), &installed));
        assert!(m.is_ready());
        tokio::time::timeout(std::time::Duration::from_secs(5), m.wait_ready())
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&m.current().unwrap(), &installed));
    }
}
