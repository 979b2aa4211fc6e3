//! Where the workload certificate comes from, kept fresh by a background
//! task that installs each new one into a [`CertificateManager`]: the Istio
//! CA over gRPC (`istio_ca`), or certificate files provisioned by the
//! platform (`files`).
//!
//! Private keys live only in this process's memory (CA mode: generated here,
//! never written) or in files the platform mounts for the proxy alone.

mod files;
mod istio_ca;

use std::path::PathBuf;

use crate::identity::{CertError, CertificateManager, Identity};

pub use files::FileSourceConfig;
pub use istio_ca::{CaClient, CaClientConfig};

/// Errors obtaining a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertSourceError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("invalid CA address {address:?}: {detail}")]
    CaAddress { address: String, detail: String },
    #[error("CA TLS setup: {0}")]
    CaTls(String),
    #[error("generating the key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("CreateCertificate failed: {0}")]
    CaStatus(#[from] Box<tonic::Status>),
    #[error("CreateCertificate timed out after {0:?}")]
    CaTimeout(std::time::Duration),
    #[error("CA response: {0}")]
    CaResponse(String),
    #[error("invalid header value for {header}: {detail}")]
    Header {
        header: &'static str,
        detail: String,
    },
}

/// Where the workload certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Istio CA (`istio.v1.auth.IstioCertificateService/CreateCertificate`).
    IstioCa(CaClientConfig),
    /// PEM files written by the platform, polled for changes.
    Files(FileSourceConfig),
}

impl CertSource {
    /// Creates a manager for `identity` and spawns the task that fills and
    /// renews it from this source. The task runs until the returned handle
    /// is aborted. Must be called inside a tokio runtime.
    pub fn spawn(
        self,
        identity: Identity,
    ) -> Result<(CertificateManager, tokio::task::JoinHandle<()>), CertSourceError> {
        let manager = CertificateManager::new(identity);
        let task = match self {
            CertSource::IstioCa(cfg) => {
                let client = CaClient::new(cfg)?;
                tokio::spawn(istio_ca::run(client, manager.clone()))
            }
            CertSource::Files(cfg) => tokio::spawn(files::run(cfg, manager.clone())),
        };
        Ok((manager, task))
    }
}
