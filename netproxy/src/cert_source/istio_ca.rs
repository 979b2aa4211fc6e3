//! Istio CA client: generates an ECDSA P-256 key and a CSR carrying exactly
//! one URI SAN (the SPIFFE identity), calls
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS with the
//! pod's service-account token (`authorization: Bearer …`, re-read from its
//! file on every call because kubelet rotates it) and the `clusterid` header,
//! and keeps the certificate renewed at half-life.
//!
//! Renewal failures retry with jittered exponential backoff; the previous
//! certificate stays installed while it is still valid, and is never served
//! after it expires (see [`CertificateManager::current`]).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sidetunnel_proto::istio::ca::IstioCertificateRequest;
use sidetunnel_proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::Channel;

use super::CertSourceError;
use crate::identity::{CertificateManager, Identity, WorkloadCertificate, parse_certs};

/// How to reach and authenticate to the Istio CA.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `https://host:port` of the CA (istiod: port 15012).
    pub address: String,
    /// PEM file with the roots that sign the CA's serving certificate.
    pub root_cert: PathBuf,
    /// Name to verify the CA's certificate against (istiod:
    /// `istiod.istio-system.svc`); default: the host part of `address`.
    pub server_name: Option<String>,
    /// Service-account token file, re-read on every request; `None` sends no
    /// `authorization` header.
    pub token_file: Option<PathBuf>,
    /// Value of the `clusterid` header (Istio's default is `Kubernetes`).
    pub cluster_id: String,
    /// Requested certificate lifetime (`validity_duration`, whole seconds).
    pub ttl: Duration,
    /// Deadline of one CreateCertificate call.
    pub request_timeout: Duration,
    /// Upper bound of the retry backoff after failures.
    pub max_backoff: Duration,
    /// SO_MARK of the connection to the CA (the proxy's mark, so the pod's
    /// redirection ruleset does not capture it); 0 leaves it unmarked.
    pub mark: u32,
}

impl CaClientConfig {
    /// Defaults as Istio's: cluster `Kubernetes`, 24 h certificates, 10 s
    /// request timeout, backoff capped at 60 s.
    pub fn new(address: impl Into<String>, root_cert: impl Into<PathBuf>) -> Self {
        Self {
            address: address.into(),
            root_cert: root_cert.into(),
            server_name: None,
            token_file: None,
            cluster_id: "Kubernetes".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            mark: 0,
        }
    }
}

/// A connected (lazily) CA client.
#[derive(Debug, Clone)]
pub struct CaClient {
    cfg: CaClientConfig,
    client: IstioCertificateServiceClient<Channel>,
}

impl CaClient {
    /// Reads the root file and prepares the TLS channel (connects lazily).
    pub fn new(cfg: CaClientConfig) -> Result<Self, CertSourceError> {
        let roots = std::fs::read(&cfg.root_cert).map_err(|source| CertSourceError::Io {
            path: cfg.root_cert.clone(),
            source,
        })?;
        let channel = crate::tls::control_plane_channel(
            &cfg.address,
            &roots,
            cfg.server_name.as_deref(),
            cfg.mark,
        )
        .map_err(|e| CertSourceError::CaTls(e.to_string()))?;
        Ok(Self {
            client: IstioCertificateServiceClient::new(channel),
            cfg,
        })
    }

    /// Requests one certificate for `identity`. The key is generated here and
    /// never leaves memory.
    pub async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, CertSourceError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        // No subject: rcgen would otherwise add a placeholder CN; Istio
        // identifies workloads by the URI SAN only.
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key)?.pem()?;

        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.cfg.ttl.as_secs().max(1) as i64,
            metadata: None,
        });
        request.set_timeout(self.cfg.request_timeout);
        self.add_headers(request.metadata_mut()).await?;

        let mut client = self.client.clone();
        let response =
            tokio::time::timeout(self.cfg.request_timeout, client.create_certificate(request))
                .await
                .map_err(|_| CertSourceError::CaTimeout(self.cfg.request_timeout))?
                .map_err(Box::new)?
                .into_inner();

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = from_response(response.cert_chain, key)?;
        if cert.identity() != identity {
            return Err(CertSourceError::CaResponse(format!(
                "issued certificate is for {}, requested {identity}",
                cert.identity()
            )));
        }
        Ok(cert)
    }

    async fn add_headers(
        &self,
        metadata: &mut tonic::metadata::MetadataMap,
    ) -> Result<(), CertSourceError> {
        let header = |header: &'static str, value: String| {
            value
                .parse::<tonic::metadata::AsciiMetadataValue>()
                .map_err(|e| CertSourceError::Header {
                    header,
                    detail: e.to_string(),
                })
        };
        if let Some(path) = &self.cfg.token_file {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| CertSourceError::Io {
                        path: path.clone(),
                        source,
                    })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(CertSourceError::EmptyToken(path.clone()));
            }
            metadata.insert(
                "authorization",
                header("authorization", format!("Bearer {token}"))?,
            );
        }
        metadata.insert(
            "clusterid",
            header("clusterid", self.cfg.cluster_id.clone())?,
        );
        Ok(())
    }
}

/// Istio returns `[leaf, intermediates…, roots]`; the last element may hold
/// several concatenated roots.
fn from_response(
    chain: Vec<String>,
    key: PrivateKeyDer<'static>,
) -> Result<WorkloadCertificate, CertSourceError> {
    if chain.len() < 2 {
        return Err(CertSourceError::CaResponse(format!(
            "cert_chain has {} entries; need at least the leaf and the root",
            chain.len()
        )));
    }
    let mut certs: Vec<CertificateDer<'static>> = Vec::with_capacity(chain.len() - 1);
    for pem in &chain[..chain.len() - 1] {
        certs.extend(parse_certs("certificate chain", pem.as_bytes())?);
    }
    let roots = parse_certs("roots", chain[chain.len() - 1].as_bytes())?;
    Ok(WorkloadCertificate::from_der(certs, key, roots)?)
}

/// Exponential backoff with ±50 % jitter so that many pods restarted together
/// do not retry in lock-step.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_millis(500);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::INITIAL,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Self::INITIAL;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.5..1.5))
            .min(self.max)
    }
}

/// Fetch, install, sleep until half-life, repeat; on failure retry with
/// backoff (never later than the current certificate's expiry).
pub(super) async fn run(client: CaClient, manager: CertificateManager) {
    let mut backoff = Backoff::new(client.cfg.max_backoff);
    loop {
        let identity = manager.identity().clone();
        let wait = match client.fetch(&identity).await {
            Ok(cert) => match manager.install(cert) {
                Ok(cert) => {
                    backoff.reset();
                    refresh_delay(&cert)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CA issued an unusable certificate");
                    retry_delay(&mut backoff, &manager)
                }
            },
            Err(e) => {
                let delay = retry_delay(&mut backoff, &manager);
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    have_valid_certificate = manager.is_ready(),
                    "certificate request failed"
                );
                delay
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn retry_delay(backoff: &mut Backoff, manager: &CertificateManager) -> Duration {
    let delay = backoff.next_delay();
    match manager.current() {
        Some(cert) => delay.min(until(cert.not_after())),
        None => delay,
    }
}

/// Renew half-way through the certificate's *remaining* lifetime as seen
/// at receipt. Istio's half-life rule, but measured from now rather than from
/// `not_before`: CAs backdate `not_before` for clock skew (meshd and istiod
/// by a minute), which with short TTLs would put the half-life in the past
/// and make the client renew in a tight loop.
fn refresh_delay(cert: &WorkloadCertificate) -> Duration {
    (until(cert.not_after()) / 2).max(MIN_REFRESH)
}

/// Floor of the renewal delay (guards against a CA issuing certificates that
/// are almost expired).
const MIN_REFRESH: Duration = Duration::from_millis(500);

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(750));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(4));
        }
        assert_eq!(b.next, Duration::from_secs(4));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(750));
    }

    #[test]
    fn response_needs_leaf_and_root() {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![0u8; 4]));
        let err = from_response(vec!["x".into()], key).unwrap_err();
        assert!(
            err.to_string()
                .contains("need at least the leaf and the root")
        );
    }
}
