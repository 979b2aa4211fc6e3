//! Workload identity: SPIFFE identities, workload certificates (parsed and
//! checked) and the current one, shared through a [`CertificateManager`].
//! Below TLS, which serves and verifies these; where certificates come from
//! (the Istio CA over TLS, or files) is `crate::cert_source`, above TLS.

mod certificate;
mod manager;
mod spiffe;
#[cfg(test)]
pub(crate) mod testca;

pub(crate) use certificate::parse_certs;
pub use certificate::{
    CertError, CertificateInfo, WorkloadCertificate, identities_of, not_after_of,
    parse_pem_certificates,
};
pub use manager::CertificateManager;
pub use spiffe::{Identity, IdentityParseError};
