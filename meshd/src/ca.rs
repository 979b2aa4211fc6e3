//! The Istio CA endpoint (`IstioCertificateService/CreateCertificate`):
//! authenticates the caller's token and signs a CSR for exactly the caller's
//! SPIFFE identity.

use std::sync::Arc;
use std::time::Duration;

use sidetunnel_proto::istio::ca::istio_certificate_service_server::IstioCertificateService;
use sidetunnel_proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::pki::{Ca, CsrError};

pub struct CaService {
    auth: Arc<Authenticator>,
    ca: Arc<Ca>,
    trust_domain: String,
    max_ttl: Duration,
}

impl CaService {
    pub fn new(
        auth: Arc<Authenticator>,
        ca: Arc<Ca>,
        trust_domain: String,
        max_ttl: Duration,
    ) -> Self {
        CaService {
            auth,
            ca,
            trust_domain,
            max_ttl,
        }
    }

    /// Requested validity, capped; no (or a non-positive) request gets the cap.
    fn ttl(&self, requested_secs: i64) -> Duration {
        match u64::try_from(requested_secs) {
            Ok(s) if s > 0 => Duration::from_secs(s).min(self.max_ttl),
            _ => self.max_ttl,
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let id = self
            .auth
            .authenticate(request.metadata())
            .inspect_err(|e| {
                warn!(%peer, "CSR refused: {}", e.message());
            })?;
        let req = request.into_inner();
        let spiffe = id.spiffe(&self.trust_domain);
        let ttl = self.ttl(req.validity_duration);
        let signed = self.ca.sign_csr(&req.csr, &spiffe, ttl).map_err(|e| {
            warn!(%peer, identity = %spiffe, "CSR refused: {e}");
            match e {
                CsrError::Invalid(m) => Status::invalid_argument(m),
                CsrError::Identity(m) => Status::permission_denied(m),
            }
        })?;
        info!(%peer, identity = %spiffe, ttl_secs = ttl.as_secs(), "signed workload certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: signed.chain,
        }))
    }
}
